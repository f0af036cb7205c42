"""A large federation on one machine: ``fedcl simulate --clients 1000`` with 5% of the clients
per round, measuring seconds per round and the memory of the whole process tree over the run.

Memory is the sum of PSS over the command's process tree (driver, Ray's services, its actors),
sampled every second. "Growth" compares the tree's PSS at the end of the first round of the
second task (every process started, every client met once by the roster query) with its PSS at
the end of the last round: clients that keep growing state would show here.

    python benchmarks/scale.py [--clients 1000] [--fraction-train 0.05] [--tasks 5]
                               [--rounds-per-task 4] [--partition iid]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quickstart import tree_memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fraction-train", type=float, default=0.05)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--rounds-per-task", type=int, default=4)
    p.add_argument("--partition", default="iid",
                   help="iid (default: 12 samples per client and task at 1000 clients, too "
                        "few for a Dirichlet split to give every client one)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcl-scale-"))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="fs", dir="/tmp"),
           "MPLCONFIGDIR": str(work / "mpl"), "FLWR_HOME": str(work / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--clients", str(args.clients),
           "--fraction-train", str(args.fraction_train), "--tasks", str(args.tasks),
           "--rounds-per-task", str(args.rounds_per_task), "--partition", args.partition,
           "--output", str(work / "out")]
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        while proc.poll() is None:
            try:
                samples.append((time.time(), tree_memory(ps)[0]))
            except psutil.NoSuchProcess:
                break
            time.sleep(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"fedcl simulate failed:\n{err[-3000:]}")
    summary = json.loads((work / "out" / "summary.json").read_text())
    rounds = summary["rounds"]
    times = [t for t, _ in samples]

    def pss_at(t: float) -> float:
        i = max(bisect.bisect_right(times, t) - 1, 0)
        return samples[i][1] / 2**30

    steady = statistics.median(r["seconds"] for r in rounds if r["task_round"] > 1)
    first_of_task2 = next(r for r in rounds if r["task"] == 1)
    result = {
        "clients": args.clients, "clients_per_round": rounds[-1]["clients"],
        "rounds": len(rounds), "steady_s_per_round": steady,
        "first_round_s": rounds[0]["ended_at"] - launched,
        "wall_s": time.time() - launched,
        "peak_pss_gib": max(m for _, m in samples) / 2**30,
        "pss_gib_after_task2_round1": pss_at(first_of_task2["ended_at"]),
        "pss_gib_after_last_round": pss_at(rounds[-1]["ended_at"]),
        "acc": summary["acc"], "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
