"""Seconds per round on a real federation (a TLS SuperLink and N SuperNodes on 127.0.0.1,
``flwr run``) against the same job in simulation (``fedcl simulate``).

    python benchmarks/deployment_cost.py --supernodes 3 --rounds-per-task 3 [--threads 1]

The job: class-IL Split-MNIST (bundled), ``--supernodes`` clients (all every round), 2 tasks,
the MLP. Two federations: Flower's default, where each message makes a SuperNode start a
fresh ClientApp process (torch imported again), and SuperNodes with ``--isolation process``
whose ClientApps ``fedcl superexec`` forks from a warm process. Rounds are timed by fedcl itself
(``rounds[].seconds`` in summary.json); the steady state is the median leaving out each task's
first round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcl.certs import make_federation_certs  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def steady(summary: dict, rounds_per_task: int) -> tuple[float, list[float]]:
    seconds = [r["seconds"] for r in summary["rounds"]]
    keep = [s for r, s in zip(summary["rounds"], seconds, strict=True)
            if r["task_round"] > 1] or seconds
    return statistics.median(keep), seconds


def run_federation(work: Path, env: dict[str, str], job: dict, supernodes: int,
                   warm: bool) -> tuple[dict, float]:
    """One job on a fresh TLS SuperLink and ``supernodes`` SuperNodes; with ``warm``, each
    SuperNode runs with ``--isolation process`` beside a ``fedcl superexec``."""
    name = "warm" if warm else "fresh"
    certs = work / "certs"
    port = free_port()
    home = work / f"flwr-{name}"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    env = {**env, "FLWR_HOME": str(home)}
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]

    def start(cmd: list[str], log: str) -> None:
        with open(work / f"{name}-{log}", "w") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=work))

    try:
        start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
               "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile",
               str(certs / "server.key"), "--host", "127.0.0.1", "--port", str(port),
               "--health-server-address", f"127.0.0.1:{free_port()}", "--database",
               str(work / f"state-{name}.db"), "--disable-runtime-dependency-installation"],
              "superlink.log")
        time.sleep(5)
        for i in range(supernodes):
            runtime = free_port()
            start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(certs / "ca.crt"), "--node-config",
                   f"partition-id={i} num-partitions={supernodes}", "--port", str(runtime),
                   *(["--isolation", "process"] if warm else [])], f"supernode-{i}.log")
            if warm:
                start([str(BIN / "fedcl"), "superexec", "--runtime-api-address",
                       f"127.0.0.1:{runtime}", "--insecure"], f"superexec-{i}.log")
        out = work / f"federation-{name}"
        overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                             for k, v in {**job, "output": str(out),
                                          "tracking-uri": f"sqlite:///{work}/mlflow.db"}.items())
        t0 = time.monotonic()
        res = subprocess.run([str(BIN / "flwr"), "run", ".", "fed", "--stream", "--run-config",
                              overrides], cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                           for p in sorted(work.glob(f"{name}-*.log")))
            raise SystemExit(f"flwr run failed:\n{res.stdout[-3000:]}{res.stderr[-2000:]}\n"
                             f"{logs}")
        return json.loads((out / "summary.json").read_text()), time.monotonic() - t0
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supernodes", type=int, default=3)
    p.add_argument("--rounds-per-task", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every process (several ClientApps share a host)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcl-deploy-"))
    make_federation_certs(work / "certs", ["127.0.0.1"])
    env = {**os.environ, "FLWR_HOME": str(work / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MPLCONFIGDIR": str(work / "mpl"),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="fd", dir="/tmp"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    job = {"clients": args.supernodes, "tasks": 2, "rounds-per-task": args.rounds_per_task,
           "eval-samples-per-task": 1000, "experiment": "deployment-cost"}
    results = {
        "federation, fresh ClientApp process per message (Flower's default)":
            run_federation(work, env, job, args.supernodes, warm=False),
        "federation, warm `fedcl superexec`":
            run_federation(work, env, job, args.supernodes, warm=True)}
    out = work / "simulation"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedcl.cli", "simulate", "--clients",
                    str(args.supernodes), "--tasks", "2", "--rounds-per-task",
                    str(args.rounds_per_task), "--eval-samples-per-task", "1000",
                    "--experiment", "deployment-cost", "--output", str(out)], cwd=work,
                   env=env, check=True, capture_output=True)
    results["simulation"] = (json.loads((out / "summary.json").read_text()),
                             time.monotonic() - t0)
    print(f"\n{args.supernodes} clients, 2 tasks x {args.rounds_per_task} rounds, "
          f"{os.cpu_count()} CPUs\n")
    print("| engine | s/round (steady) | longest client handler s | job wall s | ACC % |")
    print("|---|---|---|---|---|")
    for name, (summary, wall) in results.items():
        s, _ = steady(summary, args.rounds_per_task)
        handler = statistics.median(r["client_compute_s"] for r in summary["rounds"])
        print(f"| {name} | {s:.2f} | {handler:.2f} | {wall:.1f} | {100 * summary['acc']:.2f} |")


if __name__ == "__main__":
    main()
