"""Propose the draft's rejected step: the target's own step on the same prefix often says nearly the same.

When the judge rejects a drafted step, the target writes the step itself on the very prefix the draft
wrote it for. The drafted step, in the target's tokens, is the best free guess of that step: while the
target's step so far is a prefix of it, propose its next tokens; once they part, resynchronise on the
latest occurrence of the target's last tokens inside the drafted step (a reworded start, then the same
numbers).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dreamr.speculation.ngram import continuation

__all__ = ["RejectedStepProposer"]


class RejectedStepProposer:
    """Proposals from ``step_ids``, a rejected drafted step in the writing model's tokens.

    Parameters
    ----------
    step_ids : sequence of int
        The drafted step (``LM.step_ids`` of the draft's writer).
    max_ngram : int
        Longest suffix of the step written so far to resynchronise on.

    Examples
    --------
    >>> p = RejectedStepProposer([10, 11, 12, 13])
    >>> p.propose(context=[1, 2], step=[], k=2)
    [10, 11]
    >>> p.propose(context=[1, 2, 9, 12], step=[9, 12], k=2)
    [13]
    """

    name = "step"

    def __init__(self, step_ids: Sequence[int], max_ngram: int = 3):
        self.ref = np.asarray(list(step_ids), dtype=np.int64)
        self.max_ngram = max_ngram

    def propose(self, context: Sequence[int], step: Sequence[int], k: int) -> list[int]:
        n_ref, n_step = len(self.ref), len(step)
        if k <= 0 or n_ref == 0:
            return []
        if n_step < n_ref and np.array_equal(self.ref[:n_step], np.asarray(step, dtype=np.int64)):
            return self.ref[n_step:n_step + k].tolist()  # still on the drafted step
        for n in range(min(self.max_ngram, n_step), 0, -1):
            found = continuation(self.ref, list(step[-n:]), k, before=n_ref)
            if found:
                return found
        return []
