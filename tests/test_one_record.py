"""One tiny run of the real ``fedcl simulate`` read everywhere a user meets it (the live lines,
the closing table, summary.json, accuracy_matrix.csv, MLflow, the plot): the same numbering
(tasks from 0, rounds from 1, ``--erase`` included) and the same run time (start-up + rounds +
shutdown = ``wall_time_s`` = the MLflow run's duration, close to the process's own time)."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedcl import tracking
from fedcl.plots import BOUNDARY_GID, ERASURE_GID, curves_figure
from fedcl.run_clock import TIME_KEYS
from tests.conftest import run_fedcl
from tests.test_e2e import ray_env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e

ERASE = ("client=1,after-task=0", "client=2,task=1,round=2")


def test_one_run_counts_tasks_and_time_the_same_everywhere(tmp_path: Path,
                                                           ray_env: dict) -> None:  # noqa: F811
    out = tmp_path / "out"
    started = time.monotonic()
    res = run_fedcl("simulate", "--clients", "3", "--tasks", "2", "--rounds-per-task", "2",
                    "--batch-size", "64", "--eval-samples-per-task", "300",
                    "--round-timeout-s", "120", "--erase", ERASE[0], "--erase", ERASE[1],
                    "--output", str(out), "--experiment", "one-record", cwd=tmp_path,
                    env=ray_env)
    elapsed = time.monotonic() - started  # the process's own time, and a little more
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    lines = res.stdout.splitlines()

    # --- one numbering: tasks from 0, rounds within a task and over the run from 1 ---------
    assert [(r["task"], r["task_round"], r["round"]) for r in s["rounds"]] == [
        (0, 1, 1), (0, 2, 2), (1, 1, 3), (1, 2, 4)]
    live = [ln for ln in lines if ln.startswith("task ")]
    assert [ln.split("  avg acc")[0] for ln in live] == [
        "task 0 of 0-1  round 1/2", "task 0 of 0-1  round 2/2",
        "task 1 of 0-1  round 1/2", "task 1 of 0-1  round 2/2"]
    header = next(ln for ln in lines if ln.startswith("fedcl: "))
    assert "2 tasks (0-1) x 2 rounds" in header
    # after-task=0 runs after task 0's last round (2); task=1,round=2 before round 2 of
    # task 1, that is after round 3; the live line and summary.json say the same
    assert [e["request"] for e in s["erasures"]] == list(ERASE)
    assert [e["round"] for e in s["erasures"]] == [2, 3]
    assert s["rounds"][1]["task"] == 0 and s["rounds"][1]["task_round"] == 2
    assert s["rounds"][2]["task"] == 1 and s["rounds"][2]["task_round"] == 1
    carried = [ln for ln in lines if ln.startswith("erasure ")]
    assert [ln.split(":")[0] for ln in carried] == [
        f"erasure '{ERASE[0]}' carried out by retrain after round 2",
        f"erasure '{ERASE[1]}' carried out by retrain after round 3"]
    # ... and the erased clients leave from those points on
    assert [sorted(r["sampled"]) for r in s["rounds"]] == [[0, 1, 2], [0, 1, 2], [0, 2], [0]]
    # the matrix: row i after task i (the last round of task i), column j task j
    assert s["accuracy_matrix"] == [s["rounds"][1]["acc_per_task"],
                                    s["rounds"][3]["acc_per_task"]]
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("accuracy (%)"))):]
    assert table[0].split()[2:] == ["task0", "task1"]
    for i, row in enumerate(s["accuracy_matrix"]):
        assert table[1 + i].split()[:3] == ["after", "task", str(i)]
        assert [float(v) for v in table[1 + i].split()[3:]] == pytest.approx(
            [100 * v for v in row], abs=0.05)
    with (out / "accuracy_matrix.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["after_task", "task_0", "task_1"]
    assert [r[0] for r in rows[1:]] == ["0", "1"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = s["mlflow_run_id"]
    for j in range(2):  # acc_task_<j> is task j, step the round over the run
        history = tracking.metric_history(uri, run_id, f"acc_task_{j}")
        assert history == [(r["round"], pytest.approx(r["acc_per_task"][j]))
                           for r in s["rounds"]]
    assert [v for _, v in tracking.metric_history(uri, run_id, "task")] == [0, 0, 1, 1]
    ax = curves_figure(s).axes[0]  # the plot: task 1 begins before round 3
    assert [ln.get_xdata()[0] for ln in ax.lines if ln.get_gid() == BOUNDARY_GID] == [2.5]
    assert [ln.get_xdata()[0] for ln in ax.lines if ln.get_gid() == ERASURE_GID] == [2.5, 3.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["task 0", "task 1"]

    # --- one run time ------------------------------------------------------------------------
    startup, rounds, shutdown, wall = (s[k] for k in TIME_KEYS)
    assert min(startup, rounds, shutdown) > 0
    assert startup + rounds + shutdown == pytest.approx(wall, abs=1e-9)
    assert sum(r["seconds"] for r in s["rounds"]) == pytest.approx(rounds, abs=1e-6)
    for r in s["rounds"]:  # each round's phases add up to its seconds
        assert sum(r["phases"].values()) == pytest.approx(r["seconds"], abs=1e-6)
    # the erasures' work is inside the rounds they follow
    assert s["rounds"][1]["seconds"] > s["erasures"][0]["oracle"]["seconds"]
    # the process ran the whole of it, and ended soon after (the interpreter's own exit,
    # torch loaded, takes a second or two)
    assert wall < elapsed < wall + 8, (wall, elapsed)
    # MLflow: the same figures, and a run that starts and ends with them
    run = MlflowClient(uri).get_run(run_id)
    for key in TIME_KEYS:
        assert run.data.metrics[key] == pytest.approx(s[key]), key
    assert (run.info.end_time - run.info.start_time) / 1000 == pytest.approx(wall, abs=0.002)
    assert [v for _, v in tracking.metric_history(uri, run_id, "round_seconds")] == \
        pytest.approx([r["seconds"] for r in s["rounds"]])
    # the console: the start line, the live clock and the closing table
    assert f"started in {startup:.1f} s" in header
    assert (f"wall time {wall:.1f} s = start-up {startup:.1f} s + rounds {rounds:.1f} s + "
            f"shutdown {shutdown:.1f} s") in lines
    clocks = [re.search(r"run (\d+):(\d\d):(\d\d)$", ln) for ln in live]
    seconds = [int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) for m in clocks if m]
    assert len(seconds) == 4 and seconds == sorted(seconds)
    assert startup - 1 <= seconds[0] and seconds[-1] <= startup + rounds + 1
