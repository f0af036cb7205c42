"""FOT: Federated Orthogonal Training (Bakman, Yaldiz, Ezzeldin, Avestimehr; ICLR 2024).

FedAvg whose aggregated update is projected: for every projected layer with a basis ``U`` of the
old tasks' global input subspace, the update ``Δ = W_old − W_avg`` becomes ``Δ (I − U Uᵀ)``, so
the new global layer computes the same outputs as before on old tasks' inputs. Biases,
normalisation layers and task heads aggregate as plain FedAvg; during task 0 there is no basis,
so it is FedAvg. At the end of each task the clients sampled in its last round sketch their
residual representations (``Y = R̂ G`` with a private ``G``; raw activations never leave a
client) and the server grows ``U`` from the summed sketches. The math lives in
:mod:`fedcl.subspace`; this module only wires it into the round loop.

Choices (against the paper and the authors' public code):

* Aggregation weights are uniform, 1/|S|, as in the authors' code (``weighting = "samples"``
  switches to Flower's sample-count weighting).
* The ratio ``r = ‖R̂‖/‖R‖`` is the code's un-squared one (see :func:`fedcl.subspace.residualize`);
  ``ratio = "energy"`` reports its square, GPM's criterion, for which the threshold
  ``ε' = (r − (1 − ε))/r`` is exact (the basis then holds a fraction ε of the energy).
* The basis is sent to clients only in a task's last round, the only round they use it in
  (residualising before sketching); the code broadcasts it every round.
* The sketch matrix ``G`` is drawn from a generator seeded by (run seed, task, client), so runs
  are reproducible; it stays on the client and only ``Y`` is uploaded. A deployment that wants
  ``G`` secret from someone who knows the seed sets ``private_sketch_seed``.
* Conv patches honour each layer's stride and padding (:func:`fedcl.subspace.layer_inputs`).
* ``eps`` grows by ``eps_inc`` after each task, capped below 1.
* A layer's sketch has at most ``max_sketch_cols`` columns (2048 by default), a cap the paper
  does not have; it binds only for layers with more than 2048 (MLP) or 409 (conv) inputs.
* Sketches are accumulated batch by batch (:class:`fedcl.subspace.StreamingSketch`): the same
  ``Y = R̂ G`` for a ``G`` drawn block by block, in ``d x m`` memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedcl import plugins, protocol, subspace
from fedcl.config import Config
from fedcl.data.datasets import to_float
from fedcl.errors import ConfigError
from fedcl.models import MLP
from fedcl.plugins import register_strategy
from fedcl.strategy import Capabilities, ContinualStrategy, RoundInfo, flower_kwargs
from fedcl.training import LocalTrainer, RoundContext, TrainResult

log = logging.getLogger("fedcl")

BASIS = "fot.basis"  # ArrayRecord server -> clients: layer name -> U (d x k)
SKETCH = "fot.sketch"  # ArrayRecord client -> server: layer name -> Y (d x m)
STATS = "fot.stats"  # ConfigRecord client -> server: "<layer>.r" ratios and "n" samples
BASIS_FILE = "fot_basis.pt"


@dataclass(frozen=True)
class FOTParams:
    eps: float = 0.96
    """Energy threshold of the first task's subspace (the paper: 0.96 PMNIST IID, 0.94 non-IID,
    0.87 CIFAR-100, 0.95 5-Datasets, 0.90 mini-ImageNet)."""
    eps_inc: float = 0.0
    """Added to eps after each task (0 for PMNIST, 0.001 for the other benchmarks)."""
    sketch_dist: str = "auto"
    """Entries of the private sketch matrix G: uniform on [-1, 1], normal, or auto (uniform for
    the MLP as in the paper's PMNIST code, normal for conv models)."""
    sketch_width: float = 0.0
    """Sketch columns m as a multiple of the layer's input dimension d; 0 = the paper's (1 for
    the MLP, 5 for the ResNet)."""
    weighting: str = "uniform"
    """Client weights of the average: uniform (the paper's code) or samples (FedAvg's)."""
    private_sketch_seed: int = 0
    """Mixed into each client's sketch generator; a deployment keeps it secret per client."""
    max_sketch_cols: int = 2048
    """Cap on a layer's sketch width m (a wide Linear such as the small CNN's 3136-input hidden
    layer would otherwise upload d x 5d values per client and make the server's SVD slow)."""
    repr_samples: int = 0
    """Training samples per client whose representations are sketched at a task's end; 0 =
    all of them, as the paper (conv layers have one column per sample and output position, so
    the ResNet's sketch costs grow fast: a few hundred samples keep it cheap)."""
    ratio: str = "norm"
    """The residual ratio clients report: norm, ||R_hat||/||R|| (the authors' code), or energy,
    its square (GPM's energy criterion, which adds fewer directions per task)."""

    def check(self) -> None:
        if not 0 < self.eps < 1:
            raise ConfigError(f"FOT eps must be in (0, 1), got {self.eps}")
        if not 0 <= self.eps_inc < 1:
            raise ConfigError(f"FOT eps_inc must be in [0, 1), got {self.eps_inc}")
        if self.sketch_dist not in ("auto", "uniform", "normal"):
            raise ConfigError(f"FOT sketch_dist must be auto, uniform or normal, "
                              f"got '{self.sketch_dist}'")
        if self.max_sketch_cols < 1:
            raise ConfigError(f"FOT max_sketch_cols must be >= 1, got {self.max_sketch_cols}")
        if self.repr_samples < 0:
            raise ConfigError(f"FOT repr_samples must be >= 0, got {self.repr_samples}")
        if self.sketch_width < 0:
            raise ConfigError(f"FOT sketch_width must be >= 0, got {self.sketch_width}")
        if self.ratio not in ("norm", "energy"):
            raise ConfigError(f"FOT ratio must be norm or energy, got '{self.ratio}'")
        if self.weighting not in ("uniform", "samples"):
            raise ConfigError(f"FOT weighting must be uniform or samples, got '{self.weighting}'")


def sketch_settings(model: torch.nn.Module, params: FOTParams) -> tuple[str, float]:
    """(distribution, width multiple) for ``model``: the paper's per-architecture defaults."""
    is_mlp = isinstance(model, MLP)
    dist = params.sketch_dist if params.sketch_dist != "auto" else (
        "uniform" if is_mlp else "normal")
    width = params.sketch_width or (1.0 if is_mlp else 5.0)
    return dist, width


def sketch_columns(layer: torch.nn.Module, width: float, cap: int) -> int:
    """m = round(width * d), at least 1 and at most ``cap``."""
    d = subspace.input_dim(layer)  # type: ignore[arg-type]
    return max(1, min(cap, round(width * d)))


class FOT(ContinualStrategy, FedAvg):
    """FedAvg with the aggregated update projected off the old tasks' input subspace."""

    payload_keys = (SKETCH, STATS)
    # FedAvg's mean, then the projection; cohorts may average outside a task's last round
    # (cohort_mean_key); the basis is task-end state, rebuilt after unlearning
    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=True)

    def __init__(self, params: FOTParams, layers: list[str], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.layers = layers
        self.eps = params.eps
        self.basis: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, int]] = []  # basis dimension per layer after each task
        self.step_seconds: dict[str, float] = {}  # the last task end's seconds, per layer
        self._previous: ArrayRecord | None = None

    # --- every round: FedAvg, then the projection -------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self._previous = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def after_aggregate(self, arrays: ArrayRecord, replies: list) -> ArrayRecord:
        """W_new = W_old - (W_old - W_avg)(I - U U^T) for every layer with a basis."""
        if not self.basis or self._previous is None:
            return arrays
        old = self._previous.to_torch_state_dict()
        new = arrays.to_torch_state_dict()
        for layer, U in self.basis.items():
            key = f"{layer}.weight"
            delta = old[key] - new[key]
            new[key] = old[key] - subspace.project_out(delta, U)
        return ArrayRecord(new)

    def cohort_mean_key(self, info: RoundInfo) -> str | None:
        """The projection needs only the aggregate; sketches come in a task's last round."""
        return None if info.last_of_task else str(self.weighted_by_key)

    # --- task end: grow the basis from the clients' sketches --------------------------------
    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        if not info.last_of_task or not self.basis:
            return {}
        return {BASIS: ArrayRecord({k: v.float() for k, v in self.basis.items()})}

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        # a client left without samples by erasures sends no sketch
        sketches = [p for p in self.payloads.values() if SKETCH in p]
        if not sketches:
            # no client of the task's last round holds data of it any more (erased): the
            # task adds no direction; the run goes on with the basis it has
            log.warning("FOT: no client of task %d's last round holds data; its subspace "
                        "adds nothing to the basis", task)
            self.history.append({layer: int(U.shape[1]) for layer, U in self.basis.items()})
            self.eps = min(self.eps + self.params.eps_inc, 1 - 1e-6)
            return arrays
        counts = [int(p[STATS]["n"]) for p in sketches]
        for layer in self.layers:
            started = time.perf_counter()
            y_sum = np.zeros(sketches[0][SKETCH][layer].shape, dtype=np.float64)
            for p in sketches:  # in place, in float64: no temporary per client
                np.add(y_sum, p[SKETCH][layer].numpy(), out=y_sum)
            ratios = [float(p[STATS][f"{layer}.r"]) for p in sketches]
            threshold = subspace.adjusted_threshold(self.eps, ratios, counts)
            self.basis[layer] = subspace.expand_basis(self.basis.get(layer),
                                                      torch.from_numpy(y_sum), threshold)
            self.step_seconds[layer] = time.perf_counter() - started
        self.history.append({layer: int(U.shape[1]) for layer, U in self.basis.items()})
        self.eps = min(self.eps + self.params.eps_inc, 1 - 1e-6)
        return arrays

    def state_metrics(self) -> dict[str, float]:
        """Per projected layer after the last task end: the basis dimension and its memory in
        MiB (``fot_basis_mb``). The step's seconds per layer stay in :attr:`step_seconds` (the
        run times the whole step as its ``end_task`` phase): state is what a seed fixes."""
        dims = self.history[-1] if self.history else {}
        metrics = {f"fot_basis_dim.{layer}": float(k) for layer, k in dims.items()}
        for layer in dims:
            U = self.basis[layer]
            metrics[f"fot_basis_mb.{layer}"] = U.numel() * U.element_size() / 2**20
        return metrics

    def state_dict(self) -> dict[str, object]:
        return {"basis": dict(self.basis), "eps": self.eps, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        self.basis = dict(state["basis"])
        self.eps = float(state["eps"])
        self.history = list(state["history"])

    def save_state(self, out_dir: Path) -> list[Path]:
        path = out_dir / BASIS_FILE
        torch.save({"basis": {k: v.cpu() for k, v in self.basis.items()},
                    "dims_per_task": self.history, "eps_final": self.eps}, path)
        return [path]


class FOTTrainer(LocalTrainer):
    """Plain local training (FOT clients do no projection); in a task's last round, the
    residual representation sketch of every projected layer."""

    adds_reply_records = True

    def __init__(self, params: FOTParams) -> None:
        self.params = params

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        if not ctx.last_of_task:
            return result
        layers = subspace.projected_layers(ctx.model)
        basis_rec = ctx.message.get(BASIS) if ctx.message is not None else None
        basis = basis_rec.to_torch_state_dict() if basis_rec is not None else {}
        dist, width = sketch_settings(ctx.model, self.params)
        gen = torch.Generator().manual_seed(
            int(np.random.default_rng([ctx.config.seed, ctx.task, ctx.partition_id,
                                       self.params.private_sketch_seed, 17]).integers(2**62)))
        sketches = {name: subspace.StreamingSketch(
            basis.get(name), sketch_columns(ctx.model.get_submodule(name), width,
                                            self.params.max_sketch_cols), gen, dist)
            for name in layers}
        n = len(ctx.y)
        order = torch.arange(n)
        if 0 < self.params.repr_samples < n:
            order = torch.randperm(n, generator=gen)[:self.params.repr_samples].sort().values
        bs = max(ctx.config.batch_size, 256)
        batches = ((to_float(ctx.x[order[i:i + bs]].to(ctx.device), ctx.mean, ctx.std), ctx.head)
                   for i in range(0, len(order), bs))
        subspace.collect_representations(
            ctx.model, layers, batches, dtype=torch.float32, device="cpu",
            on_chunk=lambda name, block: sketches[name].add(block))
        stats = ConfigRecord({"n": len(order)})
        ys = {}
        for name, acc in sketches.items():
            ys[name], ratio = acc.result()
            stats[f"{name}.r"] = float(ratio if self.params.ratio == "norm" else ratio**2)
        result.records[SKETCH] = ArrayRecord(ys)
        result.records[STATS] = stats
        return result


def fot_layers(config: Config) -> list[str]:
    """The projected layers of the run's model (built as the run builds it)."""
    model = plugins.build_model(config, plugins.build_scenario(config))
    return subspace.projected_layers(model)


@register_strategy("fot", "Federated Orthogonal Training: aggregated updates projected "
                   "orthogonal to the old tasks' global input subspace (Bakman et al. 2024).",
                   params=FOTParams, trainer=FOTTrainer)
def build_fot(config: Config, params: FOTParams) -> FOT:
    kwargs = flower_kwargs(config)
    if params.weighting == "uniform":
        kwargs["weighted_by_key"] = protocol.UNIT_WEIGHT
    return FOT(params, fot_layers(config), **kwargs)


__all__ = ["FOT", "FOTParams", "FOTTrainer"]
