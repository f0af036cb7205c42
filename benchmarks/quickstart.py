"""Benchmark of the README's quick start: ``fedcl simulate --clients 50`` against plain Flower
FedAvg (``benchmarks/plain_flower.py``) on the same clients, data and model, in one run.

Reports for each: wall time, steady-state seconds per round (median over rounds after the first
round of each task, so both sides are past start-up and per-task data set-up), and the peak
memory of the command's whole process tree (driver, Ray's services and its actors), sampled every
0.5 s, as the sum of PSS (proportional set size: shared pages such as torch's libraries split
between the processes that map them) and, for reference, the sum of RSS (which counts those
shared pages once per process).

    .venv/bin/python benchmarks/quickstart.py [--clients 50] [--tasks 5] [--rounds-per-task 3]
"""

from __future__ import annotations

import argparse
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


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) over ``proc`` and all its descendants, in bytes."""
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str]
                 ) -> tuple[str, float, tuple[int, int]]:
    """Run ``cmd``; return its stdout, wall seconds and peak (PSS, RSS) sums in bytes."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                pss, rss = tree_memory(ps)
            except psutil.NoSuchProcess:
                break
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return out, time.monotonic() - t0, (peak[0], peak[1])


def steady(seconds: list[float], rounds_per_task: int) -> float:
    keep = [s for i, s in enumerate(seconds) if i % rounds_per_task != 0]
    return statistics.median(keep or seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--rounds-per-task", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcl-bench-"))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="fb", dir="/tmp"),
           "MPLCONFIGDIR": str(work / "mpl"), "FLWR_HOME": str(work / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    common = ["--clients", str(args.clients), "--tasks", str(args.tasks),
              "--rounds-per-task", str(args.rounds_per_task)]

    out, plain_wall, plain_peak = run_measured(
        [sys.executable, str(ROOT / "benchmarks" / "plain_flower.py"), *common], work, env)
    plain = json.loads(out.strip().splitlines()[-1])
    plain_steady = steady(plain["seconds_per_round"], args.rounds_per_task)

    _, fedcl_wall, fedcl_peak = run_measured(
        [sys.executable, "-m", "fedcl.cli", "simulate", *common, "--output",
         str(work / "fedcl-out"), "--experiment", "bench"], work, env)
    summary = json.loads((work / "fedcl-out" / "summary.json").read_text())
    fedcl_steady = steady([r["seconds"] for r in summary["rounds"]], args.rounds_per_task)

    gib = 1024 ** 3
    print(f"{'':<14}{'wall s':>9}{'s/round (steady)':>18}{'peak PSS GiB':>14}"
          f"{'(peak RSS sum)':>16}{'ACC %':>8}")
    for name, wall, st, peak, acc in (
            ("plain Flower", plain_wall, plain_steady, plain_peak,
             statistics.mean(plain["accuracy_matrix"][-1])),
            ("fedcl", fedcl_wall, fedcl_steady, fedcl_peak, summary["acc"])):
        print(f"{name:<14}{wall:9.1f}{st:18.2f}{peak[0] / gib:14.2f}{peak[1] / gib:16.2f}"
              f"{100 * acc:8.2f}")
    ratio = fedcl_steady / plain_steady
    print(f"fedcl / plain Flower steady-state seconds per round: {ratio:.2f}x")


if __name__ == "__main__":
    main()
