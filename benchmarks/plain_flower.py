"""Plain Flower FedAvg on the same clients, data and model as ``fedcl simulate``: the baseline that
fedcl's overhead is measured against.

Flower's own FedAvg and ``strategy.start`` run each task's rounds, with a hand-written PyTorch
loop on the clients and central evaluation of every task after every round (``evaluate_fn``), as
fedcl does. Only the data comes from fedcl (``fedcl.data``), so both sides train on identical
samples. Clients train on the config's device (CUDA with ``client_gpus`` per client when there
is a GPU) and the server evaluates there too. Prints one JSON object: per-round seconds, the Unix
time each round ended, and the accuracy matrix.

    python benchmarks/plain_flower.py --clients 50 --tasks 5 --rounds-per-task 3
    python benchmarks/plain_flower.py --config workload.toml    # any fedcl config file
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

from fedcl.config import Config, load_toml
from fedcl.data.datasets import to_float
from fedcl.data.partition import client_positions
from fedcl.data.scenarios import build_scenario
from fedcl.models import build_model
from fedcl.run_setup import setup_run
from fedcl.training import resolve_device

client_app = ClientApp()
CONFIG_JSON = "bench-config"


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = Config.from_json(str(msg.content["config"][CONFIG_JSON]))
    task = int(msg.content["config"]["task"])
    pid = int(context.node_config["partition-id"])
    sc = build_scenario(cfg)
    x, y = sc.train_data(task, client_positions(cfg, pid, task))
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, sc.dataset.input_shape, sc.classes_per_head, sc.num_heads)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    head = sc.head_for(task)
    total, steps = torch.zeros((), device=device), 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(y), device=device)
        for s in range(0, len(y), cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(to_float(x[b], sc.dataset.mean,
                                                              sc.dataset.std), head), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
    return Message(RecordDict({"arrays": ArrayRecord(model.to("cpu").state_dict()),
                               "metrics": MetricRecord({"num-examples": len(y),
                                                        "train-loss": float(total) / max(steps, 1)
                                                        })}),
                   reply_to=msg)


def make_server_app(cfg: Config, result: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sc = build_scenario(cfg)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, sc.dataset.input_shape, sc.classes_per_head, sc.num_heads)
        tests = [tuple(v.to(device) for v in sc.test_data(t, cfg.eval_samples_per_task,
                                                           cfg.seed)) for t in range(cfg.tasks)]
        stamps: list[float] = []
        ended_at: list[float] = []
        curves: list[list[float]] = []

        @torch.no_grad()
        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            model.to(device).eval()
            accs = []
            for t, (x, y) in enumerate(tests):
                pred = torch.cat([model(to_float(x[i:i + 1000], sc.dataset.mean, sc.dataset.std),
                                        sc.head_for(t)).argmax(1)
                                  for i in range(0, len(y), 1000)])
                accs.append(float((pred == y).float().mean()))
            if server_round > 0:
                curves.append(accs)
                ended_at.append(time.time())
            stamps.append(time.monotonic())
            return MetricRecord({"avg": sum(accs) / len(accs)})

        strategy = FedAvg(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                          min_available_nodes=cfg.clients)
        arrays = ArrayRecord(model.state_dict())
        matrix, seconds = [], []
        for task in range(cfg.tasks):
            stamps.clear()
            res = strategy.start(grid=grid, initial_arrays=arrays,
                                 num_rounds=cfg.rounds_per_task,
                                 train_config=ConfigRecord({CONFIG_JSON: cfg.to_json(),
                                                            "task": task}),
                                 evaluate_fn=evaluate)
            arrays = res.arrays
            seconds += [b - a for a, b in itertools.pairwise(stamps)]
            matrix.append(curves[-1])
        result.update(seconds_per_round=seconds, accuracy_matrix=matrix, ended_at=ended_at)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--rounds-per-task", type=int, default=3)
    p.add_argument("--fraction-train", type=float, default=1.0)
    p.add_argument("--config", help="a fedcl TOML config (then the other flags are ignored)")
    args = p.parse_args()
    if args.config:
        cfg = setup_run(load_toml(args.config)).config
    else:
        cfg = setup_run(Config(clients=args.clients, tasks=args.tasks,
                               rounds_per_task=args.rounds_per_task,
                               fraction_train=args.fraction_train)).config
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}.items():
        os.environ.setdefault(k, v)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    result: dict = {}
    t0 = time.monotonic()
    run_simulation(server_app=make_server_app(cfg, result), client_app=client_app,
                   num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": cfg.client_cpus,
                                                        "num_gpus": cfg.client_gpus},
                                   "init_args": {"logging_level": logging.ERROR,
                                                 "log_to_driver": False}})
    result["wall_time_s"] = time.monotonic() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
