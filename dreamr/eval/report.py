"""The report of an evaluation: the per-variant table, the alpha sweep plot and the adaptive threshold's plot.

The plots need matplotlib (optional): :func:`dreamr.eval.run.evaluate` writes results.json whether or not
it can draw them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["format_table", "plot_sweep", "plot_alpha"]


def _f(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _pct(x, spec: str = ".1f") -> str:
    return _f(None if x is None else 100 * x, spec)


def format_table(report: dict) -> str:
    """The per-variant metrics as a fixed-width text table, then the bound line and the notes.

    Parameters
    ----------
    report : dict
        What :func:`dreamr.eval.run.evaluate` returns, or its ``summary`` alone.

    Returns
    -------
    str
        One row per variant; ``verifier`` says which judge and threshold the variant used (see
        :func:`dreamr.eval.variants.describe_verifier`), ``a mean`` the mean threshold of its verified steps.
    """
    summary = report["summary"] if "summary" in report else report
    cols = ["variant", "n", "err", "acc%", "all%", "dacc", "wall s", "speedup", "med", "tok/s", "accept",
            "acc/win", "mal", "tgt fw/tok", "tok/fw", "tok acc", "draft tok", "tgt tok", "L", "bound", "a mean",
            "verifier"]
    rows = []
    for name, r in summary["variants"].items():
        rows.append([
            name, str(r["finished"]), str(r["errors"]), _pct(r["accuracy"]), _pct(r.get("accuracy_all")),
            _pct(r["accuracy_delta"], "+.1f"), _f(r["wall_time_s"], ".1f"),
            _f(r["speedup"], ".2f"), _f(r["speedup_median"], ".2f"), _f(r["tokens_per_second"], ".1f"),
            _f(r["step_acceptance_rate"], ".2f"), _f(r["accepted_per_window"], ".2f"),
            _f(r.get("mean_accepted_length"), ".2f"),
            _f(r["target_passes_per_token"], ".3f"), _f(r.get("tokens_per_target_forward"), ".2f"),
            _f(r.get("token_acceptance_rate"), ".2f"), str(r["draft_tokens"]), str(r["target_tokens"]),
            _f(r["mean_draft_step_tokens"], ".1f"), _f(r["ideal_bound"], ".2f"), _f(r.get("alpha_mean"), ".3f"),
            r.get("verifier") or "-",
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    last = len(cols) - 1  # the first and last columns are text: left-aligned

    def line(cells):
        return "  ".join(x.ljust(w) if i in (0, last) else x.rjust(w)
                         for i, (x, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(cols)]
    lines.append("-" * len(lines[0]))
    lines += [line(row) for row in rows]
    b = summary["bound"]
    lines.append(f"ideal step-level bound 1/(c + 1/L): c = {_f(b['c'], '.3f')}, L = {_f(b['L'], '.1f')} tokens "
                 f"-> {_f(b['ideal_bound'], '.2f')}x (c from: {b.get('c_source') or '-'}; L from: "
                 f"{b.get('L_source') or '-'})")
    for name, r in summary["variants"].items():
        if r.get("alpha") == "auto" and r.get("target_acceptance") is not None:
            lines.append(f"alpha=auto {name}: acceptance {_f(r['step_acceptance_rate'], '.3f')} against the target "
                         f"{r['target_acceptance']:g} (gap {_f(r.get('acceptance_gap'), '+.3f')}); alpha mean "
                         f"{_f(r.get('alpha_mean'), '.3f')}, final {_f(r.get('alpha_final'), '.3f')}")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Union[str, Path]) -> Path:
    """Lay ``fig`` out, write it to ``path`` (PNG) and close it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sweep(data: dict, path: Union[str, Path], title: str = "") -> Path:
    """Draw speedup (y) against accuracy (x): one curve per series with a point per alpha, the baselines
    and the alpha="auto" variants marked; save it as PNG.

    Parameters
    ----------
    data : dict
        :func:`dreamr.eval.metrics.sweep`'s output.
    path : str or Path
        The PNG to write.
    title : str
        The plot's title.

    Returns
    -------
    Path
        ``path``. Raises ImportError without matplotlib.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for mode, points in data["modes"].items():
        pts = [p for p in points if p["accuracy"] is not None and p["speedup"] is not None]
        if not pts:
            continue
        xs, ys = [p["accuracy"] * 100 for p in pts], [p["speedup"] for p in pts]
        ax.plot(xs, ys, marker="o", label=mode)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"α={p['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for name, p in (data.get("auto") or {}).items():
        if p["accuracy"] is None or p["speedup"] is None:
            continue
        ax.scatter([p["accuracy"] * 100], [p["speedup"]], marker="^", s=70, zorder=3, label=name)
        mean = "-" if p.get("alpha_mean") is None else f"{p['alpha_mean']:.2f}"
        ax.annotate(f"α=auto (mean {mean})", (p["accuracy"] * 100, p["speedup"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    styles = {"target": dict(marker="*", s=180, color="black"), "draft": dict(marker="s", s=60, color="gray")}
    for name, p in data["baselines"].items():
        if p["accuracy"] is None or p["speedup"] is None:
            continue
        ax.scatter([p["accuracy"] * 100], [p["speedup"]], label=f"{name} alone", zorder=3,
                   **styles.get(name, dict(marker="D", s=60)))
    ax.axhline(1.0, color="black", lw=0.6, ls=":")
    if data.get("bound"):
        ax.axhline(data["bound"], color="tab:red", lw=0.8, ls="--", label=f"ideal bound {data['bound']:.2f}x")
    xs = [p["accuracy"] * 100 for pts in data["modes"].values() for p in pts if p["accuracy"] is not None]
    xs += [p["accuracy"] * 100 for group in ("baselines", "auto") for p in (data.get(group) or {}).values()
           if p["accuracy"] is not None]
    if xs and max(xs) - min(xs) < 10:  # keep a readable accuracy axis when the points nearly coincide
        mid = (max(xs) + min(xs)) / 2
        ax.set_xlim(max(-2.0, mid - 8), min(102.0, mid + 8))
    ax.set_xlabel("accuracy (%)")
    ax.set_ylabel("speedup over the target alone (x)")
    ax.set_title(title or "accuracy and speedup per alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_alpha(trajectories: dict, path: Union[str, Path], title: str = "") -> Path:
    """Draw each alpha="auto" variant's threshold at every verified step (top) and its running acceptance
    rate against the target acceptance (bottom), in run order across the evaluation; save it as PNG.

    Parameters
    ----------
    trajectories : dict
        :func:`dreamr.eval.metrics.alpha_trajectories`'s output (at least one variant).
    path : str or Path
        The PNG to write.
    title : str
        The plot's title.

    Returns
    -------
    Path
        ``path``. Raises ImportError without matplotlib, ValueError for no trajectories.
    """
    if not trajectories:
        raise ValueError("trajectories: no alpha='auto' variant to plot")
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), dpi=120, sharex=True)
    for i, (name, t) in enumerate(trajectories.items()):
        color = f"C{i % 10}"
        steps = range(1, len(t["alpha"]) + 1)
        top.plot(steps, t["alpha"], color=color, lw=1.0, label=name)
        bottom.plot(steps, t["acceptance"], color=color, lw=1.0, label=f"{name} (running)")
        if t.get("target_acceptance") is not None:
            bottom.axhline(t["target_acceptance"], color=color, lw=0.8, ls="--",
                           label=f"target {t['target_acceptance']:g}")
    top.set_ylabel("alpha at the step")
    top.set_ylim(-0.02, 1.02)
    top.set_title(title or "alpha='auto': the threshold step by step")
    bottom.set_ylabel("acceptance rate so far")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("verified step (run order across the evaluation)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)
