"""A caller that closes fedcl's standard streams (`fedcl simulate ... <&- >&- 2>&-`, as some
schedulers and daemons start jobs) still gets its run: the streams point at os.devnull, and
Ray, which enables faulthandler on sys.stderr, no longer ends the run with exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TINY = ("--clients", "3", "--tasks", "2", "--rounds-per-task", "1", "--batch-size", "64",
        "--eval-samples-per-task", "200", "--device", "cpu")


def _close_standard_streams() -> None:
    for fd in (0, 1, 2):
        os.close(fd)


def test_a_run_with_every_standard_stream_closed_finishes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([sys.executable, "-m", "fedcl.cli", "simulate", *TINY, "--output",
                          str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=600,
                         preexec_fn=_close_standard_streams)
    assert res.returncode == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_tasks"] == 2 and len(summary["accuracy_matrix"]) == 2
    assert 0.0 <= summary["acc"] <= 1.0
