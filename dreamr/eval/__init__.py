"""Evaluation: accuracy, speedup and acceptance of reasoning modes, measured side by side.

    python -m dreamr.eval --data ../shared/data/gsm8k/test_dev.jsonl --limit 20 \\
        --modes target draft speculative --alphas 0.5 0.7 0.9 auto --out runs/gsm8k20

    from dreamr.eval import evaluate, format_table
    report = evaluate(reasoner, "test_dev.jsonl", "runs/x", modes=["target", "speculative"], alphas=[0.7, "auto"])
    print(format_table(report))

One file per idea (see ``docs/architecture.md``, evaluation):

* :mod:`~dreamr.eval.data`: problems from a JSONL dataset (GSM8K's ``question`` / ``answer`` by default),
  their prompts (:mod:`dreamr.prompts`), the run folder's files and records.
* :mod:`~dreamr.eval.settings`: :class:`EvalSettings`.
* :mod:`~dreamr.eval.variants`: the variants (each baseline mode once, every verifying mode once per
  alpha, fixed or "auto", and per verifier: a verdict head, calibration), written ``speculative@0.7``,
  ``speculative@auto+target_acceptance=0.5``, ``speculative@0.7+calibrate``.
* :mod:`~dreamr.eval.run`: :func:`evaluate`, every variant on every problem, interleaved per problem,
  appended to records.jsonl as each run ends (resumable).
* :mod:`~dreamr.eval.metrics`: answers scored by :mod:`dreamr.answers`, the per-variant metrics (their
  definitions are in that module's docstring), the alpha sweep and alpha="auto" trajectories.
* :mod:`~dreamr.eval.report`: the table (with the verifier of each variant), sweep.png and alpha.png.
* :mod:`~dreamr.eval.environment`: library versions, device and GPU readings.
* :mod:`~dreamr.eval.cli`: the command line (``python -m dreamr.eval``, ``python bench/eval.py``).
"""

from __future__ import annotations

from dreamr.prompts import SYSTEM_PROMPT
from dreamr.eval import report
from dreamr.eval.data import (ALPHA_JSON, ALPHA_PNG, DEFAULT_FIELDS, META, RECORDS, RESULTS, SWEEP_JSON, SWEEP_PNG,
                              Problem, load_problems, prompt_for, read_records, select_problems)
from dreamr.eval.environment import NO_GPU, NO_NVML, GpuMonitor, environment, models_info
from dreamr.eval.metrics import (TOKENIZER_NOTE, accepted_per_window, alpha_trajectories, answer_functions,
                                 ideal_bound, score_record, summarize, sweep)
from dreamr.eval.report import format_table, plot_alpha, plot_sweep
from dreamr.eval.run import evaluate, interleaved, run_one
from dreamr.eval.settings import EvalSettings
from dreamr.eval.variants import (BASELINE_MODES, VERIFIER_OPTIONS, Variant, check_variants, describe_verifier,
                                  make_variants, parse_alpha, parse_verifier)
from dreamr.eval.cli import build_parser, main

__all__ = [
    "BASELINE_MODES",
    "VERIFIER_OPTIONS",
    "SYSTEM_PROMPT",
    "EvalSettings",
    "Variant",
    "Problem",
    "make_variants",
    "parse_alpha",
    "parse_verifier",
    "check_variants",
    "describe_verifier",
    "load_problems",
    "select_problems",
    "prompt_for",
    "read_records",
    "interleaved",
    "run_one",
    "answer_functions",
    "score_record",
    "accepted_per_window",
    "ideal_bound",
    "summarize",
    "sweep",
    "alpha_trajectories",
    "plot_sweep",
    "plot_alpha",
    "environment",
    "models_info",
    "GpuMonitor",
    "evaluate",
    "format_table",
    "build_parser",
    "main",
    "report",
    "RECORDS",
    "META",
    "RESULTS",
    "SWEEP_JSON",
    "SWEEP_PNG",
    "ALPHA_JSON",
    "ALPHA_PNG",
]
