"""fedcl on a real Flower deployment: a SuperLink serving TLS with SuperNode authentication and
three registered SuperNodes, each its own process on 127.0.0.1, running a 2-task job with
``flwr run``; an unregistered SuperNode and one that connects without TLS are refused; a
SuperNode killed mid-run leaves and the run goes on without it. Every process started here is
stopped, also when a test fails. ClientApps use one torch thread each (``OMP_NUM_THREADS``):
several on one small host would otherwise fight over its cores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedcl import checkpoint, tracking
from fedcl.certs import make_federation_certs
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Federation:
    """A TLS SuperLink and its SuperNodes, as real processes in their own sessions."""

    home: Path
    certs: Path
    env: dict[str, str]
    address: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)  # type: ignore[type-arg]

    def start(self, args: list[str], log: str) -> subprocess.Popen:  # type: ignore[type-arg]
        with open(self.home / log, "w") as out:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.home)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.start([str(BIN / "flower-superlink"), "--ssl-ca-certfile",
                    str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--host", "127.0.0.1",
                    "--port", str(port), "--health-server-address",
                    f"127.0.0.1:{free_port()}", "--database", str(self.home / "state.db"),
                    "--disable-runtime-dependency-installation", "--enable-supernode-auth"],
                   "superlink.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise AssertionError("the SuperLink did not start:\n" + self.log("superlink.log")[-3000:])

    def connect_cli(self) -> None:
        """``flwr``'s connection to this SuperLink (TLS, verified with the CA): ``fed``."""
        (self.home / "flwr").mkdir(exist_ok=True)
        (self.home / "flwr" / "config.toml").write_text(
            f'[superlink.fed]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    def register(self, key: int) -> None:
        """Tell the SuperLink SuperNode ``key``'s public key (``flwr supernode register``)."""
        res = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                              str(self.certs / f"supernode-{key}.pub"), "fed"], env=self.env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "registered successfully" in res.stdout

    def supernode_args(self, pid: int, num: int, key: int | None, *, insecure: bool = False
                       ) -> list[str]:
        tls = ["--insecure"] if insecure else ["--root-certificates", str(self.certs / "ca.crt")]
        auth = [] if key is None else ["--auth-supernode-private-key",
                                       str(self.certs / f"supernode-{key}")]
        return [str(BIN / "flower-supernode"), *tls, "--superlink", self.address, *auth,
                "--node-config", f"partition-id={pid} num-partitions={num}",
                "--port", str(free_port())]

    def start_warm_supernode(self, pid: int, num: int, key: int
                             ) -> list[subprocess.Popen]:  # type: ignore[type-arg]
        """A SuperNode with ``--isolation process`` and ``fedcl superexec`` running its
        ClientApps (a warm process forking one child per message)."""
        args = self.supernode_args(pid, num, key)
        runtime = f"127.0.0.1:{args[-1]}"
        node = self.start([*args, "--isolation", "process"], f"supernode-{pid}.log")
        execs = self.start([str(BIN / "fedcl"), "superexec", "--runtime-api-address", runtime,
                            "--insecure"], f"superexec-{pid}.log")
        return [node, execs]

    def log(self, name: str) -> str:
        path = self.home / name
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the process and what it started
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


@pytest.fixture
def federation() -> Iterator[Federation]:
    home = Path(tempfile.mkdtemp(prefix="fd", dir="/tmp"))
    certs = home / "certs"
    make_federation_certs(certs, ["127.0.0.1", "localhost"], supernodes=4)
    env = {**os.environ, "FLWR_HOME": str(home / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MPLCONFIGDIR": str(home / "mpl"),
           "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    fed = Federation(home, certs, env)
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.stop()
        left = [p.pid for p in fed.procs if p.poll() is None]
        shutil.rmtree(home, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def submit(federation: Federation, *args: str, timeout: float = 600
           ) -> subprocess.CompletedProcess[str]:
    """``fedcl submit`` (as an operator runs it, from a checkout) against ``fed``."""
    return subprocess.run([sys.executable, "-m", "fedcl.cli", "submit", *args], cwd=ROOT,
                          env=federation.env, capture_output=True, text=True, timeout=timeout)


def runs_on(federation: Federation) -> list[dict]:
    """The SuperLink's runs, as ``flwr ls --format json`` lists them."""
    res = subprocess.run([str(BIN / "flwr"), "ls", "fed", "--format", "json"],
                         env=federation.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)["runs"]


def test_tls_federation_runs_a_two_task_job(federation: Federation, tmp_path: Path) -> None:
    """Two registered SuperNodes verify the SuperLink's certificate against the federation's
    CA and sign in with their keys; `fedcl submit` sends the app over TLS as `flwr run` does,
    shows fedcl's progress per round, the accuracy matrix and where the outputs and the
    MLflow run are, and exits 0; summary.json and the MLflow run agree. A SuperNode with an
    unregistered key, and one that connects without TLS (and so without a key: Flower allows
    keys only over TLS), are refused with Flower's error line."""
    federation.connect_cli()
    for key in range(2):  # key 2 stays unregistered
        federation.register(key)
    for pid in range(2):
        federation.start(federation.supernode_args(pid, 2, key=pid), f"supernode-{pid}.log")
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    overrides = (f"clients=2 tasks=2 rounds-per-task=1 partition='iid' "
                 f"eval-samples-per-task=300 experiment='deployment' output='{out}' "
                 f"tracking-uri='sqlite:///{db}' round-timeout-s=300")
    res = submit(federation, "fed", "--run-config", overrides)
    logs = "\n".join(federation.log(f"supernode-{i}.log")[-2000:] for i in range(2))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:] + logs
    lines = res.stdout.splitlines()
    run_id = runs_on(federation)[0]["run-id"]
    assert lines[0] == (f"fedcl: run {run_id} submitted to SuperLink 'fed' "
                        f"({federation.address}); waiting for its SuperNodes")
    assert lines[1].startswith("fedcl: fedavg on mnist class-il, 2 tasks (0-1) x 1 rounds, 2 "
                               "clients")
    assert lines[2].startswith("task 0 of 0-1  round 1/1  avg acc ")
    assert lines[3].startswith("task 1 of 0-1  round 1/1  avg acc ")
    assert lines[4].startswith("accuracy (%)   task0   task1")
    assert f"summary: {out}/summary.json (on the SuperLink's host)" in lines
    assert res.stderr == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["num_tasks"] == 2
    # the run's time (from the ServerApp's start on the SuperLink) as the table shows it
    times = [summary[k] for k in ("time_startup_s", "time_rounds_s", "time_shutdown_s")]
    assert sum(times) == pytest.approx(summary["wall_time_s"])
    assert sum(r["seconds"] for r in summary["rounds"]) == pytest.approx(times[1])
    assert f"wall time {summary['wall_time_s']:.1f} s = start-up {times[0]:.1f} s" in res.stdout
    assert [r["clients"] for r in summary["rounds"]] == [2, 2]
    matrix = summary["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][0] > 0.8
    assert sorted(summary["client_state"]) == ["0", "1"]
    runs = tracking.fetch_runs(f"sqlite:///{db}", "deployment")
    assert [r["status"] for r in runs] == ["FINISHED"]
    assert runs[0]["run_id"] == summary["mlflow_run_id"]
    assert runs[0]["metrics"]["acc"] == pytest.approx(summary["acc"])
    assert (f"MLflow run {summary['mlflow_run_id']} in sqlite:///{db} (experiment "
            f"'deployment'): mlflow ui --backend-store-uri sqlite:///{db}") in lines
    assert f"ACC {summary['acc'] * 100:.2f}%" in res.stdout

    # (a SuperNode's ClientApp runner would keep a captured pipe open: log to files instead)
    refused = {name: federation.start([*args, "--max-retries", "1", "--max-wait-time", "10"],
                                      f"{name}.log")
               for name, args in (
                   ("unregistered", federation.supernode_args(0, 2, key=2)),
                   ("insecure", federation.supernode_args(0, 2, key=None, insecure=True)))}
    for name, node in refused.items():  # both try at once
        assert node.wait(timeout=120) != 0, name
        assert "could not establish a connection to the SuperLink" in federation.log(
            f"{name}.log"), name


def test_a_killed_supernode_leaves_and_the_run_goes_on(federation: Federation,
                                                       tmp_path: Path) -> None:
    """Three SuperNodes whose ClientApps run from warm ``fedcl superexec`` processes. SIGKILL
    one of them (SuperNode, SuperExec and ClientApp processes: the host is gone) after the
    first round: the round that still addresses it ends by Flower's "Node Unavailable" reply
    once its heartbeats are overdue, then the SuperLink drops the node and rounds sample the two
    that are left; with min_train_clients = 2 the job completes, and summary.json and MLflow
    say what happened."""
    federation.connect_cli()
    for key in range(3):
        federation.register(key)
    nodes = [federation.start_warm_supernode(pid, 3, key=pid) for pid in range(3)]
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    overrides = (f"clients=3 tasks=2 rounds-per-task=2 partition='iid' min-train-clients=2 "
                 f"eval-samples-per-task=300 experiment='faults' output='{out}' "
                 f"tracking-uri='sqlite:///{db}' round-timeout-s=240")
    with open(tmp_path / "flwr-run.log", "w") as log:
        job = subprocess.Popen([str(BIN / "flwr"), "run", ".", "fed", "--run-config", overrides,
                                "--stream"], cwd=ROOT, env=federation.env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    federation.procs.append(job)
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():  # written at the end of every round
        assert job.poll() is None and time.monotonic() < deadline, (
            (tmp_path / "flwr-run.log").read_text()[-3000:])
        time.sleep(0.2)
    for proc in nodes[2]:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert job.wait(timeout=600) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]

    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert len(rounds) == 4
    assert (rounds[0]["connected"], rounds[0]["clients"], rounds[0]["failures"]) == (3, 3, 0)
    # the node is dropped once its heartbeats are overdue; until then it fails its rounds
    gone = next(i for i, r in enumerate(rounds) if r["connected"] == 2)
    assert rounds[gone]["lost"] == [2] and sum(r["lost"] != [] for r in rounds) == 1
    for r in rounds[1:gone]:
        assert (r["connected"], r["clients"], r["failures"]) == (3, 2, 1)
    for r in rounds[gone:]:
        assert (r["connected"], r["clients"], r["failures"]) == (2, 2, 0)
    run = tracking.fetch_runs(f"sqlite:///{db}", "faults")[0]
    assert run["status"] == "FINISHED"
    uri = f"sqlite:///{db}"
    assert [v for _, v in tracking.metric_history(uri, run["run_id"], "clients_connected")] == [
        float(r["connected"]) for r in rounds]
    assert [v for _, v in tracking.metric_history(uri, run["run_id"], "failures")] == [
        float(r["failures"]) for r in rounds]


def test_submit_names_what_stopped_a_run(federation: Federation, tmp_path: Path) -> None:
    """`fedcl submit` names a run config key the app does not declare before anything is
    sent (no run appears on the SuperLink); a run that the ServerApp stops (an unknown
    strategy, no clients, too few SuperNodes connected within round_timeout_s) ends the
    command with fedcl's one line, no traceback, and exit status 1, and the SuperLink has
    it as failed."""
    federation.connect_cli()
    bad = submit(federation, "fed", "--run-config", "clients=2 rounds-per-tsk=1")
    assert bad.returncode == 2
    assert bad.stderr == ("fedcl: error: --run-config: unknown key 'rounds-per-tsk' (did you "
                          "mean 'rounds-per-task'?): the app's pyproject.toml declares the "
                          "keys a run takes (`fedcl config --flower` lists them)\n")
    assert runs_on(federation) == []

    out = tmp_path / "out"
    cases = {"strategy='nope'": "unknown strategy 'nope'",
             "clients=0": "clients must be a positive integer, got 0",
             "clients=2 round-timeout-s=2": "only 0 of 2 clients connected within 2 s "
                                            "(round_timeout_s)"}
    for i, (overrides, cause) in enumerate(cases.items()):
        before = {r["run-id"] for r in runs_on(federation)}
        started = time.monotonic()
        res = submit(federation, "fed", "--run-config",
                     f"{overrides} output='{out}-{i}' tracking-uri='sqlite:///{tmp_path}/m.db'",
                     timeout=240)
        assert res.returncode == 1, overrides + res.stdout + res.stderr
        assert time.monotonic() - started < 90, overrides  # not the 300 s start-up allowance
        assert "Traceback" not in res.stdout + res.stderr, overrides
        error = res.stderr.splitlines()
        assert len(error) == 1, res.stderr
        [run_id] = {r["run-id"] for r in runs_on(federation)} - before
        assert error[0].startswith(f"fedcl: error: run {run_id} failed: "), error
        assert cause in error[0], error
        assert error[0].endswith(f"(`flwr log {run_id} fed` shows its log)")
    assert [r["status"] for r in runs_on(federation)] == ["finished:failed"] * 3



def test_a_stopped_deployment_run_resumes_where_it_stopped(federation: Federation,
                                                           tmp_path: Path) -> None:
    """Two SuperNodes; one is killed once the first round's checkpoint is written. With
    min_train_clients = 2 the run stops, and `fedcl submit`'s one line says how to continue
    it. A SuperNode for that partition comes back (another host, another key); `fedcl submit
    --resume OUT` continues the run from its last saved round, in the same output folder and
    MLflow run, to the end; summary.json records the resume."""
    federation.connect_cli()
    for key in range(3):
        federation.register(key)
    nodes = [federation.start_warm_supernode(pid, 2, key=pid) for pid in range(2)]
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    overrides = (f"clients=2 tasks=2 rounds-per-task=2 partition='iid' min-train-clients=2 "
                 f"eval-samples-per-task=300 experiment='resume' output='{out}' "
                 f"tracking-uri='sqlite:///{db}' round-timeout-s=30")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "fedcl.cli", "submit", "fed",
                                  "--run-config", overrides], cwd=ROOT, env=federation.env,
                                 stdout=log, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
    federation.procs.append(first)
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline, (
            (tmp_path / "first.log").read_text()[-3000:])
        time.sleep(0.2)
    for proc in nodes[1]:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _, stderr = first.communicate(timeout=400)
    assert first.returncode == 1, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert f"`fedcl submit fed --resume {out}` (run config resume='{out}') continues it" in stderr
    saved = checkpoint.load(out)["progress"]["global_round"]
    assert 1 <= saved < 4
    [stopped] = tracking.fetch_runs(f"sqlite:///{db}", "resume")
    assert stopped["status"] == "FAILED"

    federation.start_warm_supernode(1, 2, key=2)  # partition 1 again, from another node
    res = submit(federation, "fed", "--resume", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    assert summary["resumes"] == [{"after_round": saved, "client_stores_lost": False}]
    assert all(r["clients"] == 2 for r in summary["rounds"][saved:])
    [run] = tracking.fetch_runs(f"sqlite:///{db}", "resume")  # the same MLflow run, finished
    assert run["run_id"] == stopped["run_id"] == summary["mlflow_run_id"]
    assert run["status"] == "FINISHED"

    # --resume goes with nothing else: the run keeps its own config
    both = submit(federation, "fed", "--resume", str(out), "--run-config", "clients=3")
    assert (both.returncode, both.stderr) == (2, "fedcl: error: --resume continues the run "
                                                 "with its own config; drop --run-config\n")

OUTSIDER_APP = '''
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid, context):
    with open(context.run_config["marker"], "w") as out:
        out.write("ran on the SuperLink's host")
'''


def test_what_tls_and_supernode_authentication_protect(federation: Federation,
                                                        tmp_path: Path) -> None:
    """README.md's security model, claim by claim. Protected: a client that does not hold
    the federation's CA certificate (none, or another CA's) cannot connect, neither `fedcl
    submit` nor a SuperNode. Not protected: anyone who reaches the SuperLink's port with the
    (public) CA certificate registers a SuperNode key of their own and starts a run of their
    own app, whose ServerApp code runs on the SuperLink's host; account authentication, which
    would restrict that, is not in this Flower distribution."""
    federation.connect_cli()
    config = federation.home / "flwr" / "config.toml"
    config.write_text(config.read_text() + f'[superlink.nocert]\naddress = '
                      f'"{federation.address}"\n')
    other_ca = tmp_path / "other"
    make_federation_certs(other_ca, ["127.0.0.1"], supernodes=0)

    res = submit(federation, "nocert", timeout=180)  # the system's CAs do not vouch for it
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stdout + res.stderr
    assert res.stderr.startswith("fedcl: error: the SuperLink 'nocert'")
    federation.register(0)
    args = federation.supernode_args(0, 1, key=0)
    args[args.index("--root-certificates") + 1] = str(other_ca / "ca.crt")
    node = federation.start([*args, "--max-retries", "1", "--max-wait-time", "10"],
                            "other-ca.log")
    assert node.wait(timeout=120) != 0
    assert "could not establish a connection to the SuperLink" in federation.log("other-ca.log")
    assert runs_on(federation) == []

    # an outsider: only the CA certificate, no key of the federation's
    app = tmp_path / "outsider"
    app.mkdir()
    marker = tmp_path / "marker.txt"
    (app / "outsider.py").write_text(OUTSIDER_APP)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "outsider"\nversion = "1.0.0"\n'
        '[tool.flwr.app]\npublisher = "outsider"\n'
        '[tool.flwr.app.components]\nserverapp = "outsider:app"\nclientapp = "outsider:client"\n'
        f'[tool.flwr.app.config]\nmarker = "{marker}"\n')
    federation.register(3)  # a key nobody of the federation made: accepted
    res = subprocess.run([str(BIN / "flwr"), "run", str(app), "fed"], env=federation.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, federation.log("superlink.log")[-3000:]
        time.sleep(0.5)
    assert marker.read_text() == "ran on the SuperLink's host"

    # the Control API's account authentication (OIDC) needs Flower Enterprise
    res = subprocess.run([str(BIN / "flower-superlink"), "--insecure", "--port",
                          str(free_port()), "--host", "127.0.0.1"],
                         env={**federation.env, "FLWR_OIDC_ENABLED": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "OIDC account authentication is unavailable in this Flower distribution" in (
        res.stdout + res.stderr)
