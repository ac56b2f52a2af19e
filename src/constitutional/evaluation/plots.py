"""Plots of stage 6 (matplotlib, PNG): the paper's Figures 2-3 and 8 for this run.

* ``plot_elo_frontier``: helpfulness Elo against harmlessness Elo, one point per snapshot with
  its 95% intervals, training order joined by a line (Figures 2 and 3 of the paper).
* ``plot_against_step``: Elo per axis and the effect table's headline rates (harmless and coherent,
  declines and explains, helpful and coherent) against RL step (Figure 8), with SL-CAI as step 0.

Each function takes the plain dictionaries that ``evaluate`` writes (``elo.json``,
``effect.json``), so the report or a notebook can redraw them from the files.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interval(entry) -> tuple[float, float, float]:
    return entry["elo"], entry["elo"] - entry["low"], entry["high"] - entry["elo"]


def plot_elo_frontier(elo: dict, path: str | Path) -> Path:
    """Helpfulness Elo (x) against harmlessness Elo (y) per snapshot, with 95% intervals."""
    plt = _pyplot()
    harm = elo.get("axes", {}).get("harmlessness", {}).get("snapshots", {})
    helpful = elo.get("axes", {}).get("helpfulness", {}).get("snapshots", {})
    names = [n for n in elo.get("snapshots", []) if n in harm and n in helpful]
    fig, ax = plt.subplots(figsize=(6, 5))
    if names:
        xs, ys = [], []
        for name in names:
            x, xlo, xhi = _interval(helpful[name])
            y, ylo, yhi = _interval(harm[name])
            ax.errorbar([x], [y], xerr=[[xlo], [xhi]], yerr=[[ylo], [yhi]], fmt="o", capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
            xs.append(x)
            ys.append(y)
        ax.plot(xs, ys, color="grey", linewidth=0.8, alpha=0.6)
    else:
        ax.text(0.5, 0.5, "no Elo to plot", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="lightgrey", linewidth=0.8)
    ax.axvline(0, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("helpfulness Elo (vs base)")
    ax.set_ylabel("harmlessness Elo (vs base)")
    ax.set_title("Harmlessness vs. helpfulness (95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_against_step(steps: dict[str, int], elo: dict, effect: dict, path: str | Path) -> Path:
    """Elo per axis (top) and the effect table's headline rates, greedy (bottom), against RL step.

    ``steps`` maps snapshot name -> RL step (SL-CAI is 0). Snapshots without a step are left out.
    """
    plt = _pyplot()
    names = sorted((n for n in steps if steps[n] is not None), key=lambda n: steps[n])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    if not names:
        for ax in (top, bottom):
            ax.text(0.5, 0.5, "no RL snapshots to plot", ha="center", va="center", transform=ax.transAxes)
    x = [steps[n] for n in names]
    for axis, color in (("harmlessness", "tab:blue"), ("helpfulness", "tab:orange")):
        entries = elo.get("axes", {}).get(axis, {}).get("snapshots", {})
        pts = [(steps[n], *_interval(entries[n])) for n in names if n in entries]
        if pts:
            top.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                         marker="o", capsize=3, color=color, label=f"{axis} Elo")
    top.set_ylabel("Elo (vs base)")
    top.set_title("Along RL training (SL-CAI = step 0)")
    rows = {(r["snapshot"], r["decoding"]): r for r in effect.get("rows", [])}
    for kind, key, label, color in (("red_team", "harmless_coherent", "harmless & coherent (red-team)", "tab:green"),
                                    ("red_team", "declines_explains", "declines & explains (red-team)", "tab:olive"),
                                    ("helpful", "helpful_coherent", "helpful & coherent (helpful)", "tab:red")):
        pts = []
        for n in names:
            row = rows.get((n, "greedy"))
            if row and row.get(kind, {}).get(key):
                rate, low, high = row[kind][key]
                pts.append((steps[n], rate, rate - low, high - rate))
        if pts:
            bottom.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                            marker="o", capsize=3, color=color, label=label)
    bottom.set_ylabel("rate (greedy)")
    bottom.set_xlabel("RL step")
    bottom.set_ylim(-0.02, 1.02)
    for ax in (top, bottom):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if x:
        bottom.set_xticks(sorted(set(x)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
