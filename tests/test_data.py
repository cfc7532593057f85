"""Data sets from their on-disk formats, the on-device loader, augmentation."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA
from lab import augment, data
from lab.errors import LabError


def test_full_mnist_and_fashion_mnist_load() -> None:
    for name in ("mnist", "fashion_mnist"):
        train, test = data.load(name, "train", DATA, download=False), data.load(name, "test", DATA, download=False)
        assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
        assert test.images.shape == (10000, 1, 28, 28) and set(test.labels.unique().tolist()) == set(range(10))
    assert not torch.equal(data.load("mnist", "test", DATA).images[:10],
                           data.load("fashion_mnist", "test", DATA).images[:10])


def test_missing_files_offline_say_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"t10k-images-idx3-ubyte\.gz.*MNIST/raw"):
        data.load("mnist", "test", tmp_path, download=False)
    with pytest.raises(LabError, match="data_batch_1.*cifar-10-batches-py"):
        data.load("cifar10", "train", tmp_path, download=True)  # no network here: the download fails


def test_idx_files_in_torchvision_layout_and_bad_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (raw / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([4, 2, 7]))
    split = data.load("mnist", "test", tmp_path, download=False)
    assert torch.equal(split.images[:, 0], torch.from_numpy(images)) and split.labels.tolist() == [4, 2, 7]
    (raw / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes()[:100])
    with pytest.raises(LabError, match="truncated"):
        data.load("mnist", "test", tmp_path, download=False)


def _cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
    with open(path, "wb") as f:  # CIFAR's python format: a pickled dict with bytes keys
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": images, b"filenames": []}, f, protocol=2)
    return images, labels


def test_cifar10_reads_the_real_on_disk_format(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = [_cifar_batch(folder / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    _cifar_batch(folder / "test_batch", 3, 9)
    train = data.load("cifar10", "train", tmp_path, download=False)
    assert train.images.shape == (20, 3, 32, 32) and train.labels.tolist() == sum((p[1] for p in parts), [])
    assert torch.equal(train.images[0], torch.from_numpy(parts[0][0][0].reshape(3, 32, 32)))
    assert data.load("cifar10", "test", tmp_path, download=False).images.shape == (3, 3, 32, 32)


def test_cifar_loader_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 2, i)

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(LabError, match="not a CIFAR python batch"):
        data.load("cifar10", "train", tmp_path, download=False)
    assert not Path("pwned").exists()


def test_tensor_loader_shards_ranks_and_repeats_epochs() -> None:
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    y = torch.arange(100)
    seen = []
    for rank in range(2):
        loader = data.TensorLoader(x, y, 10, seed=3, rank=rank, world_size=2)
        assert len(loader) == 5
        loader.set_epoch(1)
        seen.append(torch.cat([b[1] for b in loader]))
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist()) and len(set(torch.cat(seen).tolist())) == 100
    loader = data.TensorLoader(x, y, 10, seed=3)
    loader.set_epoch(1)
    first = torch.cat([b[1] for b in loader])
    loader.set_epoch(2)
    assert not torch.equal(first, torch.cat([b[1] for b in loader]))
    loader.set_epoch(1)
    assert torch.equal(first, torch.cat([b[1] for b in loader]))  # an epoch's order is reproducible
    assert all(torch.equal(bx.view(-1), by.to(torch.uint8)) for bx, by in loader)  # images stay with labels
    with pytest.raises(LabError, match="batch"):
        data.TensorLoader(x[:5], y[:5], 10)


def test_augmentation_keeps_shapes_and_content() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(augment.random_crop(x, 0), x)
    out = augment.augmenter(crop_padding=2, hflip=0.5)(x)
    assert out.shape == x.shape
    flipped = augment.random_hflip(x, p=1.0)
    assert torch.equal(flipped, x.flip(-1))
    torch.manual_seed(0)
    crops = augment.random_crop(x, 1)
    for i in range(2):  # each crop is a window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        assert any(torch.equal(crops[i], padded[:, a:a + 8, b:b + 8]) for a in range(3) for b in range(3))


def test_cifar100_reads_the_real_on_disk_format(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        images, fine = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()
        with open(folder / split, "wb") as f:  # CIFAR-100's python format: fine and coarse labels
            pickle.dump({b"filenames": [], b"batch_label": b"x", b"fine_labels": fine,
                         b"coarse_labels": [y // 5 for y in fine], b"data": images}, f, protocol=2)
    test = data.load("cifar100", "test", tmp_path, download=False)
    assert test.images.shape == (4, 3, 32, 32) and test.labels.tolist() == fine
    assert torch.equal(test.images[1], torch.from_numpy(images[1].reshape(3, 32, 32)))
    assert len(test.spec.classes) == 100 and test.spec.classes[0] == "apple" and test.spec.classes[-1] == "worm"


def _png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


def test_image_folder_with_classes_splits_and_resize(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / "cats" / f"{i}.png", (50, 40), 10 + i)
        _png(tmp_path / "dogs" / "deep" / f"{i}.jpg", (30, 30), 200, mode="L")  # grey, nested: still RGB, found
    cfg = {"name": "folder", "path": str(tmp_path), "image_size": 16, "test_fraction": 0.2}
    train, test = data.from_config(cfg, "train"), data.from_config(cfg, "test")
    assert train.spec.classes == ("cats", "dogs") and train.images.shape == (8, 3, 16, 16)
    assert test.images.shape == (2, 3, 16, 16) and len(train.labels) + len(test.labels) == 10
    assert sorted(train.labels.tolist() + test.labels.tolist()) == [0] * 5 + [1] * 5
    assert all(bool((im >= 200).all()) == (y == 1) for im, y in zip(train.images, train.labels))  # labels follow files
    assert train.spec.mean == (0.5, 0.5, 0.5)
    grey = data.from_config({**cfg, "channels": 1, "test_fraction": 0}, "train")
    assert grey.images.shape == (10, 1, 16, 16)
    with pytest.raises(LabError, match="different sizes.*data.image_size"):
        data.from_config({**cfg, "image_size": None}, "train")
    with pytest.raises(LabError, match="no test images"):
        data.from_config({**cfg, "test_fraction": 0}, "test")
    with pytest.raises(LabError, match="data.path"):
        data.from_config({"name": "folder", "path": str(tmp_path / "nope")}, "train")


def test_image_folder_without_classes_and_with_split_folders(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.png", (20, 20), i)
    flat = data.load_folder(tmp_path / "flat", "train", test_fraction=0)
    assert flat.images.shape == (4, 3, 20, 20) and flat.labels.tolist() == [0, 0, 0, 0]
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / "split" / split / c / f"{i}.png", (8, 8), 100 if c == "b" else 0)
    test = data.load_folder(tmp_path / "split", "test")
    assert test.images.shape == (4, 3, 8, 8) and test.labels.tolist() == [0, 0, 1, 1]
    assert data.load_folder(tmp_path / "split", "train").images.shape[0] == 6


def test_resize_and_channels_for_builtin_sets() -> None:
    cfg = {"name": "fashion_mnist", "root": str(DATA), "download": False, "image_size": 32, "channels": 3,
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    test = data.from_config(cfg, "test")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.equal(test.images[:, 0], test.images[:, 2]) and test.spec.mean == (0.485, 0.456, 0.406)
    plain = data.load("fashion_mnist", "test", DATA)
    assert (test.images.float().mean() - plain.images.float().mean()).abs() < 1.0  # same content, resized
    with pytest.raises(LabError, match="one per channel"):
        data.from_config({**cfg, "mean": [0.5]}, "test")


def test_every_augmentation_keeps_labels_and_shapes() -> None:
    labels = torch.arange(10).repeat(5)
    codes = (labels * 20 + 30).to(torch.uint8)  # each image one flat grey level that names its label
    images = codes.view(-1, 1, 1, 1).expand(-1, 3, 28, 28).contiguous()
    geometric = augment.from_config({"crop_padding": 2, "hflip": 0.5, "rotate": 10, "translate": 0.05, "scale": 0.1})
    torch.manual_seed(0)
    plain = data.TensorLoader(images, labels, 10, seed=1)
    moved = data.TensorLoader(images, labels, 10, seed=1, transform=geometric)
    changed = 0
    for (x0, y0), (x, y) in zip(plain, moved):
        assert x.shape == (10, 3, 28, 28) and torch.equal(y, y0)  # same labels in the same order
        assert torch.allclose(x[:, :, 14, 14], x0[:, :, 14, 14].float(), atol=1e-3)  # the centre keeps its level
        changed += int((x != x0.float()).any(dim=(1, 2, 3)).sum())
    assert changed > 0  # borders moved: the warps and crops did something
    bright = augment.from_config({"brightness": 0.2})(images.float())
    factor = bright[:, 0, 0, 0] / images[:, 0, 0, 0].float()
    assert ((factor >= 0.8 - 1e-4) & (factor <= 1.2 + 1e-4)).all() and factor.std() > 0
    assert torch.allclose(bright, images.float() * factor.view(-1, 1, 1, 1))  # one factor per image
    with pytest.raises(LabError, match="data.augment.blur is not an augmentation"):
        augment.from_config({"blur": 1})
    with pytest.raises(LabError, match="hflip=1.5 must be between 0 and 1"):
        augment.from_config({"hflip": 1.5})
