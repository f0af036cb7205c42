"""The live display of ``fedcl simulate`` and its closing table."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from fedcl.config import Config
from fedcl.results import RoundRecord


def _pct(value: float | None) -> str:
    return "  -  " if value is None else f"{value * 100:5.1f}"


class LiveDisplay:
    """A rich progress bar on a terminal; one plain line per round otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._bar: Any = None
        self._task_id: Any = None
        self.num_tasks = 0
        self.rounds_per_task = 0

    def on_start(self, config: Config, total_rounds: int, run_id: str | None,
                 tracking_uri: str) -> None:
        self.num_tasks, self.rounds_per_task = config.tasks, config.rounds_per_task
        per_round = max(1, int(config.clients * config.fraction_train))
        print(f"fedcl: {config.strategy} on {config.dataset} {config.scenario}, "
              f"{config.tasks} tasks x {config.rounds_per_task} rounds, {config.clients} "
              f"clients ({per_round} per round); MLflow run {run_id}",
              file=self.stream, flush=True)
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task_id = self._bar.add_task("starting clients...", total=total_rounds)

    def on_round(self, record: RoundRecord) -> None:
        text = (f"task {record.task + 1}/{self.num_tasks}  round {record.task_round}/"
                f"{self.rounds_per_task}  avg acc {_pct(record.avg_acc)}%  current task "
                f"{_pct(record.acc_per_task[record.task])}%  {record.seconds:4.1f}s")
        if record.failures:
            text += f"  ({record.failures} failed)"
        if self._bar is not None:
            self._bar.update(self._task_id, advance=1, description=text)
        else:
            print(text, file=self.stream, flush=True)

    def on_erasure(self, entry: dict[str, Any]) -> None:
        """One line when a request has been carried out: what, how, and its judged result."""
        text = format_erasure(entry)
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


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
                 f"FWT {fmt('fwt')}%   wall time {summary['wall_time_s']:.1f} s")
    intransigence = (f"intransigence {fmt('intransigence')}%"
                     if summary.get("intransigence") is not None
                     else "intransigence n/a (no jointly trained reference: "
                          "set intransigence_reference)")
    lines.append(f"learning accuracy {fmt('learning_accuracy')}%   {intransigence}")
    return "\n".join(lines)
