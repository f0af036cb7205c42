"""GLFC: its maths by hand (METHODS.md 18.3: the gradient-compensation weights and the relation
target; herding, the quotas, the loss), the proxy's label recovery and gradient inversion, the
proxy server's choice of the old model on hand-made uploads, a client's memory and uploads
through the real ClientApp handler, and tiny runs of the real ``fedcl simulate`` (one with a
class erased: no erased sample left in any memory)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedcl import client_app, plugins, protocol
from fedcl.config import Config
from fedcl.data.partition import client_positions
from fedcl.data.scenarios import build_scenario
from fedcl.erasure import original_labels
from fedcl.errors import ConfigError
from fedcl.run_setup import setup_run
from fedcl.strategy import RoundInfo
from strategies.baselines.glfc import (
    BUFFER,
    GLFC,
    OLD_MODEL,
    PROTO_GRADS,
    GLFCParams,
    proxy_seed,
)
from strategies.baselines.glfc_maths import (
    batched_gradient_match_loss,
    class_quotas,
    glfc_loss,
    gradient_magnitudes,
    gradient_match_loss,
    group_weights,
    herding,
    invert_gradient,
    invert_gradients,
    nearest_to_mean,
    perturb_prototype,
    prototype_gradient,
    proxy_network,
    recover_label,
    relation_target,
    unflatten,
)
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)

ROW_BYTES = 28 * 28 + 2 * 8  # an MNIST image, its target and its class (int64)
MNIST_PROXY_PARAMS = 13_426  # 1*12*25+12 + 2*(12*12*25+12) + 588*10+10


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --- the client's loss, by hand (METHODS.md 18.3) -------------------------------------------
def test_gradient_compensation_weights_by_hand() -> None:
    """Own-class probabilities 0.8 and 0.4 (old classes), 0.1 and 0.7 (new): g = (0.2, 0.6)
    with mean 0.4 gives w = (0.5, 1.5); g = (0.9, 0.3) with mean 0.6 gives w = (1.5, 0.5)."""
    probs = [0.8, 0.4, 0.1, 0.7]
    targets = torch.tensor([0, 1, 2, 2])
    logits = torch.full((4, 3), -1.0)
    logits[torch.arange(4), targets] = torch.tensor([logit(p) for p in probs])
    g = gradient_magnitudes(logits, targets)
    torch.testing.assert_close(g, torch.tensor([0.2, 0.6, 0.9, 0.3]), rtol=0, atol=1e-6)
    old = torch.isin(targets, torch.tensor([0, 1]))
    torch.testing.assert_close(group_weights(g, old), torch.tensor([0.5, 1.5, 1.5, 0.5]),
                               rtol=0, atol=1e-6)
    # no old class yet: every weight 1; a group of zeros gets zeros, not a division by zero
    assert group_weights(g, None).tolist() == [1.0] * 4
    zeros = group_weights(torch.tensor([0.0, 0.0, 0.5]), torch.tensor([True, True, False]))
    assert zeros.tolist() == [0.0, 0.0, 1.0]


def test_relation_target_by_hand() -> None:
    """Old logits (2, 0) for old classes 0 and 1, label class 2 of 3: the target is
    (sigmoid 2, sigmoid 0, 1) = (0.881, 0.5, 1); a label of an old class is replaced too."""
    target = relation_target(torch.tensor([2, 0]), 3, torch.tensor([0, 1]),
                             torch.tensor([[2.0, 0.0], [-1.0, 3.0]]))
    torch.testing.assert_close(target[0], torch.tensor([0.8808, 0.5, 1.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(target[1], torch.tensor([0.2689, 0.9526, 0.0]), rtol=0,
                               atol=1e-4)


def test_glfc_loss_by_hand() -> None:
    """Student logits (ln 3, 0, ln 3), label 2, old classes 0 and 1 with old logits (2, 0).
    The sample is alone in its group, so w = 1. Per output (BCE summed over outputs):
    L_GC = -ln(1 - 0.75) + ln 2 - ln 0.75 = 1.3863 + 0.6931 + 0.2877 = 2.3671;
    L_RD = -(0.8808 ln 0.75 + 0.1192 ln 0.25) + ln 2 - ln 0.75 = 0.4186 + 0.6931 + 0.2877
    = 1.3995; loss = (2.3671 + 1.3995) / 2 = 1.8833. Without an old model the loss is L_GC."""
    z = torch.tensor([[math.log(3), 0.0, math.log(3)]], requires_grad=True)
    loss, gc, rd = glfc_loss(z, torch.tensor([2]), torch.tensor([0, 1]),
                             torch.tensor([[2.0, 0.0]]))
    assert float(gc.detach()) == pytest.approx(2.3671, abs=1e-4)
    assert rd is not None and float(rd.detach()) == pytest.approx(1.3995, abs=1e-4)
    assert float(loss.detach()) == pytest.approx(1.8833, abs=1e-4)
    # the gradient on the label's logit: 0.5 (sigma - 1) + 0.5 (sigma - 1) = -0.25
    (grad,) = torch.autograd.grad(loss, [z])
    assert float(grad[0, 2]) == pytest.approx(-0.25, abs=1e-6)
    alone, gc0, rd0 = glfc_loss(z, torch.tensor([2]), torch.zeros(0, dtype=torch.long), None)
    assert rd0 is None and float(alone.detach()) == float(gc0.detach())
    assert float(alone.detach()) == pytest.approx(2.3671, abs=1e-4)
    empty, _, _ = glfc_loss(z[:0], torch.zeros(0, dtype=torch.long), torch.tensor([0]), None)
    assert float(empty.detach()) == 0.0


# --- the memory ---------------------------------------------------------------------------
def test_herding_picks_the_exemplars_worked_out_by_hand() -> None:
    """Features at 0, 30 and 90 degrees (scaled 3, 1 and 0.5: herding normalises them), mean
    mu = (0.622, 0.5). Pick 1: distances to mu 0.627, 0.244, 0.798 -> row 1. Pick 2: the
    means with row 0 (0.933, 0.25) and row 2 (0.433, 0.75) are 0.399 and 0.313 from mu ->
    row 2. Then row 0. Truncating the order is iCaRL's reduction."""
    f = torch.tensor([[3.0, 0.0], [math.cos(math.pi / 6), 0.5], [0.0, 0.5]])
    assert herding(f, 3).tolist() == [1, 2, 0]
    assert herding(f, 2).tolist() == [1, 2]
    assert herding(f, 9).tolist() == [1, 2, 0]  # no more than the class holds, each once
    assert herding(f, 0).tolist() == []
    assert nearest_to_mean(f) == 1  # the prototype: the row nearest the mean


def test_the_budget_is_split_evenly_over_the_learned_classes() -> None:
    assert class_quotas([7, 3, 1], 8) == {1: 3, 3: 3, 7: 2}
    assert class_quotas([1, 3], 8) == {1: 4, 3: 4}
    assert class_quotas([4], 0) == {4: 0}
    assert class_quotas([], 5) == {}


# --- the proxy ------------------------------------------------------------------------------
def test_the_proxy_network_is_the_codes_lenet_and_the_same_from_a_seed() -> None:
    sizes = {(1, 28, 28, 10): MNIST_PROXY_PARAMS, (3, 32, 32, 100): 85_036}
    for (c, h, w, k), n in sizes.items():
        net = proxy_network((c, h, w), k, 3)
        assert sum(p.numel() for p in net.parameters()) == n
    a, b = proxy_network((1, 28, 28), 10, 3), proxy_network((1, 28, 28), 10, 3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q) and float(p.abs().max()) <= 0.5
    assert not torch.equal(next(proxy_network((1, 28, 28), 10, 4).parameters()),
                           next(a.parameters()))


def test_the_label_is_read_from_the_last_layers_gradient() -> None:
    """By hand: row sums (0.3, -0.1, 0.2) -> label 1. On the proxy network, a sample's
    cross-entropy gradient gives its label back for every label."""
    assert recover_label(torch.tensor([[0.1, 0.2], [-0.3, 0.2], [0.1, 0.1]])) == 1
    net = proxy_network((1, 8, 8), 5, 1)
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5))
    for label in range(5):
        grads = unflatten(net, prototype_gradient(net, x, label))
        assert recover_label(grads[-2]) == label
    with pytest.raises(ValueError, match="a gradient of 3 values for a network of"):
        unflatten(net, torch.zeros(3))


def test_gradient_inversion_reduces_the_matching_loss() -> None:
    """From noise, 10 L-BFGS steps (lr 0.1) on an 8x8 sample's gradient bring the matching
    loss from 2.45 to below 1e-6 and the last iterate within 0.01 of the sample; the last 3
    iterates are kept; the network is unchanged."""
    net = proxy_network((1, 8, 8), 4, 1)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5))
    target = unflatten(net, prototype_gradient(net, x, 2))
    inv = invert_gradient(net, target, 2, (1, 8, 8), 10, 0.1, 3,
                          torch.Generator().manual_seed(0))
    assert inv.start_loss == pytest.approx(2.4534, abs=1e-3)
    assert inv.end_loss < 1e-6
    assert inv.images.shape == (3, 1, 8, 8)
    assert float((inv.images[-1] - x).abs().max()) < 0.01
    assert float(gradient_match_loss(net, inv.images[-1:], 2, target)) < 1e-6
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def test_the_perturbation_makes_the_prototype_more_typical_of_its_class() -> None:
    """SGD on the BCE of a fixed linear model: the loss falls; 0 steps change nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(1, 4, 4)

    def bce(v: torch.Tensor) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.binary_cross_entropy_with_logits(
                model(v.unsqueeze(0)), torch.tensor([[0.0, 1.0, 0.0]])))

    moved = perturb_prototype(model, x, 1, 3, 50, 0.2)
    assert bce(moved) < bce(x) - 0.05 and moved.shape == x.shape
    assert torch.equal(perturb_prototype(model, x, 1, 3, 0, 0.2), x)
    assert all(p.grad is None for p in model.parameters())


# --- the proxy server ---------------------------------------------------------------------
def _always(config: Config, label: int) -> ArrayRecord:
    """The run's MLP answering ``label`` whatever the input (zero head weights, one bias)."""
    state = plugins.build_model(config, build_scenario(config)).state_dict()
    state["heads.0.weight"].zero_()
    state["heads.0.bias"].zero_()
    state["heads.0.bias"][label] = 5.0
    return ArrayRecord(state)


def _bias(record: ArrayRecord | ConfigRecord) -> torch.Tensor:
    return record.to_torch_state_dict()["heads.0.bias"]  # type: ignore[union-attr]


def test_the_proxy_keeps_the_best_model_of_a_task_as_the_next_old_model() -> None:
    """Task 0: one upload of a class-7 prototype's gradient; the proxy recovers label 7 and
    keeps 4 reconstructions. The global model that answers 7 scores 1 and stays the best when
    a later one that answers 3 scores 0, though the aggregate itself is never changed; at the
    task's end it becomes the old model, sent with every later round. A task without uploads
    hands on its last global model (score -1)."""
    config = Config(strategy="glfc", clients=3, tasks=2, device="cpu")
    params = GLFCParams(inversion_steps=6, inversion_keep=4)
    strategy = GLFC(params, config)
    net = proxy_network((1, 28, 28), 10, proxy_seed(config.seed))
    x = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(2))
    grads = prototype_gradient(net, x, 7)[None]
    sevens, threes = _always(config, 7), _always(config, 3)
    info = RoundInfo(task=1, task_round=1, rounds_per_task=2, round=3)

    strategy.begin_task(0, sevens)
    assert strategy.train_records(info) == {}
    strategy.payloads = {0: RecordDict({PROTO_GRADS: ArrayRecord({"grads": grads})}),
                         1: RecordDict()}
    assert strategy.after_aggregate(sevens, []) is sevens
    assert strategy.recon_y.tolist() == [7] * 4 and strategy.recon_x.shape == (4, 1, 28, 28)
    assert strategy.best is sevens and strategy.best_score == 1.0
    strategy.payloads = {}
    assert strategy.after_aggregate(threes, []) is threes
    assert strategy.best is sevens and strategy.best_score == 1.0
    assert strategy.end_task(0, threes) is threes
    sent = strategy.train_records(info)[OLD_MODEL]
    assert torch.equal(_bias(sent), _bias(sevens))
    metrics = strategy.state_metrics()
    assert metrics["glfc_reconstructions"] == 4 and metrics["glfc_inversions"] == 1
    assert metrics["glfc_dropped"] == 0 and metrics["glfc_old_model_score"] == 1.0
    # the proxy's first inversion of the run (seed 0, task 0) draws its noise from seed 0
    inv = invert_gradient(net, unflatten(net, grads[0]), 7, (1, 28, 28), 6, 0.1, 4,
                          torch.Generator().manual_seed(0))
    assert metrics["glfc_match_loss"] == inv.end_loss < inv.start_loss / 10
    assert strategy.recon_y.numel() == 0  # the task's reconstructions are dropped

    again = GLFC(params, config)
    again.load_state_dict(strategy.state_dict())
    assert torch.equal(_bias(again.train_records(info)[OLD_MODEL]), _bias(sevens))

    strategy.begin_task(1, threes)
    strategy.after_aggregate(threes, [])
    strategy.end_task(1, threes)
    assert strategy.old is threes and strategy.state_metrics()["glfc_old_model_score"] == -1.0


# --- a client through the real handler -------------------------------------------------------
def _context(pid: int, clients: int) -> Context:
    return Context(run_id=1, node_id=10 + pid, state=RecordDict(), run_config={},
                   node_config={"partition-id": pid, "num-partitions": clients})


def _train(config: Config, context: Context, task: int, round_: int) -> RecordDict:
    arrays = ArrayRecord(plugins.build_model(config, build_scenario(config)).state_dict())
    cfg = ConfigRecord({protocol.RUN_CONFIG_JSON: config.to_json(), protocol.TASK: task,
                        protocol.ROUND: round_, protocol.TASK_ROUND: round_,
                        protocol.LAST_ROUND_OF_TASK: False, protocol.ERASED_CLASSES: "",
                        protocol.REPLAY: False})
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: cfg})
    if task:
        content[OLD_MODEL] = arrays
    msg = Message(content, dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    return client_app.train(msg, context).content


def _grads(reply: RecordDict) -> torch.Tensor:
    return reply[PROTO_GRADS].to_torch_state_dict()["grads"]  # type: ignore[union-attr]


def _memory(context: Context):  # type: ignore[no-untyped-def]
    return client_app.decode_store(context.state.get(protocol.STORE)).buffers[BUFFER]  # type: ignore[arg-type]


def test_a_clients_memory_and_uploads_through_the_real_handler(
        flower_identity: None, tmp_path: Path) -> None:
    """Client 0 of 200, IID, 2 tasks of 5 classes, a memory of 12 per client. Task 0, round 1:
    12 rows over 5 classes (3, 3, 2, 2, 2, the lowest classes taking the remainder), 800 bytes
    each, and one prototype gradient per class, whose label the proxy reads back; round 2:
    no upload, the same memory. Task 1, round 1: 10 classes share 12 rows (2, 2, then 1
    each); task 0's classes keep the first rows of their herding order, and all 12 task-0 rows
    were trained on before the cut. A purge takes a class out at once."""
    config = Config(strategy="glfc", strategy_params={
        "buffer_size": 12, "buffer_scope": "client", "perturb_steps": 5},
        clients=200, tasks=2, partition="iid", device="cpu", batch_size=16,
        output=str(tmp_path))
    scenario = build_scenario(config)
    first, second = scenario.tasks[0].classes, scenario.tasks[1].classes
    context = _context(0, 200)
    reply = _train(config, context, 0, 1)
    grads = _grads(reply)
    assert grads.shape == (5, MNIST_PROXY_PARAMS)
    net = proxy_network((1, 28, 28), 10, proxy_seed(config.seed))
    assert [recover_label(unflatten(net, row)[-2]) for row in grads] == sorted(first)
    mem = _memory(context)
    counts = {c: int((mem.classes == c).sum()) for c in first}
    assert counts == class_quotas(first, 12) == {0: 3, 1: 3, 2: 2, 3: 2, 4: 2}
    assert torch.equal(mem.columns["y"], mem.classes) and mem.columns["x"].dtype == torch.uint8
    info = reply[protocol.CLIENT_INFO]
    assert int(info[protocol.BUFFER_BYTES]) == 12 * ROW_BYTES  # type: ignore[arg-type]
    assert int(info[protocol.BUFFER_SAMPLES]) == 12  # type: ignore[arg-type]
    assert float(reply[protocol.METRICS]["glfc_replayed"]) == 0.0  # type: ignore[index,arg-type]

    again = _train(config, context, 0, 2)
    assert PROTO_GRADS not in again
    assert len(_memory(context)) == 12
    before = _memory(context)

    later = _train(config, context, 1, 3)
    assert _grads(later).shape == (5, MNIST_PROXY_PARAMS)
    assert float(later[protocol.METRICS]["glfc_replayed"]) == 12.0  # type: ignore[index,arg-type]
    n = len(client_app.training_positions(config, scenario, 0, 1, config.data_dir,
                                          ConfigRecord()))
    assert int(later[protocol.METRICS][protocol.NUM_EXAMPLES]) == n  # type: ignore[index,arg-type]
    mem = _memory(context)
    quotas = class_quotas([*first, *second], 12)
    assert {c: int((mem.classes == c).sum()) for c in [*first, *second]} == quotas
    for c in first:  # a prefix of the class's herding order
        assert torch.equal(mem.columns["x"][mem.classes == c],
                           before.columns["x"][before.classes == c][:quotas[c]])

    purge = ConfigRecord({protocol.PURGE: True, protocol.ERASED_CLASSES: "-1:1",
                          protocol.ERASED_CLIENTS: []})
    msg = Message(RecordDict({protocol.CONFIG: purge}), dst_node_id=context.node_id,
                  message_type=MessageType.QUERY)
    gone = client_app.query(msg, context).content[protocol.CLIENT_INFO]
    assert int(gone[protocol.PURGED_SAMPLES]) == quotas[1] == 2  # type: ignore[arg-type]
    assert 1 not in _memory(context).classes.tolist()


def test_glfc_parameters_are_refused_in_one_line() -> None:
    for values, line in (({"buffer_size": -1}, "buffer_size must be >= 0, got -1"),
                         ({"buffer_scope": "all"},
                          "buffer_scope must be total or client, got 'all'"),
                         ({"inversion_steps": -2}, "inversion_steps must be >= 0, got -2"),
                         ({"perturb_lr": 0.0}, "perturb_lr must be > 0, got 0.0"),
                         ({"inversion_keep": 0}, "inversion_keep must be >= 1, got 0"),
                         ({"inversion_batch": -1}, "inversion_batch must be >= 0, got -1")):
        with pytest.raises(ConfigError) as err:
            plugins.parse_strategy_params("glfc", values)
        assert str(err.value) == f"glfc {line}"


def test_glfc_runs_only_in_class_il_and_never_in_cohorts() -> None:
    for scenario in ("task-il", "domain-il"):
        with pytest.raises(ConfigError) as err:
            setup_run(Config(strategy="glfc", scenario=scenario), paths=False)
        assert str(err.value) == (f"strategy 'glfc' is not defined for scenario '{scenario}' "
                                  "(it declares class-il)")
    with pytest.raises(ConfigError, match="cannot train strategy 'glfc': its clients keep a "
                       "store between rounds"):
        setup_run(Config(strategy="glfc", cohort_size=2), paths=False)


# --- tiny runs of the real command ------------------------------------------------------
FAST = ("--strategy", "glfc", "--strategy-param", "buffer_scope=client",
        "--strategy-param", "buffer_size=30", "--strategy-param", "inversion_steps=3",
        "--strategy-param", "inversion_keep=2", "--strategy-param", "perturb_steps=5")


def _run(tmp_path: Path, env: dict, *args: str) -> dict:
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, *FAST, *args, "--output", str(out), cwd=tmp_path,
                    env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    return json.loads((out / "summary.json").read_text())


@pytest.mark.e2e
def test_glfc_class_il_keeps_part_of_the_first_task(tmp_path: Path,
                                                    ray_env: dict) -> None:  # noqa: F811
    """Class-IL, Dirichlet, 3 clients, one round per task, 30 exemplars per client: every
    client uploads one gradient per class of each task it holds (the proxy inverts exactly
    those), each keeps 30 raw samples of both tasks' classes, 800 bytes each, and task 0
    keeps part of its accuracy, which the same run under FedAvg forgets (13.6 % left)."""
    s = _run(tmp_path, ray_env)
    assert s["strategy"] == "glfc" and s["scenario"] == "class-il" and s["num_tasks"] == 2
    matrix = s["accuracy_matrix"]
    assert matrix[0][0] > 0.8 and matrix[1][0] > 0.3
    assert s["acc"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    config = Config(clients=3, tasks=2)
    scenario = build_scenario(config)
    for t, state in enumerate(s["strategy_state"]):
        held = sum(len(set(original_labels(scenario, t, client_positions(config, pid, t))
                               .tolist())) for pid in range(3))
        assert state["task"] == t and state["glfc_inversions"] == held
        assert state["glfc_reconstructions"] == 2 * (held - state["glfc_dropped"])
    for state in s["client_state"].values():
        assert state["buffer_samples"] == 30
        assert state["buffer_bytes"] == 30 * ROW_BYTES
        assert state["keys"] == [protocol.CLIENT_STATE, protocol.STORE]
        held = set(state["buffer_classes"])
        assert held & set(scenario.tasks[0].classes) and held & set(scenario.tasks[1].classes)


@pytest.mark.e2e
def test_a_class_erasure_purges_every_glfc_memory(tmp_path: Path,
                                                  ray_env: dict) -> None:  # noqa: F811
    """IID, 30 exemplars per client: a class of task 0 is erased after task 0; the purge
    removes its rows from every client's memory before task 1 (6 per client: 30 rows over
    task 0's 5 classes), and no memory holds it at the end."""
    config = Config(clients=3, tasks=2, partition="iid")
    klass = build_scenario(config).tasks[0].classes[0]
    s = _run(tmp_path, ray_env, "--partition", "iid", "--erase",
             f"class={klass},after-task=0")
    [entry] = s["erasures"]
    assert entry["purged_samples"] == 3 * 6
    for state in s["client_state"].values():
        assert klass not in state["buffer_classes"]
        assert state["buffer_samples"] == 30
        assert state["buffer_bytes"] == 30 * ROW_BYTES


def test_the_batched_matching_loss_is_each_rows_own() -> None:
    """Row i of the batched loss is gradient_match_loss of sample i alone (float32 sums of
    ~1.3k squares: relative 1e-5), and it is differentiable in x."""
    net = proxy_network((1, 8, 8), 4, 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    samples = torch.randn(3, 1, 8, 8, generator=gen)
    labels = [2, 0, 3]
    targets = [unflatten(net, prototype_gradient(net, samples[i], labels[i])) for i in range(3)]
    stacked = [torch.stack([t[j] for t in targets]) for j in range(len(targets[0]))]
    xb = x.clone().requires_grad_(True)
    batched = batched_gradient_match_loss(net, xb, torch.tensor(labels), stacked)
    for i in range(3):
        alone = float(gradient_match_loss(net, x[i:i + 1], labels[i], targets[i]))
        assert float(batched[i]) == pytest.approx(alone, rel=1e-5)
    (grad,) = torch.autograd.grad(batched.sum(), [xb])
    xi = x[1:2].clone().requires_grad_(True)
    (own,) = torch.autograd.grad(gradient_match_loss(net, xi, 0, targets[1], create_graph=True),
                                 [xi])
    torch.testing.assert_close(grad[1:2], own, rtol=1e-4, atol=1e-6)


def test_gradients_inverted_together_are_each_matched() -> None:
    """Three 8x8 samples' gradients, one L-BFGS of 15 steps: every row starts from its own
    generator's noise (its start loss is that of inverting it alone), ends below 1e-3 and
    within 0.05 of its sample; 2 iterates kept per row. Mismatched lengths are refused."""
    net = proxy_network((1, 8, 8), 4, 1)
    samples = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = [2, 0, 3]
    targets = [unflatten(net, prototype_gradient(net, samples[i], labels[i])) for i in range(3)]
    together = invert_gradients(net, targets, labels, (1, 8, 8), 15, 0.1, 2,
                                [torch.Generator().manual_seed(i) for i in range(3)])
    for i, inv in enumerate(together):
        alone = invert_gradient(net, targets[i], labels[i], (1, 8, 8), 1, 0.1, 1,
                                torch.Generator().manual_seed(i))
        assert inv.start_loss == pytest.approx(alone.start_loss, rel=1e-5)
        assert inv.end_loss < 1e-3 < inv.start_loss
        assert inv.images.shape == (2, 1, 8, 8)
        assert float((inv.images[-1] - samples[i]).abs().max()) < 0.05
    with pytest.raises(ValueError, match="3 targets, 2 labels and 3 generators"):
        invert_gradients(net, targets, labels[:2], (1, 8, 8), 1, 0.1, 1,
                         [torch.Generator() for _ in range(3)])
    assert invert_gradients(net, [], [], (1, 8, 8), 1, 0.1, 1, []) == []
