"""PRD: replay-free prototype-sample relation distillation (Asadi et al., ICML 2023), federated.

Clients train an encoder with a projection head by supervised contrastive loss on two augmented
views, learn the current task's class prototypes on detached features, and distill, for every
old task, the relation between the batch's features and that task's prototypes from a frozen
copy of the previous task's global model (re-sent by the server each round of the next task:
no sample is stored anywhere). The server averages encoder and projection head (FedAvg) and the
prototypes class by class, weighted by the samples that produced them. Inference is the cosine
similarity of the normalised feature to the normalised prototypes: the task's own prototypes in
task-IL, those of every class seen so far in class-IL. Math: :mod:`fedcl.prd`.

Choices:

* The encoder is the run's model without its heads (``model.features``); the projection head is
  Linear(D, 512)-ReLU-Linear(512, 128), as the paper's.
* **The distillation compares like with like.** The encoder runs without dropout
  (:func:`fedcl.models.without_dropout` takes out every dropout module, here the MLP's 0.2 on
  the input and 0.5 on each hidden layer; the paper's ResNet-18 has none), and the frozen copy
  runs in the trained model's mode, its batch-norm layers normalising with the batch's
  statistics as the trained model's do (their running statistics stay as received,
  momentum 0). So for identical weights the two models compute the same feature ``h`` and
  ``L_RD`` is 0 (``tests/test_prd.py``). Before, the trained model dropped units of the very
  feature it distilled while the frozen copy (eval mode) did not, and ``L_RD`` was 0.008-0.36
  for identical weights, growing with the feature's norm, times ``lambda_distill``. The other
  choice, both models in train mode with dropout, would draw different masks in each.
* Prototype rows: task-IL keeps one row per (task, local class); class-IL one per class; in
  domain-IL all tasks share the same classes, so "old tasks" all distill against one prototype
  set.
* The frozen copy is the global model at the end of the previous task (the same for every
  client, whenever it was sampled), sent as a record in every round of the next task.
* Prototype weights: a current-task prototype counts the client's samples of that class; an
  old-task prototype (moved only by the distillation) counts all the client's samples.
* Local optimizer: the run's optimizer and learning rate for encoder and projection head;
  prototypes get their own plain SGD at ``proto_lr`` (no momentum, no weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcl import prd, protocol
from fedcl.config import Config
from fedcl.data.datasets import host_to_device, to_float
from fedcl.data.scenarios import Scenario
from fedcl.errors import ConfigError
from fedcl.models import without_dropout
from fedcl.plugins import register_strategy
from fedcl.strategy import Capabilities, ContinualStrategy, RoundInfo, flower_kwargs
from fedcl.training import LocalTrainer, RoundContext, TrainResult, make_optimizer

OLD_MODEL = "prd.old-model"  # ArrayRecord server -> clients: previous task's global model
COUNTS = "prd.counts"  # ConfigRecord client -> server: samples behind each prototype row
PROTOTYPES = "prototypes"  # the state-dict key of the prototype matrix


@dataclass(frozen=True)
class PRDParams:
    supcon_temperature: float = 0.1
    """τ of the supervised contrastive loss (scaled by τ/0.07, as the paper's code)."""
    lambda_proto: float = 2.0
    """λ_p, weight of the prototype loss."""
    lambda_distill: float = 4.0
    """λ_d, weight of the relation distillation."""
    distill_temperature: float = 1.0
    """T of the relation distillation's softmaxes."""
    proto_lr: float = 0.01
    """Learning rate of the prototypes (plain SGD)."""
    projection_dim: int = 128
    """Output size of the projection head (hidden size 512)."""

    def check(self) -> None:
        for name in ("supcon_temperature", "distill_temperature", "proto_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"PRD {name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_proto", "lambda_distill"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"PRD {name} must be >= 0, got {getattr(self, name)}")
        if self.projection_dim < 1:
            raise ConfigError(f"PRD projection_dim must be >= 1, got {self.projection_dim}")


def prototype_rows(scenario: Scenario) -> list[list[int]]:
    """For each task, the prototype rows that hold its classes (in head-target order)."""
    if scenario.kind == "task-il":
        k = scenario.classes_per_head
        return [list(range(t * k, (t + 1) * k)) for t in range(len(scenario.tasks))]
    if scenario.kind == "class-il":
        return [list(task.classes) for task in scenario.tasks]
    return [list(range(scenario.dataset.num_classes)) for _ in scenario.tasks]


class PRDModel(nn.Module):
    """Encoder (the run's model without heads) + projection head + prototypes."""

    def __init__(self, encoder: nn.Module, rows: list[list[int]], task_il: bool,
                 projection_dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        dim = encoder.feature_dim  # type: ignore[attr-defined]
        self.projector = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(),
                                       nn.Linear(512, projection_dim))
        self.rows = rows
        self.task_il = task_il
        num_rows = max(max(r) for r in rows) + 1
        # initialised as the paper's code does: the weight of a bias-free nn.Linear head
        self.prototypes = nn.Parameter(nn.Linear(dim, num_rows, bias=False).weight.detach())
        # tasks whose classes class-IL inference may predict (set by the server each task)
        self.register_buffer("seen_tasks", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x)  # type: ignore[operator]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.projector(h), dim=1)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        h = self.features(x)
        if self.task_il:
            if task is None:
                raise ValueError("task-IL PRD model needs a task id")
            return prd.cosine_logits(h, self.prototypes[self.rows[task]])
        logits = prd.cosine_logits(h, self.prototypes)
        seen = sorted({r for t in range(int(self.seen_tasks.item())) for r in self.rows[t]})
        mask = torch.full_like(logits, float("-inf"))
        mask[:, seen] = 0.0
        return logits + mask


def wrap_model(params: PRDParams, scenario: Scenario, model: nn.Module) -> PRDModel:
    model.heads = nn.ModuleList()  # type: ignore[assignment]  # PRD predicts by prototypes
    # no dropout on the feature the distillation compares (module docstring)
    return PRDModel(without_dropout(model), prototype_rows(scenario),
                    scenario.kind == "task-il", params.projection_dim)


class PRD(ContinualStrategy, FedAvg):
    """FedAvg of encoder and projection head; prototypes averaged per class by sample count."""

    payload_keys = (COUNTS,)
    # FedAvg's mean of encoder and head, then prototypes class by class from each reply's
    # counts (so one reply per client); the previous task's model is task-end state
    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=False, task_end_state=True)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.old_model: ArrayRecord | None = None
        self._previous: ArrayRecord | None = None

    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        state = arrays.to_torch_state_dict()
        state["seen_tasks"] = torch.tensor(float(task + 1))
        return ArrayRecord(state)

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.old_model = arrays
        return arrays

    def state_dict(self) -> dict[str, object]:
        return {"old_model": None if self.old_model is None
                else self.old_model.to_torch_state_dict()}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        old = state.get("old_model")
        self.old_model = None if old is None else ArrayRecord(old)

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        return {OLD_MODEL: self.old_model} if self.old_model is not None else {}

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self._previous = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        assert self._previous is not None
        state = arrays.to_torch_state_dict()
        old = self._previous.to_torch_state_dict()[PROTOTYPES]
        protos, counts = [], []
        for msg in replies:
            pid = int(msg.content[protocol.CLIENT_INFO][protocol.PARTITION_ID])
            protos.append(torch.from_numpy(msg.content[protocol.ARRAYS][PROTOTYPES].numpy()))
            counts.append(torch.tensor(list(self.payloads[pid][COUNTS]["rows"]),
                                       dtype=torch.float64))
        state[PROTOTYPES] = prd.aggregate_prototypes(old, protos, counts).to(old.dtype)
        return ArrayRecord(state)


class PRDTrainer(LocalTrainer):
    """SupCon + λ_p·L_proto + λ_d·L_RD on the client's current-task data: LocalTrainer's loop
    with PRD's inputs (two augmented views), loss and optimizers."""

    batchable = False  # two augmented views, its own loss and a frozen copy: no cohort
    adds_reply_records = True  # the samples behind each prototype row
    loss_sum_dtype = torch.float64  # PRD's round loss has always been summed in float64

    def __init__(self, params: PRDParams) -> None:
        self.params = params
        self._old: PRDModel | None = None  # the round's frozen copy (before_training)

    def optimizers(self, ctx: RoundContext, model: nn.Module) -> list[torch.optim.Optimizer]:
        """The run's optimizer for encoder and projection head, plain SGD at ``proto_lr`` for
        the prototypes."""
        body = [q for name, q in model.named_parameters() if name != PROTOTYPES]
        return [make_optimizer(body, ctx.config),
                torch.optim.SGD([model.prototypes], lr=self.params.proto_lr)]

    def before_training(self, ctx: RoundContext, model: nn.Module) -> None:
        """The frozen copy of the previous task's global model that the distillation reads
        (None in the first task, or without one in the message)."""
        self._old = self._frozen_copy(ctx)

    def batch_inputs(self, ctx: RoundContext, images: torch.Tensor) -> torch.Tensor:
        """Two augmented views of the batch, ``[2B, C, H, W]`` (all first views, then all
        second ones), augmented on the CPU with draws from ``ctx.generator``."""
        images = images.cpu()
        views = torch.cat([prd.augment(images, ctx.generator),
                           prd.augment(images, ctx.generator)])
        return to_float(views.to(ctx.device), ctx.mean, ctx.std)

    def batch_loss(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        """SupCon of the projected views, then λ_p times the prototype loss of the detached
        features, then (from the second task on, with a frozen copy) λ_d times the relation
        distillation against every old task's prototypes."""
        p = self.params
        prd_model: PRDModel = model  # type: ignore[assignment]
        rows_now = prd_model.rows[ctx.task]
        old_rows = [prd_model.rows[j] for j in range(ctx.task)]
        h = prd_model.features(inputs)
        loss = prd.supcon_loss(prd_model.project(h), targets.repeat(2), p.supcon_temperature)
        # index tensors go over pinned memory: a plain copy per step would wait for the GPU
        local_rows = host_to_device(torch.as_tensor(rows_now), ctx.device)
        positions = (targets if prd_model.task_il or ctx.config.scenario == "domain-il"
                     else _positions(targets, rows_now))
        loss = loss + p.lambda_proto * prd.prototype_loss(
            h.detach(), prd_model.prototypes[local_rows], positions.repeat(2))
        old = self._old
        if old is not None and old_rows:
            old.train(prd_model.training)  # the trained model's mode (module docstring)
            with torch.no_grad():
                h_old = old.features(inputs)
            old_index = [host_to_device(torch.as_tensor(r), ctx.device) for r in old_rows]
            loss = loss + p.lambda_distill * prd.relation_distillation(
                h, h_old, [prd_model.prototypes[r] for r in old_index],
                [old.prototypes[r].detach() for r in old_index], p.distill_temperature)
        return loss

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        model: PRDModel = ctx.model  # type: ignore[assignment]
        result.records[COUNTS] = ConfigRecord({"rows": self._counts(ctx, model)})
        return result

    def _frozen_copy(self, ctx: RoundContext) -> PRDModel | None:
        rec = ctx.message.get(OLD_MODEL) if ctx.message is not None else None
        if rec is None or ctx.task == 0:
            return None
        import copy

        old = copy.deepcopy(ctx.model)
        old.load_state_dict(rec.to_torch_state_dict())
        old.train(ctx.model.training)
        for q in old.parameters():
            q.requires_grad_(False)
        for module in old.modules():
            # batch statistics as the trained model's, running statistics left as received
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0
        return old  # type: ignore[return-value]

    def _counts(self, ctx: RoundContext, model: PRDModel) -> list[int]:
        counts = np.zeros(model.prototypes.shape[0], dtype=np.int64)
        n = int(ctx.y.shape[0])
        for j in range(ctx.task):
            counts[model.rows[j]] = n
        rows_now = model.rows[ctx.task]
        labels = ctx.y.numpy()
        for pos, row in enumerate(rows_now):
            label = row if not model.task_il and ctx.config.scenario == "class-il" else pos
            counts[row] = max(counts[row], int((labels == label).sum()))
        return [int(c) for c in counts]


def _positions(y: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Class-IL labels (global class ids, each one of ``rows``) as positions within the task's
    prototype rows: a lookup table indexed on ``y``'s device (reading the labels back one by
    one would wait for the GPU once per sample)."""
    table = torch.full((max(rows) + 1,), -1, dtype=torch.long)
    table[torch.as_tensor(rows)] = torch.arange(len(rows))
    return host_to_device(table, y.device)[y]


@register_strategy("prd", "Replay-free prototype-sample relation distillation: SupCon encoder, "
                   "class prototypes, relation distillation from the previous global model "
                   "(Asadi et al. 2023).", params=PRDParams, trainer=PRDTrainer, model=wrap_model)
def build_prd(config: Config, params: PRDParams) -> PRD:
    return PRD(**flower_kwargs(config))
