"""Where a cohort's time goes inside one ClientApp call: batched training (stacked layers, and
for comparison vmap of functional_call), copying the members' weights off the GPU, and
serialising them into Flower ArrayRecords (CNN, 3x32x32, 500 samples per member, batch 32, one
epoch), for several cohort sizes. On a GPU the batched training is timed both ways:
dispatched step by step ("eager") and replayed as a CUDA graph ("graph");
a ClientApp uses the graph for cohorts of up to ``cohort_training.GRAPH_MAX_MEMBERS``.

    python benchmarks/cohort_profile.py --sizes 1,10,50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ArrayRecord

from fedcl import cohort_training
from fedcl.config import Config
from fedcl.models import build_model
from fedcl.training import LocalTrainer, RoundContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,10,25,50")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", type=int, default=0,
                   help="also list the GPU's top kernels of one eager cohort of this size")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms (torch.backends.cudnn.benchmark)")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = Config(batch_size=32, lr=0.01, device=device.type)
    model = build_model("cnn", (3, 32, 32), 10, 1)
    gen = torch.Generator().manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}")
    for k in [int(v) for v in args.sizes.split(",")]:
        members = [(i, torch.randint(0, 256, (args.samples, 3, 32, 32), generator=gen,
                                     dtype=torch.uint8),
                    torch.randint(0, 10, (args.samples,), generator=gen)) for i in range(k)]
        times: dict[str, list[float]] = {"eager": [], "vmap": [], "graph": [], "serialise": [],
                                         "loop": []}
        graph_diff = 0.0
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            eager = cohort_training.train_cohort(model, members, config=config, task=0, round_=1,
                                                 head=None, device=device, mean=mean, std=std,
                                                 cuda_graph=False)
            sync()
            times["eager"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the same cohort through vmap of functional_call
            cohort_training.train_cohort(model, members, config=config, task=0, round_=1, head=None,
                                         device=device, mean=mean, std=std, cuda_graph=False,
                                         generic=True)
            sync()
            times["vmap"].append(time.perf_counter() - t0)
            # copies, so the page-locked buffers go back to the cache as a ClientApp's do
            eager = [{n: v.clone() for n, v in r.state.items()} for r in eager]
            t0 = time.perf_counter()
            res = cohort_training.train_cohort(model, members, config=config, task=0, round_=1,
                                               head=None, device=device, mean=mean, std=std,
                                               cuda_graph=device.type == "cuda")
            sync()
            t1 = time.perf_counter()
            records = [ArrayRecord(r.state) for r in res]
            t2 = time.perf_counter()
            times["graph"].append(t1 - t0)
            times["serialise"].append(t2 - t1)
            graph_diff = max(graph_diff, *((a[n] - b.state[n]).abs().max().item()
                                           for a, b in zip(eager, res, strict=True)
                                           for n in a))
            assert len(records) == k
            del res, records
            sync()
            t3 = time.perf_counter()
            for pid, x, y in members:  # the same clients one after another, per-client loop
                LocalTrainer().train(RoundContext(config=config, model=model, x=x, y=y, head=None,
                                                  task=0, round=1, partition_id=pid,
                                                  device=device, mean=mean, std=std))
            sync()
            times["loop"].append(time.perf_counter() - t3)
        med = {key: statistics.median(v[1:] or v) for key, v in times.items()}
        on_gpu = device.type == "cuda"
        used = med["graph"] if on_gpu and k <= cohort_training.GRAPH_MAX_MEMBERS else med["eager"]
        graph = (f"graph {med['graph']:.3f} s (max |graph - eager| {graph_diff:.1e})"
                 if on_gpu else "no graph on a CPU")
        print(f"cohort {k:3d}: eager {med['eager']:.3f} s (vmap {med['vmap']:.3f} s), {graph}, "
              f"serialise {med['serialise']:.3f} s, "
              f"one-by-one {med['loop']:.3f} s ({med['loop'] / used:.1f}x the way a ClientApp "
              "trains this cohort)", flush=True)
        if k == args.kernels and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                cohort_training.train_cohort(model, members, config=config, task=0, round_=1,
                                             head=None, device=device, mean=mean, std=std,
                                             cuda_graph=False)
                sync()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                            max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
