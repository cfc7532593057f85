"""Segmentation (vision/segmentation.py, segmenters.py, segmentation_data.py): mIoU on hand-computed masks,
the folder readers on both layouts, masks that move with their images, models that keep any input size, scene
masks where digits overlap, and a short run that learns, then evaluates and predicts from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_lab_cases, short_run
from lab.errors import LabError
from vision import scenes, segmenters
from vision.segmentation import augmentation, confusion, median_frequency_weights, scores
from vision.segmentation_data import IGNORE, Segmentations, from_folder, read_mask, save_mask, write_folder


def test_miou_of_perfect_and_known_wrong_masks_ignores_the_ignore_index() -> None:
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 1, IGNORE]], dtype=torch.uint8)
    perfect, _, _ = scores(confusion([truth.clone()], [truth], 3))
    assert perfect["miou"] == 1.0 and perfect["pixel_accuracy"] == 1.0  # class 2 is nowhere: left out
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 2]], dtype=torch.uint8)  # the 2 falls on the ignored pixel
    out, iou, acc = scores(confusion([pred], [truth], 3), background=0)
    # class 0: 4 true pixels, 3 found, 1 more predicted -> 3 / (4 + 4 - 3); class 1: 3 true, 2 found, 1 more
    assert iou[:2].tolist() == pytest.approx([3 / 5, 2 / 4]) and torch.isnan(iou[2])
    assert out["miou"] == pytest.approx(0.55) and out["miou_foreground"] == pytest.approx(0.5)
    assert out["pixel_accuracy"] == pytest.approx(5 / 7) and out["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert acc[:2].tolist() == pytest.approx([3 / 4, 2 / 3])
    wrong, _, _ = scores(confusion([1 - truth.clamp(max=1)], [truth.clamp(max=1)], 2))
    assert wrong["miou"] == 0.0 and wrong["pixel_accuracy"] == 0.0


def _set(n: int, size: tuple[int, int] = (12, 10)) -> Segmentations:
    g = torch.Generator().manual_seed(n)
    images = [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(n)]
    masks = [torch.randint(0, 3, size, generator=g, dtype=torch.uint8) for _ in range(n)]
    for m in masks:
        m[0, 0] = IGNORE
    return Segmentations(images, masks, [f"im{i}" for i in range(n)], ("bg", "a", "b"))


def test_median_frequency_weights_are_segnets_and_skip_the_ignore_index() -> None:
    masks = [torch.tensor([[0, 0, 0, 1], [0, 0, 2, 2]], dtype=torch.uint8), torch.tensor([[0, IGNORE, 2, 2]],
                                                                                        dtype=torch.uint8)]
    # frequencies: class 0 6/11, class 1 1/11, class 2 4/11, class 3 never; median of the seen ones 4/11
    w = median_frequency_weights(masks, 4)
    assert w.tolist() == pytest.approx([4 / 6, 4.0, 1.0, 0.0])


def test_folder_readers_round_trip_both_layouts_and_name_bad_files(tmp_path: Path) -> None:
    data = _set(6)
    plain, voc = tmp_path / "plain", tmp_path / "voc"
    write_folder(plain / "train", Segmentations(data.images[:4], data.masks[:4], data.names[:4], data.classes))
    write_folder(plain / "test", Segmentations(data.images[4:], data.masks[4:], data.names[4:], data.classes))
    train = from_folder(plain, "train", 3, ["bg", "a", "b"])
    assert train.classes == ("bg", "a", "b") and train.names == data.names[:4]
    assert all(torch.equal(a, b) for a, b in zip(train.images, data.images[:4]))
    assert all(torch.equal(a, b) for a, b in zip(train.masks, data.masks[:4]))
    assert from_folder(plain, "test", 3).names == data.names[4:]
    write_folder(voc, data, layout="voc")  # JPEGImages/ + SegmentationClass/, splits from ImageSets lists
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("im0\nim2\nim3\nim5\n")
    (lists / "val.txt").write_text("im1\nim4\n")
    val = from_folder(voc, "test", 3)
    assert val.names == ["im1", "im4"] and torch.equal(val.masks[1], data.masks[4])
    assert read_mask(voc / "SegmentationClass" / "im0.png").dtype == np.uint8
    drawn = from_folder(tmp_path / "plain" / "train", "test", 3, test_fraction=0.25)  # no lists: a fixed draw
    assert len(drawn.images) == 1 and drawn.names == from_folder(plain / "train", "test", 3, test_fraction=0.25).names

    bad = tmp_path / "bad"
    write_folder(bad, data)
    cases = {
        "im1.png: the mask is 9x12": lambda: save_mask(bad / "masks" / "im1.png",
                                                       torch.zeros(12, 9, dtype=torch.uint8)),
        "im2.png: the mask holds class index 7": lambda: save_mask(bad / "masks" / "im2.png",
                                                                    torch.full((12, 10), 7, dtype=torch.uint8)),
        "im3.png: is a RGB image": lambda: __import__("PIL.Image").Image.new("RGB", (10, 12)).save(bad / "masks" /
                                                                                                   "im3.png"),
        "im4.png: no mask beside it": lambda: (bad / "masks" / "im4.png").unlink(),
    }
    for message, spoil in cases.items():
        write_folder(bad, data)
        spoil()
        with pytest.raises(LabError, match=message.replace(".", r"\.")):  # in whichever split the file fell
            [from_folder(bad, split, 3) for split in ("train", "test")]
    with pytest.raises(LabError, match="3 names but data.num_classes=4"):
        from_folder(plain, "train", 4, ["bg", "a", "b"])


@pytest.mark.parametrize("spec", [{"hflip": 1.0}, {"vflip": 1.0}, {"rotate90": 1.0}, {"photometric": 1.0}, "crop"])
def test_masks_move_with_their_images(spec) -> None:
    from torchvision import tv_tensors

    torch.manual_seed(0)
    image = torch.zeros(3, 30, 20, dtype=torch.uint8)
    image[:, 3:11, 2:9] = 200
    image[:, 20:28, 12:18] = 100
    mask = (image[0] > 0).to(torch.uint8) + (image[0] == 100).to(torch.uint8)  # 0, 1 (the 200s), 2 (the 100s)
    crop = spec == "crop"
    t = augmentation({} if crop else spec, channels=3, crop_size=24 if crop else None)
    for _ in range(6):
        out, m = t(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert out.shape[-2:] == m.shape[-2:]
        kept = m != IGNORE  # crop pads a 20 px side to 24 with the ignore index
        assert torch.equal(m[kept] > 0, (out[0] > 0)[kept]) or "photometric" in str(spec)
        if crop:
            assert tuple(m.shape) == (24, 24) and (~kept).sum() >= 4 * 24 and (out[:, ~kept] == 0).all()
        if spec == {"photometric": 1.0}:
            assert torch.equal(m, mask)  # colours change, the mask does not
    with pytest.raises(LabError, match="unknown keys"):
        augmentation({"zoom": 1.0}, channels=3)


def test_every_model_returns_the_inputs_height_and_width(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = {"fcn": segmenters.fcn(11, 1, {"_target_": "vision.resnet.resnet18"}, image_size=64, levels=[4, 8, 16]),
              "segnet": segmenters.segnet(11, 1, widths=[8, 16]), "unet": segmenters.unet(11, 1, widths=[8, 16, 32]),
              "fcn_refine": segmenters.fcn(11, 1, {"_target_": "vision.resnet.resnet18"}, image_size=64,
                                           levels=[4, 8, 16], refine=8),
              "lraspp": segmenters.torchvision_model("lraspp_mobilenet_v3_large", 11, 1)}
    for name, m in models.items():
        m.eval()
        for h, w in ((32, 32), (33, 47), (65, 31)):
            assert m(torch.rand(2, 1, h, w)).shape == (2, 11, h, w), (name, h, w)
    # the refinement starts as a no-op: with the same FCN weights, the same scores until it trains
    plain, refined = models["fcn"], models["fcn_refine"]
    refined.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 1, 33, 47)
    assert torch.allclose(refined(x), plain(x), atol=1e-6)
    assert sum(p.numel() for p in refined.refine.parameters()) > 0
    # model.weights for a torchvision model: its own state dict loads; a head for other classes is skipped
    other = segmenters.torchvision_model("lraspp_mobilenet_v3_large", 5, 3)
    torch.save(other.net.state_dict(), tmp_path / "lraspp.pth")
    loaded = segmenters.torchvision_model("lraspp_mobilenet_v3_large", 11, 3, weights=str(tmp_path / "lraspp.pth"))
    first = next(iter(other.net.backbone.state_dict()))
    assert torch.equal(loaded.net.backbone.state_dict()[first], other.net.backbone.state_dict()[first])
    with pytest.raises(LabError, match="not a torchvision segmentation model"):
        segmenters.torchvision_model("resnet18", 11, 3)


def test_scene_masks_follow_the_digit_drawn_last() -> None:
    g = torch.Generator().manual_seed(0)
    digits = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 6:22, 8:20] = torch.randint(1, 256, (20, 1, 16, 12), generator=g, dtype=torch.uint8)
    s = scenes.make_scenes(digits, torch.arange(20) % 10, [str(i) for i in range(10)], 40, 48, (3, 5), (1.0, 1.5),
                           seed=1, overlap=True)
    masks = s.class_masks(threshold=40)
    covered = 0
    for i in range(len(masks)):
        for j, (box, k) in enumerate(zip(s.boxes[i].long().tolist(), s.labels[i].tolist())):
            ys, xs = torch.nonzero(s.instances[i] == j + 1, as_tuple=True)  # what shows of object j
            assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == box
            lit = (s.instances[i] == j + 1) & (s.images[i, 0] > 40)
            assert (masks[i][lit] == k + 1).all() and (masks[i][s.images[i, 0] <= 40] == 0).all()
            covered += (box[2] - box[0]) * (box[3] - box[1]) < 16 * 12  # a box smaller than the digit's: covered
    assert covered > 0  # the scenes do overlap
    plain = scenes.make_scenes(digits, torch.arange(20) % 10, [str(i) for i in range(10)], 40, 48, (3, 5),
                               (1.0, 1.5), seed=1)
    from torchvision.ops import box_iou

    assert all((box_iou(b, b) - torch.eye(len(b))).abs().max() == 0 for b in plain.boxes)  # never overlapping


# A segment_digits run sized for the suite: 640 scenes, FCN on ResNet-18 with skips from strides 2 to 16 (at 64 px
# it learns which digit a pixel belongs to much sooner than the small U-Net; about a minute on one thread).
TINY = ["+experiment=segment_digits", "logger=none", "trainer.progress=false", "model=fcn", "model.levels=[2,4,8,16]",
        "data.n_train=640", "data.n_test=40", "data.batch_size=16", "trainer.max_epochs=null", "trainer.max_steps=160",
        "trainer.eval_every=80", "trainer.log_every=20", "segmentation.media_images=3"]


def test_a_short_segment_digits_run_learns_then_evaluates_and_predicts(tmp_path: Path) -> None:
    run, env, losses, evals = short_run(tmp_path, TINY, "eval/miou")
    assert losses[-1] < 0.4 * losses[0], losses
    assert evals[-1]["eval/miou"] > 0.3 and evals[-1]["eval/miou_foreground"] > 0.2, evals[-1]  # measured 0.46, 0.41
    assert evals[-1]["eval/pixel_accuracy"] > 0.92, evals[-1]  # measured 0.95; all background: about 0.86
    media = {f.name.rsplit("_", 1)[0] for f in (run / "media").iterdir()}
    assert {"eval_segmentations", "eval_per_class_iou", "eval_per_class_iou_chart"} <= media
    table = next((run / "media").glob("eval_per_class_iou_*.csv")).read_text().splitlines()
    assert table[0] == "class,IoU,accuracy,test pixels" and len(table) == 12

    checkpoint = run / "checkpoints" / "best.pt"
    inbox = tmp_path / "inbox"
    test = Segmentations(*_scene_files(env), ("x",))
    write_folder(tmp_path / "scenes", test)
    inbox.mkdir()
    for f in sorted((tmp_path / "scenes" / "images").iterdir()):
        (inbox / f.name).write_bytes(f.read_bytes())
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    predicted, evaluated, folder = run_lab_cases(tmp_path, [
        [*TINY, "mode=predict", f"checkpoint={checkpoint}", f"input={inbox}", f"hydra.run.dir={pred}"],
        [*TINY, "mode=eval", f"checkpoint={checkpoint}", f"hydra.run.dir={ev}"],
        ["+experiment=segment_folder", "logger=none", "trainer.progress=false", f"data.path={tmp_path / 'scenes'}",
         "data.num_classes=11", "data.channels=1", "data.test_fraction=0.5", "data.batch_size=2", "data.crop_size=48",
         "trainer.max_epochs=null", "trainer.max_steps=2", "model.widths=[8,16]", f"hydra.run.dir={tmp_path / 'f'}"]])
    assert predicted.returncode == 0 and evaluated.returncode == 0, predicted.stderr[-2000:] + evaluated.stderr[-2000:]
    written = sorted((pred / "predictions").glob("*.png"))
    assert [f.name for f in written] == sorted(f.name for f in inbox.iterdir())
    assert all(read_mask(f).shape == (64, 64) and read_mask(f).max() <= 10 for f in written)
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["eval/miou"] == pytest.approx(max(r["eval/miou"] for r in evals), abs=1e-6)  # best.pt's own
    assert folder.returncode == 0, folder.stderr[-2000:]
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["status"] == "completed"


def _scene_files(env: dict[str, str]) -> tuple[list, list, list]:
    from vision import segmentation_data

    d = {"name": "digit_masks", "root": env["LAB_DATA_DIR"], "size": 64, "objects": [1, 3], "scale": [1.0, 1.5],
         "n_train": 4, "n_test": 4, "seed": 0, "channels": 1, "overlap": True, "mask_threshold": 48}
    s = segmentation_data.from_config(d, "test")
    return s.images, s.masks, s.names
