"""Object-detection data: images of any size with boxes and class labels, read from and written to VOC and COCO files.

Tasks call one function with their `data:` config (conf/data/digit_scenes.yaml, trees.yaml, voc_folder.yaml,
coco.yaml):

    train = detection_data.from_config(cfg.data, "train")   # Detections
    train.images[i]                  # (C, H, W) uint8; sizes may differ between images
    train.targets[i]["boxes"]        # (k, 4) float32 xyxy;  train.targets[i]["labels"]: (k,) int64, 0-based
    train.names[i], train.classes    # the image's file name; the class names, label order
    train.skipped                    # one line per bad annotation skipped (data.skip_bad=true)

Box convention (torchvision's): float32 `xyxy` in continuous pixel coordinates; a box tight around pixel
columns c0..c1 and rows r0..r1 (inclusive) is `[c0, r0, c1 + 1, r1 + 1]`. Pascal VOC files are 1-based and
inclusive: `x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax` on reading (as Detectron2's VOC loader), the
inverse on writing, so integer boxes round-trip exactly. COCO's `bbox` is `[x, y, w, h] = [x1, y1, x2 - x1,
y2 - y1]`; `coco_dict` numbers images `index + 1` and categories `label + 1`.

Layouts the readers take (`data.path`, each split alike):

    voc_folder   DIR/images/*.png + DIR/annotations/*.xml, or DIR/JPEGImages + DIR/Annotations, or the XML
                 files beside the images; an XML names its image by <filename> (else its own stem)
    coco         DIR/instances.json (or the one *.json in DIR or DIR/annotations) with images in DIR or
                 DIR/images; DIR may be the .json file; COCO's own DIR/annotations/instances_train*.json +
                 instances_val*.json with DIR/train*/ and DIR/val*/ images are its train and test splits
    splits       DIR/train/ and DIR/test/ (or val/), each in one of the layouts above; without them a fixed
                 draw of `data.test_fraction` of the images (seeded by `data.seed`) is the test split

Classes: `data.classes`, else the sorted names found in every split (VOC), or the categories by id (COCO).
A bad annotation stops the run with one line naming the file, the object and the fix: a box outside the
image, of zero or negative area, of an unknown class, a missing bndbox, malformed XML, a missing or
unreadable image. `data.skip_bad=true` skips such boxes (the whole image when its file is the problem) and
keeps one line for each in `skipped`. COCO crowd regions (`iscrowd=1`) are always skipped and listed there.
`difficult` VOC objects are kept as ordinary boxes. Images without objects are kept (boxes of shape (0, 4)).

`trees` is the DeepForest sample under the data root (`trees/images` + `trees/annotations`): aerial images
whose crowns are all one class, "Tree", cut into tiles (`tile`); the images named in `data.test_images` are
the test split, so no test tile overlaps a training tile.
"""

from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab import data, io
from lab.errors import LabError
from vision import scenes
from vision.scenes import Scenes

TOLERANCE = 1e-3  # px a box may pass the image border (float rounding in COCO files) before it is "outside"
RULES = {  # the box convention, for messages: (format, problem) -> rule
    ("voc", "area"): "VOC boxes are 1-based and inclusive: xmax >= xmin, ymax >= ymin",
    ("voc", "outside"): "VOC boxes are 1-based: xmin, ymin >= 1, xmax <= width, ymax <= height",
    ("coco", "area"): "COCO bbox is [x, y, w, h] with w, h > 0",
    ("coco", "outside"): "COCO bbox is [x, y, w, h] with x, y >= 0, x + w <= width, y + h <= height",
}


@dataclass
class Detections:
    images: list[torch.Tensor]  # each (C, H, W) uint8; sizes may differ (a user's folder)
    targets: list[dict[str, torch.Tensor]]  # each {"boxes": (k, 4) float32 xyxy, "labels": (k,) int64 0-based}
    names: list[str]  # each image's file name (e.g. "000012.png"), for media and results JSON
    classes: tuple[str, ...]
    skipped: list[str] = field(default_factory=list)  # one line per bad annotation skipped (data.skip_bad=true)


@dataclass
class _Object:
    what: str  # how messages name it: "object 3", "annotation id 12"
    name: str | None  # its class
    box: tuple[float, float, float, float] | None  # xyxy; None when malformed
    shown: str  # the box as the file writes it: "box [xmin, ymin, xmax, ymax]", "bbox [x, y, w, h]"
    problem: str | None = None  # malformed: what is wrong


@dataclass
class _Entry:
    """One image of an annotation file, parsed but not yet decoded or checked."""

    source: Path  # the XML, or the COCO json
    where: str  # prefix naming the image inside `source` in messages ("" for VOC)
    image: Path | None  # None: not found
    name: str  # the image's file name
    size: tuple[int, int] | None  # (width, height) the file claims
    objects: list[_Object]
    format: str  # "voc" or "coco" (the box convention, for messages)
    problem: str | None = None  # the whole image is bad: unreadable XML, image not found
    fix: str = "fix the file"
    notes: list[str] = field(default_factory=list)  # skipped whatever skip_bad says (COCO crowd regions)


def from_scenes(s: Scenes, prefix: str = "") -> Detections:
    """Digit scenes as Detections named `<prefix>000000.png`, ... (the images are views of `s.images`)."""
    return Detections(list(s.images), [{"boxes": b, "labels": lab} for b, lab in zip(s.boxes, s.labels)],
                      [f"{prefix}{i:06d}.png" for i in range(len(s.images))], tuple(s.classes))


# ---- reading --------------------------------------------------------------------------------------------

def read_voc(images: str | Path, annotations: str | Path | None = None, classes: Sequence[str] | None = None,
             skip_bad: bool = False, channels: int = 3) -> Detections:
    """A folder of images with Pascal VOC XML files (in `annotations`, else beside the images). Classes:
    `classes` (an object of another name is a bad annotation), else the sorted names found."""
    entries = _voc_entries(Path(images), Path(annotations) if annotations else None)
    return _load(entries, tuple(classes) if classes is not None else _names(entries), skip_bad, channels)


def read_coco(annotations: str | Path, images: str | Path | None = None, skip_bad: bool = False,
              channels: int = 3) -> Detections:
    """A COCO instances file; images in `images`, else beside the json (or in its `images/` folder).
    Classes are the category names ordered by category id."""
    entries, classes, problems = _coco_entries(Path(annotations), Path(images) if images else None)
    return _load(entries, classes, skip_bad, channels, problems)


def _image_index(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The folder's images by file name and by stem."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in data.IMAGE_SUFFIXES)
    by_stem: dict[str, Path] = {}
    for p in files:
        by_stem.setdefault(p.stem, p)
    return {p.name: p for p in files}, by_stem


def _voc_entries(images: Path, annotations: Path | None) -> list[_Entry]:
    if not images.is_dir():
        raise LabError(f"{images} is not a folder; point data.path at a folder of images with VOC .xml files")
    folder = annotations or images
    if not folder.is_dir():
        raise LabError(f"{folder} is not a folder; point it at the folder of VOC .xml files")
    xmls = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".xml")
    if not xmls:
        raise LabError(f"no Pascal VOC .xml files in {folder}; put one per image there (<annotation> with "
                       "<filename> and <object>s)")
    by_name, by_stem = _image_index(images)
    return [_voc_entry(x, images, by_name, by_stem) for x in xmls]


def _voc_entry(xml: Path, images: Path, by_name: dict[str, Path], by_stem: dict[str, Path]) -> _Entry:
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        return _Entry(xml, "", None, xml.stem, None, [], "voc", f"is not readable XML ({e})")
    filename = (root.findtext("filename") or "").strip()
    base = Path(filename).name
    image = by_name.get(base) or by_stem.get(Path(base).stem) or by_stem.get(xml.stem)
    size = None
    try:
        w, h = int(float(root.findtext("size/width") or 0)), int(float(root.findtext("size/height") or 0))
        size = (w, h) if w > 0 and h > 0 else None
    except ValueError:
        pass  # an unreadable <size>: the decoded image's size bounds the boxes
    objects = []
    for i, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip() or None
        keys = ("xmin", "ymin", "xmax", "ymax")
        raw = [obj.findtext(f"bndbox/{k}") for k in keys]
        try:
            v = [float(str(x).strip()) for x in raw]
        except ValueError:
            v = None
        if v is None or not all(math.isfinite(x) for x in v):
            objects.append(_Object(f"object {i}", name, None, "", "has no <bndbox> with numbers xmin, ymin, xmax, "
                                                                  "ymax"))
        elif name is None:
            objects.append(_Object(f"object {i}", None, None, "", "has no <name>"))
        else:
            shown = "box [" + ", ".join(_num_text(x) for x in v) + "]"
            objects.append(_Object(f"object {i}", name, (v[0] - 1, v[1] - 1, v[2], v[3]), shown))
    problem = None if image else f"image {filename or xml.stem + '.*'} not found in {images}"
    return _Entry(xml, "", image, image.name if image else (base or xml.stem), size, objects, "voc", problem,
                  "add the image or fix <filename>")


def _names(entries: Sequence[_Entry]) -> tuple[str, ...]:
    return tuple(sorted({o.name for e in entries for o in e.objects if o.name and not o.problem}))


def _coco_load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise LabError(f"cannot read {path} ({e.strerror or e}); point data.path at a COCO instances .json") from None
    except ValueError as e:
        raise LabError(f"{path} is not valid JSON ({e}); fix or replace it") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations",
                                                                                     "categories")):
        raise LabError(f"{path} is not a COCO instances file: it needs the lists 'images', 'annotations' and "
                       "'categories'")
    return doc


def _coco_classes(path: Path, doc: dict[str, Any]) -> tuple[dict[Any, str], tuple[str, ...]]:
    """{category id: name} and the names ordered by id."""
    cats = {}
    for c in doc["categories"]:
        if not isinstance(c, dict) or "id" not in c or not str(c.get("name") or "").strip():
            raise LabError(f"{path}: category {c!r} needs an 'id' and a 'name'; fix the categories list")
        if c["id"] in cats:
            raise LabError(f"{path}: category id {c['id']} appears twice; give each category its own id")
        cats[c["id"]] = str(c["name"]).strip()
    names = [cats[k] for k in sorted(cats, key=lambda k: (str(type(k)), k))]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LabError(f"{path}: category name {dup[0]!r} is used by several ids; give each category its own name")
    return cats, tuple(names)


_CLASSES: dict[tuple[str, int, int], tuple[str, ...]] = {}  # COCO files' classes, for the test split's check


def _coco_entries(path: Path, images: Path | None) -> tuple[list[_Entry], tuple[str, ...], list[tuple[str, str]]]:
    """The images of a COCO file, its classes, and the annotations that belong to no image (problem, fix)."""
    doc = _coco_load(path)
    cats, classes = _coco_classes(path, doc)
    stat = path.stat()
    _CLASSES[(str(path.resolve()), stat.st_mtime_ns, stat.st_size)] = classes
    base = images or path.parent
    if not base.is_dir():
        raise LabError(f"{base} is not a folder; point it at the folder of the COCO file's images")
    entries: dict[Any, _Entry] = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im:
            raise LabError(f"{path}: image {im!r} has no 'id'; give every entry of 'images' an id")
        if im["id"] in entries:
            raise LabError(f"{path}: image id {im['id']} appears twice in 'images'; give each image its own id")
        name = str(im.get("file_name") or "")
        where = f"image id {im['id']} ({name or 'no file_name'}): "
        hits = [p for p in (base / name, base / "images" / name) if name and p.is_file()]
        try:
            w, h = int(im.get("width") or 0), int(im.get("height") or 0)
        except (TypeError, ValueError):
            w = h = 0
        problem = None if hits else (f"image {name} not found in {base} or {base / 'images'}" if name
                                     else "has no file_name")
        entries[im["id"]] = _Entry(path, where, hits[0] if hits else None, Path(name).name or str(im["id"]),
                                   (w, h) if w > 0 and h > 0 else None, [], "coco", problem,
                                   "add the image or fix its file_name")
    orphans = []
    for k, a in enumerate(doc["annotations"], 1):
        a = a if isinstance(a, dict) else {}
        what = f"annotation id {a['id']}" if "id" in a else f"annotation {k}"
        entry = entries.get(a.get("image_id"))
        if entry is None:
            orphans.append((f"{path}: {what} refers to image id {a.get('image_id')!r}, which is not in 'images'",
                            "fix its image_id"))
            continue
        if a.get("iscrowd", 0) == 1:
            entry.notes.append(f"{path}: {entry.where}{what} is a crowd region (iscrowd=1), skipped")
            continue
        bbox = a.get("bbox")
        ok = (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
              and all(math.isfinite(v) for v in bbox))
        name = cats.get(a.get("category_id"))
        if not ok:
            entry.objects.append(_Object(what, name, None, "", "has no bbox of four numbers [x, y, w, h]"))
        elif name is None:
            entry.objects.append(_Object(what, None, None, "", f"has category_id {a.get('category_id')!r}, which is "
                                                               "not in 'categories'"))
        else:
            x, y, w, h = (float(v) for v in bbox)
            entry.objects.append(_Object(what, name, (x, y, x + w, y + h),
                                         "bbox [" + ", ".join(_num_text(v) for v in bbox) + "]"))
    return list(entries.values()), classes, orphans


def decode_image(path: Path, channels: int) -> torch.Tensor | str:
    """The image as (C, H, W) uint8, or why it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (UnidentifiedImageError, OSError, bomb errors)
        return f"{type(e).__name__}: {e}"
    a = np.array(im, dtype=np.uint8)
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def _bad(out: Detections, skip_bad: bool, problem: str, fix: str, what: str) -> None:
    if skip_bad:
        out.skipped.append(f"{problem} (skipped)")
        return
    raise LabError(f"{problem}; {fix}, or pass data.skip_bad=true to skip {what}")


def _load(entries: Sequence[_Entry], classes: tuple[str, ...], skip_bad: bool, channels: int,
          problems: Sequence[tuple[str, str]] = (), limit: int | None = None,
          class_fix: str = "add it to data.classes or fix the file") -> Detections:
    """Decode and check the entries' images and boxes (the first `limit` images kept)."""
    if channels not in (1, 3):
        raise LabError(f"data.channels={channels} is not supported for detection data; use 3 (RGB) or 1 (grey)")
    out = Detections([], [], [], classes)
    for problem, fix in problems:
        _bad(out, skip_bad, problem, fix, "such annotations")
    index = {c: i for i, c in enumerate(classes)}
    for e in entries:
        if limit is not None and len(out.images) >= limit:
            break
        head = f"{e.source}: {e.where}"
        if e.problem or e.image is None:
            _bad(out, skip_bad, f"{head}{e.problem}", e.fix, "this image")
            continue
        img = decode_image(e.image, channels)
        if isinstance(img, str):
            _bad(out, skip_bad, f"{head}cannot read image {e.image} ({img})", "replace it", "this image")
            continue
        out.skipped += e.notes
        h, w = img.shape[1:]
        width, height = (min(w, e.size[0]), min(h, e.size[1])) if e.size else (w, h)
        boxes, labels = [], []
        for o in e.objects:
            if o.problem or o.box is None:
                _bad(out, skip_bad, f"{head}{o.what} {o.problem}", "fix the file", "such boxes")
                continue
            if o.name not in index:
                _bad(out, skip_bad, f"{head}{o.what} has class {o.name!r}, not one of {list(classes)}", class_fix,
                     "such boxes")
                continue
            x1, y1, x2, y2 = o.box
            if x2 <= x1 or y2 <= y1:
                area = "zero" if (x2 - x1) * (y2 - y1) == 0 else "negative"
                _bad(out, skip_bad, f"{head}{o.what} {o.shown} has {area} area ({RULES[e.format, 'area']})",
                     "fix the file", "such boxes")
                continue
            if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > width + TOLERANCE or y2 > height + TOLERANCE:
                _bad(out, skip_bad, f"{head}{o.what} {o.shown} lies outside the {width}x{height} image "
                                    f"({RULES[e.format, 'outside']})", "fix the file", "such boxes")
                continue
            boxes.append((max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))))
            labels.append(index[o.name])
        out.images.append(img)
        out.targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(labels, dtype=torch.int64)})
        out.names.append(e.name)
    return out


# ---- writing --------------------------------------------------------------------------------------------

def _png_names(det: Detections) -> list[str]:
    names = [Path(n).with_suffix(".png").name for n in det.names]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise LabError(f"two images would both be written as {n}; give every image its own file name (stem)")
        seen.add(n)
    return names


def _write_images(det: Detections, folder: Path, names: Sequence[str]) -> None:
    from PIL import Image

    for img, name in zip(det.images, names):
        if img.dim() != 3 or img.shape[0] not in (1, 3) or img.dtype != torch.uint8:
            raise LabError(f"image {name} is {img.dtype} {tuple(img.shape)}; only (1 or 3, H, W) uint8 is written")
        a = img.permute(1, 2, 0).contiguous().numpy()
        pil = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
        io.write_atomic(folder / name, lambda f, pil=pil: pil.save(f, format="PNG"))


def write_voc(det: Detections, out: str | Path) -> None:
    """PNG images in `out/images/` and one Pascal VOC XML per image in `out/annotations/` (`<stem>.xml`); boxes
    are written as whole pixels (a fractional box grows to the pixels it touches)."""
    out = Path(out)
    names = _png_names(det)
    _write_images(det, out / "images", names)
    for img, target, name in zip(det.images, det.targets, names):
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "images"
        ET.SubElement(root, "filename").text = name
        size = ET.SubElement(root, "size")
        for key, v in zip(("width", "height", "depth"), (img.shape[2], img.shape[1], img.shape[0])):
            ET.SubElement(size, key).text = str(int(v))
        ET.SubElement(root, "segmented").text = "0"
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = det.classes[label]
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = "0"
            bb = ET.SubElement(obj, "bndbox")
            x1, y1, x2, y2 = box
            values = (math.floor(x1 + 1e-4) + 1, math.floor(y1 + 1e-4) + 1, math.ceil(x2 - 1e-4), math.ceil(y2 - 1e-4))
            for key, v in zip(("xmin", "ymin", "xmax", "ymax"), values):
                ET.SubElement(bb, key).text = str(v)
        ET.indent(root)
        io.write_text(out / "annotations" / f"{Path(name).stem}.xml", ET.tostring(root, encoding="unicode") + "\n")


def write_coco(det: Detections, out: str | Path) -> None:
    """PNG images in `out/images/` and the COCO file `out/instances.json` (file_name relative to images/)."""
    out = Path(out)
    names = _png_names(det)
    _write_images(det, out / "images", names)
    io.write_json(out / "instances.json", coco_dict(dataclasses.replace(det, names=names)))


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _num_text(v: float) -> str:
    return str(_num(v))


def coco_dict(det: Detections) -> dict[str, Any]:
    """The COCO "instances" dict of `det`: image i has id i + 1, class c has category id c + 1, annotation ids
    count from 1 in image order (the ids a results JSON for pycocotools must use)."""
    images, annotations = [], []
    for i, (img, target, name) in enumerate(zip(det.images, det.targets, det.names)):
        images.append({"id": i + 1, "file_name": name, "width": int(img.shape[2]), "height": int(img.shape[1])})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [_num(x1), _num(y1), _num(x2 - x1), _num(y2 - y1)],
                                "area": _num((x2 - x1) * (y2 - y1)), "iscrowd": 0})
    return {"info": {"description": "written by vision/detection_data.py", "version": "1.0"}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": n, "supercategory": "none"} for c, n in enumerate(det.classes)]}


# ---- tiles, trees and configs ---------------------------------------------------------------------------

def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    return starts if starts[-1] == length - size else [*starts, length - size]


def windows(image: torch.Tensor, size: int, overlap: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(x, y, crop) of the `size`x`size` windows of a (C, H, W) image, `size - overlap` apart, row by row, the
    last row and column flush with the image's edges; a window past a side shorter than `size` is zero-padded."""
    _, h, w = image.shape
    for y in _starts(h, size, size - overlap):
        for x in _starts(w, size, size - overlap):
            crop = image[:, y:y + size, x:x + size]
            yield x, y, torch.nn.functional.pad(crop, (0, size - crop.shape[2], 0, size - crop.shape[1]))


def tile(det: Detections, size: int, overlap: int = 0, min_visible: float = 0.5) -> Detections:
    """`size`x`size` tiles of every image (stride `size - overlap`; the last row and column flush with the image
    edge; a smaller image is one tile, zero-padded), named `<stem>_x<X>_y<Y>.png`. A box clipped to a tile is
    kept when at least `min_visible` of its area is inside."""
    if size < 1 or not 0 <= overlap < size:
        raise LabError(f"data.tile_size={size} and data.overlap={overlap} need tile_size >= 1 and "
                       "0 <= overlap < tile_size")
    if not 0 <= min_visible <= 1:
        raise LabError(f"data.min_visible={min_visible} must be a share of a box's area, in [0, 1]")
    out = Detections([], [], [], det.classes, list(det.skipped))
    for img, target, name in zip(det.images, det.targets, det.names):
        boxes, labels = target["boxes"], target["labels"]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for x, y, piece in windows(img, size, overlap):
            clipped = boxes - torch.tensor([x, y, x, y], dtype=boxes.dtype)
            clipped = torch.stack([clipped[:, 0].clamp(0, size), clipped[:, 1].clamp(0, size),
                                   clipped[:, 2].clamp(0, size), clipped[:, 3].clamp(0, size)], 1)
            inside = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
            keep = (inside > 0) & (inside >= min_visible * area)
            out.images.append(piece.contiguous())
            out.targets.append({"boxes": clipped[keep].contiguous(), "labels": labels[keep].clone()})
            out.names.append(f"{Path(name).stem}_x{x}_y{y}.png")
    return out


def trees(root: str | Path, split: str, test_images: Sequence[str], tile_size: int, overlap: int,
          min_visible: float, *, skip_bad: bool = False, channels: int = 3, tile_test: bool = True) -> Detections:
    """The DeepForest tree-crown sample under the data root `root` (`trees/images`, `trees/annotations`), every
    label mapped to "Tree": the images named (by stem) in `test_images` for split "test", the others for
    "train", cut into tiles (the test images too unless `tile_test` is false: then whole, with every box)."""
    base = Path(root).expanduser() / "trees"
    if not (base / "images").is_dir() or not (base / "annotations").is_dir():
        raise LabError(f"{base} has no images/ and annotations/ folders: put the DeepForest sample there "
                       "(trees/images/*.png, trees/annotations/*.xml), or point data.root (or $LAB_DATA_DIR) "
                       "at a folder that has it")
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    entries = _voc_entries(base / "images", base / "annotations")
    stems = [e.image.stem if e.image else e.source.stem for e in entries]
    held = [str(s) for s in test_images or []]
    unknown = [s for s in held if s not in stems]
    if unknown:
        raise LabError(f"data.test_images: {unknown[0]!r} is not an image of {base / 'images'}; use stems of "
                       f"{', '.join(stems)}")
    if not held or set(held) >= set(stems):
        raise LabError(f"data.test_images={held} leaves the {'test' if not held else 'train'} split empty; hold out "
                       f"some but not all of {', '.join(stems)}")
    chosen = [e for e, s in zip(entries, stems) if (s in held) == (split == "test")]
    for e in chosen:
        for o in e.objects:
            o.name = "Tree" if o.name else o.name
    det = _load(chosen, ("Tree",), skip_bad, channels)
    return det if split == "test" and not tile_test else tile(det, tile_size, overlap, min_visible)


def split_dirs(root: Path) -> dict[str, Path] | None:
    subs = {n: root / n for n in ("train", "test", "val") if (root / n).is_dir()}
    if "train" in subs and ("test" in subs or "val" in subs):
        return {"train": subs["train"], "test": subs.get("test") or subs["val"]}
    if subs:
        raise LabError(f"{root} has {'/, '.join(sorted(subs))}/ but not both train/ and test/ (or val/); add the "
                       "other, or keep all images in one folder for a data.test_fraction split")
    return None


def fraction_split(entries: list, split: str, fraction: float, seed: int, where: Path) -> list:
    """A fixed, seeded draw of `fraction` of the entries for "test", the rest for "train"."""
    if not 0 <= fraction < 1:
        raise LabError(f"data.test_fraction={fraction} must be in [0, 1)")
    n_test = round(len(entries) * fraction)
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_test])
    if split == "test" and not held:
        raise LabError(f"{where} has no test images: set data.test_fraction>0 or add train/ and test/ folders")
    if split == "train" and len(held) == len(entries):
        raise LabError(f"{where}: data.test_fraction={fraction} leaves no training images; lower it")
    return [e for i, e in enumerate(entries) if (i in held) == (split == "test")]


def _voc_layout(folder: Path) -> tuple[Path, Path | None]:
    """(images, annotations or None) of a VOC folder (module docstring)."""
    for images, xmls in (("images", "annotations"), ("JPEGImages", "Annotations")):
        if (folder / images).is_dir():
            return folder / images, (folder / xmls if (folder / xmls).is_dir() else None)
    return folder, None


def _coco_file(folder: Path) -> Path:
    if folder.is_file():
        return folder
    if (folder / "instances.json").is_file():
        return folder / "instances.json"
    found = sorted([*folder.glob("*.json"), *folder.glob("annotations/*.json")])
    if len(found) != 1:
        raise LabError(f"{folder} has {'no' if not found else len(found)} .json files where one COCO instances file "
                       "was expected; name it instances.json or point data.path at the file")
    return found[0]


def _coco_standard(root: Path) -> dict[str, tuple[Path, Path | None]] | None:
    """COCO's own layout: annotations/instances_train*.json and instances_val*.json, images in train*/ and val*/."""
    out = {}
    for split, prefix in (("train", "instances_train"), ("test", "instances_val")):
        found = sorted(root.glob(f"annotations/{prefix}*.json"))
        if len(found) != 1:
            return None
        images = root / found[0].stem.removeprefix("instances_")
        out[split] = (found[0], images if images.is_dir() else None)
    return out


def _path(d: Mapping[str, Any]) -> Path:
    if d.get("path") in (None, "", "???"):
        raise LabError(f"data={d.get('name')} needs data.path=DIR (the folder of images and annotations)")
    path = Path(str(d.get("path"))).expanduser()
    if not path.exists():
        raise LabError(f"data.path={d.get('path')} does not exist; point it at the folder of images and annotations")
    return path


def _voc_config(d: Mapping[str, Any], split: str, skip_bad: bool, channels: int, limit: int | None) -> Detections:
    root = _path(d)
    dirs = split_dirs(root)
    if dirs:
        by_split = {s: _voc_entries(*_voc_layout(p)) for s, p in dirs.items()}
        every, chosen = [*by_split["train"], *by_split["test"]], by_split[split]
    else:
        every = _voc_entries(*_voc_layout(root))
        chosen = fraction_split(every, split, float(d.get("test_fraction", 0.1)), int(d.get("seed") or 0), root)
    classes = tuple(str(c) for c in d.get("classes") or ()) or _names(every)
    if not classes:
        raise LabError(f"data.path={root} has no annotated <object>s; add some, or set data.classes")
    return _load(chosen, classes, skip_bad, channels, limit=limit)


def _coco_config(d: Mapping[str, Any], split: str, skip_bad: bool, channels: int, limit: int | None) -> Detections:
    root = _path(d)
    dirs = split_dirs(root) if root.is_dir() else None
    standard = _coco_standard(root) if root.is_dir() and not dirs else None
    if dirs or standard:
        files = ({s: (_coco_file(p), None) for s, p in dirs.items()} if dirs else standard)
        path, images = files[split]
        entries, classes, problems = _coco_entries(path, images)
        class_fix = "use the same categories in every split"
        if split == "test":  # labels follow the train split's classes
            train = files["train"][0]
            stat = train.stat()
            classes = (_CLASSES.get((str(train.resolve()), stat.st_mtime_ns, stat.st_size))
                       or _coco_classes(train, _coco_load(train))[1])
    else:
        path = _coco_file(root)
        entries, classes, problems = _coco_entries(path, None)
        entries = fraction_split(entries, split, float(d.get("test_fraction", 0.1)), int(d.get("seed") or 0), path)
        class_fix = "fix the file"
    if not classes:
        raise LabError(f"{path} has no categories; list the classes in its 'categories'")
    return _load(entries, classes, skip_bad, channels, problems, limit, class_fix)


def _first(det: Detections, n: int | None) -> Detections:
    if n is None:
        return det
    return Detections(det.images[:n], det.targets[:n], det.names[:n], det.classes, det.skipped)


def from_config(d: Mapping[str, Any], split: str) -> Detections:
    """The `split` ("train" or "test") of the data set a `data:` config describes (conf/data/digit_scenes.yaml,
    trees.yaml, voc_folder.yaml, coco.yaml); `data.subset` / `data.test_subset` keep the first N images."""
    if split not in ("train", "test"):
        raise LabError(f"unknown split {split!r}; use 'train' or 'test'")
    name = d.get("name")
    limit = d.get("subset" if split == "train" else "test_subset")
    limit = None if limit is None else int(limit)
    skip_bad, channels = bool(d.get("skip_bad", False)), int(d.get("channels") or 3)
    if name == "digit_scenes":
        return _first(from_scenes(scenes.from_config(d, split)), limit)
    if name == "trees":
        return _first(trees(d.get("root") or data.default_root(), split, list(d.get("test_images") or []),
                            int(d.get("tile_size", 256)), int(d.get("overlap", 0)), float(d.get("min_visible", 0.5)),
                            skip_bad=skip_bad, channels=channels, tile_test=bool(d.get("tile_test", True))), limit)
    if name == "voc_folder":
        return _voc_config(d, split, skip_bad, channels, limit)
    if name == "coco":
        return _coco_config(d, split, skip_bad, channels, limit)
    raise LabError(f"unknown detection data set data.name={name!r}; use digit_scenes, trees, voc_folder or coco")
