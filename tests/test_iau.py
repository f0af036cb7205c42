"""IAU (Influence Approximation Unlearning): the gradient-restriction loss in a client's real
training round, the clients' gradients, the server's one step on hand-made replies, and one
erasure in a real ``fedcl simulate`` run judged against the oracle."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from fedcl import client_app, plugins, protocol
from fedcl.client_ops import mean_gradient
from fedcl.config import Config
from fedcl.data.datasets import to_float
from fedcl.data.partition import client_positions
from fedcl.data.scenarios import build_scenario
from fedcl.erasure import parse_erasure
from fedcl.training import round_seed
from fedcl.unlearning_api import UnlearningJob
from fedcl.unlearning_math import gradient_restriction_term
from strategies.unlearning.iau import (
    FORGET_CLIENTS,
    GRAD_FORGET,
    GRAD_RETAIN,
    RETAIN_CLIENTS,
    STATS,
    IAUParams,
    build_iau,
    client_gradients,
)
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)
from tests.test_unlearning_methods import Tiny, _client_data


# --- the GR loss in a client's round -------------------------------------------------------
def _train_reply(config: Config, pid: int) -> dict[str, torch.Tensor]:
    """Client ``pid``'s trained weights from the real train handler, one round of task 0."""
    scenario = build_scenario(config)
    torch.manual_seed(7)
    arrays = ArrayRecord(plugins.build_model(config, scenario).state_dict())
    cfg = ConfigRecord({protocol.RUN_CONFIG_JSON: config.to_json(), protocol.TASK: 0,
                        protocol.ROUND: 1, protocol.TASK_ROUND: 1,
                        protocol.LAST_ROUND_OF_TASK: False})
    context = Context(run_id=1, node_id=10 + pid, state=RecordDict(), run_config={},
                      node_config={"partition-id": pid, "num-partitions": config.clients})
    msg = Message(RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: cfg}),
                  dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    return client_app.train(msg, context).content[protocol.ARRAYS].to_torch_state_dict()


def test_the_gr_option_reaches_a_clients_round_and_is_its_loss(flower_identity: None) -> None:
    """Client 3 of 200 (class-IL task 0, 60-odd samples, one batch, one SGD step of the CNN,
    which has no dropout) trained through the real handler with ``gradient_restriction`` 0.5
    in the run config: its weights are one step on CE + 0.5 * sum ||grad CE||_2, recomputed
    here by hand from the same starting model and the same samples, and differ from the
    round without the term by far more than rounding."""
    config = Config(clients=200, partition="iid", model="cnn", batch_size=512, lr=0.5,
                    device="cpu", seed=2)
    gr = dataclasses.replace(config, gradient_restriction=0.5)
    assert Config.from_run_config(gr.to_run_config()).gradient_restriction == 0.5
    assert gr.to_run_config()["gradient-restriction"] == 0.5
    plain, restricted = _train_reply(config, 3), _train_reply(gr, 3)

    scenario = build_scenario(gr)
    x, y = scenario.train_data(0, client_positions(gr, 3, 0, gr.data_dir))
    torch.manual_seed(7)
    model = plugins.build_model(gr, scenario)
    gen = torch.Generator().manual_seed(round_seed(gr.seed, 0, 1, 3))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    order = torch.randperm(len(y), generator=gen)
    ce = nn.functional.cross_entropy(model(to_float(x[order], scenario.dataset.mean,
                                                    scenario.dataset.std), None), y[order])
    (ce + 0.5 * gradient_restriction_term(ce, list(model.parameters()))).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    moved = 0.0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restricted[name], value, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((restricted[name] - plain[name]).abs().max()))
    assert moved > 1e-3


# --- the clients' gradients ----------------------------------------------------------------
def test_client_sends_the_gradients_the_server_lists_it_for() -> None:
    """A client listed for both sends the mean-loss gradients of its forget and of its retain
    samples with their counts and losses; listed for none, it sends only empty stats."""
    data = _client_data(Tiny(), forget=5, retain=7)
    data.settings = ConfigRecord({FORGET_CLIENTS: [0], RETAIN_CLIENTS: [4, 0]})
    out = client_gradients(data)
    for which, key in (("forget", GRAD_FORGET), ("retain", GRAD_RETAIN)):
        grads, loss, n = mean_gradient(data, which)
        assert int(out[STATS][f"{which}_n"]) == n == (5 if which == "forget" else 7)
        assert float(out[STATS][f"{which}_loss"]) == pytest.approx(loss)
        got = out[key].to_torch_state_dict()
        for k, g in grads.items():
            torch.testing.assert_close(got[k], g)
    data.settings = ConfigRecord({FORGET_CLIENTS: [-1], RETAIN_CLIENTS: [1]})
    out = client_gradients(data)
    assert set(out) == {STATS} and int(out[STATS]["forget_n"]) == 0


# --- the server's step ---------------------------------------------------------------------
class _Job:
    """What :meth:`IAU.unlearn` reads of an :class:`UnlearningJob`, with hand-made replies."""

    sample = UnlearningJob.sample

    def __init__(self, request: str, connected: list[int], replies: dict[int, dict[str, Any]],
                 arrays: dict[str, torch.Tensor]) -> None:
        self.request = parse_erasure(request)
        self.config = Config(seed=4)
        self.progress = SimpleNamespace(global_round=6)
        self._connected, self._replies = connected, replies
        self.arrays = ArrayRecord(arrays)
        self.asked: list[tuple[list[int], dict[str, Any]]] = []

    def forget_clients(self) -> list[int]:
        return [self.request.client] if self.request.client is not None else self._connected

    def retain_clients(self) -> list[int]:
        gone = self.request.client if self.request.kind == "client" else None
        return [q for q in self._connected if q != gone]

    def ask(self, pids: list[int], op: str, required: list[int], **settings: Any
            ) -> dict[int, RecordDict]:
        assert op == "iau.gradients" and set(required) <= set(pids)
        self.asked.append((pids, settings))
        return {q: self._reply(q, settings) for q in pids}

    def _reply(self, pid: int, settings: dict[str, Any]) -> RecordDict:
        n_f, g_f, n_r, g_r = self._replies[pid]
        out = RecordDict({STATS: ConfigRecord({"forget_n": 0, "retain_n": 0,
                                               "forget_loss": 0.0, "retain_loss": 0.0})})
        if pid in settings[FORGET_CLIENTS] and n_f:
            out[GRAD_FORGET] = ArrayRecord({"w": torch.tensor(g_f)})
            out[STATS]["forget_n"], out[STATS]["forget_loss"] = n_f, 1.0
        if pid in settings[RETAIN_CLIENTS] and n_r:
            out[GRAD_RETAIN] = ArrayRecord({"w": torch.tensor(g_r)})
            out[STATS]["retain_n"], out[STATS]["retain_loss"] = n_r, 0.5
        return out


# client -> (forget samples, forget gradient, retain samples, retain gradient)
CLASS_REPLIES = {0: (1, [4.0, 0.0], 2, [1.0, 1.0]),
                 1: (3, [0.0, 4.0], 2, [3.0, -5.0]),
                 2: (0, [0.0, 0.0], 4, [0.5, 0.5])}


def test_iau_steps_once_on_the_pooled_retain_minus_forget_gradient() -> None:
    """Class request, three clients. Forget: 1 sample with gradient (4, 0), 3 with (0, 4): g_f =
    (1, 3). Retain: 2 with (1, 1), 2 with (3, -5), 4 with (0.5, 0.5): g_r = (2 + 6 + 2,
    2 - 10 + 2) / 8 = (1.25, -0.75). g = g_r - g_f = (0.25, -3.75).
    SGD at lr 0.2 from (1, 1): (0.95, 1.75). Adam at lr 0.01: (1 - 0.01 * 0.25 / (0.25 + eps),
    1 + 0.01 * 3.75 / (3.75 + eps)), about (0.99, 1.01): the sign-like first step."""
    theta = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    sgd = build_iau(IAUParams(lr=0.2, optimizer="sgd"), None)
    job = _Job("class=1,after-task=0", [0, 1, 2], CLASS_REPLIES, theta)
    new = sgd.unlearn(job)[0].to_torch_state_dict()  # type: ignore[arg-type]
    torch.testing.assert_close(new["w"], torch.tensor([0.95, 1.75], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    pids, settings = job.asked[0]
    assert pids == [0, 1, 2] and settings == {FORGET_CLIENTS: [0, 1, 2],
                                              RETAIN_CLIENTS: [0, 1, 2]}
    report = sgd.report()
    assert (report["forget_samples"], report["retain_samples"], report["retain_clients"]) == (
        4, 8, 3)
    assert report["step_norm"] == pytest.approx(0.2 * math.hypot(0.25, 3.75), rel=1e-12)
    assert report["forget_loss_before"] == 1.0 and report["retain_loss_before"] == 0.5

    adam = build_iau(IAUParams(lr=0.01), None)
    new = adam.unlearn(_Job("class=1,after-task=0", [0, 1, 2], CLASS_REPLIES, theta))[0]
    w = new.to_torch_state_dict()["w"].tolist()
    assert w[0] == pytest.approx(1 - 0.01 * 0.25 / (0.25 + 1e-8), rel=1e-14)
    assert w[1] == pytest.approx(1 + 0.01 * 3.75 / (3.75 + 1e-8), rel=1e-14)


def test_iau_asks_the_erased_client_for_forget_and_a_sample_of_the_others_for_retain() -> None:
    """Client 1 erased, retain_fraction 0.5 of the 4 others: client 1 is asked for its forget
    gradient only, 2 others (seeded) for their retain gradients; g = g_r - g_f from them."""
    replies = {q: (5, [2.0 * q, 0.0], 5, [float(q), 1.0]) for q in range(5)}
    iau = build_iau(IAUParams(lr=0.5, optimizer="sgd", retain_fraction=0.5), None)
    job = _Job("client=1,after-task=0", list(range(5)), replies,
               {"w": torch.zeros(2, dtype=torch.float64)})
    new = iau.unlearn(job)[0].to_torch_state_dict()["w"]  # type: ignore[arg-type]
    pids, settings = job.asked[0]
    sampled = settings[RETAIN_CLIENTS]
    assert settings[FORGET_CLIENTS] == [1] and len(sampled) == 2 and 1 not in sampled
    assert sampled == job.sample([0, 2, 3, 4], 0, salt=29, fraction=0.5)
    assert pids == sorted({1, *sampled})
    g_r = torch.tensor([sum(sampled) / 2, 1.0], dtype=torch.float64)
    g_f = torch.tensor([2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(new, -0.5 * (g_r - g_f), rtol=0, atol=1e-15)
    assert iau.report()["retain_clients"] == 2


def test_iau_needs_forget_samples() -> None:
    iau = build_iau(IAUParams(), None)
    replies = {0: (0, [0.0], 3, [1.0]), 1: (0, [0.0], 3, [1.0])}
    with pytest.raises(ValueError, match="no client holds samples of the request"):
        iau.unlearn(_Job("class=1,after-task=0", [0, 1], replies,
                         {"w": torch.zeros(1, dtype=torch.float64)}))


# --- a real run -----------------------------------------------------------------------------
# MNIST's training samples of classes 0-4 (class-IL task 0 of 2) and of class 1
TASK0_SAMPLES, CLASS1_SAMPLES = 5923 + 6742 + 5958 + 6131 + 5842, 6742
MLP_PARAMS = 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10


@pytest.mark.e2e
def test_iau_with_gr_training_forgets_a_class_in_a_real_run(tmp_path: Path,
                                                              ray_env: dict) -> None:  # noqa: F811
    """Three clients trained with the GR loss (alpha 0.005), class 1 erased after task 0 by
    IAU: every client sends both gradients (all of class 1 is forget data, the rest of task 0
    retain data), the server takes one Adam step, and the request is judged against the
    oracle like every method's, in summary.json, MLflow and `fedcl compare`."""
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, "--unlearning", "iau", "--gradient-restriction",
                    "0.005", "--erase", "class=1,after-task=0", "--output", str(out),
                    "--experiment", "iau", cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["gradient_restriction"] == 0.005 and s["config"]["unlearning"] == "iau"
    assert s["accuracy_matrix"][0][0] > 0.8  # it trained, with the term in every step
    (entry,) = s["erasures"]
    assert (entry["request"], entry["kind"], entry["method"], entry["round"]) == (
        "class=1,after-task=0", "class", "iau", 1)
    for key in ("forget_acc", "retain_acc", "test_acc", "mia"):
        assert 0.0 <= entry[key] <= 1.0 and 0.0 <= entry["oracle"][key] <= 1.0
    assert entry["oracle"]["forget_acc"] <= 0.05  # the oracle never trained on class 1
    assert 0 < entry["seconds"] and 0 < entry["oracle"]["seconds"]
    assert 0 < entry["distance_to_oracle"]["weights"] < 1
    assert -1 <= entry["distance_to_oracle"]["cka_forget"] <= 1
    # every sample of task 0 is pooled, as forget or retain data, from all three clients
    assert (entry["forget_samples"], entry["retain_samples"], entry["retain_clients"]) == (
        CLASS1_SAMPLES, TASK0_SAMPLES - CLASS1_SAMPLES, 3)
    assert entry["forget_loss_before"] > 0 and entry["retain_loss_before"] > 0
    # a fresh Adam's step moves each parameter by lr |g| / (|g| + eps) <= lr: at most
    # lr sqrt(P), and close to it, as almost every gradient entry is far above eps
    bound = 1e-3 * math.sqrt(MLP_PARAMS)
    assert 0.9 * bound < entry["step_norm"] <= bound

    from fedcl import tracking
    from fedcl.compare import compare

    runs = tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "iau")
    assert runs[0]["metrics"]["erasure_0_step_norm"] == pytest.approx(entry["step_norm"])
    rows = json.loads(compare("iau", f"sqlite:///{tmp_path / 'mlflow.db'}", fmt="json"))
    assert rows[0]["unlearning"] == "iau"
    for key in ("forget_acc", "retain_acc", "test_acc", "mia", "seconds"):
        assert rows[0][f"class=1@t0 {key}"] == pytest.approx(entry[key])
        assert rows[0][f"class=1@t0 oracle_{key}"] == pytest.approx(entry["oracle"][key])
