"""The continual-learning baselines against fedcl's methods: one table per benchmark, the same
seed and settings for every row, the DER paper's centralized figures beside them.

Benchmarks: Split-MNIST class-IL and task-IL (5 tasks of 2 classes), Permuted-MNIST and
Rotated-MNIST (domain-IL, 20 tasks as the DER paper's). 50 clients, Dirichlet(0.5) split of
every task, the MLP, fedcl's default local training. Rows: FedAvg, FedProx, FOT, PRD, FedEWC,
FedLwF, TARGET (class-IL), FedWeIT (task-IL: it needs the task id at test time), FedER,
FedDER++ and GLFC (class-IL) at two buffer budgets (200 and 500 samples in total across the
federation; GLFC with its default proxy settings); a method in a benchmark whose scenario it
does not declare shows as not defined there. Columns: ACC, forgetting, BWT, learning accuracy
(mean of each task's accuracy right after its own training, the accuracy matrix's diagonal),
buffer bytes (mean per client, raw samples kept on clients), what a client sends and receives a
round, seconds per round (mean), and the centralized ACC that the DER paper reports for the same
method, benchmark and buffer (METHODS.md section 20: mammoth's MLP 784-100-100, one epoch per
task, batch 10 or 128: not fedcl's settings; labelled centralized).

Every run is the real ``fedcl simulate``, in one MLflow experiment per benchmark; the tables go
to ``<out>/baselines.md`` and every number to ``<out>/baselines.json``::

    python benchmarks/baselines.py --device cuda             # the full table (a GPU host)
    python benchmarks/baselines.py --quick                   # a few minutes on a CPU
    python benchmarks/baselines.py --benchmarks split-class --rows fedavg feder@200 \\
        --param fedewc:ewc_lambda=500

``--cohort-size N`` trains the rows whose clients a batched cohort can train (fedcl's own check:
no store kept between rounds, no training hooks of their own; FedAvg, FedProx, FOT, FedEWC) as
cohorts of N clients on the device (``fedcl simulate --cohort-size``: the same per-client
training, one process per cohort); the others (PRD, FedLwF, FedER, FedDER++, GLFC) train one
client per process whatever it says. ``--resume`` lets a run stopped by a signal go
on from its checkpoint (``fedcl simulate --resume``) and keeps a finished run's summary instead
of running it again.

``--quick`` proves the pipeline, not the methods: 6 clients, 2 tasks, 1 round per task, small
evaluation sets (TARGET's synthesis cut to 2 calls of 64 images, GLFC's gradient inversion to
10 L-BFGS steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    # name: (title, fedcl simulate flags)
    "split-class": ("Split-MNIST class-IL", ["--scenario", "class-il", "--tasks", "5"]),
    "split-task": ("Split-MNIST task-IL", ["--scenario", "task-il", "--tasks", "5"]),
    "permuted": ("Permuted-MNIST (domain-IL)", ["--scenario", "domain-il", "--domain-shift",
                                                "permute", "--tasks", "20"]),
    "rotated": ("Rotated-MNIST (domain-IL)", ["--scenario", "domain-il", "--domain-shift",
                                              "rotate", "--tasks", "20"]),
}

ROWS = ["fedavg", "fedprox", "fot", "prd", "fedewc", "fedlwf", "target", "fedweit",
        "feder@200", "feder@500", "fedderpp@200", "fedderpp@500", "glfc@200", "glfc@500"]
LABELS = {"fedavg": "FedAvg", "fedprox": "FedProx", "fot": "FOT", "prd": "PRD",
          "fedewc": "FedEWC", "fedlwf": "FedLwF", "target": "TARGET", "fedweit": "FedWeIT",
          "feder": "FedER", "fedderpp": "FedDER++", "glfc": "GLFC"}
BUDGETED = ("feder", "fedderpp", "glfc")  # the rows that take a buffer budget (@N)
#: strategy parameters of a row in --quick mode (unless --param sets them)
QUICK_PARAMS: dict[str, list[str]] = {
    "fedewc": ["fisher_samples=32"],
    "target": ["synthesis_calls=2", "synthesis_batch=64"],
    "glfc": ["inversion_steps=10"],
}

#: The DER paper's centralized final accuracy (%), from mammoth's README at its first commit
#: (METHODS.md section 20): method as fedcl names its federated version -> benchmark -> ACC.
#: FedAvg's counterpart is SGD (fine-tuning), FedEWC's online EWC, FedER's ER.
CENTRALIZED: dict[str, dict[str, float]] = {
    "joint": {"split-class": 95.57, "split-task": 99.51, "permuted": 94.33},
    "fedavg": {"split-class": 19.60, "split-task": 94.94, "permuted": 40.70},
    "fedewc": {"split-class": 20.46, "split-task": 98.39, "permuted": 75.79},
    "fedlwf": {"split-class": 19.62, "split-task": 94.11},
    "feder@200": {"split-class": 80.43, "split-task": 97.86, "permuted": 72.37},
    "fedderpp@200": {"split-class": 85.61, "split-task": 98.76, "permuted": 83.58},
    "feder@500": {"split-class": 86.12, "split-task": 99.04, "permuted": 80.60},
    "fedderpp@500": {"split-class": 91.00, "split-task": 98.94, "permuted": 88.21},
}
CENTRALIZED_NAMES = {"joint": "JOINT", "fedavg": "SGD", "fedewc": "oEWC", "fedlwf": "LwF",
                     "feder@200": "ER 200", "feder@500": "ER 500", "fedderpp@200": "DER++ 200",
                     "fedderpp@500": "DER++ 500"}
GAP_POINTS = 15.0  # a federated row this far below its centralized figure is flagged


@dataclass
class Row:
    benchmark: str
    row: str
    folder: str
    acc: float | None = None
    forgetting: float | None = None
    bwt: float | None = None
    learning_accuracy: float | None = None
    buffer_bytes_per_client: float | None = None
    buffer_bytes_total: int | None = None
    seconds_per_round: float | None = None
    bytes_up_per_client_round: float | None = None  # summary.json's communication block
    bytes_down_per_client_round: float | None = None
    wall_s: float | None = None
    centralized_acc: float | None = None
    error: str | None = None
    not_defined: str | None = None  # the strategy does not declare the benchmark's scenario
    extra: dict[str, Any] = field(default_factory=dict)


def strategy_of(row: str) -> tuple[str, int | None]:
    """``feder@200`` -> (``feder``, 200); ``fedavg`` -> (``fedavg``, None)."""
    name, _, budget = row.partition("@")
    return name, int(budget) if budget else None


def learning_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """The mean of each task's accuracy right after its own training: the accuracy matrix's
    diagonal (Riemer et al., ICLR 2019)."""
    return sum(matrix[i][i] for i in range(len(matrix))) / len(matrix)


def read_row(row: Row, summary: dict[str, Any]) -> Row:
    """Fill ``row`` from a run's summary.json."""
    row.acc, row.forgetting, row.bwt = summary["acc"], summary["forgetting"], summary["bwt"]
    la = summary.get("learning_accuracy")  # summary.json has it; older ones do not
    row.learning_accuracy = la if la is not None else learning_accuracy(
        summary["accuracy_matrix"])
    states = list(summary.get("client_state", {}).values())
    held = [int(s.get("buffer_bytes", 0)) for s in states]
    row.buffer_bytes_total = sum(held)
    row.buffer_bytes_per_client = sum(held) / summary["num_clients"]
    seconds = [r["seconds"] for r in summary["rounds"]]
    row.seconds_per_round = sum(seconds) / len(seconds) if seconds else None
    comm = summary.get("communication")  # older summaries lack it
    if comm:
        row.bytes_up_per_client_round = comm["per_client_round"]["bytes_up"]
        row.bytes_down_per_client_round = comm["per_client_round"]["bytes_down"]
    return row


def batchable(strategy: str) -> bool:
    """Whether a batched cohort can train ``strategy``'s clients: the check ``fedcl simulate
    --cohort-size`` makes (:func:`fedcl.run_setup.setup_run`), asked of the strategy's trainer."""
    from fedcl import plugins
    from fedcl.config import Config

    trainer = plugins.build_trainer(Config(strategy=strategy))
    return trainer.batchable and not trainer.keeps_client_store


def scenario_of(benchmark: str) -> str:
    flags = BENCHMARKS[benchmark][1]
    return flags[flags.index("--scenario") + 1]


def defined_for(strategy: str, benchmark: str) -> bool:
    """Whether ``strategy`` declares the benchmark's scenario (its ``Capabilities.scenarios``,
    asked of fedcl as ``fedcl simulate`` does)."""
    from fedcl import plugins
    from fedcl.config import Config

    return scenario_of(benchmark) in plugins.build_strategy(
        Config(strategy=strategy)).capabilities.scenarios


def simulate_args(args: argparse.Namespace, benchmark: str, row: str,
                  folder: Path) -> list[str]:
    """The ``fedcl simulate`` command line of one row of one benchmark."""
    name, budget = strategy_of(row)
    if args.resume and (folder / "checkpoint.pt").is_file():
        return [sys.executable, "-m", "fedcl.cli", "simulate", "--resume", str(folder)]
    flags = list(BENCHMARKS[benchmark][1])
    if args.quick:  # two tasks, whatever the benchmark's count
        flags[flags.index("--tasks") + 1] = "2"
    cmd = [sys.executable, "-m", "fedcl.cli", "simulate", "--strategy", name, *flags,
           "--clients", str(args.clients), "--partition", "dirichlet", "--dirichlet-alpha",
           "0.5", "--rounds-per-task", str(args.rounds_per_task), "--seed", str(args.seed),
           "--device", args.device, "--experiment", f"baselines-{benchmark}",
           "--run-name", folder.name, "--output", str(folder)]
    if args.eval_samples:
        cmd += ["--eval-samples-per-task", str(args.eval_samples)]
    if args.cohort_size and batchable(name):
        gpus = args.client_gpus if args.device != "cpu" else 0.0  # a CPU run asks for none
        cmd += ["--cohort-size", str(args.cohort_size), "--client-gpus", str(gpus),
                "--client-cpus", str(args.client_cpus)]
    if budget is not None:
        cmd += ["--strategy-param", f"buffer_size={budget}", "--strategy-param",
                "buffer_scope=total"]
    for spec in args.param:
        target, _, setting = spec.partition(":")
        if target == name:
            cmd += ["--strategy-param", setting]
    if args.quick:
        for setting in QUICK_PARAMS.get(name, []):
            key = setting.partition("=")[0]
            if not any(s.startswith(f"{name}:{key}=") for s in args.param):
                cmd += ["--strategy-param", setting]
    return cmd + shlex.split(args.extra)


def run_one(args: argparse.Namespace, benchmark: str, row: str) -> Row:
    folder = Path(args.out) / benchmark / row.replace("@", "-")
    result = Row(benchmark, row, str(folder),
                 centralized_acc=CENTRALIZED.get(row, {}).get(benchmark))
    if not defined_for(strategy_of(row)[0], benchmark):
        result.not_defined = scenario_of(benchmark)
        print(f"{benchmark} {row}: not defined for {result.not_defined}", flush=True)
        return result
    if args.resume and (folder / "summary.json").is_file():  # finished before
        result.extra["command"] = "(kept from an earlier run)"
        return read_row(result, json.loads((folder / "summary.json").read_text()))
    if not (args.resume and (folder / "checkpoint.pt").is_file()):
        shutil.rmtree(folder, ignore_errors=True)  # a rerun replaces its own run
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = simulate_args(args, benchmark, row, folder)
    result.extra["command"] = shlex.join(cmd[2:])  # from "-m" on: fedcl.cli simulate ...
    started = time.monotonic()
    code, stdout, stderr = RUNS.run(cmd)
    result.wall_s = time.monotonic() - started
    if code != 0 and (folder / "summary.json").is_file():
        code = 0  # the run had finished when the signal came: its results stand
    if code != 0:
        lines = (stderr.strip() or stdout.strip()).splitlines()
        result.error = lines[-1][:300] if lines else f"exit status {code}"
        if RUNS.stopped is not None:  # whatever phase the run was in (even Python's start-up)
            result.error = f"stopped by signal {RUNS.stopped}; --resume goes on"
        print(f"{benchmark} {row}: failed: {result.error}", file=sys.stderr, flush=True)
        return result
    read_row(result, json.loads((folder / "summary.json").read_text()))
    print(f"{benchmark} {row}: ACC {100 * result.acc:.2f} in {result.wall_s:.0f} s",  # type: ignore[operator]
          flush=True)
    return result


class Runs:
    """The ``fedcl simulate`` processes running now, so that a signal reaches them: a stop of
    this script (``timeout``, a batch scheduler, Ctrl-C in another shell) is passed on to each
    run, which ends as it does on its own signal (checkpoint kept for ``--resume``, MLflow run
    marked), and no run starts after it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen[str]] = set()
        self.stopped: int | None = None  # the signal that stopped the benchmark

    def run(self, cmd: list[str]) -> tuple[int, str, str]:
        """Run ``cmd`` to its end: (exit status, stdout, stderr)."""
        with self.lock:
            if self.stopped is not None:
                return 128 + self.stopped, "", f"not started: stopped by signal {self.stopped}"
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=os.environ.copy())
            self.live.add(proc)
        try:
            stdout, stderr = proc.communicate()
        finally:
            with self.lock:
                self.live.discard(proc)
        return proc.returncode, stdout, stderr

    def stop(self, signum: int, _frame: object = None) -> None:
        """Signal handler: pass ``signum`` on to every live run and start no other. Only the
        first signal is passed on: ``timeout`` and schedulers signal the whole process group,
        so the runs may have it already, and a second one would not let them end cleanly."""
        if self.stopped is not None:
            return
        self.stopped = signum
        with self.lock:
            for proc in self.live:
                if proc.poll() is None:
                    proc.send_signal(signum)


RUNS = Runs()


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown(args: argparse.Namespace, rows: list[Row], command: str) -> str:
    """The tables, one per benchmark, and the checks the issue sets."""
    mode = ("quick mode: a check of the pipeline, not the benchmark's settings" if args.quick
            else "the benchmark's settings")
    lines = [f"# Continual-learning baselines, federated ({mode})", "",
             f"{args.clients} clients, Dirichlet 0.5, MLP, {args.rounds_per_task} round(s) per "
             f"task, seed {args.seed}, device {args.device}, {args.jobs} run(s) at once (they "
             "share the machine: seconds per round compare only within one setting); buffers "
             "are samples in total across the federation, split among the clients. Reproduce "
             "with:", "",
             f"    {command}", "",
             "ACC, forgetting, BWT and learning accuracy (LA: each task's accuracy right after "
             "its own training) in %; buffer: raw-sample bytes kept per client (mean); kB up / "
             "down: what one client sends and receives a round, mean over the run (task-end "
             "payloads and extra records included; fedcl.communication); s/round: "
             "mean seconds per round. *Centralized ACC*: the DER paper's figure for the same "
             "method and buffer (mammoth's MLP 784-100-100, 1 epoch per task; METHODS.md "
             "section 20), not a federated run; a federated ACC more than "
             f"{GAP_POINTS:.0f} points below it is marked with its gap.", ""]
    for benchmark in args.benchmarks:
        title = BENCHMARKS[benchmark][0]
        lines += [f"## {title}", "",
                  "| method | ACC | forgetting | BWT | LA | buffer B/client | kB up / down "
                  "per client-round | s/round | centralized ACC (DER paper) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.benchmark == benchmark):
            name, budget = strategy_of(r.row)
            label = LABELS.get(name, name) + (f" ({budget})" if budget else "")
            ref = "–" if r.centralized_acc is None else (
                f"{r.centralized_acc:.2f} ({CENTRALIZED_NAMES[r.row]})")
            if r.not_defined is not None:
                lines.append(f"| {label} | not defined for {r.not_defined} | | | | | | | {ref} |")
                continue
            if r.error is not None:
                lines.append(f"| {label} | failed: {r.error} | | | | | | | {ref} |")
                continue
            if r.centralized_acc is not None and r.acc is not None:
                gap = r.centralized_acc - 100 * r.acc
                if gap > GAP_POINTS:
                    ref += f", {gap:.1f} below"
            buffer = "0" if not r.buffer_bytes_per_client else f"{r.buffer_bytes_per_client:,.0f}"
            spr = "–" if r.seconds_per_round is None else f"{r.seconds_per_round:.2f}"
            traffic = ("–" if r.bytes_up_per_client_round is None else
                       f"{r.bytes_up_per_client_round / 1e3:,.1f} / "
                       f"{r.bytes_down_per_client_round / 1e3:,.1f}")
            lines.append(f"| {label} | {pct(r.acc)} | {pct(r.forgetting)} | {pct(r.bwt)} | "
                         f"{pct(r.learning_accuracy)} | {buffer} | {traffic} | {spr} | {ref} |")
        joint = CENTRALIZED["joint"].get(benchmark)
        if joint is not None:
            lines.append(f"| *JOINT, centralized (DER paper)* | *{joint:.2f}* | | | | | | | |")
        lines.append("")
    lines += checks(rows)
    return "\n".join(lines) + "\n"


def checks(rows: list[Row]) -> list[str]:
    """The issues' targets on Split-MNIST class-IL: FedER and FedDER++ at least 3x FedAvg's
    ACC; TARGET, which stores no sample, at least 2x."""
    by = {r.row: r for r in rows if r.benchmark == "split-class" and r.acc is not None}
    if "fedavg" not in by:
        return []
    base = by["fedavg"].acc or 0.0
    out = []
    for title, wanted, names in (("replay at least 3x FedAvg's ACC", 3.0,
                                  ("feder@200", "feder@500", "fedderpp@200", "fedderpp@500")),
                                 ("TARGET at least 2x FedAvg's ACC, no sample stored", 2.0,
                                  ("target",))):
        lines = []
        for row in names:
            if row in by:
                ratio = (by[row].acc or 0.0) / base if base else float("inf")
                lines.append(f"- {row}: {100 * (by[row].acc or 0.0):.2f} vs FedAvg "
                             f"{100 * base:.2f}: {ratio:.1f}x "
                             f"({'met' if ratio >= wanted else 'not met'})")
        if lines:
            out += [f"## Target: Split-MNIST class-IL, {title}", "", *lines, ""]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmarks", nargs="*", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--rows", nargs="*", default=ROWS,
                   help="strategies, with @budget for the replay methods (feder@200)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rounds-per-task", type=int, default=5)
    p.add_argument("--eval-samples", type=int, default=0,
                   help="test samples per task (0: the whole test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--param", action="append", default=[],
                   help="STRATEGY:KEY=VALUE, a strategy parameter for that strategy's rows")
    p.add_argument("--extra", default="", help="more fedcl simulate flags for every run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--cohort-size", type=int, default=0,
                   help="train the rows that allow it as batched cohorts of this many clients")
    p.add_argument("--client-gpus", type=float, default=0.25,
                   help="per cohort, with --cohort-size (0 with --device cpu)")
    p.add_argument("--client-cpus", type=float, default=2.0, help="per cohort, with --cohort-size")
    p.add_argument("--resume", action="store_true",
                   help="go on from each run's checkpoint; keep finished runs")
    p.add_argument("--quick", action="store_true",
                   help="6 clients, 2 tasks, 1 round per task, 300 test samples per task")
    p.add_argument("--out", default="outputs/baselines")
    args = p.parse_args()
    for row in args.rows:
        if strategy_of(row)[1] is not None and strategy_of(row)[0] not in BUDGETED:
            p.error(f"row {row}: only {', '.join(BUDGETED)} take a buffer budget")
    if args.quick:
        args.clients, args.rounds_per_task = 6, 1
        args.eval_samples = args.eval_samples or 300
    command = shlex.join(["python", "benchmarks/baselines.py", *sys.argv[1:]])
    jobs = [(b, r) for b in args.benchmarks for r in args.rows]
    started = time.monotonic()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, RUNS.stop)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda job: run_one(args, *job), jobs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "baselines.md").write_text(markdown(args, rows, command))
    payload = {"command": command, "quick": args.quick, "clients": args.clients,
               "rounds_per_task": args.rounds_per_task, "seed": args.seed,
               "device": args.device, "wall_s": time.monotonic() - started,
               "rows": [vars(r) for r in rows]}
    (out / "baselines.json").write_text(json.dumps(payload, indent=2) + "\n")
    print((out / "baselines.md").read_text())
    if RUNS.stopped is not None:
        print(f"stopped by signal {RUNS.stopped}: go on with --resume", file=sys.stderr)
        sys.exit(128 + RUNS.stopped)


if __name__ == "__main__":
    main()
