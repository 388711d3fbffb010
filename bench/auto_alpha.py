"""alpha="auto" on the real pair: does the online threshold hold a requested step acceptance rate?

    python bench/auto_alpha.py --problems 20 --target-acceptance 0.5 --out bench/results/auto_alpha
    python bench/auto_alpha.py --problems 2 --max-new-tokens 32 --out /tmp/auto_alpha      # a quick look

The default pair (gemma-3-270m judges with the verdict head dreamr ships for it, SmolLM2-135M-Instruct
drafts; ``--verdict-head none`` for the target's own Yes/No verdict) runs the first ``--problems``
problems of a GSM8K-format file one after another in mode "speculative", greedy, with
``alpha="auto"``: after each verified step ``alpha += gamma * (accepted - target_acceptance)``, clipped to
[0, 1] (:class:`dreamr.verify.AdaptiveAlpha`, see ``docs/method.md``). One rule is carried across the
problems (the reasoner keeps it per verifier and target acceptance), so the trajectory is one sequence
of verified steps over the whole run.

Printed: one row per problem (its verified and accepted steps, its own acceptance, the cumulative
acceptance after it, the mean and final alpha it was judged at) and the realised rate over the run.
Written under ``--out``: ``auto_alpha.json`` (the settings, the per-problem rows, the per-step
trajectory: alpha, cpn, accepted, cumulative rate) and ``auto_alpha.png`` (alpha and the cumulative
acceptance rate against the verified step, problem boundaries marked, the target rate and its +/- 0.1
band shaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "test_dev.jsonl"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K-format jsonl (question, answer)")
    p.add_argument("--problems", type=int, default=20, help="the first N problems (default 20)")
    p.add_argument("--target-acceptance", type=float, default=0.5)
    p.add_argument("--alpha-gamma", type=float, default=0.05, help="the update's step size (default 0.05)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-step-tokens", type=int, default=32)
    p.add_argument("--verdict-head", default="auto",
                   help="'auto' (the shipped head, default), 'none' (the target's own verdict) or a head folder")
    p.add_argument("--calibrate", action="store_true", help="calibrate the target's own verdict (with --verdict-head none)")
    p.add_argument("--target", default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--band", type=float, default=0.1, help="the tolerance the realised rate is judged by (0.1)")
    p.add_argument("--out", type=Path, required=True, help="folder for auto_alpha.json and auto_alpha.png")
    return p


def _problems(path: Path, n: int):
    """The first ``n`` problems of ``path``, read by the evaluation's loader (its errors name the line)."""
    from dreamr.eval import load_problems

    if n < 1:
        raise ValueError(f"problems must be >= 1, got {n}")
    problems = load_problems(path, limit=n)
    if len(problems) < n:
        raise ValueError(f"problems: {path} holds {len(problems)} problems, fewer than {n}")
    return problems


def plot(trajectory: list[dict], boundaries: list[int], target: float, band: float, path: Path, title: str) -> None:
    """alpha and the cumulative acceptance rate against the verified step, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t["step"] for t in trajectory]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.axhspan(target - band, target + band, color="tab:green", alpha=0.12, label=f"target {target:g} +/- {band:g}")
    ax.axhline(target, color="tab:green", lw=1)
    ax.plot(x, [t["alpha"] for t in trajectory], color="tab:blue", lw=1.5, label="alpha (threshold used)")
    ax.plot(x, [t["cumulative_rate"] for t in trajectory], color="tab:red", lw=1.5, label="cumulative acceptance")
    ax.scatter(x, [t["cpn"] for t in trajectory], s=10, c=["tab:orange" if t["accepted"] else "grey" for t in trajectory],
               label="cpn (orange: accepted)", zorder=3)
    for b in boundaries:
        ax.axvline(b + 0.5, color="black", lw=0.4, alpha=0.3)
    ax.set_xlabel("verified step (problem boundaries: thin lines)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dreamr.prompts import chat_messages
    from dreamr.reasoner import SpeculativeReasoner

    problems = _problems(args.data, args.problems)
    head = None if args.verdict_head == "none" else args.verdict_head
    reasoner = SpeculativeReasoner.from_pretrained(
        target=args.target, draft=args.draft, dtype=args.dtype, progress=False, verdict_head=head, mode="speculative",
        alpha="auto", target_acceptance=args.target_acceptance, alpha_gamma=args.alpha_gamma,
        calibrate=args.calibrate, max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens)
    used = reasoner.verdict_head(reasoner.config)
    judge = "target's own verdict" + (", calibrated" if args.calibrate else "") if used is None else \
        f"verdict head for {(used.meta.get('target') or {}).get('name')}" + (", calibrated" if used.calibrated else "")
    rows, trajectory, boundaries = [], [], []
    accepted_total = 0
    t0 = time.perf_counter()
    print(f"{'problem':>7} {'verified':>8} {'accepted':>8} {'rate':>6} {'cum. rate':>9} {'alpha mean':>10} "
          f"{'alpha final':>11} {'wall s':>7}")
    for i, item in enumerate(problems):
        start = time.perf_counter()
        result = reasoner.generate(chat_messages(item.question))
        verified = [s for s in result.steps if s.accepted is not None]
        for s in verified:
            accepted_total += bool(s.accepted)
            trajectory.append({"step": len(trajectory) + 1, "problem": i, "alpha": s.alpha, "cpn": s.cpn,
                               "accepted": bool(s.accepted),
                               "cumulative_rate": accepted_total / (len(trajectory) + 1)})
        boundaries.append(len(trajectory))
        m = result.metrics
        row = {"problem": i, "verified": m.verified_steps, "accepted": m.accepted_steps,
               "rate": m.step_acceptance_rate, "cumulative_rate": accepted_total / len(trajectory) if trajectory else None,
               "alpha_mean": m.alpha_mean, "alpha_final": m.alpha_final, "finish": result.finish_reason,
               "wall_s": time.perf_counter() - start}
        rows.append(row)

        def f(x, w, p=3):
            return f"{'-':>{w}}" if x is None else f"{x:>{w}.{p}f}"
        print(f"{i:>7} {row['verified']:>8} {row['accepted']:>8} {f(row['rate'], 6, 2)} {f(row['cumulative_rate'], 9)} "
              f"{f(row['alpha_mean'], 10)} {f(row['alpha_final'], 11)} {row['wall_s']:>7.1f}", flush=True)
    rule = reasoner.threshold_for(reasoner.config)
    realised = rule.acceptance_rate
    ok = realised is not None and abs(realised - args.target_acceptance) <= args.band
    summary = {"verified_steps": rule.steps, "accepted_steps": rule.accepted, "realised_rate": realised,
               "target_acceptance": args.target_acceptance, "within_band": ok, "band": args.band,
               "final_alpha": rule.alpha, "wall_s": time.perf_counter() - t0,
               "rate_bound": (1 + rule.gamma) / (rule.gamma * rule.steps) if rule.steps else None}
    print(f"realised acceptance {realised:.3f} over {rule.steps} verified steps ({rule.accepted} accepted), target "
          f"{args.target_acceptance:g} +/- {args.band:g}: {'held' if ok else 'NOT held'}; final alpha {rule.alpha:.3f}; "
          f"judge: {judge}; {summary['wall_s']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["judge"] = judge
    settings["command"] = "python bench/auto_alpha.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "auto_alpha.json").write_text(json.dumps(
        {"settings": settings, "summary": summary, "problems": rows, "trajectory": trajectory}, indent=2) + "\n")
    plot(trajectory, boundaries[:-1], args.target_acceptance, args.band, args.out / "auto_alpha.png",
         f"alpha=\"auto\", target acceptance {args.target_acceptance:g}, {len(problems)} GSM8K problems; {judge}; "
         f"realised {realised:.3f}")
    print(f"wrote {args.out / 'auto_alpha.json'} and {args.out / 'auto_alpha.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
