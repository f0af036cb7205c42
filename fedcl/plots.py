"""The run's two figures, built from its summary (summary.json's keys):

* ``accuracy_matrix.png``: the accuracy matrix as a heatmap, every cell annotated in %, sized
  so that its annotations fit their cells at any number of tasks (10 tasks: 100 readable
  numbers);
* ``accuracy_per_round.png``: each task's test accuracy after every round, the task
  boundaries drawn and each task's span labelled above the curves, every erasure request
  marked where it ran (``erasures[].round``: the last round before it) with its forget set's
  accuracy dashed from then on, and the legend outside the axes, beside the curves.

Both titles name the strategy, the dataset and the scenario (and the unlearning method when
there were erasures). Tasks count from 0 here as everywhere. The figures are
:class:`matplotlib.figure.Figure` objects made without pyplot (no global state; the ServerApp
draws them in a thread of its own): :func:`accuracy_figures` builds them, :func:`save_figures`
writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

#: Inches per heatmap cell: the smallest, and the largest (few tasks).
CELL_MIN_IN, CELL_MAX_IN = 0.55, 0.9
#: Font size (points) of the heatmap's annotations: at most, and at least.
ANNOTATION_MAX_PT, ANNOTATION_MIN_PT = 11.0, 7.0
#: gids of the drawn marks, for whoever reads the figure back (tests).
BOUNDARY_GID, ERASURE_GID, TASK_LABEL_GID = "task-boundary", "erasure", "task-label"
DPI = 100


def run_title(summary: dict[str, Any]) -> str:
    """``fedavg on mnist, class-il`` (``, unlearning retrain`` when requests ran); what a
    summary of an older fedcl lacks is left out."""
    title = summary["strategy"]
    if summary.get("dataset"):
        title += f" on {summary['dataset']}"
    if summary.get("scenario"):
        title += f", {summary['scenario']}"
    if summary.get("erasures"):
        title += f", unlearning {summary['erasures'][0].get('method', '')}".rstrip()
    return title


def heatmap_figure(summary: dict[str, Any]) -> Figure:
    """The accuracy matrix, in %: row i after training task i, column j tested on task j."""
    matrix = np.asarray(summary["accuracy_matrix"], dtype=float) * 100
    t = len(matrix)
    cell = min(CELL_MAX_IN, max(CELL_MIN_IN, 6.0 / max(t, 1)))
    fontsize = float(np.clip(cell * 14, ANNOTATION_MIN_PT, ANNOTATION_MAX_PT))
    fig = Figure(figsize=(1.9 + cell * t, 1.5 + cell * t), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    for i in range(t):
        for j in range(t):
            ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if matrix[i, j] < 60 else "black")
    ax.set_xlabel("tested on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.tick_params(labelsize=min(10.0, fontsize))
    ax.set_title(f"{run_title(summary)}\naccuracy (%)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def curves_figure(summary: dict[str, Any]) -> Figure:
    """Each task's test accuracy after every round, with task boundaries and erasures."""
    rounds = summary["rounds"]
    t = len(summary["accuracy_matrix"])
    fig = Figure(figsize=(8.5, 4.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    xs = [r["round"] for r in rounds]
    for j in range(t):
        ax.plot(xs, [r["acc_per_task"][j] * 100 for r in rounds], marker="." if
                len(xs) <= 30 else None, label=f"task {j}")
    # each task's span: a boundary before its first round, its name above the curves
    above = blended_transform_factory(ax.transData, ax.transAxes)
    for k in range(t):
        task_rounds = [r["round"] for r in rounds if r["task"] == k]
        if not task_rounds:
            continue
        if k > 0:
            ax.axvline(task_rounds[0] - 0.5, color="grey", lw=0.8, ls=":", gid=BOUNDARY_GID)
        ax.text((task_rounds[0] + task_rounds[-1]) / 2, 1.01, f"task {k}", transform=above,
                ha="center", va="bottom", fontsize=8, color="dimgrey", gid=TASK_LABEL_GID)
    for i, entry in enumerate(summary.get("erasures") or []):
        # where the request ran (after round entry["round"]), and its forget set's accuracy
        # from then on (dashed)
        x = entry["round"] + 0.5
        ax.axvline(x, color="red", lw=1.0, ls="--", gid=ERASURE_GID)
        ax.text(x, 0.97, f"erasure {i}: {entry.get('request', '')}", transform=above,
                rotation=90, ha="left", va="top", fontsize=7, color="red", gid=ERASURE_GID,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
        curve = entry.get("forget_curve") or []
        if curve:
            ax.plot([c["round"] for c in curve], [100 * c["acc"] for c in curve], ls="--",
                    color="red", lw=1, label=f"forget set of erasure {i}")
    ax.set_xlabel("round (over the run)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{run_title(summary)}: accuracy on each task", fontsize=10, pad=16)
    handles = len(ax.get_legend_handles_labels()[0])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8,
              ncol=1 if handles <= 14 else 2, title="tested on", title_fontsize=8)
    return fig


def accuracy_figures(summary: dict[str, Any]) -> tuple[Figure, Figure]:
    """(heatmap, curves): the two figures of a run's summary."""
    return heatmap_figure(summary), curves_figure(summary)


def save_figures(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """``accuracy_matrix.png`` and ``accuracy_per_round.png`` in ``out_dir``; their paths."""
    paths = [out_dir / "accuracy_matrix.png", out_dir / "accuracy_per_round.png"]
    for fig, path in zip(accuracy_figures(summary), paths, strict=True):
        fig.savefig(path, dpi=DPI)
    return paths


__all__ = ["accuracy_figures", "curves_figure", "heatmap_figure", "run_title", "save_figures"]
