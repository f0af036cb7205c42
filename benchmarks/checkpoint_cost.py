"""Size and write time of a round checkpoint (fedcl.checkpoint) for the MLP and the reduced
ResNet-18, with a full record history of a 5-task x 20-round run and, for FOT, a basis.

    .venv/bin/python benchmarks/checkpoint_cost.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedcl import checkpoint, plugins
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.results import RoundRecord
from fedcl.run_setup import setup_run


def main() -> None:
    print(f"{'model':<10}{'strategy':<10}{'checkpoint MB':>15}{'write ms (median of 10)':>26}")
    for model, strategy, dataset_scenario in (("mlp", "fedavg", "class-il"),
                                              ("mlp", "fot", "domain-il"),
                                              ("resnet18", "fedavg", "class-il")):
        cfg = setup_run(Config(model=model, strategy=strategy, scenario=dataset_scenario,
                               tasks=5)).config
        sc = build_scenario(cfg)
        strat = plugins.build_strategy(cfg)
        arrays = ArrayRecord(plugins.build_model(cfg, sc).state_dict())
        if strategy == "fot":  # a basis as after a few PMNIST tasks
            strat.basis = {"body.2": torch.linalg.qr(torch.randn(784, 400))[0],
                           "body.5": torch.linalg.qr(torch.randn(400, 300))[0],
                           "heads.0": torch.linalg.qr(torch.randn(400, 300))[0]}
        records = [RoundRecord(task=r // 20, round=r + 1, task_round=r % 20 + 1,
                               acc_per_task=[0.5] * 5, avg_acc=0.5, min_acc=0.4, wc_acc=0.45,
                               train_loss=0.3, clients=50, failures=0, seconds=1.0)
                   for r in range(100)]
        progress = checkpoint.RunState(arrays=arrays, baseline=[0.1] * 5, records=records,
                                       curves=[[0.5] * 5] * 100, round_task=[0] * 100)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / checkpoint.FILE
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                checkpoint.save(path, progress, strat, cfg, "run", 1.0)
                times.append(time.perf_counter() - t0)
            size = path.stat().st_size
        ms = 1000 * statistics.median(times)
        print(f"{model:<10}{strategy:<10}{size / 2**20:15.2f}{ms:26.1f}")


if __name__ == "__main__":
    main()
