"""FedLwF: Learning without Forgetting (Li and Hoiem, ECCV 2016 / TPAMI 2017) in every client.

From the second task on, each client adds ``alpha`` times a distillation term to its
cross-entropy: the current task's inputs go through the model being trained and through the
*teacher*, a frozen copy of the global model at the end of the previous task, and the student's
old outputs are pulled to the teacher's softened ones
(:func:`~strategies.baselines.maths.distillation_loss`, temperature ``temperature``). No old
sample is kept anywhere.

The teacher is re-sent by the server with every round of the later tasks (P values down per
round), not kept in client state: a client first sampled in the middle of a task would
otherwise hold no end-of-task model (the model it receives then has already moved on), and a
client keeps nothing between rounds. After an erasure the teacher is the unlearned model.

Which outputs are distilled:

* class-IL (one head over all classes): the logits of the classes of the previous tasks
  (mammoth's ``lwf``, TARGET's ``lwf``);
* task-IL (a head per task): every old task's head, each distilled on its own, summed over the
  old tasks (the original multi-head LwF);
* domain-IL (one head, the same classes in every task): all logits.

Deviations: the new-task cross-entropy is fedcl's default, over every output of the head (not
only the current task's classes as TARGET's, nor the seen ones as mammoth's); there is no
warm-up that first trains the new head alone with the body frozen (Li and Hoiem's); no weight
decay beyond the run's ``weight_decay``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    RoundInfo,
    flower_kwargs,
    register_strategy,
)
from strategies.baselines.maths import distillation_loss, frozen_copy

TEACHER = "lwf.teacher"  # ArrayRecord server -> clients: the previous task's global model


@dataclass(frozen=True)
class LwFParams:
    alpha: float = 1.0
    """Weight lambda_o of the distillation term (Li and Hoiem: 1; TARGET's code: 3)."""
    temperature: float = 2.0
    """Temperature T of the softened outputs (Li and Hoiem and TARGET: 2)."""

    def check(self) -> None:
        if not self.alpha >= 0:
            raise ConfigError(f"fedlwf alpha must be >= 0, got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"fedlwf temperature must be > 0, got {self.temperature}")


class FedLwF(ContinualStrategy, FedAvg):
    """FedAvg; the global model at each task's end becomes the teacher, sent with every round
    of the later tasks."""

    # FedAvg's mean (a cohort could average, but LwF's clients cannot train in cohorts); the
    # teacher is the global model at a task's end, nothing built from client data
    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher: ArrayRecord | None = None

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.teacher = arrays
        return arrays

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        return {TEACHER: self.teacher} if self.teacher is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.to_torch_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher = None if state["teacher"] is None else ArrayRecord(state["teacher"])


class LwFTrainer(LocalTrainer):
    """Cross-entropy plus ``alpha`` times the distillation of the old outputs from the
    teacher in the round's message."""

    batchable = False  # its extra term needs the teacher's outputs on each batch

    def __init__(self, params: LwFParams) -> None:
        self.params = params
        self._teacher: nn.Module | None = None
        self._old_columns: torch.Tensor | None = None

    def before_training(self, ctx: RoundContext, model: nn.Module) -> None:
        """The frozen teacher (None in the first task, or without one in the message) and,
        in class-IL, the columns of the previous tasks' classes."""
        record = ctx.message.get(TEACHER) if ctx.message is not None else None
        self._teacher = None
        if record is None or ctx.task == 0 or self.params.alpha == 0:
            return
        self._teacher = frozen_copy(model, record.to_torch_state_dict())
        scenario = ctx.scenario
        if scenario is not None and scenario.kind == "class-il":
            old = sorted(c for t in scenario.tasks[:ctx.task] for c in t.classes)
            self._old_columns = torch.tensor(old, dtype=torch.long, device=ctx.device)

    def extra_loss(self, ctx: RoundContext, outputs: torch.Tensor, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        teacher = self._teacher
        if teacher is None:
            return None
        t = self.params.temperature
        if ctx.head is not None:  # task-IL: every old head on its own
            total = outputs.new_zeros(())
            for old in range(ctx.task):
                with torch.no_grad():
                    target = teacher(inputs, old)
                total = total + distillation_loss(ctx.model(inputs, old), target, t)
            return self.params.alpha * total
        with torch.no_grad():
            target = teacher(inputs, None)
        if self._old_columns is not None:  # class-IL: the previous tasks' classes
            outputs, target = outputs[:, self._old_columns], target[:, self._old_columns]
        return self.params.alpha * distillation_loss(outputs, target, t)


@register_strategy("fedlwf", "FedAvg with Learning without Forgetting on clients: the old "
                   "outputs distilled from the previous task's global model (Li and Hoiem "
                   "2016).", params=LwFParams, trainer=LwFTrainer)
def build_fedlwf(config: Any, params: LwFParams) -> FedLwF:
    return FedLwF(**flower_kwargs(config))


__all__ = ["FedLwF", "LwFParams", "LwFTrainer", "build_fedlwf"]
