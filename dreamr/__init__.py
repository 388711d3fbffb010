"""dreamr: speculative reasoning (DREAM-R) for transformers models.

A small draft model writes reasoning steps; the target checks each with one forward pass (CPN) and
writes a step itself only where the draft's falls short.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that `import dreamr.ops` does not pull in transformers.
    if name in ("SpeculativeReasoner", "ReasonerConfig"):
        from dreamr import reasoner

        return getattr(reasoner, name)
    raise AttributeError(f"module 'dreamr' has no attribute {name!r}")
