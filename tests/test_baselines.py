"""The baselines in fedcl's round loop: a client's store through the real ClientApp handler
(kept between rounds, purged on erasures, apart in replayed walks), FedEWC's server half and
its batched cohorts, what cohorts refuse, and tiny runs of the real ``fedcl simulate`` for each
method, one with a class erased (no erased label left in any buffer)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedcl import client_app, cohort_training, plugins, protocol
from fedcl.config import Config
from fedcl.data.partition import client_positions
from fedcl.data.scenarios import build_scenario
from fedcl.erasure import original_labels
from fedcl.errors import ConfigError
from fedcl.models import build_model
from fedcl.run_setup import setup_run
from fedcl.training import RoundContext, TrainResult
from strategies.baselines.ewc import (
    COUNT,
    FISHER,
    PENALTY_ANCHOR,
    PENALTY_FISHER,
    EWCParams,
    EWCTrainer,
    FedEWC,
)
from strategies.baselines.replay import BUFFER, SEEN
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)

ROW_BYTES = 28 * 28 + 3 * 8  # an MNIST image, its target, head and class (int64)


# --- a client's store through the real handler -------------------------------------------
def _context(pid: int, clients: int) -> Context:
    return Context(run_id=1, node_id=10 + pid, state=RecordDict(), run_config={},
                   node_config={"partition-id": pid, "num-partitions": clients})


def _train(config: Config, context: Context, round_: int, *, erased: str = "",
           walk: str = "") -> RecordDict:
    arrays = ArrayRecord(plugins.build_model(config, build_scenario(config)).state_dict())
    cfg = ConfigRecord({protocol.RUN_CONFIG_JSON: config.to_json(), protocol.TASK: 0,
                        protocol.ROUND: round_, protocol.TASK_ROUND: round_,
                        protocol.LAST_ROUND_OF_TASK: False, protocol.ERASED_CLASSES: erased,
                        protocol.REPLAY: bool(walk)})
    if walk:
        cfg[protocol.WALK] = walk
    msg = Message(RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: cfg}),
                  dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    return client_app.train(msg, context).content


def _purge(context: Context, classes: str, clients: list[int]) -> ConfigRecord:
    cfg = ConfigRecord({protocol.PURGE: True, protocol.ERASED_CLASSES: classes,
                        protocol.ERASED_CLIENTS: clients})
    msg = Message(RecordDict({protocol.CONFIG: cfg}), dst_node_id=context.node_id,
                  message_type=MessageType.QUERY)
    return client_app.query(msg, context).content[protocol.CLIENT_INFO]  # type: ignore[return-value]


def _store(context: Context, key: str = protocol.STORE):  # type: ignore[no-untyped-def]
    return client_app.decode_store(context.state.get(key))  # type: ignore[arg-type]


def test_a_clients_buffer_lives_in_its_store_and_erasures_purge_it(
        flower_identity: None, tmp_path: Path) -> None:
    """FedER on client 0 of 200 (class-IL, task 0 of classes 0-4, 30 rows per client): the
    buffer fills in the first round and is in Context.state for the next; a purge query takes
    a class out at once, a train message naming an erased class takes it out before the round
    (and the round's data leaves it out); a replayed walk keeps its own buffer, begun empty,
    and leaves the live one alone; erasing the client empties its store."""
    config = Config(strategy="feder", strategy_params={"buffer_size": 30,
                                                       "buffer_scope": "client"},
                    clients=200, tasks=2, partition="iid", device="cpu", batch_size=16,
                    output=str(tmp_path))
    context = _context(0, 200)
    reply = _train(config, context, 1)
    info = reply[protocol.CLIENT_INFO]
    store = _store(context)
    buf = store.buffers[BUFFER]
    n = len(client_app.training_positions(config, build_scenario(config), 0, 0,
                                          config.data_dir, ConfigRecord()))
    assert len(buf) == 30 and int(store.arrays[SEEN]) == n  # every sample offered once
    assert set(buf.classes.tolist()) <= {0, 1, 2, 3, 4}
    assert buf.columns["x"].dtype == torch.uint8 and buf.columns["x"].shape == (30, 1, 28, 28)
    assert torch.equal(buf.columns["y"], buf.classes)  # class-IL: targets are classes
    assert int(info[protocol.BUFFER_SAMPLES]) == 30  # type: ignore[arg-type]
    assert int(info[protocol.BUFFER_BYTES]) == 30 * ROW_BYTES  # type: ignore[arg-type]
    assert list(info[protocol.BUFFER_CLASSES]) == sorted(set(buf.classes.tolist()))  # type: ignore[arg-type]
    assert str(info[protocol.STATE_KEYS]) == f"{protocol.CLIENT_STATE},{protocol.STORE}"

    # a purge query: class 1 everywhere, now
    ones = int((buf.classes == 1).sum())
    assert ones > 0
    purged = _purge(context, "-1:1", [])
    assert int(purged[protocol.PURGED_SAMPLES]) == ones  # type: ignore[arg-type]
    assert 1 not in _store(context).buffers[BUFFER].classes.tolist()
    assert 1 not in list(purged[protocol.BUFFER_CLASSES])  # type: ignore[arg-type]

    # a replayed walk: its own buffer, empty at its start; the live one is left as it was
    live = _store(context).buffers[BUFFER].classes.clone()
    _train(config, context, 1, walk="walk-a")
    assert torch.equal(_store(context).buffers[BUFFER].classes, live)
    replayed = _store(context, protocol.REPLAY_STORE)
    assert int(replayed.arrays[SEEN]) == n  # began empty: one round of offers
    _train(config, context, 2, walk="walk-a")
    assert int(_store(context, protocol.REPLAY_STORE).arrays[SEEN]) == 2 * n
    _train(config, context, 1, walk="walk-b")
    assert int(_store(context, protocol.REPLAY_STORE).arrays[SEEN]) == n  # a new walk

    # a train message naming class 2 erased on this client: gone before the round, and the
    # round's samples leave it out, so none comes back
    assert 2 in _store(context).buffers[BUFFER].classes.tolist()
    _train(config, context, 2, erased="0:2")
    classes = _store(context).buffers[BUFFER].classes.tolist()
    assert len(classes) == 30 and 2 not in classes
    kept = len(client_app.training_positions(
        config, build_scenario(config), 0, 0, config.data_dir,
        ConfigRecord({protocol.ERASED_CLASSES: "0:2"})))
    assert 0 < kept < n
    assert int(_store(context).arrays[SEEN]) == n + kept  # the second round offered the rest

    # the client is erased: its whole store goes, and the replayed walk's too
    gone = _purge(context, "-1:1;0:2", [0])
    assert int(gone[protocol.PURGED_SAMPLES]) == 30  # type: ignore[arg-type]
    assert protocol.STORE not in context.state and protocol.REPLAY_STORE not in context.state
    assert protocol.BUFFER_SAMPLES not in gone  # nothing kept to report


def test_a_trainer_without_a_store_keeps_nothing_but_its_counters(
        flower_identity: None, tmp_path: Path) -> None:
    config = Config(strategy="fedlwf", clients=200, tasks=2, partition="iid", device="cpu",
                    output=str(tmp_path))
    context = _context(3, 200)
    info = _train(config, context, 1)[protocol.CLIENT_INFO]
    assert list(context.state.keys()) == [protocol.CLIENT_STATE]
    assert protocol.BUFFER_SAMPLES not in info


# --- cohorts ---------------------------------------------------------------------------------
def test_cohorts_refuse_clients_that_keep_a_store_or_train_their_own_way() -> None:
    for name in ("feder", "fedderpp"):
        with pytest.raises(ConfigError, match=f"cannot train strategy '{name}': its clients "
                           "keep a store between rounds"):
            setup_run(Config(strategy=name, cohort_size=2), paths=False)
    with pytest.raises(ConfigError, match="cannot train strategy 'fedlwf': its clients train "
                       "their own way"):
        setup_run(Config(strategy="fedlwf", cohort_size=2), paths=False)
    assert setup_run(Config(strategy="fedewc", cohort_size=2), paths=False).config.cohort_size \
        == 2


def test_fedewc_trains_in_a_cohort_as_each_client_alone() -> None:
    """FedEWC's penalty reads only the round's message: three clients trained as one batched
    cohort get the weights and losses each gets alone, penalty included (and it matters: the
    same clients without it end elsewhere)."""
    config = Config(batch_size=16, local_epochs=2, lr=0.05, momentum=0.9, seed=7, device="cpu")
    torch.manual_seed(0)
    model = build_model("cnn", (3, 8, 8), 4, 2)
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=gen) * 4 for n, p in model.named_parameters()}
    anchor = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
              for n, p in model.named_parameters()}
    message = RecordDict({PENALTY_FISHER: ArrayRecord(fisher),
                          PENALTY_ANCHOR: ArrayRecord(anchor)})
    members = [(pid, torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8),
                torch.randint(0, 4, (n,), generator=gen)) for pid, n in ((4, 37), (9, 21))]
    mean, std = (0.5,) * 3, (0.25,) * 3

    def ctx(pid: int, x: torch.Tensor, y: torch.Tensor, m: torch.nn.Module) -> RoundContext:
        return RoundContext(config=config, model=m, x=x, y=y, head=1, task=1, round=3,
                            partition_id=pid, device=torch.device("cpu"), mean=mean, std=std,
                            message=message)

    trainer = EWCTrainer(EWCParams(ewc_lambda=2.0))
    contexts = [ctx(pid, x, y, model) for pid, x, y in members]
    together = cohort_training.train_cohort(
        copy.deepcopy(model), members, config=config, task=1, round_=3, head=1,
        device=torch.device("cpu"), mean=mean, std=std,
        regularizer=cohort_training.trainer_regularizers(trainer, contexts))
    for (pid, x, y), got in zip(members, together, strict=True):
        alone = copy.deepcopy(model)
        expected = EWCTrainer(EWCParams(ewc_lambda=2.0)).train(ctx(pid, x, y, alone))
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        for name in names:
            torch.testing.assert_close(got.state[name], alone.state_dict()[name], rtol=1e-4,
                                       atol=1e-5)
        plain = copy.deepcopy(model)
        EWCTrainer(EWCParams(ewc_lambda=0.0)).train(ctx(pid, x, y, plain))
        gap = max(float((plain.state_dict()[n] - alone.state_dict()[n]).abs().max())
                  for n in names)
        assert gap > 1e-3


# --- FedEWC's server half ------------------------------------------------------------------
def test_fedewc_averages_the_clients_fisher_by_samples_and_sends_the_quadratic() -> None:
    """Task 0: clients with 30 and 10 samples report Fisher (1, 1) and (5, 5): the task's
    Fisher is (30*1 + 10*5)/40 = 2, anchored at the global model (3, 4). Task 1 adds Fisher
    (2, 0) at (1, 4): standard EWC sends F = (4, 2) and anchor ((2*3 + 2*1)/4, 4) = (2, 4);
    online EWC with gamma 0.5: F = (3, 1), anchored at (1, 4)."""
    def payload(fisher: list[float], n: int) -> RecordDict:
        return RecordDict({FISHER: ArrayRecord({"w": torch.tensor(fisher)}),
                           COUNT: ConfigRecord({"n": n})})

    def sent(strategy: FedEWC) -> tuple[list[float], list[float]]:
        records = strategy.train_records(None)  # type: ignore[arg-type]
        return (records[PENALTY_FISHER]["w"].numpy().tolist(),  # type: ignore[index]
                records[PENALTY_ANCHOR]["w"].numpy().tolist())  # type: ignore[index]

    for online, expected in ((False, ([4.0, 2.0], [2.0, 4.0])),
                             (True, ([3.0, 1.0], [1.0, 4.0]))):
        params = EWCParams(online=online, gamma=0.5 if online else 1.0)
        strategy = FedEWC(params)
        assert strategy.train_records(None) == {}  # type: ignore[arg-type]
        strategy.payloads = {0: payload([1.0, 1.0], 30), 1: payload([5.0, 5.0], 10)}
        strategy.end_task(0, ArrayRecord({"w": torch.tensor([3.0, 4.0])}))
        assert sent(strategy) == ([2.0, 2.0], [3.0, 4.0])
        strategy.payloads = {2: payload([2.0, 0.0], 7), 3: RecordDict()}  # 3: no data left
        strategy.end_task(1, ArrayRecord({"w": torch.tensor([1.0, 4.0])}))
        assert sent(strategy) == expected
        assert strategy.state_metrics()["ewc_fisher_max"] == expected[0][0]
        again = FedEWC(params)
        again.load_state_dict(strategy.state_dict())
        assert sent(again) == expected

    # in a stream of 2 tasks, task 1 is the last: it adds no Fisher, silently
    strategy = FedEWC(EWCParams(), tasks=2)
    strategy.payloads = {0: payload([1.0, 1.0], 30), 1: payload([5.0, 5.0], 10)}
    strategy.end_task(0, ArrayRecord({"w": torch.tensor([3.0, 4.0])}))
    strategy.payloads = {}
    strategy.end_task(1, ArrayRecord({"w": torch.tensor([1.0, 4.0])}))
    assert sent(strategy) == ([2.0, 2.0], [3.0, 4.0]) and strategy.tasks_added == [0]


def test_fedewc_clients_skip_the_fisher_of_the_streams_last_task() -> None:
    """The Fisher's passes run at a task's last round, except the stream's last task's."""
    config = Config(tasks=3, batch_size=8, device="cpu")
    model = build_model("mlp", (1, 4, 4), 3, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 1, 4, 4), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (10,), generator=gen)
    for task, last_of_task, sends in ((0, True, True), (1, False, False), (1, True, True),
                                      (2, False, False), (2, True, False)):
        ctx = RoundContext(config=config, model=model, x=x, y=y, head=None, task=task, round=1,
                           partition_id=0, device=torch.device("cpu"), mean=(0.5,),
                           std=(0.25,), last_of_task=last_of_task)
        result = EWCTrainer(EWCParams()).after_training(
            ctx, TrainResult(num_examples=10, loss=0.0, steps=1))
        assert (FISHER in result.records) is sends, (task, last_of_task)
        if sends:
            assert int(result.records[COUNT]["n"]) == 10  # type: ignore[index]


def test_fedewc_warns_when_the_penalty_makes_local_sgd_diverge() -> None:
    """Clients at lr 0.1, momentum 0: the limit is 2/0.1 = 20. A Fisher with largest value
    0.15 at ewc_lambda 100 gives curvature 15 (stable, no warning); a second task's 0.1 makes
    the summed Fisher 0.25 and the curvature 25 > 20: one line naming ewc_lambda 80 (20/0.25)
    as the bound. Online EWC with gamma 0.5 keeps 0.5*0.15 + 0.1 = 0.175: curvature 17.5, no
    warning. Momentum 0.5 raises the limit to 30; Adam is not checked."""
    def payload(fisher: list[float]) -> RecordDict:
        return RecordDict({FISHER: ArrayRecord({"w": torch.tensor(fisher)}),
                           COUNT: ConfigRecord({"n": 10})})

    def after_two(params: EWCParams, **optimizer: Any) -> tuple[str | None, str | None]:
        strategy = FedEWC(params, **optimizer)
        strategy.payloads = {0: payload([0.15, 0.0])}
        strategy.end_task(0, ArrayRecord({"w": torch.tensor([1.0, 1.0])}))
        first = strategy.check_stability(0)
        strategy.payloads = {0: payload([0.1, 0.05])}
        strategy.end_task(1, ArrayRecord({"w": torch.tensor([1.0, 1.0])}))
        return first, strategy.check_stability(1)

    first, second = after_two(EWCParams(), lr=0.1)
    assert first is None
    assert second == (
        "FedEWC: after task 1 the penalty's largest curvature, ewc_lambda x the largest Fisher "
        "value = 100 x 0.25 = 25, exceeds local SGD's stability limit 2(1 + momentum)/lr = 20: "
        "the clients' training will diverge (NaN). An ewc_lambda below 80, a smaller lr, or "
        "online EWC with gamma < 1 keeps it stable")
    assert after_two(EWCParams(online=True, gamma=0.5), lr=0.1) == (None, None)
    assert after_two(EWCParams(), lr=0.1, momentum=0.5) == (None, None)
    assert after_two(EWCParams(), optimizer="adam", lr=0.1) == (None, None)


# --- tiny runs of the real command ------------------------------------------------------
def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _run(tmp_path: Path, env: dict, *args: str) -> dict:
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, *args, "--output", str(out), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    return _summary(out)


def _check_matrix(s: dict, strategy: str, scenario: str, learned: float = 0.8) -> None:
    assert s["strategy"] == strategy and s["scenario"] == scenario and s["num_tasks"] == 2
    matrix = s["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][0] > learned  # the first task is learned
    assert s["acc"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in s["rounds"])


@pytest.mark.e2e
def test_feder_class_il_keeps_its_budget_in_raw_samples(tmp_path: Path,
                                                        ray_env: dict) -> None:  # noqa: F811
    """FedER, class-IL, Dirichlet partition, a total budget of 50 samples: clients 0, 1 and 2
    hold 17, 17 and 16 raw samples of both tasks' classes, 808 bytes each, and the replay
    keeps part of task 0, which the same run under FedAvg forgets (13.6 % left)."""
    s = _run(tmp_path, ray_env, "--strategy", "feder", "--strategy-param", "buffer_size=50")
    _check_matrix(s, "feder", "class-il")
    states = s["client_state"]
    assert [states[k]["buffer_samples"] for k in ("0", "1", "2")] == [17, 17, 16]
    for state in states.values():
        assert state["buffer_bytes"] == state["buffer_samples"] * ROW_BYTES
        assert state["keys"] == [protocol.CLIENT_STATE, protocol.STORE]
        assert state["bytes"] > state["buffer_bytes"]
    held = set().union(*(set(st["buffer_classes"]) for st in states.values()))
    config = Config(**{k: v for k, v in s["config"].items() if k != "strategy_params"})
    tasks = build_scenario(config).tasks
    assert held & set(tasks[0].classes) and held & set(tasks[1].classes)
    assert s["accuracy_matrix"][1][0] > 0.3


@pytest.mark.e2e
def test_fedderpp_task_il_keeps_logits_with_its_samples(tmp_path: Path,
                                                        ray_env: dict) -> None:  # noqa: F811
    """FedDER++, task-IL, shards partition (two label-sorted shards per client: one round
    learns task 0 only in part), 20 samples per client: each row holds the image, target,
    head, class and 5 float32 logits (its head's), of the client's own classes."""
    s = _run(tmp_path, ray_env, "--strategy", "fedderpp", "--scenario", "task-il",
             "--partition", "shards", "--strategy-param", "buffer_size=20",
             "--strategy-param", "buffer_scope=client")
    _check_matrix(s, "fedderpp", "task-il", learned=0.5)
    config = Config(clients=3, tasks=2, scenario="task-il", partition="shards")
    scenario = build_scenario(config)
    for pid, state in s["client_state"].items():
        assert state["buffer_samples"] == 20
        assert state["buffer_bytes"] == 20 * (ROW_BYTES + 5 * 4)
        held = {int(k) for t in range(2) for k in original_labels(
            scenario, t, client_positions(config, int(pid), t))}
        assert set(state["buffer_classes"]) <= held < set(range(10))  # its own classes
    matrix = s["accuracy_matrix"]
    assert matrix[1][0] > matrix[0][0] - 0.1  # task-IL with replay keeps task 0


@pytest.mark.e2e
def test_fedewc_domain_il_builds_the_fisher_at_task_ends(tmp_path: Path,
                                                             ray_env: dict) -> None:  # noqa: F811
    """FedEWC, Permuted-MNIST (domain-IL), IID, its three clients trained as one batched
    cohort: after task 0 the server holds a Fisher (summary.json strategy_state); the last
    task adds none (no round follows it), so its state is task 0's; clients keep no store."""
    s = _run(tmp_path, ray_env, "--strategy", "fedewc", "--scenario", "domain-il",
             "--partition", "iid", "--strategy-param", "fisher_samples=32",
             "--cohort-size", "3")
    _check_matrix(s, "fedewc", "domain-il")
    assert all(r["replies"] == 3 for r in s["rounds"])  # the Fisher comes per member
    state = s["strategy_state"]
    assert [e["task"] for e in state] == [0, 1]
    assert all(e["ewc_fisher_mean"] > 0 and e["ewc_fisher_max"] >= e["ewc_fisher_mean"]
               for e in state)
    assert {k: v for k, v in state[1].items() if k != "task"} == {
        k: v for k, v in state[0].items() if k != "task"}
    for st in s["client_state"].values():  # a cohort's leader keeps not even its counters
        assert protocol.STORE not in st["keys"] and "buffer_samples" not in st


@pytest.mark.e2e
def test_fedlwf_class_il_runs_with_its_teacher(tmp_path: Path, ray_env: dict) -> None:  # noqa: F811
    s = _run(tmp_path, ray_env, "--strategy", "fedlwf", "--strategy-param", "alpha=2")
    _check_matrix(s, "fedlwf", "class-il")
    assert s["config"]["strategy_params"] == {"alpha": 2}
    assert all(st["keys"] == [protocol.CLIENT_STATE] for st in s["client_state"].values())


@pytest.mark.e2e
def test_a_class_erasure_leaves_no_erased_sample_in_any_buffer(tmp_path: Path,
                                                               ray_env: dict) -> None:  # noqa: F811
    """FedER, class-IL, IID, 30 samples per client: a class of task 0 is erased after task 0;
    the purge removes its samples from every client's buffer before task 1 (the erasure's
    entry counts them), and no buffer holds it at the end."""
    config = Config(clients=3, tasks=2, partition="iid")
    klass = build_scenario(config).tasks[0].classes[0]
    s = _run(tmp_path, ray_env, "--strategy", "feder", "--partition", "iid",
             "--strategy-param", "buffer_size=30", "--strategy-param", "buffer_scope=client",
             "--erase", f"class={klass},after-task=0")
    _check_matrix(s, "feder", "class-il")
    [entry] = s["erasures"]
    # 30 rows of task 0's 5 classes on each of 3 clients: class klass had about 18 of 90
    assert 5 <= entry["purged_samples"] <= 40
    for state in s["client_state"].values():
        assert klass not in state["buffer_classes"]
        assert state["buffer_samples"] == 30


@pytest.mark.e2e
def test_feder_under_flwr_run_keeps_its_buffers_in_the_supernodes_context(
        tmp_path: Path) -> None:
    """The same apps under ``flwr run`` (Flower's own runtime; FedER's parameters go in the one
    declared key ``strategy-params``: 100 samples in total, 34, 33 and 33 per client): each
    SuperNode's Context.state carries its client's buffer from round to round and task to
    task, so after task 1 it still holds task 0's classes."""
    from tests.test_flwr_run import flwr_run

    s = flwr_run(tmp_path, "clients=3 tasks=2 rounds-per-task=2 eval-samples-per-task=300 "
                           "strategy='feder' strategy-params='buffer_size=100,buffer_scope=total'")
    assert s["strategy"] == "feder" and len(s["accuracy_matrix"]) == 2
    assert s["config"]["strategy_params"]["buffer_size"] == 100
    states = s["client_state"]
    assert [states[k]["buffer_samples"] for k in ("0", "1", "2")] == [34, 33, 33]
    tasks = build_scenario(Config(clients=3, tasks=2)).tasks
    for state in states.values():
        assert state["buffer_bytes"] == state["buffer_samples"] * ROW_BYTES
        assert state["keys"] == [protocol.CLIENT_STATE, protocol.STORE]
        assert set(state["buffer_classes"]) & set(tasks[0].classes)
        assert set(state["buffer_classes"]) & set(tasks[1].classes)


@pytest.mark.parametrize("name", ["feder", "fedderpp"])
def test_replay_refusals_name_the_method(name: str) -> None:
    """FedER and FedDER++ share their buffer parameters; a refusal names the one asked for."""
    for values, line in (({"buffer_size": -5}, "buffer_size must be >= 1, got -5"),
                         ({"buffer_scope": "everyone"},
                          "buffer_scope must be total or client, got 'everyone'"),
                         ({"replay_batch": -3}, "replay_batch must be >= 0, got -3")):
        with pytest.raises(ConfigError) as err:
            plugins.parse_strategy_params(name, values)
        assert str(err.value) == f"{name} {line}"
