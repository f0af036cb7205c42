"""One federated workload, six ways, one table: the single-process limit, plain Flower, fedcl
FedAvg, fedcl FOT, fedcl FedAvg with batched cohorts and Apple's pfl-research.

The workload: ``--clients`` clients with ``--samples`` CIFAR-sized (3x32x32) images each, the
small CNN (``--model cnn``), one local epoch of SGD (lr 0.01, batch 32), every client in every
round, central evaluation of every task after every round, two domain-IL tasks (pixel
permutations) so that FOT projects in the second. The images are synthetic (class-dependent
colour patterns plus noise), written as a CIFAR-10 folder in the dataset's own format and read
through fedcl's CIFAR-10 loader: timing does not depend on the pixels.

The six ways, each in its own process tree:

``sequential``    the same client work in one process with plain PyTorch: every client's data
                  already on the device, one model reused, weighted averaging by hand
``plain-flower``  ``benchmarks/plain_flower.py``: Flower's FedAvg and a hand-written ClientApp on
                  Flower's Ray simulation engine
``fedcl-fedavg``  ``fedcl simulate`` (MLflow logging and a checkpoint every round included)
``fedcl-fot``     ``fedcl simulate --strategy fot``
``fedcl-cohort``  ``fedcl simulate --cohort-size K``: FedAvg with K clients trained per
                  ClientApp call as one batched computation (``--cohort-size``, default 10;
                  ``--gpus-per-cohort``, default 1 / number of cohorts)
``pfl``           ``benchmarks/pfl_way.py``: the workload in pfl-research's own API (FedAvg on its
                  simulated backend, the data on the device) with N worker processes sharing the
                  GPU(s), once for each N of ``--pfl-processes`` (rows ``pfl N=..``; the best N is
                  named below the table). Needs the ``bench-pfl`` extra:
                  ``pip install -e '.[bench-pfl]'``

Columns: steady-state seconds per round (median of round-to-round times, leaving out each
task's first round), samples per second (clients x samples / that), time from launch to the end
of the first round, peak host memory (sum of PSS over the process tree, sampled every 0.5 s) and,
on a GPU, the peak of the GPU's used memory above what it used before launch (nvidia-smi, every
0.5 s) and fedcl's largest per-client CUDA peak over the run (from the clients' reports).
Last, the share of a peak: the CNN's training FLOPs of a round (:func:`training_flops_per_round`:
clients x samples x local epochs x 3 x 2 x the forward multiply-adds of its conv and linear
layers; the backward pass costs about twice the forward) over the steady seconds per round,
divided by ``--peak-tflops`` (default 67, the H200's dense FP32 peak in NVIDIA's H200 datasheet;
the central evaluation's forward passes are not counted).

    python benchmarks/throughput.py                                  # GPU: 50 clients x 500
    python benchmarks/throughput.py --clients 10 --rounds-per-task 3 # a small CPU run
    python benchmarks/throughput.py --ways fedcl-fedavg --rounds-per-task 10 --json out.json
    python benchmarks/throughput.py --ways pfl,fedcl-cohort --pfl-processes 1,4,6,8,12
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WAYS = ("sequential", "plain-flower", "fedcl-fedavg", "fedcl-fot", "fedcl-cohort", "pfl")
H200_FP32_TFLOPS = 67.0  # NVIDIA H200 datasheet (SXM): FP32 67 TFLOPS, dense


# --- the workload ------------------------------------------------------------------------------
def write_synthetic_cifar10(root: Path, train: int, test: int, seed: int = 0) -> None:
    """A CIFAR-10 folder (five training batches, a test batch, the meta file) of synthetic
    images: a per-class colour pattern plus uniform noise, so that a model can learn them."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(10, 3072))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, size=n)
        noise = rng.integers(-96, 97, size=(n, 3072))
        return np.clip(patterns[labels] // 2 + 64 + noise, 0, 255).astype(np.uint8), [
            int(v) for v in labels]

    sizes = [train // 5 + (1 if b < train % 5 else 0) for b in range(5)]
    for b, n in enumerate(sizes, start=1):
        data, labels = images(n)
        with open(folder / f"data_batch_{b}", "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    data, labels = images(test)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": data, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, fh)


def workload_toml(args: argparse.Namespace, data_dir: Path) -> str:
    import tomli_w

    return tomli_w.dumps({
        "dataset": "cifar10", "data_dir": str(data_dir), "model": "cnn",
        "scenario": "domain-il", "domain_shift": "permute", "tasks": 2,
        "rounds_per_task": args.rounds_per_task, "clients": args.clients,
        "fraction_train": 1.0, "partition": "iid", "local_epochs": 1, "batch_size": 32,
        "lr": 0.01, "eval_samples_per_task": 1000, "device": args.device,
        "client_cpus": args.cpus_per_client, "client_gpus": args.gpus_per_client,
        "seed": 0, "experiment": "throughput"})


def forward_macs(model, input_shape: tuple[int, ...], head: int | None = None) -> int:
    """Multiply-adds of one sample's forward pass through ``model``'s Conv2d and Linear layers
    (the only layers with a real share of the work; bias adds, ReLU and pooling left out)."""
    import torch
    from torch import nn

    macs = [0]

    def count(module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs[0] += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape), head)
    finally:
        for h in hooks:
            h.remove()
    return macs[0]


def training_flops_per_round(model, input_shape: tuple[int, ...], samples: int,
                             local_epochs: int = 1) -> float:
    """Training FLOPs of one round: every sample of the round through forward and backward, the
    backward taken as twice the forward (3x), a multiply-add as 2 FLOPs."""
    return float(samples) * local_epochs * 3 * 2 * forward_macs(model, input_shape)


# --- way (a): the single-process loop ----------------------------------------------------------
def sequential_worker(config_path: str) -> None:
    import torch
    from torch import nn

    from fedcl.config import load_toml
    from fedcl.data.datasets import to_float
    from fedcl.data.partition import client_positions
    from fedcl.data.scenarios import build_scenario
    from fedcl.models import build_model
    from fedcl.run_setup import setup_run
    from fedcl.training import accuracy, resolve_device

    cfg = setup_run(load_toml(config_path)).config
    device = resolve_device(cfg.device)
    sc = build_scenario(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, sc.dataset.input_shape, sc.classes_per_head,
                        sc.num_heads).to(device)
    tests = [tuple(v.to(device) for v in sc.test_data(t, cfg.eval_samples_per_task, cfg.seed))
             for t in range(cfg.tasks)]
    mean, std = sc.dataset.mean, sc.dataset.std
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    ended_at, matrix = [], []
    for task in range(cfg.tasks):
        data = [tuple(v.to(device) for v in sc.train_data(task, client_positions(cfg, c, task)))
                for c in range(cfg.clients)]
        head = sc.head_for(task)
        for _ in range(cfg.rounds_per_task):
            total_n = sum(len(y) for _, y in data)
            acc_state = {k: torch.zeros_like(v, dtype=torch.float32)
                         for k, v in global_state.items()}
            for x, y in data:
                model.load_state_dict(global_state)
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
                order = torch.randperm(len(y), device=device)
                for s in range(0, len(y), cfg.batch_size):
                    b = order[s:s + cfg.batch_size]
                    loss = nn.functional.cross_entropy(model(to_float(x[b], mean, std), head),
                                                       y[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                for k, v in model.state_dict().items():
                    acc_state[k] += v.float() * (len(y) / total_n)
            global_state = {k: acc_state[k].to(v.dtype) for k, v in global_state.items()}
            model.load_state_dict(global_state)
            accs = [accuracy(model, x, y, sc.head_for(t), mean, std, device)
                    for t, (x, y) in enumerate(tests)]
            ended_at.append(time.time())
        matrix.append(accs)
    print(json.dumps({"ended_at": ended_at, "accuracy_matrix": matrix}))


# --- measuring ----------------------------------------------------------------------------------
def gpu_used_mib() -> float | None:
    """Used memory of GPU 0 in MiB (nvidia-smi), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits", "-i", "0"], capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_way(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run one way; returns its stdout, launch time and memory peaks."""
    gpu_before = gpu_used_mib()
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"pss": 0, "gpu": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak["pss"] = max(peak["pss"], tree_pss(ps))
            except psutil.NoSuchProcess:
                break
            used = gpu_used_mib()
            if used is not None and gpu_before is not None:
                peak["gpu"] = max(peak["gpu"], used - gpu_before)
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"stdout": out, "launched": launched, "peak_pss": peak["pss"],
            "peak_gpu_mib": peak["gpu"] if gpu_before is not None else None}


def steady_seconds(ended_at: list[float], rounds_per_task: int) -> tuple[float, list[float]]:
    """Median round-to-round time, leaving out each task's first round (per-task set-up)."""
    gaps = [b - a for a, b in itertools.pairwise(ended_at)]
    # gaps[i] is round i+2's time (1-based); round r is a task's first when (r-1) % R == 0
    keep = [g for i, g in enumerate(gaps) if (i + 1) % rounds_per_task != 0]
    return statistics.median(keep or gaps), gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--samples", type=int, default=500, help="training images per client")
    p.add_argument("--rounds-per-task", type=int, default=5)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="Ray GPUs per simulated client (default: 0.1 with a GPU, else 0)")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--cohort-size", type=int, default=10, help="clients per cohort (fedcl-cohort)")
    p.add_argument("--gpus-per-cohort", type=float, default=None,
                   help="Ray GPUs per cohort (default: 1 / number of cohorts with a GPU, else 0)")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " +
                   ", ".join(WAYS))
    p.add_argument("--pfl-processes", default="1,2,4,8",
                   help="pfl way: comma-separated numbers of pfl worker processes, one run each")
    p.add_argument("--peak-tflops", type=float, default=H200_FP32_TFLOPS,
                   help="the peak that the last column is a share of (default: the H200's "
                        "dense FP32 peak, 67 TFLOPS, NVIDIA's datasheet)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "sequential":
        sequential_worker(args.config)
        return
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        raise SystemExit(f"unknown way(s): {', '.join(unknown)}")
    pfl_processes = [int(n) for n in args.pfl_processes.split(",") if n.strip()]
    if "pfl" in ways and importlib.util.find_spec("pfl") is None:
        raise SystemExit("the pfl way needs pfl-research: pip install -e '.[bench-pfl]'")
    import torch

    from fedcl.models import build_model

    has_gpu = args.device != "cpu" and torch.cuda.is_available()
    # domain-IL on CIFAR-10: one 10-way head, 3x32x32 inputs
    flops = training_flops_per_round(build_model("cnn", (3, 32, 32), 10, 1), (3, 32, 32),
                                     args.clients * args.samples)
    if args.gpus_per_client is None:
        args.gpus_per_client = 0.1 if has_gpu else 0.0
    if args.gpus_per_cohort is None:
        cohorts = -(-args.clients // args.cohort_size)
        args.gpus_per_cohort = round(1.0 / cohorts, 3) if has_gpu else 0.0
    work = Path(tempfile.mkdtemp(prefix="fedcl-throughput-"))
    write_synthetic_cifar10(work / "data", args.clients * args.samples, 2000)
    config = work / "workload.toml"
    config.write_text(workload_toml(args, work / "data"))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ft", dir="/tmp"),
           "MPLCONFIGDIR": str(work / "mpl"), "FLWR_HOME": str(work / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    commands = {
        "sequential": [sys.executable, __file__, "--worker", "sequential", "--config",
                       str(config)],
        "plain-flower": [sys.executable, str(ROOT / "benchmarks" / "plain_flower.py"),
                         "--config", str(config)],
        "fedcl-fedavg": [sys.executable, "-m", "fedcl.cli", "simulate", "--config", str(config),
                         "--output", str(work / "fedcl-fedavg")],
        "fedcl-fot": [sys.executable, "-m", "fedcl.cli", "simulate", "--config", str(config),
                      "--strategy", "fot", "--output", str(work / "fedcl-fot")],
        "fedcl-cohort": [sys.executable, "-m", "fedcl.cli", "simulate", "--config", str(config),
                         "--cohort-size", str(args.cohort_size), "--client-gpus",
                         str(args.gpus_per_cohort), "--output", str(work / "fedcl-cohort")],
    }
    runs = []
    for way in ways:
        if way == "pfl":
            for n in pfl_processes:
                commands[f"pfl N={n}"] = [sys.executable, str(ROOT / "benchmarks" / "pfl_way.py"),
                                          "--config", str(config), "--processes", str(n)]
                runs.append(f"pfl N={n}")
        else:
            runs.append(way)
    results = {}
    for way in runs:
        res = run_way(commands[way], work, env)
        gpu_client_peak = None
        if way.startswith("fedcl"):
            summary = json.loads((work / way / "summary.json").read_text())
            ended_at = [r["ended_at"] for r in summary["rounds"]]
            acc = summary["acc"]
            peaks = [r["client_gpu_peak_mb"] for r in summary["rounds"]
                     if r.get("client_gpu_peak_mb") is not None]
            reserved = [r["client_gpu_reserved_mb"] for r in summary["rounds"]
                        if r.get("client_gpu_reserved_mb") is not None]
            if peaks:
                gpu_client_peak = {"peak_mb_per_round": peaks, "reserved_mb_per_round": reserved}
                per_gpu: dict[str, dict[str, float]] = {}  # rounds[].client_gpus over the run
                for r in summary["rounds"]:
                    for gpu, v in (r.get("client_gpus") or {}).items():
                        e = per_gpu.setdefault(gpu.rsplit("/", 1)[-1],
                                               {"peak_mb": 0.0, "replies": 0})
                        e["peak_mb"] = max(e["peak_mb"], v["peak_mb"])
                        e["replies"] += v["replies"]
                gpu_client_peak["per_gpu"] = per_gpu
            names = summary["rounds"][-1]["phases"]
            phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in summary["rounds"])
                      for k in names}
            handler = [r["client_compute_s"] for r in summary["rounds"]
                       if r.get("client_compute_s") is not None]
            if handler:  # the longest train handler of a round, inside the clients phase
                phases["longest_client_handler"] = statistics.median(handler)
        else:
            phases = None
            out = json.loads(res["stdout"].strip().splitlines()[-1])
            ended_at, acc = out["ended_at"], statistics.mean(out["accuracy_matrix"][-1])
            if "datapoints_per_round" in out and any(  # pfl: every client, every sample
                    d != args.clients * args.samples for d in out["datapoints_per_round"]):
                print(f"{way}: trained on {out['datapoints_per_round']} samples a round, not "
                      f"{args.clients * args.samples}", file=sys.stderr)
        steady, gaps = steady_seconds(ended_at, args.rounds_per_task)
        results[way] = {
            "steady_s_per_round": steady, "samples_per_s": args.clients * args.samples / steady,
            "first_round_s": ended_at[0] - res["launched"], "round_gaps_s": gaps,
            "peak_host_pss_gib": res["peak_pss"] / 2**30, "peak_gpu_mib": res["peak_gpu_mib"],
            "client_gpu": gpu_client_peak, "phases_median_s": phases, "acc": acc,
            "peak_share": flops / steady / (args.peak_tflops * 1e12)}
        print(f"{way}: {steady:.3f} s/round", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name(0) if has_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.clients} clients x {args.samples} samples, {args.rounds_per_task} rounds x "
          f"2 tasks, {device}, {args.gpus_per_client} GPU / {args.cpus_per_client} CPU per "
          f"Ray client; cohorts of {args.cohort_size} with {args.gpus_per_cohort} GPU each\n")
    print(f"training FLOPs per round: {flops / 1e12:.3f} TFLOP (CNN forward "
          f"{flops / (6 * args.clients * args.samples) / 1e6:.2f} M multiply-adds a sample); "
          f"% of peak: of {args.peak_tflops:g} TFLOPS\n")
    print("| way | s/round (steady) | samples/s | first round s | peak host PSS GiB | "
          "peak GPU MiB | ACC % | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for way, r in results.items():
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"| {way} | {r['steady_s_per_round']:.3f} | {r['samples_per_s']:.0f} | "
              f"{r['first_round_s']:.1f} | {r['peak_host_pss_gib']:.2f} | {gpu} | "
              f"{100 * r['acc']:.2f} | {100 * r['peak_share']:.3f} |")
    pfl_rows = {w: r for w, r in results.items() if w.startswith("pfl N=")}
    if pfl_rows:
        best = min(pfl_rows, key=lambda w: pfl_rows[w]["steady_s_per_round"])
        print(f"pfl best: {best} ({pfl_rows[best]['steady_s_per_round']:.3f} s/round, "
              f"{pfl_rows[best]['samples_per_s']:.0f} samples/s)")
    if "plain-flower" in results:
        base = results["plain-flower"]["steady_s_per_round"]
        for way in ("fedcl-fedavg", "fedcl-fot", "fedcl-cohort", *pfl_rows):
            if way in results:
                print(f"{way} / plain-flower: {results[way]['steady_s_per_round'] / base:.2f}x "
                      f"time per round ({base / results[way]['steady_s_per_round']:.2f}x "
                      "throughput)")
    if "fedcl-fedavg" in results and "fedcl-fot" in results:
        ratio = (results["fedcl-fot"]["steady_s_per_round"]
                 / results["fedcl-fedavg"]["steady_s_per_round"])
        print(f"fedcl-fot / fedcl-fedavg: {ratio:.2f}x")
    for way, r in results.items():
        if r["phases_median_s"]:
            print(f"{way}: median seconds per phase: " + ", ".join(
                f"{k} {v:.3f}" for k, v in r["phases_median_s"].items()))
        if r["client_gpu"]:
            peaks = r["client_gpu"]["peak_mb_per_round"]
            res_ = r["client_gpu"]["reserved_mb_per_round"]
            print(f"{way}: per-client CUDA peak {peaks[0]:.1f} MiB in round 1, "
                  f"{peaks[-1]:.1f} MiB in round {len(peaks)} (max {max(peaks):.1f}); "
                  f"allocator reserve {res_[0]:.1f} -> {res_[-1]:.1f} MiB")
            if r["client_gpu"].get("per_gpu"):
                print(f"{way}: per GPU: " + ", ".join(
                    f"{g} peak {v['peak_mb']:.0f} MiB, {v['replies']} replies"
                    for g, v in sorted(r["client_gpu"]["per_gpu"].items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device,
                                               "training_flops_per_round": flops,
                                               "results": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
