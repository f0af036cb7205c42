"""Start-up cost of partitioning one task by the number of clients: seconds for
:func:`fedcl.data.partition.partition_positions` on 20 labels per client (10 classes, drawn
uniformly with a fixed seed; a Dirichlet split needs a few samples per client to leave none
empty), every method, after one warm-up call (the imports of flwr-datasets are not counted).

    python benchmarks/partition_cost.py [--clients 1000,10000,50000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from fedcl.data.partition import partition_positions

SETTINGS = {"iid": {}, "dirichlet": {"alpha": 100.0}, "shards": {"shards_per_partition": 2}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1000,10000,50000")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    partition_positions(rng.integers(0, 10, 200), 10, "dirichlet", seed=0, alpha=100.0)  # imports
    print("| method | clients | seconds |")
    print("|---|---|---|")
    for method, extra in SETTINGS.items():
        for clients in (int(c) for c in args.clients.split(",")):
            labels = rng.integers(0, 10, 20 * clients)
            start = time.perf_counter()
            parts = partition_positions(labels, clients, method, seed=1, **extra)
            seconds = time.perf_counter() - start
            assert len(parts) == clients and min(len(part) for part in parts) > 0
            print(f"| {method} | {clients:,} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
