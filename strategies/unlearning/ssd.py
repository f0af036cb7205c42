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

Deviations: mini-batches are formed per client and per task (the task's head scores them), not
over the pooled data; buffers (batch-norm statistics) are left as they are, as in SSD, which
dampens parameters only. Defaults are the paper's ResNet-18 values (alpha 10, lambda 1, batch
64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from fedcl.client_ops import ClientData, operation
from fedcl.errors import ConfigError
from fedcl.plugins import register_unlearning
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod
from fedcl.unlearning_math import fisher_importance, ssd_dampen, weighted_mean

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


class SSD(UnlearningMethod):
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
        return {"dampened_share": self.selected / max(self.total, 1)}


@register_unlearning("ssd", "Selective Synaptic Dampening: parameters far more important to "
                     "the forget data than to all data are dampened (Foster et al. 2024).",
                     params=SSDParams)
def build_ssd(params: SSDParams, out_dir: Any) -> SSD:
    return SSD(params, out_dir)
