"""FPSR against the sequential speculative mode and the target alone: wall time, side by side.

    python bench/e2e_fpsr.py real  --problems 10 --max-new-tokens 64 --batched \
        --fpsr-variants target_launch=eager                              # the default pair on GSM8K dev
    python bench/e2e_fpsr.py cheap --problems 2 --max-new-tokens 32 --max-step-tokens 8 \
        --fpsr-variants target_launch=eager                              # ~1B random target, SmolLM2 draft
    python bench/e2e_fpsr.py real --quick                                # one problem, a few tokens

``real``: the default pair (gemma-3-270m judges, SmolLM2-135M-Instruct drafts) on GSM8K dev problems.
For every problem the modes run one after another (their order rotates from problem to problem), so
that load changes on a shared machine hit all modes alike. Reported per mode: wall time, committed
tokens, tokens/s, the speedup over "target" (target time / mode time) and over "speculative", step
acceptance, and the target's forward passes per committed token (FPSR: batched passes, each serving
every open branch). Beside them the ideal bound 1 / (c + 1/L): c is the measured per-token cost of the
draft relative to the target (one decode step each on the same prompt), L the mean committed step
length (tokens) of the speculative run.

``cheap``: a cheap draft. The target is a random-weight Llama of about 1B parameters built from a
config with the draft's tokenizer (SmolLM2's), the draft the real SmolLM2-135M-Instruct, and a
benchmark-only verifier that accepts each verified step with a fixed probability ``a`` (seeded draws;
the target's verdict forward pass still runs, only its score is replaced). For each ``a`` the speedup
of "speculative" and "fpsr" over the target alone is reported beside the bound 1 / (c + 1/L + (1 - a))
(draft cost L*c per step, one verification pass ~ one target token, a target-written step for each
rejection; a = 1 gives the paper's 1 / (c + 1/L)). Random weights seldom write a blank line, so steps
mostly end at the step cap: L is about ``--max-step-tokens``.

Measured on the 2-core development machine (shared with other jobs, ~1 free core; OMP_NUM_THREADS=1:
with 2 intra-op threads on the loaded machine a 2-row fp32 matmul took 24 ms against 0.1 ms for one
row), bf16, alpha 0.7, W 4, 2026-11-28:

    real pair, 10 problems x 64 tokens, one request at a time (interleaved per problem):
        target 107.3 s (1.00x), speculative 93.8 s (1.14x), fpsr on-reject 91.0 s (1.18x),
        fpsr eager 190.3 s (0.56x); acceptance 1.00 (31/31 steps); bound 1/(0.78 + 1/20.6) = 1.20;
        target passes per committed token: 1.00 / 0.048 / 0.048 / 0.99; fpsr text == speculative 10/10
    the same 10 problems as one batch (generate_batch): target 135.1 s, speculative 130.7 s,
        fpsr on-reject 23.0 s (5.9x the target), fpsr eager 56.3 s (2.4x); texts equal to the
        speculative mode's 4/10 (bf16 rows batched together differ in the last bits)
    cheap draft (1.00B random target 504 ms/token, SmolLM2 148 ms/token, c = 0.29), 2 problems x 32
    tokens, step cap 8 (L = 8); speedup over the target alone (realized acceptance):
        a = 0.3 (0.25): speculative 0.82, fpsr on-reject 0.99, fpsr eager 0.70; bound 0.89
        a = 0.5 (0.38): 1.09, 1.17, 0.81; bound 1.09
        a = 0.7 (0.62): 1.43, 1.27, 0.81; bound 1.39
        a = 0.9 (1.00): 2.40, 2.39, 0.90; bound 1.93 (2.39 at a = 1)
    after the move to in-place ragged storage (dreamr/engines/ragged.py), a quieter machine, same settings:
        target 62.3 s, speculative 45.0 s (1.38x), fpsr 43.0 s (1.45x; 1.05x speculative), fpsr with
        the bucketed decode path (cuda_graphs=on, eager on a CPU) 44.2 s (1.41x); fpsr text ==
        speculative 10/10; bound 1/(0.67 + 1/20.6) = 1.39
    with token-level speculation and the adaptive policies (proposal gate, adaptive drafting carried from
    request to request), bf16, target 227 ms/token, c = 0.25, 2026-12-04: cheap draft, 8 problems x 32
    tokens, a = 0.5 (realized 0.44): speculative 1.00 (18 of 32 steps drafted), fpsr 0.97; bound 1.14
    with adaptive drafting and the proposal gate in fpsr too (its scheduler's set_drafting), same settings,
    2026-12-04: speculative 1.00, fpsr 0.96, fpsr[target_launch=on_reject,overlap=1] 0.98; bound 1.14.
    The bound prices a verification at one target token; measured (speculation/cost.py) this target's
    verification of an 8-token step with its 16-token verdict prompt costs 2.3 decode forwards on one CPU
    thread (compute-bound), so at a = 0.5 drafting costs (8 * 0.25 + 2.3 + 0.5 * 8) / 8 = 1.04 forwards
    per token against 1.00 alone, and the policies write mostly alone. With every step drafted
    (draft_policy="always"), 4 problems, realized acceptance 0.35: target 252 ms/token, speculative 404
    (this includes its first request's timing of the forwards), fpsr on-reject 282, fpsr on-reject with
    overlap 277: slower than the target alone at that acceptance, as the policy predicts.

Problems, prompts, the interleaved runs and the per-mode sums come from :mod:`dreamr.eval` (each run is
one of its records), the random target and the fixed-acceptance verdicts from :mod:`dreamr.testing`.
Both print a table and can write JSON (``--json``). Threads: ``torch.get_num_threads()`` (set
OMP_NUM_THREADS). Nothing here runs in the tests; they only need the modules to import.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamr.eval import (EvalSettings, Variant, ideal_bound, interleaved, prompt_for, run_one, select_problems,
                         summarize as eval_summarize)
from dreamr.prompts import ANSWER_MARKER
from dreamr.testing import FixedAcceptance, random_llama


@dataclass(frozen=True)
class EngineVariant(Variant):
    """A mode run with the FPSR engine's attributes ``knobs`` set first, reported under ``label``."""

    label: str = ""
    knobs: tuple = ()  # (attribute, value) pairs of the FPSR engine

    @property
    def name(self) -> str:
        return self.label or Variant.name.fget(self)


@torch.no_grad()
def per_token_cost(lm, prompt_ids: list[int], tokens: int = 16, repeats: int = 2) -> float:
    """Seconds per decode step of ``lm`` (batch 1, greedy) after ``prompt_ids``: the best of ``repeats``."""
    from dreamr.cache import CachedSequence

    best = float("inf")
    for _ in range(repeats):
        seq = CachedSequence(lm.model, prompt_ids)
        seq.next_logits()
        t0 = time.perf_counter()
        for _ in range(tokens):
            seq.extend([int(torch.argmax(seq.next_logits()))])
        best = min(best, (time.perf_counter() - t0) / tokens)
    return best


@torch.no_grad()
def batch_cost(lm, prompt_ids: list[int], rows: int, tokens: int = 8) -> float:
    """Seconds per decode step of ``rows`` identical rows decoded together (a plain batched cache)."""
    from transformers import DynamicCache

    from dreamr.cache import cache_kwarg

    ids = torch.tensor([prompt_ids] * rows, device=lm.device)
    cache = DynamicCache()
    kw = cache_kwarg(lm.model)
    out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = lm.model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / tokens


def variants(args) -> list[EngineVariant]:
    """Every configuration to time: the target alone, the sequential speculative mode at ``--alpha``, FPSR
    with the engine's defaults (row "fpsr") and each ``--fpsr-variants`` entry (row "fpsr[...]")."""
    alpha = args.alpha if args.which == "real" else CHEAP_ALPHA
    out = [EngineVariant("target", label="target"), EngineVariant("speculative", alpha, label="speculative")]
    base = dict(target_launch="auto", overlap=False, verify_batch=1, draft_tokens_per_tick=1, cuda_graphs="auto",
                draft_stream="auto")
    out.append(EngineVariant("fpsr", alpha, label="fpsr", knobs=tuple(base.items())))
    for extra in args.fpsr_variants:
        knobs = dict(base)
        for item in extra.split(","):
            k, v = item.split("=")
            if k in ("target_launch", "cuda_graphs", "draft_stream"):
                knobs[k] = v
            else:
                knobs[k] = v.lower() in ("1", "true") if k == "overlap" else int(v)
        out.append(EngineVariant("fpsr", alpha, label=f"fpsr[{extra}]", knobs=tuple(knobs.items())))
    return out


def run_modes(reasoner, problems, settings: EvalSettings, configs, before=None) -> list[dict]:
    """Every configuration on every problem, interleaved per problem (the order rotates), through
    :func:`dreamr.eval.run_one`; returns the records, FPSR's with the engine's stats of the run
    (``fpsr_stats``). A run that raises stops the benchmark."""
    engine = reasoner.engine("fpsr")
    if any(v.mode == "speculative" for v in configs):
        # the adaptive policies time the models' forwards once, at the first request: not in a timed run
        for role in ("target", "draft"):
            reasoner.engine("speculative").forward_cost(role, reasoner.config.num_speculative_tokens)
    records = []
    for problem, v, order in interleaved(problems, configs):
        for name, value in v.knobs:
            setattr(engine, name, value)
        if before is not None:
            before(v.name, problem.index)
        rec = run_one(reasoner, problem, v, settings, order)
        if not rec["ok"]:
            raise RuntimeError(f"{v.name} on problem {problem.key}: {rec['error']}\n{rec['traceback']}")
        if v.mode == "fpsr":
            rec["fpsr_stats"] = dict(engine.last_stats)
        records.append(rec)
        m = rec["metrics"]
        print(f"  problem {problem.index} {v.name:28s} {rec['wall_s']:7.2f} s  {m['committed_tokens']:4d} tok  "
              f"steps {m['num_steps']:3d}  accepted {m['accepted_steps']}/{m['verified_steps']}", flush=True)
    return records


def run_batched(reasoner, problems, settings: EvalSettings, configs) -> dict:
    """Each configuration on all problems in one ``generate_batch`` call (sequential modes run them one
    after another; FPSR interleaves them, batching every request's target and draft work)."""
    engine = reasoner.engine("fpsr")
    prompts = [prompt_for(p, settings) for p in problems]
    out = {}
    for v in configs:
        for name, value in v.knobs:
            setattr(engine, name, value)
        t0 = time.perf_counter()
        rs = reasoner.generate_batch(prompts, **v.overrides(), **settings.generation())
        wall = time.perf_counter() - t0
        tokens = sum(r.metrics.committed_tokens for r in rs)
        passes = (engine.last_stats["chain_forwards"] + engine.last_stats["branch_forwards"] if v.mode == "fpsr"
                  else sum(r.metrics.target_forward_passes for r in rs))
        out[v.name] = dict(wall_s=wall, tokens=tokens, tok_per_s=tokens / wall, target_passes_per_token=passes / tokens,
                           texts=[r.text for r in rs])
        print(f"  batch of {len(prompts)} {v.name:28s} {wall:7.2f} s  {tokens} tok  {tokens / wall:.2f} tok/s  "
              f"target passes/token {passes / tokens:.3f}", flush=True)
    base = out["target"]["wall_s"] / out["target"]["tokens"]
    spec = out["speculative"]["wall_s"] / out["speculative"]["tokens"]
    for label in out:
        own = out[label]["wall_s"] / out[label]["tokens"]
        out[label]["speedup_vs_target"] = base / own
        out[label]["speedup_vs_speculative"] = spec / own
    for label in out:
        if label.startswith("fpsr"):
            same = sum(a == b for a, b in zip(out[label]["texts"], out["speculative"]["texts"]))
            out[label]["same_text_as_speculative"] = f"{same}/{len(prompts)}"
    for v in out.values():
        del v["texts"]
    return out


def summarize(records: list[dict], configs) -> dict:
    """Per configuration: the sums and ratios of :func:`dreamr.eval.summarize`, with the speedups per
    committed token (modes may commit slightly different amounts) over "target" and "speculative", and
    for FPSR the scheduler's counters; FPSR's target passes are its batched forwards (chain + branch),
    each serving every open branch."""
    rows = eval_summarize(records, configs)["variants"]
    out = {}
    for v in configs:
        r = rows[v.name]
        recs = [x for x in records if x["variant"] == v.name]
        stats = [x["fpsr_stats"] for x in recs if "fpsr_stats" in x]
        tokens = r["committed_tokens"]
        if stats:
            t_passes = sum(s["chain_forwards"] + s["branch_forwards"] for s in stats)
        else:
            t_passes = r["target_forward_passes"]
        out[v.name] = dict(wall_s=r["wall_time_s"], tokens=tokens, tok_per_s=r["tokens_per_second"] or 0.0,
                           steps=r["num_steps"], acceptance=r["step_acceptance_rate"],
                           target_passes_per_token=t_passes / tokens if tokens else None,
                           draft_tokens=r["draft_tokens"], target_tokens=r["target_tokens"],
                           mean_step_tokens=r["mean_step_tokens"])
        if stats:
            out[v.name]["scheduler"] = {k: sum(s[k] for s in stats) for k in stats[0]}
            spec = {x["key"]: x["text"] for x in records if x["variant"] == "speculative"}
            same = sum(x["text"] == spec.get(x["key"]) for x in recs)
            out[v.name]["same_text_as_speculative"] = f"{same}/{len(recs)}"
    base = out["target"]["wall_s"] / max(out["target"]["tokens"], 1)
    spec = out["speculative"]["wall_s"] / max(out["speculative"]["tokens"], 1)
    for label in list(out):
        own = out[label]["wall_s"] / max(out[label]["tokens"], 1)
        out[label]["speedup_vs_target"] = base / own if own else None
        out[label]["speedup_vs_speculative"] = spec / own if own else None
    return out


def print_table(summary: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'mode':28s} {'wall s':>8s} {'tokens':>7s} {'tok/s':>7s} {'x target':>9s} {'x spec':>7s} "
          f"{'accept':>7s} {'tgt fwd/tok':>11s}")
    for mode in [k for k in summary if isinstance(summary[k], dict) and "wall_s" in summary[k]]:
        m = summary[mode]
        acc = "-" if m["acceptance"] is None else f"{m['acceptance']:.2f}"
        print(f"{mode:28s} {m['wall_s']:8.2f} {m['tokens']:7d} {m['tok_per_s']:7.2f} {m['speedup_vs_target']:9.3f} "
              f"{m['speedup_vs_speculative']:7.3f} {acc:>7s} {m['target_passes_per_token']:11.3f}")
    for mode in [k for k in summary if isinstance(summary[k], dict) and "scheduler" in summary[k]]:
        st = summary[mode]["scheduler"]
        graphs = {k: v for k, v in st.items() if "graph" in k or "bucketed" in k or "fallbacks" in k}
        print(f"  {mode}: draft stream {'on' if st.get('draft_stream') else 'off'}; "
              + (", ".join(f"{k} {v}" for k, v in graphs.items()) if graphs else "CUDA graphs off"))


# -- the real default pair --------------------------------------------------------------------------

def _settings(args, max_new: int, answer_marker) -> EvalSettings:
    """The evaluation settings of every run: the benchmark's token budgets, FPSR's window W."""
    return EvalSettings(limit=1 if args.quick else args.problems, max_new_tokens=max_new,
                        max_step_tokens=args.max_step_tokens, answer_marker=answer_marker,
                        extra={"window": args.window})


def bench_real(args) -> dict:
    from dreamr.reasoner import SpeculativeReasoner

    max_new = 16 if args.quick else args.max_new_tokens
    settings = _settings(args, max_new, ANSWER_MARKER)
    problems = select_problems(args.data, settings)
    reasoner = SpeculativeReasoner.from_pretrained(dtype=args.dtype, device=args.device, progress=False)
    prompt = prompt_for(problems[0], settings)
    t_ids = reasoner.target.encode_prompt(prompt)
    d_ids = reasoner.draft.encode_prompt(prompt)
    ct, cd = per_token_cost(reasoner.target, t_ids), per_token_cost(reasoner.draft, d_ids)
    b1, b4 = batch_cost(reasoner.target, t_ids, 1), batch_cost(reasoner.target, t_ids, args.window)
    print(f"per-token decode: target {ct * 1e3:.1f} ms, draft {cd * 1e3:.1f} ms, c = {cd / ct:.2f}; "
          f"target batch of {args.window} rows costs {b4 / b1:.2f}x one row", flush=True)
    configs = variants(args)
    records = run_modes(reasoner, problems, settings, configs)
    summary = summarize(records, configs)
    if args.batched:
        summary["batched"] = run_batched(reasoner, problems, settings, configs)
    c = cd / ct
    L = summary["speculative"]["mean_step_tokens"]
    summary["bound"] = dict(c=c, L=L, ideal_speedup=ideal_bound(c, L),
                            target_ms_per_token=ct * 1e3, draft_ms_per_token=cd * 1e3,
                            target_batch_cost_ratio=b4 / b1)
    summary["settings"] = dict(settings.generation(), alpha=args.alpha, problems=len(problems), window=args.window,
                               dtype=args.dtype, threads=torch.get_num_threads())
    print_table(summary, f"real pair, {len(problems)} GSM8K dev problem(s), {args.dtype}, "
                         f"threads {torch.get_num_threads()}, alpha {args.alpha}, W {args.window}")
    b = summary["bound"]
    print(f"ideal bound 1/(c + 1/L) = 1/({b['c']:.2f} + 1/{b['L']:.1f}) = {b['ideal_speedup']:.3f}; "
          f"fpsr text == speculative text: {summary['fpsr']['same_text_as_speculative']}")
    return summary


# -- a cheap draft: random ~1B target, real SmolLM2 draft, fixed acceptance probability -----------------

CHEAP_ALPHA = 0.5  # the verifying modes' alpha in "cheap"; FixedAcceptance decides regardless of it


def bench_cheap(args) -> dict:
    from dreamr import models
    from dreamr.reasoner import SpeculativeReasoner

    dtype = getattr(torch, args.dtype)
    if args.draft_hidden and args.tokenizer:  # both models random: only SmolLM2's tokenizer is needed
        from transformers import AutoTokenizer

        tok, draft_model = AutoTokenizer.from_pretrained(args.tokenizer), None
    else:
        draft = models.load(models.DEFAULT_DRAFT, dtype=dtype, device=args.device, progress=False)
        tok, draft_model = draft.tokenizer, draft.model
    target = random_llama(tok, args.hidden, args.layers, args.intermediate, dtype, args.device)
    if args.draft_hidden:  # a random draft of a chosen size instead of the real SmolLM2
        draft_model = random_llama(tok, args.draft_hidden, args.draft_layers, args.draft_intermediate,
                                   dtype, args.device, seed=1)
    params = sum(p.numel() for p in target.parameters())
    reasoner = SpeculativeReasoner(target, draft_model, target_tokenizer=tok, draft_tokenizer=tok)
    max_new = 16 if args.quick else args.max_new_tokens
    settings = _settings(args, max_new, None)
    problems = select_problems(args.data, settings)
    ids = reasoner.target.encode_prompt(prompt_for(problems[0], settings))
    ct, cd = per_token_cost(reasoner.target, ids), per_token_cost(reasoner.draft, ids)
    c = cd / ct
    draft_params = sum(p.numel() for p in draft_model.parameters())
    print(f"random target {params / 1e9:.2f}B params: {ct * 1e3:.1f} ms/token; draft ({draft_params / 1e9:.2f}B) "
          f"{cd * 1e3:.1f} ms/token; c = {c:.3f}; device {args.device}", flush=True)
    verifier = reasoner.verifier_for(reasoner.config)
    out = {"params": params, "draft_params": draft_params, "c": c, "target_ms_per_token": ct * 1e3,
           "draft_ms_per_token": cd * 1e3, "by_a": {},
           "settings": dict(settings.generation(), alpha=CHEAP_ALPHA, problems=len(problems), window=args.window,
                            dtype=args.dtype, threads=torch.get_num_threads())}
    target_runs = None
    configs = variants(args)
    for a in args.accept:
        with FixedAcceptance(verifier, a) as judge:
            def before(label, i, judge=judge):
                judge.reseed(1000 * i + 7)  # each mode sees the same draws on a problem
            # the target alone does not depend on a: it runs in the first sweep only
            sweep = configs if target_runs is None else [v for v in configs if v.mode != "target"]
            records = run_modes(reasoner, problems, settings, sweep, before=before)
        if target_runs is None:
            target_runs = [r for r in records if r["variant"] == "target"]
        else:
            records += target_runs
        s = summarize(records, configs)
        L = s["speculative"]["mean_step_tokens"]
        s["bound"] = dict(L=L, speedup_bound=1.0 / (c + 1.0 / L + (1.0 - a)))
        out["by_a"][a] = s
        print_table(s, f"cheap draft, a = {a}: bound 1/(c + 1/L + 1 - a) = {s['bound']['speedup_bound']:.3f} "
                       f"(L = {L:.1f})")
    labels = [v.name for v in configs if v.mode != "target"]
    print("\n a    " + "  ".join(f"{x:>14s}" for x in labels) + "   bound   (speedup over the target alone)")
    for a, s in out["by_a"].items():
        print(f" {a:.1f}  " + "  ".join(f"{s[x]['speedup_vs_target']:14.3f}" for x in labels)
              + f"  {s['bound']['speedup_bound']:6.3f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["real", "cheap"])
    p.add_argument("--data", default="/work/shared/data/gsm8k/test_dev.jsonl")
    p.add_argument("--problems", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-step-tokens", type=int, default=24)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--accept", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--draft-hidden", type=int, default=0,
                   help="cheap: a random draft of this width instead of the real SmolLM2 (e.g. 1024)")
    p.add_argument("--draft-layers", type=int, default=24)
    p.add_argument("--draft-intermediate", type=int, default=2816)
    p.add_argument("--tokenizer", default=None,
                   help="cheap with --draft-hidden: a tokenizer folder (SmolLM2's) instead of loading the real draft")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fpsr-variants", nargs="*", default=[],
                   help="extra FPSR settings to time beside the engine's defaults (row 'fpsr'), e.g. "
                        "target_launch=eager overlap=1,verify_batch=2")
    p.add_argument("--batched", action="store_true", help="real: also run all problems as one batch per mode")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    summary = bench_real(args) if args.which == "real" else bench_cheap(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
