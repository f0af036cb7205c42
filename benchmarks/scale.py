"""A large federation on one machine: ``fedcl simulate --clients 1000`` with 5% of the clients
per round, measuring seconds per round and the memory of the whole process tree over the run.

Memory is the sum of PSS over the command's process tree (driver, Ray's services, its actors),
sampled every second. "Growth" compares the tree's PSS at the end of the first round of the
second task (every process started, every client met once by the roster query) with its PSS at
the end of the last round: clients that keep growing state would show here.

    python benchmarks/scale.py [--clients 1000] [--fraction-train 0.05] [--tasks 5]
                               [--rounds-per-task 4] [--partition iid]

More clients than MNIST's 60,000 training images (an IID client needs one): ``--copies K``
writes an MNIST folder (IDX files, read as ``--dataset mnist-torchvision``) whose training set
is the bundled one K times, copy k shifted k pixels to the right (wrapping round), so
``--copies 2 --extra "--scenario domain-il --domain-shift permute"`` gives every task 120,000
images:

    python benchmarks/scale.py --clients 100000 --fraction-train 0.001 --tasks 2 \
        --rounds-per-task 2 --copies 2 --extra "--scenario domain-il --domain-shift permute"
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import shlex
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

MNIST = ROOT / "fedcl" / "data" / "mnist"


def _idx(stem: str) -> bytes:
    """The bytes of one of the bundled MNIST IDX files (gzipped or not)."""
    plain = MNIST / stem
    return plain.read_bytes() if plain.is_file() else gzip.decompress(
        (MNIST / f"{stem}.gz").read_bytes())


def write_mnist_copies(root: Path, copies: int) -> None:
    """``root/MNIST/raw``: the bundled MNIST, its training set ``copies`` times (copy k
    shifted k pixels right, wrapping), its test set as it is."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = _idx("train-images-idx3-ubyte")
    labels = _idx("train-labels-idx1-ubyte")
    n = int.from_bytes(images[4:8], "big")
    pixels = np.frombuffer(images[16:], dtype=np.uint8).reshape(n, 28, 28)
    stacked = np.concatenate([np.roll(pixels, k, axis=2) for k in range(copies)])
    (raw / "train-images-idx3-ubyte").write_bytes(
        images[:4] + (n * copies).to_bytes(4, "big") + images[8:16] + stacked.tobytes())
    (raw / "train-labels-idx1-ubyte").write_bytes(
        labels[:4] + (n * copies).to_bytes(4, "big") + labels[8:] * copies)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(_idx(stem))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fraction-train", type=float, default=0.05)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--rounds-per-task", type=int, default=4)
    p.add_argument("--partition", default="iid",
                   help="iid (default: 12 samples per client and task at 1000 clients, too "
                        "few for a Dirichlet split to give every client one)")
    p.add_argument("--copies", type=int, default=1,
                   help="MNIST's training set this many times (see above); 1: the bundled one")
    p.add_argument("--extra", default="", help="more fedcl simulate flags")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcl-scale-"))
    data = []
    if args.copies > 1:
        write_mnist_copies(work / "data", args.copies)
        data = ["--dataset", "mnist-torchvision", "--data-dir", str(work / "data"),
                "--no-download"]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="fs", dir="/tmp"),
           "MPLCONFIGDIR": str(work / "mpl"), "FLWR_HOME": str(work / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--clients", str(args.clients),
           "--fraction-train", str(args.fraction_train), "--tasks", str(args.tasks),
           "--rounds-per-task", str(args.rounds_per_task), "--partition", args.partition,
           "--output", str(work / "out"), *data, *shlex.split(args.extra)]
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
        "startup_s": summary.get("time_startup_s"),
        "acc": summary["acc"], "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
