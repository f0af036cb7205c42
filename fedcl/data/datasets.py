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
"""

from __future__ import annotations

import functools
import gzip
import pickle
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fedcl.errors import DataError

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
    folder: str  # where torchvision keeps it under data_dir ("" for bundled)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("", 10, (0.1307,), (0.3081,)),
    "mnist-torchvision": DatasetInfo("MNIST/raw", 10, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo("FashionMNIST/raw", 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar-100-python", 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
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
    expected = data_dir / DATASETS[name].folder
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


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "data", download: bool = False) -> Dataset:
    """Load ``name`` (see :data:`DATASETS`) into memory; cached per process."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if name == "mnist":
        train, test = _bundled_mnist()
    else:
        train, test = _torchvision(name, Path(data_dir).expanduser(), download)
    found = int(max(train.y.max(), test.y.max())) + 1 if len(train) else 0
    if found > info.num_classes or int(train.y.min()) < 0:
        raise DataError(f"{name}: labels outside 0..{info.num_classes - 1}")
    return Dataset(name, train, test, info.num_classes, info.mean, info.std)


@functools.lru_cache(maxsize=32)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    c = len(mean)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1))


def to_float(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images to normalised float32 (per channel). The per-channel constants are made
    once per device: copying them to a GPU on every call would make the host wait for the
    GPU at every training step."""
    m, s = _normalisation(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    return (x.float().div_(255.0) - m) / s
