"""Detection (vision/detection.py, vision/detectors.py): IoU, NMS and COCO mAP on hand-computed cases,
box-aware augmentation, lab backbones in torchvision's detectors, and a short run that learns, then
evaluates and predicts from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou, nms

from conftest import lab_env, run_lab_cases, short_run
from lab.errors import LabError
from vision import detectors
from vision.detection import augmentation, coco_metrics, extra_iou_config, wandb_boxes

GT = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 100.0, 110.0]]), "labels": torch.tensor([0, 1])}]


def test_iou_and_nms_on_hand_computed_boxes() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert box_iou(a, b).flatten().tolist() == pytest.approx([1 / 7, 4 / 16])  # 1 / (4 + 4 - 1); 4 / 16
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]  # IoU(0, 1) = 90 / 110 > 0.5: the lower score goes
    assert nms(boxes, scores, 0.85).tolist() == [0, 1, 2]  # 0.818 < 0.85: both stay


def _preds(boxes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}]


def test_map_is_one_for_perfect_boxes_and_falls_with_iou() -> None:
    out, per_class, curves = coco_metrics(_preds(GT[0]["boxes"].clone()), GT, ("a", "b"))
    assert out["map"] == pytest.approx(1.0) and out["map_50"] == 1.0 and out["map_75"] == 1.0
    assert per_class == {c: {"ap": 1.0, "ap50": 1.0, "recall_100": 1.0, "test_boxes": 1} for c in ("a", "b")}
    assert set(curves) == {"a", "b"} and curves["a"][1].min() == pytest.approx(1.0)
    maps = []
    for dx in (2.0, 6.0, 10.0, 16.0):  # both boxes shifted right: their IoU with the truth falls
        shifted = GT[0]["boxes"] + torch.tensor([dx, 0.0, dx, 0.0])
        iou = box_iou(shifted, GT[0]["boxes"]).diag()
        out, _, _ = coco_metrics(_preds(shifted), GT, ("a", "b"))
        thresholds = torch.arange(0.5, 0.96, 0.05)
        expected = (iou[0] >= thresholds - 1e-6).float().mean().item()  # box a; box b has a higher IoU
        assert out["map_50"] == (1.0 if iou.min() >= 0.5 else pytest.approx(0.5 if iou.max() >= 0.5 else 0.0))
        maps.append(out["map"])
        if dx == 10.0:  # IoU of box a: 30/50 = 0.6 -> counted at 0.5, 0.55, 0.6 (3 of 10 thresholds)
            assert iou[0] == pytest.approx(0.6) and expected == pytest.approx(0.3)
    assert maps == sorted(maps, reverse=True) and maps[0] > maps[-1] and maps[-1] < 0.2
    # AP at extra IoU thresholds: both boxes shifted to IoU 0.6 count at 0.4 and 0.55, not at 0.8
    shifted = GT[0]["boxes"] + torch.tensor([10.0, 0.0, 10.0, 0.0])
    iou = box_iou(shifted, GT[0]["boxes"]).diag()
    assert iou.tolist() == pytest.approx([0.6, 0.6])
    out = coco_metrics(_preds(shifted), GT, ("a", "b"), extra_iou=(0.4, 0.55, 0.8))[0]
    assert out["map_40"] == pytest.approx(1.0) and out["map_55"] == pytest.approx(1.0) and out["map_80"] == 0.0
    assert out["map_75"] < 1.0 and "map_40" not in coco_metrics(_preds(shifted), GT, ("a", "b"))[0]
    with pytest.raises(LabError, match="detection.extra_iou"):
        extra_iou_config([0.4, 1.5])
    wrong = _preds(GT[0]["boxes"].clone())
    wrong[0]["labels"] = torch.tensor([1, 0])  # the right places, the wrong classes
    assert coco_metrics(wrong, GT, ("a", "b"))[0]["map"] == 0.0


def test_augmentation_moves_boxes_with_the_pixels() -> None:
    from torchvision import tv_tensors

    image = torch.zeros(1, 40, 60, dtype=torch.uint8)
    image[0, 5:15, 10:30] = 255  # an object: rows 5-14, columns 10-29 -> box [10, 5, 30, 15]
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 5.0, 30.0, 15.0]]), format="XYXY", canvas_size=(40, 60))
    flip = augmentation({"hflip": 1.0, "vflip": 1.0}, channels=1)
    out, target = flip(tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([3])})
    assert target["boxes"].tolist() == [[30.0, 25.0, 50.0, 35.0]] and target["labels"].tolist() == [3]
    ys, xs = out[0].nonzero(as_tuple=True)
    assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == [30, 25, 50, 35]
    torch.manual_seed(0)
    zoom = augmentation({"zoom_out": 2.0}, channels=1)
    for _ in range(5):
        out, target = zoom(tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([3])})
        ys, xs = out[0].nonzero(as_tuple=True)
        assert target["boxes"].tolist() == [[xs.min().item(), ys.min().item(), xs.max().item() + 1.0,
                                             ys.max().item() + 1.0]]
    turn = augmentation({"rotate90": 1.0}, channels=1)  # a quarter, half or three-quarter turn
    shapes = set()
    for _ in range(8):
        out, target = turn(tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([3])})
        ys, xs = out[0].nonzero(as_tuple=True)
        shapes.add(tuple(out.shape))
        assert target["boxes"].tolist() == [[xs.min().item(), ys.min().item(), xs.max().item() + 1.0,
                                             ys.max().item() + 1.0]]
    assert shapes == {(1, 40, 60), (1, 60, 40)}
    assert augmentation({}, channels=1) is None
    with pytest.raises(LabError, match="unknown keys"):
        augmentation({"rotate": 10}, channels=1)
    with pytest.raises(LabError, match="RGB"):
        augmentation({"photometric": 0.5}, channels=1)


def test_lab_backbones_in_torchvisions_detectors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = [torch.rand(1, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 36.0, 40.0]]), "labels": torch.tensor([4])} for _ in range(2)]
    cnn = {"_target_": "vision.deep_cnn.DeepCNN"}
    two_stage = detectors.faster_rcnn(10, 1, cnn, image_size=64, levels=[8], fpn_channels=None,
                                      anchor_sizes=[[32]], min_size=64, max_size=64)
    losses = two_stage(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    two_stage.eval()
    with torch.no_grad():
        out = two_stage(images)
    assert len(out) == 2 and all(d["labels"].max() <= 9 and d["labels"].min() >= 0 for d in out if len(d["labels"]))
    resnet = {"_target_": "vision.resnet.resnet18"}
    one_stage = detectors.fcos(10, 1, resnet, image_size=64, levels=[8, 16], min_size=64, max_size=64)
    assert set(one_stage(images, targets)) == {"classification", "bbox_regression", "bbox_ctrness"}
    retina = detectors.retinanet(10, 1, resnet, image_size=64, levels=[8, 16], min_size=64, max_size=64,
                                 anchor_sizes=[[16, 24], [32, 48]])
    assert set(retina(images, targets)) == {"classification", "bbox_regression"}
    with pytest.raises(LabError, match="strides the backbone has"):
        detectors.faster_rcnn(10, 1, cnn, image_size=64, levels=[32], fpn_channels=None, anchor_sizes=[[32]])
    with pytest.raises(LabError, match="one list of sizes per map"):
        detectors.faster_rcnn(10, 1, resnet, image_size=64, levels=[8, 16], anchor_sizes=[[32]])
    with pytest.raises(LabError, match="does not run its layers in sequence"):
        detectors.faster_rcnn(10, 1, {"_target_": "vision.googlenet.GoogLeNet"}, image_size=64)
    small = detectors.faster_rcnn(10, 1, {"_target_": "vision.resnet.resnet20", "width": 8}, image_size=64,
                                  levels=[2, 4], anchor_sizes=[[16], [32]], min_size=64, max_size=64)  # strides 1, 2, 4
    assert set(small(images, targets)) == set(losses)

    # model.weights: a lab classifier's checkpoint (the trainer's {"task": {"model.<name>": ...}}) loads the backbone
    from vision.deep_cnn import DeepCNN

    classifier = DeepCNN(in_channels=1, num_classes=10, image_size=64)
    torch.save({"step": 10, "task": {f"model.{k}": v for k, v in classifier.state_dict().items()}},
               tmp_path / "best.pt")
    loaded = detectors.faster_rcnn(10, 1, cnn, image_size=64, levels=[8], fpn_channels=None, anchor_sizes=[[32]],
                                   weights=str(tmp_path / "best.pt"), freeze=True)
    body = loaded.net.backbone
    assert torch.equal(body.layers[0].weight, classifier.features[0].weight)
    assert not any(p.requires_grad for p in body.parameters())
    assert any(p.requires_grad for p in loaded.net.roi_heads.parameters())
    # model.freeze=S: the layers up to the stride-S maps are frozen (a ResNet's stem and layer1 at S=4), their
    # BatchNorm statistics kept in training; the rest trains
    part = detectors.fcos(10, 1, resnet, image_size=64, levels=[8, 16], min_size=64, max_size=64, freeze=4).train()
    layers = part.net.backbone.body.layers
    assert not any(p.requires_grad for layer in layers[:5] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[5:] for p in layer.parameters())
    assert not layers[1].training and not layers[4][0].bn1.training and layers[5][0].bn1.training
    with pytest.raises(LabError, match="a stride the backbone has"):
        detectors.fcos(10, 1, resnet, image_size=64, levels=[8, 16], freeze=3)


def test_wandb_box_data_names_classes_and_scores() -> None:
    data = wandb_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([1]), ("a", "b"), torch.tensor([0.25]))
    assert data["class_labels"] == {0: "a", 1: "b"}
    (box,) = data["box_data"]
    assert box["position"] == {"minX": 1.0, "minY": 2.0, "maxX": 3.0, "maxY": 4.0} and box["domain"] == "pixel"
    assert box["class_id"] == 1 and box["scores"] == {"score": 0.25} and box["box_caption"] == "b 0.25"


# A detect_digits run sized for the suite: 64 px scenes of 1-2 digits, the book's CNN as a one-level backbone.
TINY = ["+experiment=detect_digits", "logger=none", "trainer.progress=false", "data.size=64", "data.objects=[1,2]",
        "data.scale=[1.0,1.5]", "data.n_train=512", "data.n_test=32", "data.batch_size=8", "trainer.max_epochs=null",
        "trainer.max_steps=120", "trainer.eval_every=60", "trainer.log_every=20", "optimizer.lr=2e-3",
        "model.backbone={_target_: vision.deep_cnn.DeepCNN}", "model.levels=[8]", "model.fpn_channels=null",
        "model.anchor_sizes=[[28,42]]", "model.min_size=64", "model.max_size=64", "detection.media_images=4"]


def test_a_short_detect_digits_run_learns_then_evaluates_and_predicts(tmp_path: Path) -> None:
    run, env, losses, evals = short_run(tmp_path, TINY, "eval/map_50")
    assert losses[-1] < 0.6 * losses[0], losses
    assert evals[-1]["eval/map_50"] > 0.2 and evals[-1]["eval/map"] > 0.05, evals[-1]  # measured: 0.34, 0.13
    media = {f.name.rsplit("_", 1)[0] for f in (run / "media").iterdir()}
    assert {"eval_detections", "eval_precision_recall", "eval_per_class_ap"} <= media
    table = next((run / "media").glob("eval_per_class_ap_*.csv")).read_text().splitlines()
    assert table[0] == "class,AP,AP50,recall@100,test boxes" and len(table) > 1

    checkpoint = run / "checkpoints" / "best.pt"
    scenes_dir = tmp_path / "scenes"
    from vision import scenes

    assert scenes.main([str(scenes_dir), "--split", "test", "--n", "3", "--size", "64", "--objects", "1", "2",
                        "--scale", "1.0", "1.5", "--root", str(env["LAB_DATA_DIR"])]) == 0
    images = sorted((scenes_dir / "images").iterdir())
    (tmp_path / "inbox").mkdir()
    for f in images:
        (tmp_path / "inbox" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "inbox" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    predicted, evaluated, refused = run_lab_cases(tmp_path, [  # one process: three runs from the checkpoint
        [*TINY, "mode=predict", f"checkpoint={checkpoint}", f"input={tmp_path / 'inbox'}", f"hydra.run.dir={pred}"],
        [*TINY, "mode=eval", f"checkpoint={checkpoint}", f"hydra.run.dir={ev}"],
        [*TINY, "mode=predict", f"checkpoint={checkpoint}", f"input={tmp_path / 'nowhere'}",
         f"hydra.run.dir={tmp_path / 'pred2'}"]])
    assert predicted.returncode == 0 and evaluated.returncode == 0, predicted.stderr[-2000:] + evaluated.stderr[-2000:]
    results = json.loads((pred / "predictions" / "results.json").read_text())
    assert {r["file_name"] for r in results} <= {f.name for f in images} and results
    assert all(len(r["bbox"]) == 4 and 1 <= r["category_id"] <= 10 and 0 <= r["score"] <= 1 for r in results)
    assert sorted(f.name for f in (pred / "predictions").glob("*.png")) == [f.name for f in images]
    assert json.loads((pred / "summary.json").read_text())["status"] == "predicted"
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["eval/map"] == pytest.approx(max(r["eval/map"] for r in evals), abs=1e-6)  # best.pt's own
    assert refused.returncode == 2 and "is not a folder" in refused.stderr and "Traceback" not in refused.stderr


def test_detect_trees_and_detect_folder_smoke(tmp_path: Path) -> None:
    """Two steps of each on real data: the aerial tiles (VOC XML of trees/) and a VOC folder `scenes` wrote."""
    from vision import scenes

    env = lab_env(tmp_path, OMP_NUM_THREADS="1")
    folder = tmp_path / "voc"
    for split, n in (("train", 8), ("test", 4)):
        assert scenes.main([str(folder / split), "--split", split, "--n", str(n), "--size", "64",
                            "--root", str(env["LAB_DATA_DIR"])]) == 0
    small = ["logger=none", "trainer.progress=false", "trainer.max_epochs=null", "trainer.max_steps=2",
             "data.batch_size=2", "data.eval_batch_size=4", "detection.media_images=2", "data.test_subset=4",
             "model.rpn_post_nms_top_n_train=64", "model.box_batch_size_per_image=16"]
    cases = {"trees": ["+experiment=detect_trees", "data.subset=4", "model.min_size=128", "model.max_size=128",
                       "detection.tta.views=hflip",  # two views, not the yaml's eight
                       "model.image_size=128", *small],
             "folder": ["+experiment=detect_folder", f"data.path={folder}", "data.channels=1", "model.min_size=64",
                        "model.max_size=64", "model.image_size=64", "model.levels=[8,16]", "model.extra_pool=false",
                        "model.anchor_sizes=[[24],[48]]", *small]}
    results = run_lab_cases(tmp_path, [[*args, f"hydra.run.dir={tmp_path / name}"] for name, args in cases.items()])
    for (name, _), p in zip(cases.items(), results):
        run = tmp_path / name
        assert p.returncode == 0, (name, p.stderr[-3000:])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and 0.0 <= summary["eval/map"] <= 1.0, name
        first = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                     if "data/train_images" in line)
        assert first["data/train_images"] == (4 if name == "trees" else 8) and first["data/test_boxes"] > 0, first


class _Oracle(torch.nn.Module):
    """A "detector" that boxes each bright 20x20 square of its input (connected pixels), scored by the share of
    the square inside the input, as a real detector scores a crown cut by a tile edge lower."""

    def forward(self, crops: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from scipy import ndimage

        out = []
        for crop in crops:
            blobs, n = ndimage.label(crop[0].numpy() > 0.5)
            found = ndimage.find_objects(blobs)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in found]
            scores = [float((blobs == i + 1).sum()) / 400 for i in range(n)]
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor(scores), "labels": torch.zeros(n, dtype=torch.int64)})
        return out


def test_windowed_detection_finds_each_object_of_a_large_image_once() -> None:
    """An image larger than the window is detected in overlapping windows; objects cut by a window side come
    back whole (from the window that holds them), once each, in image pixels; small images go through whole."""
    from types import SimpleNamespace

    from vision.detection import Detection, window_config

    squares = [[10, 10, 30, 30], [50, 40, 70, 60], [110, 100, 130, 120], [150, 5, 170, 25], [180, 130, 200, 150]]
    image = torch.zeros((1, 160, 210), dtype=torch.uint8)
    for x0, y0, x1, y1 in squares:
        image[:, y0:y1, x0:x1] = 255
    task = Detection.__new__(Detection)  # the evaluation half of the task: its model, device and settings
    torch.nn.Module.__init__(task)
    task.model, task.ctx, task.eval_batch_size, task.max_detections = _Oracle(), SimpleNamespace(
        device=torch.device("cpu")), 4, 100
    task.tta = None
    truth = sorted(squares)
    for overlap, edge in ((40, 2), (40, 0)):  # windows 64 px, 24 apart; with edge 0 NMS alone merges the cuts
        task.window = window_config({"size": 64, "overlap": overlap, "edge": edge, "nms": 0.3})
        (pred,) = task.detect([image])
        found = sorted(pred["boxes"].round().int().tolist())
        if edge:  # every square lies whole in some window: exactly the truth, each once
            assert found == truth, found
        else:  # cut pieces survive where they overlap the whole square by IoU <= 0.3
            assert set(map(tuple, truth)) <= set(map(tuple, found)), found
        assert pred["scores"].tolist() == sorted(pred["scores"].tolist(), reverse=True)
    task.window = window_config({"size": 256, "overlap": 0})  # the image fits: one pass, no windows
    (whole,) = task.detect([image])
    assert sorted(whole["boxes"].int().tolist()) == truth and (whole["scores"] == 1).all()
    with pytest.raises(LabError, match=r"detection.window=.* needs size >= 1, 0 <= overlap < size"):
        window_config({"size": 64, "overlap": 64})
    with pytest.raises(LabError, match=r"detection.window has unknown key\(s\) \['stride'\]"):
        window_config({"size": 64, "stride": 32})
    with pytest.raises(LabError, match=r"detection.max_detections=5 must be at least 10"):
        coco_metrics(_preds(GT[0]["boxes"].clone()), GT, ("a", "b"), max_detections=5)
    out, per_class, _ = coco_metrics(_preds(GT[0]["boxes"].clone()), GT, ("a", "b"), max_detections=1000)
    assert out["map"] == pytest.approx(1.0) and out["mar_1000"] == 1.0 and per_class["a"]["recall_1000"] == 1.0
    shifted = _preds(GT[0]["boxes"] + torch.tensor([10.0, 0.0, 10.0, 0.0]))  # as at dx=10 above: the same mAP
    at_100, at_1000 = (coco_metrics(shifted, GT, ("a", "b"), n)[0]["map"] for n in (100, 1000))
    assert at_1000 == pytest.approx(at_100)


def test_test_time_views_map_back_and_fuse_by_weighted_box_fusion() -> None:
    """Each of the eight dihedral views of a non-square image (with windows too) finds the same squares, mapped
    back exactly, fused once each at the views' mean score; fusion averages boxes weighted by score, class by
    class, and divides a box few views found by the number of views."""
    from types import SimpleNamespace

    from vision.detection import Detection, tta_config, unview, view, weighted_box_fusion, window_config

    squares = [[10, 10, 30, 30], [50, 40, 70, 60], [110, 100, 130, 120], [150, 5, 170, 25], [180, 130, 200, 150]]
    image = torch.zeros((1, 160, 210), dtype=torch.uint8)
    for x0, y0, x1, y1 in squares:
        image[:, y0:y1, x0:x1] = 255
    for ops in tta_config({"views": "dihedral"})[0]:
        seen = view(image, ops)
        assert seen.shape[1:] == ((210, 160) if "t" in ops else (160, 210))
        (found,) = _Oracle()([seen.float() / 255])
        assert sorted(unview(found["boxes"], ops, (160, 210)).int().tolist()) == squares, ops
    task = Detection.__new__(Detection)
    torch.nn.Module.__init__(task)
    task.model, task.ctx, task.eval_batch_size, task.max_detections = _Oracle(), SimpleNamespace(
        device=torch.device("cpu")), 4, 100
    for window in (None, {"size": 64, "overlap": 40, "edge": 2, "nms": 0.3}):
        task.window, task.tta = window_config(window), tta_config({"views": "dihedral", "iou": 0.4})
        (pred,) = task.detect([image])
        assert sorted(pred["boxes"].round().int().tolist()) == squares
        assert pred["scores"].tolist() == pytest.approx([1.0] * 5)

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 10.0], [40, 40, 50, 50]])
    b, s, lab = weighted_box_fusion(boxes, torch.tensor([0.8, 0.4, 0.5, 0.6]), torch.tensor([0, 0, 1, 0]), 2, 0.55)
    # class 0: the first two (IoU 2/3) fuse to their score-weighted mean at (0.8 + 0.4) / 2; the lone boxes halve
    assert s.tolist() == pytest.approx([0.6, 0.3, 0.25])
    assert b[0].tolist() == pytest.approx([2 / 3, 0.0, 32 / 3, 10.0]) and lab.tolist() == [0, 0, 1]
    assert b[1].tolist() == [40, 40, 50, 50] and b[2].tolist() == [0, 0, 10, 10]
    assert tta_config(None) is None
    with pytest.raises(LabError, match=r"detection.tta=.* needs views: hflip or dihedral"):
        tta_config({"views": "rotate"})
    with pytest.raises(LabError, match=r"detection.tta has unknown key\(s\) \['nms'\]"):
        tta_config({"views": "hflip", "nms": 0.5})
