"""GS-LoRA's federated average: the merged update is the clients' mean of B·A (weighted by
their samples), not mean(B)·mean(A)."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcl import plugins
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.unlearning_math import mean_lora_update
from strategies.unlearning.gs_lora import ADAPTERS, STATS, GSLoRA, GSLoRAParams


def test_mean_of_products_by_hand() -> None:
    # client 1 (weight 1): B1 = [[1], [0]], A1 = [[1, 0]]  -> B1 A1 = [[1, 0], [0, 0]]
    # client 2 (weight 3): B2 = [[0], [2]], A2 = [[0, 1]]  -> B2 A2 = [[0, 0], [0, 2]]
    # mean of products = (1 * B1 A1 + 3 * B2 A2) / 4 = [[0.25, 0], [0, 1.5]]
    # mean(B) mean(A) = [[0.25], [1.5]] @ [[0.25, 0.75]] = [[0.0625, 0.1875], [0.375, 1.125]]
    b1, a1 = torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 0.0]])
    b2, a2 = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0, 1.0]])
    got = mean_lora_update([(1.0, {"w": (a1, b1)}), (3.0, {"w": (a2, b2)})])
    torch.testing.assert_close(got["w"], torch.tensor([[0.25, 0.0], [0.0, 1.5]],
                                                      dtype=torch.float64))
    naive = ((b1 + 3 * b2) / 4) @ ((a1 + 3 * a2) / 4)
    assert not torch.allclose(got["w"].float(), naive)
    # scaling (lora_alpha / r) multiplies the update
    torch.testing.assert_close(
        mean_lora_update([(1.0, {"w": (a1, b1)})], scale=0.5)["w"],
        0.5 * (b1 @ a1).double())


class _Job:
    """One request's job with two clients whose replies are hand-made adapters."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.scenario = build_scenario(config)
        torch.manual_seed(0)
        model = plugins.build_model(config, self.scenario)
        self.arrays = ArrayRecord(model.state_dict())
        self.products: dict[str, torch.Tensor] = {}

    def forget_clients(self) -> list[int]:
        return [0]

    def retain_clients(self) -> list[int]:
        return [1]

    def sample(self, pool: list[int], step: int, salt: int) -> list[int]:
        return pool

    def ask(self, pids: list[int], op: str, arrays: Any = None, required: Any = None,
            records: Any = None, **settings: Any) -> dict[int, RecordDict]:
        sent = records[ADAPTERS].to_torch_state_dict()
        replies = {}
        expected: dict[str, torch.Tensor] = {}
        for pid, n in ((0, 1), (1, 3)):
            g = torch.Generator().manual_seed(100 + pid)
            trained = {k: v + torch.randn(v.shape, generator=g) for k, v in sent.items()}
            replies[pid] = RecordDict({ADAPTERS: ArrayRecord(trained),
                                       STATS: ConfigRecord({"n": n, "loss": 1.0})})
            for key in trained:
                if ".lora_A." in key:
                    layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                    b = trained[key.replace(".lora_A.", ".lora_B.")].double()
                    prod = n * (b @ trained[key].double()) / 4
                    expected[layer] = expected.get(layer, 0) + prod
        self.products = expected
        return replies


def test_gs_lora_merges_the_mean_of_the_clients_products() -> None:
    config = Config(unlearning="gs-lora")
    job = _Job(config)
    before = job.arrays.to_torch_state_dict()
    arrays, strategy = GSLoRA(GSLoRAParams(rank=2, rounds=1), None).unlearn(job)  # type: ignore[arg-type]
    assert strategy is None
    after = arrays.to_torch_state_dict()
    assert sorted(after) == sorted(before)
    assert job.products  # every linear layer adapted
    for layer, delta in job.products.items():
        torch.testing.assert_close(after[f"{layer}.weight"].double(),
                                   before[f"{layer}.weight"].double() + delta,
                                   rtol=1e-5, atol=1e-6)
    for key in before:
        if not any(key == f"{layer}.weight" for layer in job.products):
            torch.testing.assert_close(after[key], before[key])
