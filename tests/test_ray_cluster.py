"""``fedcl simulate --ray-address``: a run on a Ray cluster fedcl did not start.

A real two-node Ray cluster on this machine (``ray start --head`` and ``ray start --address``,
each node with one CPU and a temp folder of its own, loopback addresses), stopped by the ids
of its processes whatever the tests do. The clients' own reports (``client_nodes`` in every
round of summary.json) say where they ran."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedcl.processes import kill, session_processes

RAY = str(Path(sys.executable).with_name("ray"))
# A two-task job small enough for two one-CPU nodes: 4 clients, one round per task.
TINY = ["--clients", "4", "--tasks", "2", "--eval-samples-per-task", "200", "--seed", "3"]
# The head notices a lost node within a few seconds (Ray's defaults take about 30).
HEAD_SYSTEM_CONFIG = json.dumps({"health_check_period_ms": 1000,
                                 "health_check_failure_threshold": 3,
                                 "health_check_timeout_ms": 1000})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    address: str
    folders: list[Path]  # each node's temp folder: its processes hold files under it

    def node_processes(self, index: int) -> list:  # type: ignore[type-arg]
        return session_processes(self.folders[index])

    def alive_nodes(self) -> int:
        """The nodes the cluster's GCS counts alive (asked by a driver of its own)."""
        probe = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR', "
                 "log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-500:]
        return int(out.stdout.strip().splitlines()[-1])


def _start_node(args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run([RAY, "start", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                          "--disable-usage-stats", *args], capture_output=True, text=True,
                         env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    port = _free_port()
    short = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's sockets: 107 bytes at most
    folders = [short / "h", short / "w"]
    env = {**os.environ, "HOME": str(tmp_path)}
    nodes = Cluster(f"127.0.0.1:{port}", folders)
    try:
        _start_node(["--head", "--port", str(port), "--temp-dir", str(folders[0]),
                     "--include-dashboard", "false", "--system-config", HEAD_SYSTEM_CONFIG],
                    env)
        _start_node(["--address", nodes.address, "--temp-dir", str(folders[1])], env)
        deadline = time.monotonic() + 60
        while nodes.alive_nodes() < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert nodes.alive_nodes() == 2
        yield nodes
    finally:  # by the ids of the cluster's processes, never `ray stop` (it stops every Ray)
        for folder in folders:
            kill(session_processes(folder))
        for folder in folders:
            assert session_processes(folder) == []
        shutil.rmtree(short, ignore_errors=True)


def _nodes_used(summary: dict) -> set[str]:  # type: ignore[type-arg]
    return {node for r in summary["rounds"] for node in r["client_nodes"]}


def test_a_run_on_a_joined_cluster_uses_both_nodes_and_equals_the_private_run(
        cluster: Cluster, workdir: Path, fedcl_cmd) -> None:  # type: ignore[no-untyped-def]
    joined = fedcl_cmd("simulate", *TINY, "--rounds-per-task", "1", "--ray-address",
                       cluster.address, "--output", "joined", cwd=workdir, timeout=400)
    assert joined.returncode == 0, joined.stderr[-2000:]
    private = fedcl_cmd("simulate", *TINY, "--rounds-per-task", "1", "--output", "private",
                        cwd=workdir, timeout=400)
    assert private.returncode == 0, private.stderr[-2000:]
    on_cluster = json.loads((workdir / "joined" / "summary.json").read_text())
    alone = json.loads((workdir / "private" / "summary.json").read_text())
    assert len(_nodes_used(on_cluster)) == 2  # the clients' own reports: both nodes
    assert len(_nodes_used(alone)) == 1
    assert [sum(r["client_nodes"].values()) for r in on_cluster["rounds"]] == [4, 4]
    assert on_cluster["accuracy_matrix"] == alone["accuracy_matrix"]  # the same seed
    assert on_cluster["config"]["ray_address"] == cluster.address
    # the cluster fedcl joined runs on, and its run's actors are gone with the run
    assert cluster.alive_nodes() == 2
    assert not [p for i in (0, 1) for p in cluster.node_processes(i)
                if "ClientAppActor" in " ".join(p.cmdline())]


def test_a_node_lost_mid_run_stops_the_run_with_one_line(
        cluster: Cluster, workdir: Path) -> None:
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcl.cli", "simulate", *TINY, "--rounds-per-task", "6",
         "--ray-address", cluster.address, "--round-timeout-s", "30", "--output", "run",
         "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = workdir / "run" / "checkpoint.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert checkpoint.is_file(), "no round finished"
        assert kill(cluster.node_processes(1)) > 0  # the worker node, raylet and all
        _, err = proc.communicate(timeout=300)  # never hangs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    assert lines[-1].startswith("fedcl: error: Ray node "), lines[-1]
    assert lines[-1].endswith("left the cluster (1 of 2 nodes left); the run stops here; "
                              "`fedcl simulate --resume run` continues it on the nodes left")
    owner = json.loads((workdir / "run" / "fedcl.lock").read_text())
    assert "ray_session_dir" not in owner  # a joined cluster's processes are not the run's
    with sqlite3.connect(workdir / "mlflow.db") as con:
        statuses = [s for (s,) in con.execute("select status from runs")]
    assert statuses == ["FAILED"]
    assert cluster.alive_nodes() == 1  # the head goes on


@pytest.mark.parametrize("address, line", [
    ("nope", "fedcl: error: ray_address must be empty, 'auto' or HOST:PORT (e.g. "
             "10.0.0.5:6379), got 'nope'"),
    ("10.0.0.5:", "fedcl: error: ray_address must be empty, 'auto' or HOST:PORT (e.g. "
                  "10.0.0.5:6379), got '10.0.0.5:'"),
    ("host:70000", "fedcl: error: ray_address must be empty, 'auto' or HOST:PORT (e.g. "
                   "10.0.0.5:6379), got 'host:70000'"),
])
def test_a_malformed_ray_address_is_refused_before_anything_starts(
        address: str, line: str, workdir: Path, fedcl_cmd) -> None:  # type: ignore[no-untyped-def]
    res = fedcl_cmd("simulate", "--ray-address", address, "--output", "out", cwd=workdir,
                    timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [line]
    assert not (workdir / "out").exists()


def test_nothing_at_the_ray_address_stops_at_once_with_one_line(
        workdir: Path, fedcl_cmd) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()  # bound and released: nothing listens there
    res = fedcl_cmd("simulate", *TINY, "--rounds-per-task", "1", "--ray-address",
                    f"127.0.0.1:{port}", "--output", "out", cwd=workdir, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"fedcl: error: cannot join the Ray cluster at ray_address='127.0.0.1:{port}': nothing "
        f"answers there (Connection refused); start its head with `ray start --head "
        f"--port={port}`")
    assert "Traceback" not in res.stderr
    assert not (workdir / "out" / "summary.json").exists()
