"""End-to-end latency per reasoning step, broken down by phase, for each mode.

    python bench/e2e_latency.py                          # default pair, 2 GSM8K problems, every mode
    python bench/e2e_latency.py --problems 3 --json e2e.json
    python bench/latency.py                              # the op microbenchmarks, then this section

Phases (seconds summed over a step, then averaged over the steps of the mode):

    drafting      the draft model's forward calls (its decoding, and catching up on the target's steps)
    verification  the target's CPN verdict passes (base-model forward calls outside a full-model call)
    target        the target's full-model forward calls: the fallback steps it writes after a rejection
                  (speculative modes) or every step (target mode); its prefill is counted here too
    rollback      dreamr.cache.rollback (KV-cache rollback of rejected or verdict entries)
    scheduler     the engine's own scheduler time (Metrics.scheduler_time_s: FPSR's poll and actions);
                  0 where the engine reports none
    other         the rest of the step's wall time: sampling, tokenization, step bookkeeping

The phases are measured from outside the engines, through the public surface only: forward hooks on
the two models and a wrapper around ``dreamr.cache.rollback``; the step wall time is the time between two
steps of ``SpeculativeReasoner.stream``. On CUDA each phase boundary synchronizes the device (which
itself costs a little time). Where an engine runs phases concurrently (FPSR: draft on its own stream,
batched fallback), the phase times overlap and "other" can be negative; an engine-side breakdown is then
the right source: where the engine's Metrics carry fields named ``<phase>_time_s``, each row also gives
them per step as ``engine_phase_ms_per_step``. The forward hooks do not see an engine that runs the
models' layers itself (the FPSR engine): for such modes (:data:`ENGINE_TIMED_MODES`) the phase breakdown
is taken from the engine's own phase times instead (``phase_source`` says which: "hooks" or "engine").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

PHASES = ("drafting", "verification", "target", "rollback")
# The engine's Metrics fields behind each phase (and the scheduler, which the hooks cannot see).
ENGINE_PHASES = {"drafting": "draft_time_s", "verification": "verify_time_s", "target": "target_time_s",
                 "rollback": "rollback_time_s", "scheduler": "scheduler_time_s"}
# Modes whose engine runs the models' layers itself (the hooks see nothing): phases from the engine.
ENGINE_TIMED_MODES = ("fpsr",)
DEFAULT_MODES = ("target", "draft", "speculative", "fpsr")
_ROOT = Path(__file__).resolve().parent.parent


class PhaseTimer:
    """Accumulates seconds per phase while active (a context manager); ``take()`` returns and resets them."""

    def __init__(self, reasoner):
        self.reasoner = reasoner
        self.totals = {p: 0.0 for p in PHASES}
        self._stack: list[tuple[str, float]] = []
        self._handles: list = []
        self._saved_rollback = None
        device = getattr(reasoner.target, "device", torch.device("cpu"))
        self._cuda = getattr(device, "type", "cpu") == "cuda"

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, phase: Optional[str]) -> None:
        # Only the outermost phase is timed; nested calls (the base model inside the full model) are not.
        self._stack.append((phase, self._now() if not self._stack and phase else 0.0))

    def _exit(self) -> None:
        if not self._stack:
            return
        phase, start = self._stack.pop()
        if not self._stack and phase:
            self.totals[phase] += self._now() - start

    def _hooks(self, module, phase_if_outermost: str) -> None:
        def pre(mod, args):
            self._enter(phase_if_outermost)

        def post(mod, args, output):
            self._exit()

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def __enter__(self) -> "PhaseTimer":
        import dreamr.cache as cache

        target, draft = self.reasoner.target.model, self.reasoner.draft.model
        self._hooks(target, "target")
        self._hooks(draft, "drafting")
        base = getattr(target, "base_model", None)
        if base is not None and base is not target:
            # The verdict pass calls the target's base model directly: outside any full-model call it is
            # verification; inside a full-model call (target or a weight-sharing draft) it is not counted.
            self._hooks(base, "verification")
        self._saved_rollback = cache.rollback
        saved = self._saved_rollback

        def rollback(*args, **kwargs):
            self._enter("rollback")
            try:
                return saved(*args, **kwargs)
            finally:
                self._exit()

        cache.rollback = rollback
        return self

    def __exit__(self, *exc) -> None:
        import dreamr.cache as cache

        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._saved_rollback is not None:
            cache.rollback = self._saved_rollback
            self._saved_rollback = None
        self._stack.clear()

    def take(self) -> dict:
        out = dict(self.totals)
        self.totals = {p: 0.0 for p in PHASES}
        return out


def bench_end_to_end(reasoner, prompts: Sequence, modes: Sequence[str] = DEFAULT_MODES,
                     *, alpha: float = 0.7, alphas: Optional[Sequence[float]] = None, warmup: bool = True,
                     progress: bool = False, **settings) -> list[dict]:
    """Per-step latency and its phase breakdown for each mode, over ``prompts`` (modes interleaved).

    The baseline modes run once; every other mode once per alpha in ``alphas`` (default ``[alpha]``).
    Returns one row per mode and alpha: ``mode``, ``alpha``, ``steps``, ``tokens``, ``step_ms_mean``,
    ``step_ms_median``, ``ms_per_token``, ``phase_ms_per_step`` (drafting, verification, target, rollback,
    scheduler, other; they sum to ``step_ms_mean``), ``phase_source`` ("hooks", or "engine" for
    :data:`ENGINE_TIMED_MODES`), ``phase_share`` (fractions of the step time), ``engine_phase_ms_per_step``
    (the engine's own ``*_time_s`` per step, or None), ``wall_s`` and ``acceptance``. ``progress``: a tqdm
    bar over the (prompt, mode) runs.
    """
    from dreamr.eval import make_variants
    from dreamr.result import phase_times

    if not prompts:
        raise ValueError("prompts is empty")
    variants = make_variants(list(modes), list(alphas) if alphas is not None else [alpha])
    if warmup:
        for v in variants:
            reasoner.generate(prompts[0], **v.overrides(), **{**settings, "max_new_tokens": 4})
    per_mode = {v: {"step_s": [], "phases": {p: 0.0 for p in PHASES}, "tokens": 0, "wall": 0.0,
                    "accepted": 0, "verified": 0, "engine": {}} for v in variants}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts) * len(variants), desc="e2e latency", unit="run", disable=not progress,
               dynamic_ncols=True)
    with PhaseTimer(reasoner) as timer, bar:
        for prompt in prompts:
            for v in variants:
                bar.set_postfix_str(v.name)
                acc = per_mode[v]
                stream = reasoner.stream(prompt, **v.overrides(), **settings)
                timer.take()
                start = last = time.perf_counter()
                for step in stream:
                    now = time.perf_counter()
                    phases = timer.take()
                    acc["step_s"].append(now - last)
                    for p, s in phases.items():
                        acc["phases"][p] += s
                    acc["tokens"] += step.num_tokens
                    if step.accepted is not None:
                        acc["verified"] += 1
                        acc["accepted"] += bool(step.accepted)
                    last = time.perf_counter()
                    timer.take()  # time spent here, between steps, is not the engine's
                acc["wall"] += time.perf_counter() - start
                # Engine-side phase timings (Metrics fields "<phase>_time_s"), where the engine reports them.
                metrics = getattr(getattr(stream, "result", None), "metrics", None)
                for name, value in (phase_times(vars(metrics)) if metrics is not None else {}).items():
                    acc["engine"][name] = acc["engine"].get(name, 0.0) + value
                bar.update(1)
    rows = []
    for v in variants:
        acc = per_mode[v]
        n = len(acc["step_s"])
        total = sum(acc["step_s"])
        engine = acc["engine"]
        source = "engine" if v.mode in ENGINE_TIMED_MODES and engine else "hooks"
        phases = {p: (engine.get(ENGINE_PHASES[p], 0.0) if source == "engine" else acc["phases"][p]) for p in PHASES}
        phases["scheduler"] = engine.get(ENGINE_PHASES["scheduler"], 0.0)
        phases["other"] = total - sum(phases.values())
        rows.append({
            "variant": v.name,
            "mode": v.mode,
            "alpha": v.alpha,
            "prompts": len(prompts),
            "steps": n,
            "tokens": acc["tokens"],
            "wall_s": acc["wall"],
            "step_ms_mean": 1e3 * total / n if n else None,
            "step_ms_median": 1e3 * statistics.median(acc["step_s"]) if n else None,
            "ms_per_token": 1e3 * total / acc["tokens"] if acc["tokens"] else None,
            "acceptance": acc["accepted"] / acc["verified"] if acc["verified"] else None,
            "phase_ms_per_step": {p: 1e3 * s / n for p, s in phases.items()} if n else {},
            "phase_source": source,
            "phase_share": {p: s / total for p, s in phases.items()} if total > 0 else {},
            # The engine's own per-phase seconds per step, where its Metrics report them (else None).
            "engine_phase_ms_per_step": ({k: 1e3 * v / n for k, v in engine.items()} if engine and n else None),
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows as a table: the measured phases (ms per step; "src" says hooks or engine), then, where an
    engine reports its own phase times, those per step as the "eng ..." columns."""
    engine_cols = any(r.get("engine_phase_ms_per_step") for r in rows)
    cols = ["mode", "steps", "tokens", "step ms", "median", "ms/tok", "accept", "src", "draft ms", "verify ms",
            "target ms", "rollback ms", "sched ms", "other ms"]
    if engine_cols:
        cols += ["eng draft", "eng verify", "eng target", "eng rollbk", "eng sched"]
    lines = [f"{cols[0]:<16}" + "".join(f"{c:>12}" for c in cols[1:])]
    lines.append("-" * len(lines[0]))
    for r in rows:
        f = lambda x, s=".1f": "-" if x is None else format(x, s)  # noqa: E731
        ph = r["phase_ms_per_step"]
        cells = [str(r["steps"]), str(r["tokens"]), f(r["step_ms_mean"]), f(r["step_ms_median"]), f(r["ms_per_token"]),
                 f(r["acceptance"], ".2f"), r.get("phase_source", "hooks"),
                 *(f(ph.get(p)) for p in (*PHASES, "scheduler", "other"))]
        if engine_cols:
            eng = r.get("engine_phase_ms_per_step") or {}
            cells += [f(eng.get(ENGINE_PHASES[p])) for p in (*PHASES, "scheduler")]
        lines.append(f"{r['variant']:<16}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(_ROOT / "examples" / "gsm8k_dev_sample.jsonl"))
    p.add_argument("--problems", type=int, default=2, help="how many problems (first lines of --data)")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES))
    p.add_argument("--alphas", nargs="+", type=float, default=[0.7, 0.9],
                   help="alphas of the verifying modes (0.9 shows the fallback path on the default pair)")
    p.add_argument("--target", default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-step-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="one problem, 32 tokens")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from dreamr.eval import EvalSettings, check_variants, make_variants, prompt_for, select_problems
    from dreamr.reasoner import SpeculativeReasoner

    n, max_new = (1, 32) if args.quick else (args.problems, args.max_new_tokens)
    settings = EvalSettings(modes=tuple(args.modes), alphas=tuple(args.alphas), limit=n, max_new_tokens=max_new,
                            max_step_tokens=args.max_step_tokens)
    try:  # bad modes, alphas or data before loading models
        check_variants(make_variants(settings.modes, settings.alphas), settings)
        problems = select_problems(args.data, settings)
    except ValueError as exc:
        p.error(str(exc))
    prompts = [prompt_for(pr, settings) for pr in problems]
    reasoner = SpeculativeReasoner.from_pretrained(target=args.target, draft=args.draft, dtype=args.dtype,
                                                   device=args.device)
    # the generation settings of dreamr.eval (its answer marker, greedy decoding, seed)
    rows = bench_end_to_end(reasoner, prompts, args.modes, alphas=args.alphas, progress=not args.no_progress,
                            **settings.generation())
    print(f"\nend-to-end per-step latency ({len(prompts)} problem(s), device {args.device}, "
          f"threads {torch.get_num_threads()}; phases in ms per step)")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
