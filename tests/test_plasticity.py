"""Plasticity beside stability in what a run reports: learning accuracy and intransigence in
summary.json, the MLflow final metrics, the console's final table and ``fedcl compare``."""

from __future__ import annotations

import pytest

from fedcl.compare import compare_runs, format_table
from fedcl.config import Config, reference_accuracies
from fedcl.errors import ConfigError
from fedcl.progress import format_matrix
from fedcl.results import build_summary
from fedcl.tracking import FINAL_METRICS

# a learner that learns task 0 only: forgetting 0, yet it learnt nothing after task 0
MATRIX = [[0.99, 0.0, 0.0], [0.99, 0.0, 0.0], [0.99, 0.0, 0.0]]


def _summary(reference: str) -> dict:
    config = Config(tasks=3, intransigence_reference=reference).validate()
    return {**build_summary(strategy="fot", config=config.to_dict(), matrix=MATRIX,
                            baseline=[0.1, 0.1, 0.1], rounds=[],
                            times={"time_startup_s": 0.5, "time_rounds_s": 0.4,
                                   "time_shutdown_s": 0.1, "wall_time_s": 1.0},
                            mlflow_run_id=None, tracking_uri=None)}


def test_the_summary_has_learning_accuracy_and_intransigence_against_the_given_reference(
        ) -> None:
    s = _summary("0.99,0.95,0.93")
    assert s["forgetting"] == 0.0
    assert s["learning_accuracy"] == pytest.approx(0.33)
    # I_k = A*_k - R[k, k] = (0.99 - 0.99, 0.95 - 0, 0.93 - 0)
    assert s["intransigence_per_task"] == pytest.approx([0.0, 0.95, 0.93])
    assert s["intransigence"] == pytest.approx(1.88 / 3)
    lines = format_matrix(s).splitlines()
    assert lines[-2] == "learning accuracy 33.00%   intransigence 62.67%"
    assert lines[-1] == "wall time 1.0 s = start-up 0.5 s + rounds 0.4 s + shutdown 0.1 s"
    assert {"learning_accuracy", "intransigence"} <= set(FINAL_METRICS)


def test_without_a_reference_intransigence_is_none_and_the_table_says_why() -> None:
    s = _summary("")
    assert s["intransigence"] is None and s["intransigence_per_task"] is None
    assert s["learning_accuracy"] == pytest.approx(0.33)
    assert format_matrix(s).splitlines()[-2] == (
        "learning accuracy 33.00%   intransigence n/a (no jointly trained reference: set "
        "intransigence_reference)")


@pytest.mark.parametrize(("text", "phrase"), [
    ("0.9,0.9", "one accuracy per task (3), got 2"),
    ("0.9,x,0.9", "'x' is not a number"),
    ("0.9,95,0.9", "95 is not an accuracy in [0, 1]"),
])
def test_a_bad_reference_is_one_line(text: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Config(tasks=3, intransigence_reference=text).validate()
    assert reference_accuracies(" ") is None


def test_compare_shows_learning_accuracy_and_intransigence() -> None:
    run = {"run_name": "a", "status": "FINISHED", "run_id": "1", "experiment": "x",
           "params": {"strategy": "fot"}, "tags": {},
           "metrics": {"acc": 0.33, "forgetting": 0.0, "learning_accuracy": 0.33}}
    comparison = compare_runs([run], ["x"])
    assert comparison.rows[0]["learning_accuracy"] == 0.33
    assert comparison.rows[0]["intransigence"] is None
    lines = format_table(comparison).splitlines()
    assert "accuracy %" in lines[1] and "intransigence" not in lines[1]  # where present
    assert lines[3].split()[:5] == ["fot", "FINISHED", "33.00", "0.00", "33.00"]
