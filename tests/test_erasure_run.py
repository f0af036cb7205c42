"""Erasure requests in a real ``fedcl simulate`` run, judged against the retrain oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcl import tracking
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e

FOT = ("--strategy", "fot", "--partition", "iid")


def test_retrain_after_a_task_equals_erasing_before_any_training(tmp_path: Path,
                                                                  ray_env: dict) -> None:  # noqa: F811
    """Client 1 erased after task 0 (FOT): the oracle replays task 0 without it, the run goes on
    from the oracle's model and its rebuilt FOT basis, and client 1 never trains again. The
    same client erased before the first round gives the same final accuracy row and basis, so
    the replay is exact. The `erasures` entry and its MLflow metrics agree."""
    runs = {}
    for name, request in (("after", "client=1,after-task=0"),
                          ("before", "client=1,task=0,round=1")):
        out = tmp_path / name
        res = run_fedcl("simulate", *TINY, *FOT, "--erase", request, "--output", str(out),
                        "--experiment", "erasure", "--run-name", name, cwd=tmp_path,
                        env=ray_env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((out / "summary.json").read_text())
    after, before = runs["after"], runs["before"]
    assert [r["sampled"] for r in after["rounds"]] == [[0, 1, 2], [0, 2]]
    assert [r["sampled"] for r in before["rounds"]] == [[0, 2], [0, 2]]
    assert after["accuracy_matrix"][-1] == before["accuracy_matrix"][-1]
    assert after["strategy_state"][-1] == before["strategy_state"][-1]

    entry = after["erasures"][0]
    assert (entry["request"], entry["method"], entry["round"]) == (
        "client=1,after-task=0", "retrain", 1)
    for key in ("forget_acc", "retain_acc", "test_acc", "mia"):
        assert 0.0 <= entry[key] <= 1.0 and entry[key] == entry["oracle"][key]
    # IID data: the retrained model classifies the erased client's digits like any others
    assert entry["forget_acc"] > 0.8 and entry["test_acc"] > 0.8
    assert entry["seconds"] == entry["oracle"]["seconds"] > 0
    assert entry["distance_to_oracle"]["weights"] == 0.0
    assert entry["distance_to_oracle"]["cka_forget"] == pytest.approx(1.0)
    assert entry["distance_to_oracle"]["cka_retain"] == pytest.approx(1.0)
    # erased before anything trained: judged on the untrained model, on task 0's data
    first = before["erasures"][0]
    assert first["round"] == 0 and first["test_acc"] < 0.8

    mlflow_run = {r["run_name"]: r for r in tracking.fetch_runs(
        f"sqlite:///{tmp_path / 'mlflow.db'}", "erasure")}["after"]
    for key in ("forget_acc", "retain_acc", "test_acc", "mia", "seconds"):
        assert mlflow_run["metrics"][f"erasure_0_{key}"] == pytest.approx(entry[key])
    assert mlflow_run["metrics"]["erasure_0_weights"] == 0.0


def test_erasure_requests_are_checked_before_the_run(tmp_path: Path) -> None:
    res = run_fedcl("simulate", *TINY, "--erase", "client=3,after-task=0", cwd=tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines == ["fedcl: error: erasure 'client=3,after-task=0': no client 3 "
                     "(clients are 0..2)"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
