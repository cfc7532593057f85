"""Object detection: a torchvision detector (vision/detectors.py) on boxes from vision/detection_data.py.

Config: `model` (conf/model/faster_rcnn.yaml | fcos.yaml | retinanet.yaml), `optimizer`, `scheduler`,
`data` (conf/data/digit_scenes | trees | voc_folder | coco: the set, `batch_size`, `eval_batch_size` and
`augment`, box-aware torchvision.transforms.v2 below) and `detection` (what the media show).

Evaluation is COCO's (torchmetrics' MeanAveragePrecision over pycocotools' COCOeval): mAP@[.5:.95]
(`eval/map`, the main metric), AP50, AP75, AP by object size and recall at 1/10/100 detections, per-class
AP; a detection counts at IoU >= 0.5 for AP50. Each evaluation also writes `media/`: test images with the
ground truth (green) beside the predictions (class and score, at `detection.score_threshold` or above; in
W&B the raw images with native box overlays, both sets, every score), the precision-recall curve of each
class at IoU 0.5 (PNG) and a table of per-class AP (CSV, a W&B Table). `detection.max_detections` boxes per
image count (COCO's 100 by default); `detection.window` detects images larger than its size in overlapping
sliding windows (`Detection._windowed`), for the test split and `mode=predict`; `detection.tta` detects each
such image in flipped (and turned) views too and merges them by weighted box fusion.

    python -m lab +experiment=detect_digits mode=eval checkpoint=RUN/checkpoints/best.pt
    python -m lab +experiment=detect_digits mode=predict checkpoint=RUN/checkpoints/best.pt input=DIR
        # every image of DIR with its boxes -> <run dir>/predictions/, and one COCO results JSON

`augment` keys (each off when 0, null or false): `hflip` and `vflip` (probabilities), `zoom_out` (the
largest canvas side as a multiple of the image, e.g. 2.0, applied with probability 0.5), `iou_crop` (SSD's
random crop that keeps objects), `photometric` (probability of torchvision's photometric distortion, RGB
only). Boxes move with the pixels (`tv_tensors.BoundingBoxes`); boxes cropped to nothing are dropped
(`SanitizeBoundingBoxes`).
"""

from __future__ import annotations

import contextlib
import io as stdio
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from lab import io, media
from lab.config import build
from lab.errors import LabError
from lab.plots import plt
from lab.task import RunContext
from vision import detection_data
from vision.image_task import ImageTask, augment_steps, input_images

AUGMENT_KEYS = ("hflip", "vflip", "rotate90", "zoom_out", "iou_crop", "photometric")


def augmentation(spec: Any, channels: int) -> Callable | None:
    """torchvision.transforms.v2 that move boxes with the pixels, from `data.augment`; None when all are off."""
    from torchvision.transforms import v2

    spec, first, last = augment_steps(spec, AUGMENT_KEYS, channels, "detection")
    middle: list[Any] = []
    if spec.get("zoom_out"):
        middle.append(v2.RandomZoomOut(fill=0, side_range=(1.0, float(spec["zoom_out"])), p=0.5))
    if spec.get("iou_crop"):
        middle.append(v2.RandomIoUCrop())
    steps = [*first, *middle, *last]
    if not steps:
        return None
    return v2.Compose([*steps, v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)])


class DetectionLoader:
    """Batches `(images, targets)` of a `Detections` set: images a list of float [0, 1] tensors on the device
    (sizes may differ: the detector resizes and pads them), targets a list of {"boxes", "labels"}. Shuffled by
    a permutation of `(seed, epoch)`, so a resumed run sees the same batches; each rank takes its own share."""

    def __init__(self, det: detection_data.Detections, batch_size: int, device: torch.device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, transform: Callable | None = None):
        self.det, self.batch_size, self.device, self.seed = det, batch_size, device, seed
        self.rank, self.world_size, self.transform, self.epoch = rank, world_size, transform, 0
        self.per_rank = len(det.images) // world_size
        if batch_size < 1 or self.per_rank < batch_size:
            raise LabError(f"{len(det.images)} training images over {world_size} rank(s) make no batch of "
                           f"{batch_size}; lower data.batch_size or use more data")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def sample(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.det.images[i], self.det.targets[i]
        if self.transform is not None:
            from torchvision import tv_tensors

            boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
            image, target = self.transform(tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"]})
            image, target = image.as_subclass(torch.Tensor), {"boxes": target["boxes"].as_subclass(torch.Tensor),
                                                              "labels": target["labels"]}
        return (image.to(self.device).float() / 255,
                {"boxes": target["boxes"].to(self.device), "labels": target["labels"].to(self.device)})

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.det.images), generator=g)[self.rank: self.per_rank * self.world_size:
                                                                  self.world_size].tolist()
        for b in range(len(self)):
            images, targets = zip(*(self.sample(i) for i in order[b * self.batch_size: (b + 1) * self.batch_size]))
            yield list(images), list(targets)


class Detection(ImageTask):
    main_metric = "eval/map"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        d = cfg.data
        self.train_set = detection_data.from_config(d, "train")
        self.test_set = detection_data.from_config(d, "test")
        self.classes = tuple(self.train_set.classes)
        if tuple(self.test_set.classes) != self.classes:
            raise LabError(f"the test split's classes {list(self.test_set.classes)} differ from the training "
                           f"split's {list(self.classes)}; give both splits the same classes (VOC: data.classes)")
        channels = int(self.train_set.images[0].shape[0])
        self.model = build(cfg.model, "model", num_classes=len(self.classes), in_channels=channels,
                           _recursive_=False)  # model.backbone is built by the detector
        self.loader = DetectionLoader(self.train_set, int(d.batch_size), ctx.device, seed=ctx.seed,
                                      rank=ctx.dist.rank, world_size=ctx.dist.world_size,
                                      transform=augmentation(d.get("augment"), channels))
        self.eval_batch_size = int(d.eval_batch_size)
        self.show = cfg.detection
        self.max_detections = check_max_detections(cfg.detection.get("max_detections") or 100)  # before training
        self.window = window_config(cfg.detection.get("window"))
        self.tta = tta_config(cfg.detection.get("tta"))
        self.extra_iou = extra_iou_config(cfg.detection.get("extra_iou"))
        skipped = [*self.train_set.skipped, *self.test_set.skipped]
        self.describe({"data/train_images": len(self.train_set.images), "data/test_images": len(self.test_set.images),
                       "data/train_boxes": sum(len(t["labels"]) for t in self.train_set.targets),
                       "data/test_boxes": sum(len(t["labels"]) for t in self.test_set.targets),
                       "data/skipped_annotations": len(skipped)})
        if ctx.dist.is_main and skipped:
            io.write_text(ctx.run_dir / "skipped_annotations.txt", "\n".join(skipped) + "\n")
            print(f"[lab] data.skip_bad: skipped {len(skipped)} bad annotation(s), listed in "
                  f"{ctx.run_dir / 'skipped_annotations.txt'}", flush=True)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]], optim) -> dict:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        optim.step("model", loss)
        return {"loss": loss, **losses}

    # ---- evaluation ------------------------------------------------------------------------------
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (boxes xyxy, scores, 0-based labels) on CPU for uint8 images, `eval_batch_size` at a time;
        with `detection.window`, an image wider or taller than the window is detected window by window; with
        `detection.tta`, every image is detected in each view (flipped, turned) and the views' boxes, mapped
        back, are merged by weighted box fusion."""
        if self.tta is None:
            return self._detect(images)
        views, iou = self.tta
        seen = [self._detect([view(x, v) for x in images]) for v in views]
        out = []
        for i, x in enumerate(images):
            parts = [(unview(p[i]["boxes"], v, tuple(x.shape[-2:])), p[i]["scores"], p[i]["labels"])
                     for v, p in zip(views, seen)]
            b, s, lab = (torch.cat(t) for t in zip(*parts))
            b, s, lab = weighted_box_fusion(b, s, lab, len(views), iou)
            out.append({"boxes": b[: self.max_detections], "scores": s[: self.max_detections],
                        "labels": lab[: self.max_detections]})
        return out

    def _detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        big = [self.window is not None and max(x.shape[-2:]) > self.window[0] for x in images]
        small = iter(self._forward([x for x, b in zip(images, big) if not b]))
        return [self._windowed(x) if b else next(small) for x, b in zip(images, big)]

    def _forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(images), self.eval_batch_size):
            batch = [x.to(self.ctx.device).float() / 255 for x in images[i: i + self.eval_batch_size]]
            out += [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()}
                    for d in self.model(batch)]
        return out

    def _windowed(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sliding-window detection on one large image (as DeepForest's predict_tile): `size`x`size` windows
        `size - overlap` apart, each detected alone; a box within `edge` px of a window side that lies inside the
        image is dropped (cut by that side: the neighbouring window, overlapping it, sees the object whole when
        the object is under `overlap - edge` px), the rest shift back to image pixels and meet class-wise NMS
        at IoU `nms` across windows; the `detection.max_detections` best stay."""
        size, overlap, edge, nms = self.window
        _, h, w = image.shape
        offsets, crops = [], []
        for x, y, crop in detection_data.windows(image, size, overlap):
            offsets.append((x, y))
            crops.append(crop)
        boxes, scores, labels = [], [], []
        for (x, y), p in zip(offsets, self._forward(crops)):
            b = p["boxes"]  # within the window: with edge 0 nothing is cut
            cut = (((x > 0) & (b[:, 0] < edge)) | ((y > 0) & (b[:, 1] < edge))
                   | ((x + size < w) & (b[:, 2] > size - edge)) | ((y + size < h) & (b[:, 3] > size - edge)))
            boxes.append(b[~cut] + torch.tensor([x, y, x, y], dtype=b.dtype))
            scores.append(p["scores"][~cut])
            labels.append(p["labels"][~cut])
        b = clip_boxes_to_image(torch.cat(boxes), (h, w))  # a padded window's boxes may pass the image's edge
        s, lab = torch.cat(scores), torch.cat(labels)
        keep = batched_nms(b, s, lab, nms)[: self.max_detections]  # sorted by score, best first
        return {"boxes": b[keep], "scores": s[keep], "labels": lab[keep]}

    def evaluate(self) -> dict:
        self.log_info_once()
        preds = self.detect(self.test_set.images)
        out, per_class, curves = coco_metrics(preds, self.test_set.targets, self.classes, self.max_detections,
                                              self.extra_iou)
        self.ctx.logger.log_table("eval/per_class_ap", ["class", "AP", "AP50", f"recall@{self.max_detections}",
                                                        "test boxes"],
                                  [[c, *v.values()] for c, v in per_class.items()])
        self._pr_curves(curves)
        self._show(preds[: int(self.show.media_images)])
        return out

    def _pr_curves(self, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        fig, ax = plt.subplots(figsize=(5.2, 4))
        for name, (recall, precision) in curves.items():
            ax.plot(recall, precision, lw=1.2, label=name)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title("precision-recall per class at IoU 0.5 (test)", fontsize=9)
        ax.grid(alpha=0.3)
        if 0 < len(curves) <= 20:
            ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
        self.ctx.logger.log_image("eval/precision_recall", fig)

    def _show(self, preds: list[dict[str, torch.Tensor]]) -> None:
        """Ground truth beside predictions for the first test images (PNG), and W&B box overlays."""
        if not preds:
            return
        from torchvision.utils import make_grid

        thr = float(self.show.score_threshold)
        pairs, overlays = [], []
        for i, p in enumerate(preds):
            image, target = self.test_set.images[i], self.test_set.targets[i]
            keep = p["scores"] >= thr
            pairs += [draw(image, target["boxes"], [self.classes[k] for k in target["labels"]], "lime"),
                      draw(image, p["boxes"][keep], [f"{self.classes[k]} {s:.2f}" for k, s in
                                                     zip(p["labels"][keep].tolist(), p["scores"][keep].tolist())],
                           "red")]
            overlays.append({"image": image, "caption": self.test_set.names[i],
                             "boxes": {"predictions": wandb_boxes(p["boxes"], p["labels"], self.classes, p["scores"]),
                                       "ground_truth": wandb_boxes(target["boxes"], target["labels"], self.classes)}})
        size = max(max(x.shape[-2:]) for x in pairs)
        pairs = [torch.nn.functional.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]), value=255) for x in pairs]
        self.ctx.logger.log_overlay("eval/detections", make_grid(pairs, nrow=4, padding=4, pad_value=255), overlays)

    # ---- mode=predict --------------------------------------------------------------------------
    def predict(self, folder: Path) -> dict[str, Any]:
        """Detect on every image in `folder`: <run dir>/predictions/<name>.png with the boxes at
        `detection.score_threshold` or above, and predictions/results.json, COCO's results format (one
        {image_id, category_id, bbox [x, y, w, h], score} per detection, every score; `file_name` added;
        category ids are the 1-based class indices, as the lab's COCO files number them)."""
        files = input_images(folder)
        channels = int(self.train_set.images[0].shape[0])
        out_dir = self.ctx.run_dir / "predictions"
        thr, results = float(self.show.score_threshold), []
        for image_id, f in enumerate(files, start=1):
            image = read_image(f, channels)
            p = self.detect([image])[0]
            keep = p["scores"] >= thr
            labels = [f"{self.classes[k]} {s:.2f}" for k, s in zip(p["labels"][keep].tolist(),
                                                                 p["scores"][keep].tolist())]
            media.save_png(out_dir / f"{f.stem}.png", draw(image, p["boxes"][keep], labels, "red"))
            for box, label, score in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
                results.append({"image_id": image_id, "file_name": f.name, "category_id": int(label) + 1,
                                "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                         round(box[3] - box[1], 2)], "score": round(float(score), 4)})
        io.write_text(out_dir / "results.json", json.dumps(results))
        print(f"[lab] {len(files)} images, {len(results)} detections ({sum(r['score'] >= thr for r in results)} at "
              f"score >= {thr}): {out_dir}", flush=True)
        return {"images": len(files), "detections": len(results), "predictions": str(out_dir)}


def coco_metrics(preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
                 classes: tuple[str, ...], max_detections: int = 100, extra_iou: Sequence[float] = (),
                 ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, Any]]:
    """COCO's box evaluation (torchmetrics' MeanAveragePrecision on pycocotools) taking each image's
    `max_detections` best boxes (COCO's 100 by default; more for large images with hundreds of objects): the
    summary (map, map_50, map_75, map_small/medium/large, mar_1/10/N; a size with no test boxes left out), per
    class {AP (at [.5:.95]), AP50, recall_N, test boxes} and per class its precision-recall curve at IoU 0.5
    (COCO's 101 recall points, all sizes, N detections). `extra_iou` (e.g. [0.4]): the summary also holds AP
    at each of these IoU thresholds, `map_40`, by the same evaluation."""
    from torchmetrics.detection import MeanAveragePrecision

    n = check_max_detections(max_detections)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=True,
                                  backend="pycocotools", max_detection_thresholds=[1, 10, n])
    dets = [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds]
    truth = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets]
    metric.update(dets, truth)
    with contextlib.redirect_stdout(stdio.StringIO()):  # pycocotools prints its table on every evaluation
        r = metric.compute()
    precision = r["precision"][:, :, :, 0, -1]  # every IoU threshold, recall point and class; all areas, N boxes
    seen = precision > -1
    # COCOeval summarises map at 100 detections whatever maxDets holds (-1 without 100): take it at N, as the rest
    r["map"] = precision[seen].mean() if seen.any() else torch.tensor(-1.0)
    out = {k: float(r[k]) for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                                    "mar_1", "mar_10", f"mar_{n}") if float(r[k]) >= 0}  # -1: no such boxes
    if extra_iou:  # AP at other IoU thresholds (DeepForest counts a crown found at 0.4), all areas, N boxes
        extra = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", extended_summary=True, backend="pycocotools",
                                     iou_thresholds=[float(t) for t in extra_iou], max_detection_thresholds=[1, 10, n])
        extra.update(dets, truth)
        with contextlib.redirect_stdout(stdio.StringIO()):
            p = extra.compute()["precision"][:, :, :, 0, -1]
        for i, t in enumerate(extra_iou):
            if (p[i] > -1).any():
                out[f"map_{round(100 * float(t))}"] = float(p[i][p[i] > -1].mean())
    labels = torch.cat([t["labels"] for t in targets]) if targets else torch.zeros(0, dtype=torch.int64)
    counts = np.bincount(labels.numpy(), minlength=len(classes))
    recall = np.linspace(0, 1, r["precision"].shape[1])
    per_class, curves = {}, {}
    for j, k in enumerate(r["classes"].flatten().tolist()):
        p50 = r["precision"][0, :, j, 0, -1].numpy()  # IoU 0.5, every recall point, all areas, N detections
        seen = p50 > -1
        per_class[classes[k]] = {"ap": round(float(r["map_per_class"].flatten()[j]), 4),
                                 "ap50": round(float(p50[seen].mean()), 4) if seen.any() else -1.0,
                                 f"recall_{n}": round(float(r[f"mar_{n}_per_class"].flatten()[j]), 4),
                                 "test_boxes": int(counts[k])}
        if seen.any():
            curves[classes[k]] = (recall[seen], p50[seen])
    return out, per_class, curves


def extra_iou_config(spec: Any) -> tuple[float, ...]:
    """`detection.extra_iou` (null, or IoU thresholds such as [0.4]) as a tuple of floats in (0, 1)."""
    try:
        values = tuple(float(t) for t in (spec or ()))
    except (TypeError, ValueError):
        values = None
    if values is None or any(not 0 < t < 1 for t in values):
        raise LabError(f"detection.extra_iou={spec} must be a list of IoU thresholds between 0 and 1, e.g. [0.4]")
    return values


def check_max_detections(n: Any) -> int:
    """`detection.max_detections` as an int, at least 10 (COCO's evaluation also reports recall at 1 and 10)."""
    if int(n) < 10:
        raise LabError(f"detection.max_detections={n} must be at least 10 (COCO's evaluation also reports "
                       "recall at 1 and 10 detections); use 100 (COCO's) or more")
    return int(n)


def window_config(spec: Any) -> tuple[int, int, int, float] | None:
    """`detection.window` ({size, overlap, edge, nms}, or null: whole images) as (size, overlap, edge, nms)."""
    if spec is None or spec is False:
        return None
    unknown = set(spec) - {"size", "overlap", "edge", "nms"}
    if unknown:
        raise LabError(f"detection.window has unknown key(s) {sorted(unknown)}; use size, overlap, edge and nms")
    size, overlap, edge = int(spec.get("size", 256)), int(spec.get("overlap", 0)), int(spec.get("edge", 0))
    nms = float(spec.get("nms", 0.5))
    if size < 1 or not 0 <= overlap < size or not 0 <= edge < size // 2 or not 0 < nms <= 1:
        raise LabError(f"detection.window={dict(spec)} needs size >= 1, 0 <= overlap < size, 0 <= edge < size/2 "
                       "and 0 < nms <= 1 (e.g. {size: 256, overlap: 128, edge: 4, nms: 0.3})")
    return size, overlap, edge, nms


# Test-time views: "t" transposes (swaps height and width), "h" flips left-right, "v" flips upside down, applied
# in that order; the eight "dihedral" views are the square's symmetries (aerial images have no up and no north).
TTA_VIEWS = {"hflip": ("", "h"), "dihedral": ("", "h", "v", "hv", "t", "th", "tv", "thv")}


def tta_config(spec: Any) -> tuple[tuple[str, ...], float] | None:
    """`detection.tta` ({views: hflip | dihedral, iou}, or null: one view) as (views, fusion IoU)."""
    if spec is None or spec is False:
        return None
    unknown = set(spec) - {"views", "iou"}
    if unknown:
        raise LabError(f"detection.tta has unknown key(s) {sorted(unknown)}; use views and iou")
    views, iou = spec.get("views", "hflip"), float(spec.get("iou", 0.55))
    if views not in TTA_VIEWS or not 0 < iou <= 1:
        raise LabError(f"detection.tta={dict(spec)} needs views: {' or '.join(TTA_VIEWS)} and 0 < iou <= 1 "
                       "(e.g. {views: dihedral, iou: 0.4}); a flipped digit is no digit: use tta: null there")
    return TTA_VIEWS[views], iou


def view(image: torch.Tensor, ops: str) -> torch.Tensor:
    """A (C, H, W) image seen through `ops` (TTA_VIEWS)."""
    if "t" in ops:
        image = image.transpose(1, 2)
    if "h" in ops:
        image = image.flip(2)
    if "v" in ops:
        image = image.flip(1)
    return image.contiguous()


def unview(boxes: torch.Tensor, ops: str, size: tuple[int, int]) -> torch.Tensor:
    """xyxy boxes found in `view(image, ops)` mapped back onto the image of `size` (H, W)."""
    h, w = (size[1], size[0]) if "t" in ops else size  # the view's height and width
    if "v" in ops:
        boxes = torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)
    if "h" in ops:
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    if "t" in ops:
        boxes = boxes[:, [1, 0, 3, 2]]
    return boxes


def weighted_box_fusion(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, views: int,
                        iou: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted box fusion (Solovyev et al., 2021) of the detections of `views` views of one image, class by
    class: the best box not yet taken gathers every untaken box of its class at IoU >= `iou` with it; the
    fused box is their score-weighted mean and its score their summed score over max(`views`, their number),
    so an object every view found keeps its mean score and one view's stray box is divided by `views`. Unlike
    NMS, which keeps one view's box, the views' boxes are averaged. Returns the fused boxes, best first."""
    order = scores.argsort(descending=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    free = torch.ones(len(boxes), dtype=torch.bool)
    fused, fused_scores, fused_labels = [], [], []
    for i in range(len(boxes)):
        if not free[i]:
            continue
        group = free & (labels == labels[i]) & (box_iou(boxes[i: i + 1], boxes)[0] >= iou)
        group[i] = True
        free &= ~group
        w = scores[group]
        fused.append((boxes[group] * w[:, None]).sum(0) / w.sum())
        fused_scores.append(w.sum() / max(views, int(group.sum())))
        fused_labels.append(labels[i])
    if not fused:
        return boxes, scores, labels
    s = torch.stack(fused_scores)
    order = s.argsort(descending=True)
    return torch.stack(fused)[order], s[order], torch.stack(fused_labels)[order]


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file as a (C, H, W) uint8 tensor, RGB or grey; an unreadable file is one line."""
    image = detection_data.decode_image(path, channels)
    if isinstance(image, str):
        raise LabError(f"{path}: not a readable image ({image}); remove it from the folder or replace it")
    return image


def draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], colour: str, min_side: int = 256) -> torch.Tensor:
    """An RGB uint8 copy of `image` with `boxes` (xyxy) and their labels drawn in; a small image is first
    enlarged (nearest, by a whole factor) to about `min_side` so the labels stay legible."""
    from torchvision.utils import draw_bounding_boxes

    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    k = max(1, min_side // max(rgb.shape[-2:]))
    if k > 1:
        rgb, boxes = rgb.repeat_interleave(k, 1).repeat_interleave(k, 2), boxes * k
    if not len(boxes):
        return rgb.clone()
    return draw_bounding_boxes(rgb, boxes.float(), labels=labels, colors=colour, width=max(1, k // 2 + 1))


def wandb_boxes(boxes: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
                scores: torch.Tensor | None = None) -> dict[str, Any]:
    """`wandb.Image(boxes=...)` data for one set of boxes: pixel positions, class ids and (predictions) scores."""
    data = []
    for i, (b, k) in enumerate(zip(boxes.tolist(), labels.tolist())):
        item = {"position": {"minX": b[0], "minY": b[1], "maxX": b[2], "maxY": b[3]}, "domain": "pixel",
                "class_id": int(k), "box_caption": classes[k]}
        if scores is not None:
            item["scores"] = {"score": float(scores[i])}
            item["box_caption"] = f"{classes[k]} {float(scores[i]):.2f}"
        data.append(item)
    return {"box_data": data, "class_labels": dict(enumerate(classes))}
