"""Digit scenes: MNIST (or Fashion-MNIST) images scattered on black canvases, with a box, a class and a mask per object.

A synthetic detection set that needs no download beyond MNIST: each `size`x`size` canvas gets between
`objects[0]` and `objects[1]` digits, each resized by a random factor in `scale` (28 px -> round(28 * s),
bilinear, antialiased) and drawn at a random position fully inside the canvas (its lit pixels, > 0, over
the canvas). Digits never overlap unless `overlap=True`: a new digit goes where its visible pixels' box
meets no other digit's box (a few positions are tried; one that finds no room is dropped, so a crowded
scene has fewer digits, never none). Every scene
keeps per-object masks (`instances`), so segmentation and captioning tasks reuse the same scenes.

    from vision import scenes
    s = scenes.from_config(cfg.data, "train")   # conf/data/digit_scenes.yaml; train digits only
    s.images[0], s.boxes[0], s.labels[0]        # (C, H, W) uint8, (k, 4) float32 xyxy, (k,) int64
    s.instances[0] == j + 1                      # where object j of scene 0 is visible
    s.class_masks(threshold=0)[0]                # per pixel: 0 background, 1 + the digit's class

Box convention (as torchvision's): float32 `xyxy` in continuous pixel coordinates; a box tight around pixel
columns c0..c1 and rows r0..r1 (inclusive) is `[c0, r0, c1 + 1, r1 + 1]`. A digit's box is tight around its
pixels > 0 in the final canvas, not around its resized patch's empty margin.

`python -m lab scenes OUT [--split test] [--n 100] ...` writes a set to OUT as PNG images with Pascal VOC
XML (`OUT/annotations/`), COCO (`OUT/instances.json`) and mask (`OUT/masks/`, a palette PNG of classes)
files, for other tools or for `data=voc_folder` and `data=seg_folder`.
Train scenes come only from the train digits and test scenes only from the test digits (seed, seed + 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lab import data
from lab.errors import LabError

TRIES = 50  # random positions tried for each digit before it is dropped


@dataclass
class Scenes:
    images: torch.Tensor  # (N, C, H, W) uint8 (C = 1, or 3 when channels=3: grey repeated)
    boxes: list[torch.Tensor]  # per scene (k, 4) float32 xyxy, tight around the object's visible (> 0) pixels
    labels: list[torch.Tensor]  # per scene (k,) int64, 0-based index into classes
    instances: torch.Tensor  # (N, H, W) uint8: 0 background, j + 1 where object j of the scene is visible (> 0)
    classes: tuple[str, ...]

    def class_masks(self, threshold: int = 0) -> torch.Tensor:
        """(N, H, W) uint8 per-pixel classes: 0 background, 1 + the class of the digit drawn at a pixel whose
        value is above `threshold` (the digit on top where digits overlap, as the image shows it)."""
        out = torch.zeros_like(self.instances)
        for s, (inst, labels) in enumerate(zip(self.instances, self.labels)):
            lut = torch.cat([torch.zeros(1, dtype=torch.uint8), (labels + 1).to(torch.uint8)])
            out[s] = torch.where(self.images[s, 0] > threshold, lut[inst.long()], 0)
        return out


def _resize(digits: np.ndarray, h: int, w: int) -> np.ndarray:
    """(k, H0, W0) uint8 -> (k, h, w) uint8, bilinear with antialiasing (as lab.data.conform)."""
    x = torch.from_numpy(digits).unsqueeze(1).float()
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()


def _extent(patches: np.ndarray) -> np.ndarray:
    """(k, h, w) -> (k, 4) int64 [c0, r0, c1 + 1, r1 + 1] of each patch's pixels > 0; all -1 for an empty one."""
    on = patches > 0
    rows, cols = on.any(2), on.any(1)
    h, w = patches.shape[1:]
    out = np.stack([cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], 1)
    out[~rows.any(1)] = -1
    return out.astype(np.int64)


def make_scenes(digits: torch.Tensor, digit_labels: torch.Tensor, classes: Sequence[str], n: int, size: int = 128,
                objects: tuple[int, int] = (1, 4), scale: tuple[float, float] = (1.0, 2.0), seed: int = 0,
                channels: int = 1, overlap: bool = False) -> Scenes:
    """`n` scenes of `size`x`size` from `digits` ((M, 1, h, w) or (M, h, w) uint8) and their labels (module
    docstring); the same arguments and `seed` always give the same scenes. `overlap=True` places digits
    anywhere: a later digit covers an earlier one where its pixels are lit (> 0), in the image and in
    `instances` alike, and boxes are tight around what stays visible (a digit covered completely is left out)."""
    if digits.dtype != torch.uint8 or digits.dim() not in (3, 4) or (digits.dim() == 4 and digits.shape[1] != 1):
        raise LabError(f"make_scenes takes grey uint8 digits (M, 1, h, w), got {digits.dtype} {tuple(digits.shape)}")
    pool = digits.reshape(len(digits), *digits.shape[-2:]).numpy()
    pool_labels = digit_labels.to(torch.int64).numpy()
    lo, hi = (int(v) for v in objects)
    s_lo, s_hi = (float(v) for v in scale)
    if len(pool) == 0 or len(pool) != len(pool_labels):
        raise LabError(f"make_scenes needs digits with one label each, got {len(pool)} digits, {len(pool_labels)} "
                       "labels")
    if not 1 <= lo <= hi <= 255:
        raise LabError(f"data.objects={[lo, hi]} must be [min, max] digits per scene with 1 <= min <= max <= 255")
    if not 0 < s_lo <= s_hi:
        raise LabError(f"data.scale={[s_lo, s_hi]} must be [min, max] resize factors with 0 < min <= max")
    if n < 1:
        raise LabError(f"the number of scenes must be at least 1, got {n}")
    if channels not in (1, 3):
        raise LabError(f"data.channels={channels} is not supported for digit scenes; use 1 (grey) or 3 (RGB)")
    h0, w0 = pool.shape[1:]
    if max(round(h0 * s_hi), round(w0 * s_hi)) > size:
        raise LabError(f"data.size={size} is smaller than the largest digit ({round(max(h0, w0) * s_hi)} px at "
                       f"scale {s_hi}); raise data.size or lower data.scale")
    if pool_labels.min() < 0 or pool_labels.max() >= len(classes):
        raise LabError(f"digit labels must be in 0..{len(classes) - 1} (one per class), got {pool_labels.min()}.."
                       f"{pool_labels.max()}")

    rng = np.random.default_rng(seed)
    counts = rng.integers(lo, hi + 1, size=n)
    picks = rng.integers(0, len(pool), size=int(counts.sum()))
    factors = rng.uniform(s_lo, s_hi, size=len(picks))
    heights = np.rint(h0 * factors).astype(np.int64).clip(1)
    widths = np.rint(w0 * factors).astype(np.int64).clip(1)
    patches: list[np.ndarray] = [np.empty(0)] * len(picks)
    extents = np.empty((len(picks), 4), np.int64)
    for h, w in sorted(set(zip(heights.tolist(), widths.tolist()))):  # one batched resize per patch size
        idx = np.flatnonzero((heights == h) & (widths == w))
        resized = _resize(pool[picks[idx]], h, w)
        extents[idx] = _extent(resized)
        for i, p in zip(idx.tolist(), resized):
            patches[i] = p

    images = np.zeros((n, size, size), np.uint8)
    instances = np.zeros((n, size, size), np.uint8)
    boxes, labels = [], []
    start = 0
    for s, k in enumerate(counts.tolist()):
        items = [(patches[i], extents[i], int(pool_labels[picks[i]])) for i in range(start, start + k)]
        start += k
        placed: list[np.ndarray] = []
        placed_labels: list[int] = []
        if all(e[0] < 0 for _, e, _ in items):  # no digit would be visible: draw one that is
            items[0] = _visible(pool, pool_labels, rng, h0, w0, s_lo, s_hi)
        for patch, ext, label in items:
            if ext[0] < 0:  # nothing visible: not placed
                continue
            ph, pw = patch.shape
            pos = rng.integers(0, [size - pw + 1, size - ph + 1], size=(TRIES, 2))
            cand = np.concatenate([pos, pos], 1) + ext  # (TRIES, 4) boxes in the canvas
            if overlap:
                pos, cand = pos[:1], cand[:1]
            elif placed:
                other = np.stack(placed)
                hit = ((cand[:, None, 0] < other[None, :, 2]) & (other[None, :, 0] < cand[:, None, 2])
                       & (cand[:, None, 1] < other[None, :, 3]) & (other[None, :, 1] < cand[:, None, 3])).any(1)
                free = np.flatnonzero(~hit)
                if len(free) == 0:
                    continue  # no room found: the scene has one digit fewer
                pos, cand = pos[free[:1]], cand[free[:1]]
            x, y = pos[0].tolist()
            lit = patch > 0
            images[s, y:y + ph, x:x + pw][lit] = patch[lit]  # drawn over whatever was there
            instances[s, y:y + ph, x:x + pw][lit] = len(placed) + 1
            placed.append(cand[0])
            placed_labels.append(label)
        if overlap:  # boxes of what stays visible; a digit covered completely is left out, the rest renumbered
            ids = np.arange(1, len(placed) + 1)
            ext = _extent((instances[s][None] == ids[:, None, None]).astype(np.uint8))
            seen = ext[:, 0] >= 0
            renumber = np.zeros(len(placed) + 1, np.uint8)
            renumber[ids[seen]] = np.arange(1, seen.sum() + 1)
            instances[s] = renumber[instances[s]]
            placed, placed_labels = list(ext[seen]), [k for k, v in zip(placed_labels, seen) if v]
        boxes.append(torch.from_numpy(np.stack(placed).astype(np.float32)))
        labels.append(torch.tensor(placed_labels, dtype=torch.int64))
    out = torch.from_numpy(images).unsqueeze(1)
    return Scenes(out.repeat(1, 3, 1, 1) if channels == 3 else out, boxes, labels, torch.from_numpy(instances),
                  tuple(str(c) for c in classes))


def _visible(pool: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator, h0: int, w0: int, s_lo: float,
             s_hi: float) -> tuple[np.ndarray, np.ndarray, int]:
    """A newly drawn (patch, extent, label) with a pixel > 0 (so that no scene is empty)."""
    for _ in range(1000):
        i, f = int(rng.integers(0, len(pool))), rng.uniform(s_lo, s_hi)
        patch = _resize(pool[i:i + 1], max(1, round(h0 * f)), max(1, round(w0 * f)))[0]
        ext = _extent(patch[None])[0]
        if ext[0] >= 0:
            return patch, ext, int(pool_labels[i])
    raise LabError("the digits have (almost) no pixel > 0, so no scene can hold one; check the digit images")


def from_config(d: Mapping[str, Any], split: str) -> Scenes:
    """The `split` scenes of a conf/data/digit_scenes.yaml config: train scenes from the train digits (seed),
    test scenes from the test digits (seed + 1)."""
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    source = d.get("source", "mnist")
    digits = data.load(source, split, d.get("root"), d.get("download", True))
    n = d.get("n_train" if split == "train" else "n_test")
    if n is None:
        raise LabError(f"data.{'n_train' if split == 'train' else 'n_test'} is missing: set the number of scenes")
    return make_scenes(digits.images, digits.labels, digits.spec.classes, int(n), int(d.get("size", 128)),
                       tuple(d.get("objects", (1, 4))), tuple(d.get("scale", (1.0, 2.0))),
                       int(d.get("seed", 0)) + (0 if split == "train" else 1), int(d.get("channels") or 1),
                       bool(d.get("overlap", False)))


def main(argv: list[str]) -> int:
    """`python -m lab scenes OUT ...`: write a set of digit scenes as VOC and COCO files; the exit code."""
    ap = argparse.ArgumentParser(prog="python -m lab scenes", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, metavar="OUT",
                    help="a new folder for OUT/images/*.png, OUT/annotations/*.xml, OUT/instances.json, "
                    "OUT/masks/*.png")
    ap.add_argument("--split", choices=("train", "test"), default="test", help="digits to draw from (default test)")
    ap.add_argument("--n", type=int, default=100, help="number of scenes (default 100)")
    ap.add_argument("--source", choices=("mnist", "fashion_mnist"), default="mnist")
    ap.add_argument("--size", type=int, default=128, help="canvas side in pixels (default 128)")
    ap.add_argument("--objects", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"),
                    help="digits per scene (default 1 4)")
    ap.add_argument("--scale", type=float, nargs=2, default=[1.0, 2.0], metavar=("MIN", "MAX"),
                    help="resize factor of each digit (default 1.0 2.0)")
    ap.add_argument("--seed", type=int, default=0, help="the train split uses seed, the test split seed + 1")
    ap.add_argument("--overlap", action="store_true", help="digits may overlap (the one drawn last on top)")
    ap.add_argument("--mask-threshold", type=int, default=0, metavar="T",
                    help="OUT/masks/*.png: a digit's pixels are those brighter than T (default 0)")
    ap.add_argument("--root", metavar="DIR",
                    help="data root holding MNIST (default: $LAB_DATA_DIR, else ~/.cache/lab/data)")
    a = ap.parse_args(argv)
    from vision import detection_data, segmentation_data

    cfg = {"source": a.source, "root": a.root, "download": True, "size": a.size, "objects": a.objects,
           "scale": a.scale, "seed": a.seed, "n_train": a.n, "n_test": a.n, "channels": 1, "overlap": a.overlap}
    try:
        if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
            raise LabError(f"{a.out} already exists and is not an empty folder (a set written there before would "
                           "mix with this one); remove it or choose another OUT")
        made = from_config(cfg, a.split)
        det = detection_data.from_scenes(made)
        detection_data.write_voc(det, a.out)
        detection_data.write_coco(det, a.out)
        seg = segmentation_data.from_scenes(made, a.mask_threshold)
        for mask, name in zip(seg.masks, det.names):
            segmentation_data.save_mask(a.out / "masks" / f"{Path(name).stem}.png", mask)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    boxes = sum(len(t["boxes"]) for t in det.targets)
    print(f"[lab] {len(det.images)} {a.source} {a.split} scenes ({boxes} boxes, {a.size}x{a.size}) written to "
          f"{a.out}: images/*.png, annotations/*.xml (Pascal VOC), instances.json (COCO), masks/*.png (class "
          "per pixel: 0 background, 1 + the digit)")
    return 0
