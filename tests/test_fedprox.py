"""FedProx's client half: the proximal term, by hand, and its pull towards the global model."""

from __future__ import annotations

import torch

from fedcl import plugins
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.training import LocalTrainer, RoundContext
from strategies.fedprox import FedProxParams, FedProxTrainer, proximal_term


def test_proximal_term_by_hand() -> None:
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    ref = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    # (mu/2) * (1 + 4 + 4) with mu = 0.5 -> 2.25
    assert float(proximal_term(w, ref, 0.5)) == 2.25


def test_proximal_pull_keeps_weights_closer_to_global() -> None:
    cfg = Config(batch_size=16, lr=0.1)
    sc = build_scenario(cfg)
    x, y = sc.train_data(0)
    x, y = x[:256], y[:256]
    distances = {}
    for name, trainer in (("fedavg", LocalTrainer()),
                          ("fedprox", FedProxTrainer(FedProxParams(proximal_mu=10.0)))):
        model = plugins.build_model(cfg, sc)
        start = [p.detach().clone() for p in model.parameters()]
        trainer.train(RoundContext(config=cfg, model=model, x=x, y=y, head=None, task=0,
                                   round=1, partition_id=0, device=torch.device("cpu"),
                                   mean=sc.dataset.mean, std=sc.dataset.std))
        distances[name] = sum(float(((p - s) ** 2).sum())
                              for p, s in zip(model.parameters(), start, strict=True))
    assert distances["fedprox"] < 0.5 * distances["fedavg"]
    assert isinstance(plugins.build_trainer(Config(strategy="fedprox")), FedProxTrainer)
