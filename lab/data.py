"""Image data sets as uint8 tensors, and a loader that batches them on the training device.

MNIST, Fashion-MNIST and CIFAR-10 are read from their canonical files under a data root
(`data.root`, else `$LAB_DATA_DIR`, else the user cache directory). Missing files are
downloaded through torchvision when online; offline, one message says what to put where.
Small data sets live as tensors on the training device and are batched and augmented there:
no DataLoader workers, no per-sample Python (see benchmarks/mnist_cnn.py for the difference).
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lab.errors import LabError


@dataclass(frozen=True)
class Spec:
    folder: str  # torchvision's folder name under the root
    files: dict[str, tuple[str, ...]]  # split -> file names
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    torchvision_name: str


_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

DATASETS: dict[str, Spec] = {
    "mnist": Spec("MNIST", _IDX, (0.1307,), (0.3081,), tuple("0123456789"), "MNIST"),
    "fashion_mnist": Spec(
        "FashionMNIST", _IDX, (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot"), "FashionMNIST"),
    "cifar10": Spec(
        "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"), "CIFAR10"),
}


def default_root() -> Path:
    """`$LAB_DATA_DIR`, else `$XDG_CACHE_HOME/lab/data` (`~/.cache/lab/data`)."""
    if os.environ.get("LAB_DATA_DIR"):
        return Path(os.environ["LAB_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lab" / "data"


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    spec: Spec


def load(name: str, split: str, root: str | Path | None = None, download: bool = True) -> ImageData:
    """Load a whole split of a data set as uint8 tensors on the CPU."""
    if name not in DATASETS:
        raise LabError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    spec = DATASETS[name]
    root = Path(root).expanduser() if root else default_root()
    found = _find(spec, split, root)
    if found is None and download:
        _download(spec, root)
        found = _find(spec, split, root)
    if found is None:
        files = ", ".join(f + (".gz" if spec.files is _IDX else "") for f in spec.files[split])
        raise LabError(
            f"{name} ({split}) not found under {root} and not downloadable here. "
            f"Put {files} into {root / spec.folder / ('raw' if spec.files is _IDX else '')}, "
            "or point data.root= (or $LAB_DATA_DIR) at a folder that has them."
        )
    if spec.files is _IDX:
        images = torch.from_numpy(_read_idx(found[0])).unsqueeze(1)
        labels = torch.from_numpy(_read_idx(found[1]).astype(np.int64))
    else:
        images, labels = _read_cifar(found)
    if len(images) != len(labels):
        raise LabError(f"{name} ({split}) under {root}: {len(images)} images but {len(labels)} labels")
    return ImageData(images.contiguous(), labels, spec)


def _find(spec: Spec, split: str, root: Path) -> list[Path] | None:
    """The split's files, in torchvision's layout (`<root>/MNIST/raw`) or a flat one (`<root>/mnist`)."""
    flat = spec.folder.lower().replace("fashionmnist", "fashion-mnist")
    for folder in (root / spec.folder / "raw", root / spec.folder, root / flat):
        paths = []
        for f in spec.files[split]:
            hit = next((folder / (f + ext) for ext in ("", ".gz") if (folder / (f + ext)).is_file()), None)
            if hit is None:
                break
            paths.append(hit)
        else:
            return paths
    return None


def _download(spec: Spec, root: Path) -> None:
    import torchvision.datasets as tvd

    try:
        getattr(tvd, spec.torchvision_name)(str(root), train=True, download=True)
        getattr(tvd, spec.torchvision_name)(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - offline: the caller explains what to put where
        print(f"[lab] download of {spec.torchvision_name} failed: {str(e).splitlines()[0][:200]}", flush=True)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (16- or 8-byte big-endian header, then raw uint8), gzipped or not."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LabError(f"{path} is not an IDX uint8 file (bad magic number); replace it with the original")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise LabError(f"{path} is truncated: header says {dims}, found {data.size} bytes of data")
    return data.reshape(dims)


class _NumpyOnly(pickle.Unpickler):
    """Unpickles CIFAR's python batches while refusing every global but numpy's array rebuilders."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                batch = {k.decode() if isinstance(k, bytes) else k: v
                         for k, v in _NumpyOnly(f, encoding="latin1").load().items()}
            data, lab = batch["data"], batch.get("labels", batch.get("fine_labels"))
            images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(lab, dtype=np.int64))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, AttributeError) as e:
            raise LabError(f"{p} is not a CIFAR python batch ({e}); replace it with the original file") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# ---- batching on the device ----------------------------------------------------------------

class TensorLoader:
    """Batches of `(images, labels)` from tensors already on the training device.

    Shuffling is a per-epoch permutation from `(seed, epoch)`, so a resumed run sees the same
    batches; with `world_size > 1` each rank takes its own strided share (like
    DistributedSampler). `transform` turns a uint8 batch into the float input (normalise,
    augment) on the device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if batch_size < 1:
            raise LabError(f"batch size must be at least 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.transform = transform
        self.epoch = 0
        self.per_rank = len(images) // world_size
        if (self.per_rank < batch_size and drop_last) or self.per_rank == 0:
            raise LabError(f"{len(images)} samples over {world_size} rank(s) make no batch of {batch_size}; "
                           "lower data.batch_size or use more data")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.per_rank // self.batch_size
        return n if self.drop_last or self.per_rank % self.batch_size == 0 else n + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.images), generator=g)
        else:
            order = torch.arange(len(self.images))
        order = order[self.rank: self.per_rank * self.world_size: self.world_size].to(device)
        for i in range(len(self)):
            idx = order[i * self.batch_size: (i + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            yield (self.transform(x) if self.transform else x), self.labels.index_select(0, idx)


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str):
    """uint8 (N,C,H,W) -> float32 normalised, on the tensors' device."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
    return lambda x: (x.float() - m) / s
