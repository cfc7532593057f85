"""Image data sets as uint8 tensors, and a loader that batches them on the training device.

MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 are read from their canonical files under a data
root (`data.root`, else `$LAB_DATA_DIR`, else the user cache directory). Missing files are
downloaded through torchvision when online; offline, one message says what to put where.
Small data sets live as tensors on the training device and are batched and augmented there:
no DataLoader workers, no per-sample Python (see benchmarks/mnist_cnn.py for the difference).

Any folder of images loads too (`data=folder data.path=DIR`), in torchvision's ImageFolder
layout or without classes:

    DIR/cat/001.jpg, DIR/dog/xyz.png, ...          classes = sub-folders, sorted (label 0, 1, ...)
    DIR/001.jpg, DIR/002.png, ...                   no sub-folders: one class, every label 0
    DIR/train/<class>/..., DIR/test/<class>/...     explicit splits (`val/` is taken for `test/`)

Without `train/` and `test/` sub-folders, a fixed `test_fraction` of the images (default 0.1,
0 = every image is in `train`) is held out as the test split. Images are decoded with Pillow,
converted to `channels` (3 = RGB, 1 = grey) and, with `image_size=S`, resized so the shorter
side is S and centre-cropped to SxS (torchvision's `Resize(S)` + `CenterCrop(S)`); without it
all images must share one size. A folder's `normalizer` maps pixels to [-1, 1] (mean = std = 0.5).

Tasks call one function with their `data:` config, which works for every data set:

    train = data.from_config(cfg.data, "train")    # ImageData: images (N,C,H,W) uint8, labels, spec
    loader = data.TensorLoader(train.images.to(device), train.labels.to(device), batch_size,
                               transform=data.normalizer(train.spec.mean, train.spec.std, device))

`data.image_size` and `data.channels` work for the built-in sets as well (e.g. Fashion-MNIST
resized to 32x32 and repeated to 3 channels for an RGB network).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
    "cifar100": Spec(
        "cifar-100-python", {"train": ("train",), "test": ("test",)},
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), tuple(
            "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
            "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
            "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
            "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
            "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
            "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
            "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle "
            "wardrobe whale willow_tree wolf woman worm".split()), "CIFAR100"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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


def from_config(d: Mapping[str, Any], split: str) -> ImageData:
    """A split of the data set a `data:` config describes (conf/data/*.yaml), resized and converted as asked.

    `subset` (train) and `test_subset` (test) keep the first N images, before any resizing.
    """
    limit = d.get("subset" if split == "train" else "test_subset")
    if d.get("name") == "folder":
        out = load_folder(d.get("path"), split, d.get("image_size"), d.get("channels") or 3,
                          d.get("test_fraction", 0.1), limit)
    else:
        out = load(d["name"], split, d.get("root"), d.get("download", True))
        out = conform(ImageData(out.images[:limit], out.labels[:limit], out.spec), d.get("image_size"),
                      d.get("channels"))
    if d.get("mean") is not None or d.get("std") is not None:  # e.g. ImageNet statistics for pretrained weights
        c = out.images.shape[1]
        mean, std = tuple(d.get("mean") or out.spec.mean), tuple(d.get("std") or out.spec.std)
        if len(mean) != c or len(std) != c:
            raise LabError(f"data.mean={list(mean)} and data.std={list(std)} need {c} values (one per channel)")
        out = ImageData(out.images, out.labels, dataclasses.replace(out.spec, mean=mean, std=std))
    return out


def conform(data: ImageData, image_size: int | None = None, channels: int | None = None) -> ImageData:
    """Resize to `image_size` (bilinear, antialiased) and repeat grey to 3 channels or average RGB to grey."""
    images, spec = data.images, data.spec
    if image_size and tuple(images.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8)
    c = images.shape[1]
    if channels and channels != c:
        if (c, channels) == (1, 3):
            images = images.repeat(1, 3, 1, 1)
            spec = dataclasses.replace(spec, mean=spec.mean * 3, std=spec.std * 3)
        elif (c, channels) == (3, 1):
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
            spec = dataclasses.replace(spec, mean=(sum(spec.mean) / 3,), std=(sum(spec.std) / 3,))
        else:
            raise LabError(f"data.channels={channels} from {c}-channel images is not supported; use 1 or 3")
    return ImageData(images.contiguous(), data.labels, spec)


def load(name: str, split: str, root: str | Path | None = None, download: bool = True) -> ImageData:
    """Load a whole split of a data set as uint8 tensors on the CPU."""
    if name == "folder":
        raise LabError("data=folder reads data.path, not a data root: call data.from_config or data.load_folder")
    if name not in DATASETS:
        raise LabError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, folder")
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


def load_folder(path: str | Path | None, split: str = "train", image_size: int | None = None, channels: int = 3,
                test_fraction: float = 0.1, limit: int | None = None) -> ImageData:
    """A split of an image folder (layouts in the module docstring) as uint8 tensors on the CPU; `limit`: first N."""
    if not path:
        raise LabError("data=folder needs data.path=DIR (a folder of images, or of class sub-folders)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise LabError(f"data.path={path} is not a folder; point it at a folder of images")
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    if channels not in (1, 3):
        raise LabError(f"data.channels={channels} is not supported for folders; use 3 (RGB) or 1 (grey)")
    splits = {p.name: p for p in root.iterdir() if p.is_dir() and p.name in ("train", "test", "val")}
    if "train" in splits and ({"test", "val"} & set(splits)):
        files, classes = _scan(splits.get(split) or splits["val"])
        if split == "test":  # labels follow the train split's classes
            train_classes = _scan(splits["train"])[1]
            unknown = sorted(set(classes) - set(train_classes))
            if unknown:
                raise LabError(f"{root}: test classes {unknown} are not in train/; make the class folders match")
            files = [(f, train_classes.index(classes[y])) for f, y in files]
            classes = train_classes
    else:
        files, classes = _scan(root)
        if not 0 <= test_fraction < 1:
            raise LabError(f"data.test_fraction={test_fraction} must be in [0, 1)")
        n_test = round(len(files) * test_fraction)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
        held = set(order[:n_test])
        if split == "test" and not held:
            raise LabError(f"{root} has no test images: set data.test_fraction>0 or add train/ and test/ folders")
        files = [f for i, f in enumerate(files) if (i in held) == (split == "test")]
    files = files[:limit]
    images = [_read_image(f, image_size, channels) for f, _ in files]
    sizes = sorted({tuple(im.shape) for im in images})
    if len(sizes) > 1:
        raise LabError(f"{root}: images have different sizes ({sizes[0][:2]} and {sizes[-1][:2]}, ...); "
                       "set data.image_size=S to resize them all to SxS")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    spec = Spec(str(root), {}, (0.5,) * channels, (0.5,) * channels, tuple(classes), "ImageFolder")
    return ImageData(x, torch.tensor([y for _, y in files], dtype=torch.int64), spec)


def _scan(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) pairs: class sub-folders (searched recursively), or the folder's own images as class 0."""
    def images_in(d: Path, recursive: bool) -> list[Path]:
        return sorted(p for p in (d.rglob("*") if recursive else d.iterdir())
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = [d.name for d in sorted(folder.iterdir()) if d.is_dir() and images_in(d, True)]
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in images_in(folder / c, True)]
    else:
        files, classes = [(f, 0) for f in images_in(folder, False)], [folder.name]
    if not files:
        raise LabError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; point data.path at an image folder")
    return files, classes


def _read_image(path: Path, image_size: int | None, channels: int) -> np.ndarray:
    """One image as HWC uint8: RGB or grey, shorter side resized to image_size and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError) as e:
        raise LabError(f"cannot read image {path} ({e}); remove or replace it") from None
    if image_size:
        w, h = im.size
        scale = image_size / min(w, h)
        im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                       Image.Resampling.BILINEAR)
        left, top = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


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
