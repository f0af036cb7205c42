"""FedWeIT (strategies/baselines/fedweit.py): its maths against numbers worked out by hand
(METHODS.md 17.3), its sparse records and their bytes, a real layer decomposed, the server's
masked mean through hand-made replies, two clients through the real ClientApp handler with the
real server half in between (what travels, what clients keep, the server's rebuilt models equal
to the clients'), fedcl's two hooks it declares (``Capabilities.model_replies``,
``ContinualStrategy.task_counts``), its refusals, and a tiny run of the real ``fedcl
simulate``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn
from torch.nn import functional as F

from fedcl import client_app, plugins, protocol
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.errors import ConfigError
from fedcl.evaluation import Evaluator, accuracies
from fedcl.run_setup import setup_run
from fedcl.strategy import Capabilities, ContinualStrategy, RoundInfo, flower_kwargs
from fedcl.validation import reply_problem, screen_replies
from strategies.baselines.fedweit import (
    ADAPTIVE,
    BASE,
    CUR,
    EVAL,
    KB,
    MEMBERS,
    PARTS,
    FedWeIT,
    FedWeITParams,
    FedWeITTrainer,
    Layer,
    decode_base,
    decomposed_keys,
    encode_base,
    kb_stack,
    nbytes,
)
from strategies.baselines.fedweit_maths import (
    PastTask,
    add_counts,
    compose_weight,
    dense_channels,
    dense_entries,
    fedweit_penalty,
    initial_mask,
    keep_channels,
    masked_mean,
    sparse_entries,
)
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)


# --- the maths by hand (METHODS.md 17.3) ------------------------------------------------------
def test_the_decomposed_weight_by_hand() -> None:
    """B = (2, -4) in one output channel, m = 0: B * sigmoid(0) = (1, -2); with A = (0.1, 0)
    and the knowledge base (1, 0), (0, 1) at attention (0.5, 0.25): theta = (1.6, -1.75). At
    evaluation with lambda_1 = 0.2, A's 0.1 is cut: (1.5, -1.75)."""
    base = torch.tensor([[2.0, -4.0]])
    zero = torch.zeros(1)
    assert compose_weight(base, zero, torch.zeros(1, 2)).tolist() == [[1.0, -2.0]]
    adaptive = torch.tensor([[0.1, 0.0]])
    kb = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    attention = torch.tensor([0.5, 0.25])
    theta = compose_weight(base, zero, adaptive, kb, attention)
    assert theta[0].tolist() == pytest.approx([1.6, -1.75], abs=1e-7)
    cut = compose_weight(base, zero, adaptive, kb, attention, evaluate=True, lambda_l1=0.2)
    assert cut.tolist() == [[1.5, -1.75]]
    # one mask per output channel, broadcast over the inputs (and a conv's kernel)
    two = compose_weight(torch.ones(2, 3, 2, 2), torch.tensor([0.0, math.inf]),
                         torch.zeros(2, 3, 2, 2))
    assert two[0].unique().tolist() == [0.5] and two[1].unique().tolist() == [1.0]
    with pytest.raises(ValueError, match="disagree"):
        compose_weight(base, torch.zeros(2), adaptive)


def test_the_server_mean_by_hand() -> None:
    """Masks b = (1, 0) and (1, 1), bases (2, 9) and (4, 6) (9 dropped by the first client):
    (3, 6). An entry no client kept is 0 (the authors' server) or keeps the previous value."""
    weights = [torch.tensor([[2.0], [0.0]]), torch.tensor([[4.0], [6.0]])]
    masks = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    assert masked_mean(weights, masks).flatten().tolist() == [3.0, 6.0]
    nobody = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])]
    assert masked_mean(weights, nobody).flatten().tolist() == [3.0, 0.0]
    previous = torch.tensor([[7.0], [8.0]])
    assert masked_mean(weights, nobody, previous).flatten().tolist() == [3.0, 8.0]


def test_the_loss_terms_by_hand() -> None:
    """B = (2, -4), m = 0, A = (0.1, 0), wd = 0.1, lambda_1 = 0.01, lambda_mask = 0.02:
    wd/2 * (0.01 + 0) + 0.01 * 0.1 + 0.02 * 0 = 0.0015; in the first task also
    wd/2 * (4 + 16) = 1. A past task (m_i = 0, A_i = (0, 1)) anchored at the same B adds only
    lambda_1 * |A_i| = 0.01: the drift term is 0 while B is unchanged; B moved by (1, 0) adds
    lambda_2/2 * (0.5^2) = 12.5 with lambda_2 = 100."""
    base = torch.tensor([[2.0, -4.0]], requires_grad=True)
    mask, adaptive = torch.zeros(1), torch.tensor([[0.1, 0.0]])
    kw: dict[str, Any] = {"wd": 0.1, "lambda_l1": 0.01, "lambda_mask": 0.02, "lambda_l2": 100.0}
    later = fedweit_penalty([base], [mask], [adaptive], [], first_task=False, **kw)
    assert float(later) == pytest.approx(0.0015, abs=1e-9)
    first = fedweit_penalty([base], [mask], [adaptive], [], first_task=True, **kw)
    assert float(first) == pytest.approx(1.0015, abs=1e-7)
    past_a = torch.tensor([[0.0, 1.0]])
    anchor = compose_weight(base.detach(), mask, past_a)  # theta*: rebuilt from this B
    past = [PastTask([mask], [past_a], [anchor])]
    same = fedweit_penalty([base], [mask], [adaptive], past, first_task=False, **kw)
    assert float(same) == pytest.approx(0.0015 + 0.01, abs=1e-9)
    same.backward()
    assert base.grad is not None and base.grad.abs().max() == 0  # no pull while B stays
    moved = torch.tensor([[3.0, -4.0]])
    drift = fedweit_penalty([moved], [mask], [adaptive], past, first_task=False, **kw)
    assert float(drift) == pytest.approx(12.5 + 0.0115, abs=1e-6)


def test_which_channels_a_client_keeps() -> None:
    """|m| = (0.5, 0.1, 0.3, 0, 2) with sparsity 0.4: the floor(2) = 2 smallest (channels 3
    and 1) are dropped; 0.3 of 5 drops floor(1.5) = 1; 0 keeps all; ties go from the lowest
    index."""
    m = torch.tensor([0.5, -0.1, 0.3, 0.0, 2.0])
    assert keep_channels(m, 0.4).tolist() == [0, 2, 4]
    assert keep_channels(m, 0.3).tolist() == [0, 1, 2, 4]
    assert keep_channels(m, 0.0).tolist() == [0, 1, 2, 3, 4]
    assert keep_channels(torch.zeros(4), 0.5).tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_channels(m, 1.0)


def test_sparse_entries_by_hand() -> None:
    """[[0, 2.5], [0, -1]]: entries 1 and 3 set, bitmap byte 0b1010 = 10 (bit i of the byte is
    entry i), values (2.5, -1); and back. A bitmap that does not fit is refused."""
    x = torch.tensor([[0.0, 2.5], [0.0, -1.0]])
    bits, values = sparse_entries(x)
    assert bits.dtype == torch.uint8 and bits.tolist() == [10] and values.tolist() == [2.5, -1.0]
    assert torch.equal(dense_entries(bits, values, (2, 2)), x)
    with pytest.raises(ValueError, match="2 bits set, 1 values"):
        dense_entries(bits, values[:1], (2, 2))
    with pytest.raises(ValueError, match="do not fit"):
        dense_entries(bits, values, (3, 3))
    with pytest.raises(ValueError, match="bits set"):  # a bit beyond the tensor
        dense_entries(torch.tensor([0b10010], dtype=torch.uint8), torch.ones(2), (2, 2))
    kept, vals = torch.tensor([2, 0]), torch.tensor([[5.0], [6.0]])
    dense, mask = dense_channels(kept, vals, (3, 1))
    assert dense.flatten().tolist() == [6.0, 0.0, 5.0] and mask.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="out of range or repeated"):
        dense_channels(torch.tensor([0, 0]), vals, (3, 1))


def test_a_new_tasks_mask_is_drawn_alike_everywhere() -> None:
    a, b = initial_mask(400, 0, 1, 0), initial_mask(400, 0, 1, 0)
    assert torch.equal(a, b) and not torch.equal(a, initial_mask(400, 0, 2, 0))
    std = math.sqrt(1 / 400) / 0.87962566103423978
    assert a.abs().max() <= 2 * std and 0.7 * std < float(a.std()) < std
    assert add_counts({1: [2, 3]}, {1: [1, 1], 4: [0, 2]}) == {1: [3, 4], 4: [0, 2]}


# --- the records a client sends, a real layer ----------------------------------------------
def _mlp(config: Config) -> nn.Module:
    return plugins.build_model(config, build_scenario(config))


def test_the_sparse_base_round_trips_at_its_sparse_size() -> None:
    """The MLP's two hidden layers (400 x 784, 400 x 400) with client_sparsity 0.3: 280 of 400
    channels travel, as int32 indices and float32 rows; the record's bytes are 0.70 of the
    dense weights' (plus the .npy headers), and decoding gives the weights with the 120
    lowest-|m| channels zeroed and a 0/1 mask of 280 ones."""
    config = Config(strategy="fedweit", scenario="task-il", tasks=5)
    state = _mlp(config).state_dict()
    keys = [k for k, _ in decomposed_keys(state)]
    assert keys == ["body.2.weight", "body.5.weight"]
    gen = torch.Generator().manual_seed(3)
    masks = {k: torch.randn(state[k].shape[0], generator=gen) for k in keys}
    record = encode_base({k: state[k] for k in keys}, masks, 0.3)
    dense = sum(state[k].numel() * 4 for k in keys)
    assert record["body.2.weight.channels"].dtype == "int32"
    assert record["body.2.weight.values"].shape == (280, 784)
    headers = nbytes(record) - sum(len(a.numpy().tobytes()) for a in record.values())
    assert 0 < headers < 4 * 200  # four arrays' .npy headers
    assert (nbytes(record) - headers) == 0.7 * dense + 2 * 280 * 4
    assert nbytes(record) / dense == pytest.approx(0.7, abs=0.002)
    decoded = decode_base(record, {k: state[k].shape for k in keys})
    for key in keys:
        weight, mask = decoded[key]
        dropped = torch.sort(masks[key].abs()).indices[:120]
        assert mask.sum() == 280 and mask[dropped].sum() == 0
        assert torch.equal(weight, state[key] * mask[:, None])
    with pytest.raises(ValueError, match="differ from the model's"):
        decode_base(record, {keys[0]: state[keys[0]].shape})


def test_a_real_layer_decomposed_gives_the_plain_layers_outputs() -> None:
    """The MLP's layers as theta = B * sigmoid(m) + A + sum_j alpha_j A_hat_j with A chosen
    as W - B * sigmoid(m) - sum_j alpha_j A_hat_j: the trainer's forward pass equals the plain
    model's with weights W."""
    config = Config(strategy="fedweit", scenario="task-il", tasks=5, device="cpu")
    model = _mlp(config).eval()
    state = model.state_dict()
    gen = torch.Generator().manual_seed(5)
    trainer = FedWeITTrainer(FedWeITParams())
    layers = []
    for key, bias in decomposed_keys(state):
        w = state[key]
        base = torch.randn(w.shape, generator=gen) * 0.05
        mask = torch.randn(w.shape[0], generator=gen)
        kb = torch.randn((2, *w.shape), generator=gen) * 0.01
        attention = torch.tensor([0.3, -0.2])
        adaptive = w - compose_weight(base, mask, torch.zeros_like(w), kb, attention)
        assert torch.allclose(compose_weight(base, mask, adaptive, kb, attention), w, atol=1e-6)
        layers.append(Layer(key, bias, nn.Parameter(base), nn.Parameter(mask),
                            nn.Parameter(adaptive), nn.Parameter(state[bias]), attention, kb))
    trainer.round.layers = layers
    x = torch.randn(16, 1, 28, 28, generator=gen)
    ctx: Any = type("Ctx", (), {"head": 2})()
    ours = trainer.forward(ctx, model, x)
    assert torch.allclose(ours, model(x, 2), atol=1e-5)
    assert float(F.cross_entropy(ours, torch.zeros(16, dtype=torch.long))) > 0


# --- the server's mean through hand-made replies -----------------------------------------
class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _reply(request: Message, pid: int, records: dict[str, Any]) -> Message:
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 0.5,
                                        protocol.UNIT_WEIGHT: 1}),
        protocol.CLIENT_INFO: ConfigRecord({protocol.PARTITION_ID: pid,
                                            protocol.NUM_PARTITIONS: 2}), **records})
    return Message(content, reply_to=request)


def test_the_server_averages_the_sparse_bases_by_hand(flower_identity: None) -> None:
    """A one-layer model with two output channels: client 0 keeps channel 0 (B = 2), client 1
    both (B = (4, 6)): the new global weight is (3, 6); the head and bias stay as they were.
    A reply whose base does not fit the model is left out; replies carry no model."""
    strategy = FedWeIT(FedWeITParams(), seed=0, **flower_kwargs(Config()))
    assert strategy.capabilities.model_replies is False
    assert strategy.capabilities.scenarios == ("task-il",)
    arrays = ArrayRecord({"body.0.weight": torch.tensor([[7.0], [8.0]]),
                          "body.0.bias": torch.zeros(2), "heads.0.weight": torch.ones(2, 2),
                          "heads.0.bias": torch.zeros(2)})
    strategy.begin_task(0, arrays)
    info = RoundInfo(task=0, task_round=1, rounds_per_task=2, round=1)
    messages = strategy.configure_round(info, arrays, ConfigRecord({}), _Grid([10, 11]))
    assert len(messages) == 2 and all(KB not in m.content for m in messages)

    def base(kept: list[int], rows: list[float]) -> ArrayRecord:
        return ArrayRecord({"body.0.weight.channels": torch.tensor(kept, dtype=torch.int32),
                            "body.0.weight.values": torch.tensor(rows).reshape(-1, 1)})

    bad = ArrayRecord({"body.0.weight.channels": torch.tensor([5], dtype=torch.int32),
                       "body.0.weight.values": torch.tensor([[1.0]])})
    replies = [_reply(messages[0], 0, {BASE: base([0], [2.0])}),
               _reply(messages[1], 1, {BASE: base([0, 1], [4.0, 6.0])}),
               _reply(messages[1], 2, {BASE: bad})]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics[protocol.TRAIN_LOSS] == 0.5
    state = new.to_torch_state_dict()
    assert state["body.0.weight"].flatten().tolist() == [3.0, 6.0]
    assert torch.equal(state["heads.0.weight"], torch.ones(2, 2))
    nobody = [_reply(messages[0], 0, {BASE: base([1], [5.0])})]
    strategy.configure_round(info, arrays, ConfigRecord({}), _Grid([10]))
    kept = strategy.aggregate_train(2, nobody)[0].to_torch_state_dict()  # type: ignore[union-attr]
    assert kept["body.0.weight"].flatten().tolist() == [7.0, 5.0]  # channel 0: as it was
    traffic = strategy.traffic[0]
    assert traffic.replies == 3 and traffic.base == traffic.up  # no task end yet


# --- two clients through the real handler, the server in between --------------------------
def _config(**extra: Any) -> Config:
    return Config(strategy="fedweit", scenario="task-il", clients=30, tasks=2, partition="iid",
                  device="cpu", batch_size=64, eval_samples_per_task=100, optimizer="adam",
                  lr=1e-3, seed=3, **extra)


class _Federation:
    """Clients 0 and 1 of a 30-client federation (nodes 10 and 11), trained by the real
    ClientApp handler, with the real server half and reply screening in between."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.scenario = build_scenario(config)
        self.arrays = ArrayRecord(plugins.build_model(config, self.scenario).state_dict())
        self.strategy = plugins.build_strategy(config)
        self.contexts = {10 + p: Context(run_id=1, node_id=10 + p, state=RecordDict(),
                                         run_config={}, node_config={"partition-id": p,
                                                                     "num-partitions": 30})
                         for p in (0, 1)}
        self.round = 0
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def run(self, task: int, task_round: int, pids: list[int]) -> None:
        self.round += 1
        info = RoundInfo(task, task_round, 2, self.round)
        if task_round == 1:
            self.arrays = self.strategy.begin_task(task, self.arrays)
        cfg = ConfigRecord({protocol.RUN_CONFIG_JSON: self.config.to_json(),
                            protocol.TASK: task, protocol.ROUND: self.round,
                            protocol.TASK_ROUND: task_round,
                            protocol.LAST_ROUND_OF_TASK: info.last_of_task,
                            protocol.ERASED_CLASSES: "", protocol.REPLAY: False,
                            protocol.MODEL_REPLY: False})
        self.sent = self.strategy.configure_round(info, self.arrays, cfg,
                                                  _Grid([10 + p for p in pids]))
        self.replies = [client_app.train(m, self.contexts[m.metadata.dst_node_id])
                        for m in self.sent]
        ok, rejected = screen_replies(self.replies, None, 100.0)
        assert not rejected and len(ok) == len(pids)
        self.replies = [_Kept(m) for m in ok]  # what the strategy takes out stays readable
        new, _ = self.strategy.aggregate_train(self.round, ok)
        self.arrays = new
        if info.last_of_task:
            self.arrays = self.strategy.end_task(task, self.arrays)

    def store(self, pid: int) -> dict[str, torch.Tensor]:
        return client_app.decode_store(self.contexts[10 + pid].state[protocol.STORE]).arrays  # type: ignore[arg-type]


class _Kept:
    """A reply's records as the client sent them (before the strategy takes its payloads)."""

    def __init__(self, msg: Message) -> None:
        self.pid = protocol.reply_partition_id(msg)
        self.records = dict(msg.content.items())


@pytest.fixture(scope="module")
def federation(flower_identity_module: None) -> _Federation:
    """Task 0: round 1 clients 0 and 1, round 2 (the last) client 0 only; task 1: both, both.
    Client 1 sends its task-0 parts late (its first round of task 1), and is not in the knowledge
    base of task 1, which holds client 0 alone."""
    fed = _Federation(_config())
    fed.run(0, 1, [0, 1])
    fed.first = {r.pid: r.records for r in fed.replies}  # type: ignore[attr-defined]
    fed.run(0, 2, [0])
    fed.last = {r.pid: r.records for r in fed.replies}  # type: ignore[attr-defined]
    fed.run(1, 1, [0, 1])
    fed.kb_sent = [KB in m.content for m in fed.sent]  # type: ignore[attr-defined]
    fed.late = {r.pid: r.records for r in fed.replies}  # type: ignore[attr-defined]
    fed.store_mid = {p: fed.store(p) for p in (0, 1)}  # type: ignore[attr-defined]
    fed.run(1, 2, [0, 1])
    fed.kb_sent_again = [KB in m.content for m in fed.sent]  # type: ignore[attr-defined]
    return fed


@pytest.fixture(scope="module")
def flower_identity_module():  # type: ignore[no-untyped-def]
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


def test_what_clients_send_in_each_round(federation: _Federation) -> None:
    """Every reply's model record is empty and its base sparse; a task's rounds but the last
    carry the client's counts, the last its thresholded adaptive weights and parts."""
    fed = federation
    dense = nbytes(fed.arrays)
    for records in (*fed.first.values(), *fed.last.values()):  # type: ignore[attr-defined]
        assert len(records[protocol.ARRAYS]) == 0
        assert 0.69 < nbytes(records[BASE]) / dense < 0.70
    first = fed.first[1]  # type: ignore[attr-defined]
    assert EVAL in first and ADAPTIVE not in first and PARTS not in first
    counts = first[EVAL]
    assert counts["task"] == 0 and sum(counts["total"]) == 100
    assert list(counts["classes"]) == sorted(fed.scenario.tasks[0].classes)
    last = fed.last[0]  # type: ignore[attr-defined]
    assert EVAL not in last and ADAPTIVE in last and PARTS in last
    assert sorted(last[PARTS].keys()) == [
        "0/attention/body.2.weight", "0/attention/body.5.weight", "0/mask/body.2.weight",
        "0/mask/body.5.weight", "0/param/body.2.bias", "0/param/body.5.bias",
        "0/param/heads.0.bias", "0/param/heads.0.weight"]
    assert last[PARTS]["0/attention/body.2.weight"].shape == (0,)  # the first task: no KB
    store = fed.store(0)
    for key in ("body.2.weight", "body.5.weight"):  # the bitmap: 1/32 of the dense bytes
        bits = last[ADAPTIVE][f"0/{key}.bits"]
        assert bits.shape == (math.ceil(store[f"{S0}adaptive/{key}"].numel() / 8),)
        values = last[ADAPTIVE][f"0/{key}.values"].numpy()
        assert (abs(values) > 1e-3).all()  # thresholded at lambda_1
    assert nbytes(last[ADAPTIVE]) < 0.9 * dense


S0 = "fedweit.0."  # client 0's past task 0 in its store


def test_the_knowledge_base_goes_once_to_each_client(federation: _Federation) -> None:
    """Task 1's knowledge base holds task 0's last-round client (0) alone; it goes with both
    clients' first round of task 1 and not with their second; client 1 (not in task 0's last
    round) sends its task-0 parts then, for evaluation only."""
    fed = federation
    strategy: Any = fed.strategy
    assert strategy.kb[1][MEMBERS].tolist() == [0]
    assert fed.kb_sent == [True, True] and fed.kb_sent_again == [False, False]  # type: ignore[attr-defined]
    assert ADAPTIVE in fed.late[1] and "0/mask/body.2.weight" in fed.late[1][PARTS]  # type: ignore[attr-defined]
    assert ADAPTIVE not in fed.late[0]  # type: ignore[attr-defined]
    assert sorted(strategy.parts[0]) == [0, 1] and sorted(strategy.parts[1]) == [0, 1]
    assert strategy.parts[1][0]["attention/body.2.weight"].shape == (1,)
    mid = fed.store_mid  # type: ignore[attr-defined]
    for pid in (0, 1):  # task 0 put away, task 1 begun with the one-member knowledge base
        store = mid[pid]
        assert store["fedweit.past"].tolist() == [0] and int(store["fedweit.task"]) == 1
        assert int(store["fedweit.0.sent"]) == 1
        assert f"{CUR}body.2.weight.B0" in store and "fedweit.kb.members" in store
        assert "fedweit.0.kbterm/body.2.weight" not in store  # task 0 had no knowledge base
        assert not any(k.startswith("fedweit.0.") and "B0" in k for k in store)
    traffic = strategy.traffic[1]
    assert traffic.kb == 2 * nbytes(strategy.kb_record(1))
    assert traffic.down == 4 * nbytes(fed.arrays) + traffic.kb


def test_the_server_rebuilds_each_clients_own_model(federation: _Federation) -> None:
    """The server's model of client c for task t, with the global base, is exactly what client
    c composes from its own store with that base (A thresholded for evaluation); the
    evaluator sums the two clients' counts (200 samples per task) for every task."""
    fed = federation
    strategy: Any = fed.strategy
    state = fed.arrays.to_torch_state_dict()
    params = FedWeITParams()
    for pid in (0, 1):
        store = fed.store(pid)
        kb = {k[len("fedweit.kb."):]: v for k, v in store.items() if k.startswith("fedweit.kb.")}
        model = strategy.client_model(1, pid, state, strategy.kb_stacks(1, state))
        for key, bias in decomposed_keys(state):
            own = compose_weight(state[key], store[f"{CUR}mask/{key}"],
                                 store[f"{CUR}adaptive/{key}"], kb_stack(kb, key, state[key].shape),
                                 store[f"{CUR}attention/{key}"], evaluate=True,
                                 lambda_l1=params.lambda_l1)
            assert torch.equal(model[key], own)
            assert torch.equal(model[bias], store[f"{CUR}param/{bias}"])
        assert torch.equal(model["heads.1.weight"], store[f"{CUR}param/heads.1.weight"])
        assert torch.equal(model["heads.0.weight"], state["heads.0.weight"])  # not task 1's
    evaluator = Evaluator(fed.scenario, fed.config, torch.device("cpu"))
    counts = evaluator.counts(fed.arrays, strategy)
    assert [sum(n for _, n in c.values()) for c in counts] == [200, 200]
    one = [evaluator.task_counts(strategy.client_model(t, 0, state, strategy.kb_stacks(t, state)),
                                 t) for t in (0, 1)]
    two = [evaluator.task_counts(strategy.client_model(t, 1, state, strategy.kb_stacks(t, state)),
                                 t) for t in (0, 1)]
    assert counts == [add_counts(add_counts({}, a), b) for a, b in zip(one, two, strict=True)]
    acc = accuracies(counts)
    assert acc[0] > 0.8 and acc[1] > 0.6  # both tasks learned by both clients' models


def test_the_servers_state_survives_a_checkpoint(federation: _Federation) -> None:
    """state_dict through torch.save/load (as fedcl's checkpoint): a fresh strategy reports the
    same counts and the same traffic."""
    strategy: Any = federation.strategy
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    again = FedWeIT(FedWeITParams(), seed=federation.config.seed,
                    **flower_kwargs(federation.config))
    again.load_state_dict(torch.load(buffer, weights_only=False))
    evaluator = Evaluator(federation.scenario, federation.config, torch.device("cpu"))
    assert evaluator.counts(federation.arrays, again) == evaluator.counts(federation.arrays,
                                                                          strategy)
    assert again.state_metrics() == strategy.state_metrics() != {}


def test_the_same_seed_sends_the_same_records(flower_identity: None) -> None:
    """A client trained twice from the same state sends the same bytes."""
    config = _config()
    sent = []
    for _ in range(2):
        fed = _Federation(config)
        fed.run(0, 1, [1])
        sent.append({k: v for k, v in fed.replies[0].records.items()  # type: ignore[attr-defined]
                     if k in (BASE, EVAL)})
    assert sent[0][EVAL] == sent[1][EVAL]
    assert all(a.data == b.data for a, b in zip(sent[0][BASE].values(), sent[1][BASE].values(),
                                                strict=True))


# --- fedcl's hooks -----------------------------------------------------------------------------
class _TwoModels(ContinualStrategy):
    """Reports, for task 0, two models: the global one and one whose head always says 0."""

    def task_counts(self, task: int, arrays: ArrayRecord, count: Any
                    ) -> dict[int, list[int]] | None:
        if task:
            return None
        state = arrays.to_torch_state_dict()
        zero = dict(state)
        zero["heads.0.weight"] = torch.zeros_like(state["heads.0.weight"])
        zero["heads.0.bias"] = torch.tensor([1.0] + [0.0] * (len(state["heads.0.bias"]) - 1))
        return add_counts(add_counts({}, count(state)), count(zero))


def test_the_evaluator_reports_a_strategys_own_models() -> None:
    """``task_counts``: the counts of the models a strategy names, summed (task 0: the global
    model and a model that always answers class 0, 100 samples each: 200 counted, the
    accuracy their mean); None keeps the global model's counts (task 1, and a strategy
    without the hook)."""
    config = Config(scenario="task-il", tasks=2, device="cpu", eval_samples_per_task=100)
    scenario = build_scenario(config)
    evaluator = Evaluator(scenario, config, torch.device("cpu"))
    arrays = ArrayRecord(plugins.build_model(config, scenario).state_dict())
    plain = evaluator.counts(arrays)
    assert plain == evaluator.counts(arrays, ContinualStrategy())
    both = evaluator.counts(arrays, _TwoModels())
    assert both[1] == plain[1]
    first = scenario.tasks[0].classes[0]  # head output 0
    assert sum(n for _, n in both[0].values()) == 200
    assert {k: v[0] for k, v in both[0].items()} == {
        k: plain[0][k][0] + (plain[0][k][1] if k == first else 0) for k in plain[0]}
    global_acc, zero_acc = accuracies(plain)[0], plain[0][first][1] / 100
    assert accuracies(both)[0] == pytest.approx((global_acc + zero_acc) / 2)


def test_replies_without_a_model_are_screened_without_one(flower_identity: None) -> None:
    """``Capabilities.model_replies`` false: the reply's model record must be empty (the rest
    is screened as ever); a model reply with an empty record is refused."""
    request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=10,
                      message_type=MessageType.TRAIN)
    empty = _reply(request, 0, {})
    reference = ArrayRecord({"w": torch.ones(2)})
    assert reply_problem(empty, None, 100.0) is None
    assert reply_problem(empty, reference, 100.0) == \
        "arrays differ from the model's (missing ['w'], extra [])"
    full = _reply(request, 1, {})
    full.content[protocol.ARRAYS] = reference
    assert reply_problem(full, None, 100.0) == "1 model arrays in a reply that carries no model"
    assert screen_replies([empty, full], None, 100.0)[1] == [
        "1 model arrays in a reply that carries no model"]
    assert Capabilities().model_replies is True


def test_a_strategy_without_model_replies_cannot_train_in_cohorts(monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """The declaration alone refuses cohorts (FedWeIT is refused earlier, for its store)."""
    monkeypatch.setattr(FedWeITTrainer, "keeps_client_store", False)
    monkeypatch.setattr(FedWeITTrainer, "batchable", True)
    with pytest.raises(ConfigError, match="cannot train strategy 'fedweit': its clients reply "
                       "with records of their own"):
        setup_run(Config(strategy="fedweit", scenario="task-il", cohort_size=2), paths=False)


# --- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"scenario": "class-il"}, "strategy 'fedweit' is not defined for scenario 'class-il' "
                               r"\(it declares task-il\)"),
    ({"scenario": "domain-il"}, "not defined for scenario 'domain-il'"),
    ({"erasures": "client=1,after-task=0"}, "fedweit does not support erasure requests"),
    ({"gradient_restriction": 0.1}, "gradient_restriction .* is not supported"),
    ({"cohort_size": 2}, "cannot train strategy 'fedweit': its clients keep a store"),
    ({"strategy_params": {"client_sparsity": 1.0}}, r"client_sparsity must be in \[0, 1\)"),
    ({"strategy_params": {"lambda_l2": -1.0}}, "fedweit lambda_l2 must be >= 0"),
    ({"strategy_params": {"adaptive_factor": 0.0}}, "adaptive_factor must be > 0"),
])
def test_fedweit_refuses_in_one_line(fields: dict, message: str) -> None:
    config = Config(**{"strategy": "fedweit", "scenario": "task-il", "tasks": 2, **fields})
    with pytest.raises(ConfigError, match=message):
        setup_run(config, paths=False)


def test_models_it_cannot_decompose_are_refused() -> None:
    config = Config(strategy="fedweit", scenario="task-il", tasks=2, model="resnet18")
    with pytest.raises(ConfigError, match="Linear and Conv2d layers only; the model's bn1 is "
                       "a BatchNorm2d"):
        plugins.build_model(config, build_scenario(config))
    cnn = Config(strategy="fedweit", scenario="task-il", tasks=2, model="cnn")
    keys = decomposed_keys(plugins.build_model(cnn, build_scenario(cnn)).state_dict())
    assert [k for k, _ in keys] == ["body.0.weight", "body.3.weight", "body.7.weight"]


# --- a tiny run of the real command ------------------------------------------------------------
@pytest.mark.e2e
def test_fedweit_task_il_through_fedcl_simulate(tmp_path: Path, ray_env: dict) -> None:  # noqa: F811
    """3 clients, 2 tasks of 2 rounds: both tasks learned, every evaluated model a client's
    (3 per task), the base sent at 0.7 of the dense bytes, the knowledge base of task 1 from
    the 3 clients of task 0's last round; clients keep their parts in their stores."""
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, "--rounds-per-task", "2", "--batch-size", "128",
                    "--strategy", "fedweit", "--scenario", "task-il", "--optimizer", "adam",
                    "--lr", "0.001", "--output", str(out), cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["strategy"] == "fedweit" and s["scenario"] == "task-il"
    matrix = s["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][0] > 0.85 and matrix[1][1] > 0.7
    assert matrix[1][0] > matrix[0][0] - 0.05  # task 0's models are the clients' own: kept
    state = s["strategy_state"]
    assert [e["task"] for e in state] == [0, 1]
    assert [e["fedweit_client_models"] for e in state] == [3, 3]
    assert state[0]["fedweit_kb_members"] == 3
    for e in state:
        ratio = e["fedweit_base_bytes_per_reply"] / e["fedweit_dense_base_bytes"]
        assert ratio == pytest.approx(0.7, abs=0.002)
        assert e["fedweit_dense_base_bytes"] < e["fedweit_dense_model_bytes"]
    assert state[0]["fedweit_kb_bytes_sent"] == 0 < state[1]["fedweit_kb_bytes_sent"]
    for st in s["client_state"].values():
        assert st["keys"] == [protocol.CLIENT_STATE, protocol.STORE]
        assert st["buffer_samples"] == 0 and st["bytes"] > 0
