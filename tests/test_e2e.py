"""End-to-end runs of the real ``fedcl simulate`` (Flower's Ray simulation engine, a real MLflow
sqlite store) on tiny settings: summary.json, the MLflow run, reproducibility, failures."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import ArrayRecord

from fedcl import checkpoint, metrics, plugins, tracking
from fedcl.communication import record_bytes
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.errors import FedclError
from tests.conftest import alive, ray_session_processes, run_fedcl
from tests.pinned import assert_pinned

pytestmark = pytest.mark.e2e

TINY = ("--clients", "3", "--tasks", "2", "--rounds-per-task", "1", "--batch-size", "64",
        "--eval-samples-per-task", "500", "--round-timeout-s", "120")


@pytest.fixture
def ray_env():  # type: ignore[no-untyped-def]
    """A short, private RAY_TMPDIR (Ray's socket paths must stay short); afterwards, no process
    started under it may still be alive."""
    tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")
    yield {"RAY_TMPDIR": tmp}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = ray_session_processes(tmp)
        if not left:
            break
        time.sleep(0.5)
    left = ray_session_processes(tmp)
    names = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            names.append(proc.name())
            proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"processes left running: {names}"


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_tiny_class_il_run_writes_summary_and_mlflow(tmp_path: Path, ray_env: dict) -> None:
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, "--output", str(out), "--experiment", "e2e",
                    cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    s = _summary(out)
    assert s["strategy"] == "fedavg" and s["num_clients"] == 3 and s["num_tasks"] == 2
    assert_pinned("fedavg_class_il", s)  # the same seed, the same matrix as recorded
    matrix = s["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    # class-IL with FedAvg: task 0 is learned, then forgotten once task 1 is trained
    assert matrix[0][0] > 0.9
    assert matrix[1][0] < matrix[0][0]
    assert s["acc"] == pytest.approx(metrics.average_accuracy(matrix))
    assert s["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert s["bwt"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert s["fwt"] == pytest.approx(matrix[0][1] - s["random_init_accuracy"][1])
    assert [r["task"] for r in s["rounds"]] == [0, 1]
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    assert s["rounds"][-1]["acc_per_task"] == matrix[-1]
    assert s["rounds"][0]["min_acc"] is None
    assert s["rounds"][1]["min_acc"] == pytest.approx(matrix[1][0])
    assert s["rounds"][1]["wc_acc"] == pytest.approx((matrix[1][1] + matrix[1][0]) / 2)
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in s["rounds"])
    assert s["config"]["clients"] == 3
    # communication: each of the 3 clients receives the model and sends its update, a round
    model = ArrayRecord(plugins.build_model(Config(tasks=2, clients=3),
                                            build_scenario(Config(tasks=2, clients=3)))
                        .state_dict())
    for r in s["rounds"]:
        assert r["bytes_by_record"]["down"]["arrays"] == 3 * record_bytes(model)
        assert r["bytes_by_record"]["up"]["arrays"] == 3 * record_bytes(model)
        assert r["bytes_down"] == sum(r["bytes_by_record"]["down"].values())
    comm = s["communication"]
    assert comm["bytes_down"] == sum(r["bytes_down"] for r in s["rounds"])
    assert comm["per_client_round"]["bytes_up"] == pytest.approx(
        sum(r["bytes_up"] for r in s["rounds"]) / 6)
    assert [t["payload_bytes_up"] for t in comm["tasks"]] == [0, 0]  # FedAvg sends none
    for name in ("config.toml", "accuracy_matrix.csv", "accuracy_matrix.png",
                 "accuracy_per_round.png"):
        assert (out / name).stat().st_size > 0
    csv_rows = (out / "accuracy_matrix.csv").read_text().splitlines()
    assert csv_rows[0] == "after_task,task_0,task_1"
    assert float(csv_rows[2].split(",")[1]) == pytest.approx(matrix[1][0], abs=1e-6)
    # what it does before the first round, one line a stage, then the run's header
    lines = res.stdout.splitlines()
    stages = [line.split("  [")[0] for line in lines if line.startswith("starting: ")]
    assert stages == [
        "starting: Flower's simulation engine for 3 clients on a private Ray instance",
        "starting: preparing mnist and 3 clients' partitions",
        "starting: 3 clients registered; starting the client processes (the first 3 clients "
        "answer)"]
    assert lines[len(stages)].startswith("fedcl: fedavg on mnist class-il")
    # the table at the end of the command
    assert f"ACC {s['acc'] * 100:.2f}%" in res.stdout
    assert s["mlflow_run_id"] in res.stdout

    # the MLflow run holds the same numbers
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s["mlflow_tracking_uri"] == "sqlite:///mlflow.db"
    runs = tracking.fetch_runs(uri, "e2e")
    assert len(runs) == 1
    run = runs[0]
    assert run["run_id"] == s["mlflow_run_id"] and run["status"] == "FINISHED"
    # ... and the command's last lines say how to see it: the exact `mlflow ui` command (the
    # store's absolute path: it works from any folder) and the run's page it then serves
    exp_id = tracking._client(uri).get_experiment_by_name("e2e").experiment_id
    db = (tmp_path / "mlflow.db").resolve()
    assert res.stdout.strip().splitlines()[-3:] == [
        f"MLflow run {run['run_id']} in sqlite:///mlflow.db (experiment 'e2e')",
        f"  view it with: {tracking.mlflow_program()} ui --backend-store-uri sqlite:///{db}",
        f"  then open http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run['run_id']}"
        "?workflowType=machine_learning"]
    assert run["params"]["strategy"] == "fedavg" and run["params"]["clients"] == "3"
    assert run["metrics"]["acc"] == pytest.approx(s["acc"])
    assert run["metrics"]["forgetting"] == pytest.approx(s["forgetting"])
    history = tracking.metric_history(uri, s["mlflow_run_id"], "acc_task_0")
    assert [step for step, _ in history] == [1, 2]
    assert [v for _, v in history] == pytest.approx([r["acc_per_task"][0] for r in s["rounds"]])
    assert [v for _, v in tracking.metric_history(uri, s["mlflow_run_id"], "bytes_up")] \
        == [r["bytes_up"] for r in s["rounds"]]
    assert run["metrics"]["bytes_down_per_round"] == pytest.approx(comm["per_round"]["bytes_down"])
    art = _artifacts(tmp_path, s["mlflow_run_id"])
    assert {"summary.json", "config.toml", "accuracy_matrix.csv", "accuracy_matrix.png",
            "accuracy_per_round.png"} <= art

    # fedcl compare shows it
    cmp_ = run_fedcl("compare", "--experiment", "e2e", "--format", "json", cwd=tmp_path)
    assert cmp_.returncode == 0, cmp_.stderr
    rows = json.loads(cmp_.stdout)
    assert rows[0]["run_id"] == s["mlflow_run_id"]
    assert rows[0]["acc"] == pytest.approx(s["acc"])
    assert rows[0]["strategy"] == "fedavg"
    assert rows[0]["bytes_up_per_round"] == pytest.approx(comm["per_round"]["bytes_up"])


def _artifacts(root: Path, run_id: str) -> set[str]:
    return {p.name for p in root.rglob("*") if run_id in str(p) and p.is_file()}


def test_every_client_failing_stops_with_one_line_and_failed_run(tmp_path: Path,
                                                                 ray_env: dict) -> None:
    res = run_fedcl("simulate", *TINY, "--client-fault-rate", "1.0", "--output",
                    str(tmp_path / "out"), "--experiment", "faults", cwd=tmp_path, env=ray_env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("fedcl: error: round 1 (task 0): 0 of 3 sampled clients sent a "
                               "usable update, 3 failed (first error: ")
    assert "injected fault" in lines[0] and "fewer than min_train_clients=1" in lines[0]
    assert not (tmp_path / "out" / "summary.json").exists()
    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")
    assert [r["status"] for r in runs] == ["FAILED"]
    assert "0 of 3 sampled clients sent a usable update" in runs[0]["tags"]["fedcl.error"]


def test_failing_clients_and_a_tracking_outage_lose_nothing(tmp_path: Path, ray_env: dict,
                                                            mlflow_server) -> None:
    """40% of clients raise in each round, and the MLflow server is killed mid-run and started
    again later: the run completes, and MLflow ends up with every round's metrics (failures
    included), equal to summary.json. (The experiment is this test's alone: the server is
    shared with the tracker's tests, whose runs must not be taken for this one.)"""
    out = tmp_path / "out"
    outbox = out / tracking.OUTBOX_FILE
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcl.cli", "simulate", "--clients", "6", "--tasks", "2",
         "--rounds-per-task", "3", "--eval-samples-per-task", "200", "--client-fault-rate", "0.4",
         "--tracking-uri", mlflow_server.uri, "--experiment", "e2e-outage",
         "--tracking-wait-s", "300",
         "--output", str(out)],
        cwd=tmp_path, env={**os.environ, **ray_env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:  # round 1 reaches MLflow
            if run_id is None:
                with contextlib.suppress(FedclError):  # no experiment yet
                    runs = tracking.fetch_runs(mlflow_server.uri, "e2e-outage")
                    run_id = runs[0]["run_id"] if runs else None
            if run_id and tracking.metric_history(mlflow_server.uri, run_id, "avg_acc"):
                break
            time.sleep(0.2)
        assert run_id is not None and proc.poll() is None
        mlflow_server.stop()

        def a_later_round_queued() -> bool:  # the outbox may first hold other requests
            queued: list[dict] = []
            with contextlib.suppress(FedclError):  # not there yet, or a line half written
                queued = tracking.read_outbox(outbox, run_id)[1]
            return any(op["op"] == "metrics" and op["metrics"][0][3] >= 2 for op in queued)

        while time.monotonic() < deadline and not a_later_round_queued():
            time.sleep(0.2)
        assert a_later_round_queued()
        mlflow_server.start()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stdout + stderr and "warning" not in stderr
    s = _summary(out)
    assert s["mlflow_run_id"] == run_id and not outbox.exists()
    failures = [r["failures"] for r in s["rounds"]]
    assert sum(failures) > 0
    assert all(r["clients"] + r["failures"] == 6 for r in s["rounds"])
    uri = mlflow_server.uri
    assert tracking.run_status(uri, run_id) == "FINISHED"
    steps = list(range(1, 7))
    for key in ("avg_acc", "failures", "clients", "train_loss"):
        history = tracking.metric_history(uri, run_id, key)
        assert [step for step, _ in history] == steps, key
        assert [v for _, v in history] == pytest.approx([r[key] for r in s["rounds"]]), key
    for j in range(2):
        history = tracking.metric_history(uri, run_id, f"acc_task_{j}")
        assert [v for _, v in history] == pytest.approx(
            [r["acc_per_task"][j] for r in s["rounds"]])
    run = next(r for r in tracking.fetch_runs(uri, "e2e-outage") if r["run_id"] == run_id)
    assert run["metrics"]["acc"] == pytest.approx(s["acc"])
    assert run["tags"]["fedcl.status"] == "finished"


def test_clients_that_ask_for_more_cpus_than_any_node_fail_fast(tmp_path: Path,
                                                                ray_env: dict) -> None:
    """Flower's backend would refuse them ("ActorPool is empty") once its engine started;
    fedcl refuses them as soon as Ray is up, in one line, before any MLflow run exists."""
    started = time.monotonic()
    res = run_fedcl("simulate", *TINY, "--client-cpus", "64", "--experiment", "crash",
                    "--output", str(tmp_path / "out"), cwd=tmp_path, env=ray_env, timeout=180)
    assert time.monotonic() - started < 120
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("fedcl: error: no client fits on this machine: each asks for 64 "
                               "CPUs and 0 GPUs (client_cpus, client_gpus), the largest node "
                               "has "), lines[0]
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_ctrl_c_marks_run_failed_and_leaves_nothing(tmp_path: Path, ray_env: dict) -> None:
    env = {**os.environ, **ray_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcl.cli", "simulate", "--clients", "3", "--tasks", "5",
         "--rounds-per-task", "20", "--experiment", "sigint", "--output",
         str(tmp_path / "out")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    # wait for the first round to finish, then interrupt as Ctrl-C would
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    seen = False
    while time.monotonic() < deadline and not seen:
        seen = "round 1/20" in proc.stdout.readline()
    assert seen, "the run never finished its first round"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"fedcl: interrupted by SIGINT; the MLflow run is marked FAILED; "
        f"`fedcl simulate --resume {tmp_path / 'out'}` continues it"]
    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "sigint")
    assert [r["status"] for r in runs] == ["FAILED"]
    history = tracking.metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}", runs[0]["run_id"],
                                      "avg_acc")
    assert len(history) >= 1  # what was logged before the interrupt is kept


def test_same_seed_same_matrix_and_resume_after_kill_9(tmp_path: Path, ray_env: dict) -> None:
    """Two runs with one seed, the second killed with SIGKILL in task 2 and resumed: the same
    accuracy matrix and curves (task-IL FedProx with 2 of 3 clients per round)."""
    args = ("--clients", "3", "--tasks", "2", "--rounds-per-task", "2", "--seed", "5",
            "--scenario", "task-il", "--strategy", "fedprox", "--strategy-param",
            "proximal_mu=0.1", "--fraction-train", "0.7", "--eval-samples-per-task", "300",
            "--experiment", "resume")
    whole = run_fedcl("simulate", *args, "--output", str(tmp_path / "whole"), cwd=tmp_path,
                      env=ray_env)
    assert whole.returncode == 0, whole.stderr
    expected = _summary(tmp_path / "whole")
    assert expected["strategy"] == "fedprox"
    assert expected["config"]["strategy_params"] == {"proximal_mu": 0.1}
    # fraction 0.7 of 3 clients: 2 clients per round
    assert [r["clients"] for r in expected["rounds"]] == [2, 2, 2, 2]
    # task-IL with the task id given: binary heads keep old tasks far above chance
    assert expected["accuracy_matrix"][1][0] > 0.6

    env = {**os.environ, **ray_env}
    proc = subprocess.Popen([sys.executable, "-m", "fedcl.cli", "simulate", *args, "--output",
                             str(tmp_path / "cut")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    seen = False
    while time.monotonic() < deadline and not seen:
        seen = "task 1 of 0-1  round 1/2" in proc.stdout.readline()
    assert seen, "the run never reached task 2"
    started = psutil.Process(proc.pid).children(recursive=True)  # Ray's, by pid
    session = checkpoint.load(tmp_path / "cut")["ray_session_dir"]
    proc.kill()  # SIGKILL mid-task: no handler runs, the MLflow run stays RUNNING
    proc.wait(timeout=30)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    assert not (tmp_path / "cut" / "summary.json").exists()
    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    cut_id = next(r["run_id"] for r in runs if r["status"] == "RUNNING")

    res = run_fedcl("simulate", "--resume", str(tmp_path / "cut"), cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr
    # the resume stopped everything the killed run had started (Ray's agents, renamed
    # `ray::...`, would otherwise live on for a minute)
    assert alive(started) == [] and ray_session_processes(session) == []
    resumed = _summary(tmp_path / "cut")
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert [r["acc_per_task"] for r in resumed["rounds"]] == [
        r["acc_per_task"] for r in expected["rounds"]]
    assert resumed["mlflow_run_id"] == cut_id
    assert expected["resumes"] == []
    [resume] = resumed["resumes"]  # killed in round 3: its checkpoint, or round 2's
    assert resume["after_round"] in (2, 3) and resume["client_stores_lost"] is False
    runs = {r["run_id"]: r for r in tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                         "resume")}
    assert len(runs) == 2 and runs[cut_id]["status"] == "FINISHED"
    assert runs[cut_id]["metrics"]["acc"] == pytest.approx(expected["acc"])
    steps = {s for s, _ in tracking.metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                   cut_id, "avg_acc")}
    assert steps == {1, 2, 3, 4}


def test_resume_errors_are_one_line(tmp_path: Path) -> None:
    res = run_fedcl("simulate", "--resume", str(tmp_path / "nothing"), cwd=tmp_path)
    assert res.returncode == 2  # bad input, as every other
    assert res.stderr.strip() == (f"fedcl: error: no checkpoint to resume from: "
                                  f"{tmp_path / 'nothing'} does not exist")
    (tmp_path / "early").mkdir()  # a run stopped before its first round was saved
    (tmp_path / "early" / "flower.log").write_text("", encoding="utf-8")
    res = run_fedcl("simulate", "--resume", str(tmp_path / "early"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"fedcl: error: no checkpoint to resume from: "
                                  f"{tmp_path / 'early' / 'checkpoint.pt'} does not exist; "
                                  "the run there stopped before its first round was saved: "
                                  "start it again with the same --output")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    res = run_fedcl("simulate", "--resume", str(tmp_path / "bad"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("fedcl: error: cannot read checkpoint")
    res = run_fedcl("simulate", "--resume", str(tmp_path / "bad"), "--clients", "4",
                    cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == ("fedcl: error: --resume continues the run with its own "
                                  "config; drop --clients")
    (tmp_path / "done").mkdir()  # a finished run keeps its last checkpoint beside its summary
    (tmp_path / "done" / "checkpoint.pt").write_bytes(b"a checkpoint")
    (tmp_path / "done" / "summary.json").write_text("{}", encoding="utf-8")
    res = run_fedcl("simulate", "--resume", str(tmp_path / "done"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"fedcl: error: the run in {tmp_path / 'done'} finished (its "
                                  "summary.json is written): nothing to resume; start a new "
                                  "run with another output folder")


@pytest.mark.parametrize("mode", ["hang", "vanish"])
def test_hanging_or_vanishing_clients_never_hang_the_run(tmp_path: Path, ray_env: dict,
                                                         mode: str) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    res = run_fedcl("simulate", "--clients", "5", "--tasks", "2", "--rounds-per-task", "2",
                    "--eval-samples-per-task", "200", "--client-fault-rate", "0.3",
                    "--client-fault-mode", mode, "--round-timeout-s", "8", "--output",
                    str(out), "--experiment", mode, cwd=tmp_path, env=ray_env, timeout=900)
    # never hangs: 4 rounds, each at most its 8 s timeout plus 30 s of messaging and
    # evaluation, and 180 s to start and stop Ray and MLflow on a loaded 2-core machine; the
    # subprocess timeout sits above the bound, so this assertion can fail
    assert time.monotonic() - started < 4 * (8 + 30) + 180
    if res.returncode == 0:
        s = _summary(out)
        assert sum(r["failures"] for r in s["rounds"]) > 0
        assert all(r["clients"] + r["failures"] == 5 for r in s["rounds"])
        if mode == "hang":  # a round waits for its timeout, not for the hung client
            assert max(r["seconds"] for r in s["rounds"]) < 8 + 30
    else:  # too few replies left: one clear line, and the MLflow run is FAILED
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "sampled clients sent a usable update" in lines[0]
        runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", mode)
        assert [r["status"] for r in runs] == ["FAILED"]


def test_runs_started_together_on_one_store_all_finish(tmp_path: Path, ray_env: dict) -> None:
    """A seed sweep started with ``&`` in an empty folder: every run starts (MLflow makes the
    new store's tables once), gets an output folder of its own although their derived names
    fall in the same second, and finishes in the one store."""
    env = {**os.environ, **ray_env}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-m", "fedcl.cli", "simulate", *TINY,
                               "--seed", str(seed), "--experiment", "sweep"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for seed in (1, 2, 3)]
    ends = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, ends, strict=True):
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "sweep")
    assert sorted(r["status"] for r in runs) == ["FINISHED"] * 3
    folders = sorted((tmp_path / "outputs").iterdir())
    assert len(folders) == 3
    summaries = [_summary(folder) for folder in folders]
    assert sorted(s["config"]["seed"] for s in summaries) == [1, 2, 3]
    assert sorted(s["mlflow_run_id"] for s in summaries) == sorted(r["run_id"] for r in runs)
    # each run is named after its folder
    assert sorted(s["config"]["run_name"] for s in summaries) == [f.name for f in folders]


def test_a_reader_that_goes_away_does_not_fail_the_run(tmp_path: Path, ray_env: dict) -> None:
    """``fedcl simulate ... | head -1``: once the pipe's reader has gone the display goes quiet,
    and the run finishes (summary.json, the MLflow run FINISHED) with exit status 0."""
    out = tmp_path / "out"
    env = {**os.environ, **ray_env}
    env.pop("MLFLOW_TRACKING_URI", None)  # the run lands in its own folder
    proc = subprocess.Popen([sys.executable, "-m", "fedcl.cli", "simulate", *TINY, "--output",
                             str(out), "--experiment", "pipe"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # the first line, then the reader is gone
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err
    assert json.loads((out / "summary.json").read_text())["num_tasks"] == 2
    [run] = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "pipe")
    assert run["status"] == "FINISHED"


def test_clients_that_fit_on_no_ray_node_are_refused_in_one_line(tmp_path: Path,
                                                                 ray_env: dict) -> None:
    """More GPUs per client than the machine's Ray instance has: exit 2, one line naming the
    flags and the node's resources (not Flower's "ActorPool is empty"), no MLflow run, no
    summary, and no Ray process left (the fixture checks)."""
    import torch

    gpus = torch.cuda.device_count() + 1
    res = run_fedcl("simulate", *TINY, "--client-gpus", str(gpus), "--output",
                    str(tmp_path / "out"), "--experiment", "fit", cwd=tmp_path, env=ray_env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert re.fullmatch(  # the node's CPUs as Ray counts them (its cgroup's, in a container)
        rf"fedcl: error: no client fits on this machine: each asks for 1 CPUs and {gpus} GPUs "
        rf"\(client_cpus, client_gpus\), the largest node has \d+ CPUs and {gpus - 1} GPUs; "
        r"lower client_cpus or client_gpus", lines[0]), lines[0]
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not (tmp_path / "mlflow.db").exists()
