"""gs-lora: GS-LoRA (Zhao et al., CVPR 2024) through peft, trained federatedly.

Zhao et al., "Continual Forgetting for Pre-trained Vision Models", CVPR 2024. The global model
is frozen; LoRA adapters (peft, rank ``rank``) go on every ``nn.Linear`` of the model (heads
included); each adapted layer is one group. For ``rounds`` rounds the client(s) holding the
request's data and a sample of the others (``fraction_train`` of them, seeded per round) train
the adapters locally for ``epochs`` epochs with Adam at ``lr`` on the paper's loss,

    L = CE(retain) + beta * ReLU(bound - CE(forget)) + alpha * sum_g ||theta_g||_2,

each step drawing a retain and a forget mini-batch where the client holds both (a client holds
only forget data when it is the erased client, only retain data when it holds none of the
request's). The server aggregates so that the merged update is the mean of the clients'
products: each round it adds ``sum_k w_k B_k A_k / sum_k w_k`` (``w_k`` the client's samples;
:func:`fedcl.unlearning_math.mean_lora_update`) to every adapted layer's weight, and the next
round starts fresh adapters (``B = 0``, ``A`` drawn from the run seed and the round, the same
for every client) on the merged model. Averaging ``A`` and ``B`` separately, as before, merged
``mean(B) mean(A)``, which is not the mean of the products (its cross terms ``B_j A_k`` mix
clients), so the merged model was none of the clients' nor their average (federated LoRA's
known inexactness; the merge-each-round fix is FLoRA's, Wang et al. 2024, without its stacked
upload). Deviations this brings: the group-sparse penalty acts on each round's adapters (a
layer left alone in every round keeps its weights, as in GS-LoRA, but the penalty does not see
the layer's update over earlier rounds), and ``adapted_layers_nonzero`` counts the layers whose
summed update is not zero.

Other deviations: our models have no Transformer blocks, so LoRA goes on the linear layers and a
group is one layer's ``{A, B}`` (the paper: both FFN linears of a block); no prototype loss
(GS-LoRA++'s ``L_pro``), no warm-up, no EMA; a constant learning rate. Defaults: rank 8 (the
paper's), ``bound`` 10 (the code's argument default), ``beta`` 0.15 and ``alpha`` 0.01 (its
single-step forgetting script), Adam at 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcl import plugins
from fedcl.client_ops import ClientData, operation
from fedcl.errors import ConfigError
from fedcl.plugins import register_unlearning
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod
from fedcl.unlearning_math import mean_lora_update

ADAPTERS = "gs-lora.adapters"
STATS = "gs-lora.stats"
PEFT_PREFIX = "base_model.model."  # peft's prefix of the wrapped model's names
LORA_SCALE = 1.0  # lora_alpha / r: lora_model sets lora_alpha = r


@dataclass(frozen=True)
class GSLoRAParams:
    rank: int = 8
    """LoRA rank."""
    rounds: int = 5
    """Federated rounds of adapter training."""
    epochs: int = 1
    """Local epochs per round."""
    lr: float = 0.001
    """Adam learning rate of the adapters."""
    beta: float = 0.15
    """Weight of the bounded forgetting loss."""
    bound: float = 10.0
    """BND: the forget cross-entropy above which the forgetting loss stops pushing."""
    alpha: float = 0.01
    """Weight of the group-sparse (group lasso) penalty."""
    batch_size: int = 32
    """Local mini-batch size."""

    def check(self) -> None:
        for name in ("rank", "rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gs-lora {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"gs-lora lr must be positive, got {self.lr}")
        for name in ("beta", "bound", "alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"gs-lora {name} must be >= 0, got {getattr(self, name)}")


def lora_model(model: torch.nn.Module, rank: int) -> Any:
    """``model`` frozen, with LoRA adapters on every ``nn.Linear`` (peft)."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, config)


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapters(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, state)


def layer_factors(adapters: dict[str, torch.Tensor]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's adapter state (``base_model.model.<layer>.lora_A.weight`` and ``.lora_B.``) as
    ``{layer: (A, B)}``, ``layer`` being the adapted module's name in the model (its weight is
    ``<layer>.weight``)."""
    out = {}
    for key, a in adapters.items():
        if ".lora_A." in key:
            layer = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
            out[layer] = (a, adapters[key.replace(".lora_A.", ".lora_B.")])
    return out


def group_lasso(peft_model: Any) -> torch.Tensor:
    """sum over adapted layers of sqrt(||A||^2 + ||B||^2) (not weighted by group size, as the
    paper's code)."""
    from peft.tuners.lora import LoraLayer

    norms = []
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            sq = sum((p ** 2).sum() for n, p in module.named_parameters()
                     if "lora_" in n and p.requires_grad)
            norms.append(torch.sqrt(sq + 1e-12))
    return torch.stack(norms).sum()


def gs_lora_loss(model: Any, retain: tuple | None, forget: tuple | None, beta: float,
                 bound: float, alpha: float) -> torch.Tensor:
    """One step's loss; ``retain``/``forget`` are ``(x, y, head)`` mini-batches or None."""
    ce = torch.nn.functional.cross_entropy
    loss = alpha * group_lasso(model)
    if retain is not None:
        x, y, head = retain
        loss = loss + ce(model(x, head), y)
    if forget is not None:
        x, y, head = forget
        loss = loss + beta * torch.relu(bound - ce(model(x, head), y))
    return loss


@operation("gs-lora.train")
def client_train(data: ClientData) -> dict[str, Any]:
    seed = int(data.settings["gs-lora.seed"]) + data.partition_id
    # the adapters' dropout draws from torch's global RNG: seeded here, and the caller's state
    # put back afterwards
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return _client_train(data, seed)


def _client_train(data: ClientData, seed: int) -> dict[str, Any]:
    s = data.settings
    peft_model = lora_model(data.model, int(s["gs-lora.rank"]))
    load_adapters(peft_model, data.records[ADAPTERS].to_torch_state_dict())
    peft_model.to(data.device).train()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad],
                           lr=float(s["gs-lora.lr"]))
    gen = torch.Generator().manual_seed(seed)
    batch = int(s["gs-lora.batch-size"])
    beta, bound, alpha = float(s["gs-lora.beta"]), float(s["gs-lora.bound"]), \
        float(s["gs-lora.alpha"])
    steps, total = 0, 0.0
    for _ in range(int(s["gs-lora.epochs"])):
        retain = list(data.batches("retain", batch, gen))
        forget = list(data.batches("forget", batch, gen))
        for i in range(max(len(retain), len(forget))):
            r = retain[i % len(retain)] if retain else None
            f = forget[i % len(forget)] if forget else None
            loss = gs_lora_loss(peft_model, r, f, beta, bound, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return {ADAPTERS: ArrayRecord(adapter_state(peft_model)),
            STATS: ConfigRecord({"n": data.count("retain") + data.count("forget"),
                                 "loss": total / max(steps, 1)})}


class GSLoRA(UnlearningMethod):
    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, Any]:
        prm, config = self.params, job.config
        state = job.arrays.to_torch_state_dict()
        summed: dict[str, torch.Tensor] = {}  # each layer's update over the rounds
        forget, retain = job.forget_clients(), job.retain_clients()
        for round_ in range(prm.rounds):
            # fresh adapters on the merged model: B = 0, A seeded by run seed and round
            model = plugins.build_model(config, job.scenario)
            model.load_state_dict(state)
            torch.manual_seed(config.seed * 1000 + round_)
            adapters = adapter_state(lora_model(model, prm.rank))
            sampled = job.sample(retain, round_, salt=29)
            replies = job.ask(sorted({*forget, *sampled}), "gs-lora.train",
                              arrays=ArrayRecord(state), required=forget,
                              records={ADAPTERS: ArrayRecord(adapters)},
                              **{"gs-lora.rank": prm.rank, "gs-lora.lr": prm.lr,
                                 "gs-lora.epochs": prm.epochs, "gs-lora.beta": prm.beta,
                                 "gs-lora.bound": prm.bound, "gs-lora.alpha": prm.alpha,
                                 "gs-lora.batch-size": prm.batch_size,
                                 "gs-lora.seed": config.seed * 1000 + round_})
            parts = [(float(r[STATS]["n"]), layer_factors(r[ADAPTERS].to_torch_state_dict()))
                     for r in replies.values() if int(r[STATS]["n"])]
            for layer, delta in mean_lora_update(parts, LORA_SCALE).items():
                key = f"{layer}.weight"
                state[key] = (state[key].double() + delta).to(state[key].dtype)
                summed[layer] = summed[layer] + delta if layer in summed else delta
            self.last_loss = float(np.mean([float(r[STATS]["loss"])
                                            for r in replies.values()]))
        self.nonzero_groups = sum(1 for v in summed.values() if float(v.abs().max()) > 1e-8)
        return ArrayRecord(state), None

    def report(self) -> dict[str, Any]:
        if not hasattr(self, "last_loss"):
            return {}
        return {"last_loss": self.last_loss, "adapted_layers_nonzero": self.nonzero_groups}


@register_unlearning("gs-lora", "GS-LoRA through peft: LoRA adapters on the linear layers "
                     "trained federatedly with a group-sparse penalty and a bounded forgetting "
                     "loss, then merged (Zhao et al. 2024).", params=GSLoRAParams)
def build_gs_lora(params: GSLoRAParams, out_dir: Any) -> GSLoRA:
    return GSLoRA(params, out_dir)
