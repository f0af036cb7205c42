"""FOT's Permuted-MNIST result (the paper's Table 1) against fedcl's, side by side.

Runs the Permuted-MNIST presets through the real ``fedcl simulate`` and prints ACC and FGT (the
paper's forgetting: accuracy right after a task's own training minus final, fedcl's
``forgetting_at_task_end``) beside the paper's numbers, with learning accuracy (plasticity).
Two sets of presets (``simulations/``):

* ``settled`` (default): ``{fedavg,fot}_pmnist{,_noniid}.toml``, the threshold paired with the
  split as FOT's code does (IID 0.94, non-IID 0.96) and the code's MLP of three hidden layers
  of 400 (``mlp-fot``);
* ``2x400``: ``{fedavg,fot}_pmnist{,_noniid}_2x400.toml``, the pairing of the README's labels
  (IID 0.96, non-IID 0.94) and fedcl's MLP 784-400-400, the settings of the earlier figures.

The paper trains 200 rounds per task (the default); ``--rounds-per-task`` runs a shorter
budget, and the table says which. ``--fot-eps`` overrides FOT's threshold alone (does the
threshold explain a gap?). ``--device cuda`` trains the clients on the GPU as batched cohorts
(``--cohort-size``, ``--client-gpus``, ``--client-cpus``). ``--dry-run`` prints the commands.
``--resume`` goes on from a run's checkpoint (a run stopped by a signal: ``fedcl simulate
--resume``) and keeps a finished run instead of running it again.

    python benchmarks/fot_pmnist.py --presets both --device cuda          # 8 runs, 200 rounds
    python benchmarks/fot_pmnist.py --only fot_pmnist fedavg_pmnist --device cuda
    python benchmarks/fot_pmnist.py --only fot_pmnist --fot-eps 0.96 --device cuda --tag eps96
    python benchmarks/fot_pmnist.py --rounds-per-task 20 --only fot_pmnist_noniid
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

# (paper ACC, paper FGT) in %, README table "Table 1" (mean over 3 runs), by split and method
PAPER_ROWS = {("iid", "fedavg"): (85.68, 8.29), ("iid", "fot"): (90.35, 1.75),
              ("noniid", "fedavg"): (80.06, 9.21), ("noniid", "fot"): (85.21, 1.97)}
PRESETS = {
    "settled": ["fedavg_pmnist", "fot_pmnist", "fedavg_pmnist_noniid", "fot_pmnist_noniid"],
    "2x400": ["fedavg_pmnist_2x400", "fot_pmnist_2x400", "fedavg_pmnist_noniid_2x400",
              "fot_pmnist_noniid_2x400"],
}
PRESETS["both"] = PRESETS["settled"] + PRESETS["2x400"]
PAPER = {name: PAPER_ROWS[("noniid" if "noniid" in name else "iid",
                           "fot" if name.startswith("fot") else "fedavg")]
         for name in PRESETS["both"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds-per-task", type=int, default=200)
    p.add_argument("--presets", choices=sorted(PRESETS), default="settled")
    p.add_argument("--only", nargs="*", default=None, choices=PRESETS["both"],
                   help="these presets instead of --presets")
    p.add_argument("--fot-eps", type=float, default=None,
                   help="FOT's threshold instead of the preset's (FOT runs only)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cohort-size", type=int, default=16, help="with --device cuda")
    p.add_argument("--client-gpus", type=float, default=0.25, help="with --device cuda")
    p.add_argument("--client-cpus", type=float, default=4.0, help="with --device cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/fot_pmnist")
    p.add_argument("--tag", default="", help="suffix of the run folders (for variants)")
    p.add_argument("--extra", default="", help="more fedcl simulate flags for every run, "
                   "as one string")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--resume", action="store_true",
                   help="go on from each run's checkpoint; keep finished runs")
    return p.parse_args(argv)


def commands(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    """(preset, output folder, fedcl simulate command) for every run."""
    out = Path(args.out)
    runs = []
    for name in args.only or PRESETS[args.presets]:
        run_out = out / f"{name}{'-' + args.tag if args.tag else ''}"
        cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--config",
               str(ROOT / "simulations" / f"{name}.toml"), "--rounds-per-task",
               str(args.rounds_per_task), "--seed", str(args.seed), "--device", args.device,
               "--output", str(run_out)]
        if args.device == "cuda":
            cmd += ["--cohort-size", str(args.cohort_size), "--client-gpus",
                    str(args.client_gpus), "--client-cpus", str(args.client_cpus)]
        if args.fot_eps is not None and name.startswith("fot"):
            cmd += ["--strategy-param", f"eps={args.fot_eps}"]
        if args.resume and (run_out / "checkpoint.pt").is_file():
            cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--resume", str(run_out)]
            runs.append((name, run_out, cmd))
            continue
        runs.append((name, run_out, cmd + shlex.split(args.extra)))
    return runs


def main() -> None:
    args = parse_args()
    runs = commands(args)
    if args.dry_run:
        for _, _, cmd in runs:
            print(shlex.join(cmd))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for name, run_out, cmd in runs:
        t0 = time.monotonic()
        finished = args.resume and (run_out / "summary.json").is_file()
        if not finished:
            if "--resume" not in cmd:
                shutil.rmtree(run_out, ignore_errors=True)  # a rerun replaces its own run
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if res.returncode != 0:
                print(f"{name} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
        s = json.loads((run_out / "summary.json").read_text())
        config = s["config"]
        results[name] = {"acc": s["acc"], "fgt": s["forgetting_at_task_end"],
                         "forgetting": s["forgetting"], "bwt": s["bwt"],
                         "learning_accuracy": s["learning_accuracy"],
                         "eps": config["strategy_params"].get("eps"), "model": config["model"],
                         "wall_time_s": time.monotonic() - t0,
                         "seconds_per_round": sum(r["seconds"] for r in s["rounds"])
                         / len(s["rounds"]),
                         "accuracy_matrix": s["accuracy_matrix"],
                         "strategy_state": s.get("strategy_state", [])}
        tag = f"-{args.tag}" if args.tag else ""
        (Path(args.out) / f"results{tag}.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: ACC {100 * s['acc']:.2f}  FGT {100 * s['forgetting_at_task_end']:.2f}  "
              f"LA {100 * s['learning_accuracy']:.2f}  ({time.monotonic() - t0:.0f} s)",
              flush=True)
    print()
    print(f"Permuted-MNIST, {args.rounds_per_task} rounds per task (paper: 200), seed "
          f"{args.seed} {args.extra}")
    print(f"{'config':<28}{'model':>8}{'eps':>6}{'paper ACC':>10}{'paper FGT':>10}"
          f"{'fedcl ACC':>11}{'fedcl FGT':>11}{'LA':>8}")
    for name, r in results.items():
        pa, pf = PAPER[name]
        eps = "-" if r["eps"] is None else f"{r['eps']:.2f}"
        print(f"{name:<28}{r['model']:>8}{eps:>6}{pa:10.2f}{pf:10.2f}{100 * r['acc']:11.2f}"
              f"{100 * r['fgt']:11.2f}{100 * r['learning_accuracy']:8.2f}")


if __name__ == "__main__":
    main()
