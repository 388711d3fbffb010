"""Fitting a verdict head by L2-regularised logistic regression, and the figures a judge is rated by.

Features are the target's final hidden states at the verdict position (:mod:`.features`), one set per
group: the good step, the bad steps and the null step after one prefix. Two feature choices:

* ``h``: the hidden state itself; the head is ``sigmoid(w . h + b)``;
* ``h - h_null``: the null step's hidden state at the same prefix subtracted (contextual calibration,
  see ``docs/method.md``); the head is ``sigmoid(w . (h - h_null))`` with no bias (it would cancel in
  ``l - l_null``), so a step equal to the null step scores exactly 0.5.

Each pair (good, bad) weighs the same: a good step with ``k`` bad partners counts ``k`` times. The L2
strength is picked on a validation part of the training problems (split by problem), the head refitted
on all of them. The fit is deterministic for a seed (LBFGS in float64).

Figures: pooled AUROC (every pair's good step against every pair's bad step, across prefixes: what a
single threshold sees) and pair accuracy (good scored above its own bad; ties count half).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from dreamr.calibrate.pairs import Group
from dreamr.verify.head import VerdictHead, calibrated_cpn

__all__ = [
    "auroc",
    "pair_accuracy",
    "figures",
    "FeatureSet",
    "extract",
    "fit_direction",
    "fit_head",
    "step_scores",
    "evaluate",
    "L2_GRID",
]

L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
"""L2 strengths tried (on standardised features, loss averaged over the pairs' weight)."""


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve of ``positive`` scores against ``negative`` ones (ties count half);
    NaN scores rank lowest. NaN where either side is empty."""
    pos = torch.as_tensor(list(positive), dtype=torch.float64)
    neg = torch.as_tensor(list(negative), dtype=torch.float64)
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    pos = torch.nan_to_num(pos, nan=-math.inf)
    neg = torch.nan_to_num(neg, nan=-math.inf)
    scores = torch.cat([pos, neg])
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    # average ranks over ties
    i, n = 0, scores.numel()
    values = sorted_scores.tolist()
    rank_of = torch.empty(n, dtype=torch.float64)
    while i < n:
        j = i
        while j + 1 < n and values[j + 1] == values[i]:
            j += 1
        rank_of[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    ranks[order] = rank_of
    n_pos, n_neg = pos.numel(), neg.numel()
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def pair_accuracy(good: Sequence[float], bad: Sequence[float]) -> float:
    """The fraction of pairs whose good step scores above its bad step (ties count half; a NaN loses)."""
    g = torch.nan_to_num(torch.as_tensor(list(good), dtype=torch.float64), nan=-math.inf)
    b = torch.nan_to_num(torch.as_tensor(list(bad), dtype=torch.float64), nan=-math.inf)
    if g.numel() != b.numel():
        raise ValueError(f"good and bad must pair up, got {g.numel()} and {b.numel()} scores")
    if g.numel() == 0:
        return float("nan")
    return float(((g > b).double() + 0.5 * (g == b).double()).mean())


def figures(good: Sequence[float], bad: Sequence[float], kinds: Optional[Sequence[Optional[str]]] = None) -> dict:
    """``{"auroc", "pair_accuracy", "n_pairs", "mean_cpn_good", "mean_cpn_bad"}`` of paired scores, plus
    ``"by_kind"`` (the same per kind of bad step) where ``kinds`` names them."""
    good, bad = [float(x) for x in good], [float(x) for x in bad]

    def mean(xs):
        xs = [x for x in xs if math.isfinite(x)]
        return sum(xs) / len(xs) if xs else float("nan")

    out = {"auroc": auroc(good, bad), "pair_accuracy": pair_accuracy(good, bad), "n_pairs": len(good),
           "mean_cpn_good": mean(good), "mean_cpn_bad": mean(bad)}
    if kinds is not None and any(k is not None for k in kinds):
        by = {}
        for kind in sorted({k for k in kinds if k is not None}):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            by[kind] = figures([good[i] for i in idx], [bad[i] for i in idx])
        out["by_kind"] = by
    return out


@dataclass
class FeatureSet:
    """Hidden states of groups: ``hidden[g]`` is ``[1 + len(kinds[g]) + 1, H]`` (good, bad..., null).

    Also the target's own verdict on the same rows (``lm_cpn[g]``, through its Yes/No LM-head rows) and
    each group's source problem (for splits by problem)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    lm_cpn: list[torch.Tensor] = field(default_factory=list)
    kinds: list[list[str]] = field(default_factory=list)
    problem: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def n_pairs(self) -> int:
        return sum(len(k) for k in self.kinds)

    def subset(self, index: Sequence[int]) -> "FeatureSet":
        return FeatureSet([self.hidden[i] for i in index], [self.lm_cpn[i] for i in index],
                          [self.kinds[i] for i in index], [self.problem[i] for i in index])

    def split(self, fraction: float, seed: int) -> tuple["FeatureSet", "FeatureSet"]:
        """``(rest, held_out)``: about ``fraction`` of the problems held out, all groups of a problem on
        one side."""
        problems = sorted(set(self.problem))
        rng = random.Random(seed)
        rng.shuffle(problems)
        n_out = max(1, int(round(fraction * len(problems)))) if len(problems) > 1 else 0
        out = set(problems[:n_out])
        rest = [i for i, p in enumerate(self.problem) if p not in out]
        held = [i for i, p in enumerate(self.problem) if p in out]
        return self.subset(rest), self.subset(held)

    def state(self) -> dict:
        return {"hidden": self.hidden, "lm_cpn": self.lm_cpn, "kinds": self.kinds, "problem": self.problem}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureSet":
        return cls(list(state["hidden"]), list(state["lm_cpn"]), [list(k) for k in state["kinds"]],
                   list(state["problem"]))


def extract(extractor, groups: Sequence[Group], *, progress: bool = True, desc: str = "features") -> FeatureSet:
    """The hidden states of every group (good, its bad steps, the null step), one batch per group."""
    from tqdm.auto import tqdm

    out = FeatureSet()
    bar = tqdm(total=sum(len(g.bad) for g in groups), desc=desc, unit="pair", disable=not progress,
               dynamic_ncols=True)
    for g in groups:
        kinds = list(g.bad)
        h = extractor.hidden(g.question, g.context_steps, [g.good] + [g.bad[k] for k in kinds])
        out.hidden.append(h)
        out.lm_cpn.append(extractor.lm_cpn(h))
        out.kinds.append(kinds)
        out.problem.append(g.problem)
        bar.update(len(kinds))
    bar.close()
    return out


def _design(features: FeatureSet, calibrated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, labels and weights: each group's good step (weight = its number of bad steps) and bad steps."""
    xs, ys, ws = [], [], []
    for h, kinds in zip(features.hidden, features.kinds):
        h = h.to(torch.float64)
        rows = h[:-1] - h[-1:] if calibrated else h[:-1]
        k = len(kinds)
        xs.append(rows)
        ys.append(torch.tensor([1.0] + [0.0] * k, dtype=torch.float64))
        ws.append(torch.tensor([float(k)] + [1.0] * k, dtype=torch.float64))
    return torch.cat(xs), torch.cat(ys), torch.cat(ws)


def fit_direction(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2: float, *,
                  bias: bool = True, max_iter: int = 500) -> tuple[torch.Tensor, float]:
    """L2-regularised weighted logistic regression: ``(direction [H], offset)`` with
    ``P(good | x) = sigmoid(direction . x + offset)`` in the original feature space.

    Features are standardised for the fit (centred only where there is a bias: without one, scaling
    alone keeps ``x = 0`` at margin 0) and the result mapped back."""
    x = x.to(torch.float64)
    mu = x.mean(0) if bias else torch.zeros(x.shape[1], dtype=torch.float64)
    scale = ((x - mu) ** 2).mean(0).sqrt().clamp_min(1e-8)
    z = (x - mu) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=bias)
    total = weight.sum()
    params = [w, b] if bias else [w]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        margin = z @ w + (b if bias else 0.0)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(margin, y, reduction="none") * weight).sum()
        loss = loss / total + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    direction = (w.detach() / scale)
    offset = float(b.detach()) - float(direction @ mu) if bias else 0.0
    return direction, offset


def step_scores(features: FeatureSet, head: Optional[VerdictHead], calibrate: bool) -> tuple[list, list, list]:
    """Paired scores ``(good, bad, kinds)``, one entry per pair, through the fused op.

    ``head`` None scores the target's own verdict (its LM-head cpn); ``calibrate`` corrects either by
    the null step at the same prefix."""
    good, bad, kinds = [], [], []
    for h, lm, ks in zip(features.hidden, features.lm_cpn, features.kinds):
        if head is None:
            cpn = calibrated_cpn(lm[:-1], lm[-1:].expand(len(lm) - 1)) if calibrate else lm[:-1]
        else:
            cpn, _ = head.cpn(h[:-1], 0.5, h[-1:].expand(len(h) - 1, -1) if calibrate else None)
        cpn = cpn.tolist()
        for i, k in enumerate(ks):
            good.append(cpn[0])
            bad.append(cpn[1 + i])
            kinds.append(k)
    return good, bad, kinds


def evaluate(features: FeatureSet, head: Optional[VerdictHead], calibrate: bool) -> dict:
    """:func:`figures` of ``features`` under one verifier (see :func:`step_scores`)."""
    g, b, k = step_scores(features, head, calibrate)
    return figures(g, b, k)


def fit_head(train: FeatureSet, *, calibrated: bool, seed: int = 0, l2: Optional[float] = None,
             val_fraction: float = 0.2, meta: Optional[dict] = None, log=None) -> tuple[VerdictHead, dict]:
    """Fit a head on ``train``; ``calibrated`` fits on ``h - h_null`` (no bias).

    ``l2`` None picks it from :data:`L2_GRID` by validation AUROC (pooled, plus pair accuracy as the
    tie-break) on ``val_fraction`` of the training problems. Returns the head (refitted on all of
    ``train``) and ``{"l2", "validation": {l2: figures}}``."""
    torch.manual_seed(seed)
    info: dict = {"validation": {}}
    if l2 is None:
        fit_part, val_part = train.split(val_fraction, seed + 1)
        if len(val_part) == 0 or len(fit_part) == 0:
            l2 = 1e-2
        else:
            x, y, w = _design(fit_part, calibrated)
            best = None
            for lam in L2_GRID:
                d, o = fit_direction(x, y, w, lam, bias=not calibrated)
                head = VerdictHead.from_direction(d, o, calibrated=calibrated)
                fig = evaluate(val_part, head, calibrated)
                info["validation"][str(lam)] = {k: fig[k] for k in ("auroc", "pair_accuracy", "n_pairs")}
                if log:
                    log(f"  l2={lam:g}: validation AUROC {fig['auroc']:.3f}, pair accuracy {fig['pair_accuracy']:.3f}")
                key = (round(fig["auroc"], 4), fig["pair_accuracy"])
                if best is None or key > best[0]:
                    best = (key, lam)
            l2 = best[1]
    x, y, w = _design(train, calibrated)
    d, o = fit_direction(x, y, w, l2, bias=not calibrated)
    info["l2"] = l2
    return VerdictHead.from_direction(d, o, calibrated=calibrated, meta=meta), info
