"""PNG figures the commands write (matplotlib, Agg backend: no display needed).

* :func:`pretrain_figure`: the loss curve and the evaluation bars at the end of ``sdae-fast pretrain``;
* :func:`speedup_chart`: ``sdae-fast bench``'s speed-up over the naive variant, one bar per case.
"""
from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; set before pyplot is imported, harmless after
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long bar labels stay inside the image
    plt.close(fig)
    return path


def pretrain_figure(losses, results: dict, path: str, title: str = "", first_step: int = 1) -> str:
    """Left: loss per step (and a 20-step running mean); ``losses[i]`` is the loss of step
    ``first_step + i`` (a resumed run passes the first step it trained, so the axis shows the true
    step numbers). Right: k-NN and linear-probe top-1 per row of ``results``
    (``{row: {"knn": acc, "linear": acc}}``, see ``sdae_fast.eval.report``)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = range(first_step, first_step + len(losses))
    ax_loss.plot(steps, losses, lw=0.6, alpha=0.45, label="loss")
    if len(losses) >= 20:
        window = 20
        smooth = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
        ax_loss.plot(steps[window - 1:], smooth, lw=1.6, label="running mean (20)")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 on short runs
    ax_loss.set(xlabel="step", ylabel="loss", title=f"training loss {title}".strip())
    ax_loss.legend(loc="upper right", fontsize=8)
    rows = list(results)
    metrics = [m for m in ("knn", "linear") if any(results[r].get(m) is not None for r in rows)]
    width = 0.8 / max(len(metrics), 1)
    for j, metric in enumerate(metrics):
        values = [results[r].get(metric) or 0.0 for r in rows]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        bars = ax_acc.bar(xs, values, width, label={"knn": "k-NN", "linear": "linear probe"}[metric])
        ax_acc.bar_label(bars, fmt="%.3f", fontsize=7)
    ax_acc.set_xticks(range(len(rows)), rows)
    ax_acc.set(ylim=(0, 1.18), ylabel="held-out top-1", title="evaluation")
    ax_acc.legend(loc="upper center", ncol=len(metrics), fontsize=8)
    return _save(fig, plt, path)


def speedup_chart(labels, speedups, path: str, title: str = "") -> str:
    """Horizontal bars of ``speedups`` (x times the naive variant), log scale: each bar runs from 1x
    (the naive variant, marked) to its speed-up, right when faster, left when slower."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.4))
    ys = range(len(labels))
    ax.set_xscale("log")  # before the bars: a bar from 0 has no place on a log axis
    bars = ax.barh(ys, [s - 1.0 for s in speedups], left=1.0,
                   color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.bar_label(bars, labels=[f"{s:.2f}x" for s in speedups], fontsize=6, padding=2)  # bars near 1x are thin
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(min(min(speedups), 1.0) / 1.8, max(max(speedups), 1.0) * 1.8)  # room for the value labels
    lo, hi = ax.get_xlim()  # 1-2-5 ticks labelled "2x" (matplotlib's minor log labels overlap)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="speed-up vs naive = naive median ms / variant median ms (x, log scale)", title=title)
    return _save(fig, plt, path)
