"""Semantic segmentation: a class for every pixel (vision/segmenters.py) on masks from vision/segmentation_data.py.

Config: `model` (conf/model/fcn.yaml | segnet.yaml | unet.yaml | tv_segmentation.yaml), `optimizer`,
`scheduler`, `data` (conf/data/digit_masks | seg_folder: the set, `batch_size`, `eval_batch_size`,
`crop_size` and `augment`) and `segmentation` (the background class, what the media show).

The loss is the per-pixel cross-entropy, pixels of the ignore index (255) left out. Evaluation is the
confusion-matrix method of torchvision's segmentation reference over every test pixel but the ignored ones:
`eval/miou` (the main metric: IoU = TP / (TP + FP + FN) per class, averaged over the classes that occur in
the truth or the predictions), `eval/miou_foreground` (the same without `segmentation.background`),
`eval/pixel_accuracy` and `eval/mean_accuracy` (per-class recall, averaged). Each evaluation writes
`media/`: test images with the true and the predicted masks overlaid (PNG; in W&B the raw images with native
mask overlays, each class toggled on its own), per-class IoU as a table (CSV, W&B Table) and a bar chart.

    python -m lab +experiment=segment_digits model=segnet
    python -m lab +experiment=segment_digits mode=predict checkpoint=RUN/checkpoints/best.pt input=DIR
        # a palette PNG of class indices per image of DIR -> <run dir>/predictions/

`augment` keys (each off when 0, null or false): `hflip`, `vflip` (probabilities), `rotate90` (with this
probability a quarter, half or three-quarter turn), `photometric` (RGB only). `data.crop_size`: random
crops of that side for training (padded with the ignore index where an image is smaller), needed when the
training images differ in size. Masks move with the pixels (`tv_tensors.Mask`, nearest-neighbour).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lab import io
from lab.config import build
from lab.errors import LabError
from lab.plots import plt
from lab.task import RunContext
from vision import segmentation_data
from vision.detection import read_image
from vision.image_task import ImageTask, augment_steps, input_images
from vision.segmentation_data import IGNORE, save_mask, voc_palette

AUGMENT_KEYS = ("hflip", "vflip", "rotate90", "photometric")


def augmentation(spec: Any, channels: int, crop_size: int | None = None) -> Callable | None:
    """torchvision.transforms.v2 that move masks with the pixels, from `data.augment` and `data.crop_size`."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    _, first, last = augment_steps(spec, AUGMENT_KEYS, channels, "segmentation")
    crop = [v2.RandomCrop(int(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE})
            ] if crop_size else []
    steps = [*first, *crop, *last]
    return v2.Compose(steps) if steps else None


class SegLoader:
    """Batches (images (B, C, H, W) float in [0, 1], masks (B, H, W) int64) on the device, shuffled by a
    permutation of `(seed, epoch)` (a resumed run sees the same batches), each rank its own share. Without a
    transform the whole set is stacked on the device once."""

    def __init__(self, seg: segmentation_data.Segmentations, batch_size: int, device: torch.device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, transform: Callable | None = None, crop_size: int | None = None):
        self.seg, self.batch_size, self.device, self.seed, self.transform = seg, batch_size, device, seed, transform
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.per_rank = len(seg.images) // world_size
        if batch_size < 1 or self.per_rank < batch_size:
            raise LabError(f"{len(seg.images)} training images over {world_size} rank(s) make no batch of "
                           f"{batch_size}; lower data.batch_size or use more data")
        sizes = {tuple(x.shape[-2:]) for x in seg.images}
        if len(sizes) > 1 and not crop_size:
            a, b = sorted(sizes)[:2]
            raise LabError(f"the training images differ in size ({a[1]}x{a[0]}, {b[1]}x{b[0]}, ...); set "
                           "data.crop_size (e.g. 256) to train on random crops of one size")
        self.stacked = None
        if transform is None:
            self.stacked = (torch.stack(seg.images).to(device), torch.stack(seg.masks).to(device))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def _sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image, mask = self.transform(tv_tensors.Image(self.seg.images[i]), tv_tensors.Mask(self.seg.masks[i]))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.seg.images), generator=g)[self.rank: self.per_rank * self.world_size:
                                                                 self.world_size]
        for b in range(len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            if self.stacked is not None:
                images, masks = self.stacked[0][idx.to(self.device)], self.stacked[1][idx.to(self.device)]
            else:
                images, masks = (torch.stack(t).to(self.device) for t in zip(*(self._sample(i) for i in idx.tolist())))
            yield images.float() / 255, masks.long()


def confusion(preds: list[torch.Tensor], masks: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts, rows the true class, columns the predicted one; ignored pixels left out
    (as torchvision's segmentation reference counts them)."""
    out = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for p, t in zip(preds, masks):
        t, p = t.flatten().long(), p.flatten().long()
        keep = (t >= 0) & (t < num_classes)
        out += torch.bincount(num_classes * t[keep] + p[keep], minlength=num_classes**2).reshape(num_classes,
                                                                                                  num_classes)
    return out


def scores(conf: torch.Tensor, background: int | None = None) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Summary metrics, per-class IoU and per-class accuracy (NaN for a class absent from truth and
    predictions alike, left out of the means) from a confusion matrix."""
    h = conf.double()
    tp, truth, predicted = h.diag(), h.sum(1), h.sum(0)
    iou = tp / (truth + predicted - tp)  # 0 / 0 = NaN: the class is nowhere
    acc = tp / truth
    out = {"miou": float(iou.nanmean()), "pixel_accuracy": float(tp.sum() / h.sum().clamp(min=1)),
           "mean_accuracy": float(acc.nanmean())}
    if background is not None:
        fg = torch.ones(len(iou), dtype=torch.bool)
        fg[background] = False
        out["miou_foreground"] = float(iou[fg].nanmean())
    return out, iou, acc


def median_frequency_weights(masks: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """SegNet's median frequency balancing: each class's weight is the median of the class pixel frequencies
    over its own (ignored pixels not counted; a class with no pixel weighs 0)."""
    counts = sum(torch.bincount(m[m != IGNORE].long().flatten(), minlength=num_classes).double() for m in masks)
    freq = counts / counts.sum()
    seen = freq > 0
    return torch.where(seen, freq[seen].median() / freq.clamp(min=1e-12), torch.zeros_like(freq)).float()


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.6, skip: int | None = None) -> torch.Tensor:
    """An RGB uint8 copy of `image` with each class of `mask` painted in its VOC colour (the ignore index
    white; `skip`, e.g. the background, left unpainted)."""
    from torchvision.utils import draw_segmentation_masks

    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    present = [k for k in torch.unique(mask).tolist() if k != skip]
    if not present:
        return rgb.clone()
    palette = voc_palette()
    colours = [(255, 255, 255) if k == IGNORE else tuple(palette[3 * k: 3 * k + 3]) for k in present]
    return draw_segmentation_masks(rgb, torch.stack([mask == k for k in present]), alpha=alpha, colors=colours)


def wandb_masks(pred: torch.Tensor, truth: torch.Tensor, classes: tuple[str, ...]) -> dict[str, Any]:
    """`wandb.Image(masks=...)` data: the predicted and the true mask, each class named (255: "ignore")."""
    labels = dict(enumerate(classes)) | {IGNORE: "ignore"}
    return {"predictions": {"mask_data": pred.numpy(), "class_labels": labels},
            "ground_truth": {"mask_data": truth.numpy(), "class_labels": labels}}


class Segmentation(ImageTask):
    main_metric = "eval/miou"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        d = cfg.data
        self.train_set = segmentation_data.from_config(d, "train")
        self.test_set = segmentation_data.from_config(d, "test")
        self.classes = tuple(self.train_set.classes)
        self.channels = int(self.train_set.images[0].shape[0])
        self.model = build(cfg.model, "model", num_classes=len(self.classes), in_channels=self.channels,
                           _recursive_=False)  # model.backbone (fcn) is built by the model
        crop = d.get("crop_size")
        if (d.get("augment") or {}).get("rotate90") and not crop and any(x.shape[-1] != x.shape[-2]
                                                                        for x in self.train_set.images):
            raise LabError("data.augment.rotate90 turns a non-square image on its side, so a batch would mix "
                           "shapes; set data.crop_size (square crops) or drop rotate90")
        self.loader = SegLoader(self.train_set, int(d.batch_size), ctx.device, seed=ctx.seed, rank=ctx.dist.rank,
                                world_size=ctx.dist.world_size,
                                transform=augmentation(d.get("augment"), self.channels, crop), crop_size=crop)
        self.eval_batch_size = int(d.eval_batch_size)
        self.show = cfg.segmentation
        self.background = self.show.get("background")
        if self.background is not None and not 0 <= int(self.background) < len(self.classes):
            raise LabError(f"segmentation.background={self.background} is not a class index "
                           f"(0..{len(self.classes) - 1}); give the background's index, or null when there is none")

        def pixels(s: segmentation_data.Segmentations) -> int:
            return sum(int((m != IGNORE).sum()) for m in s.masks)

        self.class_weight = None
        if self.show.get("class_weight") == "median_frequency":
            self.class_weight = median_frequency_weights(self.train_set.masks, len(self.classes)).to(ctx.device)
        elif self.show.get("class_weight") not in (None, "none"):
            raise LabError(f"segmentation.class_weight={self.show.get('class_weight')!r} is unknown; use none or "
                           "median_frequency")
        self.describe({"data/train_images": len(self.train_set.images), "data/test_images": len(self.test_set.images),
                       "data/train_pixels": pixels(self.train_set), "data/test_pixels": pixels(self.test_set)})

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], optim) -> dict:
        images, masks = batch
        if self.ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.model(images).float(), masks, weight=self.class_weight, ignore_index=IGNORE)
        optim.step("model", loss)
        return {"loss": loss}

    # ---- evaluation ------------------------------------------------------------------------------
    def segment(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Predicted (H, W) uint8 masks on CPU for uint8 images; images of one size go `eval_batch_size` at a time."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(images):
            j = i + 1
            while j < len(images) and j - i < self.eval_batch_size and images[j].shape == images[i].shape:
                j += 1
            x = torch.stack(images[i:j]).to(self.ctx.device).float() / 255
            if self.ctx.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out += list(self.model(x).argmax(1).to(torch.uint8).cpu())
            i = j
        return out

    def evaluate(self) -> dict:
        self.log_info_once()
        preds = self.segment(self.test_set.images)
        conf = confusion(preds, self.test_set.masks, len(self.classes))
        out, iou, acc = scores(conf, None if self.background is None else int(self.background))
        pixels = conf.sum(1).tolist()
        rows = [[c, _r(iou[k]), _r(acc[k]), pixels[k]] for k, c in enumerate(self.classes)]
        self.ctx.logger.log_table("eval/per_class_iou", ["class", "IoU", "accuracy", "test pixels"], rows)
        self._iou_chart(iou)
        self._show(preds[: int(self.show.media_images)])
        return out

    def _iou_chart(self, iou: torch.Tensor) -> None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(self.classes) + 1.5), 3.2))
        values = iou.nan_to_num(0).tolist()
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), self.classes, rotation=90 if len(values) > 12 else 0, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("IoU")
        ax.set_title(f"per-class IoU (test), mean {float(iou.nanmean()):.3f}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        self.ctx.logger.log_image("eval/per_class_iou_chart", fig)

    def _show(self, preds: list[torch.Tensor]) -> None:
        """Image, truth and prediction side by side for the first test images (PNG), and W&B mask overlays."""
        if not preds:
            return
        from torchvision.utils import make_grid

        tiles, overlays = [], []
        skip = None if self.background is None else int(self.background)
        for i, p in enumerate(preds):
            image, truth = self.test_set.images[i], self.test_set.masks[i]
            k = max(1, 160 // max(image.shape[-2:]))  # small images enlarged (nearest) to about 160 px
            rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image
            tiles += [t.repeat_interleave(k, -2).repeat_interleave(k, -1)
                      for t in (rgb, overlay(image, truth, skip=skip), overlay(image, p, skip=skip))]
            overlays.append({"image": image, "caption": self.test_set.names[i],
                             "masks": wandb_masks(p, truth, self.classes)})
        size = max(max(x.shape[-2:]) for x in tiles)
        tiles = [F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]), value=255) for x in tiles]
        self.ctx.logger.log_overlay("eval/segmentations", make_grid(tiles, nrow=6, padding=4, pad_value=255), overlays)

    # ---- mode=predict --------------------------------------------------------------------------
    def predict(self, folder: Path) -> dict[str, Any]:
        """Segment every image in `folder`: <run dir>/predictions/<name>.png, a palette PNG whose pixel values
        are the class indices (VOC's colours), and predictions/classes.json naming them."""
        import json

        files = input_images(folder)
        out_dir = self.ctx.run_dir / "predictions"
        counts = np.zeros(len(self.classes), np.int64)
        for f in files:
            mask = self.segment([read_image(f, self.channels)])[0]
            save_mask(out_dir / f"{f.stem}.png", mask)
            counts += np.bincount(mask.flatten().numpy(), minlength=len(self.classes))[: len(self.classes)]
        io.write_text(out_dir / "classes.json", json.dumps(dict(enumerate(self.classes))))
        print(f"[lab] {len(files)} masks (class index per pixel, palette PNG): {out_dir}", flush=True)
        return {"images": len(files), "predictions": str(out_dir),
                "pixels_per_class": {c: int(n) for c, n in zip(self.classes, counts)}}


def _r(v: torch.Tensor) -> float | None:
    return None if torch.isnan(v) else round(float(v), 4)


