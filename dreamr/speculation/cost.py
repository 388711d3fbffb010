"""What a model's forwards cost on this machine, measured once: the units adaptive drafting weighs steps in.

Adaptive drafting (:mod:`dreamr.speculation.policy`) compares the cost of drafting a step (the draft's
forwards, the target's verification, the target's fallback step) with the target writing the step alone.
The three kinds of forward cost very different amounts, and how much depends on the machine, not only on
the models' sizes. Measured with the default pair, one thread, float32, on the 2-core development CPU
(a 96-token context; each in units of the same model's one-token decode forward):

    forward                                       gemma-3-270m (106 ms)   SmolLM2-135M (62 ms)
    one token + K proposed tokens, K = 4 / 10 / 20      1.82 / 2.25 / 2.74      1.52 / 1.85 / 2.26
    decoder only over n tokens, n = 1 / 8 / 32          0.61 / 0.72 / 1.22      (a verification: no LM head)

so a proposal check is far from free on a CPU (on a GPU, where decoding is memory-bound, it is about one
forward), the verification of a whole step costs about one forward (gemma's 262k-vocabulary LM head is
most of a decode forward, and a verification skips it), and the draft costs 0.59 of a target forward, not
the 0.50 of its parameter count (its 30 narrow layers against the target's 18). :func:`measure` times these
forwards on the machine at hand; the policy's decisions are then counted, not timed: within a run the
same text gives the same decisions.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dreamr.cache import CachedSequence
from dreamr.lm import LM

__all__ = ["ForwardCost", "PairCost", "measure"]

# A context of this many tokens is cached before the forwards are timed (a prompt's worth).
CONTEXT_TOKENS = 96
# Verification lengths timed (a step plus its verdict prompt); other lengths are interpolated.
VERIFY_TOKENS = (8, 32, 96)


@dataclass(frozen=True)
class ForwardCost:
    """One model's forward costs, in units of its own one-token decode forward.

    Attributes
    ----------
    seconds : float
        One decode forward (one token fed, its logits), in seconds: what a unit is worth.
    check : tuple of (int, float)
        ``(K, cost)`` of a forward feeding one token plus ``K`` proposed tokens, with logits at each (a
        token-level proposal check), K increasing from ``(0, 1.0)``.
    verify : tuple of (int, float)
        ``(n, cost)`` of a forward of the decoder alone (no LM head) over ``n`` tokens: a verification.

    Examples
    --------
    >>> cost = ForwardCost(seconds=0.1, check=((0, 1.0), (10, 2.0)), verify=((8, 0.7), (32, 1.2)))
    >>> cost.check_cost(5), cost.verify_cost(20)
    (1.5, 0.95)
    >>> cost.step_cost(forwards=6, proposals=2, proposed_tokens=20)   # 4 plain forwards, 2 checks of 10
    8.0
    """

    seconds: float
    check: tuple
    verify: tuple

    def check_cost(self, k: float) -> float:
        """A forward checking ``k`` proposed tokens (interpolated between the measured ``k``; linear past
        the last one)."""
        return _interpolate(self.check, k)

    def verify_cost(self, n: float) -> float:
        """A verification forward over ``n`` tokens (the step and its verdict prompt)."""
        return _interpolate(self.verify, n)

    def step_cost(self, forwards: int, proposals: int, proposed_tokens: int) -> float:
        """What writing tokens with ``forwards`` forwards cost, ``proposals`` of them checking
        ``proposed_tokens`` proposed tokens in all (each check costed at the mean proposal length)."""
        if proposals <= 0:
            return float(forwards)
        return (forwards - proposals) + proposals * self.check_cost(proposed_tokens / proposals)


@dataclass(frozen=True)
class PairCost:
    """Both models' forward costs, priced in the target's one-token decode forwards: the unit adaptive
    drafting weighs steps in (a draft forward is worth ``draft.seconds / target.seconds`` of the target's).

    Examples
    --------
    >>> target = ForwardCost(seconds=0.1, check=((0, 1.0), (10, 2.0)), verify=((8, 0.7), (32, 1.2)))
    >>> draft = ForwardCost(seconds=0.05, check=((0, 1.0), (10, 1.5)), verify=((8, 0.7), (32, 1.2)))
    >>> pair = PairCost(target, draft)
    >>> pair.forwards("draft", forwards=4, proposals=1, proposed_tokens=10)   # 0.5 * (3 + 1.5)
    2.25
    >>> pair.verification(20)
    0.95
    """

    target: ForwardCost
    draft: ForwardCost

    def forwards(self, role: str, forwards: int, proposals: int = 0, proposed_tokens: int = 0) -> float:
        """What ``forwards`` forwards of the ``role`` model ("target" or "draft") cost, ``proposals`` of
        them checking ``proposed_tokens`` proposed tokens in all (:meth:`ForwardCost.step_cost`)."""
        cost, ratio = (self.target, 1.0) if role == "target" else (self.draft, self.draft.seconds / self.target.seconds)
        return ratio * cost.step_cost(forwards, proposals, proposed_tokens)

    def verification(self, tokens: int) -> float:
        """A target verification over ``tokens`` tokens (a step and its verdict prompt)."""
        return self.target.verify_cost(tokens)


def _interpolate(points: tuple, x: float) -> float:
    """Piecewise-linear through ``points`` ``((x0, y0), (x1, y1), ...)``, x increasing; linear on past
    either end (never below 0)."""
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_right(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _best_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Shortest wall time of ``fn`` over ``repeats`` runs after one untimed run (synchronising a GPU):
    other load on the machine only ever adds time, so the shortest run is the forward's own cost."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def measure(lm: LM, max_proposal: int, *, repeats: int = 3,
            open_sequence: Optional[Callable[[list[int]], Any]] = None) -> ForwardCost:
    """Time ``lm``'s forwards on this machine (a few seconds for the default pair on one CPU thread).

    Parameters
    ----------
    lm : LM
    max_proposal : int, >= 1
        The longest proposal its steps check (``num_speculative_tokens``): proposal checks are timed at
        ``K = 1, 2, 4, ...`` up to it.
    repeats : int
        Timed runs per forward (the shortest is kept).
    open_sequence : callable, optional
        ``open_sequence(ids)``: a sequence of ``lm`` as the engine holds it (a
        :class:`dreamr.engines.ragged_sequence.RaggedSequence` where its decode replays CUDA graphs), so
        that the forwards timed are the ones the engine runs. Default: a :class:`CachedSequence`.

    Returns
    -------
    ForwardCost

    Examples
    --------
    >>> from dreamr.lm import LM
    >>> from dreamr.testing import target_tokenizer, tiny_llama
    >>> tokenizer = target_tokenizer()
    >>> cost = measure(LM(tiny_llama(tokenizer), tokenizer, "target"), 4, repeats=1)
    >>> [k for k, _ in cost.check]
    [0, 1, 2, 4]
    """
    if isinstance(max_proposal, bool) or not isinstance(max_proposal, int) or max_proposal < 1:
        raise ValueError(f"measure: max_proposal must be an integer >= 1, got {max_proposal!r}")
    vocab = int(lm.text_config.vocab_size)
    longest = max(max_proposal, VERIFY_TOKENS[-1])
    # any ids do (what the forwards cost does not depend on them); these avoid the special ones at the
    # bottom of a large vocabulary
    low = min(1000, vocab // 2)
    ids = [low + (7919 * i) % (vocab - low) for i in range(CONTEXT_TOKENS + longest)]
    context, extra = ids[:CONTEXT_TOKENS], ids[CONTEXT_TOKENS:]
    with torch.inference_mode():
        seq = (open_sequence(context[:-1]) if open_sequence is not None
               else CachedSequence(lm.model, context[:-1], device=lm.device))
        seq.next_logits()  # the context is cached; its last token stays pending
        seq.extend(context[-1:])
        base = len(seq.ids)

        def decode(k: int) -> Callable[[], None]:
            def run() -> None:
                if k:
                    seq.logits_over(extra[:k])
                else:
                    seq.next_logits()
                seq.uncache_to(base - 1)
            return run

        def verify(n: int) -> Callable[[], None]:
            def run() -> None:
                seq.last_hidden(extra[:n])
                seq.uncache_to(base - 1)
            return run

        one = _best_seconds(decode(0), lm.device, repeats)
        ks = sorted({min(2 ** i, max_proposal) for i in range(max_proposal.bit_length() + 1)})
        check = ((0, 1.0),) + tuple((k, _best_seconds(decode(k), lm.device, repeats) / one) for k in ks)
        verify_points = tuple((n, _best_seconds(verify(n), lm.device, repeats) / one) for n in VERIFY_TOKENS)
    return ForwardCost(seconds=one, check=check, verify=verify_points)
