"""Throughput of dreamr over vLLM servers with many requests at once, against the target server alone.

    python bench/vllm_throughput.py                                   # starts the two CPU servers itself
    python bench/vllm_throughput.py --target-url http://127.0.0.1:8101 --draft-url http://127.0.0.1:8102
    python bench/vllm_throughput.py --requests 16 --variants vllm target speculative@0.8 fpsr@0.8 --repeats 2

Every variant sends ``--requests`` requests at once (GSM8K dev problems, cycled where there are fewer; chat
prompts; greedy; ``--max-new-tokens`` each) and is timed from the first request to the last answer. Variants:

    vllm              the target server alone: one plain /v1/completions per request, max_tokens = the budget
                      (what a user of vLLM would otherwise run; no steps, no verification)
    target            dreamr mode "target" over the server (the same text, step by step)
    speculative@A     dreamr mode "speculative" at alpha A (draft, verdict, fallback, one after another)
    fpsr@A            dreamr mode "fpsr" at alpha A (drafts, verdicts and the fallback in flight at once)
    fpsr@A:on_reject  the same with the target's step started only after a rejection

The variants run one after another and their order rotates from repeat to repeat, so that load changes hit
them alike; compare only ratios measured in one run. Columns: wall seconds of the batch, tokens committed
(each step in its writer's tokens; ``vllm``: completion tokens), tokens/s, "x vllm" (the vllm variant's wall
time over this one's: > 1 is faster), step acceptance, requests sent to the target / draft server, requests
aborted (fpsr's work past a rejection), and the target server's prefix-cache hit rate over the variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamr.backends.vllm import ServerClient  # noqa: E402
from dreamr.eval.data import load_problems  # noqa: E402
from dreamr.prompts import chat_messages  # noqa: E402
from dreamr.remote import RemoteReasoner  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-url"), p.add_argument("--draft-url")
    p.add_argument("--target", default="gemma-3-270m", help="model to serve when no --target-url is given")
    p.add_argument("--draft", default="smollm2-135m-instruct", help="model to serve when no --draft-url is given")
    p.add_argument("--dtype", default="bfloat16", help="dtype of servers this script starts")
    p.add_argument("--dataset", default=str(ROOT / "examples" / "gsm8k_dev_sample.jsonl"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=["vllm", "target", "speculative@0.8", "fpsr@0.8"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-step-tokens", type=int, default=48)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight per server")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", help="write the settings and every row as JSON here")
    return p.parse_args(argv)


def _prefix_hit_rate(before: dict, after: dict) -> float | None:
    q = after.get("vllm:prefix_cache_queries_total", 0.0) - before.get("vllm:prefix_cache_queries_total", 0.0)
    h = after.get("vllm:prefix_cache_hits_total", 0.0) - before.get("vllm:prefix_cache_hits_total", 0.0)
    return h / q if q > 0 else None


async def run_variant(reasoner: RemoteReasoner, variant: str, prompts: list, args) -> dict:
    before = (await reasoner.server_metrics())["target"]
    start = time.perf_counter()
    if variant == "vllm":
        client: ServerClient = reasoner.target.client
        ids = [reasoner.target.encode_prompt(p) for p in prompts]
        outs = await asyncio.gather(*(client.complete(i, max_tokens=args.max_new_tokens) for i in ids))
        wall = time.perf_counter() - start
        row = dict(tokens=sum(len(o.token_ids) for o in outs), target_requests=len(outs), draft_requests=0,
                   cancelled=0, acceptance=None, texts=[reasoner.target.tokenizer.decode(o.token_ids) for o in outs])
    else:
        spec, _, launch = variant.partition(":")
        mode, _, alpha = spec.partition("@")
        reasoner.fpsr_target_launch = launch or "eager"
        settings = dict(mode=mode, max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens,
                        window=args.window)
        if alpha:
            settings["alpha"] = float(alpha)
        results = await reasoner.agenerate_batch(prompts, **settings)
        wall = time.perf_counter() - start
        verified = sum(r.metrics.verified_steps for r in results)
        row = dict(tokens=sum(r.metrics.committed_tokens for r in results),
                   target_requests=sum(r.metrics.target_requests for r in results),
                   draft_requests=sum(r.metrics.draft_requests for r in results),
                   cancelled=sum(r.metrics.cancelled_requests for r in results),
                   acceptance=sum(r.metrics.accepted_steps for r in results) / verified if verified else None,
                   texts=[r.text for r in results])
    after = (await reasoner.server_metrics())["target"]
    return dict(variant=variant, wall_s=wall, prefix_hit_rate=_prefix_hit_rate(before, after), **row)


def table(rows: list[dict]) -> str:
    base = {r["repeat"]: r["wall_s"] for r in rows if r["variant"] == "vllm"}
    head = ("| variant | wall s | tokens | tok/s | x vllm | accepted | target req | draft req | aborted | "
            "prefix hits |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ratio = base.get(r["repeat"], float("nan")) / r["wall_s"]
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        hits = "" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.2f}"
        lines.append(f"| {r['variant']} | {r['wall_s']:.1f} | {r['tokens']} | {r['tokens'] / r['wall_s']:.1f} | "
                     f"{ratio:.2f}x | {acc} | {r['target_requests']} | {r['draft_requests']} | {r['cancelled']} | {hits} |")
    return "\n".join(lines)


async def main_async(args, target_url: str, draft_url: str) -> list[dict]:
    problems = load_problems(args.dataset)
    prompts = [chat_messages(problems[i % len(problems)].question) for i in range(args.requests)]
    reasoner = RemoteReasoner(target_url, draft_url, max_concurrency=args.max_concurrency)
    rows = []
    for repeat in range(args.repeats):
        order = args.variants[repeat % len(args.variants):] + args.variants[:repeat % len(args.variants)]
        for variant in order:
            row = await run_variant(reasoner, variant, prompts, args)
            row["repeat"] = repeat
            rows.append(row)
            print(f"repeat {repeat} {variant}: {row['wall_s']:.1f} s, {row['tokens']} tokens", flush=True)
    await reasoner.aclose()
    rows.sort(key=lambda r: (r["repeat"], args.variants.index(r["variant"])))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    servers = ()
    if args.target_url is None or args.draft_url is None:
        from dreamr.backends.vllm import launch

        servers = launch.start_pair(args.target, args.draft, dtype=args.dtype)
        args.target_url, args.draft_url = servers[0].url, servers[1].url
    try:
        rows = asyncio.run(main_async(args, args.target_url, args.draft_url))
    finally:
        for s in servers:
            s.stop()
    print(f"\n{args.requests} requests at once, {args.max_new_tokens} new tokens each, step cap {args.max_step_tokens}, "
          f"window {args.window}\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
