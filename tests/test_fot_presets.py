"""FOT's Permuted-MNIST presets: the threshold paired with the split as the authors' code does
(its --iid flag: IID 0.94, non-IID 0.96) and the code's MLP of three hidden layers of 400, the
README's reading kept as *_2x400; the benchmark runs either set at the paper's 200 rounds per
task on a chosen device."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedcl.config import load_toml

ROOT = Path(__file__).resolve().parents[1]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fot_pmnist_bench",
                                                  ROOT / "benchmarks" / "fot_pmnist.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(("name", "partition", "eps", "model"), [
    ("fot_pmnist", "iid", 0.94, "mlp-fot"),
    ("fot_pmnist_noniid", "shards", 0.96, "mlp-fot"),
    ("fot_pmnist_2x400", "iid", 0.96, "mlp"),
    ("fot_pmnist_noniid_2x400", "shards", 0.94, "mlp"),
    ("fedavg_pmnist", "iid", None, "mlp-fot"),
    ("fedavg_pmnist_noniid", "shards", None, "mlp-fot"),
    ("fedavg_pmnist_2x400", "iid", None, "mlp"),
    ("fedavg_pmnist_noniid_2x400", "shards", None, "mlp"),
])
def test_presets(name: str, partition: str, eps: float | None, model: str) -> None:
    config = load_toml(ROOT / "simulations" / f"{name}.toml")
    assert (config.partition, config.model, config.strategy_params.get("eps")) == (
        partition, model, eps)
    assert (config.clients, config.fraction_train, config.tasks, config.rounds_per_task) == (
        125, 0.512, 10, 200)


def test_the_benchmark_runs_both_sets_at_200_rounds_on_a_chosen_device() -> None:
    bench = _bench()
    args = bench.parse_args(["--presets", "both", "--device", "cuda", "--fot-eps", "0.95"])
    runs = bench.commands(args)
    assert [name for name, _, _ in runs] == bench.PRESETS["both"] and len(runs) == 8
    for name, out, cmd in runs:
        flags = dict(zip(cmd[4::2], cmd[5::2], strict=False))
        assert flags["--rounds-per-task"] == "200" and flags["--device"] == "cuda"
        assert flags["--cohort-size"] == "16" and flags["--client-gpus"] == "0.25"
        assert cmd[cmd.index("--config") + 1].endswith(f"simulations/{name}.toml")
        # the threshold override reaches FOT's runs only (FedAvg has no eps)
        assert ("eps=0.95" in cmd) == name.startswith("fot")
        assert out.name == name
    cpu = bench.commands(bench.parse_args(["--only", "fot_pmnist", "--device", "cpu"]))
    assert len(cpu) == 1 and "--cohort-size" not in cpu[0][2]
    assert bench.PAPER["fot_pmnist_noniid_2x400"] == (85.21, 1.97)
