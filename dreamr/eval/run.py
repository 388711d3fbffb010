"""Running an evaluation: every variant on every problem, interleaved per problem, resumable.

The variants run **interleaved per problem** (problem 0 in every variant, then problem 1, ...; the
variant order rotates by one per problem) so that machine noise hits all variants alike and the
target-alone baseline is measured in the same run. One JSON line per (problem, variant) is appended to
``records.jsonl`` as soon as it is done (flushed), so an interrupted run resumes without redoing finished
work. A variant that raises on a problem is recorded with its error and the run goes on
(``retry_failed=True`` runs those again on resume).

alpha="auto" variants: the reasoner carries its adaptive thresholds across requests, so an evaluation
starts them afresh (``reset_thresholds``) after the warm-up, and the threshold then follows the run
order; a resumed run starts the threshold afresh from where the records left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import dreamr.eval.report as report_mod  # a module reference: tests swap its plot functions
from dreamr.eval.data import (ALPHA_JSON, ALPHA_PNG, META, RECORDS, RESULTS, SWEEP_JSON, SWEEP_PNG, Problem,
                              ends_mid_line, prompt_for, read_records, select_problems, sha256)
from dreamr.eval.environment import GpuMonitor, environment, models_info
from dreamr.eval.metrics import alpha_trajectories, answer_functions, score_record, summarize, sweep
from dreamr.eval.settings import EvalSettings, normalized, note
from dreamr.eval.variants import (BASELINE_MODES, Variant, check_variants, describe_verifier, make_variants,
                                  shared_thresholds, window_sizes)

__all__ = ["interleaved", "run_one", "evaluate"]


def interleaved(problems: Sequence[Problem], variants: Sequence[Variant]) -> Iterator[tuple[Problem, Variant, int]]:
    """``(problem, variant, order)`` for every problem and variant, problem by problem, the variant order
    rotated by one per problem (``order``: the variant's place in its problem's rotation). With
    variants ``[a, b]`` and problems of index 0 and 1: ``(p0, a, 0), (p0, b, 1), (p1, b, 0), (p1, a, 1)``.
    """
    if not variants:
        raise ValueError("variants is empty")
    for p in problems:
        shift = p.index % len(variants)
        for j, v in enumerate([*variants[shift:], *variants[:shift]]):
            yield p, v, j


def run_one(reasoner, problem: Problem, variant: Variant, settings: EvalSettings, order: int = 0) -> dict:
    """One timed ``reasoner.generate`` of ``problem`` in ``variant``, as a record (never raises for the
    run itself: an exception is recorded with its traceback, ``ok`` False).

    Returns
    -------
    dict
        ``key``, ``index``, ``variant``, ``mode``, ``alpha``, ``order``, ``reference``, ``ok``, ``wall_s``
        and, when ok, ``text``, ``finish_reason``, ``metrics`` (:class:`dreamr.result.Metrics` as a dict)
        and per committed step ``accepted``, ``sources``, ``cpn``, ``alphas`` and ``step_tokens``.
    """
    rec: dict[str, Any] = {"key": problem.key, "index": problem.index, "variant": variant.name,
                           "mode": variant.mode, "alpha": variant.alpha, "order": order,
                           "reference": problem.reference}
    start = time.perf_counter()
    try:
        result = reasoner.generate(prompt_for(problem, settings), **variant.overrides(), **settings.generation())
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
        alphas=[None if getattr(s, "alpha", None) is None else float(s.alpha) for s in result.steps],
        step_tokens=[s.num_tokens for s in result.steps],
    )
    return rec


def _fingerprint(settings: EvalSettings, dataset: Path, models: dict) -> dict:
    return {"generation": settings.generation(), "chat": settings.chat, "system_prompt": settings.system_prompt,
            "fields": settings.fields, "dataset_sha256": sha256(dataset), "models": models}


def _warn_missing_baselines(variants: Sequence[Variant]) -> None:
    names = {v.mode for v in variants}
    if "target" not in names:
        note("no 'target' mode in modes: speedup, speedup_median and accuracy_delta will be None "
             "(add 'target' to modes: it is the speedup baseline)")
    if "draft" not in names and names - set(BASELINE_MODES):
        note("no 'draft' mode in modes: c of the ideal bound falls back to the engines' phase times "
             "(see bound.c_source in the results); add 'draft' to measure it from wall time")
    for group in shared_thresholds(variants):
        note(f"variants {group} share one adaptive threshold in the reasoner (one per verifier and target "
             "acceptance): each moves the alpha the others are judged at")


def _check_resumed_verifiers(records: list[dict], verifiers: dict, out: Path) -> None:
    """ValueError where records.jsonl holds a variant's runs made with another verifier (e.g. another
    default verdict head): they would be mixed into one row."""
    for rec in records:
        now = (verifiers.get(rec.get("variant")) or {}).get("id")
        was = rec.get("verifier")
        if was is not None and now is not None and was != now:
            raise ValueError(f"{out}: variant {rec['variant']} was run with verifier {was!r}, now {now!r}; use "
                             "another out_dir, or the same verdict_head / calibrate settings")


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
    reasoner : SpeculativeReasoner
        Or any object with ``generate(prompt, mode=..., alpha=..., **settings)`` returning a
        :class:`dreamr.result.Result`, and ``target`` / ``draft`` handles.
    dataset : str or Path
        JSONL file (GSM8K format by default; see ``EvalSettings.fields``).
    out_dir : str or Path
        Folder for records.jsonl, meta.json, results.json, sweep.json, sweep.png and, with alpha="auto"
        variants, alpha.json and alpha.png. An existing records.jsonl is resumed: finished (problem,
        variant) pairs are not run again.
    settings : EvalSettings, optional
        ``**overrides`` replace its fields (``modes=[...], alphas=[0.7, "auto"], verifiers=[...], limit=20``).
    progress : bool
        A tqdm bar over the runs.
    plot : bool
        Draw sweep.png (and alpha.png); without matplotlib a warning says so and the JSON is written.
    models : dict, optional
        A description of the models for the results (default: read from the reasoner), e.g. their
        names; part of the resume fingerprint.
    extract, match : callable, optional
        Answer extraction and comparison (default: :mod:`dreamr.answers`).

    Returns
    -------
    dict
        The report written to results.json: ``summary``, ``sweep``, ``verifiers`` (per variant),
        ``alpha`` (alpha="auto" trajectories), ``settings``, ``dataset``, ``models``, ``seed``,
        ``environment``, ``files``, ``created_utc``.
    """
    settings = normalized(dataclasses.replace(settings or EvalSettings(), **overrides))
    dataset, out = Path(dataset), Path(out_dir)
    variants = make_variants(settings.modes, settings.alphas, settings.verifiers)
    check_variants(variants, settings, reasoner)
    verifiers = {v.name: d for v in variants if (d := describe_verifier(v, settings, reasoner)) is not None}
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
    records = [score_record(r, extract, match, settings.cut_at) for r in read_records(rec_path)]
    _check_resumed_verifiers(records, verifiers, out)
    meta_path.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings.to_dict(),
                                     "dataset": str(dataset)}, indent=2, default=str))

    done = {(str(r["key"]), r["variant"]): r for r in records}
    todo = [(p, v, j) for p, v, j in interleaved(problems, variants)
            if (prev := done.get((p.key, v.name))) is None or (settings.retry_failed and not prev.get("ok"))]
    gpu = GpuMonitor()
    if settings.warmup and todo:
        for v in variants:
            if any(t[1] == v for t in todo):
                try:
                    reasoner.generate(prompt_for(problems[0], settings), **v.overrides(),
                                      **{**settings.generation(), "max_new_tokens": 4})
                except Exception as exc:  # noqa: BLE001 - settings were checked by check_variants; a failure
                    # here (e.g. this problem's prompt) is also recorded by the timed runs
                    note(f"warmup of {v.name} failed ({type(exc).__name__}: {exc}); its timed runs go on and "
                         "record their own errors")
    reset = getattr(reasoner, "reset_thresholds", None)
    if callable(reset) and any(v.auto for _, v, _ in todo):
        reset()  # the adaptive thresholds start afresh: not from the warm-up or from earlier requests
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="dreamr eval", unit="run", dynamic_ncols=True)
    gpu.start()  # memory and power sampled in a background thread during generation
    try:
        torn = ends_mid_line(rec_path)
        with open(rec_path, "a", encoding="utf-8") as fh:
            if torn:  # a run killed mid-line: start the next record on a line of its own
                fh.write("\n")
            for p, v, j in todo:
                if bar is not None:
                    bar.set_postfix_str(f"problem {p.key} {v.name}")
                rec = run_one(reasoner, p, v, settings, j)
                if v.name in verifiers:
                    rec["verifier"] = verifiers[v.name]["id"]
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
    summary = summarize(records, variants, windows=window_sizes(reasoner, settings, variants),
                        selected=len(problems), same_tokenizer=same_tok, verifiers=verifiers)
    sweep_data = sweep(summary)
    trajectories = alpha_trajectories(records, variants, verifiers)
    files = {"records": str(rec_path), "results": str(out / RESULTS), "sweep_json": str(out / SWEEP_JSON)}
    (out / SWEEP_JSON).write_text(json.dumps(sweep_data, indent=2))
    if trajectories:
        files["alpha_json"] = str(out / ALPHA_JSON)
        (out / ALPHA_JSON).write_text(json.dumps(trajectories))
    report = {
        "summary": summary,
        "sweep": sweep_data,
        "verifiers": verifiers,
        "alpha": trajectories,
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
            title = f"{dataset.name}: {len(problems)} problems"
            files["sweep_png"] = str(report_mod.plot_sweep(sweep_data, out / SWEEP_PNG, title=title))
            if trajectories:
                files["alpha_png"] = str(report_mod.plot_alpha(trajectories, out / ALPHA_PNG, title=title))
    except ImportError as exc:
        note(f"sweep.png / alpha.png not drawn: matplotlib is not available ({exc}); install it with "
             "`pip install matplotlib` (results.json and sweep.json are written)")
    finally:  # a failing or missing plotting library must not lose the report
        (out / RESULTS).write_text(json.dumps(report, indent=2, default=str))
    return report
