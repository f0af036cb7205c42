"""The unlearning methods' parts, in process: which samples a request erases, the client
operations (on real MNIST partitions), and each method's server-side arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedcl import plugins, protocol
from fedcl.client_ops import ClientData, TaskData
from fedcl.config import Config
from fedcl.data.partition import client_positions
from fedcl.data.scenarios import build_scenario
from fedcl.erasure import (
    EVERY_CLIENT,
    ErasedData,
    held_positions,
    original_labels,
    parse_erasure,
    request_split,
)
from fedcl.errors import ConfigError
from fedcl.run_setup import setup_run
from fedcl.unlearning_math import fisher_importance, weighted_mean
from strategies.unlearning.gs_lora import adapter_state, group_lasso, load_adapters, lora_model
from strategies.unlearning.projection import mean_gradient
from strategies.unlearning.ssd import client_importances

CONFIG = Config(clients=4, tasks=5, scenario="class-il", partition="iid", seed=3)


@pytest.fixture(scope="module")
def scenario():  # type: ignore[no-untyped-def]
    return build_scenario(CONFIG)


def test_erased_data_round_trip_and_who_loses_what() -> None:
    erased = ErasedData().add(parse_erasure("client=2,after-task=0"))
    erased = erased.add(parse_erasure("class=3,after-task=1"))
    erased = erased.add(parse_erasure("client=1,class=0,after-task=1"))
    assert erased.clients == (2,)
    assert erased.classes == ((EVERY_CLIENT, 3), (1, 0))
    assert erased.classes_of(1) == {0, 3} and erased.classes_of(0) == {3}
    assert erased.encode() == "-1:3;1:0"
    assert ErasedData.decode(erased.encode()).classes == erased.classes
    assert erased.classes_everywhere() == {3}


def test_held_positions_and_request_split(scenario) -> None:  # type: ignore[no-untyped-def]
    task = 1  # classes 2 and 3
    mine = client_positions(CONFIG, 1, task, CONFIG.data_dir)
    labels = original_labels(scenario, task, mine)
    assert set(np.unique(labels)) == {2, 3}
    # class 3 erased everywhere: client 1 keeps exactly its class-2 samples
    after = ErasedData().add(parse_erasure("class=3,after-task=1"))
    kept = held_positions(CONFIG, scenario, 1, task, CONFIG.data_dir, after)
    np.testing.assert_array_equal(kept, mine[labels == 2])
    forget, retain = request_split(CONFIG, scenario, parse_erasure("class=3,after-task=1"), 1,
                                   task, CONFIG.data_dir, ErasedData())
    np.testing.assert_array_equal(forget, mine[labels == 3])
    np.testing.assert_array_equal(retain, mine[labels == 2])
    # a client-class request touches only that client
    req = parse_erasure("client=0,class=3,after-task=1")
    forget, retain = request_split(CONFIG, scenario, req, 1, task, CONFIG.data_dir,
                                   ErasedData())
    assert len(forget) == 0 and len(retain) == len(mine)
    # a client erasure: all of the client's data is forget data, none retained; others keep all
    req = parse_erasure("client=1,after-task=1")
    forget, retain = request_split(CONFIG, scenario, req, 1, task, CONFIG.data_dir,
                                   ErasedData())
    assert len(forget) == len(mine) and len(retain) == 0
    gone = ErasedData().add(req)
    assert len(held_positions(CONFIG, scenario, 1, task, CONFIG.data_dir, gone)) == 0


def test_class_erasure_before_its_task_is_refused() -> None:
    config = Config(clients=4, tasks=5, scenario="class-il", erasures="class=9,after-task=2")
    with pytest.raises(ConfigError, match="class 9 is first trained in task 4, after the "
                                          "request"):
        setup_run(config)
    setup_run(Config(clients=4, tasks=5, scenario="class-il", erasures="class=5,after-task=2"))


def test_unlearning_params_are_typed_and_checked() -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'alpa' for unlearning method "
                                          "'ssd' \\(its parameters: alpha, lam, batch_size\\)"):
        setup_run(Config(unlearning="ssd", unlearning_params={"alpa": 1.0}))
    with pytest.raises(ConfigError, match="ssd alpha and lam must be positive"):
        setup_run(Config(unlearning="ssd", unlearning_params={"alpha": 0}))
    with pytest.raises(ConfigError, match="unknown unlearning 'sdd' \\(did you mean 'ssd'"):
        setup_run(Config(unlearning="sdd"))
    config = Config(unlearning="federaser", unlearning_params={"interval": 2})
    assert Config.from_run_config(config.to_run_config()) == config
    assert config.to_run_config()["unlearning-param.interval"] == 2
    assert plugins.parse_unlearning_params("federaser", {"interval": 2}).epoch_ratio == 0.5


def _client_data(model: nn.Module, forget: int, retain: int, batch: int = 4) -> ClientData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (forget + retain, 1, 2, 2), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 3, (forget + retain,), generator=gen)
    task = TaskData(0, None, (x[:forget], y[:forget]), (x[forget:], y[forget:]))
    settings = ConfigRecord({"ssd.batch-size": batch})
    return ClientData(CONFIG, model, [task], torch.device("cpu"), (0.5,), (0.25,), settings, 0,
                      RecordDict())


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        return self.head(torch.relu(self.body(x.flatten(1))))


def test_ssd_client_importances_are_fisher_on_all_and_forget_batches() -> None:
    data = _client_data(Tiny(), forget=6, retain=5, batch=4)
    out = client_importances(data)
    # forget: 2 batches (4 + 2); all: the forget batches then the retain ones (4 + 2 + 4 + 1)
    assert dict(out["ssd.counts"]) == {"all": 4, "forget": 2}
    expect_forget = fisher_importance(data.model, list(data.batches("forget", 4)))
    expect_all = fisher_importance(data.model, [*data.batches("forget", 4),
                                                *data.batches("retain", 4)])
    got = out["ssd.importance-forget"].to_torch_state_dict()
    for k, v in expect_forget.items():
        torch.testing.assert_close(got[k], v)
    got = out["ssd.importance-all"].to_torch_state_dict()
    for k, v in expect_all.items():
        torch.testing.assert_close(got[k], v)


def test_batch_weighted_mean_is_the_federation_wide_batch_mean() -> None:
    # client a: 1 batch with importance 3; client b: 3 batches averaging 1 -> (3 + 3) / 4
    mean = weighted_mean([(1, {"w": torch.tensor([3.0])}), (3, {"w": torch.tensor([1.0])})])
    assert float(mean["w"]) == pytest.approx(1.5)


def test_projection_mean_gradient_is_the_gradient_of_the_mean_loss() -> None:
    data = _client_data(Tiny(), forget=7, retain=0)
    grads, loss, n = mean_gradient(data, "forget")
    x, y, head = next(data.batches("forget", 100))
    model = data.model
    full = nn.functional.cross_entropy(model(x, head), y)
    expect = torch.autograd.grad(full, list(model.parameters()))
    assert n == 7 and loss == pytest.approx(float(full), rel=1e-6)
    for (k, _), g in zip(model.named_parameters(), expect, strict=True):
        torch.testing.assert_close(grads[k], g)


def test_gs_lora_group_lasso_and_merge() -> None:
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = lora_model(model, rank=2)
    state = adapter_state(peft_model)
    assert sorted(state) == ["base_model.model.body.lora_A.weight",
                             "base_model.model.body.lora_B.weight",
                             "base_model.model.head.lora_A.weight",
                             "base_model.model.head.lora_B.weight"]
    a = torch.full((2, 4), 0.5)  # body: A (r x in), B (out x r)
    b = torch.full((5, 2), 0.1)
    state = {k: torch.zeros_like(v) for k, v in state.items()}
    state["base_model.model.body.lora_A.weight"] = a
    state["base_model.model.body.lora_B.weight"] = b
    load_adapters(peft_model, state)
    # groups: body sqrt(8 * 0.25 + 10 * 0.01) = sqrt(2.1); head 0
    assert float(group_lasso(peft_model)) == pytest.approx(np.sqrt(2.1), rel=1e-5)
    merged = peft_model.merge_and_unload().state_dict()
    # lora_alpha = r: scale 1, W' = W + B A
    torch.testing.assert_close(merged["body.weight"], before["body.weight"] + b @ a)
    torch.testing.assert_close(merged["head.weight"], before["head.weight"])
    assert sorted(merged) == sorted(before)


def test_compare_shows_erasure_columns_only_when_present() -> None:
    from fedcl.compare import ERASURE_METRICS, compare_runs, format_csv, format_table

    plain = {"run_name": "a", "status": "FINISHED", "run_id": "1", "experiment": "x",
             "tags": {}, "params": {"strategy": "fedavg", "unlearning": "retrain",
                                     "rounds_per_task": "2"},
             "metrics": {"acc": 0.5}}
    alone = compare_runs([plain], ["x"])
    assert "unlearning" not in alone.rows[0] and alone.requests == []
    assert "erasures" not in format_table(alone)
    erased = {"run_name": "b", "status": "FINISHED", "run_id": "2", "experiment": "x",
              "tags": {}, "params": {"strategy": "fot", "unlearning": "ssd",
                                     "erasures": "class=3,after-task=0", "rounds_per_task": "2"},
              "metrics": {"acc": 0.25, "erasure_0_forget_acc": 0.125, "erasure_0_seconds": 3.0,
                          "erasure_0_oracle_forget_acc": 0.0, "erasure_0_weights": 0.0625}}
    both = compare_runs([plain, erased], ["x"])
    cols = list(both.rows[0])
    assert cols[-1] == "run_id" and "unlearning" in cols
    assert [c for c in cols if "@" in c] == [f"class=3@t0 {m}" for m in ERASURE_METRICS]
    assert both.rows[1]["class=3@t0 forget_acc"] == 0.125
    assert both.rows[0]["class=3@t0 forget_acc"] is None
    table = format_table(both, width=200).splitlines()
    at = table.index("erasures")
    assert table[at + 4].split() == ["fot", "erasures=class=3@t0", "class=3@t0", "ssd",
                                     "12.50", "3.0", "0.00", "0.0625"]
    assert format_csv(both).splitlines()[0].split(",") == cols


def test_gs_lora_client_step_ascends_the_forget_loss_up_to_the_bound() -> None:
    from flwr.app import ArrayRecord

    from strategies.unlearning.gs_lora import ADAPTERS, STATS, client_train

    model = Tiny()
    data = _client_data(model, forget=16, retain=0, batch=8)
    torch.manual_seed(1)
    start = adapter_state(lora_model(Tiny(), rank=2))
    data.records = RecordDict({ADAPTERS: ArrayRecord(start)})
    data.settings = ConfigRecord({"gs-lora.rank": 2, "gs-lora.lr": 0.05, "gs-lora.epochs": 3,
                                  "gs-lora.beta": 1.0, "gs-lora.bound": 10.0,
                                  "gs-lora.alpha": 0.0, "gs-lora.batch-size": 8,
                                  "gs-lora.seed": 0})
    x, y, head = next(data.batches("forget", 16))
    before = float(nn.functional.cross_entropy(Tiny()(x, head), y))
    out = client_train(data)
    assert int(out[STATS]["n"]) == 16
    trained = lora_model(Tiny(), rank=2)
    load_adapters(trained, out[ADAPTERS].to_torch_state_dict())
    after = float(nn.functional.cross_entropy(trained.merge_and_unload()(x, head), y))
    assert before < after
    # B starts at zero: only training moves it
    b = out[ADAPTERS].to_torch_state_dict()["base_model.model.body.lora_B.weight"]
    assert float(b.abs().max()) > 0


def test_a_request_for_data_the_client_does_not_hold_is_refused() -> None:
    from fedcl.erasure import check_requests_hold_data

    config = Config(clients=10, tasks=5, scenario="class-il", partition="shards",
                    shards_per_client=1, seed=3)
    sc = build_scenario(config)
    held = [set(original_labels(sc, 1, client_positions(config, c, 1, config.data_dir)))
            for c in range(10)]
    lacking = next(c for c in range(10) if 3 not in held[c])
    owner = next(c for c in range(10) if 3 in held[c])
    req = parse_erasure(f"client={lacking},class=3,after-task=1")
    with pytest.raises(ConfigError) as err:
        check_requests_hold_data(config, sc, [req], config.data_dir)
    assert str(err.value) == (f"erasure 'client={lacking},class=3,after-task=1': client "
                              f"{lacking} holds no samples of class 3 in tasks 0..1; nothing "
                              "to erase")
    check_requests_hold_data(config, sc, [parse_erasure(f"client={owner},class=3,after-task=1"),
                                          parse_erasure("class=3,after-task=1")],
                             config.data_dir)


def _train_reply(pid: int, value: float, n: int) -> Message:
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}),
                      dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    return Message(RecordDict({
        protocol.ARRAYS: ArrayRecord({"w": torch.full((2,), value)}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: 1.0,
                                        protocol.UNIT_WEIGHT: 1}),
        protocol.CLIENT_INFO: ConfigRecord({protocol.PARTITION_ID: pid,
                                            protocol.NUM_PARTITIONS: 2})}), reply_to=request)


class _TwoNodes:
    def get_node_ids(self) -> list[int]:
        return [10, 11]


def test_federaser_records_through_a_wrapper_of_the_runs_strategy(
        tmp_path: Path, flower_identity: None) -> None:
    """FedEraser wraps the run's strategy: every ``interval``-th round and every task's last
    round, the model the round started from and each reply's arrays and weights go to disk;
    the wrapped strategy aggregates as before (FedAvg's weighted mean), asks cohorts for
    one reply per client, and keeps the inner strategy's state."""
    from fedcl.strategy import RoundInfo

    method = plugins.build_unlearning(
        Config(unlearning="federaser", unlearning_params={"interval": 2}), tmp_path)
    inner = plugins.build_strategy(Config(strategy="fedavg"))
    strategy = method.wrap(inner)
    assert inner.cohort_mean_key(RoundInfo(0, 1, 3, 1)) == protocol.NUM_EXAMPLES
    assert strategy.cohort_mean_key(RoundInfo(0, 1, 3, 1)) is None
    assert strategy.capabilities is inner.capabilities
    start = ArrayRecord({"w": torch.zeros(2)})
    for info in (RoundInfo(0, 1, 3, 1), RoundInfo(0, 2, 3, 2), RoundInfo(0, 3, 3, 3)):
        strategy.configure_round(info, start, ConfigRecord(), _TwoNodes())
        arrays, _ = strategy.aggregate_train(info.round, [_train_reply(0, 1.0, 30),
                                                          _train_reply(1, 3.0, 10)])
        # (30 * 1 + 10 * 3) / 40
        assert arrays.to_torch_state_dict()["w"].tolist() == [1.5, 1.5]
    stored = sorted(p.name for p in (tmp_path / "federaser").iterdir())
    assert stored == ["round_000001.pt", "round_000003.pt"]  # interval 2; round 3 ends the task
    saved = torch.load(tmp_path / "federaser" / "round_000003.pt", weights_only=False)
    assert (saved["round"], saved["task"], saved["task_round"]) == (3, 0, 3)
    assert saved["global"]["w"].tolist() == [0.0, 0.0]
    assert {pid: c[protocol.NUM_EXAMPLES] for pid, c in saved["clients"].items()} == {
        0: 30.0, 1: 10.0}
    assert saved["clients"][1]["state"]["w"].tolist() == [3.0, 3.0]
    assert strategy.state_dict() == inner.state_dict()
