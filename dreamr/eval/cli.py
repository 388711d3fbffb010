"""The evaluation's command line: ``python -m dreamr.eval`` (and ``python bench/eval.py``, the same).

    python -m dreamr.eval --data ../shared/data/gsm8k/test_dev.jsonl --limit 20 \\
        --modes target draft speculative --alphas 0.5 0.7 auto --verifiers default verdict_head=none calibrate

Bad arguments (mode, alpha, verifier, --set, data file, field names) exit with status 2 before any model
is loaded; a run where some variant finished no problem returns 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamr.eval.data import select_problems
from dreamr.eval.environment import models_info
from dreamr.eval.report import format_table
from dreamr.eval.run import evaluate
from dreamr.eval.settings import EvalSettings, normalized
from dreamr.eval.variants import check_variants, make_variants
from dreamr.prompts import ANSWER_MARKER

__all__ = ["build_parser", "main"]

_EXAMPLE_DATA = Path(__file__).resolve().parent.parent.parent / "examples" / "gsm8k_dev_sample.jsonl"


def _alpha_arg(text: str):
    """--alphas entries: "auto" or a number (checked against [0, 1] with the variants)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dreamr.eval",
        description="Evaluate reasoning modes side by side on a JSONL dataset: accuracy, speedup over the "
                    "target alone (same run, interleaved per problem), acceptance; alpha sweep plot, and the "
                    "threshold of alpha=auto variants step by step. Resumes from OUT/records.jsonl.")
    p.add_argument("--data", default=str(_EXAMPLE_DATA), help="JSONL dataset (default: examples/gsm8k_dev_sample.jsonl)")
    p.add_argument("--out", default="runs/eval", help="output folder (resumed if it holds records.jsonl)")
    p.add_argument("--modes", nargs="+", default=["target", "draft", "speculative"],
                   help="modes to run (any the reasoner accepts; 'target' is the speedup baseline) or variant "
                        "specs MODE@ALPHA[+OPTION...], e.g. speculative@auto+target_acceptance=0.5, "
                        "speculative@0.7+calibrate, speculative@0.7+verdict_head=none")
    p.add_argument("--alphas", nargs="+", type=_alpha_arg, default=[0.7],
                   help="alphas for the verifying modes given by name, numbers in [0, 1] or 'auto' (the adaptive "
                        "threshold); one run per alpha; the fixed ones make the sweep plot")
    p.add_argument("--verifiers", nargs="+", default=[],
                   help="verifier specs crossed with the verifying modes given by name: 'default' (the reasoner's), "
                        "'calibrate', 'verdict_head=DIR|none', 'target_acceptance=X' (auto alphas only), "
                        "joined with '+'")
    p.add_argument("--verdict-head", default="auto",
                   help="the reasoner's default verdict head: 'auto' (the one dreamr ships for a built-in target), "
                        "a folder written by python -m dreamr.calibrate fit, or 'none'")
    p.add_argument("--limit", type=int, default=None, help="at most this many problems")
    p.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    p.add_argument("--target", default=None, help="target model: built-in name or local path (gemma-3-270m)")
    p.add_argument("--draft", default=None, help="draft model: built-in name, local path or self[:k]")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-step-tokens", type=int, default=64)
    p.add_argument("--answer-marker", default=ANSWER_MARKER, help="stop after a step containing this ('' = none)")
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
    """The command line; returns the exit status (2 from argparse on bad input, before models load)."""
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
        settings = normalized(EvalSettings(
            modes=tuple(args.modes), alphas=tuple(args.alphas), verifiers=tuple(args.verifiers), limit=args.limit,
            offset=args.offset, max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens,
            answer_marker=args.answer_marker or None, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, chat=not args.no_chat, extra=extra,
            fields={"question": args.question_field, "answer": args.answer_field, "id": args.id_field},
            cut_at=() if args.no_cut else EvalSettings.cut_at, warmup=not args.no_warmup,
            retry_failed=args.retry_failed,
        ))
        # Everything that can be checked without models, before loading them.
        check_variants(make_variants(settings.modes, settings.alphas, settings.verifiers), settings)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        select_problems(args.data, settings)
    except ValueError as exc:
        parser.error(f"--data {args.data} (fields --question-field / --answer-field / --id-field): {exc}")
    from dreamr import models
    from dreamr.reasoner import SpeculativeReasoner

    head = None if args.verdict_head.strip().lower() == "none" else args.verdict_head
    try:
        reasoner = SpeculativeReasoner.from_pretrained(target=args.target, draft=args.draft, dtype=args.dtype,
                                                       device=args.device, progress=not args.no_progress,
                                                       verdict_head=head)
    except ValueError as exc:
        parser.error(str(exc))
    names = {"target": args.target or models.DEFAULT_TARGET, "draft": args.draft or models.DEFAULT_DRAFT,
             "dtype": args.dtype, "device": args.device}
    try:
        report = evaluate(reasoner, args.data, args.out, settings, progress=not args.no_progress,
                          plot=not args.no_plot, models={"names": names, **models_info(reasoner)})
    except ValueError as exc:  # verdict words or head on these models, or a resume with other settings
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
