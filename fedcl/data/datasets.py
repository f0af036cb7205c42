"""Image datasets held in memory as uint8 tensors.

``mnist`` is bundled with fedcl (the four gzipped IDX files beside this module) and needs no
files. The others are read through torchvision from ``data_dir`` in torchvision's own layout:

============== =============================================================
name           files expected under ``data_dir``
============== =============================================================
mnist          none (bundled)
mnist-torchvision  ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
fashion-mnist  ``FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
cifar10        ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
cifar100       ``cifar-100-python/{train,test}``
============== =============================================================

A missing dataset is downloaded into ``data_dir`` when ``download`` is on and the network allows;
otherwise :class:`~fedcl.errors.DataError` names the path that was expected.

:data:`DATASETS` holds what this process can load by name: the built-ins above, and plugin
datasets that :mod:`fedcl.plugins` adds (:func:`add_dataset`) once it has resolved them.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fedcl.errors import DataError, FedclError
from fedcl.paths import shown

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ArrayDataset:
    """Images ``x`` (uint8, N x C x H x W) and integer labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A train/test pair with what models and normalisation need to know."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset fedcl loads by name (``dataset = NAME`` in a config): what is known of it
    before loading (``num_classes`` is what erasure requests and class splits are checked
    against), and ``load(data_dir, download) -> Dataset``."""

    name: str
    summary: str
    num_classes: int
    load: Callable[[str, bool], Dataset]


@dataclass(frozen=True)
class _Builtin:
    folder: str  # where torchvision keeps it under data_dir ("" for bundled)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    summary: str


_BUILTIN: dict[str, _Builtin] = {
    "mnist": _Builtin("", 10, (0.1307,), (0.3081,), "MNIST digits, bundled with fedcl"),
    "mnist-torchvision": _Builtin("MNIST/raw", 10, (0.1307,), (0.3081,),
                                  "MNIST digits from data_dir (torchvision)"),
    "fashion-mnist": _Builtin("FashionMNIST/raw", 10, (0.2860,), (0.3530,),
                              "Fashion-MNIST from data_dir (torchvision)"),
    "cifar10": _Builtin("cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465),
                        (0.2470, 0.2435, 0.2616), "CIFAR-10 from data_dir (torchvision)"),
    "cifar100": _Builtin("cifar-100-python", 100, (0.5071, 0.4865, 0.4409),
                         (0.2673, 0.2564, 0.2762), "CIFAR-100 from data_dir (torchvision)"),
}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file: images as N x H x W, labels as N."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path} is truncated: {len(raw) - offset} bytes for {expected} values")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_pair(folder: Path, prefix: str) -> ArrayDataset:
    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
        raise DataError(f"missing {folder / stem}[.gz]")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"), _IDX_IMAGES_MAGIC)
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"), _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {prefix} images but {labels.shape[0]} labels")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)))


def _bundled_mnist() -> tuple[ArrayDataset, ArrayDataset]:
    folder = Path(str(resources.files("fedcl.data") / "mnist"))
    return _idx_pair(folder, "train"), _idx_pair(folder, "t10k")


_IDX_NAMES = ("mnist-torchvision", "fashion-mnist")
_IDX_STEMS = tuple(f"{prefix}-{kind}-ubyte" for prefix in ("train", "t10k")
                   for kind in ("images-idx3", "labels-idx1"))


def _idx_files_present(folder: Path) -> bool:
    return all((folder / stem).is_file() or (folder / f"{stem}.gz").is_file()
               for stem in _IDX_STEMS)


def _torchvision(name: str, data_dir: Path, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    import torchvision

    classes = {
        "mnist-torchvision": lambda: torchvision.datasets.MNIST,
        "fashion-mnist": lambda: torchvision.datasets.FashionMNIST,
        "cifar10": lambda: _cifar_class("CIFAR10"),
        "cifar100": lambda: _cifar_class("CIFAR100"),
    }
    cls = classes[name]()
    expected = data_dir / _BUILTIN[name].folder
    if name in _IDX_NAMES and _idx_files_present(expected):
        # torchvision reads only the unpacked files; read them (or their .gz) directly.
        return _idx_pair(expected, "train"), _idx_pair(expected, "t10k")
    splits = []
    for train in (True, False):
        try:
            if download:
                previous = socket.getdefaulttimeout()
                socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
                try:
                    ds = cls(root=str(data_dir), train=train, download=True)
                finally:
                    socket.setdefaulttimeout(previous)
            else:
                ds = cls(root=str(data_dir), train=train, download=False)
        except DataError:
            raise
        except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
            how = "download failed" if download else "download is off"
            raise DataError(
                f"{name} not found: expected its files under {expected} ({how}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__})"
            ) from None
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        splits.append(ArrayDataset(x.contiguous().to(torch.uint8), y))
    return splits[0], splits[1]


def _cifar_class(base_name: str):  # type: ignore[no-untyped-def]
    import torchvision

    base = getattr(torchvision.datasets, base_name)

    class _Cifar(base):  # type: ignore[misc, valid-type]
        """torchvision's CIFAR reader that checks files exist rather than their md5, so that a
        reduced copy in the same format (as the tests write) loads too."""

        def _check_integrity(self) -> bool:
            root = Path(self.root) / self.base_folder
            names = [n for n, _ in self.train_list + self.test_list]
            return all((root / n).is_file() for n in names)

        def _load_meta(self) -> None:  # torchvision's checks the md5 of the meta file too
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"Dataset metadata file {path} not found")
            with open(path, "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    _Cifar.__name__ = f"_{base_name}"
    return _Cifar


def _load_builtin(name: str, data_dir: str, download: bool) -> Dataset:
    info = _BUILTIN[name]
    if name == "mnist":
        train, test = _bundled_mnist()
    else:
        train, test = _torchvision(name, Path(data_dir).expanduser(), download)
    return Dataset(name, train, test, info.num_classes, info.mean, info.std)


#: The datasets fedcl ships, by name.
BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    name: DatasetInfo(name, info.summary, info.num_classes,
                      functools.partial(_load_builtin, name))
    for name, info in _BUILTIN.items()
}
#: What this process loads by name: the built-ins, then plugin datasets (:func:`add_dataset`).
DATASETS: dict[str, DatasetInfo] = dict(BUILTIN_DATASETS)


def add_dataset(name: str, info: DatasetInfo) -> None:
    """Make ``info`` loadable as ``name`` in this process (:mod:`fedcl.plugins` calls this for a
    plugin dataset it resolved, under the name the config gave). Raises ``ValueError`` for the
    name of a built-in."""
    if name in BUILTIN_DATASETS:
        raise ValueError(f"dataset '{name}' is a built-in name")
    DATASETS[name] = info


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "data", download: bool = False) -> Dataset:
    """Load ``name`` (a key of :data:`DATASETS`) into memory; cached per process.

    Raises :class:`~fedcl.errors.DataError` for an unknown name, missing or unreadable files,
    a loader that raises (its error on one line), a loader that returns something else than a
    :class:`Dataset` of ``num_classes`` classes, or labels outside ``0..num_classes - 1``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    try:
        dataset = info.load(data_dir, download)
    except FedclError:
        raise
    except Exception as err:  # a plugin's loader on data it cannot read
        raise DataError(f"dataset '{name}' cannot be loaded from data_dir "
                        f"'{shown(data_dir)}': {type(err).__name__}: "
                        f"{shown(_first_line(err), 300)}") from None
    if not isinstance(dataset, Dataset):
        raise DataError(f"dataset '{name}': its loader returned {type(dataset).__name__}, "
                        "not a fedcl.data.datasets.Dataset")
    if dataset.num_classes != info.num_classes:
        raise DataError(f"dataset '{name}': loaded with {dataset.num_classes} classes, "
                        f"registered with {info.num_classes}")
    train, test = dataset.train, dataset.test
    found = int(max(train.y.max(), test.y.max())) + 1 if len(train) else 0
    if found > info.num_classes or (len(train) and int(train.y.min()) < 0):
        raise DataError(f"{name}: labels outside 0..{info.num_classes - 1}")
    return dataset


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "(no message)"


@functools.lru_cache(maxsize=32)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    c = len(mean)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1))


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait for the GPU. A copy from ordinary
    (pageable) CPU memory to a GPU synchronises the stream first, so one per training step (an
    index tensor, a replayed batch) costs a wait for every kernel queued before it, and with
    several client processes sharing a GPU that wait includes their time slices. A CPU tensor
    bound for CUDA is therefore copied from pinned memory, asynchronously (the pinned copy is
    kept alive by PyTorch until the transfer ends); anything else is ``t.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_float(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images to normalised float32 (per channel). The per-channel constants are made
    once per device: copying them to a GPU on every call would make the host wait for the
    GPU at every training step."""
    m, s = _normalisation(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    return (x.float().div_(255.0) - m) / s
