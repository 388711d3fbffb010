"""dreamr: speculative reasoning (DREAM-R) for transformers models.

A small draft model writes reasoning steps; the target checks each with one forward pass (CPN) and
writes a step itself only where the draft's falls short. ``SpeculativeReasoner`` runs both models in this
process (transformers); ``RemoteReasoner`` runs them behind vLLM servers.
"""

__version__ = "0.1.0"

# The public names, each imported from its module on first access, so that `import dreamr.ops` does not
# pull in transformers; dir(dreamr) lists them all the same.
_LAZY = {
    "SpeculativeReasoner": "dreamr.reasoner",
    "RemoteReasoner": "dreamr.remote",
    "AsyncStepStream": "dreamr.streaming",
    "ReasonerConfig": "dreamr.config",
    "StepStream": "dreamr.reasoner",
    "Result": "dreamr.result",
    "Step": "dreamr.result",
    "Metrics": "dreamr.result",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dreamr' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
