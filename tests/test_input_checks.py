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
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedcl import plugins
from fedcl.config import Config
from fedcl.data import datasets
from fedcl.data.datasets import ArrayDataset, Dataset
from fedcl.data.partition import partition_positions
from fedcl.errors import DataError, FedclError
from tests.test_cli_errors import _assert_one_line_error


class RunStarted(Exception):
    """The checks let the case through: the simulation would start here."""


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """``fedcl simulate`` stops where the simulation would start (raising RunStarted); the
    list holds the config it was given."""
    from fedcl import simulation

    given: list[Config] = []

    def started(config: Config, *args: object, **kwargs: object) -> dict:
        given.append(config)
        raise RunStarted

    monkeypatch.setattr(simulation, "simulate", started)
    return given


def _simulate(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess[str]:
    from fedcl.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    # the live display copies the terminal's descriptor, which captured output lacks
    monkeypatch.setattr(sys.stdout, "fileno", lambda: 1, raising=False)
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
                                           tmp_path: Path, no_run: list[Config],
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
        no_run: list[Config],
        registries: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 0 holds 20 samples and splits; task 1 holds 3, fewer than the clients (or 6, fewer
    than the 8 shards of 4 clients): the error names task 1."""
    name = _tiny_dataset(counts)
    result = _simulate(["--dataset", name, "--tasks", "2", "--clients", "4", "--partition",
                        partition, "--model", "mlp", *extra], tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, "task 1", tmp_path)
    assert f"partition '{partition}'" in line and phrase in line, line


def test_a_dataset_loader_that_raises_is_one_line(tmp_path: Path, no_run: list[Config],
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


def test_a_data_dir_name_too_long_is_one_line(tmp_path: Path, no_run: list[Config],
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result = _simulate(["--dataset", "fashion-mnist", "--data-dir", "d" * 300, "--no-download"],
                       tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, "dataset 'fashion-mnist' cannot be loaded from "
                                          "data_dir 'dddd", tmp_path)
    assert "File name too long" in line and len(line) < 600


def test_data_that_cannot_be_cut_into_tasks_is_one_line(tmp_path: Path, no_run: list[Config],
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


# --- 2. names that become paths ---------------------------------------------------------------

def _folders(root: Path) -> None:
    """What the path cases find in the working folder."""
    (root / "a-file").write_text("not a folder\n", encoding="utf-8")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's notes\n", encoding="utf-8")
    (root / "finished").mkdir()
    for name in ("summary.json", "checkpoint.pt", "config.toml", "flower.log"):
        (root / "finished" / name).write_text("{}\n", encoding="utf-8")
    (root / "stopped").mkdir()
    for name in ("checkpoint.pt", "flower.log"):
        (root / "stopped" / name).write_text("{}\n", encoding="utf-8")
    (root / "started").mkdir()  # fedcl simulate's own log, from a run that never began
    (root / "started" / "flower.log").write_text("", encoding="utf-8")
    (root / "empty").mkdir()


DEEP = "/".join(["d" * 200] * 25)  # 25 names of 200 bytes: over PATH_MAX

PATH_CASES = [
    # the run name as the output folder's name: outputs/<run name>
    pytest.param(["--run-name", "a" * 300], "is too long to name the output folder",
                 id="run-name-300"),
    pytest.param(["--run-name", "é" * 200], "400 bytes, and a file name takes at most 255",
                 id="run-name-400-bytes"),
    pytest.param(["--run-name", "a/b"], "cannot name the output folder", id="run-name-slash"),
    pytest.param(["--run-name", "../up"], "without '/'", id="run-name-parent"),
    pytest.param(["--run-name", ".."], "not '.' or '..'", id="run-name-dotdot"),
    pytest.param(["--run-name", "a\x00b"], "control character '\\x00'", id="run-name-nul"),
    pytest.param(["--run-name", "a\nb"], "control character '\\n'", id="run-name-newline"),
    pytest.param(["--run-name", "r" * 251, "--output", "out"],
                 "MLflow takes run names of at most 250", id="run-name-mlflow-limit"),
    # the output folder
    pytest.param(["--output", "x" * 256], "is 256 bytes long, and file names here take at most",
                 id="output-name-too-long"),
    pytest.param(["--output", DEEP], "is too long", id="output-path-too-long"),
    pytest.param(["--output", "x\x00y"], "contains a NUL character", id="output-nul"),
    pytest.param(["--output", "a-file"], "output folder a-file is a file, not a folder",
                 id="output-is-a-file"),
    pytest.param(["--output", "a-file/out"], "cannot be made: ", id="output-under-a-file"),
    pytest.param(["--output", "foreign"], "already holds files that are not a fedcl run's "
                 "(notes.txt)", id="output-foreign-folder"),
    pytest.param(["--output", "finished"], "holds a finished run (summary.json) that this "
                 "run would overwrite", id="output-finished-run"),
    pytest.param(["--output", "stopped"], "fedcl simulate --resume stopped",
                 id="output-stopped-run"),
    # the MLflow store and its artifacts
    pytest.param(["--tracking-uri", "sqlite:///a-file/m.db"],
                 "database a-file/m.db cannot be made: ", id="sqlite-under-a-file"),
    pytest.param(["--tracking-uri", "sqlite:///foreign"], "is a folder, not a file",
                 id="sqlite-is-a-folder"),
    pytest.param(["--tracking-uri", "sqlite:///foreign/notes.txt"],
                 "is not an SQLite database", id="sqlite-not-a-database"),
    pytest.param(["--tracking-uri", f"sqlite:///{'m' * 300}.db"], "is 303 bytes long",
                 id="sqlite-name-too-long"),
    pytest.param(["--tracking-uri", "a-file"], "folder a-file is a file, not a folder",
                 id="file-store-is-a-file"),
    pytest.param(["--tracking-uri", "file:a-file/store"], "cannot be made",
                 id="file-uri-under-a-file"),
    pytest.param(["--experiment", "e\tx"], "control character '\\t'", id="experiment-tab"),
    pytest.param(["--experiment", "e" * 501], "at most 500 characters", id="experiment-long"),
]


@pytest.mark.parametrize(("args", "phrase"), PATH_CASES)
def test_paths_the_run_cannot_write(args: list[str], phrase: str, tmp_path: Path,
                                    no_run: list[Config], capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _folders(tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = _simulate(args, tmp_path, capsys, monkeypatch)
    _assert_one_line_error(result, phrase, tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert not no_run


@pytest.mark.parametrize("args", [
    ["--output", "started"], ["--output", "empty"], ["--output", "new/deeper"],
    ["--run-name", "my run (v2), é"], ["--run-name", "r" * 250, "--output", "out"],
    ["--run-name", "a" * 250], ["--tracking-uri", "sqlite:///store/deeper/m.db"],
], ids=["flower-log-only", "empty", "new-nested", "spaces", "250-with-output", "250",
        "sqlite-in-new-folder"])
def test_paths_the_run_can_write_are_taken(args: list[str], tmp_path: Path,
                                           no_run: list[Config],
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _folders(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(RunStarted):
        _simulate(args, tmp_path, capsys, monkeypatch)
    # the run starts by claiming its output folder (its lock, fedcl.processes); nothing else
    # is made before the simulation starts: no MLflow store, no other file
    [config] = no_run
    lock = Path(tmp_path, config.output, "fedcl.lock")
    made = {p for p in tmp_path.rglob("*")} - before
    assert {p for p in made if p.is_file()} <= {lock}
    assert all(p == lock or p in lock.parents for p in made), made
    assert not any(tmp_path.joinpath(name).exists()
                   for name in ("store", "mlflow.db", "mlruns"))


def test_the_server_app_checks_names_and_paths_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``flwr run`` the config reaches the ServerApp without the CLI: it refuses the same
    names and paths before it builds anything or talks to the grid."""
    from fedcl.errors import ConfigError
    from fedcl.server_app import run_continual

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    for overrides, phrase in [({"run_name": "a" * 300}, "too long to name the output folder"),
                              ({"run_name": "a/b"}, "cannot name the output folder"),
                              ({"output": "a-file"}, "is a file, not a folder"),
                              ({"tracking_uri": "sqlite:///a-file/m.db"}, "cannot be made")]:
        config = Config.from_run_config({**Config(clients=2, tasks=2).to_run_config(),
                                         **{k.replace("_", "-"): v for k, v in overrides.items()}})
        with pytest.raises(ConfigError, match=phrase.replace("(", r"\(")):
            run_continual(object(), config)  # type: ignore[arg-type]
        assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_an_experiment_whose_artifacts_cannot_be_written_or_that_is_deleted(
        tmp_path: Path, no_run: list[Config], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing experiment keeps the artifacts folder it was made with; a deleted one
    cannot take runs. Both are refused before the run, not when it logs its artifacts at the
    end (or its first metric)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "m.db"
    uri = f"sqlite:///{db}"
    (tmp_path / "blocked").write_text("a file where a folder should be", encoding="utf-8")
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("kept", artifact_location=str(tmp_path / "blocked" / "art"))
    client.delete_experiment(client.create_experiment("gone"))
    work = tmp_path / "work"
    work.mkdir()
    result = _simulate(["--tracking-uri", uri, "--experiment", "kept"], work, capsys,
                       monkeypatch)
    _assert_one_line_error(result, "MLflow artifacts folder of experiment 'kept'", work)
    result = _simulate(["--tracking-uri", uri, "--experiment", "gone"], work, capsys,
                       monkeypatch)
    _assert_one_line_error(result, "MLflow experiment 'gone' is deleted", work)
    assert not no_run
    assert sorted(os.listdir(work)) == []


def test_a_file_where_mlflow_keeps_new_artifacts(tmp_path: Path, no_run: list[Config],
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A new experiment in a local database keeps its artifacts under ./mlruns."""
    (tmp_path / "mlruns").write_text("a file", encoding="utf-8")
    result = _simulate([], tmp_path, capsys, monkeypatch)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "fedcl: error: MLflow artifacts folder mlruns is a file, not a folder"]
    assert sorted(os.listdir(tmp_path)) == ["mlruns"] and not no_run


class _Unprivileged:
    """Run as user nobody (effective id) for the block, where the tests run as root: root
    writes into read-only folders, so only another user shows what a read-only folder is."""

    def __enter__(self) -> None:
        self.root = os.geteuid() == 0
        if self.root:
            os.seteuid(65534)

    def __exit__(self, *exc: object) -> None:
        if self.root:
            os.seteuid(0)


def test_read_only_folders_are_refused(no_run: list[Config],
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fedcl-read-only-"))
    try:
        base.chmod(0o755)
        ro, rw = base / "ro", base / "rw"
        (ro / "existing").mkdir(parents=True)
        rw.mkdir(mode=0o777)
        rw.chmod(0o777)
        (ro / "existing").chmod(0o555)
        ro.chmod(0o555)
        cases = [(["--output", str(ro / "out")], f"cannot be made: {ro} is not writable"),
                 (["--output", str(ro / "existing")], "is not writable"),
                 (["--tracking-uri", f"sqlite:///{ro}/m.db"], f"{ro} is not writable")]
        for args, phrase in cases:
            with _Unprivileged():
                result = _simulate(args, rw, capsys, monkeypatch)
            _assert_one_line_error(result, phrase, rw)
        assert not no_run and os.listdir(ro) == ["existing"] and os.listdir(rw) == []
    finally:
        ro.chmod(0o755)
        shutil.rmtree(base)


def test_resume_goes_on_in_the_folder_it_is_given(tmp_path: Path, no_run: list[Config],
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped run's folder, moved: ``--resume`` continues it there, not at the output its
    config was started with (a folder that holds a checkpoint, refused to a new run)."""
    from fedcl import checkpoint

    moved = tmp_path / "moved"
    moved.mkdir()
    config = Config(clients=3, tasks=2, device="cpu", output=str(tmp_path / "gone-away"))
    torch.save({"version": checkpoint.VERSION, "config": config.to_dict(),
                "mlflow_run_id": None}, moved / checkpoint.FILE)
    with pytest.raises(RunStarted):
        _simulate(["--resume", str(moved)], tmp_path, capsys, monkeypatch)
    assert no_run[0].output == str(moved)
    assert not (tmp_path / "gone-away").exists()


def test_fedcl_config_prints_a_config_whose_folders_are_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedcl config` prints a config (for `flwr run` on another machine, maybe): it checks
    names, not what this machine's folders hold."""
    from fedcl.cli import main

    _folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--output", "finished", "--tracking-uri", "sqlite:///a-file/x"]) == 0
    assert 'output = "finished"' in capsys.readouterr().out
    assert main(["config", "--run-name", "a/b"]) == 2
    assert "cannot name the output folder" in capsys.readouterr().err


PIECES = st.sampled_from(["a", "é", "/", ".", " ", "\x00", "\n", ":", "-", "~", "a-file",
                          "mlruns", "x" * 120])
NAMES = st.one_of(st.none(), st.lists(PIECES, max_size=8).map("".join),
                  st.tuples(st.sampled_from(["a", "é"]), st.integers(0, 600))
                  .map(lambda t: t[0] * t[1]),
                  st.integers(0, 30).map(lambda n: "/".join(["d" * 200] * n)))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_name=NAMES, output=NAMES, experiment=NAMES, store=NAMES)
def test_names_and_paths_are_taken_only_where_the_run_can_write(
        tmp_path: Path, run_name: str | None, output: str | None, experiment: str | None,
        store: str | None) -> None:
    """Any run name, output, experiment and sqlite path: setup_run refuses it in one line,
    having created nothing, or the run can make and write its output folder and database."""
    import tempfile

    from fedcl.run_setup import setup_run

    for path in (output, store):  # relative paths inside the test's folder only
        assume(path is None or not (path.startswith("/") or ".." in Path(path).parts))
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "a-file").write_text("x", encoding="utf-8")
    config = Config(run_name=run_name, output=output, experiment=experiment or "fedcl",
                    tracking_uri=f"sqlite:///{store}" if store else None)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        try:
            setup_run(config)
        except FedclError as err:
            assert "\n" not in str(err)
            assert os.listdir(work) == ["a-file"]
            return
        assert os.listdir(work) == ["a-file"]
        out = Path(output) if output else Path("outputs") / (run_name or "default")
        out.mkdir(parents=True, exist_ok=True)
        (out / ("f" * 40)).write_text("written", encoding="utf-8")
        db = Path(store or "mlflow.db")
        db.parent.mkdir(parents=True, exist_ok=True)
        with db.open("a", encoding="utf-8"):
            pass
        Path("mlruns").mkdir(exist_ok=True)
    finally:
        os.chdir(cwd)
