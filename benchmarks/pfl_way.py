"""The throughput workload written with Apple's pfl-research (``pfl``, the ``bench-pfl`` extra):
the ``pfl`` way of ``benchmarks/throughput.py``.

pfl's own API throughout: ``FederatedAveraging`` run by ``SimulatedBackend`` over a
``FederatedDataset``, a ``PyTorchModel`` (local ``torch.optim.SGD``; a central SGD with learning
rate 1 applies the averaged model difference, which is FedAvg), ``WeightByDatapoints`` (the
average is weighted by samples, as fedcl's) and callbacks for central evaluation. Only the data
and the network come from fedcl, so that both sides train on identical samples and weights:
fedcl's ``cnn`` built as the sequential way builds it (``torch.manual_seed(seed)`` then
``build_model``), each client's uint8 images read from the config's CIFAR-10 folder through
``fedcl.data`` and held on the device, normalised per batch with ``fedcl.data.datasets.to_float``.

The workload is the config's: every client in every round (cohort = clients; pfl's
``minimize_reuse`` user sampler cycles through them), one local epoch of batches of
``batch_size`` at ``lr``, central evaluation of every task's test set after every round (pfl's
``CentralEvaluationCallback``, made to evaluate after round 1 too instead of before training).
The tasks run in one pfl run: the ``FederatedDataset``'s ``make_dataset_fn`` serves the current
task's data, and a callback moves to the next task's data after a task's last round.

Differences that pfl itself makes, left as they are:

- pfl slices a client's batches in stored order (fedcl shuffles every epoch);
- pfl evaluates every user's own data before and after local training in its first central
  iteration (``do_evaluation`` holds at iteration 0 whatever ``evaluation_frequency`` is; it is
  set above the run's length so that it holds only there): round 1 is slower, and round 1 is left
  out of the steady-state figure anyway;
- with several processes the central evaluation is sharded across them and its metrics summed
  (pfl's ``distribute_evaluation``).

Processes (``--processes N``): pfl's multi-process simulation through its environment variables
(``PFL_WORKER_ADDRESSES``, a ``127.0.0.1`` port per process, and ``PFL_WORKER_RANK``): this script
starts N copies of itself. pfl trains each round's clients split across them (with
``user_id_to_weight`` the cohort is cut deterministically, every client exactly once a round)
and sums their model updates with ``torch.distributed`` all-reduce. Placement: process ``i``
uses ``cuda:(i % GPUs)`` (``PFL_PYTORCH_DEVICE``), so several processes share a GPU. Backend:
pfl asks for NCCL whenever CUDA is visible, and NCCL refuses two ranks on one GPU, so every
process group here is ``gloo`` (``torch.distributed.init_process_group`` is wrapped to force it
before pfl creates the group; gloo all-reduces CUDA tensors too; the model is ~1 M parameters,
4 MiB a round). pfl's ``torchrun`` route is not used: pfl 0.6 binds rank ``LOCAL_RANK`` to
``cuda:LOCAL_RANK``, which does not exist when processes outnumber GPUs. Each process gets the
intra-op threads of one fedcl client (``client_cpus``, 1 by default: Ray gives a client that
many), so that N processes do not oversubscribe the cores. The GPU's compute mode must be
"Default" (``nvidia-smi -c 0``), as pfl's docs say, for processes to share it.

Prints one JSON object (from process 0): the Unix time each round ended, the accuracy matrix,
the users and data points each round trained on (summed over processes), the samples of each
client per task and the model's parameter count.

    python benchmarks/pfl_way.py --config workload.toml --processes 4
    python benchmarks/pfl_way.py --config workload.toml --check   # data and model, no training
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _force_gloo() -> None:
    """pfl creates its process group with NCCL when CUDA is visible; NCCL cannot put two ranks
    on one GPU. Wrap ``init_process_group`` so that the group is gloo."""
    import torch.distributed as dist

    init = dist.init_process_group

    def gloo_group(*args, **kwargs):
        kwargs["backend"] = "gloo"
        return init(*args, **kwargs)

    dist.init_process_group = gloo_group


def _device_for(name: str, rank: int) -> str:
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("device 'cuda' asked for, but no CUDA GPU is visible")
    return f"cuda:{rank % torch.cuda.device_count()}"


def worker(config_path: str, rank: int, processes: int, check: bool = False) -> None:
    import numpy as np
    import torch

    from fedcl.config import load_toml
    from fedcl.run_setup import setup_run

    cfg = setup_run(load_toml(config_path), paths=False).config
    device = _device_for(cfg.device, rank)
    # read by pfl (pfl.internal.ops.pytorch_ops.get_default_device) for every tensor it places
    os.environ["PFL_PYTORCH_DEVICE"] = device
    # a fedcl client's CPU allowance: Ray runs each client with client_cpus threads
    torch.set_num_threads(max(1, int(cfg.client_cpus)))
    if processes > 1:
        _force_gloo()
        # pfl 0.6's all-reduce names torch.distributed.reduce_op, which torch now warns about
        warnings.filterwarnings("ignore", message=".*reduce_op", category=FutureWarning)
    logging.getLogger("pfl").setLevel(logging.WARNING)

    # importing pfl's PyTorch model sets up the process group from PFL_WORKER_* (pfl's design)
    from pfl.aggregate.base import get_num_datapoints_weight_name, get_num_devices_weight_name
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.common_types import Population
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics, StringMetricName, Weighted
    from pfl.model.pytorch import PyTorchModel
    from torch import nn

    from fedcl.data.datasets import to_float
    from fedcl.data.partition import client_positions
    from fedcl.data.scenarios import build_scenario
    from fedcl.models import build_model

    dist = get_default_framework_module().distributed
    assert dist.world_size == processes and dist.global_rank == rank, (
        f"pfl sees rank {dist.global_rank} of {dist.world_size}, expected {rank} of {processes}")
    sc = build_scenario(cfg)
    mean, std = sc.dataset.mean, sc.dataset.std

    class PflCNN(nn.Module):
        """fedcl's network with the ``loss`` and ``metrics`` methods pfl's PyTorchModel asks
        for; batches arrive as uint8 images and are normalised here."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, head=None):
            return self.net(to_float(x, mean, std), head)

        def loss(self, x, y, head=None, eval=False):  # `eval`: the keyword pfl passes
            self.train(not eval)
            return nn.functional.cross_entropy(self(x, head), y)

        @torch.no_grad()
        def metrics(self, x, y, head=None, eval=True):  # `eval`: the keyword pfl passes
            self.train(not eval)
            logits = self(x, head)
            n = len(y)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            correct = (logits.argmax(1) == y).sum()
            return {"loss": Weighted(float(loss), n), "accuracy": Weighted(float(correct), n)}

    # the same initial weights as the sequential way and fedcl (seeded, then built); every pfl
    # process must start from the same model, since each applies the all-reduced update itself
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, sc.dataset.input_shape, sc.classes_per_head, sc.num_heads)
    np.random.seed(cfg.seed)  # pfl's dataset seeds: the same on every process

    positions = {t: [client_positions(cfg, c, t) for c in range(cfg.clients)]
                 for t in range(cfg.tasks)}
    samples = {t: [len(p) for p in positions[t]] for t in range(cfg.tasks)}
    state: dict = {"task": 0, "data": None}

    def load_task(task: int) -> None:
        state["data"] = None
        state["task"] = task
        state["data"] = [tuple(v.to(device) for v in sc.train_data(task, positions[task][c]))
                         for c in range(cfg.clients)]

    def make_user(user_id: int) -> Dataset:
        head = sc.head_for(state["task"])
        return Dataset(raw_data=state["data"][user_id], user_id=user_id,
                       train_kwargs={"head": head}, eval_kwargs={"head": head, "eval": True})

    # built before CUDA is touched: with several processes pfl forks a sampler process here
    federated = FederatedDataset(
        make_user, get_user_sampler("minimize_reuse", list(range(cfg.clients))),
        user_id_to_weight={c: samples[0][c] for c in range(cfg.clients)})
    model = PyTorchModel(model=PflCNN(net), local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    num_parameters = sum(int(v.numel()) for v in model.variable_map.values())
    if check:
        load_task(0)
        print(json.dumps({"samples_per_client": samples, "num_parameters": num_parameters,
                          "user_samples": [len(make_user(c)) for c in range(cfg.clients)],
                          "device": device}))
        return

    eval_params = NNEvalHyperParams(local_batch_size=cfg.eval_batch_size)

    class EvalEveryRound(CentralEvaluationCallback):
        """pfl's central evaluation evaluates before training and then after rounds 2, 3, ...
        (it skips central iteration 0); the workload evaluates after every round."""

        def on_train_begin(self, *, model):
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            return self._eval(model)

    def task_name(t: int):
        return lambda n: StringMetricName(f"task {t} | {n}")

    evaluations = []
    for t in range(cfg.tasks):
        x, y = sc.test_data(t, cfg.eval_samples_per_task, cfg.seed)
        head = sc.head_for(t)
        evaluations.append(EvalEveryRound(
            Dataset(raw_data=(x.to(device), y.to(device)), eval_kwargs={"head": head}),
            model_eval_params=eval_params, format_fn=task_name(t)))

    ended_at: list[float] = []
    curves: list[list[float]] = []
    users: list[float] = []
    datapoints: list[float] = []
    devices_name = get_num_devices_weight_name(Population.TRAIN)
    datapoints_name = get_num_datapoints_weight_name(Population.TRAIN)

    def value(v) -> float:  # a pfl MetricValue, or a plain number
        return float(getattr(v, "overall_value", v))

    class Record(TrainingProcessCallback):
        """Times each round (after its evaluation, as the other ways), keeps the accuracies and
        moves the data to the next task after a task's last round."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            curves.append([value(aggregate_metrics[StringMetricName(f"task {t} | accuracy")])
                           for t in range(cfg.tasks)])
            ended_at.append(time.time())
            users.append(value(aggregate_metrics[devices_name]))
            # pfl's "number of data points" is the mean over users (Weighted); its sum is the total
            datapoints.append(float(aggregate_metrics[datapoints_name].weighted_value))
            task = (central_iteration + 1) // cfg.rounds_per_task
            if (central_iteration + 1) % cfg.rounds_per_task == 0 and task < cfg.tasks:
                load_task(task)
            return False, Metrics()

    load_task(0)
    rounds = cfg.rounds_per_task * cfg.tasks
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds,
                                           evaluation_frequency=rounds + 1,
                                           train_cohort_size=cfg.clients, val_cohort_size=0),
        backend=SimulatedBackend(training_data=federated, val_data=federated,
                                 postprocessors=[WeightByDatapoints()]),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=cfg.lr,
                                              local_num_epochs=cfg.local_epochs,
                                              local_batch_size=cfg.batch_size),
        model_eval_params=eval_params,
        callbacks=[*evaluations, Record()],
        send_metrics_to_platform=False)
    matrix = [curves[(t + 1) * cfg.rounds_per_task - 1] for t in range(cfg.tasks)]
    if rank == 0:
        print(json.dumps({"ended_at": ended_at, "accuracy_matrix": matrix,
                          "users_per_round": users, "datapoints_per_round": datapoints,
                          "samples_per_client": samples, "num_parameters": num_parameters,
                          "processes": processes, "device": device}), flush=True)
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, processes: int) -> int:
    """Start the N pfl processes, wait for all, print process 0's JSON line."""
    env = dict(os.environ)
    if processes > 1:
        port = _free_port()  # pfl connects every process to the first address
        env["PFL_WORKER_ADDRESSES"] = ",".join(f"127.0.0.1:{port + r}" for r in range(processes))
    procs = []
    for r in range(processes):
        penv = {**env, "PFL_WORKER_RANK": str(r)} if processes > 1 else env
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--config", config, "--processes", str(processes),
             "--rank", str(r)], env=penv, text=True,
            stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL))
    out, _ = procs[0].communicate()
    codes = [procs[0].returncode]
    for p in procs[1:]:
        if codes[0] != 0 and p.poll() is None:
            p.terminate()  # process 0 failed: the others would wait on it forever
        codes.append(p.wait())
    if any(codes):
        print(f"pfl processes exited with {codes}", file=sys.stderr)
        return 1
    print(out.strip().splitlines()[-1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the workload's fedcl TOML config")
    p.add_argument("--processes", type=int, default=1, help="pfl worker processes")
    p.add_argument("--check", action="store_true",
                   help="build the data and the model in one process and print their sizes")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.check:
        worker(args.config, 0, 1, check=True)
    elif args.rank is not None:
        worker(args.config, args.rank, args.processes)
    else:
        raise SystemExit(launch(args.config, args.processes))


if __name__ == "__main__":
    main()
