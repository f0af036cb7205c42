"""GLFC's proxy: inverting prototype gradients one at a time (the authors' code) against all of
them in one L-BFGS (fedcl's default, ``inversion_batch`` 0): seconds, final matching loss and
the last iterate's pixel error, on the gradients of real MNIST images.

    python benchmarks/glfc_inversion.py [--gradients 20] [--steps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcl.api import build_scenario  # noqa: E402
from fedcl.config import Config  # noqa: E402
from strategies.baselines.glfc_maths import (  # noqa: E402
    invert_gradient,
    invert_gradients,
    prototype_gradient,
    proxy_network,
    unflatten,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gradients", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--keep", type=int, default=10)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dataset = build_scenario(Config()).dataset
    net = proxy_network(dataset.input_shape, dataset.num_classes, 0).to(device)
    x = dataset.train.x[:args.gradients].float().div(255).sub(0.1307).div(0.3081)
    labels = dataset.train.y[:args.gradients].tolist()
    targets = [unflatten(net, prototype_gradient(net, x[i].to(device), labels[i]))
               for i in range(args.gradients)]

    def seeds() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(args.gradients)]

    started = time.perf_counter()
    alone = [invert_gradient(net, targets[i], labels[i], dataset.input_shape, args.steps, 0.1,
                             args.keep, g) for i, g in enumerate(seeds())]
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    together = invert_gradients(net, targets, labels, dataset.input_shape, args.steps, 0.1,
                                args.keep, seeds())
    together_s = time.perf_counter() - started
    print(f"{args.gradients} MNIST gradients, {args.steps} L-BFGS steps, {args.device}")
    print("| inversion | seconds | median final loss | worst final loss | median pixel error |")
    print("|---|---|---|---|---|")
    for name, secs, invs in (("one at a time", alone_s, alone), ("together", together_s,
                                                                  together)):
        ends = [inv.end_loss for inv in invs]
        errors = [float((inv.images[-1] - x[i]).abs().mean()) for i, inv in enumerate(invs)]
        print(f"| {name} | {secs:.1f} | {statistics.median(ends):.2e} | {max(ends):.2e} | "
              f"{statistics.median(errors):.4f} |")


if __name__ == "__main__":
    main()
