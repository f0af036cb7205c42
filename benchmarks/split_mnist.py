"""Split-MNIST: every strategy with the same settings and seed, one table of ACC and forgetting.

50 clients, Dirichlet(0.5) split of each task, MLP, 5 tasks of 2 classes; the same client
sampling for every strategy (fedcl draws it from the run seed). Each run goes through the real
``fedcl simulate`` and lands in one MLflow experiment, so ``fedcl compare`` shows them too.

    python benchmarks/split_mnist.py --scenario task-il --rounds-per-task 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="task-il", choices=("task-il", "class-il"))
    p.add_argument("--strategies", nargs="*", default=["fedavg", "fedprox", "fot", "prd"])
    p.add_argument("--rounds-per-task", type=int, default=5)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/split_mnist")
    p.add_argument("--extra", default="",
                   help="more fedcl simulate flags for every run, e.g. '--local-epochs 3 "
                        "--strategy-param lambda_distill=1'")
    p.add_argument("--tag", default="", help="suffix of the run folders (for variants)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy in args.strategies:
        run_out = out / f"{args.scenario}-{strategy}{'-' + args.tag if args.tag else ''}"
        shutil.rmtree(run_out, ignore_errors=True)  # a rerun replaces its own run
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--strategy", strategy,
               "--scenario", args.scenario, "--clients", str(args.clients), "--partition",
               "dirichlet", "--dirichlet-alpha", "0.5", "--rounds-per-task",
               str(args.rounds_per_task), "--seed", str(args.seed), "--experiment",
               f"split-mnist-{args.scenario}", "--output", str(run_out),
               *shlex.split(args.extra)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            print(f"{strategy} failed: {res.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        s = json.loads((run_out / "summary.json").read_text())
        rows.append((strategy, s["acc"], s["forgetting"], s["learning_accuracy"], s["bwt"],
                     time.monotonic() - t0))
        print(f"{strategy}: ACC {100 * s['acc']:.2f}  forgetting {100 * s['forgetting']:.2f}",
              flush=True)
    print()
    print(f"Split-MNIST {args.scenario}, {args.clients} clients, Dirichlet 0.5, "
          f"{args.rounds_per_task} rounds per task, seed {args.seed} {args.extra}")
    print(f"{'strategy':<10}{'ACC %':>8}{'forgetting %':>14}{'LA %':>8}{'BWT %':>8}"
          f"{'wall s':>8}")
    for strategy, acc, fgt, la, bwt, wall in rows:
        print(f"{strategy:<10}{100 * acc:8.2f}{100 * fgt:14.2f}{100 * la:8.2f}{100 * bwt:8.2f}"
              f"{wall:8.0f}")


if __name__ == "__main__":
    main()
