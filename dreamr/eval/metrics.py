"""Metrics of an evaluation: answers scored, then per-variant sums and ratios, the alpha sweep and the
adaptive threshold's trajectory.

Answers are extracted and compared by :func:`dreamr.answers.extract_answer` /
:func:`dreamr.answers.answers_match`, the one extractor shared with SAPO training.

Metric definitions (per variant; sums over the problems the variant finished without error)
----------------------------------------------------------------------------------------
accuracy                 correct / finished problems (errors left out).
accuracy_all             correct / selected problems (a problem that raised, or was not run, counts as wrong).
accuracy_delta           accuracy - the target's accuracy, both over the problems both finished.
wall_time_s              sum of end-to-end seconds of ``reasoner.generate`` calls (tokenization included).
speedup                  sum(target wall) / sum(variant wall) over the problems both finished (same run);
                         None without a "target" variant (a warning says so).
speedup_median           the median over those problems of target wall / variant wall.
tokens_per_second        committed tokens / wall_time_s.
step_acceptance_rate     accepted drafted steps / verified drafted steps (None without verification).
windows                  verification windows, counted from the step records (``Step.accepted``): a
                         window ends at a rejected step (its target fallback step closes the window),
                         after W accepted steps when the mode has a window of W steps (FPSR), or at the
                         end of the request (a trailing run of >= 1 accepted steps). For sequential
                         "speculative" (no window) a window is a run of consecutive accepted steps ended
                         by a rejection or by the end of the request.
fallback_steps           steps the target wrote after rejecting a drafted step (``accepted`` False).
accepted_per_window      accepted drafted steps / windows: the target's fallback step is NOT counted and
                         windows with zero accepted steps are. For a per-step acceptance probability a
                         (sequential) it tends to a / (1 - a).
mean_accepted_length     committed steps per verification window, the vLLM-style "mean acceptance length"
                         (tokens per verification round, the bonus token included) transposed to steps:
                         (accepted steps + target fallback steps) / windows. A window of k accepted
                         steps closed by a rejection commits k + 1 steps. Always >= accepted_per_window.
target_passes_per_token  target forward passes / committed tokens.
token_acceptance_rate    token-level speculation inside the target's written steps (vLLM's definitions):
                         accepted proposed tokens / proposed tokens;
token_mean_accepted_length
                         1 + accepted proposed tokens / proposals (tokens per checking forward, the bonus
                         or corrected token included);
tokens_per_target_forward
                         target-written tokens / the target's forwards spent writing them.
undrafted_steps          steps the target wrote alone while adaptive drafting held drafting off.
draft_tokens, target_tokens, committed_tokens
                         as in :class:`dreamr.result.Metrics` (each in its model's tokenizer).
mean_step_tokens         committed tokens / committed steps.
mean_draft_step_tokens   draft tokens / drafted steps (verified steps; draft mode: its steps).
ideal_bound              1 / (c + 1/L): the step-level speedup if every drafted step were accepted,
                         c = (draft seconds per draft token in the draft-only run) / (target seconds per
                         target token in the target-only run), both over the problems both finished;
                         without those runs, c falls back to the engines' phase times, (sum draft_time_s /
                         sum draft_tokens) / (sum target_time_s / sum target_tokens) over every finished
                         run (``bound.c_source`` says which). L = the variant's mean drafted step length
                         (mean_draft_step_tokens; for the top-level ``bound`` entry the draft-only run's
                         mean step length, else draft tokens / verified steps over the verifying variants,
                         ``bound.L_source``).
phase_time_s             sums of the engine's per-phase timings (Metrics fields named ``*_time_s``), where
                         the engine reports them; None otherwise.
alpha_mean, alpha_final  the mean threshold the variant's verified steps were judged at, and the last one in
                         run order (``Step.alpha``; a fixed alpha gives that alpha, alpha="auto" its value
                         at each step).
target_acceptance        alpha="auto": the acceptance rate its threshold holds; ``acceptance_gap`` =
                         step_acceptance_rate - target_acceptance. None for a fixed alpha.
verifier                 which judge and threshold the variant used (``describe_verifier(...)["label"]`` of
                         :mod:`dreamr.eval.variants`): "yes/no" (the target's verdict words) or
                         "head:<target>" (a trained verdict head), "+cal" (contextual calibration), then
                         "alpha=A" or "auto->RHO".

Tokenizers: committed_tokens, tokens_per_second, target_passes_per_token, mean_step_tokens, c and L count
each step in the tokenizer of the model that wrote it. When the draft and the target have different
tokenizers they mix two units; ``summary.notes`` in results.json says so.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable, Optional, Sequence

from dreamr import answers
from dreamr.eval.variants import BASELINE_MODES, Variant
from dreamr.result import COUNTER_FIELDS, phase_times

__all__ = ["answer_functions", "accepted_per_window", "ideal_bound", "score_record", "summarize", "sweep",
           "alpha_trajectories", "TOKENIZER_NOTE"]


def answer_functions() -> tuple[Callable[[Optional[str]], Optional[str]], Callable[[Any, Any], bool]]:
    """``(extract_answer, answers_match)`` of :mod:`dreamr.answers`, the one extractor shared with SAPO."""
    return answers.extract_answer, answers.answers_match


def accepted_per_window(flags: Iterable[Optional[bool]], window: Optional[int] = None) -> tuple[int, int]:
    """``(windows, accepted)`` of one request's trace of verified steps (see the module docstring).

    ``flags`` holds ``Step.accepted`` per committed step (None entries, unverified steps, are skipped).
    A window ends at a rejection, after ``window`` accepted steps (None: no cap), or at the end of the
    trace when it holds at least one accepted step. Mean accepted steps per window = sum of accepted /
    sum of windows over requests.

    >>> accepted_per_window([True, True, False, True])      # windows [T T F] [T]
    (2, 3)
    >>> accepted_per_window([True] * 5, window=4)           # [T T T T] [T]
    (2, 5)
    >>> accepted_per_window([False, False])                 # two windows of zero accepted steps
    (2, 0)
    """
    if window is not None and (isinstance(window, bool) or int(window) < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    windows = accepted = run = 0
    for flag in flags:
        if flag is None:
            continue
        if flag:
            accepted += 1
            run += 1
            if window is not None and run == int(window):
                windows += 1
                run = 0
        else:
            windows += 1
            run = 0
    if run:
        windows += 1
    return windows, accepted



def ideal_bound(c: Optional[float], length: Optional[float]) -> Optional[float]:
    """``1 / (c + 1/L)``: the step-level speedup with every step accepted (None where undefined)."""
    if c is None or length is None or not length > 0 or not math.isfinite(c) or c < 0:
        return None
    return 1.0 / (c + 1.0 / length)



def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None



def _cut(text: str, cut_at: Sequence[str]) -> str:
    end = len(text)
    for s in cut_at:
        i = text.find(s) if s else -1
        if i >= 0:
            end = min(end, i)
    return text[:end]



def score_record(rec: dict, extract: Callable, match: Callable, cut_at: Sequence[str] = ()) -> dict:
    """Fill ``pred`` / ``ref_answer`` / ``correct`` of a finished record from its text and reference."""
    if rec.get("ok"):
        text = _cut(rec.get("text") or "", cut_at)
        rec["pred"] = extract(text)
        rec["ref_answer"] = extract(rec.get("reference") or "")
        rec["correct"] = bool(rec["pred"] is not None and match(rec["pred"], rec.get("reference")))
    return rec



TOKENIZER_NOTE = (
    "committed_tokens, tokens_per_second, target_passes_per_token, mean_step_tokens, c and L count each "
    "step in the tokenizer of the model that wrote it (draft steps in the draft's tokens, target steps in the "
    "target's); when the two models have different tokenizers these mix two units and are comparable only "
    "approximately across modes")



def _phase_c(records: Iterable[dict]) -> Optional[float]:
    """c from the engines' phase times: (draft_time_s / draft_tokens) / (target_time_s / target_tokens),
    each summed over ``records`` (finished records whose Metrics report the phase times)."""
    d_time = d_tok = t_time = t_tok = 0.0
    for r in records:
        m = r["metrics"]
        if isinstance(m.get("draft_time_s"), (int, float)) and m.get("draft_tokens"):
            d_time, d_tok = d_time + float(m["draft_time_s"]), d_tok + int(m["draft_tokens"])
        if isinstance(m.get("target_time_s"), (int, float)) and m.get("target_tokens"):
            t_time, t_tok = t_time + float(m["target_time_s"]), t_tok + int(m["target_tokens"])
    if d_time > 0 and d_tok > 0 and t_time > 0 and t_tok > 0:
        return (d_time / d_tok) / (t_time / t_tok)
    return None



def summarize(records: Iterable[dict], variants: Sequence[Variant], *, baseline: str = "target",
              windows: Optional[dict] = None, selected: Optional[int] = None,
              same_tokenizer: Optional[bool] = None, verifiers: Optional[dict] = None) -> dict:
    """Per-variant metrics from scored records (see the module docstring for each definition).

    ``records``: dicts with ``key``, ``variant``, ``ok``, ``correct``, ``wall_s``, ``metrics`` (a
    :class:`dreamr.result.Metrics` dict) and ``accepted`` (``Step.accepted`` per committed step); the
    last record per (key, variant) counts. ``windows``: variant name -> window size W of modes with
    lookahead windows (FPSR). ``selected``: the number of problems selected for the run (the denominator
    of ``accuracy_all``; default: the variant's problems with a record). ``same_tokenizer``: whether the
    two models share a tokenizer (for the notes). ``verifiers``: variant name -> its verifier's
    description (:func:`dreamr.eval.variants.describe_verifier`), reported as each row's ``verifier``
    and, for alpha="auto", its ``target_acceptance``. Returns ``{"variants": {name: {...}}, "bound": {...},
    "baseline": ..., "notes": [...]}``.
    """
    windows = windows or {}
    verifiers = verifiers or {}
    last: dict[tuple[str, str], dict] = {}
    seq: dict[int, int] = {}  # id(record) -> its place in run order (records.jsonl is appended as runs end)
    for i, rec in enumerate(records):
        last[(str(rec["key"]), rec["variant"])] = rec
        seq[id(rec)] = i
    by_variant: dict[str, dict[str, dict]] = {v.name: {} for v in variants}
    for (key, name), rec in last.items():
        if name in by_variant:
            by_variant[name][key] = rec
    ok = {name: {k: r for k, r in recs.items() if r.get("ok")} for name, recs in by_variant.items()}

    def paired(a: str, b: str) -> list[str]:
        return sorted(set(ok.get(a, {})) & set(ok.get(b, {})))

    base = ok.get(baseline)
    base_acc = None
    draft_name = "draft" if "draft" in ok else None
    notes: list[str] = []

    # c: draft seconds per draft token over target seconds per target token, same problems.
    c, c_source = None, None
    if base is not None and draft_name is not None:
        keys = paired(baseline, draft_name)
        t_time = sum(base[k]["wall_s"] for k in keys)
        t_tok = sum(base[k]["metrics"]["target_tokens"] for k in keys)
        d_time = sum(ok[draft_name][k]["wall_s"] for k in keys)
        d_tok = sum(ok[draft_name][k]["metrics"]["draft_tokens"] for k in keys)
        if t_time > 0 and t_tok > 0 and d_tok > 0:
            c = (d_time / d_tok) / (t_time / t_tok)
            c_source = "wall time of the draft-only and target-only runs on the problems both finished"
    if c is None:
        c = _phase_c(r for good in ok.values() for r in good.values())
        if c is not None:
            c_source = ("engine phase times over every finished run: (sum draft_time_s / sum draft_tokens) / "
                        "(sum target_time_s / sum target_tokens)")
    if base is None:
        notes.append(f"no finished {baseline!r} runs: speedup, speedup_median and accuracy_delta are None")
    if c is None:
        notes.append("c unknown (no draft-only and target-only wall times, no engine phase times): "
                     "ideal_bound is None")

    out: dict[str, dict] = {}
    for v in variants:
        recs = by_variant[v.name]
        good = ok[v.name]
        n_ok = len(good)
        sums = {name: sum(int(r["metrics"].get(name, 0) or 0) for r in good.values()) for name in COUNTER_FIELDS}
        wall = sum(r["wall_s"] for r in good.values())
        correct = sum(bool(r.get("correct")) for r in good.values())
        n_selected = max(selected, len(recs)) if selected is not None else len(recs)
        row: dict[str, Any] = {
            "mode": v.mode,
            "alpha": v.alpha,
            "series": v.series,
            "problems": len(recs),
            "finished": n_ok,
            "errors": len(recs) - n_ok,
            "error_messages": {k: r.get("error") for k, r in sorted(recs.items()) if not r.get("ok")},
            "correct": correct,
            "accuracy": _ratio(correct, n_ok),
            "accuracy_all": _ratio(correct, n_selected),
            "accuracy_delta": None,
            "wall_time_s": wall,
            "speedup": None,
            "speedup_median": None,
            "paired_problems": None,
            "tokens_per_second": _ratio(sums["committed_tokens"], wall),
            "step_acceptance_rate": _ratio(sums["accepted_steps"], sums["verified_steps"]),
            "accepted_per_window": None,
            "mean_accepted_length": None,
            "windows": None,
            "fallback_steps": None,
            "window": windows.get(v.name),
            "target_passes_per_token": _ratio(sums["target_forward_passes"], sums["committed_tokens"]),
            "token_acceptance_rate": _ratio(sums["target_accepted_tokens"], sums["target_proposed_tokens"]),
            "token_mean_accepted_length": (1.0 + sums["target_accepted_tokens"] / sums["target_proposals"]
                                           if sums["target_proposals"] else None),
            "tokens_per_target_forward": _ratio(sums["target_tokens"], sums["target_step_forwards"]),
            "mean_step_tokens": _ratio(sums["committed_tokens"], sums["num_steps"]),
            "mean_draft_step_tokens": (_ratio(sums["draft_tokens"], sums["verified_steps"]) if sums["verified_steps"]
                                       else _ratio(sums["draft_tokens"], sums["num_steps"]) if v.mode == "draft"
                                       else None),
            "ideal_bound": None,
            "finish_reasons": {},
            "verifier": (verifiers.get(v.name) or {}).get("label"),
            "alpha_mean": None,
            "alpha_final": None,
            "target_acceptance": None,
            "acceptance_gap": None,
            **sums,
        }
        # Per-phase engine timings, where the engine's Metrics report them (fields "<phase>_time_s").
        phase: dict[str, float] = {}
        for r in good.values():
            for name, value in phase_times(r["metrics"]).items():
                phase[name] = phase.get(name, 0.0) + value
        row["phase_time_s"] = phase or None
        for r in good.values():
            fr = r.get("finish_reason")
            row["finish_reasons"][fr] = row["finish_reasons"].get(fr, 0) + 1
        if sums["verified_steps"]:
            # Windows and fallback steps from the step records (Step.accepted per committed step).
            n_windows = n_fallback = 0
            for r in good.values():
                flags = r.get("accepted") or []
                n_windows += accepted_per_window(flags, windows.get(v.name))[0]
                n_fallback += sum(1 for f in flags if f is False)
            row["windows"], row["fallback_steps"] = n_windows, n_fallback
            row["accepted_per_window"] = _ratio(sums["accepted_steps"], n_windows)
            row["mean_accepted_length"] = _ratio(sums["accepted_steps"] + n_fallback, n_windows)
        if v.mode not in BASELINE_MODES:
            row["ideal_bound"] = ideal_bound(c, row["mean_draft_step_tokens"])
        # The thresholds the steps were judged at (Metrics.alpha_sum / alpha_final; records in run order).
        judged = [r for r in good.values() if r["metrics"].get("alpha_final") is not None]
        if judged and sums["verified_steps"]:
            row["alpha_mean"] = sum(float(r["metrics"].get("alpha_sum") or 0.0) for r in judged) / sums["verified_steps"]
            row["alpha_final"] = float(max(judged, key=lambda r: seq[id(r)])["metrics"]["alpha_final"])
        if v.auto:
            desc = verifiers.get(v.name) or {}
            rho = desc.get("target_acceptance", dict(v.verifier).get("target_acceptance"))
            row["target_acceptance"] = rho
            if rho is not None and row["step_acceptance_rate"] is not None:
                row["acceptance_gap"] = row["step_acceptance_rate"] - rho
        if base is not None:
            keys = paired(baseline, v.name)
            row["paired_problems"] = len(keys)
            if keys:
                t = [base[k]["wall_s"] for k in keys]
                s = [good[k]["wall_s"] for k in keys]
                row["speedup"] = _ratio(sum(t), sum(s))
                ratios = [a / b for a, b in zip(t, s) if b > 0]
                row["speedup_median"] = statistics.median(ratios) if ratios else None
                acc_v = sum(bool(good[k].get("correct")) for k in keys) / len(keys)
                acc_t = sum(bool(base[k].get("correct")) for k in keys) / len(keys)
                row["accuracy_delta"] = acc_v - acc_t
        out[v.name] = row
    if base is not None and baseline in out:
        base_acc = out[baseline]["accuracy"]
    draft_row = out.get("draft")
    length, l_source = (draft_row["mean_step_tokens"], "the draft-only run's mean step length") if draft_row \
        else (None, None)
    if length is None:  # no draft-only run: the drafted steps of the verifying variants
        d_tok = sum(r["draft_tokens"] for r in out.values() if r["verified_steps"])
        d_steps = sum(r["verified_steps"] for r in out.values())
        length = _ratio(d_tok, d_steps)
        l_source = "draft tokens / verified drafted steps over the verifying variants" if length is not None else None
    bound = {
        "c": c,
        "c_source": c_source,
        "L": length,
        "L_source": l_source,
        "ideal_bound": ideal_bound(c, length),
        "definition": "c = (draft s per draft token) / (target s per target token), from c_source; "
                      "L = mean drafted step length in draft tokens, from L_source; bound = 1/(c + 1/L)",
    }
    notes.append(TOKENIZER_NOTE + (" (here the tokenizers differ)" if same_tokenizer is False
                                   else " (here the tokenizer is shared)" if same_tokenizer else ""))
    return {"baseline": baseline, "baseline_accuracy": base_acc, "variants": out, "bound": bound, "notes": notes}



def sweep(summary: dict) -> dict:
    """Accuracy and speedup per alpha of every series run at several fixed alphas, plus the baselines
    and the alpha="auto" variants.

    Returns ``{"modes": {series: [point, ...]}, "baselines": {name: point}, "auto": {name: point},
    "bound": float or None}``; a series is a mode with its verifier options (:attr:`Variant.series`),
    its points sorted by alpha; an auto point carries ``alpha_mean`` / ``alpha_final`` /
    ``target_acceptance`` instead of a fixed alpha.
    """
    out: dict[str, Any] = {"modes": {}, "baselines": {}, "auto": {},
                           "bound": summary.get("bound", {}).get("ideal_bound")}
    for name, row in summary["variants"].items():
        point = {k: row.get(k) for k in ("accuracy", "accuracy_all", "accuracy_delta", "speedup", "speedup_median",
                                         "step_acceptance_rate", "accepted_per_window", "mean_accepted_length",
                                         "tokens_per_second", "ideal_bound", "finished", "errors", "verifier")}
        if row["alpha"] is None:
            out["baselines"][name] = point
        elif row["alpha"] == "auto":
            out["auto"][name] = {"mode": row["mode"], "alpha_mean": row.get("alpha_mean"),
                                 "alpha_final": row.get("alpha_final"),
                                 "target_acceptance": row.get("target_acceptance"), **point}
        else:
            out["modes"].setdefault(row.get("series") or row["mode"], []).append({"alpha": row["alpha"], **point})
    for points in out["modes"].values():
        points.sort(key=lambda p: p["alpha"])
    return out


def alpha_trajectories(records: Iterable[dict], variants: Sequence[Variant],
                       verifiers: Optional[dict] = None) -> dict:
    """The adaptive threshold step by step, for each alpha="auto" variant, in run order.

    Parameters
    ----------
    records : iterable of dict
        Records as written (``alphas``: ``Step.alpha`` per committed step, ``accepted``: ``Step.accepted``);
        the last record per (problem, variant) counts, taken in the order the records were written.
    variants : sequence of Variant
    verifiers : dict, optional
        Variant name -> verifier description (its ``target_acceptance``).

    Returns
    -------
    dict
        ``{name: {"alpha": [a_1, ...], "accepted": [bool, ...], "acceptance": [running rate, ...],
        "target_acceptance": rho, "steps": T}}`` over the verified steps of the variant's finished
        problems; empty when no variant runs alpha="auto".
    """
    verifiers = verifiers or {}
    auto = {v.name: v for v in variants if v.auto}
    if not auto:
        return {}
    records = list(records)
    last: dict[tuple[str, str], int] = {}
    for i, rec in enumerate(records):
        if rec.get("variant") in auto:
            last[(str(rec["key"]), rec["variant"])] = i
    out: dict[str, dict] = {}
    for name, v in auto.items():
        alphas: list[float] = []
        flags: list[bool] = []
        for i in sorted(j for (key, n), j in last.items() if n == name):
            rec = records[i]
            if not rec.get("ok"):
                continue
            for a, f in zip(rec.get("alphas") or [], rec.get("accepted") or []):
                if a is not None and f is not None:
                    alphas.append(float(a))
                    flags.append(bool(f))
        running, accepted = [], 0
        for t, f in enumerate(flags, 1):
            accepted += f
            running.append(accepted / t)
        rho = (verifiers.get(name) or {}).get("target_acceptance", dict(v.verifier).get("target_acceptance"))
        out[name] = {"alpha": alphas, "accepted": flags, "acceptance": running, "target_acceptance": rho,
                     "steps": len(alphas)}
    return out
