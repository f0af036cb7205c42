"""The MLflow tracker against a real ``mlflow server`` that goes away and comes back: nothing
logged during the outage is lost, and what is still unsent at the end waits for ``fedcl sync``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedcl import tracking
from fedcl.errors import FedclError
from fedcl.results import RoundRecord
from tests.conftest import run_fedcl


def _record(round_: int) -> RoundRecord:
    acc = [0.5 + round_ / 100, 0.25 + round_ / 200]
    return RoundRecord(task=1, round=round_, task_round=round_, acc_per_task=acc,
                       avg_acc=sum(acc) / 2, min_acc=None, wc_acc=None, train_loss=1.0 / round_,
                       clients=3, failures=round_ % 2, rejected=0, seconds=0.1)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_outage_mid_run_queues_then_sends_everything(tmp_path: Path, mlflow_server) -> None:
    outbox = tmp_path / tracking.OUTBOX_FILE
    tracker = tracking.Tracker(mlflow_server.uri, "outage", "mid-run", outbox=outbox,
                               retry_every_s=0.0)
    run_id = tracker.start({"strategy": "fedavg", "scenario": "class-il", "dataset": "mnist"})
    tracker.log_round(_record(1))
    assert tracker.wait_sent(60) and tracker.pending == 0 and not outbox.exists()

    mlflow_server.stop()
    tracker.log_round(_record(2))
    _wait_for(lambda: tracker.unreachable)
    tracker.log_round(_record(3))
    assert tracker.pending == 2
    header, ops = tracking.read_outbox(outbox)
    assert header == {"tracking_uri": mlflow_server.uri, "run_id": run_id}
    assert [op["op"] for op in ops] == ["metrics", "metrics"]
    assert {m[3] for op in ops for m in op["metrics"]} == {2, 3}

    mlflow_server.start()
    tracker.log_round(_record(4))  # the next try finds the server back and sends the queue
    assert tracker.wait_sent(60) and tracker.pending == 0 and not outbox.exists()
    history = tracking.metric_history(mlflow_server.uri, run_id, "acc_task_0")
    assert history == [(r, pytest.approx(0.5 + r / 100)) for r in (1, 2, 3, 4)]
    failures = tracking.metric_history(mlflow_server.uri, run_id, "failures")
    assert [v for _, v in failures] == [1.0, 0.0, 1.0, 0.0]

    summary = {"acc": 0.75, "forgetting": 0.125, "bwt": -0.125}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert tracker.finish(summary, [tmp_path / "summary.json"]) == 0
    assert tracking.run_status(mlflow_server.uri, run_id) == "FINISHED"
    stored = [p for p in (mlflow_server.root / "artifacts").rglob("summary.json")
              if run_id in p.parts]
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == summary


def test_server_down_at_the_end_keeps_outbox_for_fedcl_sync(tmp_path: Path,
                                                            mlflow_server) -> None:
    outbox = tmp_path / tracking.OUTBOX_FILE
    tracker = tracking.Tracker(mlflow_server.uri, "outage", "at-end", outbox=outbox,
                               retry_every_s=0.0)
    run_id = tracker.start({"strategy": "fot", "scenario": "task-il", "dataset": "mnist"})
    tracker.log_round(_record(1))
    assert tracker.wait_sent(60)
    mlflow_server.stop()
    tracker.log_round(_record(2))
    unsent = tracker.finish({"acc": 0.5, "forgetting": 0.0}, [], wait_s=0.0)
    # round 2, the final metrics, the status tag and FINISHED
    assert unsent == 4
    _, ops = tracking.read_outbox(outbox, run_id)
    assert [op["op"] for op in ops] == ["metrics", "metrics", "tag", "status"]
    assert ops[-1] == {"op": "status", "status": "FINISHED"}

    down = run_fedcl("sync", str(tmp_path), cwd=tmp_path)
    assert down.returncode == 1
    assert down.stderr.strip() == (f"fedcl: error: MLflow at {mlflow_server.uri} is still "
                                   f"unreachable; 4 operations kept in {outbox}")
    assert outbox.exists()

    mlflow_server.start()
    up = run_fedcl("sync", str(tmp_path), cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"sent 4 queued operations to MLflow run {run_id}"
    assert not outbox.exists()
    assert tracking.run_status(mlflow_server.uri, run_id) == "FINISHED"
    assert [s for s, _ in tracking.metric_history(mlflow_server.uri, run_id, "avg_acc")] == [1, 2]
    final = tracking.metric_history(mlflow_server.uri, run_id, "acc")
    assert final == [(0, 0.5)]

    again = run_fedcl("sync", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip() == f"fedcl: error: no MLflow outbox at {outbox}: nothing to send"


def test_a_frozen_server_never_holds_the_round_loop_up(tmp_path: Path, mlflow_server,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes connections but never answers (a network black hole) makes every
    request wait out MLflow's HTTP timeout; the rounds go on meanwhile (the sender waits, not
    the loop), say what they waited and what is queued, and everything arrives once the
    server answers again."""
    timeout_s = 30.0  # one blocked request alone would take this long
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    outbox = tmp_path / tracking.OUTBOX_FILE
    tracker = tracking.Tracker(mlflow_server.uri, "outage", "frozen", outbox=outbox)
    run_id = tracker.start({"strategy": "fedavg", "scenario": "class-il", "dataset": "mnist"})
    tracker.log_round(_record(1))
    assert tracker.wait_sent(60)
    tracker.take_waited()
    mlflow_server.freeze()
    try:
        t0 = time.monotonic()
        for round_ in range(2, 7):
            tracker.log_round(_record(round_))
        spent = time.monotonic() - t0
        waited = tracker.take_waited()
        assert spent < timeout_s and waited <= spent  # not one request's wait
        assert tracker.pending == 5 and not tracker.unreachable  # in flight, not yet failed
    finally:
        mlflow_server.freeze(False)
    assert tracker.wait_sent(120) and tracker.pending == 0
    history = tracking.metric_history(mlflow_server.uri, run_id, "avg_acc")
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]
    assert tracker.finish({"acc": 0.5}, [], wait_s=0.0) == 0
    assert tracking.run_status(mlflow_server.uri, run_id) == "FINISHED"


def test_a_refused_request_is_an_error_not_an_outage(tmp_path: Path, mlflow_server) -> None:
    tracker = tracking.Tracker(mlflow_server.uri, "outage", "refused",
                               outbox=tmp_path / tracking.OUTBOX_FILE)
    tracker.start({"strategy": "fedavg", "scenario": "class-il", "dataset": "mnist"})
    tracker.run_id = "0" * 32  # a run the server does not have: it answers 404
    tracker.log_metrics({"acc": 0.5}, step=1)
    with pytest.raises(FedclError, match=r"^MLflow at .* refused metrics: "):
        tracker.wait_sent(60)
    with pytest.raises(FedclError, match=r"^MLflow at .* refused metrics: "):
        tracker.log_metrics({"acc": 0.25}, step=2)  # the run's next call fails it
    assert not (tmp_path / tracking.OUTBOX_FILE).exists()


def test_bad_outbox_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / tracking.OUTBOX_FILE).write_text("not json\n")
    res = run_fedcl("sync", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"fedcl: error: {tmp_path / tracking.OUTBOX_FILE} is not a "
                                  "fedcl MLflow outbox")
