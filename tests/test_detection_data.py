"""Detection data (vision/scenes.py, vision/detection_data.py): digit scenes box their digits exactly, VOC and
COCO files round-trip, the real tree-crown XML reads as documented, and every bad annotation gets one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lab import data
from lab.errors import LabError
from vision import detection_data as dd
from vision import scenes

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAB_DATA_DIR") or REPO.parent / "shared" / "data")
TREES = DATA / "trees"
HELD_OUT = "2019_YELL_2_541000_4977000_image_crop"


@pytest.fixture(scope="module")
def mnist() -> data.ImageData:
    try:
        return data.load("mnist", "test", os.environ.get("LAB_DATA_DIR") or DATA, download=False)
    except LabError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def trees_voc() -> dd.Detections:
    if not (TREES / "annotations").is_dir():
        pytest.skip(f"no tree-crown sample under {TREES}")
    return dd.read_voc(TREES / "images", TREES / "annotations")


def blocks(values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake 28x28 digits: digit k is a 20x12 block of brightness values[k], label k."""
    x = torch.zeros(len(values), 1, 28, 28, dtype=torch.uint8)
    for k, v in enumerate(values):
        x[k, 0, 4:24, 8:20] = v
    return x, torch.arange(len(values))


# ---- digit scenes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("objects", [(1, 4), (6, 9)])  # (6, 9): crowded, some digits find no room
def test_scene_boxes_enclose_their_digits_exactly(mnist, objects):
    s = scenes.make_scenes(mnist.images, mnist.labels, mnist.spec.classes, 40, size=96, objects=objects,
                           scale=(1.0, 2.0), seed=1)
    assert s.images.shape == (40, 1, 96, 96) and s.instances.shape == (40, 96, 96) and s.classes == tuple("0123456789")
    counts = [len(b) for b in s.boxes]
    assert all(1 <= k <= objects[1] for k in counts) and all(len(lab) == k for lab, k in zip(s.labels, counts))
    if objects == (1, 4):
        assert min(counts) == 1 and max(counts) == 4
    for i, (boxes, labels) in enumerate(zip(s.boxes, s.labels)):
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(s.instances[i] > 0, s.images[i, 0] > 0)  # the masks cover exactly the lit pixels
        assert int(s.instances[i].max()) == len(boxes)
        for j, box in enumerate(boxes.tolist()):
            ys, xs = torch.nonzero(s.instances[i] == j + 1, as_tuple=True)
            # tight: [c0, r0, c1 + 1, r1 + 1] of the visible pixels, so every edge touches one
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
        rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        assert torch.all(inter == torch.diag(inter.diagonal()))  # no two boxes overlap
    if objects == (6, 9):
        assert min(counts) < 6  # crowded canvases drop digits rather than overlap them


def test_scene_labels_and_channels_follow_the_digits():
    digits, labels = blocks([40, 80, 120, 160, 200])
    s = scenes.make_scenes(digits, labels, "abcde", 30, size=64, objects=(1, 3), scale=(1.0, 1.5), seed=0, channels=3)
    assert s.images.shape == (30, 3, 64, 64) and s.classes == tuple("abcde")
    assert torch.equal(s.images[:, 0], s.images[:, 1]) and torch.equal(s.images[:, 0], s.images[:, 2])
    for i, lab in enumerate(s.labels):
        for j, k in enumerate(lab.tolist()):  # a block's brightness says which digit it is
            assert s.images[i, 0][s.instances[i] == j + 1].max().item() == 40 * (k + 1)


def test_scenes_are_deterministic_and_validated(mnist):
    args = (mnist.images[:500], mnist.labels[:500], mnist.spec.classes, 12)
    a, b, c = scenes.make_scenes(*args, seed=5), scenes.make_scenes(*args, seed=5), scenes.make_scenes(*args, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.instances, b.instances)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not torch.equal(a.images, c.images)
    with pytest.raises(LabError, match=r"data.size=40 is smaller than the largest digit \(56 px"):
        scenes.make_scenes(*args, size=40)
    with pytest.raises(LabError, match=r"data.objects=\[3, 2\]"):
        scenes.make_scenes(*args, objects=(3, 2))


def test_train_scenes_come_from_train_digits_and_test_from_test(monkeypatch):
    calls = []
    fake = {"train": blocks([50, 50]), "test": blocks([200, 200])}

    def load(name, split, root=None, download=True):
        calls.append((name, split))
        images, _ = fake[split]
        return data.ImageData(images, torch.full((2,), 0 if split == "train" else 1), data.DATASETS[name])

    monkeypatch.setattr(data, "load", load)
    cfg = OmegaConf.load(REPO / "conf" / "data" / "digit_scenes.yaml")
    cfg.n_train, cfg.n_test = 6, 4
    train, test = scenes.from_config(cfg, "train"), scenes.from_config(cfg, "test")
    assert calls == [("mnist", "train"), ("mnist", "test")]
    assert len(train.images) == 6 and len(test.images) == 4
    assert train.images.max() == 50 and test.images.max() == 200  # pixels of each split's own digits only
    assert all((lab == 0).all() for lab in train.labels) and all((lab == 1).all() for lab in test.labels)
    det = dd.from_config({**OmegaConf.to_container(cfg, resolve=True), "test_subset": 3}, "test")
    assert det.names == ["000000.png", "000001.png", "000002.png"] and det.classes == tuple("0123456789")
    assert torch.equal(det.images[0], test.images[0]) and torch.equal(det.targets[2]["boxes"], test.boxes[2])


def test_scenes_command_writes_a_set_the_readers_read_back(tmp_path, mnist, capsys):
    out = tmp_path / "scenes"
    assert scenes.main([str(out), "--n", "6", "--size", "64", "--objects", "2", "3", "--seed", "4",
                        "--root", str(DATA)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "6 mnist test scenes" in line and str(out) in line
    expect = scenes.make_scenes(mnist.images, mnist.labels, mnist.spec.classes, 6, size=64, objects=(2, 3),
                                seed=5)  # the test split uses seed + 1
    voc = dd.read_voc(out / "images", out / "annotations", classes=expect.classes, channels=1)
    coco = dd.read_coco(out / "instances.json", channels=1)
    for got in (voc, coco):
        assert got.classes == expect.classes and len(got.images) == 6 and not got.skipped
        for i in range(6):
            assert torch.equal(got.images[i], expect.images[i])
            assert torch.equal(got.targets[i]["boxes"], expect.boxes[i])
            assert torch.equal(got.targets[i]["labels"], expect.labels[i])
    assert scenes.main([str(tmp_path / "bad"), "--size", "30", "--root", str(DATA)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.size=30 is smaller") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    assert scenes.main([str(out), "--n", "2", "--root", str(DATA)]) == 2  # never mixed into an earlier set
    assert "already exists and is not an empty folder" in capsys.readouterr().err


# ---- VOC and COCO files ---------------------------------------------------------------------------------

def mixed() -> dd.Detections:
    """Three RGB images of different sizes, one without boxes, integer and fractional boxes."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((40, 64), (30, 30),
                                                                                             (50, 20))]
    targets = [{"boxes": torch.tensor([[0, 0, 64, 40], [3, 4, 10, 12]], dtype=torch.float32),
                "labels": torch.tensor([1, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[2, 5, 3, 6]], dtype=torch.float32), "labels": torch.tensor([2])}]
    return dd.Detections(images, targets, ["a.png", "b.jpg", "c.png"], ("cat", "dog", "tree"))


def test_voc_round_trip_is_exact(tmp_path):
    det = mixed()
    dd.write_voc(det, tmp_path)
    xml = (tmp_path / "annotations" / "a.xml").read_text()
    for tag in ("<filename>a.png</filename>", "<width>64</width>", "<height>40</height>", "<depth>3</depth>",
                "<pose>Unspecified</pose>", "<difficult>0</difficult>", "<name>dog</name>",
                "<xmin>1</xmin>", "<ymin>1</ymin>", "<xmax>64</xmax>", "<ymax>40</ymax>", "<xmin>4</xmin>"):
        assert tag in xml, tag
    got = dd.read_voc(tmp_path / "images", tmp_path / "annotations", classes=det.classes)
    assert got.names == ["a.png", "b.png", "c.png"] and got.classes == det.classes and not got.skipped
    for i in range(3):
        assert torch.equal(got.images[i], det.images[i])
        assert torch.equal(got.targets[i]["boxes"], det.targets[i]["boxes"])
        assert torch.equal(got.targets[i]["labels"], det.targets[i]["labels"])
    assert got.targets[1]["boxes"].shape == (0, 4)
    grey = dd.read_voc(tmp_path / "images", tmp_path / "annotations", channels=1)
    assert grey.images[0].shape == (1, 40, 64) and grey.classes == det.classes  # sorted names found


def test_coco_round_trip_is_exact_and_standard(tmp_path):
    det = mixed()
    det.targets[2]["boxes"] = torch.tensor([[2.25, 5.5, 3.75, 16.0]])  # fractional boxes survive COCO
    dd.write_coco(det, tmp_path)
    doc = json.loads((tmp_path / "instances.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["cat", "dog", "tree"] and doc["categories"][0]["id"] == 1
    assert doc["annotations"][1] == {"id": 2, "image_id": 1, "category_id": 1, "bbox": [3, 4, 7, 8], "area": 56,
                                     "iscrowd": 0}
    assert doc["images"][1] == {"id": 2, "file_name": "b.png", "width": 30, "height": 30}
    got = dd.read_coco(tmp_path / "instances.json")
    assert got.classes == det.classes and got.names == ["a.png", "b.png", "c.png"] and not got.skipped
    for i in range(3):
        assert torch.equal(got.images[i], det.images[i])
        assert torch.equal(got.targets[i]["boxes"], det.targets[i]["boxes"])
        assert torch.equal(got.targets[i]["labels"], det.targets[i]["labels"])
    pycocotools = pytest.importorskip("pycocotools.coco")
    coco = pycocotools.COCO(str(tmp_path / "instances.json"))
    assert len(coco.getAnnIds(imgIds=[1])) == 2 and coco.loadCats([3])[0]["name"] == "tree"


def test_tiles_cut_clip_and_pad():
    img = torch.arange(200 * 300, dtype=torch.int32).reshape(1, 200, 300).remainder(251).to(torch.uint8)
    boxes = torch.tensor([[10, 10, 50, 50], [90, 10, 130, 30], [150, 150, 300, 200]], dtype=torch.float32)
    det = dd.Detections([img, torch.full((1, 40, 50), 7, dtype=torch.uint8)],
                        [{"boxes": boxes, "labels": torch.tensor([0, 1, 0])},
                         {"boxes": torch.tensor([[0.0, 0.0, 50.0, 40.0]]), "labels": torch.tensor([1])}],
                        ["big.png", "small.png"], ("a", "b"), ["earlier problem"])
    t = dd.tile(det, 128, overlap=28, min_visible=0.5)  # stride 100: x 0, 100, 172 (flush); y 0, 72
    assert t.names == [f"big_x{x}_y{y}.png" for y in (0, 72) for x in (0, 100, 172)] + ["small_x0_y0.png"]
    assert all(im.shape == (1, 128, 128) for im in t.images) and t.skipped == ["earlier problem"]
    assert torch.equal(t.images[4], img[:, 72:200, 100:228])
    first = t.targets[0]
    assert first["boxes"].tolist() == [[10, 10, 50, 50], [90, 10, 128, 30]] and first["labels"].tolist() == [0, 1]
    # box 1 has 30 of 40 columns in tile x=100 (kept), box 2 (150..300 x 150..200) is cut by the tiles' edges
    assert t.targets[1]["boxes"].tolist() == [[0, 10, 30, 30]]
    assert t.targets[5]["boxes"].tolist() == [[0, 78, 128, 128]] and t.targets[3]["boxes"].shape == (0, 4)
    assert t.targets[4]["boxes"].tolist() == [[50, 78, 128, 128]]  # 78 of its 150 columns: 52% visible
    assert dd.tile(det, 128, 28, min_visible=0.55).targets[4]["boxes"].shape == (0, 4)
    small = t.images[6]
    assert (small[:, :40, :50] == 7).all() and small[:, 40:].sum() == 0 and small[:, :, 50:].sum() == 0
    assert t.targets[6]["boxes"].tolist() == [[0, 0, 50, 40]]
    assert len(dd.tile(det, 128, 28, min_visible=1.0).targets[1]["boxes"]) == 0


def test_real_tree_annotations(trees_voc):
    det = trees_voc
    assert det.classes == ("Alive", "Dead", "Tree") and not det.skipped
    assert sum(len(t["boxes"]) for t in det.targets) == 951
    counts = dict(zip(det.names, (len(t["boxes"]) for t in det.targets)))
    assert counts == {"2019_YELL_2_528000_4978000_image_crop2.png": 574, f"{HELD_OUT}.png": 279,
                      "OSBS_029.png": 61, "SOAP_061.png": 37}
    soap = det.targets[det.names.index("SOAP_061.png")]["labels"]
    assert (soap == 0).sum() == 9 and (soap == 1).sum() == 28
    # the XML's first box, xmin 681 ymin 369 xmax 699 ymax 386, is [680, 368, 699, 386]
    assert det.targets[0]["boxes"][0].tolist() == [680, 368, 699, 386]
    for img, t in zip(det.images, det.targets):
        b = t["boxes"]
        assert img.shape[0] == 3 and (b[:, :2] >= 0).all() and (b[:, 2] <= img.shape[2]).all()
        assert (b[:, 3] <= img.shape[1]).all() and (b[:, 2:] > b[:, :2]).all()


def test_trees_split_by_whole_images_into_tiles():
    if not (TREES / "annotations").is_dir():
        pytest.skip(f"no tree-crown sample under {TREES}")
    cfg = OmegaConf.load(REPO / "conf" / "data" / "trees.yaml")
    cfg.root = str(DATA)
    assert list(cfg.test_images) == [HELD_OUT]
    assert cfg.tile_test is False
    whole = dd.from_config(cfg, "test")  # the held-out image whole, every crown once
    assert whole.names == [f"{HELD_OUT}.png"] and whole.images[0].shape == (3, 1035, 1249)
    assert len(whole.targets[0]["boxes"]) == 279
    cfg.tile_test = True
    train, test = dd.from_config(cfg, "train"), dd.from_config(cfg, "test")
    for det in (train, test):
        assert det.classes == ("Tree",) and not det.skipped
        assert all(im.shape == (3, 256, 256) for im in det.images)
        assert all((t["labels"] == 0).all() for t in det.targets)
        assert all(((t["boxes"] >= 0) & (t["boxes"] <= 256)).all() for t in det.targets)
    assert test.names and all(n.startswith(HELD_OUT + "_x") for n in test.names)
    assert not any(n.startswith(HELD_OUT) for n in train.names)
    assert len(test.names) == 6 * 5  # 1249x1035 at stride 224: x 0..896 + 993, y 0..672 + 779
    assert sum(len(t["boxes"]) for t in test.targets) >= 279  # every crown at least once (overlaps repeat some)
    assert len(dd.from_config({**OmegaConf.to_container(cfg), "test_subset": 4}, "test").images) == 4
    with pytest.raises(LabError, match=r"data.test_images: 'nope' is not an image of .*; use stems of"):
        dd.trees(DATA, "test", ["nope"], 256, 32, 0.5)
    with pytest.raises(LabError, match=r"leaves the test split empty"):
        dd.trees(DATA, "train", [], 256, 32, 0.5)
    with pytest.raises(LabError, match=r"has no images/ and annotations/ folders"):
        dd.trees(DATA / "nowhere", "train", [HELD_OUT], 256, 32, 0.5)


# ---- bad annotations ------------------------------------------------------------------------------------

def voc_file(folder: Path, stem: str, boxes: list[tuple[str, list]], image: bool | bytes = True,
             filename: str | None = None) -> Path:
    """A 64x48 image `<stem>.png` and its VOC XML with (name, [xmin, ymin, xmax, ymax]) objects."""
    folder.mkdir(parents=True, exist_ok=True)
    if image is True:
        Image.fromarray(np.full((48, 64, 3), 9, np.uint8)).save(folder / f"{stem}.png")
    elif image:
        (folder / f"{stem}.png").write_bytes(image)
    objects = "".join(f"<object><name>{n}</name><bndbox>" + "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), b)) + "</bndbox></object>"
        for n, b in boxes)
    path = folder / f"{stem}.xml"
    path.write_text(f"<annotation><filename>{filename or stem + '.png'}</filename><size><width>64</width>"
                    f"<height>48</height><depth>3</depth></size>{objects}</annotation>")
    return path


GOOD = ("tree", [1, 1, 10, 10])
VOC_CASES = {
    "zero area": ([GOOD, ("tree", [10, 5, 9, 40])], r"object 2 box \[10, 5, 9, 40\] has zero area"),
    "negative area": ([GOOD, ("tree", [10, 40, 20, 5])], r"object 2 box \[10, 40, 20, 5\] has negative area"),
    "beyond the size": ([GOOD, ("tree", [10, 5, 65, 40])], r"object 2 box \[10, 5, 65, 40\] lies outside the 64x48"),
    "negative": ([GOOD, ("tree", [0, 5, 20, 40])], r"object 2 box \[0, 5, 20, 40\] lies outside the 64x48 image "
                                                   r"\(VOC boxes are 1-based"),
    "unknown class": ([GOOD, ("cat", [2, 2, 20, 20])], r"object 2 has class 'cat', not one of \['tree'\]; add it to "
                                                       "data.classes"),
    "no bndbox": ([GOOD, ("tree", ["", 2, 20, 20])], r"object 2 has no <bndbox> with numbers"),
}


@pytest.mark.parametrize("case", list(VOC_CASES))
def test_each_bad_voc_box_gets_one_line_or_is_skipped(tmp_path, case):
    boxes, message = VOC_CASES[case]
    xml = voc_file(tmp_path, "x", boxes)
    with pytest.raises(LabError, match=message) as e:
        dd.read_voc(tmp_path, classes=["tree"])
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{xml}: ") and text.endswith("data.skip_bad=true to skip such boxes")
    det = dd.read_voc(tmp_path, classes=["tree"], skip_bad=True)
    assert len(det.skipped) == 1 and det.skipped[0].startswith(f"{xml}: object 2 ")
    assert det.targets[0]["boxes"].tolist() == [[0, 0, 10, 10]]  # the good box stays


def test_bad_voc_images_get_one_line_or_are_skipped(tmp_path):
    voc_file(tmp_path, "ok", [GOOD])
    cases = {
        "missing": (lambda: voc_file(tmp_path, "gone", [GOOD], image=False, filename="nope.png"),
                    r"gone.xml: image nope.png not found in .*; add the image or fix <filename>"),
        "unreadable": (lambda: voc_file(tmp_path, "junk", [GOOD], image=b"not a png"),
                       r"junk.xml: cannot read image .*junk.png .*; replace it, or pass data.skip_bad=true to skip "
                       "this image"),
        "malformed": (lambda: (tmp_path / "broken.xml").write_text("<annotation><object>"),
                      r"broken.xml: is not readable XML .*; fix the file, or pass data.skip_bad=true"),
    }
    for name, (make, message) in cases.items():
        make()
        with pytest.raises(LabError, match=message) as e:
            dd.read_voc(tmp_path)
        assert "\n" not in str(e.value), name
        det = dd.read_voc(tmp_path, skip_bad=True)
        assert det.names == ["ok.png"] and len(det.skipped) == 1, name
        for p in tmp_path.iterdir():
            if p.stem != "ok":
                p.unlink()
    # an XML whose <filename> is stale still finds its image by stem; one without objects is kept, empty
    voc_file(tmp_path, "other", [], filename="other.tif")
    det = dd.read_voc(tmp_path)
    assert det.names == ["ok.png", "other.png"] and det.targets[1]["boxes"].shape == (0, 4)


def coco_file(folder: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((48, 64), 5, np.uint8)).save(folder / "a.png")
    doc = {"images": images or [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10]}, *annotations],
           "categories": [{"id": 7, "name": "late"}, {"id": 3, "name": "early"}]}
    path = folder / "instances.json"
    path.write_text(json.dumps(doc))
    return path


COCO_CASES = {
    "zero area": ({"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]},
                  r"image id 1 \(a.png\): annotation id 2 bbox \[5, 5, 0, 4\] has zero area"),
    "outside": ({"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 5, 10, 4]},
                r"annotation id 2 bbox \[60, 5, 10, 4\] lies outside the 64x48 image \(COCO bbox"),
    "unknown category": ({"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},
                         r"annotation id 2 has category_id 9, which is not in 'categories'"),
    "no bbox": ({"id": 2, "image_id": 1, "category_id": 3}, r"annotation id 2 has no bbox of four numbers"),
    "unknown image": ({"id": 2, "image_id": 5, "category_id": 3, "bbox": [1, 1, 2, 2]},
                      r"annotation id 2 refers to image id 5, which is not in 'images'; fix its image_id"),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_each_bad_coco_annotation_gets_one_line_or_is_skipped(tmp_path, case):
    extra, message = COCO_CASES[case]
    path = coco_file(tmp_path, [extra])
    with pytest.raises(LabError, match=message) as e:
        dd.read_coco(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ") and "data.skip_bad=true" in str(e.value)
    det = dd.read_coco(path, skip_bad=True)
    assert len(det.skipped) == 1 and det.classes == ("early", "late")  # ordered by category id
    assert det.targets[0]["boxes"].tolist() == [[0, 0, 10, 10]] and det.targets[0]["labels"].tolist() == [0]


def test_coco_crowds_missing_images_and_broken_files(tmp_path):
    crowd = {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}
    path = coco_file(tmp_path, [crowd], images=[{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                                                {"id": 2, "file_name": "gone.png", "width": 64, "height": 48}])
    with pytest.raises(LabError, match=r"image id 2 \(gone.png\): image gone.png not found in .*; add the image or "
                                       "fix its file_name, or pass data.skip_bad=true to skip this image"):
        dd.read_coco(path)
    det = dd.read_coco(path, skip_bad=True, channels=1)
    assert det.names == ["a.png"] and det.images[0].shape == (1, 48, 64) and len(det.targets[0]["boxes"]) == 1
    assert len(det.skipped) == 2 and any("crowd region (iscrowd=1)" in s for s in det.skipped)
    path.write_text("{not json")
    with pytest.raises(LabError, match=r"instances.json is not valid JSON"):
        dd.read_coco(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(LabError, match=r"is not a COCO instances file: it needs the lists"):
        dd.read_coco(path)


# ---- configs --------------------------------------------------------------------------------------------

def config(name: str, **overrides) -> dict:
    cfg = OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
    return {**OmegaConf.to_container(cfg, resolve=True), **overrides}


def test_configs_have_the_task_keys_and_no_classification_ones():
    for name in ("digit_scenes", "trees", "voc_folder", "coco"):
        text = (REPO / "conf" / "data" / f"{name}.yaml").read_text()
        cfg = config(name)
        assert text.startswith("#") and "python -m lab " in text.splitlines()[2] + text.splitlines()[3], name
        assert "defaults" not in cfg and "image_size" not in cfg and cfg["name"] == name
        assert (cfg["batch_size"], cfg["eval_batch_size"]) == (16, 32)
        assert cfg["augment"] == ({} if name == "digit_scenes" else {"hflip": 0.5})


def test_voc_folder_splits_by_folders_or_a_fixed_draw(tmp_path):
    base = mixed()
    dd.write_voc(dd.Detections(base.images[:2], base.targets[:2], ["t1.png", "t2.png"], base.classes), tmp_path / "s"
                 / "train")
    dd.write_voc(dd.Detections(base.images[2:], base.targets[2:], ["v1.png"], base.classes), tmp_path / "s" / "val")
    train = dd.from_config(config("voc_folder", path=str(tmp_path / "s")), "train")
    test = dd.from_config(config("voc_folder", path=str(tmp_path / "s")), "test")
    assert train.names == ["t1.png", "t2.png"] and test.names == ["v1.png"]
    assert train.classes == test.classes == ("cat", "dog", "tree")  # names found in both splits
    assert test.targets[0]["labels"].tolist() == [2]
    flat = dd.Detections([base.images[1]] * 10, [base.targets[1]] * 10, [f"{i}.png" for i in range(10)], ("x",))
    dd.write_voc(flat, tmp_path / "flat")
    cfg = config("voc_folder", path=str(tmp_path / "flat"), test_fraction=0.2, classes=["x"])
    train, test = dd.from_config(cfg, "train"), dd.from_config(cfg, "test")
    assert len(train.names) == 8 and len(test.names) == 2 and not set(train.names) & set(test.names)
    assert dd.from_config(cfg, "test").names == test.names  # a fixed draw
    assert len(dd.from_config({**cfg, "subset": 3}, "train").names) == 3
    with pytest.raises(LabError, match=r"data=voc_folder needs data.path=DIR"):
        dd.from_config(config("voc_folder"), "train")
    with pytest.raises(LabError, match=r"has no test images: set data.test_fraction>0"):
        dd.from_config({**cfg, "test_fraction": 0}, "test")
    (tmp_path / "flat" / "train").mkdir()
    with pytest.raises(LabError, match=r"flat has train/ but not both train/ and test/ \(or val/\); add the other"):
        dd.from_config(cfg, "train")


def test_coco_config_splits_and_checks_the_test_categories(tmp_path):
    base = mixed()
    dd.write_coco(base, tmp_path / "c" / "train")
    dd.write_coco(dd.Detections(base.images[2:], base.targets[2:], ["v.png"], base.classes), tmp_path / "c" / "test")
    test = dd.from_config(config("coco", path=str(tmp_path / "c")), "test")
    assert test.names == ["v.png"] and test.classes == base.classes and test.targets[0]["labels"].tolist() == [2]
    assert dd.from_config(config("coco", path=str(tmp_path / "c")), "train").names == ["a.png", "b.png", "c.png"]
    dd.write_coco(dd.Detections(base.images[2:], base.targets[2:], ["v.png"], ("cat", "dog", "bush")),
                  tmp_path / "c" / "test")
    with pytest.raises(LabError, match=r"has class 'bush', not one of \['cat', 'dog', 'tree'\]; use the same "
                                       "categories in every split"):
        dd.from_config(config("coco", path=str(tmp_path / "c")), "test")
    whole = config("coco", path=str(tmp_path / "c" / "train" / "instances.json"), test_fraction=0.34)
    assert len(dd.from_config(whole, "test").names) == 1 and len(dd.from_config(whole, "train").names) == 2
