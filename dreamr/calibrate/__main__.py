"""``python -m dreamr.calibrate``: fit a verdict head for a target, score a judge on a pair file.

    python -m dreamr.calibrate fit --target gemma-3-270m --train train.jsonl --out dreamr/heads/gemma-3-270m
    python -m dreamr.calibrate score --target gemma-3-270m --verdict-head DIR --calibrate \\
        --pairs pairs.jsonl --json out.json
    python -m dreamr.calibrate pairs --data test_dev.jsonl --out pairs.jsonl --positions 1

``fit`` builds labelled pairs itself from a GSM8K-format file (:mod:`dreamr.calibrate.pairs`), extracts
the target's hidden states at the verdict position (:mod:`dreamr.calibrate.features`), fits a head on
``h`` and on ``h - h_null`` (:mod:`dreamr.calibrate.fit`), prints the held-out figures of the target's own
verdict and of both heads, with and without calibration, and saves the head ``--calibrate`` /
``--no-calibrate`` chooses (and the other one in ``--other-out``, where given). ``score`` prints and
writes ``{"auroc", "pair_accuracy", "n_pairs", "mean_cpn_good", "mean_cpn_bad"}`` (plus the same per kind
of bad step where the file names kinds). ``pairs`` writes a pair file from a GSM8K-format file (held-out
pairs for ``score``: make them from problems the head was not fitted on).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_MAX_PAIRS = 1200
"""Pairs ``fit`` extracts by default: about 10 minutes with gemma-3-270m on a 2-core CPU machine (measured on
the shared one: 400 pairs in 209 s, 0.31 s per scored step; SmolLM2-135M-Instruct, under heavier load: 600
pairs in 625 s)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamr.calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q):
        q.add_argument("--target", default=None, help="the judge: built-in name or local path (gemma-3-270m)")
        q.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, ...)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--no-chat", action="store_true",
                       help="frame the question as plain text, not chat messages (python -m dreamr --no-chat)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = sub.add_parser("fit", help="fit a verdict head for a target")
    model_args(f)
    f.add_argument("--train", required=True, type=Path, help="GSM8K-format jsonl (question, answer) to build pairs from")
    f.add_argument("--out", required=True, type=Path, help="folder for head.safetensors and head.json")
    f.add_argument("--max-pairs", type=int, default=DEFAULT_MAX_PAIRS,
                   help=f"pairs to extract (default {DEFAULT_MAX_PAIRS}: about 10 minutes for gemma-3-270m on 2 cores)")
    f.add_argument("--positions", default="all", help="step positions per problem: 'all' or a number (default all)")
    f.add_argument("--heldout", type=float, default=0.2, help="fraction of the problems held out (default 0.2)")
    f.add_argument("--l2", default="auto", help="L2 strength, or 'auto' (picked on a validation split)")
    f.add_argument("--seed", type=int, default=0)
    g = f.add_mutually_exclusive_group()
    g.add_argument("--calibrate", dest="calibrate", action="store_true", default=True,
                   help="save the head fitted on h - h_null, scored with the null step (default)")
    g.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="save the head fitted on h")
    f.add_argument("--features", type=Path, default=None,
                   help="cache file for the extracted features: read where it exists for the same settings, else written")
    f.add_argument("--json", type=Path, default=None, help="also write the figures here")
    f.add_argument("--other-out", type=Path, default=None,
                   help="also save the head fitted on the other features (h where --out gets the h - h_null head), "
                        "to score both side by side")

    s = sub.add_parser("score", help="score a judge on a pair file")
    model_args(s)
    s.add_argument("--pairs", required=True, type=Path, help="pair file: question, context_steps, good_step, bad_step")
    s.add_argument("--verdict-head", default="none",
                   help="a head folder, 'shipped' (the head dreamr ships for a built-in target) or 'none' (default: "
                        "the target's own Yes/No verdict)")
    s.add_argument("--calibrate", action="store_true", help="correct each verdict by the null step's at its prefix")
    s.add_argument("--max-pairs", type=int, default=None, help="score only the first N pairs")
    s.add_argument("--json", type=Path, default=None, help="write the figures here")
    s.add_argument("--compare", action="store_true",
                   help="also give, under 'compare', the figures of the target's own verdict and of the head, each with "
                        "and without calibration (a head fitted on h - h_null: with it only), one feature extraction "
                        "for all")

    m = sub.add_parser("pairs", help="write a pair file from a GSM8K-format jsonl")
    m.add_argument("--data", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--positions", default="1", help="step positions per problem: 'all' or a number (default 1)")
    m.add_argument("--limit", type=int, default=None, help="the first N problems only")
    m.add_argument("--seed", type=int, default=0)
    return p


def _positions(value: str):
    if value == "all":
        return "all"
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"positions must be 'all' or an integer >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"positions must be 'all' or an integer >= 1, got {value!r}")
    return n


def _load(args):
    from dreamr import models

    name = models.DEFAULT_TARGET if args.target is None else args.target
    loaded = models.load(name, dtype=args.dtype, device=args.device, progress=not args.no_progress)
    return loaded


def _extractor(loaded, args):
    from dreamr.calibrate.features import FeatureExtractor

    return FeatureExtractor(loaded.model, loaded.tokenizer, chat=False if args.no_chat else None)


def _fmt(fig: dict) -> str:
    return f"AUROC {fig['auroc']:.3f}  pair accuracy {fig['pair_accuracy']:.3f}  ({fig['n_pairs']} pairs)"


def _command() -> str:
    return "python -m dreamr.calibrate " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _fit(args) -> int:
    import torch

    from dreamr.calibrate.fit import FeatureSet, evaluate, extract, fit_head
    from dreamr.calibrate.pairs import build_groups, read_problems
    from dreamr.verify.head import target_identity

    if args.max_pairs < 10:
        raise ValueError(f"max_pairs must be at least 10, got {args.max_pairs}")
    if not 0.0 < args.heldout < 1.0:
        raise ValueError(f"heldout must lie in (0, 1), got {args.heldout}")
    l2 = None if args.l2 == "auto" else float(args.l2)
    positions = _positions(args.positions)
    problems = read_problems(args.train)
    order = list(range(len(problems)))
    random.Random(args.seed).shuffle(order)
    groups, n_pairs = [], 0
    for start in range(0, len(order), 64):  # pairs are built from problems in a seeded order until enough
        chunk = build_groups([problems[i] for i in order[start:start + 64]], seed=args.seed + start,
                             positions=positions)
        for g in chunk:
            g.problem = order[start + g.problem]
            groups.append(g)
            n_pairs += len(g.bad)
            if n_pairs >= args.max_pairs:
                break
        if n_pairs >= args.max_pairs:
            break
    loaded = _load(args)
    extractor = _extractor(loaded, args)
    settings = {"target": loaded.name, "train": Path(args.train).name, "max_pairs": args.max_pairs,
                "positions": args.positions, "seed": args.seed, "dtype": args.dtype, "framing": extractor.framing(),
                "template": extractor.template}
    features = None
    if args.features is not None and args.features.is_file():
        state = torch.load(args.features, weights_only=False)
        if state.get("settings") == settings:
            features = FeatureSet.from_state(state)
            print(f"features read from {args.features} ({features.n_pairs} pairs)", file=sys.stderr)
    if features is None:
        t0 = time.perf_counter()
        features = extract(extractor, groups, progress=not args.no_progress, desc=f"{loaded.name} features")
        dt = time.perf_counter() - t0
        steps = sum(h.shape[0] for h in features.hidden)
        print(f"extracted {features.n_pairs} pairs ({steps} scored steps, {extractor.tokens_fed} tokens) in "
              f"{dt:.0f} s: {dt / max(steps, 1):.3f} s per scored step", file=sys.stderr)
        if args.features is not None:
            args.features.parent.mkdir(parents=True, exist_ok=True)
            torch.save({**features.state(), "settings": settings}, args.features)
    train, heldout = features.split(args.heldout, args.seed)
    print(f"{len(train)} training groups ({train.n_pairs} pairs), {len(heldout)} held-out groups "
          f"({heldout.n_pairs} pairs) from {len(set(features.problem))} problems")
    meta = {
        "target": target_identity(loaded.model, loaded.name),
        "template": extractor.template,
        "framing": extractor.framing(),
        "null_step": extractor.null_step,
        "command": _command(),
        "seed": args.seed,
    }
    heads = {}
    for calibrated in (False, True):
        label = "h - h_null" if calibrated else "h"
        print(f"fitting the head on {label}")
        head, info = fit_head(train, calibrated=calibrated, seed=args.seed, l2=l2, log=print)
        heads[calibrated] = (head, info)
    table = {
        "target verdict (LM head)": evaluate(heldout, None, False),
        "target verdict, calibrated": evaluate(heldout, None, True),
        "head on h": evaluate(heldout, heads[False][0], False),
        "head on h, calibrated": evaluate(heldout, heads[False][0], True),
        "head on h - h_null, calibrated": evaluate(heldout, heads[True][0], True),
    }
    print(f"held-out figures ({loaded.name}):")
    for name, fig in table.items():
        kinds = "  ".join(f"{k} {v['pair_accuracy']:.2f}" for k, v in fig.get("by_kind", {}).items())
        print(f"  {name:32s} {_fmt(fig)}   pair accuracy by kind: {kinds}")
    saves = [(args.calibrate, args.out)] + ([(not args.calibrate, args.other_out)] if args.other_out else [])
    for calibrated, folder in saves:
        head, info = heads[calibrated]
        chosen = "head on h - h_null, calibrated" if calibrated else "head on h"
        head.meta.update(meta)
        head.meta.update(
            features="h - h_null" if calibrated else "h",
            fit={"l2": info["l2"], "validation": info["validation"], "train_pairs": train.n_pairs,
                 "heldout_pairs": heldout.n_pairs, "train_file": Path(args.train).name, "max_pairs": args.max_pairs,
                 "positions": args.positions, "heldout_fraction": args.heldout, "heldout": table[chosen],
                 "heldout_table": table, "dtype": args.dtype},
        )
        head.save(folder)
        print(f"saved the {chosen!r} head to {folder} (held-out {_fmt(table[chosen])})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(table), indent=2) + "\n")
    return 0


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _score(args) -> int:
    from dreamr.calibrate.fit import figures
    from dreamr.calibrate.pairs import pairs_to_groups, read_pairs
    from dreamr.verify.head import VerdictHead, calibrated_cpn, shipped_head_dir

    pairs = read_pairs(args.pairs, limit=args.max_pairs)
    loaded = _load(args)
    head = None
    if args.verdict_head not in (None, "", "none"):
        folder = shipped_head_dir(loaded.name) if args.verdict_head == "shipped" else Path(args.verdict_head)
        if folder is None:
            raise ValueError(f"verdict_head: dreamr ships no head for {loaded.name!r}")
        head = VerdictHead.load(folder, loaded.model)
    extractor = _extractor(loaded, args)
    if head is not None:
        head.check_template(extractor.template)
    calibrate = bool(args.calibrate or (head is not None and head.calibrated))
    if head is not None and head.calibrated and not args.calibrate:
        print("note: this head was fitted on h - h_null; it is scored with the null step (--calibrate)",
              file=sys.stderr)
    groups, where = pairs_to_groups(pairs)
    from tqdm.auto import tqdm

    def judge(h, lm, with_head, with_cal):
        """cpn of a group's steps (the null row last in ``h``) under one verifier."""
        if not with_head:
            return calibrated_cpn(lm[:-1], lm[-1:].expand(len(lm) - 1)) if with_cal else lm[:-1]
        cpn, _ = head.cpn(h[:-1], 0.5, h[-1:].expand(len(h) - 1, -1) if with_cal else None)
        return cpn

    variants = {(head is not None, calibrate)}
    if args.compare:
        # a head fitted on h - h_null has no meaning on h alone (it has no bias): only with the null step
        with_head = set() if head is None else {(True, True)} if head.calibrated else {(True, False), (True, True)}
        variants |= {(False, False), (False, True)} | with_head
    scores = {v: [] for v in variants}
    t0 = time.perf_counter()
    for g in tqdm(groups, desc=f"{loaded.name} scoring", unit="group", disable=args.no_progress, dynamic_ncols=True):
        h = extractor.hidden(g.question, g.context_steps, [g.good] + list(g.bad.values()))
        lm = extractor.lm_cpn(h)
        for v in variants:
            scores[v].append(judge(h, lm, *v).tolist())
    print(f"scored {sum(len(g.bad) + 2 for g in groups)} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def figures_of(v):
        good = [scores[v][g][i] for g, i, _ in where]
        bad = [scores[v][g][j] for g, _, j in where]
        return figures(good, bad, [p.kind for p in pairs])

    result = figures_of((head is not None, calibrate))
    if args.compare:
        names = {(False, False): "target verdict", (False, True): "target verdict, calibrated",
                 (True, False): "head", (True, True): "head, calibrated"}
        result["compare"] = {names[v]: figures_of(v) for v in sorted(variants)}
    result["verifier"] = {"target": loaded.name, "verdict_head": None if head is None else str(args.verdict_head),
                          "calibrate": calibrate, "template": extractor.template, "pairs": str(args.pairs)}
    result = _jsonable(result)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _pairs(args) -> int:
    from dreamr.calibrate.pairs import build_groups, groups_to_pairs, read_problems, write_pairs

    problems = read_problems(args.data, limit=args.limit, arg="data")
    groups = build_groups(problems, seed=args.seed, positions=_positions(args.positions))
    n = write_pairs(args.out, groups_to_pairs(groups))
    print(f"wrote {n} pairs from {len(problems)} problems to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return {"fit": _fit, "score": _score, "pairs": _pairs}[args.command](args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
