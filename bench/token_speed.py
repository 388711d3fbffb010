"""Speed per committed token against transformers' own ``generate``, side by side in one process.

    python bench/token_speed.py                          # 10 GSM8K dev problems, every variant
    python bench/token_speed.py --n 3 --out token_speed.json
    python bench/token_speed.py --variants generate target token speculative@1.0
    python bench/token_speed.py --set num_speculative_tokens=8 --set token_speculation=ngram

The table of the token-level speculation issue: the default pair (gemma-3-270m judges, SmolLM2-135M-Instruct
drafts), float32, one thread, greedy, 128 new tokens, answer marker off, on GSM8K dev problems. Variants
(``--variants``, in this order by default):

    generate             transformers ``model.generate`` of the target alone (greedy)
    generate+pld         the same with prompt-lookup decoding (``prompt_lookup_num_tokens=10``; lossless)
    generate+assisted    universal assisted decoding with the draft (``assistant_model``, ``tokenizer``,
                         ``assistant_tokenizer``; lossless)
    generate+static      ``generate`` with ``cache_implementation="static"`` (transformers compiles the
                         decode forward where it can: the GPU user's fast path; not in the defaults)
    target, token, ...   dreamr modes as :mod:`dreamr.eval` variant specs (``MODE[@ALPHA][+OPTION...]``):
                         target, token, speculative@1.0, speculative@0.9, speculative@0.7, fpsr@0.9,
                         fpsr@0.7
    MODE...[KEY=VALUE,...]  a dreamr mode with attributes of its engine set for its runs, e.g.
                         ``target[cuda_graphs=off]`` (the one-token decode eager, beside ``target``'s
                         CUDA graphs on a GPU)

``--random-models TOKENIZER`` runs random-weight Llamas instead of the default pair (a tokenizer folder,
SmolLM2's; sizes from ``--random-sizes``, by default the 1.5B target and 0.5B draft of
``bench/gpu_check.sh``): for a GPU machine that has no model cache. Their text is not meaningful and
their verdicts accept little; the lossless variants' ratios and text identity are what such a run
measures.

A dreamr mode the installed dreamr does not know (not in :data:`dreamr.config.MODES`) is skipped with a
message, so the script runs against older checkouts too. Every variant runs once per problem, the
variants of a problem one after another and their order rotated from problem to problem
(:func:`dreamr.eval.interleaved`), so that load changes on a shared machine hit all variants alike; each
variant first runs once untimed (4 tokens). Compare only ratios measured in one run.

Columns, per variant over all problems:

    ms/tok          wall seconds / committed tokens (the EOS token counts where one is written)
    x generate      speed per committed token relative to ``generate``: (its s/token) / (this s/token)
    x target        the same relative to dreamr's ``target`` (the target alone)
    accepted        drafted steps accepted / verified (dreamr's verifying modes)
    tok/fwd         tokens written per target forward inside target-written steps (dreamr's
                    ``tokens_per_target_forward``, from its token-level speculation counters)
    acc len         mean accepted length of the target's token-level proposals (vLLM's: 1 + accepted
                    tokens / proposals; the JSON also has the token acceptance rate)
    same text       problems whose text equals the target-only text (``generate``'s, else dreamr
                    ``target``'s); lossless variants must show n/n

``--out`` writes the settings, the environment, the rows and every run (text included) as JSON. Dreamr
runs go through :func:`dreamr.eval.run_one` (a failed run is recorded and reported, the benchmark goes
on). Nothing here runs in the tests.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

DEFAULT_VARIANTS = ("generate", "generate+pld", "generate+assisted", "target", "token", "speculative@1.0",
                    "speculative@0.9", "speculative@0.7", "fpsr@0.9", "fpsr@0.7")
HF_VARIANTS = ("generate", "generate+pld", "generate+assisted", "generate+static")
"""Variants run by transformers' ``generate`` of the target; every other variant is a dreamr mode."""
PROMPT_LOOKUP_TOKENS = 10
WARMUP_TOKENS = 4
DEFAULT_DATA = "/work/shared/data/gsm8k/test_dev.jsonl"
RANDOM_SIZES = "1536,28,8960:896,24,4864"  # bench/gpu_check.sh's random target (1.5B) and draft (0.5B)


@dataclass(frozen=True)
class HFVariant:
    """One way of running transformers' ``generate`` on the target (see :data:`HF_VARIANTS`)."""

    name: str

    def kwargs(self, reasoner) -> dict:
        """``generate`` keyword arguments beyond the prompt: greedy, dreamr's EOS ids, the variant's own."""
        lm = reasoner.target
        # The sampling fields of the model's generation config are cleared: greedy decoding ignores them
        # and transformers warns about every one of them otherwise.
        out: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                                   eos_token_id=sorted(lm.eos_ids), pad_token_id=min(lm.eos_ids))
        if self.name == "generate+pld":
            out["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
        elif self.name == "generate+assisted":
            out.update(assistant_model=reasoner.draft.model, tokenizer=lm.tokenizer,
                       assistant_tokenizer=reasoner.draft.tokenizer)
        elif self.name == "generate+static":
            out["cache_implementation"] = "static"
        return out


@dataclass(frozen=True)
class EngineVariant:
    """A dreamr variant run with attributes of its mode's engine set (``MODE...[KEY=VALUE,...]``)."""

    variant: Any  # dreamr.eval.Variant
    knobs: tuple  # (attribute, value) pairs

    @property
    def mode(self) -> str:
        return self.variant.mode

    @property
    def name(self) -> str:
        return f"{self.variant.name}[{','.join(f'{k}={v}' for k, v in self.knobs)}]"


def split_knobs(spec: str) -> tuple[str, tuple]:
    """``"target[cuda_graphs=off]"`` -> ``("target", (("cuda_graphs", "off"),))`` (values read as in
    :func:`parse_settings`)."""
    if not spec.endswith("]") or "[" not in spec:
        return spec, ()
    base, _, inner = spec[:-1].partition("[")
    where = f"--variants {spec!r}: expected MODE[KEY=VALUE,...], got the item"
    return base, tuple(parse_settings(inner.split(","), where).items())


def parse_settings(items: Sequence[str], where: str = "--set: expected KEY=VALUE, got") -> dict:
    """``KEY=VALUE`` pairs (``--set``) as ReasonerConfig overrides; a value is read as JSON where it parses
    (numbers, true/false, null), else kept as text. ``where`` starts the message of a malformed item."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where} {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def build_variants(specs: Sequence[str]) -> tuple[list, list[str]]:
    """The variants to run and the messages about the ones skipped.

    Parameters
    ----------
    specs : list of str
        Names from :data:`HF_VARIANTS` and dreamr variant specs (``MODE[@ALPHA][+OPTION...]``).

    Returns
    -------
    variants : list of HFVariant and dreamr.eval.Variant, in the order given, duplicates dropped
    skipped : list of str
        One line per spec whose mode the installed dreamr does not know.

    Raises
    ------
    ValueError
        On an empty list or a spec of a known mode that :func:`dreamr.eval.make_variants` refuses.
    """
    from dreamr.config import MODES
    from dreamr.eval import make_variants

    if not specs:
        raise ValueError("--variants is empty; give e.g. --variants generate target")
    variants: list = []
    skipped: list[str] = []
    for spec in specs:
        given, (spec, knobs) = spec, split_knobs(spec)
        if spec in HF_VARIANTS:
            if knobs:
                raise ValueError(f"--variants {given!r}: engine settings [...] apply to dreamr modes only")
            items = [HFVariant(spec)]
        else:
            mode = spec.split("+", 1)[0].partition("@")[0]
            if mode not in MODES:
                skipped.append(f"skipped {spec!r}: the installed dreamr has no mode {mode!r} "
                               f"(dreamr.config.MODES = {list(MODES)})")
                continue
            try:
                items = make_variants([spec], [])  # a verifying mode needs its alpha in the spec
            except ValueError as exc:
                raise ValueError(f"--variants {spec!r}: {exc} (a verifying mode is written with its alpha, "
                                 "e.g. speculative@0.7)") from None
            if knobs:
                items = [EngineVariant(v, knobs) for v in items]
        variants += [v for v in items if v not in variants]
    return variants, skipped


def run_generate(reasoner, prompt_ids: list[int], variant: HFVariant, max_new_tokens: int) -> dict:
    """One timed ``generate`` of the target on ``prompt_ids``: wall seconds, new token ids and their text
    (EOS dropped, special tokens skipped, as dreamr decodes its steps)."""
    lm = reasoner.target
    x = torch.tensor([prompt_ids], dtype=torch.long, device=lm.device)
    kwargs = variant.kwargs(reasoner)
    start = time.perf_counter()
    out = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, **kwargs)
    wall = time.perf_counter() - start
    new = [int(t) for t in out[0, len(prompt_ids):].tolist()]
    if any(t in lm.eos_ids for t in new):  # generate pads nothing at batch size 1, but cut at the first EOS
        new = new[:next(i for i, t in enumerate(new) if t in lm.eos_ids) + 1]
    text = lm.tokenizer.decode([t for t in new if t not in lm.eos_ids], skip_special_tokens=True)
    return {"ok": True, "wall_s": wall, "tokens": len(new), "text": text}


def run_variant(reasoner, problem, variant, settings) -> dict:
    """One timed run of ``variant`` on ``problem``, as a record: ``variant``, ``key``, ``ok``, ``wall_s``,
    ``tokens`` (committed), ``text`` and, for dreamr modes, ``metrics`` (or ``error`` where it failed)."""
    from dreamr.eval import prompt_for, run_one

    if isinstance(variant, HFVariant):
        ids = reasoner.target.encode_prompt(prompt_for(problem, settings))
        rec = run_generate(reasoner, ids, variant, settings.max_new_tokens)
    else:
        engine = reasoner.engine(variant.mode)
        knobs = variant.knobs if isinstance(variant, EngineVariant) else ()
        for k, _ in knobs:
            if not hasattr(engine, k):
                raise ValueError(f"--variants {variant.name!r}: the {variant.mode} engine has no setting {k!r}")
        saved = [(k, getattr(engine, k)) for k, _ in knobs]
        for k, v in knobs:
            setattr(engine, k, v)
        try:
            rec = run_one(reasoner, problem, variant.variant if knobs else variant, settings)
        finally:
            for k, v in saved:
                setattr(engine, k, v)
        if rec["ok"]:
            rec["tokens"] = rec["metrics"]["committed_tokens"]
    rec.update(variant=variant.name, key=problem.key)
    return rec


def warm_up(reasoner, problem, variants, settings) -> None:
    """One short untimed run of each variant (first-call costs: allocator, lazy tables, kernels)."""
    import dataclasses

    short = dataclasses.replace(settings, max_new_tokens=WARMUP_TOKENS)
    for v in variants:
        rec = run_variant(reasoner, problem, v, short)
        if not rec["ok"]:
            print(f"warm-up of {v.name} failed: {rec['error']}", flush=True)
        if getattr(v, "name", "") == "generate+static":
            # a second static-cache length: torch.compile recompiles with dynamic shapes here, not in a timed
            # run (every problem's prompt gives its cache another length)
            run_variant(reasoner, problem, v, dataclasses.replace(short, max_new_tokens=WARMUP_TOKENS + 1))


def reference_of(names: Sequence[str]) -> Optional[str]:
    """The variant whose text is the target-only text: ``generate``, else dreamr's ``target``, else None."""
    return "generate" if "generate" in names else ("target" if "target" in names else None)


def summarize(records: list[dict], names: Sequence[str]) -> list[dict]:
    """One row per variant name: the sums over its successful runs and the ratios of the module docstring."""
    reference = reference_of(names)
    ref_text = {r["key"]: r["text"] for r in records if r["ok"] and r["variant"] == reference}
    rows = []
    for name in names:
        runs = [r for r in records if r["variant"] == name]
        ok = [r for r in runs if r["ok"]]
        wall, tokens = sum(r["wall_s"] for r in ok), sum(r["tokens"] for r in ok)
        row: dict[str, Any] = {"variant": name, "runs": len(runs), "failed": len(runs) - len(ok), "wall_s": wall,
                               "tokens": tokens, "s_per_token": wall / tokens if tokens else None}
        metrics = [r["metrics"] for r in ok if "metrics" in r]
        if metrics:
            verified = sum(m["verified_steps"] for m in metrics)
            row["accepted_steps"] = sum(m["accepted_steps"] for m in metrics)
            row["verified_steps"] = verified
            forwards = sum(m.get("target_step_forwards", 0) for m in metrics)
            written = sum(m.get("target_tokens", 0) for m in metrics if m.get("target_step_forwards", 0))
            row["tokens_per_target_forward"] = written / forwards if forwards else None
            # vLLM's mean accepted length: tokens per checking forward, the corrected or bonus token included
            proposals = sum(m.get("target_proposals", 0) for m in metrics)
            accepted = sum(m.get("target_accepted_tokens", 0) for m in metrics)
            proposed = sum(m.get("target_proposed_tokens", 0) for m in metrics)
            row["mean_accepted_length"] = 1.0 + accepted / proposals if proposals else None
            row["token_acceptance_rate"] = accepted / proposed if proposed else None
        if reference is not None and ok:
            row["same_text"] = sum(r["text"] == ref_text.get(r["key"]) for r in ok)
            row["compared"] = len(ok)
        errors = [r["error"] for r in runs if not r["ok"]]
        if errors:
            row["error"] = errors[0]
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    for row in rows:
        for label, base in (("x_generate", "generate"), ("x_target", "target")):
            ref = by_name.get(base, {}).get("s_per_token")
            row[label] = ref / row["s_per_token"] if ref and row["s_per_token"] else None
    return rows


def format_table(rows: list[dict], reference: Optional[str]) -> str:
    def num(v, fmt, suffix=""):
        width = int(re.match(r"\d+", fmt).group())
        return ("-" if v is None else format(v, fmt) + suffix).rjust(width + len(suffix))

    w = max([22] + [len(r["variant"]) for r in rows])
    head = (f"{'variant':{w}s} {'ms/tok':>8s} {'x generate':>10s} {'x target':>9s} {'accepted':>9s} "
            f"{'tok/fwd':>8s} {'acc len':>8s} {'same text':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["tokens"] == 0:
            lines.append(f"{r['variant']:{w}s} failed: {r.get('error', 'no tokens')}")
            continue
        acc = f"{r['accepted_steps']}/{r['verified_steps']}" if r.get("verified_steps") else "-"
        same = f"{r['same_text']}/{r['compared']}" if "same_text" in r else "-"
        lines.append(f"{r['variant']:{w}s} {num(r['s_per_token'] and r['s_per_token'] * 1e3, '8.1f')} "
                     f"{num(r['x_generate'], '9.3f', 'x')} {num(r['x_target'], '8.3f', 'x')} {acc:>9s} "
                     f"{num(r.get('tokens_per_target_forward'), '8.2f')} "
                     f"{num(r.get('mean_accepted_length'), '8.2f')} {same:>10s}"
                     + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    if reference:
        lines.append(f"same text: equal to the {reference!r} text of the same problem")
    return "\n".join(lines)


def random_pair(tokenizer: str, sizes: str, dtype: str, device: str):
    """A reasoner over random-weight Llamas (``sizes``: ``"H,L,I:H,L,I"``, target then draft) sharing the
    tokenizer in folder ``tokenizer``."""
    from transformers import AutoTokenizer

    from dreamr.reasoner import SpeculativeReasoner
    from dreamr.testing import random_llama

    try:
        shapes = [tuple(int(x) for x in part.split(",")) for part in sizes.split(":")]
    except ValueError:
        shapes = []
    if len(shapes) != 2 or any(len(s) != 3 for s in shapes):
        raise SystemExit(f"--random-sizes: expected H,L,I:H,L,I (e.g. {RANDOM_SIZES}), got {sizes!r}")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    target, draft = (random_llama(tok, *shape, getattr(torch, dtype), device, seed=i) for i, shape in enumerate(shapes))
    return SpeculativeReasoner(target, draft, target_tokenizer=tok, draft_tokenizer=tok)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10, help="GSM8K dev problems (default 10)")
    p.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-step-tokens", type=int, default=None,
                   help="the step cap of dreamr's modes (default: dreamr.eval.EvalSettings')")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a ReasonerConfig override for every dreamr run (repeatable)")
    p.add_argument("--random-models", metavar="TOKENIZER",
                   help="random-weight target and draft with this tokenizer folder instead of the default pair")
    p.add_argument("--random-sizes", default=RANDOM_SIZES, metavar="H,L,I:H,L,I",
                   help=f"hidden, layers, intermediate of the random target and draft (default {RANDOM_SIZES})")
    p.add_argument("--out", metavar="PATH", help="write the table's rows and every run as JSON")
    p.add_argument("--table", metavar="PATH", help="print the table again from the runs of an --out JSON, run nothing")
    args = p.parse_args(argv)
    if args.table:
        report = json.loads(Path(args.table).read_text())
        names = report["settings"]["variants"]
        print(format_table(summarize(report["records"], names), reference_of(names)))
        return report
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    try:
        extra = parse_settings(args.settings)
        variants, skipped = build_variants(args.variants)
    except ValueError as exc:
        p.error(str(exc))
    for line in skipped:
        print(line, flush=True)
    if not variants:
        p.error("no variant left to run")
    torch.set_num_threads(args.threads)

    from dreamr.eval import EvalSettings, environment, interleaved, models_info, select_problems
    from dreamr.reasoner import SpeculativeReasoner

    fields = dict(limit=args.n, offset=args.offset, max_new_tokens=args.max_new_tokens, answer_marker=None,
                  temperature=0.0, extra=extra)
    if args.max_step_tokens is not None:
        fields["max_step_tokens"] = args.max_step_tokens
    settings = EvalSettings(**fields)
    problems = select_problems(args.data, settings)
    if args.random_models:
        reasoner = random_pair(args.random_models, args.random_sizes, args.dtype, args.device)
    else:
        reasoner = SpeculativeReasoner.from_pretrained(dtype=args.dtype, device=args.device, progress=False)
    warm_up(reasoner, problems[0], variants, settings)
    records = []
    for problem, v, _ in interleaved(problems, variants):
        rec = run_variant(reasoner, problem, v, settings)
        records.append(rec)
        status = (f"{rec['wall_s']:7.2f} s {rec['tokens']:4d} tok" if rec["ok"]
                  else f"failed: {rec['error']}")
        print(f"  problem {problem.index} {v.name:22s} {status}", flush=True)
    names = [v.name for v in variants]
    rows = summarize(records, names)
    reference = reference_of(names)
    print(f"\n{len(problems)} GSM8K dev problem(s), {args.dtype}, {torch.get_num_threads()} thread(s), greedy, "
          f"{args.max_new_tokens} new tokens, answer marker off, step cap {settings.max_step_tokens}"
          + (f", {extra}" if extra else ""))
    print(format_table(rows, reference))
    report = {"settings": dict(settings.to_dict(), dtype=args.dtype, device=args.device,
                               threads=torch.get_num_threads(), prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS,
                               variants=names, skipped=skipped),
              "environment": environment(reasoner), "models": models_info(reasoner), "rows": rows,
              "records": records}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
