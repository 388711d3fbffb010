"""dreamr over vLLM's OpenAI-compatible servers: the remote backend of :class:`dreamr.remote.RemoteReasoner`.

One file an idea, each calling only downward:

| file | what |
| --- | --- |
| ``client.py`` | one server's API: checks at start-up, ``/v1/completions`` on token ids, retries, :class:`ServerError` |
| ``model.py`` | a served model's facts (tokenizer, EOS ids, context length), read once; its committed ids |
| ``writer.py`` | one step written by a server, ended exactly where the in-process engines end it |
| ``verifier.py`` | CPN from the verdict tokens' log-probabilities (one ``max_tokens=1`` request) |
| ``single.py``, ``speculative.py``, ``fpsr.py`` | the modes, as async generators of committed steps |
| ``launch.py`` | starting vLLM servers for a user and for the tests |

The in-process backend is :mod:`dreamr.engines` (transformers models in this process).
"""

from dreamr.backends.vllm.client import Completion, ServerClient, ServerError, ServerInfo
from dreamr.backends.vllm.fpsr import stream_fpsr
from dreamr.backends.vllm.model import RemoteModel, RemoteSequence, load_tokenizer
from dreamr.backends.vllm.single import stream_single
from dreamr.backends.vllm.speculative import stream_speculative
from dreamr.backends.vllm.verifier import RemoteVerifier
from dreamr.backends.vllm.writer import Sampling, write_step

__all__ = ["Completion", "ServerClient", "ServerError", "ServerInfo", "RemoteModel", "RemoteSequence",
           "load_tokenizer", "RemoteVerifier", "Sampling", "write_step", "stream_single", "stream_speculative",
           "stream_fpsr"]
