"""Captioned image sets (vision/caption_data.py): COCO captions and Flickr8k read from tiny copies of their real
layouts, images fitted to one square size by a centre crop, and every bad entry one line or one count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lab.errors import LabError
from vision import caption_data as cd

RED, GREEN, BLUE, GREY, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (255, 255, 0)


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (30, 20)) -> None:
    """A (width, height) image of one colour; PNG or JPEG by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def bands(path: Path) -> None:
    """60 wide, 20 tall: green, red, blue, green bands of 15 columns; a centre crop to a square is red | blue."""
    a = np.zeros((20, 60, 3), dtype=np.uint8)
    for k, colour in enumerate((GREEN, RED, BLUE, GREEN)):
        a[:, 15 * k:15 * (k + 1)] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def mean_colour(image: torch.Tensor) -> tuple[float, ...]:
    return tuple(image.float().mean(dim=(1, 2)).tolist())


def close(image: torch.Tensor, colour: tuple[int, ...], tol: float = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(mean_colour(image), colour))


# ---- COCO captions --------------------------------------------------------------------------------------

def coco(root: Path, split: str, images: list[tuple[int, str, tuple[int, int, int]]],
         annotations: list[tuple[int, int, str]]) -> Path:
    """COCO's own layout: root/annotations/captions_<split>.json and the images in root/<split>/."""
    for _, name, colour in images:
        solid(root / split / name, colour)
    doc = {"info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017}, "licenses": [],
           "images": [{"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/{split}/{name}",
                       "height": 20, "width": 30, "date_captured": "2013-11-14 11:18:45", "id": i}
                      for i, name, _ in images],
           "annotations": [{"image_id": i, "id": k, "caption": text} for k, i, text in annotations]}
    path = root / "annotations" / f"captions_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def coco_d(root: Path, **extra) -> dict:
    return {"name": "coco_captions", "path": str(root), "image_size": 8, **extra}


def test_coco_groups_captions_per_image_in_order_and_leaves_out_images_without_captions(tmp_path):
    coco(tmp_path, "train2017", [(139, "000000000139.jpg", RED), (285, "000000000285.jpg", GREEN),
                                 (632, "000000000632.jpg", BLUE)],
         [(1, 632, "A blue square. "), (2, 139, "A red thing"), (3, 632, "Something blue"), (4, 139, "Red, again")])
    out = cd.from_config(coco_d(tmp_path), "train")
    assert out.images.shape == (2, 3, 8, 8) and out.images.dtype == torch.uint8
    assert out.names == ["000000000139.jpg", "000000000632.jpg"]  # the order of "images"
    assert out.captions == [["A red thing", "Red, again"], ["A blue square.", "Something blue"]]
    assert close(out.images[0], RED) and close(out.images[1], BLUE)
    assert out.skipped == {"images without captions": 1}


def test_coco_centre_crop_keeps_the_middle_of_a_wide_image(tmp_path):
    coco(tmp_path, "train2017", [], [])
    bands(tmp_path / "train2017" / "wide.png")
    doc = json.loads((tmp_path / "annotations" / "captions_train2017.json").read_text())
    doc["images"] = [{"id": 7, "file_name": "wide.png", "width": 60, "height": 20}]
    doc["annotations"] = [{"id": 1, "image_id": 7, "caption": "red beside blue"}]
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    img = cd.read_coco_captions(coco_d(tmp_path, image_size=10), "train").images[0]
    assert img.shape == (3, 10, 10)
    assert int(img[1].max()) <= 8  # none of the green side bands survives the crop
    assert close(img[:, :, :4], RED, 2) and close(img[:, :, 6:], BLUE, 2)


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre():
    tall = torch.zeros(3, 70, 10, dtype=torch.uint8)  # fitted to 5: resized to 35x5, rows 15..19 (30..39) kept
    tall[:, 26:35], tall[:, 35:44] = 200, 100  # the rows kept: 200 above, 100 below, nothing of the dark rest
    out = cd.fit_image(tall, 5).int()
    assert out.shape == (3, 5, 5)
    assert (out[:, :2] == 200).all() and (out[:, 3:] == 100).all() and 100 < out[0, 2, 0] < 200
    assert cd.fit_image(tall, 5).dtype == torch.uint8
    assert torch.equal(cd.fit_image(tall.transpose(1, 2), 5), cd.fit_image(tall, 5).transpose(1, 2))  # wide alike
    same = torch.randint(0, 256, (1, 6, 6), dtype=torch.uint8)
    assert torch.equal(cd.fit_image(same, 6), same)


def test_coco_test_split_reads_val2017_and_subsets_cut_before_reading(tmp_path):
    coco(tmp_path, "train2017", [(1, "a.jpg", RED)], [(1, 1, "red")])
    coco(tmp_path, "val2017", [(5, "b.jpg", GREEN), (6, "c.jpg", BLUE), (7, "d.jpg", YELLOW)],
         [(1, 5, "green"), (2, 6, "blue"), (3, 7, "yellow")])
    (tmp_path / "val2017" / "d.jpg").write_bytes(b"never read: past test_subset")
    out = cd.from_config(coco_d(tmp_path, test_subset=2), "test")
    assert out.names == ["b.jpg", "c.jpg"] and out.captions == [["green"], ["blue"]] and out.skipped == {}
    assert cd.from_config(coco_d(tmp_path), "train").names == ["a.jpg"]


def test_coco_keys_name_other_files_absolute_or_relative(tmp_path):
    path = coco(tmp_path / "elsewhere", "mine", [(1, "a.png", GREY)], [(1, 1, "grey")])
    d = coco_d(tmp_path, train_json=str(path), train_images="elsewhere/mine")
    assert cd.from_config(d, "train").captions == [["grey"]]


# ---- Flickr8k -------------------------------------------------------------------------------------------

NAMES = [f"{1000268201 + k}_693b08cb0e.jpg" for k in range(10)]
COLOURS = [(25 * k, 255 - 25 * k, 100) for k in range(10)]


def flickr(root: Path, folder: str = "Flicker8k_Dataset", names: list[str] = NAMES, kaggle: bool = False) -> None:
    """Flickr8k's token file (five captions per image, #0..#4) or Kaggle's captions.txt, and the images."""
    for name, colour in zip(names, COLOURS):
        solid(root / folder / name, colour)
    if kaggle:
        rows = [f'{n},"A dog, number {k}, runs ."' if j == 0 else f"{n},caption {j} of image {k} ."
                for k, n in enumerate(names) for j in range(5)]
        (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    else:
        lines = [f"{n}#{j}\tcaption {j} of image {k} ." for k, n in enumerate(names) for j in range(5)]
        (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")


def flickr_d(root: Path, **extra) -> dict:
    return {"name": "flickr8k", "path": str(root), "image_size": 6, **extra}


@pytest.mark.parametrize("folder", ["Flicker8k_Dataset", "Images"])
def test_flickr8k_official_split_lists_in_either_image_folder(tmp_path, folder):
    flickr(tmp_path, folder)
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join([NAMES[3], NAMES[0], NAMES[5]]) + "\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text(f"{NAMES[7]}\n{NAMES[1]}\n")
    train, test = cd.from_config(flickr_d(tmp_path), "train"), cd.from_config(flickr_d(tmp_path), "test")
    assert train.names == [NAMES[3], NAMES[0], NAMES[5]] and test.names == [NAMES[7], NAMES[1]]
    assert train.captions[0] == [f"caption {j} of image 3 ." for j in range(5)]
    assert train.images.shape == (3, 3, 6, 6) and test.images.shape == (2, 3, 6, 6)
    assert close(train.images[1], COLOURS[0]) and close(test.images[0], COLOURS[7])


def test_flickr8k_draws_a_seeded_fraction_without_split_lists(tmp_path):
    flickr(tmp_path)
    d = flickr_d(tmp_path, test_fraction=0.3, seed=4)
    train, test = cd.read_flickr8k(d, "train"), cd.read_flickr8k(d, "test")
    assert len(test.names) == 3 and len(train.names) == 7
    assert not set(train.names) & set(test.names) and set(train.names) | set(test.names) == set(NAMES)
    assert train.names == [n for n in NAMES if n in train.names]  # token-file order
    assert cd.read_flickr8k(d, "test").names == test.names
    assert cd.read_flickr8k(flickr_d(tmp_path, test_fraction=0.3, subset=2, seed=4), "train").names == train.names[:2]


def test_flickr8k_reads_kaggles_captions_csv(tmp_path):
    flickr(tmp_path, "Images", kaggle=True)
    out = cd.from_config(flickr_d(tmp_path, test_fraction=0.2, token_file="Flickr8k.token.txt"), "test")
    k = NAMES.index(out.names[0])
    assert len(out.names) == 2 and out.captions[0][:2] == [f"A dog, number {k}, runs .", f"caption 1 of image {k} ."]
    assert all(len(c) == 5 for c in out.captions)
    with pytest.raises(LabError, match=re.escape(f"{tmp_path / 'mine.txt'} does not exist")):
        cd.from_config(flickr_d(tmp_path, token_file="mine.txt"), "test")  # a file named is never replaced


# ---- bad input ------------------------------------------------------------------------------------------

def test_flickr8k_bad_entries_name_the_file_and_line_or_are_counted(tmp_path):
    flickr(tmp_path, names=NAMES[:4])
    token = tmp_path / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines[2] = f"{NAMES[0]} caption without a tab"  # line 3
    lines[6] = f"{NAMES[1]}#1\t   "  # line 7: an empty caption
    lines += [f"{NAMES[1]}.1#0\tthe real token file names an image no folder holds"]  # line 21
    token.write_text("\n".join(lines) + "\n")
    (tmp_path / "Flicker8k_Dataset" / NAMES[2]).write_bytes(b"not a jpeg")
    d = flickr_d(tmp_path, test_fraction=0.0)
    with pytest.raises(LabError, match=re.escape(f"{token}:3: ") + ".*not a caption line.*data.skip_bad=true"):
        cd.from_config(d, "train")
    lines[2] = f"{NAMES[0]}#2\tfixed"
    token.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabError, match=re.escape(f"{token}:7: empty caption") + ".*skip_bad"):
        cd.from_config(d, "train")
    lines[6] = f"{NAMES[1]}#1\tfixed too"
    token.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabError, match=re.escape(f"{token}:11: cannot read image") + ".*skip_bad"):
        cd.from_config(d, "train")
    solid(tmp_path / "Flicker8k_Dataset" / NAMES[2], GREY)
    with pytest.raises(LabError, match=re.escape(f"{token}:21: image {NAMES[1]}.1 not found in") + ".*skip_bad"):
        cd.from_config(d, "train")
    lines[2], lines[6] = f"{NAMES[0]} no tab", f"{NAMES[1]}#1\t"
    token.write_text("\n".join(lines) + "\n")
    (tmp_path / "Flicker8k_Dataset" / NAMES[2]).write_bytes(b"not a jpeg")
    out = cd.from_config({**d, "skip_bad": True}, "train")
    assert out.names == [NAMES[0], NAMES[1], NAMES[3]] and len(out.captions[1]) == 4
    assert out.skipped == {"malformed lines": 1, "empty captions": 1, "unreadable images": 1, "missing images": 1}


def test_coco_bad_entries_name_the_file_and_image_or_are_counted(tmp_path):
    path = coco(tmp_path, "train2017", [(1, "a.jpg", RED), (2, "b.jpg", GREEN), (3, "c.jpg", BLUE),
                                        (4, "d.jpg", YELLOW)],
                [(10, 1, "red"), (11, 99, "an orphan"), (12, 2, " "), (13, 2, "green"), (14, 3, "blue"),
                 (15, 4, "yellow"), (16, 1, "")])
    (tmp_path / "train2017" / "c.jpg").unlink()
    (tmp_path / "train2017" / "d.jpg").write_bytes(b"\xff\xd8 truncated")
    d = coco_d(tmp_path)
    with pytest.raises(LabError, match=re.escape(f"{path}: annotation id 11 refers to image id 99") + ".*skip_bad"):
        cd.from_config(d, "train")
    out = cd.from_config({**d, "skip_bad": True}, "train")
    assert out.names == ["a.jpg", "b.jpg"] and out.captions == [["red"], ["green"]]
    assert out.skipped == {"captions of unknown images": 1, "empty captions": 2, "missing images": 1,
                           "unreadable images": 1}
    doc = json.loads(path.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["id"] != 11]
    path.write_text(json.dumps(doc))
    with pytest.raises(LabError, match=re.escape(f"{path}: annotation id 16 (image a.jpg): empty caption")):
        cd.from_config(d, "train")
    doc["annotations"] = [a for a in doc["annotations"] if a["caption"].strip()]
    path.write_text(json.dumps(doc))
    with pytest.raises(LabError, match=re.escape(f"{path}: image id 3 (c.jpg): image c.jpg not found in")):
        cd.from_config(d, "train")
    solid(tmp_path / "train2017" / "c.jpg", BLUE)
    with pytest.raises(LabError, match=re.escape(f"{path}: image id 4 (d.jpg): cannot read image")):
        cd.from_config(d, "train")
    empty = coco(tmp_path / "one", "train2017", [(1, "a.jpg", RED)], [(1, 1, "red")])
    (tmp_path / "one" / "train2017" / "a.jpg").unlink()
    with pytest.raises(LabError, match=re.escape(f"{empty}: the train split holds no captioned images (skipped: "
                                                  "{'missing images': 1})")):
        cd.from_config(coco_d(tmp_path / "one", skip_bad=True), "train")

@pytest.mark.parametrize("content, problem", [(None, "cannot read"), ("{not json", "is not valid JSON"),
                                              ('{"images": []}', "needs the lists 'images' and 'annotations'")])
def test_coco_unreadable_json_is_one_line(tmp_path, content, problem):
    (tmp_path / "train2017").mkdir()
    if content is not None:
        (tmp_path / "annotations").mkdir()
        (tmp_path / "annotations" / "captions_train2017.json").write_text(content)
    with pytest.raises(LabError, match=re.escape(problem)) as e:
        cd.from_config(coco_d(tmp_path), "train")
    assert str(tmp_path / "annotations" / "captions_train2017.json") in str(e.value)


@pytest.mark.parametrize("change, problem", [
    ({"path": None}, "needs data.path=DIR"), ({"path": "???"}, "needs data.path=DIR"),
    ({"path": "/no/such/folder"}, "is not a folder; set data.path=DIR"), ({"name": "flickr30k"}, "unknown"),
    ({"channels": 4}, "data.channels=4"), ({"image_size": 0}, "data.image_size=0")])
def test_config_mistakes_are_one_line(tmp_path, change, problem):
    with pytest.raises(LabError, match=re.escape(problem)):
        cd.from_config({**flickr_d(tmp_path), **change}, "train")
    with pytest.raises(LabError, match="unknown split 'val'"):
        cd.read_flickr8k(flickr_d(tmp_path), "val")


def test_a_hydra_config_reads_grey_images(tmp_path):
    flickr(tmp_path, "Images", names=NAMES[:3])
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join([*NAMES[:3], "listed_but_never_captioned.jpg"]))
    (tmp_path / "Flickr_8k.testImages.txt").write_text(NAMES[0])
    cfg = OmegaConf.create({"name": "flickr8k", "path": str(tmp_path), "image_size": 4, "channels": 1,
                            "skip_bad": False, "subset": None, "test_subset": None, "token_file": "???",
                            "images": None, "train_list": None, "test_list": None, "seed": 0})
    out = cd.from_config(cfg, "train")
    assert out.images.shape == (3, 1, 4, 4) and out.images.dtype == torch.uint8
    assert out.names == NAMES[:3] and out.skipped == {"images without captions": 1}
    r, g, b = COLOURS[1]
    assert abs(float(out.images[1].float().mean()) - (0.299 * r + 0.587 * g + 0.114 * b)) < 4
