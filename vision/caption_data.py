"""Captioned image sets on disk: each image of a split fitted to one square size, with its reference captions.

    train = caption_data.from_config(cfg.data, "train")   # Captioned
    train.images, train.captions[i], train.names[i]       # (N, C, S, S) uint8; raw strings; file names
    train.skipped                                         # problem -> count (data.skip_bad), images without captions

Layouts (`data.path=DIR`; file keys are relative to DIR, or absolute):

    coco_captions  COCO's own: DIR/annotations/captions_train2017.json with DIR/train2017/, captions_val2017.json
                   with DIR/val2017/ for the test split (data.train_json, train_images, test_json, test_images).
                   Captions grouped per image id in annotation order, images in the order of "images"; an image
                   without captions is left out and counted.
    flickr8k       DIR/Flickr8k.token.txt (`name.jpg#k<TAB>caption`; data.token_file), else Kaggle's captions.txt
                   (CSV, header `image,caption`); images in DIR/Flicker8k_Dataset/ or DIR/Images/ (data.images);
                   splits from DIR/Flickr_8k.trainImages.txt and Flickr_8k.testImages.txt (data.train_list,
                   test_list), else a draw of `data.test_fraction` (0.1) of the images seeded by `data.seed`.

Common keys: data.image_size (224; shorter side resized, centre crop), data.channels (3 RGB or 1 grey),
data.subset / data.test_subset (the first N images), data.skip_bad. Captions keep their text (outer whitespace
stripped). An empty caption, a missing or unreadable image, a malformed token line and a caption of an image id
not in "images" each stop the run with one line naming the file (and line); data.skip_bad=true skips them (an
empty caption alone; the image when its file is the problem) and counts each kind in `skipped`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lab.errors import LabError
from vision.detection_data import decode_image, fraction_split

TOKEN_FILE = "Flickr8k.token.txt"  # data.token_file's default; missing, Kaggle's captions.txt is read instead
NO_CAPTIONS = "images without captions"  # the one skipped kind counted whatever data.skip_bad says


@dataclass
class Captioned:
    images: torch.Tensor  # (N, C, S, S) uint8, every image resized to S = data.image_size
    captions: list[list[str]]  # per image, its reference captions as raw strings (>= 1 each, none empty)
    names: list[str]  # per image, its file name (relative to the images folder)
    skipped: dict[str, int] = field(default_factory=dict)  # problem -> count skipped (data.skip_bad)


@dataclass
class _Item:
    name: str  # the image's file name, relative to the images folder
    where: str  # how messages name the image: "FILE: image id 3 (a.jpg)", "FILE:12"
    fix: str  # what to do when its image file is missing
    captions: list[tuple[str, str]] = field(default_factory=list)  # (caption, where messages name it)


@dataclass
class _Options:
    path: Path
    split: str
    size: int
    channels: int
    skip_bad: bool
    limit: int | None
    skipped: Counter = field(default_factory=Counter)

    def bad(self, kind: str, message: str) -> None:
        """`message` ("WHERE: problem; fix") stops the run, or is counted under `kind` with data.skip_bad=true."""
        if not self.skip_bad:
            raise LabError(f"{message}, or set data.skip_bad=true to skip such entries")
        self.skipped[kind] += 1


def fit_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C,H,W) uint8 -> (C,size,size) uint8: shorter side resized to size (bilinear, antialias), centre crop."""
    if image.dim() != 3 or image.dtype != torch.uint8:
        raise LabError(f"fit_image takes a (C, H, W) uint8 image, not {image.dtype} {tuple(image.shape)}")
    if size < 1:
        raise LabError(f"data.image_size={size} must be at least 1")
    h, w = image.shape[1:]
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)
        x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        image = x[0].round().clamp(0, 255).to(torch.uint8)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size].contiguous()


def _options(d: Mapping[str, Any], split: str) -> _Options:
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    raw = d.get("path")
    if raw in (None, "", "???"):
        raise LabError(f"data={d.get('name')} needs data.path=DIR (the folder of the captioned image set)")
    path = Path(str(raw)).expanduser()
    if not path.is_dir():
        raise LabError(f"data.path={raw} is not a folder; set data.path=DIR (the folder of the captioned image set)")
    size, channels = int(_get(d, "image_size", 224)), int(_get(d, "channels", 3))
    limit = _get(d, "subset" if split == "train" else "test_subset", None)
    if size < 1:
        raise LabError(f"data.image_size={size} must be at least 1")
    if channels not in (1, 3):
        raise LabError(f"data.channels={channels} is not supported for captioned images; use 3 (RGB) or 1 (grey)")
    if limit is not None and int(limit) < 1:
        raise LabError(f"data.subset / data.test_subset = {limit} keeps no images; use N >= 1 or null")
    return _Options(path, split, size, channels, bool(d.get("skip_bad", False)), None if limit is None else int(limit))


def _get(d: Mapping[str, Any], key: str, default: Any) -> Any:
    value = d.get(key)
    return default if value is None else value


def _under(root: Path, value: Any) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else root / p


def _load(items: Sequence[_Item], folder: Path, source: Path, o: _Options) -> Captioned:
    """Decode the items' images (the first `o.limit` good ones) and keep their non-empty captions."""
    images, captions, names = [], [], []
    for it in items:
        if o.limit is not None and len(images) >= o.limit:
            break
        kept = []
        for text, where in it.captions:
            if text.strip():
                kept.append(text.strip())
            else:
                o.bad("empty captions", f"{where}: empty caption; write the caption or remove it")
        if not kept:
            o.skipped[NO_CAPTIONS] += 1
            continue
        path = folder / it.name
        img = decode_image(path, o.channels) if path.is_file() else None
        if img is None:
            o.bad("missing images", f"{it.where}: image {it.name} not found in {folder}; add the image or {it.fix}")
        elif isinstance(img, str):
            o.bad("unreadable images", f"{it.where}: cannot read image {path} ({img}); replace it")
        else:
            images.append(fit_image(img, o.size))
            captions.append(kept)
            names.append(it.name)
    if not images:
        left = f" (skipped: {dict(o.skipped)})" if o.skipped else ""
        raise LabError(f"{source}: the {o.split} split holds no captioned images{left}; check data.path and the "
                       f"images in {folder}")
    return Captioned(torch.stack(images), captions, names, dict(o.skipped))


def read_coco_captions(d: Mapping[str, Any], split: str) -> Captioned:
    """COCO captions: `captions_*.json` and its images folder (module docstring)."""
    o = _options(d, split)
    key = "train" if split == "train" else "test"
    default = ("annotations/captions_train2017.json", "train2017") if key == "train" else \
        ("annotations/captions_val2017.json", "val2017")
    source = _under(o.path, d.get(f"{key}_json") or default[0])
    folder = _under(o.path, d.get(f"{key}_images") or default[1])
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise LabError(f"cannot read {source} ({e.strerror or e}); put COCO's captions file there or set "
                       f"data.{key}_json") from None
    except ValueError as e:
        raise LabError(f"{source} is not valid JSON ({e}); fix or replace it") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations")):
        raise LabError(f"{source} is not a COCO captions file: it needs the lists 'images' and 'annotations'")
    if not folder.is_dir():
        raise LabError(f"{folder} is not a folder; put the images of {source.name} there or set data.{key}_images")
    items: dict[Any, _Item] = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or not str(im.get("file_name") or ""):
            raise LabError(f"{source}: image {im!r} needs an 'id' and a 'file_name'; fix the 'images' list")
        if im["id"] in items:
            raise LabError(f"{source}: image id {im['id']} appears twice in 'images'; give each image its own id")
        name = str(im["file_name"])
        items[im["id"]] = _Item(name, f"{source}: image id {im['id']} ({name})", "fix its file_name")
    for k, a in enumerate(doc["annotations"], 1):
        a = a if isinstance(a, dict) else {}
        what = f"annotation id {a['id']}" if "id" in a else f"annotation {k}"
        item = items.get(a.get("image_id"))
        if item is None:
            o.bad("captions of unknown images", f"{source}: {what} refers to image id {a.get('image_id')!r}, which "
                                                "is not in 'images'; fix its image_id")
            continue
        text = a.get("caption")
        item.captions.append((text if isinstance(text, str) else "", f"{source}: {what} (image {item.name})"))
    return _load(list(items.values()), folder, source, o)


def _token_lines(source: Path, o: _Options) -> dict[str, _Item]:
    """The images of a Flickr8k token file (or Kaggle's captions.txt) with their captions, in file order."""
    items: dict[str, _Item] = {}
    try:
        text = source.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise LabError(f"cannot read {source} ({e.strerror or e}); set data.token_file") from None
    lines = text.splitlines()
    is_csv = bool(lines) and lines[0].strip().lower().replace(" ", "") == "image,caption"
    rows = enumerate(csv.reader(lines[1:]), 2) if is_csv else ((n, [ln]) for n, ln in enumerate(lines, 1))
    for n, row in rows:
        if not "".join(row).strip():
            continue
        if is_csv:  # an unquoted caption with commas spans several fields
            name, caption, ok = row[0].strip(), ",".join(row[1:]), len(row) > 1 and bool(row[0].strip())
            shape = "a line is image,caption"
        else:
            head, tab, caption = row[0].partition("\t")
            name, hash_, number = head.strip().rpartition("#")
            ok = bool(tab and hash_ and name and number.strip().isdigit())
            shape = "a line is name.jpg#k<TAB>caption"
        if not ok:
            o.bad("malformed lines", f"{source}:{n}: {lines[n - 1][:60]!r} is not a caption line ({shape}); fix the "
                                     "line")
            continue
        item = items.setdefault(name, _Item(name, f"{source}:{n}", "remove its lines"))
        item.captions.append((caption, f"{source}:{n}"))
    return items


def read_flickr8k(d: Mapping[str, Any], split: str) -> Captioned:
    """Flickr8k: the token file (or Kaggle's captions.txt), the images folder and the split lists (docstring)."""
    o = _options(d, split)
    token = str(d.get("token_file") or TOKEN_FILE)
    source = _under(o.path, token)
    if not source.is_file() and token == TOKEN_FILE and (o.path / "captions.txt").is_file():
        source = o.path / "captions.txt"  # Kaggle's layout (conf/data/flickr8k.yaml names the default file)
    if not source.is_file():
        nor = f" (nor {o.path / 'captions.txt'})" if token == TOKEN_FILE else ""
        raise LabError(f"{source} does not exist{nor}; put Flickr8k's token file there or set data.token_file")
    if d.get("images"):
        folder = _under(o.path, d.get("images"))
    else:
        folder = next((o.path / f for f in ("Flicker8k_Dataset", "Images") if (o.path / f).is_dir()),
                      o.path / "Flicker8k_Dataset")
    if not folder.is_dir():
        raise LabError(f"{folder} is not a folder (nor {o.path / 'Images'}); put the Flickr8k images there or set "
                       "data.images")
    items = _token_lines(source, o)
    if not items:
        raise LabError(f"{source} holds no caption lines; a line is name.jpg#k<TAB>caption (or, in captions.txt, "
                       "image,caption under that header)")
    lists = {s: _under(o.path, d.get(f"{s}_list") or f"Flickr_8k.{s}Images.txt") for s in ("train", "test")}
    if lists["train"].is_file() or lists["test"].is_file():
        listed = lists[split]
        if not listed.is_file():
            other = lists["test" if split == "train" else "train"]
            raise LabError(f"{listed} does not exist but {other} does; add the {split} list or set data.{split}_list")
        names = dict.fromkeys(ln.strip() for ln in listed.read_text(encoding="utf-8").splitlines() if ln.strip())
        chosen = [items.get(n) or _Item(n, str(listed), "fix the list") for n in names]
    else:
        chosen = fraction_split(list(items.values()), split, float(_get(d, "test_fraction", 0.1)),
                                int(_get(d, "seed", 0)), source)
    return _load(chosen, folder, source, o)


def from_config(d: Mapping[str, Any], split: str) -> Captioned:
    """The `split` ("train" or "test") of the set `d` describes: d["name"] "coco_captions" (read_coco_captions)
    or "flickr8k" (read_flickr8k); other names -> LabError."""
    name = d.get("name")
    if name == "coco_captions":
        return read_coco_captions(d, split)
    if name == "flickr8k":
        return read_flickr8k(d, split)
    raise LabError(f"unknown captioned image set data.name={name!r}; use coco_captions or flickr8k")
