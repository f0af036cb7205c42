"""Settings the data or the file system cannot satisfy are refused before a run starts, as one
line ``fedcl: error: ...`` with exit status 2 and nothing written: partition settings checked
against every task's data, and the paths a run writes (its output folder, the MLflow store and
artifacts) checked for names, lengths, permissions and what is already there. The same checks
hold for the ServerApp under ``flwr run`` (:func:`fedcl.server_app.run_continual`).

``fedcl simulate`` runs in this process (``fedcl.cli.main``) with the simulation itself replaced
by a stub that fails the test: a case that got past the checks would otherwise start Ray.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcl import plugins
from fedcl.config import Config
from fedcl.data import datasets
from fedcl.data.datasets import ArrayDataset, Dataset
from fedcl.data.partition import partition_positions
from fedcl.errors import DataError, FedclError
from tests.test_cli_errors import _assert_one_line_error


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedcl simulate`` stops where the simulation would start."""
    from fedcl import simulation

    def started(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the run started: the checks let the case through")

    monkeypatch.setattr(simulation, "simulate", started)


def _simulate(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess[str]:
    from fedcl.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(["simulate", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["fedcl", "simulate", *args], code, captured.out,
                                       captured.err)


@pytest.fixture
def registries() -> Iterator[None]:
    """The dataset registry and the loadable datasets, restored after the test."""
    reg = plugins._DATASETS
    saved = (dict(reg.registered), dict(reg.functions), dict(reg.resolved))
    loadable = dict(datasets.DATASETS)
    yield
    reg.registered, reg.functions, reg.resolved = saved
    datasets.DATASETS.clear()
    datasets.DATASETS.update(loadable)


def _tiny_dataset(counts: list[int]) -> str:
    """Register a dataset of ``len(counts)`` classes with ``counts[c]`` training samples of
    class ``c`` (4x4 images); returns its name."""
    name = f"tiny_{uuid.uuid4().hex[:8]}"

    def split(per_class: list[int]) -> ArrayDataset:
        y = torch.as_tensor(np.repeat(np.arange(len(per_class)), per_class), dtype=torch.int64)
        return ArrayDataset(torch.zeros((len(y), 1, 4, 4), dtype=torch.uint8), y)

    def load(data_dir: str, download: bool) -> Dataset:
        return Dataset(name, split(counts), split([2] * len(counts)), len(counts), (0.5,),
                       (0.25,))

    plugins.register_dataset(name, "a tiny test dataset", num_classes=len(counts))(load)
    return name


# --- 1. partition settings the data cannot satisfy ------------------------------------------

PARTITION_CASES = [
    # more shards than samples: flwr-datasets' ShardPartitioner divides by a zero shard size
    pytest.param(["--partition", "shards", "--shards-per-client", "10000", "--clients", "4"],
                 ["task 0", "shards_per_client 10000", "4 clients"], id="shards-too-many"),
    # Dirichlet draws that leave a client without a sample, ten times over
    pytest.param(["--partition", "dirichlet", "--dirichlet-alpha", "1e-5", "--clients", "4"],
                 ["task 0", "dirichlet_alpha 1e-05", "4 clients"], id="dirichlet-tiny-alpha"),
    pytest.param(["--partition", "iid", "--clients", "13000"],
                 ["task 0", "12665 training samples across 13000 clients"],
                 id="iid-more-clients-than-samples"),
]


@pytest.mark.parametrize(("args", "phrases"), PARTITION_CASES)
def test_partition_the_data_cannot_satisfy(args: list[str], phrases: list[str],
                                           tmp_path: Path, no_run: None,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    result = _simulate(args, tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, "partition", tmp_path)
    for phrase in phrases:
        assert phrase in line, line


@pytest.mark.parametrize(("counts", "partition", "extra", "phrase"), [
    ([10, 10, 2, 1], "iid", [], "3 training samples across 4 clients"),
    ([10, 10, 2, 1], "dirichlet", [], "3 training samples across 4 clients"),
    ([10, 10, 3, 3], "shards", ["--shards-per-client", "2"], "shards_per_client 2"),
])
def test_partition_names_the_task_that_cannot_be_split(
        counts: list[int], partition: str, extra: list[str], phrase: str, tmp_path: Path,
        no_run: None,
        registries: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 0 holds 20 samples and splits; task 1 holds 3, fewer than the clients (or 6, fewer
    than the 8 shards of 4 clients): the error names task 1."""
    name = _tiny_dataset(counts)
    result = _simulate(["--dataset", name, "--tasks", "2", "--clients", "4", "--partition",
                        partition, "--model", "mlp", *extra], tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, "task 1", tmp_path)
    assert f"partition '{partition}'" in line and phrase in line, line


def test_a_dataset_loader_that_raises_is_one_line(tmp_path: Path, no_run: None,
                                                  registries: None,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"broken_{uuid.uuid4().hex[:8]}"

    def load(data_dir: str, download: bool) -> Dataset:
        raise RuntimeError("the archive is damaged")

    plugins.register_dataset(name, "a dataset that cannot be read", num_classes=2)(load)
    result = _simulate(["--dataset", name, "--tasks", "2"], tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, f"dataset '{name}'", tmp_path)
    assert "RuntimeError: the archive is damaged" in line


def test_data_that_cannot_be_cut_into_tasks_is_one_line(tmp_path: Path, no_run: None,
                                                        registries: None,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin dataset of 2-d images (no channel) cannot be permuted per task."""
    name = f"flat_{uuid.uuid4().hex[:8]}"

    def load(data_dir: str, download: bool) -> Dataset:
        split = ArrayDataset(torch.zeros((8, 4, 4), dtype=torch.uint8), torch.arange(8) % 2)
        return Dataset(name, split, split, 2, (0.5,), (0.25,))

    plugins.register_dataset(name, "images without a channel", num_classes=2)(load)
    result = _simulate(["--dataset", name, "--tasks", "2", "--scenario", "domain-il"],
                       tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, f"dataset '{name}' cannot be cut into 2 domain-il "
                                          "tasks", tmp_path)
    assert "ValueError" in line


LABELS = np.repeat(np.arange(4), 25)  # 100 samples, 25 per class


CLIENT_COUNTS = [1, 3, 4, 33, 50, 99, 100, 101, 10**12]
GRID = ([("iid", n, {}) for n in CLIENT_COUNTS]
        + [("dirichlet", n, {"alpha": a}) for n in CLIENT_COUNTS
           for a in (5e-324, 1e-5, 0.5, 1e300)]
        + [("shards", n, {"shards_per_partition": k}) for n in CLIENT_COUNTS
           for k in (1, 2, 25, 26, 34, 10**4, 2**70)])


@pytest.mark.parametrize(("method", "clients", "knobs"), GRID,
                         ids=[f"{m}-{n}-{'-'.join(map(str, k.values()))}" for m, n, k in GRID])
def test_partitioners_end_in_partitions_or_a_data_error(method: str, clients: int,
                                                        knobs: dict) -> None:
    """Whatever flwr-datasets' partitioners make of a setting, the result is a partition of
    the samples among the clients, none empty, or one DataError line naming the setting."""
    try:
        parts = partition_positions(LABELS, clients, method, seed=0, **knobs)
    except DataError as err:
        text = str(err)
        assert "\n" not in text and f"partition '{method}'" in text, text
        assert f"{clients} clients" in text, text
        return
    assert len(parts) == clients and all(len(p) >= 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) and joined.max() < len(LABELS)


def test_the_server_app_checks_every_task_partition_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``flwr run`` nothing else checked the partitions: the ServerApp refuses them
    before it makes the MLflow run or the output folder, or talks to the grid."""
    from fedcl.server_app import run_continual

    monkeypatch.chdir(tmp_path)
    config = Config(clients=4, tasks=5, partition="shards", shards_per_client=10000,
                    device="cpu")
    with pytest.raises(FedclError) as err:
        run_continual(object(), config)  # type: ignore[arg-type]
    assert isinstance(err.value, DataError) and err.value.exit_code == 2
    assert "task 0" in str(err.value) and "shards_per_client 10000" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []
