"""The live display of ``fedcl simulate`` and its closing table.

Tasks count from 0 and rounds from 1 here as everywhere (summary.json, ``--erase``, MLflow's
``acc_task_<j>``, the plots): ``task 1 of 0-4  round 2/3`` is the second round of the second
of five tasks. Times are the run's (:mod:`fedcl.run_clock`): the display's clock counts from
the process's start, as ``wall_time_s`` does, and the closing table splits it into start-up,
rounds and shutdown.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from fedcl import log_line_kind
from fedcl.config import Config
from fedcl.results import RoundRecord
from fedcl.run_clock import RunClock


def task_label(task: int, num_tasks: int) -> str:
    """``task 1 of 0-4``: the task as it is counted everywhere (from 0), and the range."""
    return f"task {task} of 0-{num_tasks - 1}"


def clock_text(seconds: float) -> str:
    """``0:01:05``: hours, minutes and seconds."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class RunTimeColumn(ProgressColumn):
    """The run's time so far (:meth:`RunClock.elapsed`: from the process's start, as
    ``wall_time_s``), where rich's own column would count from the bar's start."""

    def __init__(self, clock: RunClock) -> None:
        super().__init__()
        self.clock = clock

    def render(self, task: Any) -> Text:
        return Text(f"run {clock_text(self.clock.elapsed())}", style="progress.elapsed")


#: A round line names its task end's time (the strategy's end_task, the erasure requests due
#: after the task) when it takes at least this many seconds of the round's.
TASK_END_SHOWN_S = 1.0


def _pct(value: float | None) -> str:
    return "  -  " if value is None else f"{value * 100:5.1f}"


class LiveDisplay:
    """A rich progress bar on a terminal; one plain line per round otherwise."""

    def __init__(self, stream: TextIO | None = None, clock: RunClock | None = None) -> None:
        self.stream = stream or sys.stdout
        self.clock = clock or RunClock.since(0.0)
        self.live = self.stream.isatty()
        self._bar: Any = None
        self._task_id: Any = None
        self.num_tasks = 0
        self.rounds_per_task = 0
        self.gone = False  # the stream's reader has gone (a closed pipe)

    def on_start(self, config: Config, total_rounds: int, run_id: str | None,
                 tracking_uri: str) -> None:
        self.num_tasks, self.rounds_per_task = config.tasks, config.rounds_per_task
        per_round = max(1, int(config.clients * config.fraction_train))
        self._say(f"fedcl: {config.strategy} on {config.dataset} {config.scenario}, "
                  f"{config.tasks} tasks (0-{config.tasks - 1}) x {config.rounds_per_task} "
                  f"rounds, {config.clients} clients ({per_round} per round); MLflow run "
                  f"{run_id}; started in {self.clock.elapsed():.1f} s")
        if self.live:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), RunTimeColumn(self.clock),
                                     console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task_id = self._bar.add_task("starting clients...", total=total_rounds)

    def on_startup(self, line: str) -> None:
        """A start-up line: ``starting: <what> [run time]``."""
        self._say(f"starting: {line}  [{clock_text(self.clock.elapsed())}]")

    def on_round(self, record: RoundRecord) -> None:
        text = (f"{task_label(record.task, self.num_tasks)}  round {record.task_round}/"
                f"{self.rounds_per_task}  avg acc {_pct(record.avg_acc)}%  current task "
                f"{_pct(record.acc_per_task[record.task])}%  {record.seconds:4.1f}s")
        task_end = record.phases.get("end_task", 0.0)
        if task_end >= TASK_END_SHOWN_S:  # the task's end and the erasures due after it
            text += f" (task end {task_end:.1f}s)"
        if record.failures:
            text += f"  ({record.failures} failed)"
        if self._bar is None:  # the bar shows the run's time in a column of its own
            text += f"  run {clock_text(self.clock.elapsed())}"
        if self._bar is not None:
            self._bar.update(self._task_id, advance=1, description=text)
        else:
            self._say(text)

    def on_erasure(self, entry: dict[str, Any]) -> None:
        """One line when a request has been carried out: what, how, and its judged result."""
        text = format_erasure(entry)
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self._say(text)

    def on_warning(self, text: str) -> None:
        """One line, ``fedcl: warning: <text>``, above the progress bar when there is one."""
        self.on_note(f"warning: {text}")

    def on_note(self, text: str) -> None:
        """One status line, ``fedcl: <text>``, above the progress bar when there is one."""
        line = f"fedcl: {text}"
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            self._say(line)

    def _say(self, text: str) -> None:
        """One line to the stream; once its reader has gone (``fedcl simulate ... | head``),
        the display goes quiet and the run goes on (its results are in summary.json and
        MLflow), rather than a closed pipe failing the run."""
        if self.gone:
            return
        try:
            print(text, file=self.stream, flush=True)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.gone = True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class ConsoleWarnings(logging.Handler):
    """fedcl's log records of WARNING and above (a strategy's or unlearning method's notices,
    such as FedEWC's stability check or SSD's selection bound) on the live display as
    ``fedcl: warning: <text>``, and the status lines of :data:`fedcl.STATUS_LOGGER` as
    ``fedcl: <text>``, one line each: while a simulation runs, the process's stderr goes to
    flower.log, where they would otherwise be all that is left of them."""

    def __init__(self, display: LiveDisplay) -> None:
        super().__init__(logging.INFO)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = log_line_kind(record)
            if kind == "warning":
                self.display.on_warning(record.getMessage())
            elif kind == "note":
                self.display.on_note(record.getMessage())
        except Exception:  # a log line is never worth the run
            self.handleError(record)


def format_erasure(entry: dict[str, Any]) -> str:
    """A carried-out request and its judged result against the retrain oracle, one line:
    forget, retain and test accuracy and the MIA, each with the oracle's and the gap in
    points, and the weights' relative distance."""
    oracle = entry.get("oracle", {})
    parts = []
    for key, label in (("forget_acc", "forget"), ("retain_acc", "retain"),
                       ("test_acc", "test"), ("mia", "MIA")):
        mine, theirs = entry.get(key), oracle.get(key)
        if mine is None or theirs is None:
            parts.append(f"{label} n/a")
            continue
        parts.append(f"{label} {100 * mine:.1f}% (oracle {100 * theirs:.1f}%, "
                     f"{100 * (mine - theirs):+.1f})")
    distance = entry.get("distance_to_oracle", {}).get("weights")
    if distance is not None:
        parts.append(f"weights {distance:.3f} from the oracle's")
    return (f"erasure '{entry['request']}' carried out by {entry['method']} after round "
            f"{entry['round']}: " + ", ".join(parts))


def format_matrix(summary: dict[str, Any]) -> str:
    """The accuracy matrix (in %) with ACC, forgetting, BWT and FWT below it, then plasticity:
    learning accuracy and intransigence (or why there is none)."""
    matrix = summary["accuracy_matrix"]
    t = len(matrix)
    lines = ["accuracy (%)   " + " ".join(f"task{j:<3d}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"after task {i:<3d}" + " ".join(f"{v * 100:7.1f}" for v in row))

    def fmt(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None else f"{v * 100:.2f}"

    lines.append(f"ACC {fmt('acc')}%   forgetting {fmt('forgetting')}%   BWT {fmt('bwt')}%   "
                 f"FWT {fmt('fwt')}%")
    intransigence = (f"intransigence {fmt('intransigence')}%"
                     if summary.get("intransigence") is not None
                     else "intransigence n/a (no jointly trained reference: "
                          "set intransigence_reference)")
    lines.append(f"learning accuracy {fmt('learning_accuracy')}%   {intransigence}")
    lines.append(format_times(summary))
    return "\n".join(lines)


def format_times(summary: dict[str, Any]) -> str:
    """``wall time 31.2 s = start-up 12.1 s + rounds 14.0 s + shutdown 5.1 s``: the run's
    time figures (:mod:`fedcl.run_clock`) as summary.json and MLflow hold them."""
    parts = [f"{label} {summary[key]:.1f} s" for key, label in (
        ("time_startup_s", "start-up"), ("time_rounds_s", "rounds"),
        ("time_shutdown_s", "shutdown")) if summary.get(key) is not None]
    return f"wall time {summary['wall_time_s']:.1f} s" + (
        " = " + " + ".join(parts) if parts else "")
