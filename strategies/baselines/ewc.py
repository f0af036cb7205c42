"""FedEWC: elastic weight consolidation (Kirkpatrick et al., PNAS 2017), or online EWC (Schwarz
et al., ICML 2018), in every client's loss; the Fisher is aggregated by the server.

Every client adds ``(ewc_lambda / 2) * sum_i F_i (theta_i - theta*_i)^2`` to its cross-entropy
from the second task on (:func:`~strategies.baselines.maths.ewc_penalty`), with the pair
(F, theta*) the server sends with every round. In a task's last round each client computes the
diagonal Fisher of its trained model on its samples of the task
(:func:`~strategies.baselines.maths.diagonal_fisher`) and sends it with its weights; at the
task's end the server averages the clients' diagonals weighted by their sample counts (the mean
over the union of their samples, each at its own client's weights) and folds it, with the
global model as the task's anchor, into one quadratic (:class:`~strategies.baselines.maths.
FisherAnchor`): the sum over past tasks (EWC) or the decayed running sum anchored at the last
task (online EWC, ``online = true``, decay ``gamma``).

**Server-aggregated, not client-local, Fisher (TARGET's repo keeps one per client, METHODS.md
13.2), because:**

1. What is evaluated, and what must not forget, is the global model. Its anchor is the global
   model at the task's end, the same for everyone; a client-local anchor is the client's own
   weights from the last round it happened to be sampled in (possibly tasks ago under partial
   participation), and pulls the client away from the global model.
2. The sample-weighted mean of the clients' Fisher diagonals is the Fisher over all the
   federation's samples of the task (both are means over samples): under label skew a
   client-local Fisher protects only the weights that matter to its own few classes.
3. It fits fedcl's machinery: the penalty reads only what the round's message carries, so
   clients keep no state between rounds and batched cohorts can train FedEWC; after an
   erasure, fedcl rebuilds the Fisher from the clients' retained data at the unlearned model
   (``task_end_state``).

Its cost is traffic: P values up from each client of a task's last round, 2P down with every
round from the second task on (client-local EWC sends nothing extra, and stores 2P).

Deviations and choices:

* The Fisher is the true Fisher, an exact expectation over the model's own predictions, at the
  clients' locally trained weights of the task's last round (the anchor is the aggregate of
  those weights), with dropout off, over at most ``fisher_samples`` samples per client (a
  seeded draw; 256 by default: the federation's Fisher averages them over all clients; mammoth
  and TARGET use every training sample). mammoth's ``ewc_on`` weights squared gradients of the true
  label by its probability; TARGET squares batch-mean gradients and clips them at 1e-4.
* Standard EWC's one penalty per past task is sent as one quadratic with the same gradient
  (:class:`~strategies.baselines.maths.FisherAnchor`): its value differs from the sum of the
  per-task penalties by a constant, so the reported train loss does too.
* A task whose last round has no client with data (all erased) adds no Fisher.
* The stream's last task adds no Fisher: no later round would send its penalty, so its
  clients skip the Fisher's passes (on a CPU they cost more than a round) and the strategy's
  state (``ewc_fisher_mean``, ``ewc_fisher_max``) after it is the one after the task before.
* The penalty covers every parameter, the other tasks' heads included (their Fisher is 0 for
  the tasks they did not serve).
* A penalty stiff enough to make local SGD diverge (``ewc_lambda`` times the largest Fisher
  value above 2(1 + momentum)/lr; standard EWC's summed Fisher grows with every task) is
  reported at the task's end with one warning naming the largest stable ``ewc_lambda``
  (:meth:`FedEWC.check_stability`); the run goes on as configured.
* TARGET's bug, the penalty on the server's model object (no gradient reaches the client's
  weights, so its FedEWC trains like fine-tuning), is not copied: the penalty is on the
  weights being stepped (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    RoundInfo,
    TrainResult,
    flower_kwargs,
    register_strategy,
)
from strategies.baselines.maths import (
    FisherAnchor,
    diagonal_fisher,
    ewc_penalty,
    sgd_stability_limit,
)

log = logging.getLogger("fedcl")

FISHER = "ewc.fisher"  # ArrayRecord client -> server (a task's last round): name -> F diagonal
COUNT = "ewc.count"  # ConfigRecord client -> server: "n", the samples behind it
PENALTY_FISHER = "ewc.penalty-fisher"  # ArrayRecord server -> clients: name -> F
PENALTY_ANCHOR = "ewc.penalty-anchor"  # ArrayRecord server -> clients: name -> theta*


@dataclass(frozen=True)
class EWCParams:
    ewc_lambda: float = 100.0
    """lambda of the penalty (lambda/2) * sum F (theta - theta*)^2, F the mean per-sample
    Fisher (mammoth's e_lambda is lambda/2)."""
    online: bool = False
    """Online EWC (Schwarz et al. 2018): one running Fisher F = gamma*F + F_t anchored at the
    last task's model, instead of one penalty per past task."""
    gamma: float = 1.0
    """Decay of online EWC's running Fisher (only with online = true)."""
    fisher_samples: int = 256
    """Samples per client the Fisher is computed on at a task's end (a seeded draw); 0 = all
    of them. The exact Fisher costs one backward pass per sample and class."""

    def check(self) -> None:
        if not self.ewc_lambda >= 0:
            raise ConfigError(f"fedewc ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"fedewc gamma must be in [0, 1], got {self.gamma}")
        if self.gamma != 1.0 and not self.online:
            raise ConfigError("fedewc gamma is online EWC's decay: set online = true with it")
        if self.fisher_samples < 0:
            raise ConfigError(f"fedewc fisher_samples must be >= 0, got {self.fisher_samples}")


class FedEWC(ContinualStrategy, FedAvg):
    """FedAvg; at each task's end, the clients' Fisher diagonals averaged and folded into the
    penalty's quadratic, which every later round sends to the clients."""

    payload_keys = (FISHER, COUNT)
    # FedAvg's mean; cohorts may average outside a task's last round (Fisher diagonals then
    # come per client); the quadratic is task-end state, rebuilt after unlearning
    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=True)

    def __init__(self, params: EWCParams, *, optimizer: str = "sgd", lr: float = 0.01,
                 momentum: float = 0.0, tasks: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.tasks = tasks  # the stream's length: its last task adds no Fisher (None: unknown)
        # the clients' local optimizer, for the penalty's stability check (check_stability)
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        self.quadratic = FisherAnchor(online=params.online, gamma=params.gamma)
        self.tasks_added: list[int] = []

    def cohort_mean_key(self, info: RoundInfo) -> str | None:
        return None if info.last_of_task else str(self.weighted_by_key)

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        pair = self.quadratic.quadratic()
        if pair is None or self.params.ewc_lambda == 0:
            return {}
        fisher, anchor = pair
        return {PENALTY_FISHER: ArrayRecord(fisher), PENALTY_ANCHOR: ArrayRecord(anchor)}

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        if self.tasks is not None and task == self.tasks - 1:
            return arrays  # no later round: its clients sent no Fisher (module docstring)
        reports = [p for p in self.payloads.values() if FISHER in p]
        if not reports:
            log.warning("FedEWC: no client of task %d's last round holds data; the task adds "
                        "no Fisher", task)
            return arrays
        counts = [float(p[COUNT]["n"]) for p in reports]  # type: ignore[arg-type]
        total = sum(counts)
        names = list(reports[0][FISHER].keys())  # type: ignore[union-attr]
        fisher = {}
        for name in names:
            acc = np.zeros(reports[0][FISHER][name].shape, dtype=np.float64)  # type: ignore[index]
            for p, n in zip(reports, counts, strict=True):
                acc += (n / total) * p[FISHER][name].numpy()  # type: ignore[index]
            fisher[name] = torch.from_numpy(acc)
        self.quadratic.add(fisher, arrays.to_torch_state_dict())
        self.tasks_added.append(task)
        warning = self.check_stability(task)
        if warning:
            log.warning(warning)
        return arrays

    def check_stability(self, task: int) -> str | None:
        """One line when the penalty, as it stands after ``task``, will make the clients'
        local SGD diverge, else None. The penalty's curvature along weight i is
        ``ewc_lambda * F_i``; SGD with heavy-ball momentum diverges on a quadratic whose
        curvature exceeds :func:`~strategies.baselines.maths.sgd_stability_limit`. Standard
        EWC's Fisher is a sum over tasks and grows with each one (on Rotated-MNIST at the
        default lambda it passed the limit from task 18 of 20 on, and every client's loss became
        NaN). Adam's steps do not scale with the curvature: no check."""
        pair = self.quadratic.quadratic()
        if self.optimizer != "sgd" or pair is None or self.params.ewc_lambda == 0:
            return None
        largest = max(float(f.max()) for f in pair[0].values())
        limit = sgd_stability_limit(self.lr, self.momentum)
        curvature = self.params.ewc_lambda * largest
        if curvature < limit:
            return None
        return (f"FedEWC: after task {task} the penalty's largest curvature, ewc_lambda x the "
                f"largest Fisher value = {self.params.ewc_lambda:g} x {largest:.4g} = "
                f"{curvature:.4g}, exceeds local SGD's stability limit 2(1 + momentum)/lr = "
                f"{limit:.4g}: the clients' training will diverge (NaN). An ewc_lambda below "
                f"{limit / largest:.4g}, a smaller lr, or online EWC with gamma < 1 keeps it "
                "stable")

    def state_metrics(self) -> dict[str, float]:
        """The penalty's Fisher after the last task end: its mean and largest value."""
        pair = self.quadratic.quadratic()
        if pair is None:
            return {}
        values = torch.cat([f.flatten() for f in pair[0].values()])
        return {"ewc_fisher_mean": float(values.mean()), "ewc_fisher_max": float(values.max())}

    def state_dict(self) -> dict[str, Any]:
        return {"quadratic": self.quadratic.state_dict(), "tasks_added": list(self.tasks_added)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.quadratic.load_state_dict(state["quadratic"])
        self.tasks_added = list(state["tasks_added"])


class EWCTrainer(LocalTrainer):
    """Cross-entropy plus the EWC penalty from the round's message; in a task's last round,
    the diagonal Fisher of the trained model on the client's samples of the task."""

    adds_reply_records = True  # the Fisher diagonal in a task's last round
    # the penalty reads only the round's message, the same for every member of a cohort
    regularizer_reads_context = False

    def __init__(self, params: EWCParams) -> None:
        self.params = params
        self._terms: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._read = False

    def penalty_tensors(self, ctx: RoundContext
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """(Fisher, anchor) in ``named_parameters`` order on ``ctx.device``, from the round's
        message (read once per trainer), or None without them (the first task)."""
        if not self._read:
            self._read = True
            message = ctx.message
            if (message is not None and PENALTY_FISHER in message
                    and self.params.ewc_lambda > 0):
                fisher = message[PENALTY_FISHER].to_torch_state_dict()
                anchor = message[PENALTY_ANCHOR].to_torch_state_dict()
                names = [name for name, _ in ctx.model.named_parameters()]
                self._terms = ([fisher[n].to(ctx.device) for n in names],
                               [anchor[n].to(ctx.device) for n in names])
        return self._terms

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        terms = self.penalty_tensors(ctx)
        if terms is None:
            return None
        fisher, anchor = terms
        return ewc_penalty(params, anchor, fisher, self.params.ewc_lambda)

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        if not ctx.last_of_task or ctx.task == ctx.config.tasks - 1:
            return result  # the stream's last task adds no Fisher (module docstring)
        x = ctx.x
        n = int(x.shape[0])
        if 0 < self.params.fisher_samples < n:
            gen = torch.Generator().manual_seed(ctx.config.seed * 7919 + ctx.task * 31
                                                + ctx.partition_id)
            x = x[torch.randperm(n, generator=gen)[:self.params.fisher_samples].sort().values]
        size = max(ctx.config.batch_size, 64)
        batches = (ctx_inputs(ctx, x[i:i + size]) for i in range(0, int(x.shape[0]), size))
        fisher, count = diagonal_fisher(ctx.model, batches, ctx.head)
        result.records[FISHER] = ArrayRecord({k: v.cpu() for k, v in fisher.items()})
        result.records[COUNT] = ConfigRecord({"n": count})
        return result


def ctx_inputs(ctx: RoundContext, images: torch.Tensor) -> torch.Tensor:
    """Model-ready inputs of uint8 ``images`` on the round's device (the trainer's default
    :meth:`~fedcl.api.LocalTrainer.batch_inputs`)."""
    return LocalTrainer.batch_inputs(LocalTrainer(), ctx, images.to(ctx.device))


@register_strategy("fedewc", "FedAvg with the EWC penalty (or online EWC) in each client's "
                   "loss, the Fisher aggregated by the server (Kirkpatrick et al. 2017).",
                   params=EWCParams, trainer=EWCTrainer)
def build_fedewc(config: Any, params: EWCParams) -> FedEWC:
    return FedEWC(params, optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
                  tasks=config.tasks, **flower_kwargs(config))


__all__ = ["EWCParams", "EWCTrainer", "FedEWC", "build_fedewc"]
