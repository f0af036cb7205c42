"""Split each task's training samples across clients with flwr-datasets partitioners.

Partitioners work on the task's labels only (a one-column in-memory ``datasets.Dataset`` with
the sample's position), so partitioning 60,000 images costs a few milliseconds and no copies of
the images. Every process that asks for the same (task, client) gets the same samples: the
partitioners are seeded from ``(seed, task)``.

* ``iid``: a seeded shuffle, then flwr-datasets' ``IidPartitioner`` (equal contiguous shares).
* ``dirichlet``: ``DirichletPartitioner`` on the label with concentration ``dirichlet_alpha``
  (every client keeps at least one sample of the task).
* ``shards``: ``ShardPartitioner``: sort by label, cut ``clients * shards_per_client`` shards and
  give each client ``shards_per_client`` of them (the FOT paper's non-IID split).

A setting that a task's data cannot satisfy (more clients than samples, more shards than
samples, Dirichlet draws that keep leaving a client empty) is one :class:`DataError` line naming
the setting and the task; :func:`check_partitions` tries every task before a run starts.

A task's partitions are also kept on disk (:func:`cache_dir`), keyed by the config fields that
decide them, the task's labels and the flwr-datasets version: a simulated client process reads
them there instead of importing flwr-datasets (~4 s of imports on a 2-core CPU: its
visualisation and metrics modules bring matplotlib, seaborn and scipy) and partitioning again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.errors import DataError

if TYPE_CHECKING:
    import datasets
    from flwr_datasets import partitioner as fp


def partition_positions(labels: np.ndarray, num_partitions: int, method: str, *, seed: int,
                        alpha: float = 0.5, shards_per_partition: int = 2) -> list[np.ndarray]:
    """Positions (into ``labels``) of every partition, in partition-id order, none empty.

    Whatever flwr-datasets' partitioner makes of a setting the labels cannot satisfy (more
    clients than samples, Dirichlet draws that leave a client empty, more shards than samples,
    which its ``ShardPartitioner`` meets with a ``ZeroDivisionError``) becomes one
    :class:`DataError` line naming the setting."""
    import datasets
    from flwr_datasets import partitioner as fp

    n = len(labels)
    if method not in ("iid", "dirichlet", "shards"):
        raise DataError(f"unknown partition '{method}'")
    setting = {"iid": "", "dirichlet": f" (dirichlet_alpha {alpha})",
               "shards": f" (shards_per_client {shards_per_partition})"}[method]
    failed = (f"partition '{method}'{setting} cannot split {n} training samples across "
              f"{num_partitions} clients")
    hint = {"iid": "; fewer clients may fit",
            "dirichlet": "; a larger dirichlet_alpha, fewer clients or partition = 'iid' may fit",
            "shards": "; fewer shards_per_client or fewer clients may fit"}[method]
    if num_partitions > n:
        raise DataError(f"{failed}{hint}")
    try:
        ds = datasets.Dataset.from_dict({"label": np.asarray(labels, dtype=np.int64),
                                         "pos": np.arange(n, dtype=np.int64)})
        if method == "iid":
            part: fp.Partitioner = fp.IidPartitioner(num_partitions)
            ds = ds.shuffle(seed=seed)
        elif method == "dirichlet":
            part = fp.DirichletPartitioner(num_partitions, partition_by="label", alpha=alpha,
                                           min_partition_size=1, seed=seed)
        else:
            part = fp.ShardPartitioner(num_partitions, partition_by="label",
                                       num_shards_per_partition=shards_per_partition, seed=seed)
        part.dataset = ds
        # flwr-datasets warns on every failed Dirichlet draw, and its shard partitioner uses
        # an Arrow sort option that pyarrow 25 deprecates: the outcome is what matters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
            if method == "iid":
                # IidPartitioner's partition i is the i-th contiguous shard of the shuffled
                # rows (Dataset.shard(contiguous=True): the first n % k shards one row
                # longer), which is np.array_split of the shuffled order: one split instead of
                # one load_partition (~1 ms) per client, so that 10^5 clients cost no more
                # than 10; tests/test_data.py pins the equality against the library
                order = ds.with_format("arrow")["pos"].to_numpy().astype(np.int64)
                parts = np.array_split(order, num_partitions)
            else:
                parts = _all_partitions(part, num_partitions)
    except Exception as err:  # the partitioner's own refusal, or its arithmetic failing
        reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
        if not isinstance(err, ValueError):
            reason = f"{type(err).__name__}: {reason}"
        reason = f"flwr-datasets: {reason}"
        shards = num_partitions * shards_per_partition
        if method == "shards" and shards > n:
            reason = (f"{num_partitions} x {shards_per_partition} = {shards} shards are more "
                      f"than the samples ({reason})")
        raise DataError(f"{failed}: {reason}{hint}") from None
    empty = next((i for i, p in enumerate(parts) if len(p) == 0), None)
    if empty is not None:
        raise DataError(f"{failed}: client {empty} would get no sample{hint}")
    return parts


def _all_partitions(part: fp.Partitioner, num_partitions: int) -> list[np.ndarray]:
    """Every partition's ``pos`` column, as ``part.load_partition(i)`` gives it.

    flwr-datasets' Dirichlet and shard partitioners assign every partition's rows at once, at
    the first ``load_partition``, into ``_partition_id_to_indices`` (row numbers into
    ``part.dataset``, which the shard partitioner has sorted by then); ``load_partition(i)`` is
    ``part.dataset.select(those rows)``, about 1.5 ms each. Reading the assignment once makes
    start-up cost nothing per client (10^5 clients: seconds, not minutes). Where that
    attribute is missing or of another shape (another flwr-datasets), each partition is
    loaded through the public API instead; tests/test_data.py pins the equality of both."""
    first = part.load_partition(0)  # the partitioner's checks and its one assignment
    assigned = getattr(part, "_partition_id_to_indices", None)
    if isinstance(assigned, dict) and sorted(assigned) == list(range(num_partitions)):
        pos = part.dataset.with_format("arrow")["pos"].to_numpy().astype(np.int64)
        parts = [pos[np.asarray(assigned[i], dtype=np.int64)] for i in range(num_partitions)]
        if np.array_equal(parts[0], _pos(first)):
            return parts
    # read the column as Arrow: Python rows would cost seconds per task
    return [_pos(part.load_partition(i)) for i in range(num_partitions)]


def _pos(partition: datasets.Dataset) -> np.ndarray:
    return partition.with_format("arrow")["pos"].to_numpy().astype(np.int64)


def cache_dir() -> Path:
    """Where fedcl keeps partitions: ``$FEDCL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedcl``
    (``~/.cache/fedcl``)."""
    if os.environ.get("FEDCL_CACHE_DIR"):
        return Path(os.environ["FEDCL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedcl"


def _cache_file(config_key: str, task: int, labels: np.ndarray) -> Path:
    digest = hashlib.sha256()
    for part in (config_key, str(task), metadata.version("flwr-datasets")):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return cache_dir() / f"partitions-{digest.hexdigest()[:32]}.npz"


def _read_cached(path: Path, num_partitions: int) -> list[np.ndarray] | None:
    """The partitions a cache file holds: ``positions`` (every partition's, one after the
    other) cut at ``offsets`` (``num_partitions + 1`` of them); None when the file is absent,
    damaged or of another shape."""
    try:
        with np.load(path) as stored:
            positions = stored["positions"].astype(np.int64)
            offsets = stored["offsets"].astype(np.int64)
    except (OSError, KeyError, ValueError, EOFError):
        return None  # absent, or written by something else: partition again
    if (offsets.shape != (num_partitions + 1,) or offsets[0] != 0
            or offsets[-1] != len(positions) or bool((np.diff(offsets) < 0).any())):
        return None
    return np.split(positions, offsets[1:-1])


def _write_cached(path: Path, parts: list[np.ndarray]) -> None:
    """Write atomically (processes may race to write the same file) as two arrays, whatever
    the number of partitions; a cache that cannot be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        positions = (np.concatenate(parts).astype(np.int64) if parts
                     else np.zeros(0, dtype=np.int64))
        np.savez(tmp, positions=positions, offsets=offsets)
        os.replace(tmp, path)
    except OSError:
        pass


@functools.lru_cache(maxsize=64)
def _task_partitions(config_key: str, task: int, data_dir: str) -> list[np.ndarray]:
    config = Config.from_json(config_key)
    scenario = build_scenario(config, data_dir)
    labels = scenario.dataset.train.y.numpy()[scenario.tasks[task].train_idx]
    path = _cache_file(config_key, task, labels)
    parts = _read_cached(path, config.clients)
    if parts is None:
        try:
            parts = partition_positions(labels, config.clients, config.partition,
                                        seed=config.seed * 1000 + task,
                                        alpha=config.dirichlet_alpha,
                                        shards_per_partition=config.shards_per_client)
        except DataError as err:
            raise DataError(f"task {task}: {err}") from None
        _write_cached(path, parts)
    return parts


def _partition_key(config: Config) -> str:
    """The config fields that decide partitions, as a cache key."""
    from dataclasses import replace

    base = Config()
    keep = replace(base, dataset=config.dataset, scenario=config.scenario, tasks=config.tasks,
                   domain_shift=config.domain_shift, task_order_seed=config.task_order_seed,
                   seed=config.seed, clients=config.clients, partition=config.partition,
                   dirichlet_alpha=config.dirichlet_alpha,
                   shards_per_client=config.shards_per_client, download=config.download)
    return keep.to_json()


def check_partitions(config: Config, data_dir: str | None = None) -> None:
    """Partition every task of the run as its clients will (and keep the partitions in the
    cache for them): a setting that some task's data cannot satisfy raises one
    :class:`DataError` line naming the setting and the task, before anything starts."""
    for task in range(config.tasks):
        client_positions(config, 0, task, data_dir)


def client_positions(config: Config, partition_id: int, task: int,
                     data_dir: str | None = None) -> np.ndarray:
    """Positions, within task ``task``'s training samples, that client ``partition_id`` holds."""
    if not 0 <= partition_id < config.clients:
        raise DataError(f"partition-id {partition_id} outside 0..{config.clients - 1}")
    return _task_partitions(_partition_key(config), task, data_dir or config.data_dir)[partition_id]
