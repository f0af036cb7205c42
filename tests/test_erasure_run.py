"""Erasure requests in a real ``fedcl simulate`` run, judged against the retrain oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcl import tracking
from tests.conftest import run_fedcl
from tests.pinned import assert_pinned
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e

FOT = ("--strategy", "fot", "--partition", "iid", "--strategy-param", "repr_samples=200")


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


def test_federaser_under_fot_forgets_a_class_and_a_client(tmp_path: Path,
                                                          ray_env: dict) -> None:  # noqa: F811
    """FedEraser wrapping FOT, class-IL: class 1 erased after task 0, client 2 at round 2 of
    task 1. Class 1 is left out of every client's data, client 2 leaves, each request is judged
    against the oracle, the stored updates are reported, the FOT basis is rebuilt on the way,
    and `fedcl compare` shows the erasure columns."""
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY[:4], "--rounds-per-task", "2", *TINY[6:], *FOT,
                    "--clients", "4", "--unlearning", "federaser", "--erase",
                    "class=1,after-task=0", "--erase", "client=2,task=1,round=2", "--output",
                    str(out), "--experiment", "unlearn", cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert [r["sampled"] for r in s["rounds"]] == [[0, 1, 2, 3]] * 3 + [[0, 1, 3]]
    first, second = s["erasures"]
    assert (first["request"], first["kind"], first["method"], first["round"]) == (
        "class=1,after-task=0", "class", "federaser", 2)
    assert (second["request"], second["kind"], second["round"]) == (
        "client=2,task=1,round=2", "client", 3)
    # the same seed, the same matrix and erasure metrics (model, oracle, distance) as recorded
    assert_pinned("federaser_under_fot", s)
    # the matrix is on what was not erased: class 1 leaves every row (task 0 kept its other
    # digits); as measured with every class, task 0 fell from 96.4 to 81.2 % by the request
    view = s["erasure_view"]
    assert view["excluded_classes"] == [1] and view["fully_erased_tasks"] == []
    assert view["accuracy_matrix_all_classes"] == [[0.964, 0.0], [0.754, 0.0]]
    assert s["forgetting"] < 0 < s["learning_accuracy"]
    assert first["test_split"].startswith("class 1 left out of the test split")
    assert "cannot be separated" in second["test_split"]
    # each forget set's accuracy from its request on: right after unlearning, then each round
    assert [c["round"] for c in first["forget_curve"]] == [2, 3, 4]
    assert [c["round"] for c in second["forget_curve"]] == [3, 4]
    assert first["forget_curve"][0]["acc"] == first["forget_acc"]
    # class 1 stays forgotten through the client erasure that follows
    assert all(c["acc"] <= 0.05 for c in first["forget_curve"]), first["forget_curve"]
    # the console names each request with its judged result
    assert ("erasure 'class=1,after-task=0' carried out by federaser after round 2: forget "
            "0.0% (oracle 0.0%, +0.0)") in res.stdout
    # the oracle never trained on class 1; FedEraser's calibration left it out too
    assert first["oracle"]["forget_acc"] <= 0.05 and first["forget_acc"] <= 0.05
    assert first["retain_acc"] > 0.8 and first["oracle"]["retain_acc"] > 0.8
    # rounds 1 and 2 stored (round 1 is calibrated too: every client held class 1); the
    # client erasure calibrates rounds 1, 2 and 3: round 1's stored models saw class 1, so
    # taking their average from storage would bring the erased class back
    assert first["calibrated_rounds"] == 2 and second["calibrated_rounds"] == 3
    assert 0 < first["storage_bytes"] < second["storage_bytes"]
    assert second["storage_mb"] == second["storage_bytes"] / 2**20
    # rounds 1 to 3 stored; round 4 comes after the last request, which nothing could use;
    # the class erasure leaves every stored model in use, and the store goes once the last
    # request ran
    use = s["unlearning_storage"]
    assert (use["rounds_stored"], use["rounds_not_stored"]) == (3, 1)
    assert use["bytes_stored"] == second["storage_bytes"]
    assert use["bytes_pruned"] == use["bytes_stored"] and use["bytes_kept"] == 0
    assert not (out / "federaser").exists()
    for entry in (first, second):
        for key in ("forget_acc", "retain_acc", "test_acc", "mia"):
            assert 0.0 <= entry[key] <= 1.0 and 0.0 <= entry["oracle"][key] <= 1.0
        assert entry["seconds"] > 0 and entry["oracle"]["seconds"] > 0
        assert 0 < entry["distance_to_oracle"]["weights"] < 1
    assert [d["task"] for d in s["strategy_state"]] == [0, 1]
    assert s["strategy_state"][0]["fot_basis_dim.body.2"] >= 1

    from fedcl.compare import compare

    rows = json.loads(compare("unlearn", f"sqlite:///{tmp_path / 'mlflow.db'}", fmt="json"))
    assert rows[0]["unlearning"] == "federaser"
    # erasure columns are named by their request: erasure 1 is client 2's at round 2 of task 1
    assert rows[0]["client=2@t1r2 forget_acc"] == pytest.approx(second["forget_acc"])
    assert rows[0]["class=1@t0 oracle_seconds"] == pytest.approx(first["oracle"]["seconds"])
    assert rows[0]["class=1@t0 mia"] == pytest.approx(first["mia"])


def test_a_failing_unlearning_keeps_the_model_and_marks_the_run(tmp_path: Path,
                                                                ray_env: dict) -> None:  # noqa: F811
    """A projection step far too large makes the weights overflow: the run stops with one line,
    its MLflow run is FAILED, no summary is written, and the checkpoint holds the model from
    before the request (finite, the request not yet carried out)."""
    import torch

    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, "--unlearning", "projection", "--unlearning-param",
                    "lr=1e30", "--erase", "class=1,after-task=0", "--output", str(out),
                    "--experiment", "unlearn-fail", cwd=tmp_path, env=ray_env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("fedcl: error: unlearning 'projection' failed on erasure "
                               "'class=1,after-task=0': the unlearned model's ")
    assert lines[0].endswith("is not finite (the method diverged; a smaller step may help); "
                             "the global model before the request is kept in the checkpoint")
    assert not (out / "summary.json").exists()
    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "unlearn-fail")
    assert [r["status"] for r in runs] == ["FAILED"]
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    progress = payload["progress"]
    assert (progress["task"], progress["erasures_done"], progress["erasures"]) == (1, 0, [])
    assert progress["erased_classes"] == [] and len(progress["matrix"]) == 1
    assert all(bool(torch.isfinite(v).all()) for v in progress["arrays"].values()
               if v.is_floating_point())


def test_clients_left_without_data_are_not_faults(tmp_path: Path, ray_env: dict) -> None:  # noqa: F811
    """One shard per client and one client sampled per round: erasing task 0's two classes at
    its round 2 leaves the sampled client (and everyone) without task 0 data. That round, and
    the oracle's replay of round 1 for the second request, keep the model and go on: the
    empty clients are counted apart, never as failures or rejections."""
    out = tmp_path / "out"
    res = run_fedcl("simulate", "--clients", "4", "--tasks", "5", "--rounds-per-task", "2",
                    "--fraction-train", "0.25", "--partition", "shards", "--shards-per-client",
                    "1", "--seed", "0", "--eval-samples-per-task", "100", "--erase",
                    "class=0,task=0,round=2", "--erase", "class=1,task=0,round=2",
                    "--output", str(out), "--experiment", "empty", cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    second = s["rounds"][1]
    assert (second["clients"], second["empty"], second["failures"], second["rejected"]) == (
        0, 1, 0, 0)
    assert second["train_loss"] is None  # nobody trained: the model went on unchanged
    assert all(r["failures"] == 0 and r["rejected"] == 0 for r in s["rounds"])
    assert [e["request"] for e in s["erasures"]] == ["class=0,task=0,round=2",
                                                     "class=1,task=0,round=2"]
    assert len(s["accuracy_matrix"]) == 5
    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "empty")
    assert runs[0]["status"] == "FINISHED" and runs[0]["metrics"]["empty"] == 0.0
