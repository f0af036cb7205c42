"""FOT's Permuted-MNIST result (the paper's Table 1) against fedcl's, side by side.

Runs ``simulations/{fedavg,fot}_pmnist{,_noniid}.toml`` through the real ``fedcl simulate`` and
prints ACC and FGT (the paper's forgetting: accuracy right after a task's own training minus
final, fedcl's ``forgetting_at_task_end``) beside the paper's numbers. The paper trains 200
rounds per task; ``--rounds-per-task`` runs a shorter budget, and the table says which.

    python benchmarks/fot_pmnist.py --rounds-per-task 20 [--only fot_pmnist] [--out DIR]
    python benchmarks/fot_pmnist.py --only fot_pmnist fedavg_pmnist \
        --extra "--cohort-size 16 --client-gpus 0.25 --client-cpus 4"   # 200 rounds on a GPU
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

ROOT = Path(__file__).resolve().parents[1]

# (config, paper ACC, paper FGT), in % (README table "Table 1", mean over 3 runs)
PAPER = {
    "fedavg_pmnist": (85.68, 8.29),
    "fot_pmnist": (90.35, 1.75),
    "fedavg_pmnist_noniid": (80.06, 9.21),
    "fot_pmnist_noniid": (85.21, 1.97),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds-per-task", type=int, default=200)
    p.add_argument("--only", nargs="*", default=list(PAPER))
    p.add_argument("--out", default="outputs/fot_pmnist")
    p.add_argument("--extra", default="", help="more fedcl simulate flags for every run, "
                   "as one string")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only:
        t0 = time.monotonic()
        run_out = out / name
        shutil.rmtree(run_out, ignore_errors=True)  # a rerun replaces its own run
        cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--config",
               str(ROOT / "simulations" / f"{name}.toml"), "--rounds-per-task",
               str(args.rounds_per_task), "--output", str(run_out), *shlex.split(args.extra)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            print(f"{name} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        s = json.loads((run_out / "summary.json").read_text())
        results[name] = {"acc": s["acc"], "fgt": s["forgetting_at_task_end"],
                         "forgetting": s["forgetting"], "bwt": s["bwt"],
                         "wall_time_s": time.monotonic() - t0,
                         "seconds_per_round": sum(r["seconds"] for r in s["rounds"])
                         / len(s["rounds"]),
                         "accuracy_matrix": s["accuracy_matrix"],
                         "strategy_state": s.get("strategy_state", [])}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: ACC {100 * s['acc']:.2f}  FGT {100 * s['forgetting_at_task_end']:.2f}  "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    print()
    print(f"Permuted-MNIST, {args.rounds_per_task} rounds per task (paper: 200)")
    print(f"{'config':<24}{'paper ACC':>10}{'paper FGT':>10}{'fedcl ACC':>11}{'fedcl FGT':>11}")
    for name, r in results.items():
        pa, pf = PAPER[name]
        print(f"{name:<24}{pa:10.2f}{pf:10.2f}{100 * r['acc']:11.2f}{100 * r['fgt']:11.2f}")


if __name__ == "__main__":
    main()
