"""Tests for fedcl.data: the bundled MNIST, IDX reading, torchvision-backed datasets from files
written here in each dataset's own on-disk format, scenarios and client partitions."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from fedcl.config import Config
from fedcl.data.datasets import Dataset, _normalisation, load_dataset, read_idx, to_float
from fedcl.data.partition import client_positions, partition_positions
from fedcl.data.scenarios import make_scenario
from fedcl.errors import ConfigError, DataError

IDX_IMAGES, IDX_LABELS = 2051, 2049

# MNIST's published per-class counts of the 60,000 training images.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist")


@pytest.fixture
def fresh_cache():  # type: ignore[no-untyped-def]
    """load_dataset is lru_cached per (name, data_dir, download): start and end empty."""
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


# --- writers of each dataset's on-disk format ----------------------------------------------------

def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """IDX: big-endian magic (0x08 = uint8 in byte 3, ndim in byte 4), big-endian dims, data."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def _write_idx_dataset(raw_dir: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gzipped train (12 images) and t10k (5 images) IDX files as torchvision keeps them."""
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz", images, IDX_IMAGES)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", labels, IDX_LABELS)
        written[prefix] = (images, labels)
    return written


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as in the original CIFAR pickles: read
    back with ``encoding="latin1"`` (as torchvision does) the keys become ``"data"``, etc."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(obj)


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """N x 3072 uint8 rows: the 1024 red, then green, then blue values, each row-major."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    rng = np.random.default_rng(10)
    folder = root / "cifar-10-batches-py"
    datas, labels = [], []
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        data = _cifar_images(rng, 3)
        lab = [(3 * i + j) % 10 for j in range(3)]
        _write_py2_pickle(folder / name, {b"batch_label": name.encode(), b"labels": lab,
                                          b"data": data,
                                          b"filenames": [b"img%d.png" % j for j in range(3)]})
        datas.append(data)
        labels.append(lab)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    _write_py2_pickle(folder / "batches.meta",
                      {b"label_names": names, b"num_cases_per_batch": 3, b"num_vis": 3072})
    return datas, labels


def _write_cifar100(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(100)
    folder = root / "cifar-100-python"
    written = {}
    for name, fine in (("train", [0, 7, 42, 99, 13, 58]), ("test", [99, 1, 64])):
        data = _cifar_images(rng, len(fine))
        _write_py2_pickle(folder / name, {b"filenames": [b"x.png"] * len(fine),
                                          b"batch_label": name.encode(),
                                          b"fine_labels": fine,
                                          b"coarse_labels": [f // 5 for f in fine],
                                          b"data": data})
        written[name] = (data, fine)
    _write_py2_pickle(folder / "meta", {
        b"fine_label_names": [b"class%d" % i for i in range(100)],
        b"coarse_label_names": [b"super%d" % i for i in range(20)],
    })
    return written


# --- bundled MNIST ---------------------------------------------------------------------------

def test_bundled_mnist_sizes_and_labels(mnist: Dataset) -> None:
    assert mnist.name == "mnist"
    assert len(mnist.train) == 60000 and len(mnist.test) == 10000
    assert tuple(mnist.train.x.shape) == (60000, 1, 28, 28)
    assert tuple(mnist.test.x.shape) == (10000, 1, 28, 28)
    assert mnist.train.x.dtype == torch.uint8 and mnist.test.x.dtype == torch.uint8
    assert mnist.train.y.dtype == torch.int64
    assert mnist.input_shape == (1, 28, 28)
    assert mnist.num_classes == 10
    assert sorted(mnist.train.y.unique().tolist()) == list(range(10))
    assert sorted(mnist.test.y.unique().tolist()) == list(range(10))
    assert int(mnist.train.y[0]) == 5  # MNIST's well-known first training label
    assert int(mnist.test.y[0]) == 7  # ... and first test label
    counts = torch.bincount(mnist.train.y, minlength=10).tolist()
    assert counts == MNIST_TRAIN_COUNTS
    assert sum(counts) == 60000
    assert torch.bincount(mnist.test.y, minlength=10).sum().item() == 10000


def test_bundled_mnist_pixel_statistics(mnist: Dataset) -> None:
    mean = mnist.train.x.sum(dtype=torch.int64).item() / (60000 * 784 * 255)
    assert mean == pytest.approx(0.1307, abs=1e-3)
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    assert int(mnist.train.x.min()) == 0 and int(mnist.train.x.max()) == 255


def test_load_dataset_is_cached(mnist: Dataset) -> None:
    assert load_dataset("mnist") is load_dataset("mnist")


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'; choose one of mnist, "):
        load_dataset("svhn")


# --- read_idx ----------------------------------------------------------------------------------

def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "img.gz", images, IDX_IMAGES)
    _write_idx(tmp_path / "lab", np.array([4, 2], dtype=np.uint8), IDX_LABELS)
    np.testing.assert_array_equal(read_idx(tmp_path / "img.gz", IDX_IMAGES), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab", IDX_LABELS), [4, 2])


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    _write_idx(path, np.zeros(5, dtype=np.uint8), IDX_LABELS)
    with pytest.raises(DataError) as err:
        read_idx(path, IDX_IMAGES)  # a labels file where images were expected
    assert str(err.value) == f"{path} is not an IDX file (bad magic number)"

    junk = tmp_path / "junk.gz"
    with gzip.open(junk, "wb") as fh:
        fh.write(b"PK\x03\x04 not an idx file at all")
    with pytest.raises(DataError, match=r"junk\.gz is not an IDX file \(bad magic number\)"):
        read_idx(junk, IDX_IMAGES)

    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(short, IDX_LABELS)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte"
    _write_idx(path, np.zeros((10, 28, 28), dtype=np.uint8), IDX_IMAGES)
    path.write_bytes(path.read_bytes()[:16 + 100])  # header + 100 of 7840 pixels
    with pytest.raises(DataError) as err:
        read_idx(path, IDX_IMAGES)
    assert str(err.value) == f"{path} is truncated: 100 bytes for 7840 values"


def test_read_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte.gz"
    rng = np.random.default_rng(0)
    _write_idx(path, rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), IDX_IMAGES)
    path.write_bytes(path.read_bytes()[:200])  # the gzip stream ends early
    with pytest.raises(DataError, match=rf"cannot read {path}"):
        read_idx(path, IDX_IMAGES)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"cannot read {tmp_path / 'nope'}"):
        read_idx(tmp_path / "nope", IDX_LABELS)


# --- torchvision-backed datasets from files in their own format --------------------------------

@pytest.mark.parametrize(("name", "folder", "seed"), [
    ("fashion-mnist", "FashionMNIST/raw", 1),
    ("mnist-torchvision", "MNIST/raw", 2),
])
def test_idx_datasets_from_files(tmp_path: Path, fresh_cache: None, name: str, folder: str,
                                 seed: int) -> None:
    written = _write_idx_dataset(tmp_path / folder, seed)
    ds = load_dataset(name, str(tmp_path), False)
    assert ds.name == name and ds.num_classes == 10
    assert tuple(ds.train.x.shape) == (12, 1, 28, 28)
    assert tuple(ds.test.x.shape) == (5, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28)
    for split, prefix in ((ds.train, "train"), (ds.test, "t10k")):
        images, labels = written[prefix]
        np.testing.assert_array_equal(split.x[:, 0].numpy(), images)
        assert split.y.tolist() == labels.tolist()
    assert ds.train.y.tolist() == [0, 3, 6, 9, 2, 5, 8, 1, 4, 7, 0, 3]
    assert int(ds.train.x[4, 0, 7, 19]) == int(written["train"][0][4, 7, 19])


def test_idx_dataset_unpacked_files(tmp_path: Path, fresh_cache: None) -> None:
    """torchvision's own layout after a download: the unpacked files beside the .gz ones."""
    raw = tmp_path / "FashionMNIST" / "raw"
    written = _write_idx_dataset(raw, 3)
    for gz in raw.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    ds = load_dataset("fashion-mnist", str(tmp_path), False)
    np.testing.assert_array_equal(ds.test.x[:, 0].numpy(), written["t10k"][0])
    assert ds.test.y.tolist() == written["t10k"][1].tolist()
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)


def test_cifar10_from_files(tmp_path: Path, fresh_cache: None) -> None:
    datas, labels = _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path), False)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert tuple(ds.train.x.shape) == (15, 3, 32, 32)
    assert tuple(ds.test.x.shape) == (3, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.is_contiguous()
    train_rows = np.concatenate(datas[:5])
    np.testing.assert_array_equal(ds.train.x.reshape(15, 3072).numpy(), train_rows)
    np.testing.assert_array_equal(ds.test.x.reshape(3, 3072).numpy(), datas[5])
    # channel 0 of training image 4 (batch 2, row 1) is the first 1024 values of that row
    np.testing.assert_array_equal(ds.train.x[4, 0].numpy(), datas[1][1, :1024].reshape(32, 32))
    np.testing.assert_array_equal(ds.train.x[4, 2].numpy(), datas[1][1, 2048:].reshape(32, 32))
    assert int(ds.train.x[4, 1, 5, 9]) == int(datas[1][1, 1024 + 5 * 32 + 9])
    assert ds.train.y.tolist() == [label for batch in labels[:5] for label in batch]
    assert ds.train.y.tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert ds.test.y.tolist() == [5, 6, 7]


def test_cifar100_from_files(tmp_path: Path, fresh_cache: None) -> None:
    written = _write_cifar100(tmp_path)
    ds = load_dataset("cifar100", str(tmp_path), False)
    assert ds.num_classes == 100 and ds.input_shape == (3, 32, 32)
    assert tuple(ds.train.x.shape) == (6, 3, 32, 32)
    assert tuple(ds.test.x.shape) == (3, 3, 32, 32)
    assert ds.train.y.tolist() == [0, 7, 42, 99, 13, 58]  # fine labels, not coarse
    assert ds.test.y.tolist() == [99, 1, 64]
    data, _ = written["test"]
    np.testing.assert_array_equal(ds.test.x[2, 0].numpy(), data[2, :1024].reshape(32, 32))
    np.testing.assert_array_equal(ds.test.x.reshape(3, 3072).numpy(), data)
    np.testing.assert_array_equal(ds.train.x.reshape(6, 3072).numpy(), written["train"][0])


def test_missing_cifar10(tmp_path: Path, fresh_cache: None) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path), False)
    message = str(err.value)
    assert message.startswith("cifar10 not found: expected its files under ")
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "download is off" in message


def test_missing_cifar100_meta(tmp_path: Path, fresh_cache: None) -> None:
    _write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match="cifar100 not found") as err:
        load_dataset("cifar100", str(tmp_path), False)
    assert str(tmp_path / "cifar-100-python") in str(err.value)


def test_missing_fashion_mnist(tmp_path: Path, fresh_cache: None) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", str(tmp_path), False)
    message = str(err.value)
    assert message.startswith("fashion-mnist not found: expected its files under ")
    assert str(tmp_path / "FashionMNIST" / "raw") in message


def test_partial_fashion_mnist(tmp_path: Path, fresh_cache: None) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_idx_dataset(raw, 4)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", str(tmp_path), False)
    assert str(raw) in str(err.value)


def test_labels_outside_range(tmp_path: Path, fresh_cache: None) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_dataset(raw, 5)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8),
               IDX_LABELS)
    with pytest.raises(DataError, match=r"mnist-torchvision: labels outside 0\.\.9"):
        load_dataset("mnist-torchvision", str(tmp_path), False)


# --- scenarios ---------------------------------------------------------------------------------

def test_class_il_split(mnist: Dataset) -> None:
    s = make_scenario(mnist, "class-il", 5)
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [t.index for t in s.tasks] == [0, 1, 2, 3, 4]
    assert s.num_heads == 1 and s.classes_per_head == 10
    assert s.head_for(3) is None and not s.task_id_at_test
    train_y, test_y = mnist.train.y.numpy(), mnist.test.y.numpy()
    t0 = s.tasks[0]
    assert len(t0.train_idx) == 5923 + 6742 == int(np.isin(train_y, (0, 1)).sum())
    np.testing.assert_array_equal(t0.train_idx, np.flatnonzero(train_y <= 1))
    assert set(train_y[t0.train_idx].tolist()) == {0, 1}
    assert len(t0.test_idx) == int(np.isin(test_y, (0, 1)).sum()) == 980 + 1135
    assert sum(len(t.train_idx) for t in s.tasks) == 60000
    assert sorted(np.concatenate([t.train_idx for t in s.tasks]).tolist()) == list(range(60000))
    # class-IL keeps the original labels
    x, y = s.train_data(1, np.arange(4))
    assert tuple(x.shape) == (4, 1, 28, 28)
    assert y.tolist() == mnist.train.y[s.tasks[1].train_idx[:4]].tolist()
    assert set(y.tolist()) <= {2, 3}


def test_class_order_seed(mnist: Dataset) -> None:
    s = make_scenario(mnist, "class-il", 5, task_order_seed=3)
    again = make_scenario(mnist, "class-il", 5, task_order_seed=3)
    classes = [t.classes for t in s.tasks]
    assert classes == [t.classes for t in again.tasks]
    assert classes != [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert classes == [tuple(int(c) for c in pair) for pair in
                       np.random.default_rng(3).permutation(10).reshape(5, 2)]
    assert sorted(c for pair in classes for c in pair) == list(range(10))
    assert all(len(pair) == 2 for pair in classes)
    other = make_scenario(mnist, "class-il", 5, task_order_seed=4)
    assert [t.classes for t in other.tasks] != classes
    labels = mnist.train.y.numpy()[s.tasks[0].train_idx]
    assert set(labels.tolist()) == set(classes[0])


def test_task_il_targets(mnist: Dataset) -> None:
    s = make_scenario(mnist, "task-il", 5)
    assert s.num_heads == 5 and s.classes_per_head == 2
    assert s.task_id_at_test and s.head_for(2) == 2
    assert s.tasks[2].classes == (4, 5)
    raw = mnist.train.y[s.tasks[2].train_idx]
    _, y = s.train_data(2)
    assert len(y) == 5842 + 5421
    assert set(y.tolist()) == {0, 1}
    assert torch.equal(y == 0, raw == 4) and torch.equal(y == 1, raw == 5)
    assert int((y == 1).sum()) == 5421
    assert s.targets(2, torch.tensor([4, 5, 5, 4])).tolist() == [0, 1, 1, 0]
    _, y_test = s.test_data(4)
    assert torch.equal(y_test, mnist.test.y[s.tasks[4].test_idx] - 8)


def test_task_il_with_order_seed(mnist: Dataset) -> None:
    s = make_scenario(mnist, "task-il", 5, task_order_seed=3)
    a, b = s.tasks[0].classes
    assert s.targets(0, torch.tensor([a, b])).tolist() == [0, 1]


@pytest.mark.parametrize("kind", ["class-il", "task-il"])
def test_uneven_split_refused(mnist: Dataset, kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_scenario(mnist, kind, 3)
    assert str(err.value) == ("3 tasks do not split 10 classes evenly; "
                              "choose a number of tasks that divides 10")


def test_unknown_scenario_and_shift(mnist: Dataset) -> None:
    with pytest.raises(ConfigError, match="unknown scenario 'class_il'"):
        make_scenario(mnist, "class_il", 5)
    with pytest.raises(ConfigError, match="unknown domain_shift 'blur'"):
        make_scenario(mnist, "domain-il", 2, domain_shift="blur")


def test_domain_il_permute(mnist: Dataset) -> None:
    s = make_scenario(mnist, "domain-il", 3, domain_shift="permute", seed=0)
    assert s.num_heads == 1 and s.classes_per_head == 10
    assert all(t.classes == tuple(range(10)) for t in s.tasks)
    assert all(len(t.train_idx) == 60000 and len(t.test_idx) == 10000 for t in s.tasks)
    assert s.tasks[0].permutation is None
    pos = np.arange(20)
    raw = mnist.train.x[:20]
    x0, y0 = s.train_data(0, pos)
    assert torch.equal(x0, raw) and torch.equal(y0, mnist.train.y[:20])
    x1, y1 = s.train_data(1, pos)
    assert torch.equal(y1, y0)
    assert x1.dtype == torch.uint8 and tuple(x1.shape) == (20, 1, 28, 28)
    assert not torch.equal(x1, raw)
    flat_raw, flat1 = raw.reshape(20, 784), x1.reshape(20, 784)
    assert torch.equal(flat1.sort(dim=1).values, flat_raw.sort(dim=1).values)
    perm = s.tasks[1].permutation
    assert sorted(perm.tolist()) == list(range(784)) and not np.array_equal(perm, np.arange(784))
    assert torch.equal(flat1, flat_raw[:, torch.as_tensor(perm)])
    assert not np.array_equal(s.tasks[2].permutation, perm)

    same = make_scenario(mnist, "domain-il", 3, domain_shift="permute", seed=0)
    np.testing.assert_array_equal(same.tasks[1].permutation, perm)
    assert torch.equal(same.train_data(1, pos)[0], x1)
    other = make_scenario(mnist, "domain-il", 3, domain_shift="permute", seed=1)
    assert not np.array_equal(other.tasks[1].permutation, perm)
    assert not torch.equal(other.train_data(1, pos)[0], x1)


def test_domain_il_rotate(mnist: Dataset) -> None:
    s = make_scenario(mnist, "domain-il", 3, domain_shift="rotate")
    assert [t.rotation for t in s.tasks] == [0.0, 60.0, 120.0]
    assert all(t.permutation is None for t in s.tasks)
    raw = mnist.test.x[:10]
    x0, y0 = s.test_data(0, max_samples=0)
    assert torch.equal(x0[:10], raw) and torch.equal(y0, mnist.test.y)
    x1 = s.shift(1, raw)
    assert x1.dtype == torch.uint8 and tuple(x1.shape) == (10, 1, 28, 28)
    assert not torch.equal(x1, raw)
    # a quarter turn maps the pixel grid onto itself: exactly torch.rot90 (counter-clockwise)
    quarter = make_scenario(mnist, "domain-il", 2, domain_shift="rotate")
    assert [t.rotation for t in quarter.tasks] == [0.0, 90.0]
    assert torch.equal(quarter.shift(1, raw), torch.rot90(raw, 1, dims=(2, 3)))
    shuffled = make_scenario(mnist, "domain-il", 3, domain_shift="rotate", task_order_seed=3)
    assert sorted(t.rotation for t in shuffled.tasks) == [0.0, 60.0, 120.0]


def test_test_data_subset(mnist: Dataset) -> None:
    s = make_scenario(mnist, "class-il", 5)
    x, y = s.test_data(1, max_samples=100)
    x2, y2 = s.test_data(1, max_samples=100)
    assert tuple(x.shape) == (100, 1, 28, 28) and len(y) == 100
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert set(y.tolist()) <= {2, 3}
    task_images = {bytes(img) for img in
                   mnist.test.x[s.tasks[1].test_idx].reshape(-1, 784).numpy()}
    assert len(task_images) > 1900
    assert all(bytes(img) in task_images for img in x.reshape(100, 784).numpy())
    # a fixed seeded subset: not simply the first 100, and another seed picks others
    assert not torch.equal(x, mnist.test.x[s.tasks[1].test_idx[:100]])
    x3, _ = s.test_data(1, max_samples=100, seed=1)
    assert not torch.equal(x, x3)
    # max_samples of 0 or beyond the split: the whole split
    assert len(s.test_data(1)[1]) == len(s.tasks[1].test_idx) == 1032 + 1010
    assert len(s.test_data(1, max_samples=10**6)[1]) == 2042


# --- partitions --------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def _assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a position is in two partitions"
    return joined


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partitions_cover_all(method: str) -> None:
    parts = partition_positions(LABELS, 7, method, seed=0, alpha=0.5)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and len(p) >= 1 for p in parts)
    joined = _assert_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(1000))


def test_shards_partition() -> None:
    labels = np.repeat(np.arange(10), 20)  # label-sorted: 10 shards of 20 are single-label
    parts = partition_positions(labels, 5, "shards", seed=0, shards_per_partition=2)
    assert len(parts) == 5
    _assert_disjoint(parts)
    assert [len(p) for p in parts] == [40] * 5
    for p in parts:
        assert len(set(labels[p].tolist())) <= 2
    one = partition_positions(labels, 10, "shards", seed=0, shards_per_partition=1)
    assert all(len(set(labels[p].tolist())) == 1 for p in one)


@pytest.mark.parametrize(("method", "n"), [("iid", 5), ("dirichlet", 5), ("shards", 5)])
def test_partitions_seeded(method: str, n: int) -> None:
    a = partition_positions(LABELS, n, method, seed=11, alpha=0.5, shards_per_partition=2)
    b = partition_positions(LABELS, n, method, seed=11, alpha=0.5, shards_per_partition=2)
    c = partition_positions(LABELS, n, method, seed=12, alpha=0.5, shards_per_partition=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes() -> None:
    parts = partition_positions(LABELS, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= 1
    assert sizes == [143] * 6 + [142]
    # shuffled: a client's share is not one contiguous block of labels
    assert len(set(LABELS[parts[0]].tolist())) == 10


@pytest.mark.parametrize(("rows", "clients"), [(1000, 7), (103, 10), (50, 50), (60, 1)])
def test_iid_partitions_are_flwr_datasets_iid_partitioner(rows: int, clients: int) -> None:
    """fedcl takes all IID partitions in one split; each equals what flwr-datasets'
    IidPartitioner loads for that partition id from the same shuffled rows."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels = np.arange(rows) % 10
    ours = partition_positions(labels, clients, "iid", seed=3)
    ds = datasets.Dataset.from_dict({"label": labels, "pos": np.arange(rows)}).shuffle(seed=3)
    theirs = IidPartitioner(clients)
    theirs.dataset = ds
    assert len(ours) == clients
    for pid in range(clients):
        expected = np.asarray(theirs.load_partition(pid)["pos"], dtype=np.int64)
        np.testing.assert_array_equal(ours[pid], expected)
        assert ours[pid].dtype == np.int64


def _mean_max_share(parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_alpha_skew() -> None:
    skewed = partition_positions(LABELS, 10, "dirichlet", seed=1, alpha=0.1)
    even = partition_positions(LABELS, 10, "dirichlet", seed=1, alpha=100.0)
    skew_share, even_share = _mean_max_share(skewed), _mean_max_share(even)
    assert skew_share > 0.4  # a client is dominated by one label
    assert even_share < 0.2  # close to the 0.1 of a uniform mix
    assert skew_share > 2 * even_share


def test_too_many_partitions() -> None:
    with pytest.raises(DataError) as err:
        partition_positions(np.arange(5) % 2, 6, "iid", seed=0)
    assert str(err.value) == ("partition 'iid' cannot split 5 training samples across 6 "
                              "clients; fewer clients may fit")


def test_unknown_partition() -> None:
    with pytest.raises(DataError, match="unknown partition 'random'"):
        partition_positions(LABELS, 2, "random", seed=0)


def test_client_positions(mnist: Dataset) -> None:
    config = Config(clients=3, tasks=2)  # mnist, class-il, dirichlet
    task0 = make_scenario(mnist, "class-il", 2).tasks[0]
    assert task0.classes == (0, 1, 2, 3, 4)
    parts = [client_positions(config, pid, 0) for pid in range(3)]
    joined = _assert_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(len(task0.train_idx)))
    assert all(len(p) >= 1 for p in parts)
    assert 0 <= joined.min() and joined.max() < len(task0.train_idx) == 30596
    labels = mnist.train.y.numpy()[task0.train_idx[parts[1]]]
    assert set(labels.tolist()) <= set(task0.classes)
    np.testing.assert_array_equal(client_positions(config, 1, 0), parts[1])  # same every call
    with pytest.raises(DataError) as err:
        client_positions(config, 3, 0)
    assert str(err.value) == "partition-id 3 outside 0..2"
    with pytest.raises(DataError, match=r"partition-id -1 outside 0\.\.2"):
        client_positions(config, -1, 0)


def test_partitions_are_kept_on_disk(mnist: Dataset, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's partitions are written once under FEDCL_CACHE_DIR and read back by the next
    process (here: after the in-process cache is cleared) without partitioning again; another
    seed has its own file; a damaged file is replaced by partitioning again."""
    from fedcl.data import partition

    monkeypatch.setenv("FEDCL_CACHE_DIR", str(tmp_path / "cache"))
    config = Config(clients=3, tasks=2)
    partition._task_partitions.cache_clear()
    first = [client_positions(config, pid, 0) for pid in range(3)]
    files = sorted((tmp_path / "cache").glob("partitions-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as stored:  # every partition in one array, cut at the offsets
        assert sorted(stored.files) == ["offsets", "positions"]
        sizes = [len(p) for p in first]
        assert stored["offsets"].tolist() == [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        np.testing.assert_array_equal(stored["positions"], np.concatenate(first))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("partitioned again")

    partition._task_partitions.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(partition, "partition_positions", refuse)
        for pid in range(3):
            np.testing.assert_array_equal(client_positions(config, pid, 0), first[pid])
    client_positions(Config(clients=3, tasks=2, seed=1), 0, 0)
    assert len(list((tmp_path / "cache").glob("partitions-*.npz"))) == 2
    files[0].write_bytes(b"not an npz file")
    partition._task_partitions.cache_clear()
    np.testing.assert_array_equal(client_positions(config, 2, 0), first[2])
    with np.load(files[0]) as stored:
        np.testing.assert_array_equal(stored["positions"][-len(first[2]):], first[2])
    partition._task_partitions.cache_clear()


def test_to_float_normalises_per_channel_with_constants_made_once() -> None:
    """(x / 255 - mean) / std per channel, by hand; the per-channel constants are built once
    per (mean, std, device), not per call (a per-call copy to a GPU waits for the GPU)."""
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # 1 image, 2 channels, 1x2
    out = to_float(x, (0.5, 0.2), (0.25, 0.1))
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 2.0]]]])
    torch.testing.assert_close(out, expected)
    misses = _normalisation.cache_info().misses
    to_float(x, [0.5, 0.2], [0.25, 0.1])  # lists name the same constants
    assert _normalisation.cache_info().misses == misses


@pytest.mark.parametrize(("method", "rows", "clients", "extra"), [
    ("dirichlet", 1000, 7, {"alpha": 0.5}), ("dirichlet", 300, 30, {"alpha": 5.0}),
    ("dirichlet", 60, 1, {"alpha": 0.1}), ("shards", 1000, 7, {"shards_per_partition": 2}),
    ("shards", 103, 10, {"shards_per_partition": 3}),
    ("shards", 50, 25, {"shards_per_partition": 2}),
])
def test_dirichlet_and_shard_partitions_are_flwr_datasets_in_one_read(
        method: str, rows: int, clients: int, extra: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedcl reads every Dirichlet or shard partition from the partitioner's one assignment
    (one ``load_partition`` call, not one per client); each equals what flwr-datasets'
    partitioner loads for that partition id, and so does the public-API path taken when the
    assignment cannot be read."""
    import datasets
    from flwr_datasets import partitioner as fp

    labels = (np.arange(rows) * 7) % 10

    def theirs() -> list[np.ndarray]:
        ds = datasets.Dataset.from_dict({"label": labels, "pos": np.arange(rows)})
        part = (fp.DirichletPartitioner(clients, partition_by="label", alpha=extra["alpha"],
                                        min_partition_size=1, seed=11)
                if method == "dirichlet" else
                fp.ShardPartitioner(clients, partition_by="label", seed=11,
                                    num_shards_per_partition=extra["shards_per_partition"]))
        part.dataset = ds
        return [np.asarray(part.load_partition(i)["pos"], dtype=np.int64)
                for i in range(clients)]

    expected = theirs()
    cls = fp.DirichletPartitioner if method == "dirichlet" else fp.ShardPartitioner
    loads: list[int] = []
    original = cls.load_partition

    def counted(self, partition_id: int):  # type: ignore[no-untyped-def]
        loads.append(partition_id)
        return original(self, partition_id)

    monkeypatch.setattr(cls, "load_partition", counted)
    ours = partition_positions(labels, clients, method, seed=11, **extra)
    assert loads == [0]
    assert len(ours) == clients
    for mine, want in zip(ours, expected, strict=True):
        np.testing.assert_array_equal(mine, want)
        assert mine.dtype == np.int64
    # an flwr-datasets without the attribute: one load_partition per client, the same result
    def hiding(self, partition_id: int):  # type: ignore[no-untyped-def]
        if "stash" in self.__dict__:
            self._partition_id_to_indices = self.__dict__.pop("stash")
        loaded = original(self, partition_id)
        self.__dict__["stash"] = self.__dict__.pop("_partition_id_to_indices")
        loads.append(partition_id)
        return loaded

    loads.clear()
    monkeypatch.setattr(cls, "load_partition", hiding)
    fallback = partition_positions(labels, clients, method, seed=11, **extra)
    assert loads == [0, *range(clients)]
    for mine, want in zip(fallback, expected, strict=True):
        np.testing.assert_array_equal(mine, want)
