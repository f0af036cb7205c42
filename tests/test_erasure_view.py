"""Erasure-aware metrics: after a request the run is measured on what was not erased. Classes
erased everywhere leave every row of the accuracy matrix (from per-class counts), so the
requested forgetting is not counted as catastrophic forgetting; a client's data cannot be
separated from the test split; each request is named on the console with its judged result,
and the plots mark it with its forget set's curve."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcl import metrics
from fedcl.erasure import parse_erasure
from fedcl.erasure_judge import test_split as split_text
from fedcl.evaluation import accuracies, erasure_view, fully_excluded, task_accuracy
from fedcl.progress import format_erasure
from fedcl.results import plot_outputs

# task-IL, 2 tasks of 2 classes; class 1 (task 0) erased everywhere after task 0:
#   after task 0: task 0 {0: 100/100, 1: 99/100}, task 1 {2: 50/100, 3: 50/100}
#   after task 1: task 0 {0:  98/100, 1:  0/100}, task 1 {2: 95/100, 3: 97/100}
COUNTS = [
    [{0: [100, 100], 1: [99, 100]}, {2: [50, 100], 3: [50, 100]}],
    [{0: [98, 100], 1: [0, 100]}, {2: [95, 100], 3: [97, 100]}],
]
BASE = [{0: [40, 100], 1: [60, 100]}, {2: [50, 100], 3: [50, 100]}]


def _flat(matrix: object) -> list[float]:
    return [v for row in matrix for v in row]  # type: ignore[attr-defined]


def test_accuracies_leave_the_erased_classes_out() -> None:
    assert task_accuracy(COUNTS[1][0]) == pytest.approx(0.49)
    assert task_accuracy(COUNTS[1][0], {1}) == pytest.approx(0.98)
    # every class of a task excluded: its full test set (nothing else to measure)
    assert task_accuracy(COUNTS[1][0], {0, 1}) == pytest.approx(0.49)
    assert fully_excluded(COUNTS[1], {0, 1}) == [0] and fully_excluded(COUNTS[1], {1}) == []
    assert accuracies(COUNTS[1], {1}) == pytest.approx([0.98, 0.96])


def test_the_end_metrics_do_not_count_the_requested_forgetting() -> None:
    live = [accuracies(COUNTS[0]), accuracies(COUNTS[1], {1})]
    view = erasure_view(live, COUNTS, accuracies(BASE), BASE, {1})
    # every row on classes 0, 2, 3: task 0 was 100 % and is 98 %
    assert _flat(view["matrix"]) == pytest.approx([1.0, 0.5, 0.98, 0.96])
    assert view["baseline"] == pytest.approx([0.4, 0.5])
    assert view["excluded_classes"] == [1] and view["fully_erased_tasks"] == []
    assert _flat(view["accuracy_matrix_all_classes"]) == pytest.approx([0.995, 0.5, 0.49, 0.96])
    # forgetting 2 points on what was not erased; 50.5 points counting the erased class
    assert metrics.forgetting(view["matrix"]) == pytest.approx(0.02)
    assert metrics.forgetting(view["accuracy_matrix_all_classes"]) == pytest.approx(0.505)
    # no erasure: the matrix as measured, nothing more
    plain = erasure_view([accuracies(c) for c in COUNTS], COUNTS, accuracies(BASE), BASE, set())
    assert plain["matrix"] == [accuracies(c) for c in COUNTS]
    assert "accuracy_matrix_all_classes" not in plain
    # a checkpoint from before the counts: the live matrix stays
    assert erasure_view(live, [], [0.5, 0.5], [], {1})["matrix"] == live


def test_what_a_request_changes_in_the_test_split() -> None:
    assert split_text(parse_erasure("class=3,after-task=1")).startswith(
        "class 3 left out of the test split")
    assert "cannot be separated" in split_text(parse_erasure("client=2,after-task=1"))
    assert split_text(parse_erasure("client=2,class=3,after-task=1")).startswith("unchanged")


ENTRY = {"request": "class=1,after-task=0", "method": "retrain", "round": 3,
         "forget_acc": 0.0, "retain_acc": 0.985, "test_acc": 0.9836, "mia": 0.999,
         "oracle": {"forget_acc": 0.0, "retain_acc": 0.985, "test_acc": 0.9836, "mia": 0.999},
         "distance_to_oracle": {"weights": 0.0},
         "forget_curve": [{"round": 3, "acc": 0.0}, {"round": 4, "acc": 0.01}]}


def test_the_console_names_each_request_and_its_judged_result() -> None:
    assert format_erasure(ENTRY) == (
        "erasure 'class=1,after-task=0' carried out by retrain after round 3: forget 0.0% "
        "(oracle 0.0%, +0.0), retain 98.5% (oracle 98.5%, +0.0), test 98.4% (oracle 98.4%, "
        "+0.0), MIA 99.9% (oracle 99.9%, +0.0), weights 0.000 from the oracle's")
    no_retain = {**ENTRY, "retain_acc": None}
    assert "retain n/a" in format_erasure(no_retain)


def test_the_curves_plot_marks_erasures_and_forget_sets(tmp_path: Path) -> None:
    rounds = [{"round": r, "task": (r - 1) // 2, "acc_per_task": [0.9, 0.5]} for r in (1, 2, 3, 4)]
    summary = {"strategy": "fedavg", "accuracy_matrix": [[0.9, 0.5], [0.9, 0.9]],
               "rounds": rounds, "erasures": [ENTRY]}
    heatmap, curves = plot_outputs(summary, tmp_path)
    assert curves.stat().st_size > 0 and heatmap.stat().st_size > 0
