"""The run's figures (fedcl.plots), read back as matplotlib objects: titles, task boundaries and
their labels, erasure marks, the legend outside the axes, the heatmap's annotations fitting
their cells at 10 tasks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedcl.plots import (
    BOUNDARY_GID,
    ERASURE_GID,
    TASK_LABEL_GID,
    curves_figure,
    heatmap_figure,
    save_figures,
)


def summary(tasks: int, rounds_per_task: int, erasures: list[dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    rng = np.random.default_rng(tasks)
    rounds = []
    for k in range(tasks):
        for r in range(1, rounds_per_task + 1):
            rounds.append({"task": k, "round": len(rounds) + 1, "task_round": r,
                           "acc_per_task": rng.uniform(0, 1, tasks).tolist()})
    return {"strategy": "fot", "dataset": "mnist", "scenario": "domain-il",
            "accuracy_matrix": rng.uniform(0, 1, (tasks, tasks)).tolist(), "rounds": rounds,
            "erasures": erasures or []}


def drawn(fig: Figure) -> Any:
    """The figure drawn (so that positions are final); returns its renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


ERASURE = {"round": 4, "request": "client=2,after-task=1", "method": "federaser",
           "forget_curve": [{"round": 5, "acc": 0.2}, {"round": 6, "acc": 0.1}]}


def test_curves_mark_task_boundaries_label_tasks_and_mark_erasures() -> None:
    fig = curves_figure(summary(3, 2, [ERASURE]))
    ax = fig.axes[0]
    assert ax.get_title() == "fot on mnist, domain-il, unlearning federaser: accuracy on each task"
    boundaries = [ln.get_xdata()[0] for ln in ax.lines if ln.get_gid() == BOUNDARY_GID]
    assert boundaries == [2.5, 4.5]  # before the first round of tasks 1 and 2
    labels = {t.get_text(): t.get_position()[0] for t in ax.texts if t.get_gid() == TASK_LABEL_GID}
    assert labels == {"task 0": 1.5, "task 1": 3.5, "task 2": 5.5}  # centred on their rounds
    # the request ran after round 4 (task 1's last): its line right after that round
    marks = [ln.get_xdata()[0] for ln in ax.lines if ln.get_gid() == ERASURE_GID]
    assert marks == [4.5]
    assert [t.get_text() for t in ax.texts if t.get_gid() == ERASURE_GID] == [
        "erasure 0: client=2,after-task=1"]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "task 0", "task 1", "task 2", "forget set of erasure 0"]
    forget = next(ln for ln in ax.lines if ln.get_label() == "forget set of erasure 0")
    assert list(forget.get_xdata()) == [5, 6]
    assert list(forget.get_ydata()) == pytest.approx([20, 10])


def test_curves_legend_lies_outside_the_axes() -> None:
    for tasks in (2, 10):
        fig = curves_figure(summary(tasks, 3))
        renderer = drawn(fig)
        ax = fig.axes[0]
        box = ax.get_legend().get_window_extent(renderer)
        axes_box = ax.get_window_extent(renderer)
        assert box.x0 >= axes_box.x1, tasks  # right of the curves, not over them
        assert box.x1 <= fig.bbox.x1 + 0.5, tasks  # ... and inside the image


@pytest.mark.parametrize("tasks", [2, 5, 10, 20])
def test_heatmap_annotates_every_cell_readably(tasks: int) -> None:
    s = summary(tasks, 1)
    fig = heatmap_figure(s)
    ax = fig.axes[0]
    assert ax.get_title().startswith("fot on mnist, domain-il")
    texts = ax.texts
    assert len(texts) == tasks * tasks
    matrix = np.array(s["accuracy_matrix"]) * 100
    assert [t.get_text() for t in texts] == [f"{v:.0f}" for v in matrix.ravel()]
    assert min(t.get_fontsize() for t in texts) >= 7
    renderer = drawn(fig)
    axes_box = ax.get_window_extent(renderer)
    cell_w, cell_h = axes_box.width / tasks, axes_box.height / tasks
    assert cell_w >= 0.5 * fig.dpi - 1  # half an inch a cell, at least
    for text in texts:  # each number fits inside its cell
        box = text.get_window_extent(renderer)
        assert box.width < cell_w and box.height < cell_h, text.get_text()
    if tasks == 10:
        assert min(t.get_fontsize() for t in texts) >= 8


def test_save_figures_writes_both_pngs(tmp_path: Any) -> None:
    paths = save_figures(summary(3, 2, [ERASURE]), tmp_path)
    assert [p.name for p in paths] == ["accuracy_matrix.png", "accuracy_per_round.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
