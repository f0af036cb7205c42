"""``fedcl submit``: run the app on a SuperLink and follow it to its end.

It sends the same Flower App with the same run config as ``flwr run APP SUPERLINK
--run-config ...`` (the FAB built from APP's files, through the SuperLink's Control API, with
Flower's own client and the connection from ``$FLWR_HOME/config.toml``), then follows the
run as ``flwr log`` does and reads its final status as ``flwr ls`` does. What it shows comes
from the ServerApp's event lines in the run's log (:mod:`fedcl.run_events`): fedcl's progress
line per round, the accuracy matrix at the end, where the outputs and the MLflow run are; a
run that fails ends the command with fedcl's one-line error and a non-zero status.

Before anything is sent, the run config is checked against what the app declares
(``[tool.flwr.app.config]`` in APP's pyproject.toml, the keys Flower accepts) and against
fedcl's config types, so that a misspelt key is named here instead of Flower's "Invalid run
configuration". Values that only the SuperLink's fedcl can judge (a strategy's name, the
number of clients against the SuperNodes) are judged by the run itself.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from fedcl.config import FIELDS, Config, _suggest, config_from_dict
from fedcl.errors import ConfigError, FedclError, RunAborted
from fedcl.progress import LiveDisplay, format_matrix
from fedcl.results import RoundRecord
from fedcl.run_clock import RunClock
from fedcl.run_events import parse

#: how often a broken log stream is opened again before the command gives up on the SuperLink
STREAM_RETRIES = 5
STREAM_RETRY_WAIT_S = 2.0

_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # Flower's own (parse_config_args)


class RunFailed(RunAborted):
    """The submitted run ended failed or stopped."""


# ---------------------------------------------------------------------------------------------
# Before submitting: the app and its run config
# ---------------------------------------------------------------------------------------------
def load_app(app: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """APP's pyproject.toml (as Flower reads it) and its declared run config, flattened to
    the dotted keys Flower checks overrides against."""
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    path = app / "pyproject.toml"
    if not path.is_file():
        raise ConfigError(f"no pyproject.toml in {app}: give the folder of the Flower App "
                          "(a checkout of fedcl) with --app")
    try:
        config, _ = load_and_validate(path, check_module=False)
    except ValueError as err:
        raise ConfigError(f"{path} is not a Flower App: {' '.join(str(err).split())}"
                          ) from None
    return config, flatten_dict(config["tool"]["flwr"]["app"].get("config", {}))


def parse_run_config(items: list[str]) -> dict[str, Any]:
    """``--run-config`` texts (``KEY=VALUE`` pairs, TOML values) as Flower parses them; a
    fragment that is not a pair, or a value that is not TOML, is named."""
    import tomli
    from flwr.common.config import parse_config_args

    if len(items) == 1 and items[0].endswith(".toml"):  # a TOML file of overrides
        if not Path(items[0]).expanduser().is_file():
            raise ConfigError(f"--run-config: file not found: {items[0]}")
        items_to_check: list[str] = []
    else:
        items_to_check = items
    for text in items_to_check:
        rest = _PAIR.sub("", text).strip()
        if rest:
            raise ConfigError(f"--run-config: cannot read {rest.split()[0]!r}: give KEY=VALUE "
                              "pairs separated by spaces")
        for key, value in _PAIR.findall(text):
            try:
                tomli.loads(f"{key} = {value}")
            except tomli.TOMLDecodeError:
                raise ConfigError(f"--run-config: {key}={value} is not a TOML value (a string "
                                  f"takes quotes: {key}='{value}')") from None
    try:
        return parse_config_args(items)
    except Exception as err:  # click's or tomli's: one line
        raise ConfigError(f"--run-config: {' '.join(str(err).split())}") from None


def check_run_config(overrides: dict[str, Any], declared: dict[str, Any]) -> Config:
    """Refuse a key the app does not declare (Flower would refuse the run) and a value of
    the wrong type for fedcl's config; returns the config the run would start with."""
    for key in overrides:
        if key not in declared:
            raise ConfigError(f"--run-config: unknown key '{key}'{_suggest(key, declared)}: "
                              "the app's pyproject.toml declares the keys a run takes "
                              "(`fedcl config --flower` lists them)")
    try:
        return Config.from_run_config({**declared, **overrides})
    except ConfigError as err:
        raise ConfigError(f"--run-config: {err}") from None


# ---------------------------------------------------------------------------------------------
# Submitting and following: Flower's Control API client
# ---------------------------------------------------------------------------------------------
def _click_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    return " ".join(str(text).split())


@contextlib.contextmanager
def _flower_errors(what: str) -> Iterator[None]:
    """Flower's CLI errors (click's exceptions, transport errors) as one fedcl line."""
    import click
    import httpx
    import typer

    try:
        yield
    except (click.ClickException, click.exceptions.Exit, typer.Exit) as err:
        raise FedclError(f"{what}: {_click_line(err) or 'refused'}") from None
    except httpx.HTTPError as err:
        raise FedclError(f"{what}: {_click_line(err)}") from None


@dataclass
class Connection:
    """A SuperLink connection of ``$FLWR_HOME/config.toml`` and its Control API client."""

    name: str
    address: str
    federation: str
    client: Any  # flwr.supercore.control.ControlHttpClient

    @classmethod
    def open(cls, name: str | None) -> Connection:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        with _flower_errors("cannot use the SuperLink connection"):
            conn = read_superlink_connection(name)
            with contextlib.redirect_stdout(io.StringIO()):  # Flower's "Using SuperLink" line
                client = init_http_client_from_connection(conn)
        return cls(conn.name, str(conn.address), conn.federation or "", client)

    def close(self) -> None:
        self.client.close()


def start_run(conn: Connection, app: Path, overrides: dict[str, Any]) -> int:
    """Send APP as a FAB with ``overrides``, as ``flwr run`` does; returns the run id."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import flwr_cli_exc_handler
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    with _flower_errors(f"cannot build the Flower App in {app}"):
        fab_bytes = build_fab_from_disk(app)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    request = StartRunRequest(fab=fab_to_proto(fab),
                              override_config=user_config_to_proto(overrides),
                              federation=conn.federation, app_spec="")
    with _flower_errors(f"the SuperLink '{conn.name}' ({conn.address}) did not start the run"):
        with flwr_cli_exc_handler():
            res = conn.client.StartRun(request)
    if not res.HasField("run_id"):
        raise FedclError(f"the SuperLink '{conn.name}' ({conn.address}) did not start the run")
    return int(res.run_id)


def stream_lines(conn: Connection, run_id: int, retries: int = STREAM_RETRIES
                 ) -> Iterator[str]:
    """The run's log, line by line, until the SuperLink says the run is over (as ``flwr
    log``). A stream that breaks is opened again from the last line received."""
    import httpx
    from flwr.proto.control_pb2 import StreamLogsRequest

    after, pending, failures = 0.0, "", 0
    while True:
        try:
            for res in conn.client.StreamLogs(StreamLogsRequest(run_id=run_id,
                                                                after_timestamp=after)):
                failures = 0
                after = max(after, res.latest_timestamp)
                *lines, pending = (pending + res.log_output).split("\n")
                yield from lines
            break
        except (httpx.HTTPError, ValueError) as err:
            failures += 1
            if failures > retries:
                raise FedclError(f"lost the SuperLink '{conn.name}' ({conn.address}) while "
                                 f"following run {run_id}: {_click_line(err)}; the run may go "
                                 f"on: `flwr log {run_id} {conn.name}` follows it") from None
            time.sleep(STREAM_RETRY_WAIT_S)
    if pending:
        yield pending


@dataclass
class RunStatus:
    status: str  # pending, starting, running, finished
    sub_status: str  # completed, failed, stopped (finished runs)
    details: str


def run_status(conn: Connection, run_id: int) -> RunStatus:
    """The run's status, sub-status and details, as ``flwr ls --run-id`` shows them."""
    from flwr.cli.utils import flwr_cli_exc_handler
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    with _flower_errors(f"cannot read the status of run {run_id}"):
        with flwr_cli_exc_handler():
            res = conn.client.ListRuns(ListRunsRequest(run_id=run_id))
    if run_id not in res.run_dict:
        raise FedclError(f"the SuperLink '{conn.name}' does not know run {run_id}")
    status = run_from_proto(res.run_dict[run_id]).status
    return RunStatus(status.status, status.sub_status, status.details)


# ---------------------------------------------------------------------------------------------
# What the operator sees
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What the events of a run's log said."""

    summary: dict[str, Any] | None = None  # the ``end`` event
    error: str | None = None  # the ``failed`` event
    started: bool = False
    warnings: list[str] = field(default_factory=list)


def _round_record(payload: dict[str, Any]) -> RoundRecord:
    known = {f.name for f in fields(RoundRecord)}
    return RoundRecord(**{k: v for k, v in payload.items() if k in known})


def _config(payload: dict[str, Any]) -> Config:
    return config_from_dict({k: v for k, v in payload.items() if k in FIELDS},
                            source="the run's start event")


def follow(lines: Iterator[str], display: Any, err: TextIO,
           other: Callable[[str], None] | None = None) -> Outcome:
    """Drive ``display`` (a :class:`~fedcl.progress.LiveDisplay`) from the run's event
    lines; ``other`` gets every other line (Flower's own log)."""
    outcome = Outcome()
    for line in lines:
        event = parse(line)
        if event is None:
            if other is not None:
                other(line)
            continue
        kind, payload = event
        try:
            if kind == "start":
                outcome.started = True
                if "run_elapsed_s" in payload:  # the display's clock runs with the run's
                    display.clock = RunClock.since(float(payload["run_elapsed_s"]))
                display.on_start(_config(payload["config"]), int(payload["total_rounds"]),
                                 payload.get("mlflow_run_id"),
                                 payload.get("mlflow_tracking_uri", ""))
            elif kind == "round":
                display.on_round(_round_record(payload))
            elif kind == "erasure":
                display.on_erasure(payload)
            elif kind == "note":
                display.on_note(str(payload.get("message", "")))
            elif kind == "warning":
                outcome.warnings.append(str(payload.get("message", "")))
                print(f"fedcl: warning: {payload.get('message', '')}", file=err, flush=True)
            elif kind == "end":
                outcome.summary = payload
            elif kind == "failed":
                outcome.error = str(payload.get("error", ""))
        except (KeyError, TypeError, ValueError, FedclError):
            if other is not None:  # an event this fedcl cannot read (another version's)
                other(line)
    return outcome


SERVERAPP_FAILED = "ServerApp failed with exception: "


def failure_line(run_id: int, status: RunStatus, outcome: Outcome, conn: Connection) -> str:
    """The one line for a run that did not complete: fedcl's own error where the ServerApp
    printed it, else Flower's details."""
    if status.sub_status == "stopped":
        return f"run {run_id} was stopped on the SuperLink ({status.details or 'flwr stop'})"
    cause = outcome.error or status.details.removeprefix(SERVERAPP_FAILED).strip()
    # the ServerApp's resume hint names no connection: this one is the run's
    cause = cause.replace("`fedcl submit --resume ", f"`fedcl submit {conn.name} --resume ")
    return (f"run {run_id} failed: {cause or 'no reason given'} "
            f"(`flwr log {run_id} {conn.name}` shows its log)")


def mlflow_hint(uri: str) -> str:
    """How to look at an MLflow store: a server's page, or ``mlflow ui`` on a local store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def print_result(summary: dict[str, Any], out: TextIO) -> None:
    """The accuracy matrix and scores, then where the outputs and the MLflow run are (paths
    on the SuperLink's host)."""
    print(format_matrix(summary), file=out)
    print(f"summary: {summary['output_dir']}/summary.json (on the SuperLink's host)", file=out)
    uri = summary.get("mlflow_tracking_uri") or ""
    experiment = summary.get("experiment")
    named = f" (experiment '{experiment}')" if experiment else ""
    print(f"MLflow run {summary.get('mlflow_run_id')} in {uri}{named}: {mlflow_hint(uri)}",
          file=out)
    if summary.get("mlflow_outbox"):
        print(f"fedcl: warning: MLflow at {uri} was unreachable at the end; what it lacks is "
              f"kept in {summary['mlflow_outbox']} on the SuperLink's host: send it with "
              f"`fedcl sync {summary['output_dir']}` there", file=sys.stderr)


@dataclass
class Submission:
    """What ``fedcl submit`` was asked: the app, the connection, the run config."""

    app: Path = Path(".")
    superlink: str | None = None
    run_config: list[str] = field(default_factory=list)
    verbose: bool = False


def submit(job: Submission, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Check, submit, follow to the end; returns 0 for a completed run, raises
    :class:`RunFailed` (one line) for a failed or stopped one."""
    out, err = out or sys.stdout, err or sys.stderr
    _, declared = load_app(job.app)
    overrides = parse_run_config(job.run_config)
    check_run_config(overrides, declared)
    conn = Connection.open(job.superlink)
    try:
        run_id = start_run(conn, job.app, overrides)
        print(f"fedcl: run {run_id} submitted to SuperLink '{conn.name}' ({conn.address}); "
              "waiting for its SuperNodes", file=out, flush=True)
        display = LiveDisplay(out)
        other = (lambda line: print(line, file=err, flush=True)) if job.verbose else None
        try:
            outcome = follow(stream_lines(conn, run_id), display, err, other)
        except KeyboardInterrupt:
            display.close()
            print(f"fedcl: stopped following run {run_id}; it goes on on the SuperLink: "
                  f"`flwr log {run_id} {conn.name}` follows it, `flwr stop {run_id} "
                  f"{conn.name}` stops it", file=err, flush=True)
            return 130
        finally:
            display.close()
        status = run_status(conn, run_id)
    finally:
        conn.close()
    if status.sub_status != "completed":
        raise RunFailed(failure_line(run_id, status, outcome, conn))
    if outcome.summary is None:
        print(f"fedcl: run {run_id} completed (its log held no fedcl summary: is fedcl on "
              "the SuperLink older than this one?)", file=out)
        return 0
    print_result(outcome.summary, out)
    return 0


__all__ = ["Connection", "Outcome", "RunFailed", "RunStatus", "Submission", "check_run_config",
           "failure_line", "follow", "load_app", "mlflow_hint", "parse_run_config",
           "print_result", "run_status", "start_run", "stream_lines", "submit"]
