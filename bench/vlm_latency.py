"""Vision-language latency on a tiny random pair: vision encoding per request, and each mode against the target.

No vision-language weights can be had offline here, so the pair is random (the tiny builders of
:mod:`dreamr.testing`, at larger sizes): a Qwen2-VL target (default
hidden 256, 6 layers, a 2-block vision tower) and a small draft (a 1-layer Qwen2-VL with the same
processor, or with ``--draft text`` a text-only Qwen2 beside it), on random images of ``--image-size``
pixels a side (224: 256 patches, 64 image tokens). Every request gets its own image. Reported per mode
(mean over the requests, after one warm-up request):

- ``wall_s``: the request's wall time; ``ratio_vs_target``: the target-only wall time over this mode's
  (> 1 is faster than the target alone);
- ``vision_s``: time inside the vision encoders (forward hooks), ``vision_calls``: their calls per
  request (one per model that sees the image); ``prefix_s``: the image prefix forwards (vision encoder
  plus the prompt's prefill), once per model per request;
- ``acceptance``: the step acceptance rate (random weights: the CPN verdicts mean nothing, so alpha 0
  and 1 bound the cases: every step accepted, every step written by the target).

    OMP_NUM_THREADS=1 python bench/vlm_latency.py --requests 3 --json runs/vlm_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPT = "How many clips did Natalia sell altogether in April and May? Let us think step by step."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="target hidden size")
    p.add_argument("--layers", type=int, default=6, help="target layers")
    p.add_argument("--draft", choices=["vl", "text"], default="vl")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-step-tokens", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["target", "draft", "speculative@0", "speculative@1",
                                                   "fpsr@0", "fpsr@1"],
                   help="variants as dreamr.eval writes them: a mode (verifying modes at alpha 0.7) or MODE@ALPHA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from dreamr.eval import make_variants

    try:  # the variant specs of dreamr.eval, checked before any model is built
        args.variants = make_variants(args.modes, [0.7])
    except ValueError as exc:
        p.error(str(exc))
    return args


class VisionTimer:
    """Time spent in (and calls of) each model's vision encoder, through forward hooks."""

    def __init__(self, modules):
        self.seconds, self.calls, self._t0 = 0.0, 0, {}
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, module, _args):
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, _args, _out):
        self.seconds += time.perf_counter() - self._t0.pop(id(module))
        self.calls += 1

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from dreamr.reasoner import SpeculativeReasoner
    from dreamr.testing import draft_tokenizer, tiny_qwen2
    from dreamr.testing import qwen2_vl, random_image, vision_module

    dtype = torch.float32
    target, processor = qwen2_vl(seed=0, layers=a.layers, hidden=a.hidden, heads=4, vision_hidden=128,
                                 vision_depth=2, max_pixels=a.image_size * a.image_size, dtype=dtype)
    if a.draft == "vl":
        draft, _ = qwen2_vl(seed=1, layers=1, hidden=64, heads=4, vision_hidden=32, vision_depth=1,
                            max_pixels=a.image_size * a.image_size, dtype=dtype)
        d_tok = processor  # the same tokenizer and image placement
    else:
        d_tok = draft_tokenizer()
        draft = tiny_qwen2(d_tok, dtype=dtype)
    r = SpeculativeReasoner(target, draft, target_tokenizer=processor, draft_tokenizer=d_tok,
                            max_new_tokens=a.max_new_tokens, max_step_tokens=a.max_step_tokens)
    vlms = [target] + ([draft] if a.draft == "vl" else [])
    timer = VisionTimer([vision_module(m) for m in vlms])
    n_params = {"target": sum(p.numel() for p in target.parameters()),
                "draft": sum(p.numel() for p in draft.parameters())}
    images = [random_image(100 + i, (a.image_size, a.image_size)) for i in range(a.requests + 1)]
    rows = {}
    for v in a.variants:
        spec, kw = v.name, v.overrides()
        if v.mode == "draft" and a.draft == "text":
            print(f"{spec}: skipped (a text-only draft alone cannot see the images)", file=sys.stderr)
            continue
        r.generate(PROMPT, images=[images[-1]], **kw)  # warm-up
        walls, vis, calls, prefixes, acc, tokens = [], [], [], [], [], []
        for img in images[:a.requests]:
            timer.reset()
            res = r.generate(PROMPT, images=[img], **kw)
            walls.append(res.metrics.wall_time_s)
            vis.append(timer.seconds)
            calls.append(timer.calls)
            prefixes.append(res.metrics.image_prompt_time_s)
            acc.append(res.metrics.step_acceptance_rate)
            tokens.append(res.metrics.committed_tokens)
        rows[spec] = {
            "wall_s": statistics.mean(walls), "vision_s": statistics.mean(vis), "vision_calls": statistics.mean(calls),
            "prefix_s": statistics.mean(prefixes), "committed_tokens": statistics.mean(tokens),
            "acceptance": None if acc[0] is None else statistics.mean(acc),
        }
    base = rows.get("target", {}).get("wall_s")
    for row in rows.values():
        row["ratio_vs_target"] = None if not base else base / row["wall_s"]
        row["vision_share"] = row["vision_s"] / row["wall_s"]
    header = f"{'mode':<16}{'wall_s':>9}{'vs target':>10}{'vision_s':>10}{'calls':>6}{'prefix_s':>10}{'share':>7}{'accept':>8}{'tokens':>7}"
    print(f"target {n_params['target'] / 1e6:.2f}M params ({a.layers} layers, hidden {a.hidden}), "
          f"draft {n_params['draft'] / 1e6:.2f}M ({a.draft}), image {a.image_size}px, {a.requests} requests, "
          f"{a.threads} thread(s)")
    print(header)
    for spec, row in rows.items():
        ratio = "-" if row["ratio_vs_target"] is None else f"{row['ratio_vs_target']:.2f}x"
        accept = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
        print(f"{spec:<16}{row['wall_s']:>9.3f}{ratio:>10}{row['vision_s']:>10.4f}{row['vision_calls']:>6.0f}"
              f"{row['prefix_s']:>10.4f}{row['vision_share']:>7.1%}{accept:>8}{row['committed_tokens']:>7.0f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        args = {k: v for k, v in vars(a).items() if k != "variants"}
        Path(a.json).write_text(json.dumps({"args": args, "params": n_params, "modes": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
