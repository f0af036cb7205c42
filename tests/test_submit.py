"""``fedcl submit``'s parts that need no SuperLink: the run config checks, the event lines the
ServerApp prints and how they are shown, the failure line. tests/test_deployment.py submits
to a real SuperLink."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fedcl import STATUS_LOGGER
from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.progress import LiveDisplay
from fedcl.results import RoundRecord
from fedcl.run_clock import RunClock
from fedcl.run_events import EventPrinter, WarningEvents, absolute_uri, format_event, parse
from fedcl.submit import (
    Connection,
    RunStatus,
    check_run_config,
    failure_line,
    follow,
    load_app,
    mlflow_hint,
    parse_run_config,
)
from tests.conftest import ROOT


def test_run_config_is_read_as_flower_reads_it() -> None:
    assert parse_run_config(["clients=3 strategy='fedprox' lr=0.1",
                             "strategy-params='mu=0.5'"]) == {
        "clients": 3, "strategy": "fedprox", "lr": 0.1, "strategy-params": "mu=0.5"}
    assert parse_run_config([]) == {}


@pytest.mark.parametrize(("text", "message"), [
    ("strategy=fedprox", "--run-config: strategy=fedprox is not a TOML value (a string takes "
                         "quotes: strategy='fedprox')"),
    ("clients=3 tasks", "--run-config: cannot read 'tasks': give KEY=VALUE pairs separated by "
                        "spaces"),
    ("missing.toml", "--run-config: file not found: missing.toml"),
])
def test_unreadable_run_config_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config([text])
    assert str(err.value) == message


def test_run_config_keys_and_types_are_checked_against_the_app() -> None:
    _, declared = load_app(ROOT)
    assert declared["clients"] == Config().clients  # pyproject.toml's defaults
    config = check_run_config({"clients": 4, "strategy": "nope"}, declared)
    assert (config.clients, config.strategy) == (4, "nope")  # names: the SuperLink's to judge
    with pytest.raises(ConfigError, match=r"unknown key 'client' \(did you mean 'clients'\?\)"):
        check_run_config({"client": 4}, declared)
    with pytest.raises(ConfigError, match="'clients' in the Flower run config must be an "
                                          "integer, got 'four'"):
        check_run_config({"clients": "four"}, declared)


def test_event_lines_round_trip() -> None:
    line = format_event("round", {"acc": float("nan"), "text": "a\nb"})
    assert "\n" not in line
    assert parse("INFO :      " + line) == ("round", {"acc": None, "text": "a\nb"})
    assert parse("INFO :      Starting run") is None
    assert parse("fedcl-event {not json") is None
    assert absolute_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert absolute_uri("sqlite:////srv/m.db") == "sqlite:////srv/m.db"
    assert absolute_uri("sqlite:///m.db").startswith("sqlite:////")


def _record(task: int, acc: list[float]) -> RoundRecord:
    return RoundRecord(task=task, round=task + 1, task_round=1, acc_per_task=acc,
                       avg_acc=sum(acc[:task + 1]) / (task + 1), min_acc=None, wc_acc=0.0,
                       train_loss=0.1, clients=2, failures=0, seconds=1.5)


def test_follow_shows_the_runs_progress_from_its_events() -> None:
    """The lines an EventPrinter writes drive the same live display as `fedcl simulate`;
    Flower's own lines go elsewhere (or nowhere)."""
    log = io.StringIO()
    printer = EventPrinter(log, clock=RunClock.since(4.2))  # the run began 4.2 s ago
    config = Config(clients=2, tasks=2, rounds_per_task=1)
    printer.on_start(config, 2, "abc", "http://mlflow:5000")
    log.write("INFO :      [ROUND 1]\n")
    printer.on_round(_record(0, [0.9, 0.0]))
    printer.emit("warning", {"message": "clients with partition-id [1] left the federation"})
    status = logging.getLogger(STATUS_LOGGER)  # a status line is a note event
    handler = WarningEvents(printer)
    status.addHandler(handler)
    try:
        status.info("erasure: %s (%s)", "client 1 after task 0", "ssd")
    finally:
        status.removeHandler(handler)
    printer.on_round(_record(1, [0.5, 0.9]))
    printer.on_end({"accuracy_matrix": [[0.9, 0.0], [0.5, 0.9]], "acc": 0.7, "rounds": [1],
                    "output_dir": "/srv/out", "mlflow_run_id": "abc",
                    "mlflow_tracking_uri": "http://mlflow:5000", "wall_time_s": 3.0})
    out, err, other = io.StringIO(), io.StringIO(), []
    outcome = follow(iter(log.getvalue().splitlines()), LiveDisplay(out), err, other.append)
    shown = out.getvalue().splitlines()
    # the display's clock runs with the run's (its start event says how far it has gone)
    assert shown[0] == ("fedcl: fedavg on mnist class-il, 2 tasks (0-1) x 1 rounds, 2 clients "
                        "(2 per round); MLflow run abc; started in 4.2 s")
    assert shown[1] == ("task 0 of 0-1  round 1/1  avg acc  90.0%  current task  90.0%   1.5s"
                        "  run 0:00:04")
    assert shown[2] == "fedcl: erasure: client 1 after task 0 (ssd)"
    assert shown[3] == ("task 1 of 0-1  round 1/1  avg acc  70.0%  current task  90.0%   1.5s"
                        "  run 0:00:04")
    assert err.getvalue() == ("fedcl: warning: clients with partition-id [1] left the "
                              "federation\n")
    assert other == ["INFO :      [ROUND 1]"]
    assert outcome.summary is not None and "rounds" not in outcome.summary
    assert outcome.summary["output_dir"] == "/srv/out"
    assert outcome.error is None and outcome.started


def test_failure_line_prefers_fedcls_own_error() -> None:
    conn = Connection("fed", "link:8000", "", client=None)
    failed = RunStatus("finished", "failed", "ServerApp failed with exception: boom")
    outcome = follow(iter([format_event("failed", {"error": "clients must be positive"})]),
                     LiveDisplay(io.StringIO()), io.StringIO())
    assert failure_line(7, failed, outcome, conn) == (
        "run 7 failed: clients must be positive (`flwr log 7 fed` shows its log)")
    assert failure_line(7, failed, follow(iter([]), None, io.StringIO()), conn) == (
        "run 7 failed: boom (`flwr log 7 fed` shows its log)")
    stopped = RunStatus("finished", "stopped", "")
    assert failure_line(7, stopped, outcome, conn) == (
        "run 7 was stopped on the SuperLink (flwr stop)")


def test_mlflow_hint_fits_the_store() -> None:
    assert mlflow_hint("http://mlflow:5000") == "open http://mlflow:5000 in a browser"
    assert mlflow_hint("sqlite:////srv/mlflow.db") == (
        "mlflow ui --backend-store-uri sqlite:////srv/mlflow.db")
    assert json.loads(format_event("end", {})[len("fedcl-event "):]) == {"event": "end"}


def test_outputs_folder_follows_fedcl_outputs(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A SuperLink's ServerApps write to its working folder; FEDCL_OUTPUTS moves the runs'
    output folders elsewhere (the run config's `output` still wins)."""
    from pathlib import Path

    from fedcl.run_setup import output_folder

    monkeypatch.delenv("FEDCL_OUTPUTS", raising=False)
    assert output_folder(Config(), "run-a") == Path("outputs/run-a")
    monkeypatch.setenv("FEDCL_OUTPUTS", str(tmp_path))
    assert output_folder(Config(), "run-a") == tmp_path / "run-a"
    assert output_folder(Config(output="/srv/x"), "run-a") == Path("/srv/x")
