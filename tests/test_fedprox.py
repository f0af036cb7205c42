"""FedProx's client half: the proximal term, by hand, and its pull towards the global model."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcl import plugins, protocol
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.strategy import RoundInfo
from fedcl.training import LocalTrainer, RoundContext
from strategies.fedprox import PROXIMAL_MU, FedProxTrainer, build_fedprox, proximal_term


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
    message = RecordDict({protocol.CONFIG: ConfigRecord({PROXIMAL_MU: 10.0})})
    for name, trainer in (("fedavg", LocalTrainer()), ("fedprox", FedProxTrainer())):
        model = plugins.build_model(cfg, sc)
        start = [p.detach().clone() for p in model.parameters()]
        trainer.train(RoundContext(config=cfg, model=model, x=x, y=y, head=None, task=0,
                                   round=1, partition_id=0, device=torch.device("cpu"),
                                   mean=sc.dataset.mean, std=sc.dataset.std, message=message))
        distances[name] = sum(float(((p - s) ** 2).sum())
                              for p, s in zip(model.parameters(), start, strict=True))
    assert distances["fedprox"] < 0.5 * distances["fedavg"]
    assert isinstance(plugins.build_trainer(Config(strategy="fedprox")), FedProxTrainer)


class _TwoNodes:
    def get_node_ids(self) -> list[int]:
        return [10, 11]


def test_mu_is_read_from_the_round_the_server_sends(flower_identity: None) -> None:
    """One source for mu: the server's FedProx puts its parameter in every training message,
    and the client's term uses the message's value."""
    config = Config(strategy="fedprox", strategy_params={"proximal_mu": 0.25})
    strategy = build_fedprox(config, plugins.parse_strategy_params("fedprox",
                                                                   config.strategy_params))
    messages = strategy.configure_round(RoundInfo(0, 1, 1, 1), ArrayRecord(),
                                        ConfigRecord(), _TwoNodes())
    assert float(messages[0].content[protocol.CONFIG][PROXIMAL_MU]) == 0.25
    w, ref = [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 0.0])]
    ctx = RoundContext(config=config, model=None, x=None, y=None, head=None, task=0, round=1,
                       partition_id=0, device=torch.device("cpu"), mean=(0.0,), std=(1.0,),
                       message=messages[0].content)
    assert float(FedProxTrainer().regularizer(ctx, w, ref)) == 0.125 * 5  # (0.25/2)*(1+4)
    ctx.message = RecordDict({protocol.CONFIG: ConfigRecord({})})
    with pytest.raises(ValueError, match="needs the round's 'proximal-mu' from the server"):
        FedProxTrainer().regularizer(ctx, w, ref)
