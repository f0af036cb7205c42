"""The throughput benchmark's arithmetic: the CNN's FLOPs per round, and the pfl way seeing the
workload fedcl sees (the same samples per client, the same parameter count). The pfl check runs
only where the ``bench-pfl`` extra is installed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcl.config import load_toml
from fedcl.data.partition import client_positions
from fedcl.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _throughput():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("throughput_bench",
                                                  ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_cnn_training_flops_per_round() -> None:
    bench = _throughput()
    model = build_model("cnn", (3, 32, 32), 10, 1)
    # conv 3->32 at 32x32, conv 32->64 at 16x16, linear 64*8*8->256, head 256->10
    macs = 32 * 32 * 32 * 3 * 9 + 16 * 16 * 64 * 32 * 9 + 4096 * 256 + 256 * 10
    assert bench.forward_macs(model, (3, 32, 32)) == macs
    assert bench.training_flops_per_round(model, (3, 32, 32), 50 * 500) == 50 * 500 * 6 * macs


def test_pfl_way_sees_the_fedcl_workload(tmp_path: Path) -> None:
    if importlib.util.find_spec("pfl") is None:  # not imported here: pfl sets a start method
        pytest.skip("pfl-research not installed (the bench-pfl extra)")
    bench = _throughput()
    clients, samples = 3, 24
    bench.write_synthetic_cifar10(tmp_path / "data", clients * samples, 100)
    args = argparse.Namespace(rounds_per_task=1, clients=clients, device="cpu",
                              cpus_per_client=1.0, gpus_per_client=0.0)
    config = tmp_path / "workload.toml"
    config.write_text(bench.workload_toml(args, tmp_path / "data"))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pfl_way.py"), "--config",
                          str(config), "--check"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = load_toml(config)
    for task in range(cfg.tasks):
        assert seen["samples_per_client"][str(task)] == [
            len(client_positions(cfg, c, task)) for c in range(clients)] == [samples] * clients
    assert seen["user_samples"] == [samples] * clients  # the datasets pfl trains on
    fedcl_model = build_model("cnn", (3, 32, 32), 10, 1)
    assert seen["num_parameters"] == sum(p.numel() for p in fedcl_model.parameters())
