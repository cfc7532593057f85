"""Semantic segmentation data: images with a class index per pixel, from digit scenes or a user's folder.

    from vision import segmentation_data
    s = segmentation_data.from_config(cfg.data, "train")   # conf/data/digit_masks.yaml | seg_folder.yaml
    s.images[0], s.masks[0], s.classes                      # (C, H, W) uint8, (H, W) uint8, names

Masks hold class indices 0..num_classes-1 and `IGNORE` (255) for pixels no loss or metric counts (Pascal
VOC's object borders). Digit scenes (`data=digit_masks`): 0 is the background, 1 + k a pixel of a digit of
class k whose value is above `data.mask_threshold`; with `data.overlap=true` digits overlap and the one drawn
last wins, in the image and the mask alike (vision/scenes.py).

A folder (`data=seg_folder`, `data.path=DIR`) in either layout:

- Pascal VOC: `DIR/JPEGImages/<id>.jpg` and `DIR/SegmentationClass/<id>.png`; the splits from
  `DIR/ImageSets/Segmentation/train.txt` and `val.txt` (or `test.txt`) when they exist;
- plain: `DIR/images/<name>.<ext>` and `DIR/masks/<name>.png` (what `python -m lab scenes` writes).

Without VOC's lists, `DIR/train/` and `DIR/test/` (or `val/`) in either layout are the splits, else a fixed
draw of `data.test_fraction` of the images (seeded by `data.seed`) is the test split. A mask is a palette
PNG (VOC's: the palette index is the class) or a grey PNG of indices; an RGB mask, a mask whose size differs
from its image's, a class index of `data.num_classes` or more (other than 255), an image without a mask and
an unreadable file each stop the run with one line naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab.data import IMAGE_SUFFIXES
from lab.errors import LabError
from vision import scenes
from vision.detection_data import decode_image, fraction_split, split_dirs

IGNORE = 255


@dataclass
class Segmentations:
    images: list[torch.Tensor]  # (C, H, W) uint8 each; sizes may differ between images
    masks: list[torch.Tensor]  # (H, W) uint8 each: class indices, IGNORE where nothing counts
    names: list[str]  # file stems (or scene numbers)
    classes: tuple[str, ...]


def voc_palette(n: int = 256) -> list[int]:
    """Pascal VOC's colour map (class k's RGB from the bits of k), flat [r0, g0, b0, r1, ...] for Pillow."""
    out = []
    for k in range(n):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def save_mask(path: Path, mask: torch.Tensor) -> None:
    """An (H, W) index mask as a palette PNG (VOC's colours, the index kept as the pixel value), atomically."""
    from PIL import Image

    from lab import io

    im = Image.fromarray(mask.to(torch.uint8).cpu().numpy())  # L; putpalette makes it P, indices kept
    im.putpalette(voc_palette())
    io.write_atomic(path, lambda f: im.save(f, format="PNG"))


def read_mask(path: Path) -> np.ndarray | str:
    """A palette or grey PNG's class indices as (H, W) uint8, or why it cannot be read as a mask."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L", "1"):
                return np.array(im.convert("L") if mode == "1" else im, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                a = np.array(im, dtype=np.int64)
                if a.max() > 255:
                    return f"holds index {a.max()}; indices go up to 254 (255 = ignore)"
                return a.astype(np.uint8)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types
        return f"{type(e).__name__}: {e}"
    return (f"is a {mode} image; a mask is a palette PNG (as VOC's SegmentationClass) or a grey PNG of class "
            "indices")


def from_scenes(s: scenes.Scenes, threshold: int) -> Segmentations:
    masks = s.class_masks(threshold)
    return Segmentations(list(s.images), list(masks), [f"{i:06d}" for i in range(len(masks))],
                         ("background", *s.classes))


def check(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], names: Sequence[str],
          num_classes: int) -> None:
    """Every mask the size of its image, with indices below `num_classes` or IGNORE (one line naming the file)."""
    for image, mask, name in zip(images, masks, names):
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise LabError(f"{name}: the mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                           f"{image.shape[-1]}x{image.shape[-2]}; give each image a mask of its own size")
        values = torch.unique(mask)
        bad = values[(values >= num_classes) & (values != IGNORE)]
        if len(bad):
            raise LabError(f"{name}: the mask holds class index {int(bad.max())}, but data.num_classes={num_classes} "
                           f"(indices 0..{num_classes - 1}, and {IGNORE} = ignore); raise data.num_classes or fix "
                           "the mask")


def _pairs(folder: Path) -> list[tuple[Path, Path | None]] | None:
    """(image, mask or None) pairs of a folder in one of the two layouts; None when it has neither."""
    for images, masks in (("JPEGImages", "SegmentationClass"), ("images", "masks")):
        if (folder / images).is_dir():
            found = {p.stem: p for p in (folder / masks).glob("*.png")} if (folder / masks).is_dir() else {}
            files = sorted(p for p in (folder / images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            return [(p, found.get(p.stem)) for p in files]
    return None


def read_pairs(pairs: Sequence[tuple[Path, Path | None]], channels: int, num_classes: int,
               limit: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    images, masks, names = [], [], []
    for image_path, mask_path in pairs[:limit]:
        if mask_path is None:
            raise LabError(f"{image_path}: no mask beside it (a .png of the same name under masks/ or "
                           "SegmentationClass/); add one or remove the image")
        image = decode_image(image_path, channels)
        if isinstance(image, str):
            raise LabError(f"{image_path}: not a readable image ({image}); replace or remove it")
        mask = read_mask(mask_path)
        if isinstance(mask, str):
            raise LabError(f"{mask_path}: {mask}")
        images.append(image)
        masks.append(torch.from_numpy(mask))
        names.append(str(mask_path))
    check(images, masks, names, num_classes)
    return images, masks, [Path(n).stem for n in names]


def _split_pairs(folder: Path, split: str, test_fraction: float, seed: int) -> list[tuple[Path, Path | None]]:
    lists = folder / "ImageSets" / "Segmentation"
    if (lists / "train.txt").is_file():
        by_stem = {p.stem: (p, m) for p, m in _pairs(folder) or []}
        other = next((lists / f for f in ("val.txt", "test.txt") if (lists / f).is_file()), None)
        listed = lists / "train.txt" if split == "train" else other
        if listed is None:
            raise LabError(f"{lists} has train.txt but no val.txt or test.txt; add the test list")
        ids = [ln.strip() for ln in listed.read_text().splitlines() if ln.strip()]
        missing = [i for i in ids if i not in by_stem]
        if missing:
            raise LabError(f"{listed}: image {missing[0]!r} is not in {folder / 'JPEGImages'} "
                           f"({len(missing)} missing); fix the list or add the images")
        return [by_stem[i] for i in ids]
    dirs = split_dirs(folder)
    where = dirs[split] if dirs else folder
    pairs = _pairs(where)
    if pairs is None:
        raise LabError(f"data.path={where}: no images/ + masks/ or JPEGImages/ + SegmentationClass/ folders (nor "
                       "train/ and test/ folders holding them); see docs/segmentation.md for the layouts")
    return pairs if dirs else fraction_split(pairs, split, test_fraction, seed, folder)


def from_folder(path: str | Path, split: str, num_classes: int, classes: Sequence[str] | None = None,
                channels: int = 3, test_fraction: float = 0.1, seed: int = 0,
                limit: int | None = None) -> Segmentations:
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise LabError(f"data.path={folder} is not a folder; pass data.path=DIR (see docs/segmentation.md)")
    if num_classes < 2 or num_classes > IGNORE:
        raise LabError(f"data.num_classes={num_classes}: give the number of classes, background included "
                       f"(2 to {IGNORE})")
    names = tuple(str(c) for c in classes) if classes else tuple(f"class_{k}" for k in range(num_classes))
    if len(names) != num_classes:
        raise LabError(f"data.classes has {len(names)} names but data.num_classes={num_classes}; give one name per "
                       "class (or data.classes=null)")
    images, masks, stems = read_pairs(_split_pairs(folder, split, test_fraction, seed), channels, num_classes, limit)
    if not images:
        raise LabError(f"data.path={folder}: the {split} split holds no images")
    return Segmentations(images, masks, stems, names)


def write_folder(folder: Path, seg: Segmentations, layout: str = "plain") -> None:
    """Write images (PNG) and palette masks in the plain (images/, masks/) or VOC (JPEGImages/,
    SegmentationClass/) layout."""
    from lab import media

    images, masks = ("JPEGImages", "SegmentationClass") if layout == "voc" else ("images", "masks")
    for image, mask, name in zip(seg.images, seg.masks, seg.names):
        media.save_png(folder / images / f"{name}.png", image)
        save_mask(folder / masks / f"{name}.png", mask)


def from_config(d: Mapping[str, Any], split: str) -> Segmentations:
    """The `split` ("train" or "test") of the set a `data:` config describes (conf/data/digit_masks.yaml,
    seg_folder.yaml); `data.subset` / `data.test_subset` keep the first N images."""
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    limit = d.get("subset" if split == "train" else "test_subset")
    limit = None if limit is None else int(limit)
    name = d.get("name")
    if name == "digit_masks":
        out = from_scenes(scenes.from_config(d, split), int(d.get("mask_threshold", 0)))
        return Segmentations(out.images[:limit], out.masks[:limit], out.names[:limit], out.classes)
    if name == "seg_folder":
        return from_folder(d.get("path"), split, int(d.get("num_classes") or 0), d.get("classes"),
                           int(d.get("channels") or 3), float(d.get("test_fraction", 0.1)), int(d.get("seed", 0)),
                           limit)
    raise LabError(f"unknown segmentation data set data.name={name!r}; use digit_masks or seg_folder")
