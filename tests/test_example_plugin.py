"""The example plugin package (examples/fedcl-server-momentum), as its guide
(docs/writing-a-method.md) builds it: its maths by hand, its one-line errors, and the package
installed by pip and run through the real ``fedcl`` command, found by its entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl import api, plugins, protocol
from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.run_setup import setup_run
from fedcl.strategy import RoundInfo
from fedcl.training import RoundContext
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "fedcl-server-momentum"
REFERENCE = "fedcl_server_momentum:build_server_momentum"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The example's module, imported from its source folder (no install)."""
    monkeypatch.syspath_prepend(str(PACKAGE))
    import fedcl_server_momentum

    return fedcl_server_momentum


class _TwoNodes:
    def get_node_ids(self) -> list[int]:
        return [10, 11]


def _reply(pid: int, value: float, n: int) -> Message:
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}),
                      dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    return Message(RecordDict({
        protocol.ARRAYS: ArrayRecord({"w": torch.full((2,), value)}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: 1.0}),
        protocol.CLIENT_INFO: ConfigRecord({protocol.PARTITION_ID: pid,
                                            protocol.NUM_PARTITIONS: 2})}), reply_to=request)


def test_the_api_names_what_it_exports() -> None:
    assert all(hasattr(api, name) for name in api.__all__)
    assert {"ContinualStrategy", "LocalTrainer", "register_strategy", "Capabilities"} <= set(
        api.__all__)


def test_momentum_changes_the_aggregate_as_computed_by_hand(example, flower_identity: None
                                                            ) -> None:
    """Two rounds, two clients (30 and 10 samples), server_lr 1, beta 0.5, from w = 0:
    round 1: mean (30*1 + 10*3)/40 = 1.5, v = 0 - 1.5 = -1.5, w = 0 + 1.5 = 1.5;
    round 2: mean (30*2 + 10*6)/40 = 3, v = 0.5*(-1.5) + (1.5 - 3) = -2.25, w = 3.75.
    Every number is a binary fraction: exact in float32."""
    config = Config(strategy=REFERENCE, strategy_params={"server_lr": 1.0, "beta": 0.5})
    strategy = plugins.build_strategy(config)
    arrays = ArrayRecord({"w": torch.zeros(2)})
    for round_, (a, b), expected in ((1, (1.0, 3.0), 1.5), (2, (2.0, 6.0), 3.75)):
        strategy.configure_round(RoundInfo(0, round_, 2, round_), arrays, ConfigRecord(),
                                 _TwoNodes())
        arrays, _ = strategy.aggregate_train(round_, [_reply(0, a, 30), _reply(1, b, 10)])
        assert arrays.to_torch_state_dict()["w"].tolist() == [expected, expected]
    assert strategy.velocity["w"].tolist() == [-2.25, -2.25]
    # sqrt(2 * 2.25^2) in float64: a rounding of 2.25 * sqrt(2)
    assert strategy.state_metrics()["server_momentum_velocity_norm"] == pytest.approx(
        2.25 * 2 ** 0.5, rel=1e-15)
    # beta 0 and server_lr 1: FedAvg's mean, whatever came before
    assert example.momentum_step({"w": torch.tensor([4.0])}, {"w": torch.tensor([1.0])},
                                 {"w": torch.tensor([9.0])}, 0.0, 1.0)["w"].tolist() == [1.0]


def test_the_anchor_is_sent_after_a_task_and_pulls_clients_back(example,
                                                                 flower_identity: None) -> None:
    config = Config(strategy=REFERENCE, strategy_params={"anchor": 0.5})
    strategy = plugins.build_strategy(config)
    first = strategy.configure_round(RoundInfo(0, 1, 1, 1), ArrayRecord(), ConfigRecord(),
                                     _TwoNodes())
    assert example.ANCHOR not in first[0].content  # task 0: nothing to anchor to
    end = ArrayRecord({"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])})
    strategy.end_task(0, end)
    later = strategy.configure_round(RoundInfo(1, 1, 1, 2), end, ConfigRecord(), _TwoNodes())
    assert later[0].content[example.ANCHOR].to_torch_state_dict()["b"].tolist() == [1.0]
    # the client's term: (0.5/2) * ((1 + 4) + 4) = 2.25 for w = [1, 2], b = [3]
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    model.b = torch.nn.Parameter(torch.tensor([3.0]))
    trainer = plugins.build_trainer(config)
    ctx = RoundContext(config=config, model=model, x=None, y=None, head=None, task=1, round=2,
                       partition_id=0, device=torch.device("cpu"), mean=(0.0,), std=(1.0,),
                       message=later[0].content)
    trainer.before_training(ctx, model)
    assert float(trainer.regularizer(ctx, list(model.parameters()), [])) == 2.25
    ctx.message = first[0].content  # no anchor yet: no term
    trainer.before_training(ctx, model)
    assert trainer.regularizer(ctx, list(model.parameters()), []) is None


@pytest.mark.parametrize(("params", "message"), [
    ({"beta": 1.0}, "server-momentum beta must be in [0, 1), got 1.0"),
    ({"server_lr": 0}, "server-momentum server_lr must be > 0, got 0.0"),
    ({"anchor": -1}, "server-momentum anchor must be >= 0, got -1.0"),
    ({"beta": "high"}, "parameter 'beta' of strategy 'fedcl_server_momentum:build_server_"
                       "momentum' must be float, got 'high'"),
    ({"momentum": 0.9}, "unknown parameter 'momentum' for strategy 'fedcl_server_momentum:"
                        "build_server_momentum' (its parameters: server_lr, beta, anchor, "
                        "reset_at_task)"),
])
def test_bad_parameters_are_one_line(example, params: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        setup_run(Config(strategy=REFERENCE, strategy_params=params))
    assert str(err.value) == message


def test_cohorts_are_refused_as_the_trainer_declares(example) -> None:
    with pytest.raises(ConfigError, match="cohort_size > 1 cannot train strategy"):
        setup_run(Config(strategy=REFERENCE, cohort_size=2))


def test_the_guide_shows_the_package_as_it_is() -> None:
    """Every Python block of the guide that defines something is a verbatim part of the
    example's source, so the guide cannot drift from code that runs."""
    guide = (ROOT / "docs" / "writing-a-method.md").read_text()
    source = (PACKAGE / "fedcl_server_momentum" / "__init__.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    defining = [b for b in blocks
                if re.search(r"^(class|def|@register_strategy|from|import) ", b, re.M)]
    assert len(defining) >= 5
    assert any("from fedcl.api import" in b and "from flwr.app import" in b for b in defining)
    for block in defining:
        assert block.strip() in source, block[:200]


@pytest.mark.e2e
def test_installed_package_is_listed_and_runs(tmp_path: Path, ray_env: dict) -> None:  # noqa: F811
    """pip installs the example (to a folder on PYTHONPATH, as a user's environment holds it);
    the real command finds it by its entry point, lists its parameters and runs it."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(PACKAGE)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert (site / "fedcl_server_momentum" / "__init__.py").is_file()
    env = {**ray_env, "PYTHONPATH": f"{site}:{ROOT}"}
    listed = run_fedcl("strategies", cwd=tmp_path, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"\nserver-momentum +FedAvg with server momentum", listed.stdout)
    assert "\n  beta: float = 0.9  Momentum: v = beta * v + (w - w_avg)" in listed.stdout
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, "--strategy", "server-momentum", "--strategy-param",
                    "beta=0.5", "--strategy-param", "anchor=0.1", "--output", str(out),
                    "--experiment", "plugin", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "server-momentum"
    assert summary["config"]["strategy_params"] == {"beta": 0.5, "anchor": 0.1}
    matrix = summary["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    assert matrix[0][0] > 0.5  # task 0 learnt (two classes, one round)
    norms = [s["server_momentum_velocity_norm"] for s in summary["strategy_state"]]
    assert len(norms) == 2 and all(n > 0 for n in norms)
