"""The cost of FOT's server step at a task's end, per projected layer: seconds and basis memory,
for the MLP (Permuted-MNIST) and the reduced ResNet-18 (5-Datasets), at the paper's settings.

The timed code is the real :meth:`strategies.fot.FOT.end_task` (sum of the clients' sketches
in float64, the adjusted threshold, the SVD, the basis growth and its QR), fed what clients
send: per client and layer a sketch of the layer's shape (``d x m``, ``m = d`` for the MLP,
``m = 5d`` capped at ``max_sketch_cols`` for the ResNet, the defaults) and its ratio. The
sketches are synthetic: each task's representation has a random column space of rank d/2
with a power-law spectrum, residualised against the current basis as a client does, and every
client of the task end sends that one sketch (summing 64 equal arrays costs what summing 64
different ones does). Basis growth therefore follows these spectra, not a trained model's;
the seconds depend on the shapes (d, m, clients) and on the basis size.

    python benchmarks/fot_server_step.py [--clients 64] [--models mlp resnet18]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedcl import subspace
from fedcl.models import build_model
from strategies.fot import FOT, SKETCH, STATS, FOTParams, sketch_columns, sketch_settings

# model: (input shape, classes per head, heads, tasks, eps) as in the FOT authors' run scripts
SETTINGS = {"mlp": ((1, 28, 28), 10, 1, 10, 0.96),  # Permuted-MNIST, IID
            "resnet18": ((3, 32, 32), 10, 5, 5, 0.95)}  # 5-Datasets, ResNet-18 nf = 20


def task_sketch(d: int, m: int, U: torch.Tensor | None, gen: torch.Generator
                ) -> tuple[torch.Tensor, float]:
    """(Y, r) for a task whose representation has a random column space of rank d/2 with
    singular values 1, 1/sqrt(2), 1/sqrt(3), ..., residualised against ``U``."""
    q = max(1, d // 2)
    B, _ = torch.linalg.qr(torch.randn(d, q, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(1, q + 1, dtype=torch.float64) ** -0.5
    R = (B * spectrum) @ torch.randn(q, m, generator=gen, dtype=torch.float64)
    R_hat, r = subspace.residualize(R, U)
    return R_hat.float(), r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64, help="clients in a task's last round")
    p.add_argument("--models", nargs="*", default=list(SETTINGS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.clients} clients per task end, {args.threads} threads")
    for name in args.models:
        shape, classes, heads, tasks, eps = SETTINGS[name]
        model = build_model(name, shape, classes, heads)
        params = FOTParams(eps=eps)
        layers = subspace.projected_layers(model)
        _, width = sketch_settings(model, params)
        fot = FOT(params, layers)
        gen = torch.Generator().manual_seed(0)
        dims = {ly: subspace.input_dim(model.get_submodule(ly)) for ly in layers}
        cols = {ly: sketch_columns(model.get_submodule(ly), width, params.max_sketch_cols)
                for ly in layers}
        seconds: dict[str, list[float]] = {ly: [] for ly in layers}
        totals = []
        for task in range(tasks):
            sketches, stats = {}, ConfigRecord({"n": 500})
            for layer in layers:
                sketches[layer], stats[f"{layer}.r"] = task_sketch(
                    dims[layer], cols[layer], fot.basis.get(layer), gen)
            record = ArrayRecord(sketches)
            fot.payloads = {k: RecordDict({SKETCH: record, STATS: stats})
                            for k in range(args.clients)}
            fot.end_task(task, ArrayRecord())
            for layer in layers:
                seconds[layer].append(fot.step_seconds[layer])
            totals.append(sum(fot.step_seconds.values()))
        metrics = fot.state_metrics()
        print(f"\n{name}: {len(layers)} projected layers, {tasks} tasks, eps {eps}; server step "
              f"per task end, all layers: median {statistics.median(totals):.3f} s, max "
              f"{max(totals):.3f} s; final basis memory "
              f"{sum(v for k, v in metrics.items() if k.startswith('fot_basis_mb.')):.1f} MiB")
        print(f"{'layer':<28}{'d':>6}{'m':>6}{'median s':>10}{'max s':>8}{'dim':>6}{'MiB':>8}")
        for layer in layers:
            print(f"{layer:<28}{dims[layer]:>6}{cols[layer]:>6}"
                  f"{statistics.median(seconds[layer]):>10.4f}{max(seconds[layer]):>8.4f}"
                  f"{int(metrics[f'fot_basis_dim.{layer}']):>6}"
                  f"{metrics[f'fot_basis_mb.{layer}']:>8.2f}")


if __name__ == "__main__":
    main()
