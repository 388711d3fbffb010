"""Evaluation: accuracy, speedup and acceptance of reasoning modes, measured side by side.

    python bench/eval.py --data ../shared/data/gsm8k/test_dev.jsonl --limit 20 \\
        --modes target draft speculative --alphas 0.5 0.7 0.9 --out runs/gsm8k20

    from dreamr.eval import evaluate
    report = evaluate(reasoner, "test_dev.jsonl", "runs/x", modes=["target", "speculative"], alphas=[0.7])
    print(format_table(report))

What a run does
---------------
* Reads a JSONL dataset (GSM8K's ``question`` / ``answer`` fields by default; ``fields=`` maps others).
* Builds the *variants*: each baseline mode ("target", "draft") once, every other mode the reasoner
  accepts ("speculative", later "fpsr", ...) once per alpha.
* Runs every variant on every problem, **interleaved per problem** (problem 0 in every variant, then
  problem 1, ...; the variant order rotates by one per problem) so that machine noise hits all
  variants alike and the target-alone baseline is measured in the same run.
* Appends one JSON line per (problem, variant) to ``records.jsonl`` as soon as it is done (flushed), so an
  interrupted run resumes without redoing finished work. A variant that raises on a problem is recorded
  with its error and the run goes on (``retry_failed=True`` runs those again on resume).
* Writes ``results.json`` (per-variant metrics, the alpha sweep, the models, settings, seed, library
  versions, device and GPU readings), ``sweep.json`` and ``sweep.png`` (speedup against accuracy, one
  point per alpha, the target alone marked).

Answers are extracted and compared by :func:`training.rewards.extract_answer` /
:func:`training.rewards.answers_match`, the one extractor shared with SAPO training.

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

Tokenizers: committed_tokens, tokens_per_second, target_passes_per_token, mean_step_tokens, c and L count
each step in the tokenizer of the model that wrote it. When the draft and the target have different
tokenizers they mix two units; ``summary.notes`` in results.json says so.

GPU readings (memory used, power) are sampled every 0.1 s in a background thread during generation
(nvidia-ml-py); results.json says "no GPU" or "nvidia-ml-py not installed" where there are none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from dreamr.result import COUNTER_FIELDS, phase_times

__all__ = [
    "BASELINE_MODES",
    "SYSTEM_PROMPT",
    "EvalSettings",
    "Variant",
    "Problem",
    "make_variants",
    "check_variants",
    "load_problems",
    "select_problems",
    "answer_functions",
    "accepted_per_window",
    "ideal_bound",
    "summarize",
    "sweep",
    "plot_sweep",
    "environment",
    "GpuMonitor",
    "evaluate",
    "format_table",
    "main",
]

BASELINE_MODES = ("target", "draft")
"""Modes without verification: run once, alpha does not apply. Every other mode is run once per alpha."""

SYSTEM_PROMPT = (
    "Solve the problem step by step. Write each step as one short paragraph and leave a blank line "
    "between steps. End with 'The answer is N.'"
)

RECORDS = "records.jsonl"
META = "meta.json"
RESULTS = "results.json"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"

DEFAULT_FIELDS = {"question": "question", "answer": "answer", "id": None}


# --------------------------------------------------------------------------------------------------
# Settings, variants, problems
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """What an evaluation runs and how.

    Generation settings (``max_new_tokens`` ... ``extra``) go to every ``reasoner.generate`` call and
    make the run's fingerprint: resuming into a folder written with other generation settings, another
    dataset or other models raises ValueError. ``modes``, ``alphas``, ``limit`` and ``offset`` may change
    between resumes (new variants or problems are run, finished ones are kept).
    """

    modes: tuple[str, ...] = ("target", "draft", "speculative")
    alphas: tuple[float, ...] = (0.7,)
    limit: Optional[int] = None  # at most this many problems (after offset)
    offset: int = 0  # skip this many problems first
    max_new_tokens: int = 128
    max_step_tokens: int = 64
    answer_marker: Optional[str] = "The answer is"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = 0
    chat: bool = True  # send [system, user] chat messages (False: the question as plain text)
    system_prompt: Optional[str] = SYSTEM_PROMPT
    # Other ReasonerConfig overrides for every call (e.g. an FPSR window size).
    extra: dict = field(default_factory=dict)
    # Field names in the JSONL: question, answer (reference) and optional id.
    fields: dict = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    # Before extraction the prediction is cut at the first of these strings (a base model that goes
    # on to invent the next "Question:" would otherwise be scored on its invented text). Scoring only.
    cut_at: tuple[str, ...] = ("\nQuestion:",)
    warmup: bool = True  # one short untimed generation per variant before the timed ones
    retry_failed: bool = False  # on resume, run again the (problem, variant) pairs that raised

    def generation(self) -> dict:
        out = dict(max_new_tokens=self.max_new_tokens, max_step_tokens=self.max_step_tokens,
                   answer_marker=self.answer_marker, temperature=self.temperature, top_p=self.top_p,
                   seed=self.seed)
        out.update(self.extra)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modes"], d["alphas"], d["cut_at"] = list(self.modes), list(self.alphas), list(self.cut_at)
        return d


@dataclass(frozen=True)
class Variant:
    """One mode at one alpha (alpha None for the baseline modes)."""

    mode: str
    alpha: Optional[float] = None

    @property
    def name(self) -> str:
        return self.mode if self.alpha is None else f"{self.mode}@{self.alpha:g}"

    def overrides(self) -> dict:
        return {"mode": self.mode} if self.alpha is None else {"mode": self.mode, "alpha": self.alpha}


def make_variants(modes: Union[str, Sequence[str]], alphas: Union[float, Sequence[float]]) -> list[Variant]:
    """Baseline modes once each, every other mode once per alpha; order kept, duplicates dropped.

    ``modes`` is a mode name or a list of them, each a key of :data:`dreamr.engines.ENGINES`; ``alphas``
    a number or a list of numbers in [0, 1]. Raises ValueError naming the bad mode or alpha.
    """
    from dreamr.engines import ENGINES
    from dreamr.verify import check_alpha

    if isinstance(modes, str):
        modes = [modes]
    if isinstance(alphas, (int, float)) and not isinstance(alphas, bool):
        alphas = [alphas]
    if not modes:
        raise ValueError("modes is empty")
    out: list[Variant] = []
    for mode in modes:
        if not isinstance(mode, str) or mode not in ENGINES:
            raise ValueError(f"modes: unknown mode {mode!r}; known modes: {sorted(ENGINES)}")
        if mode in BASELINE_MODES:
            items = [Variant(mode)]
        else:
            if not alphas:
                raise ValueError(f"alphas is empty but mode {mode!r} needs an alpha")
            items = [Variant(mode, check_alpha(a, "alphas")) for a in alphas]
        for v in items:
            if v not in out:
                out.append(v)
    return out


def check_variants(variants: Sequence[Variant], settings: "EvalSettings", reasoner=None) -> None:
    """Raise ValueError naming the variant and setting unless every variant's call settings are valid.

    Each variant's ``generate`` settings (mode, alpha, the generation settings and ``extra``) are built
    into a reasoner configuration before any work: with ``reasoner`` (anything with the reasoner's
    ``_config(overrides)`` builder) through its own builder, which also checks the verdict words on its
    models; without one (the command line, before loading models) as a plain
    :class:`dreamr.reasoner.ReasonerConfig`, which checks names and values without models.
    """
    from dreamr.reasoner import ReasonerConfig

    fields = {f.name for f in dataclasses.fields(ReasonerConfig)}
    builder = getattr(reasoner, "_config", None)
    for v in variants:
        overrides = {**v.overrides(), **settings.generation()}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"extra: unknown setting(s) {unknown} for variant {v.name}; "
                             f"ReasonerConfig has {sorted(fields)}")
        try:
            if callable(builder):
                builder(overrides)
            else:
                ReasonerConfig(**overrides)
        except ValueError as exc:
            raise ValueError(f"variant {v.name}: {exc}") from None


@dataclass
class Problem:
    index: int  # 0-based line index among the dataset's non-blank lines
    key: str  # the id field's value, or the index as text
    question: str
    reference: str  # the answer field as written (e.g. a GSM8K worked solution ending "#### 18")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_problems(path: Union[str, Path], *, fields: Optional[dict] = None, limit: Optional[int] = None,
                  offset: int = 0) -> list[Problem]:
    """Read a JSONL dataset: one JSON object per line with a question and a reference answer.

    ``fields`` maps the roles "question", "answer" and optionally "id" to the dataset's field names
    (default GSM8K: question / answer, no id). Raises ValueError naming the line on a malformed line or a
    missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset: no such file {str(path)!r}")
    f = dict(DEFAULT_FIELDS)
    f.update(fields or {})
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")
    problems: list[Problem] = []
    index = -1
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            index += 1
            if index < offset:
                continue
            if limit is not None and len(problems) >= limit:
                break
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"dataset {path}: line {lineno} is not JSON ({exc})") from None
            if not isinstance(item, dict):
                raise ValueError(f"dataset {path}: line {lineno} is not a JSON object")
            for role in ("question", "answer"):
                if f[role] not in item:
                    raise ValueError(f"dataset {path}: line {lineno} has no {role} field {f[role]!r} "
                                     f"(fields: {sorted(item)}; map it with fields={{'{role}': ...}})")
            key = str(item[f["id"]]) if f.get("id") and f["id"] in item else str(index)
            problems.append(Problem(index, key, str(item[f["question"]]), str(item[f["answer"]])))
    keys = [p.key for p in problems]
    if len(set(keys)) != len(keys):
        raise ValueError(f"dataset {path}: the id field {f.get('id')!r} has duplicate values")
    return problems


def answer_functions() -> tuple[Callable[[Optional[str]], Optional[str]], Callable[[Any, Any], bool]]:
    """``(extract_answer, answers_match)`` from ``training.rewards``, the one shared extractor.

    ``training`` is a folder beside the ``dreamr`` package; it is put on ``sys.path`` when the current
    directory is elsewhere.
    """
    try:
        mod = importlib.import_module("training.rewards")
    except ModuleNotFoundError as exc:
        if exc.name not in ("training", "training.rewards"):
            raise
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:
            sys.path.append(root)
        try:
            mod = importlib.import_module("training.rewards")
        except ModuleNotFoundError as exc2:
            if exc2.name not in ("training", "training.rewards"):
                raise
            raise ImportError("answer extraction: training/rewards.py (extract_answer, answers_match) was not "
                              f"found beside the dreamr package in {root}") from None
    return mod.extract_answer, mod.answers_match


# --------------------------------------------------------------------------------------------------
# Metrics on traces
# --------------------------------------------------------------------------------------------------


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
              same_tokenizer: Optional[bool] = None) -> dict:
    """Per-variant metrics from scored records (see the module docstring for each definition).

    ``records``: dicts with ``key``, ``variant``, ``ok``, ``correct``, ``wall_s``, ``metrics`` (a
    :class:`dreamr.result.Metrics` dict) and ``accepted`` (``Step.accepted`` per committed step); the
    last record per (key, variant) counts. ``windows``: variant name -> window size W of modes with
    lookahead windows (FPSR). ``selected``: the number of problems selected for the run (the denominator
    of ``accuracy_all``; default: the variant's problems with a record). ``same_tokenizer``: whether the
    two models share a tokenizer (for the notes). Returns ``{"variants": {name: {...}}, "bound": {...},
    "baseline": ..., "notes": [...]}``.
    """
    windows = windows or {}
    last: dict[tuple[str, str], dict] = {}
    for rec in records:
        last[(str(rec["key"]), rec["variant"])] = rec
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
            "mean_step_tokens": _ratio(sums["committed_tokens"], sums["num_steps"]),
            "mean_draft_step_tokens": (_ratio(sums["draft_tokens"], sums["verified_steps"]) if sums["verified_steps"]
                                       else _ratio(sums["draft_tokens"], sums["num_steps"]) if v.mode == "draft"
                                       else None),
            "ideal_bound": None,
            "finish_reasons": {},
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
    """Accuracy and speedup per alpha of every mode run at several alphas, plus the baselines."""
    out: dict[str, Any] = {"modes": {}, "baselines": {}, "bound": summary.get("bound", {}).get("ideal_bound")}
    for name, row in summary["variants"].items():
        point = {k: row[k] for k in ("accuracy", "accuracy_all", "accuracy_delta", "speedup", "speedup_median",
                                     "step_acceptance_rate", "accepted_per_window", "mean_accepted_length",
                                     "tokens_per_second",
                                     "ideal_bound", "finished", "errors")}
        if row["alpha"] is None:
            out["baselines"][name] = point
        else:
            out["modes"].setdefault(row["mode"], []).append({"alpha": row["alpha"], **point})
    for points in out["modes"].values():
        points.sort(key=lambda p: p["alpha"])
    return out


def plot_sweep(data: dict, path: Union[str, Path], title: str = "") -> Path:
    """Draw speedup (y) against accuracy (x): one point per alpha, the target alone marked; save PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for mode, points in data["modes"].items():
        pts = [p for p in points if p["accuracy"] is not None and p["speedup"] is not None]
        if not pts:
            continue
        xs, ys = [p["accuracy"] * 100 for p in pts], [p["speedup"] for p in pts]
        ax.plot(xs, ys, marker="o", label=mode)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"α={p['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    styles = {"target": dict(marker="*", s=180, color="black"), "draft": dict(marker="s", s=60, color="gray")}
    for name, p in data["baselines"].items():
        if p["accuracy"] is None or p["speedup"] is None:
            continue
        ax.scatter([p["accuracy"] * 100], [p["speedup"]], label=f"{name} alone", zorder=3,
                   **styles.get(name, dict(marker="D", s=60)))
    ax.axhline(1.0, color="black", lw=0.6, ls=":")
    if data.get("bound"):
        ax.axhline(data["bound"], color="tab:red", lw=0.8, ls="--", label=f"ideal bound {data['bound']:.2f}x")
    xs = [p["accuracy"] * 100 for pts in data["modes"].values() for p in pts if p["accuracy"] is not None]
    xs += [p["accuracy"] * 100 for p in data["baselines"].values() if p["accuracy"] is not None]
    if xs and max(xs) - min(xs) < 10:  # keep a readable accuracy axis when the points nearly coincide
        mid = (max(xs) + min(xs)) / 2
        ax.set_xlim(max(-2.0, mid - 8), min(102.0, mid + 8))
    ax.set_xlabel("accuracy (%)")
    ax.set_ylabel("speedup over the target alone (x)")
    ax.set_title(title or "accuracy and speedup per alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Environment and GPU readings
# --------------------------------------------------------------------------------------------------


NO_GPU = "no GPU"
NO_NVML = "nvidia-ml-py not installed"


class GpuMonitor:
    """GPU name, memory used and power through nvidia-ml-py, sampled in a background thread.

    ``start()`` samples every ``interval`` seconds (default 0.1) in a daemon thread until ``stop()``
    (the evaluation runs it around generation); ``sample()`` takes one reading now; ``summary()`` gives
    the names, total memory, the largest memory used and mean / max power seen. Without readings the
    summary says why, distinctly: ``{"gpu": "nvidia-ml-py not installed", ...}`` when the ``pynvml``
    module is missing (``pip install nvidia-ml-py``), ``{"gpu": "no GPU", ...}`` when NVML finds no
    driver or no NVIDIA GPU. Nothing here raises: a failing reading is recorded in ``error``.

    ``sampler`` (tests, other backends): a function returning one reading, a list with one dict per GPU
    (``memory_used_mib`` / ``power_w``); it replaces NVML.
    """

    def __init__(self, interval: float = 0.1, sampler: Optional[Callable[[], list]] = None):
        if not (isinstance(interval, (int, float)) and interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.error: Optional[str] = None
        self.status: Optional[str] = None  # None: readings available; else NO_GPU or NO_NVML
        self._nvml = None
        self._handles: list = []
        self._samples: list[list[dict]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sampler = sampler
        if sampler is None:
            try:
                import pynvml
            except ImportError as exc:
                self.status, self.error = NO_NVML, f"{type(exc).__name__}: {exc} (pip install nvidia-ml-py)"
            else:
                try:
                    pynvml.nvmlInit()
                    self._nvml = pynvml
                    self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                except Exception as exc:  # noqa: BLE001 - NVMLError without a driver
                    self.error = f"{type(exc).__name__}: {exc}"
                    self._handles = []
                if not self._handles:
                    self.status = NO_GPU
                    self.error = self.error or "no NVIDIA GPU found"
        if self.status is None:
            self.sample()

    @property
    def available(self) -> bool:
        return self.status is None

    def _read(self) -> list[dict]:
        if self._sampler is not None:
            return list(self._sampler())
        nv = self._nvml
        reading = []
        for h in self._handles:
            r: dict[str, Any] = {}
            try:
                r["memory_used_mib"] = nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
            except Exception:  # noqa: BLE001
                pass
            try:
                r["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:  # noqa: BLE001 - some boards do not report power
                pass
            reading.append(r)
        return reading

    def sample(self) -> None:
        """Take one reading (no-op without a GPU; a failing reading is recorded in ``error``)."""
        if not self.available:
            return
        try:
            reading = self._read()
        except Exception as exc:  # noqa: BLE001 - a reading never breaks the run
            self.error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            self._samples.append(reading)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "GpuMonitor":
        """Sample every ``interval`` seconds in a daemon thread (no thread without readings)."""
        if self.available and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="dreamr-gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the sampling thread (and take a last reading)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "GpuMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        if not self.available:
            return {"gpu": self.status, "reason": self.error}
        with self._lock:
            samples = list(self._samples)
        n_gpus = len(self._handles) if self._sampler is None else max((len(s) for s in samples), default=0)
        gpus = []
        for i in range(n_gpus):
            info: dict[str, Any] = {"index": i}
            if self._nvml is not None:
                nv, h = self._nvml, self._handles[i]
                try:
                    name = nv.nvmlDeviceGetName(h)
                    info["name"] = name.decode() if isinstance(name, bytes) else name
                    info["memory_total_mib"] = nv.nvmlDeviceGetMemoryInfo(h).total / 2**20
                    info["driver"] = nv.nvmlSystemGetDriverVersion()
                except Exception:  # noqa: BLE001
                    pass
            mem = [s[i]["memory_used_mib"] for s in samples if i < len(s) and "memory_used_mib" in s[i]]
            power = [s[i]["power_w"] for s in samples if i < len(s) and "power_w" in s[i]]
            info["memory_used_mib_max"] = max(mem) if mem else None
            info["power_w_mean"] = statistics.fmean(power) if power else None
            info["power_w_max"] = max(power) if power else None
            info["samples"] = len(samples)
            info["interval_s"] = self.interval
            gpus.append(info)
        out: dict[str, Any] = {"gpu": [g.get("name") for g in gpus], "gpus": gpus}
        if self.error:
            out["last_error"] = self.error
        return out


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def _describe_model(lm) -> dict:
    model = getattr(lm, "model", lm)
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "vocab_size": getattr(getattr(lm, "tokenizer", None), "vocab_size", None),
    }


def environment(reasoner=None, gpu: Optional[GpuMonitor] = None) -> dict:
    """Library versions, Python, platform, torch threads, device and (NVIDIA) GPU readings."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "versions": {name: _version(name) for name in ("dreamr", "torch", "transformers", "tokenizers", "numpy",
                                                       "tqdm", "matplotlib", "nvidia-ml-py")},
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if reasoner is not None:
        device = getattr(reasoner.target, "device", None)
        env["device"] = str(device)
        if device is not None and getattr(device, "type", "") == "cuda":
            env["torch_gpu_name"] = torch.cuda.get_device_name(device)
            env["torch_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    env["gpu"] = (gpu or GpuMonitor()).summary()
    return env


def models_info(reasoner) -> dict:
    return {"target": _describe_model(reasoner.target), "draft": _describe_model(reasoner.draft),
            "same_tokenizer": bool(getattr(reasoner, "same_tokenizer", False))}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def read_records(path: Union[str, Path]) -> list[dict]:
    """Records of a ``records.jsonl``; a torn last line (a run killed while writing) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _prompt(problem: Problem, settings: EvalSettings):
    if not settings.chat:
        return problem.question
    messages = [{"role": "user", "content": problem.question}]
    if settings.system_prompt:
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    return messages


def _window_sizes(reasoner, settings: EvalSettings, variants: Sequence[Variant]) -> dict:
    """Window size W of the variants whose mode uses lookahead windows (the ``window`` setting of the
    settings' extras, else of the reasoner's config)."""
    out = {}
    for v in variants:
        if v.mode in BASELINE_MODES or v.mode == "speculative":
            continue
        w = settings.extra.get("window", getattr(getattr(reasoner, "config", None), "window", None))
        if isinstance(w, int) and not isinstance(w, bool) and w >= 1:
            out[v.name] = w
    return out


def _run_one(reasoner, problem: Problem, variant: Variant, settings: EvalSettings, order: int) -> dict:
    rec: dict[str, Any] = {"key": problem.key, "index": problem.index, "variant": variant.name,
                           "mode": variant.mode, "alpha": variant.alpha, "order": order,
                           "reference": problem.reference}
    start = time.perf_counter()
    try:
        result = reasoner.generate(_prompt(problem, settings), **variant.overrides(), **settings.generation())
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
        rec.update(ok=False, wall_s=time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}",
                   traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:])
        return rec
    wall = time.perf_counter() - start
    rec.update(
        ok=True,
        wall_s=wall,
        text=result.text,
        finish_reason=result.finish_reason,
        metrics=result.metrics.to_dict(),
        accepted=[s.accepted for s in result.steps],
        sources=[s.source for s in result.steps],
        cpn=[None if s.cpn is None or not math.isfinite(s.cpn) else round(float(s.cpn), 6) for s in result.steps],
        step_tokens=[s.num_tokens for s in result.steps],
    )
    return rec


def _fingerprint(settings: EvalSettings, dataset: Path, models: dict) -> dict:
    return {"generation": settings.generation(), "chat": settings.chat, "system_prompt": settings.system_prompt,
            "fields": settings.fields, "dataset_sha256": _sha256(dataset), "models": models}


def evaluate(
    reasoner,
    dataset: Union[str, Path],
    out_dir: Union[str, Path],
    settings: Optional[EvalSettings] = None,
    *,
    progress: bool = True,
    plot: bool = True,
    models: Optional[dict] = None,
    extract: Optional[Callable] = None,
    match: Optional[Callable] = None,
    **overrides,
) -> dict:
    """Run the variants on the dataset's problems, interleaved per problem; write and return the report.

    Parameters
    ----------
    reasoner : SpeculativeReasoner (any object with ``generate(prompt, mode=..., alpha=..., **settings)``
        returning a :class:`dreamr.result.Result`, and ``target`` / ``draft`` handles).
    dataset : JSONL file (GSM8K format by default; see ``EvalSettings.fields``).
    out_dir : folder for records.jsonl, meta.json, results.json, sweep.json and sweep.png. An existing
        records.jsonl is resumed: finished (problem, variant) pairs are not run again.
    settings : EvalSettings; ``**overrides`` replace its fields (``modes=[...], alphas=[...], limit=20``).
    models : a description of the models for the results (default: read from the reasoner), e.g. their
        names; part of the resume fingerprint.
    extract, match : answer extraction and comparison (default: training.rewards's).

    Returns the report written to results.json: ``{"summary": ..., "sweep": ..., "settings": ...,
    "models": ..., "environment": ..., "files": ...}``.
    """
    settings = _normalized(dataclasses.replace(settings or EvalSettings(), **overrides))
    dataset, out = Path(dataset), Path(out_dir)
    variants = make_variants(settings.modes, settings.alphas)
    check_variants(variants, settings, reasoner)
    if extract is None or match is None:
        ex, ma = answer_functions()
        extract, match = extract or ex, match or ma
    problems = select_problems(dataset, settings)
    _warn_missing_baselines(variants)
    out.mkdir(parents=True, exist_ok=True)
    models = models if models is not None else models_info(reasoner)
    fingerprint = _fingerprint(settings, dataset, models)
    meta_path, rec_path = out / META, out / RECORDS
    if meta_path.exists() and rec_path.exists():
        old = json.loads(meta_path.read_text()).get("fingerprint")
        if json.loads(json.dumps(old)) != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"{out}: it holds a run with other settings, dataset or models; use another out_dir "
                             f"(or delete {rec_path}). Stored: {old}; now: {fingerprint}")
    meta_path.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings.to_dict(),
                                     "dataset": str(dataset)}, indent=2, default=str))

    records = [score_record(r, extract, match, settings.cut_at) for r in read_records(rec_path)]
    done = {(str(r["key"]), r["variant"]): r for r in records}
    todo: list[tuple[Problem, Variant, int]] = []
    for p in problems:
        shift = p.index % len(variants)
        for j, v in enumerate(variants[shift:] + variants[:shift]):
            prev = done.get((p.key, v.name))
            if prev is None or (settings.retry_failed and not prev.get("ok")):
                todo.append((p, v, j))
    gpu = GpuMonitor()
    if settings.warmup and todo:
        for v in variants:
            if any(t[1] == v for t in todo):
                try:
                    reasoner.generate(_prompt(problems[0], settings), **v.overrides(),
                                      **{**settings.generation(), "max_new_tokens": 4})
                except Exception as exc:  # noqa: BLE001 - settings were checked by check_variants; a failure
                    # here (e.g. this problem's prompt) is also recorded by the timed runs
                    _note(f"warmup of {v.name} failed ({type(exc).__name__}: {exc}); its timed runs go on and "
                          "record their own errors")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="dreamr eval", unit="run", dynamic_ncols=True)
    gpu.start()  # memory and power sampled in a background thread during generation
    try:
        torn = rec_path.exists() and rec_path.stat().st_size > 0 and _last_byte(rec_path) != b"\n"
        with open(rec_path, "a", encoding="utf-8") as fh:
            if torn:  # a run killed mid-line: start the next record on a line of its own
                fh.write("\n")
            for p, v, j in todo:
                if bar is not None:
                    bar.set_postfix_str(f"problem {p.key} {v.name}")
                rec = _run_one(reasoner, p, v, settings, j)
                records.append(score_record(rec, extract, match, settings.cut_at))
                fh.write(json.dumps(rec, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                if bar is not None:
                    bar.update(1)
    finally:
        gpu.stop()
        if bar is not None:
            bar.close()

    selected = {p.key for p in problems}
    records = [r for r in records if str(r["key"]) in selected]
    same_tok = models.get("same_tokenizer") if isinstance(models, dict) else None
    summary = summarize(records, variants, windows=_window_sizes(reasoner, settings, variants),
                        selected=len(problems), same_tokenizer=same_tok)
    sweep_data = sweep(summary)
    files = {"records": str(rec_path), "results": str(out / RESULTS), "sweep_json": str(out / SWEEP_JSON)}
    (out / SWEEP_JSON).write_text(json.dumps(sweep_data, indent=2))
    report = {
        "summary": summary,
        "sweep": sweep_data,
        "settings": settings.to_dict(),
        "dataset": {"path": str(dataset), "sha256": fingerprint["dataset_sha256"], "problems": len(problems)},
        "models": models,
        "seed": settings.seed,
        "environment": environment(reasoner, gpu),
        "files": files,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        if plot:
            files["sweep_png"] = str(plot_sweep(sweep_data, out / SWEEP_PNG,
                                                title=f"{dataset.name}: {len(problems)} problems"))
    except ImportError as exc:
        _note(f"sweep.png not drawn: matplotlib is not available ({exc}); install it with "
              "`pip install matplotlib` (results.json and sweep.json are written)")
    finally:  # a failing or missing plotting library must not lose the report
        (out / RESULTS).write_text(json.dumps(report, indent=2, default=str))
    return report


def _note(message: str) -> None:
    """A warning the user must see: through :mod:`warnings` (once per message), on stderr."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _normalized(settings: EvalSettings) -> EvalSettings:
    """``settings`` with ``modes`` / ``alphas`` / ``cut_at`` as tuples (one name or number taken as one)."""
    modes = (settings.modes,) if isinstance(settings.modes, str) else tuple(settings.modes)
    alphas = settings.alphas
    alphas = (alphas,) if isinstance(alphas, (int, float)) and not isinstance(alphas, bool) else tuple(alphas)
    cut_at = (settings.cut_at,) if isinstance(settings.cut_at, str) else tuple(settings.cut_at)
    if not isinstance(settings.extra, dict):
        raise ValueError(f"extra must be a dict of ReasonerConfig overrides, got {settings.extra!r}")
    clash = sorted(set(settings.extra) & {"mode", "alpha"})
    if clash:
        raise ValueError(f"extra: {clash} are set per variant; use modes= / alphas= (--modes / --alphas), "
                         f"got extra={settings.extra!r}")
    return dataclasses.replace(settings, modes=modes, alphas=alphas, cut_at=cut_at)


def select_problems(dataset: Union[str, Path], settings: EvalSettings) -> list[Problem]:
    """The problems ``settings`` selects from ``dataset``; ValueError when none (or the file is bad)."""
    problems = load_problems(dataset, fields=settings.fields, limit=settings.limit, offset=settings.offset)
    if not problems:
        raise ValueError(f"dataset {dataset}: no problems selected (offset={settings.offset}, limit={settings.limit})")
    return problems


def _warn_missing_baselines(variants: Sequence[Variant]) -> None:
    names = {v.mode for v in variants}
    if "target" not in names:
        _note("no 'target' mode in modes: speedup, speedup_median and accuracy_delta will be None "
              "(add 'target' to modes: it is the speedup baseline)")
    if "draft" not in names and names - set(BASELINE_MODES):
        _note("no 'draft' mode in modes: c of the ideal bound falls back to the engines' phase times "
              "(see bound.c_source in the results); add 'draft' to measure it from wall time")


# --------------------------------------------------------------------------------------------------
# Table and command line
# --------------------------------------------------------------------------------------------------


def _f(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(report: dict) -> str:
    """The per-variant metrics as a fixed-width text table (and the bound line)."""
    summary = report["summary"] if "summary" in report else report
    cols = ["variant", "n", "err", "acc%", "all%", "dacc", "wall s", "speedup", "med", "tok/s", "accept",
            "acc/win", "mal", "tgt fw/tok", "draft tok", "tgt tok", "L", "bound"]
    rows = []
    for name, r in summary["variants"].items():
        rows.append([
            name, str(r["finished"]), str(r["errors"]), _f(None if r["accuracy"] is None else 100 * r["accuracy"], ".1f"),
            _f(None if r.get("accuracy_all") is None else 100 * r["accuracy_all"], ".1f"),
            _f(None if r["accuracy_delta"] is None else 100 * r["accuracy_delta"], "+.1f"), _f(r["wall_time_s"], ".1f"),
            _f(r["speedup"], ".2f"), _f(r["speedup_median"], ".2f"), _f(r["tokens_per_second"], ".1f"),
            _f(r["step_acceptance_rate"], ".2f"), _f(r["accepted_per_window"], ".2f"),
            _f(r.get("mean_accepted_length"), ".2f"),
            _f(r["target_passes_per_token"], ".3f"), str(r["draft_tokens"]), str(r["target_tokens"]),
            _f(r["mean_draft_step_tokens"], ".1f"), _f(r["ideal_bound"], ".2f"),
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    b = summary["bound"]
    lines.append(f"ideal step-level bound 1/(c + 1/L): c = {_f(b['c'], '.3f')}, L = {_f(b['L'], '.1f')} tokens "
                 f"-> {_f(b['ideal_bound'], '.2f')}x (c from: {b.get('c_source') or '-'}; L from: "
                 f"{b.get('L_source') or '-'})")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python bench/eval.py",
        description="Evaluate reasoning modes side by side on a JSONL dataset: accuracy, speedup over the "
                    "target alone (same run, interleaved per problem), acceptance; alpha sweep plot. "
                    "Resumes from OUT/records.jsonl.")
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "examples" / "gsm8k_dev_sample.jsonl"),
                   help="JSONL dataset (default: examples/gsm8k_dev_sample.jsonl)")
    p.add_argument("--out", default="runs/eval", help="output folder (resumed if it holds records.jsonl)")
    p.add_argument("--modes", nargs="+", default=["target", "draft", "speculative"],
                   help="modes to run (any the reasoner accepts); 'target' is the speedup baseline")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.7],
                   help="alphas for the verifying modes (one run per alpha; the sweep plot)")
    p.add_argument("--limit", type=int, default=None, help="at most this many problems")
    p.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    p.add_argument("--target", default=None, help="target model: built-in name or local path (gemma-3-270m)")
    p.add_argument("--draft", default=None, help="draft model: built-in name, local path or self[:k]")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-step-tokens", type=int, default=64)
    p.add_argument("--answer-marker", default="The answer is", help="stop after a step containing this ('' = none)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="another ReasonerConfig override for every call (JSON value), e.g. --set window=4")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--id-field", default=None)
    p.add_argument("--no-chat", action="store_true", help="send the question as plain text, not chat messages")
    p.add_argument("--no-cut", action="store_true", help="score the whole text (do not cut at '\\nQuestion:')")
    p.add_argument("--retry-failed", action="store_true", help="run again the problems recorded as failed")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    """The command line. Bad arguments (mode, alpha, --set, data file, field names) exit with status 2
    before any model is loaded; a run where some variant finished no problem returns 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set {item!r}: expected NAME=VALUE")
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
    try:
        settings = _normalized(EvalSettings(
            modes=tuple(args.modes), alphas=tuple(args.alphas), limit=args.limit, offset=args.offset,
            max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens,
            answer_marker=args.answer_marker or None, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, chat=not args.no_chat, extra=extra,
            fields={"question": args.question_field, "answer": args.answer_field, "id": args.id_field},
            cut_at=() if args.no_cut else EvalSettings.cut_at, warmup=not args.no_warmup,
            retry_failed=args.retry_failed,
        ))
        # Everything that can be checked without models, before loading them.
        check_variants(make_variants(settings.modes, settings.alphas), settings)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        select_problems(args.data, settings)
    except ValueError as exc:
        parser.error(f"--data {args.data} (fields --question-field / --answer-field / --id-field): {exc}")
    from dreamr import models
    from dreamr.reasoner import SpeculativeReasoner

    try:
        reasoner = SpeculativeReasoner.from_pretrained(target=args.target, draft=args.draft, dtype=args.dtype,
                                                       device=args.device, progress=not args.no_progress)
    except ValueError as exc:
        parser.error(str(exc))
    names = {"target": args.target or models.DEFAULT_TARGET, "draft": args.draft or models.DEFAULT_DRAFT,
             "dtype": args.dtype, "device": args.device}
    try:
        report = evaluate(reasoner, args.data, args.out, settings, progress=not args.no_progress,
                          plot=not args.no_plot, models={"names": names, **models_info(reasoner)})
    except ValueError as exc:  # verdict words on these models, or a resume with other settings
        parser.error(str(exc))
    print(format_table(report))
    print(json.dumps({"sweep": report["sweep"], "files": report["files"]}, indent=2))
    failed = [name for name, row in report["summary"]["variants"].items() if not row["finished"]]
    if failed:
        for name in failed:
            msgs = sorted({m for m in report["summary"]["variants"][name]["error_messages"].values() if m})
            print(f"error: variant {name} finished no problem; errors: {msgs[:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
