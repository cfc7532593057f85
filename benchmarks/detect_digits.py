"""Object detection on digit scenes: the lab's `detect_digits` against a plain loop in the style of torchvision's
detection reference, same model, data and steps.

    python benchmarks/detect_digits.py                       # the lab, then the plain loop
    python benchmarks/detect_digits.py --only lab            # the lab only: mAP, AP50, time to mAP 0.75
    python benchmarks/detect_digits.py --lab-args model=fcos --name detect_digits_fcos

1. The lab: `python -m lab +experiment=detect_digits logger=none trainer.progress=false` (scenes made in
   memory, the trainer's loop, COCO evaluation of the 200 test scenes every `trainer.eval_every` steps).
   Records every evaluation (mAP@[.5:.95], AP50, AP75, recall), the seconds of training until mAP first
   reaches 0.75 and AP50 0.95 (evaluation time included, scene making excluded), the per-class AP of the last
   evaluation and the training images/s.
2. The plain loop, as torchvision's references/detection/train.py writes one: the same train scenes written to
   disk as PNG + Pascal VOC XML (`python -m lab scenes`), a Dataset that reads an image and its XML per item,
   a DataLoader (same batch size, shuffle, `--workers`, `collate_fn=tuple(zip(*batch))`), the same detector
   built from the same composed config, AdamW and the one-cycle schedule over the same steps, gradient
   clipping as the lab's, in fp32 as the reference trains on a CPU (the lab: the experiment's
   `trainer.precision=auto`, bf16 where the CPU has it natively); then the same COCO evaluation
   (vision/detection.py's `coco_metrics`) of the same test scenes. Records its training images/s and final
   metrics; the ratio is the lab's images/s over the loop's.

Writes benchmarks/results/<name>.json (default detect_digits; detect_digits_avx2 on a CPU without native
bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402

TARGETS = {"map": 0.75, "map_50": 0.95}


def lab_side(args: list[str], work: Path) -> dict[str, Any]:
    rows, wall = record.run_lab(args, work / "lab")
    evals = record.evaluations(rows, "eval/map", ("eval/map", "eval/mar"))
    out: dict[str, Any] = {"command": " ".join(["python -m lab", *args]), "wall_s": round(wall, 1),
                           "evaluations": evals, "final": evals[-1], "best_map": max(e["map"] for e in evals),
                           "train_images_per_s_median": record.median_samples_per_s(rows)}
    for key, target in TARGETS.items():
        hit = next((e for e in evals if e[key] >= target), None)
        out[f"seconds_to_{key}_{target}"] = hit["elapsed_s"] if hit else None
        out[f"step_to_{key}_{target}"] = hit["step"] if hit else None
    table = sorted((work / "lab" / "media").glob("eval_per_class_ap_*.csv"))[-1].read_text().splitlines()
    out["per_class_ap_last"] = {line.split(",")[0]: float(line.split(",")[1]) for line in table[1:]}
    return out


class VOCScenes(torch.utils.data.Dataset):
    """A folder `python -m lab scenes` wrote, read the way torchvision's reference reads its data sets: per item,
    decode the image file and parse its annotation."""

    def __init__(self, folder: Path, channels: int, classes: tuple[str, ...]):
        self.images = sorted((folder / "images").glob("*.png"))
        self.folder, self.channels, self.classes = folder, channels, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import xml.etree.ElementTree as ET

        import numpy as np
        from PIL import Image

        path = self.images[i]
        with Image.open(path) as im:
            a = np.asarray(im.convert("L" if self.channels == 1 else "RGB"), dtype=np.float32) / 255
        image = torch.from_numpy(a)[None] if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)
        root = ET.parse(self.folder / "annotations" / f"{path.stem}.xml").getroot()
        boxes, labels = [], []
        for obj in root.iter("object"):
            b = obj.find("bndbox")
            x1, y1, x2, y2 = (float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x1 - 1, y1 - 1, x2, y2])  # VOC's 1-based inclusive pixels, as the lab reads them
            labels.append(self.classes.index(obj.find("name").text))
        return image, {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                       "labels": torch.tensor(labels, dtype=torch.int64)}


def plain_side(cfg: Any, steps: int, workers: int, work: Path) -> dict[str, Any]:
    from lab.config import build
    from lab.optim import build_optimizer, build_scheduler
    from vision import scenes
    from vision.detection import coco_metrics
    from vision.detection_data import from_config

    d = cfg.data
    folder = work / "scenes_train"
    scenes.main([str(folder), "--split", "train", "--n", str(d.n_train), "--size", str(d.size), "--objects",
                 *map(str, d.objects), "--scale", *map(str, d.scale), "--seed", str(d.seed), "--source", d.source,
                 *(["--root", str(d.root)] if d.root else [])])
    test = from_config(d, "test")
    classes = tuple(test.classes)
    data = VOCScenes(folder, int(d.channels), classes)
    loader = torch.utils.data.DataLoader(data, batch_size=int(d.batch_size), shuffle=True, num_workers=workers,
                                         drop_last=True, collate_fn=lambda batch: tuple(zip(*batch)),
                                         persistent_workers=workers > 0)
    torch.manual_seed(int(cfg.seed))
    model = build(cfg.model, "model", num_classes=len(classes), in_channels=int(d.channels), _recursive_=False)
    opt = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    sched = build_scheduler(cfg.scheduler, opt, steps)
    clip = cfg.trainer.grad_clip
    model.train()
    step, t0, images_seen = 0, time.perf_counter(), 0
    while step < steps:
        for images, targets in loader:
            images = list(images)
            targets = [{k: v for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            images_seen += len(images)
            if step >= steps:
                break
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        preds = []
        for i in range(0, len(test.images), int(d.eval_batch_size)):
            preds += model([x.float() / 255 for x in test.images[i: i + int(d.eval_batch_size)]])
    out, per_class, _ = coco_metrics(preds, test.targets, classes)
    return {"steps": steps, "workers": workers, "train_s": round(train_s, 1),
            "train_images_per_s": round(images_seen / train_s, 2),
            "final": {k: round(v, 4) for k, v in out.items()},
            "per_class_ap": {c: v["ap"] for c, v in per_class.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("lab", "plain"), default=None)
    ap.add_argument("--lab-args", nargs="*", default=[], help="extra overrides for both sides' config")
    ap.add_argument("--workers", type=int, default=1, help="the plain loop's DataLoader workers")
    ap.add_argument("--name", default="detect_digits" + record.cpu_kind_suffix())
    args = ap.parse_args()
    lab_args = ["+experiment=detect_digits", "logger=none", "trainer.progress=false", *args.lab_args]
    cfg = record.composed(lab_args)
    steps = record.planned_steps(cfg)
    figures: dict[str, Any] = {"targets": TARGETS, "steps": steps, "batch_size": int(cfg.data.batch_size),
                               "model": OmegaConf.to_container(cfg.model), "data": OmegaConf.to_container(cfg.data)}
    with tempfile.TemporaryDirectory(prefix="lab-detect-") as tmp:
        work = Path(tmp)
        if args.only in (None, "lab"):
            figures["lab"] = lab_side(lab_args, work)
            print(json.dumps({k: figures["lab"][k] for k in ("final", "seconds_to_map_0.75",
                                                              "train_images_per_s_median")}), flush=True)
            record.write(args.name, {**figures, "complete": args.only == "lab"})
        if args.only in (None, "plain"):
            figures["plain_loop"] = plain_side(cfg, steps, args.workers, work)
            print(json.dumps(figures["plain_loop"]["final"]), flush=True)
    if "lab" in figures and "plain_loop" in figures:
        figures["images_per_s_ratio_lab_over_plain"] = round(
            figures["lab"]["train_images_per_s_median"] / figures["plain_loop"]["train_images_per_s"], 3)
        figures["map_lab_minus_plain"] = round(figures["lab"]["final"]["map"] - figures["plain_loop"]["final"]["map"],
                                               4)
    record.write(args.name, {**figures, "complete": True})


if __name__ == "__main__":
    main()
