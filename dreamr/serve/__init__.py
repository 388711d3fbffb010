"""dreamr over HTTP: an OpenAI-compatible server of a reasoner (``python -m dreamr.serve``).

    from dreamr.serve import create_app
    app = create_app(reasoner, served_model_name="dreamr")    # a FastAPI app; run it with uvicorn

Any OpenAI client then talks to it, dreamr's settings as extra body fields:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
    client.chat.completions.create(model="dreamr", messages=[...], extra_body={"alpha": 0.5})

See :mod:`dreamr.serve.app` for the endpoints and the request mapping, :mod:`dreamr.serve.metrics` for
``GET /metrics``.
"""

from dreamr.serve.app import create_app
from dreamr.serve.metrics import ServerMetrics

__all__ = ["create_app", "ServerMetrics"]
