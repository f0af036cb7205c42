"""The same ServerApp and ClientApp under ``flwr run`` against a real local SuperLink (Flower's
own simulation runtime), configured through ``[tool.flwr.app.config]`` overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedcl import tracking
from tests.conftest import ROOT, processes_mentioning

pytestmark = pytest.mark.e2e


def flwr_run(tmp_path: Path, overrides: str) -> dict:
    """``flwr run`` of this app on a local SuperLink with three SuperNodes, the run config
    overridden by ``overrides`` (and the output, experiment and tracking store set in
    ``tmp_path``); returns the run's summary.json. Everything the SuperLink started is stopped
    afterwards, and nothing may be left."""
    home = Path(tempfile.mkdtemp(prefix="ff", dir="/tmp"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))
    (home / "config.toml").write_text('[superlink.local]\naddress = ":local:"\n')
    out = tmp_path / "out"
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "FLWR_HOME": str(home), "RAY_TMPDIR": str(ray_tmp),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    overrides += (f" experiment='flwr-run' output='{out}' tracking-uri='sqlite:///{db}'")
    try:
        res = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", ".", "local", "--run-config",
             overrides, "--federation-config", "num-supernodes=3", "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
    finally:
        # the local SuperLink is detached by design: stop it (and anything it started)
        for proc in processes_mentioning(str(home)) + processes_mentioning(str(ray_tmp)):
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        time.sleep(1)
        left = processes_mentioning(str(home)) + processes_mentioning(str(ray_tmp))
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left
    return summary


def test_flwr_run_against_local_superlink(tmp_path: Path) -> None:
    summary = flwr_run(tmp_path, "clients=3 tasks=2 rounds-per-task=1 "
                                 "eval-samples-per-task=300")
    db = tmp_path / "mlflow.db"
    assert summary["num_clients"] == 3 and summary["num_tasks"] == 2
    assert len(summary["accuracy_matrix"]) == 2
    assert summary["accuracy_matrix"][0][0] > 0.8
    runs = tracking.fetch_runs(f"sqlite:///{db}", "flwr-run")
    assert [r["status"] for r in runs] == ["FINISHED"]
    assert runs[0]["run_id"] == summary["mlflow_run_id"]
    assert runs[0]["metrics"]["acc"] == pytest.approx(summary["acc"])
