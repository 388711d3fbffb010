"""Mode "token": the target alone, with lossless token-level speculation inside every step.

The text is the target-only text (mode "target"), token for token when greedy and in distribution when
sampling; proposals come from n-gram lookup in the context (``token_speculation``; "step" needs a
drafted step, which this mode has none of). It is the baseline a user would otherwise get from
transformers' prompt-lookup decoding, in dreamr's step structure.
"""

from __future__ import annotations

from dreamr.engines.single import SingleModelEngine


class TokenEngine(SingleModelEngine):
    mode = "token"
    source = "target"
    speculate = True
