"""SSD: Selective Synaptic Dampening (Foster, Schoepf, Brintrup; AAAI 2024), federated.

Selective Synaptic Dampening (Foster, Schoepf and Brintrup, AAAI 2024). Importances are SSD's
diagonal Fisher, the mean over mini-batches of the squared mini-batch cross-entropy gradient
with the model in eval mode
(:func:`fedcl.unlearning_math.fisher_importance`), computed on the clients:

* every client still in the federation computes the importance on all its data of the tasks
  seen so far, and the client(s) holding the request's data also on that forget data (the
  erased client before it leaves);
* the server averages them weighted by each client's number of mini-batches, which gives the
  mean over all mini-batches of the federation: ``I_D`` over ``D = D_r ∪ D_f`` and ``I_f`` over
  ``D_f``;
* then dampens every parameter once (:func:`fedcl.unlearning_math.ssd_dampen`): where
  ``I_f > alpha * I_D``, ``theta *= min(lam * I_D / I_f, 1)``.

**The selection bound.** ``I_D`` averages ``B`` mini-batches, ``B_f`` of them the forget
set's, and squared gradients are never negative, so ``I_D >= (B_f / B) I_f`` for every
parameter: SSD can select a parameter only if ``alpha < B / B_f``
(:func:`fedcl.unlearning_math.ssd_selection_bound`). A forget set that is a large share of the
data (a whole class of a 2-class task, a client of 3) makes the paper's ``alpha = 10``
(tuned for one class of CIFAR-100, ``B / B_f`` about 100) select nothing, for certain. fedcl
counts the batches each request will give from the partitions before the run starts
(:func:`importance_batches`, the same samples the clients will read, assuming every client not
erased earlier answers) and warns with one line per request naming the largest useful alpha
(:meth:`SSD.check_requests`); when the request comes, it checks again on the clients' own counts
and warns again, and the request's summary entry carries ``alpha_bound`` (``B / B_f``) beside
``dampened_share``. It warns rather than refuses: the run's training, the other requests and
the oracle's judgement stay meaningful, and a method that dampens nothing is a result to see.

Deviations: mini-batches are formed per client and per task (the task's head scores them), not
over the pooled data; buffers (batch-norm statistics) are left as they are, as in SSD, which
dampens parameters only. Defaults are the paper's ResNet-18 values (alpha 10, lambda 1, batch
64).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from fedcl.client_ops import ClientData, operation
from fedcl.config import Config
from fedcl.data.scenarios import Scenario
from fedcl.erasure import ErasedData, ErasureRequest, request_split
from fedcl.errors import ConfigError
from fedcl.plugins import register_unlearning
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod
from fedcl.unlearning_math import (
    fisher_importance,
    ssd_dampen,
    ssd_selection_bound,
    weighted_mean,
)

log = logging.getLogger("fedcl")

IMPORTANCE_ALL = "ssd.importance-all"
IMPORTANCE_FORGET = "ssd.importance-forget"
COUNTS = "ssd.counts"


@dataclass(frozen=True)
class SSDParams:
    alpha: float = 10.0
    """Selection: a parameter is dampened where I_f > alpha * I_D."""
    lam: float = 1.0
    """Dampening: theta *= min(lam * I_D / I_f, 1)."""
    batch_size: int = 64
    """Mini-batch size of the importances."""

    def check(self) -> None:
        if self.alpha <= 0 or self.lam <= 0:
            raise ConfigError(f"ssd alpha and lam must be positive, got alpha={self.alpha}, "
                              f"lam={self.lam}")
        if self.batch_size < 1:
            raise ConfigError(f"ssd batch_size must be >= 1, got {self.batch_size}")


@operation("ssd.importances")
def client_importances(data: ClientData) -> dict[str, Any]:
    """Importances on all the client's data (forget and retain) and on its forget data. Each
    mini-batch's squared gradient is computed once: the importance on all data is the
    batch-weighted mean of those on the forget and on the retain batches."""
    batch = int(data.settings["ssd.batch-size"])
    parts = {}
    for which in ("forget", "retain"):
        items = list(data.batches(which, batch))
        if items:
            parts[which] = (len(items), fisher_importance(data.model, items))
    out: dict[str, Any] = {COUNTS: ConfigRecord(
        {"all": sum(n for n, _ in parts.values()),
         "forget": parts["forget"][0] if "forget" in parts else 0})}
    if "forget" in parts:
        out[IMPORTANCE_FORGET] = ArrayRecord({k: v.cpu() for k, v in parts["forget"][1].items()})
    if parts:
        out[IMPORTANCE_ALL] = ArrayRecord({k: v.float().cpu() for k, v in
                                           weighted_mean(list(parts.values())).items()})
    return out


def importance_batches(config: Config, scenario: Scenario, requests: list[ErasureRequest],
                       batch_size: int) -> list[tuple[int, int]]:
    """For each request of the schedule, ``(B, B_f)``: the mini-batches the importances on
    all data and on the forget data will average, counted from the partitions as the clients
    form them (per client and task, tasks 0..request's task, every client not erased by an
    earlier request, data erased earlier left out)."""
    out = []
    erased = ErasedData()
    for req in requests:
        total = forget = 0
        for client in range(config.clients):
            if client in erased.clients:
                continue
            for task in range(req.task + 1):
                f, r = request_split(config, scenario, req, client, task, config.data_dir,
                                     erased)
                nf, nr = math.ceil(len(f) / batch_size), math.ceil(len(r) / batch_size)
                forget += nf
                total += nf + nr
        out.append((total, forget))
        erased = erased.add(req)
    return out


def selection_warning(request: str, alpha: float, batches_all: int, batches_forget: int
                      ) -> str | None:
    """The one line that says a request's ``alpha`` can select nothing (None when it can)."""
    bound = ssd_selection_bound(batches_all, batches_forget)
    if alpha < bound:
        return None
    return (f"ssd: erasure '{request}' cannot dampen anything at alpha {alpha:g}: its forget "
            f"data is {batches_forget} of the {batches_all} importance batches, so I_f <= "
            f"{bound:.3g} I_D for every parameter; only alpha below {bound:.3g} can select one")


class SSD(UnlearningMethod):
    def __init__(self, params: Any, out_dir: Any = None) -> None:
        super().__init__(params, out_dir)
        self.announced: set[str] = set()  # the selection-bound lines check_requests returned

    def check_requests(self, config: Config, scenario: Scenario,
                       requests: list[ErasureRequest]) -> list[str]:
        """One warning line per request whose forget share makes ``alpha`` select nothing
        (module docstring: the selection bound)."""
        counts = importance_batches(config, scenario, requests, self.params.batch_size)
        lines = [selection_warning(req.to_text(), self.params.alpha, b, bf)
                 for req, (b, bf) in zip(requests, counts, strict=True)]
        found = [line for line in lines if line is not None]
        self.announced.update(found)  # said before the run: not said again at the erasure
        return found

    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, Any]:
        forget = job.forget_clients()
        clients = sorted({*forget, *job.retain_clients()})
        replies = job.ask(clients, "ssd.importances", required=forget,
                          **{"ssd.batch-size": self.params.batch_size})
        all_parts, forget_parts = [], []
        for reply in replies.values():
            counts = reply[COUNTS]
            if int(counts["all"]):
                all_parts.append((int(counts["all"]),
                                  reply[IMPORTANCE_ALL].to_torch_state_dict()))
            if int(counts["forget"]):
                forget_parts.append((int(counts["forget"]),
                                     reply[IMPORTANCE_FORGET].to_torch_state_dict()))
        if not forget_parts:
            raise ValueError("no client holds samples of the request to compute importances on")
        batches_all = sum(n for n, _ in all_parts)
        batches_forget = sum(n for n, _ in forget_parts)
        self.bound = ssd_selection_bound(batches_all, batches_forget)
        line = selection_warning(job.request.to_text(), self.params.alpha, batches_all,
                                 batches_forget)
        if line is not None and line not in self.announced:  # counts the check did not foresee
            log.warning(line)
        i_all, i_forget = weighted_mean(all_parts), weighted_mean(forget_parts)
        state = job.arrays.to_torch_state_dict()
        params = {k: state[k] for k in i_all}
        dampened = ssd_dampen({k: v.double() for k, v in params.items()}, i_all, i_forget,
                              self.params.alpha, self.params.lam)
        self.selected = sum(int((i_forget[k] > self.params.alpha * i_all[k]).sum())
                            for k in i_all)
        self.total = sum(v.numel() for v in params.values())
        for k, v in dampened.items():
            state[k] = v.to(state[k].dtype)
        return ArrayRecord(state), None

    def report(self) -> dict[str, Any]:
        if not hasattr(self, "selected"):
            return {}
        return {"dampened_share": self.selected / max(self.total, 1), "alpha_bound": self.bound}


@register_unlearning("ssd", "Selective Synaptic Dampening: parameters far more important to "
                     "the forget data than to all data are dampened (Foster et al. 2024).",
                     params=SSDParams)
def build_ssd(params: SSDParams, out_dir: Any) -> SSD:
    return SSD(params, out_dir)
