"""Semantic segmentation of digit scenes: U-Net, SegNet and FCN in the lab's `segment_digits`, then the best of
them against a plain PyTorch loop with a DataLoader, same model, data and steps.

    python benchmarks/segment_digits.py                          # the three models, then the plain loop
    python benchmarks/segment_digits.py --models unet --no-plain # one model, no plain loop

1. The lab: `python -m lab +experiment=segment_digits model=M logger=none trainer.progress=false` for each
   model (scenes made in memory, the trainer's loop, the confusion-matrix evaluation of the test scenes every
   `trainer.eval_every` steps). Records each model's parameters, every evaluation (mIoU over the 10 digit
   classes, `eval/miou_foreground`; mIoU with the background; pixel accuracy), the seconds of training until
   the digits' mIoU first reaches the target (evaluations included, scene making excluded) and the training
   images/s.
2. The plain loop, for the model with the best final mIoU: the same train scenes written to disk as PNG images
   and palette PNG masks (`python -m lab scenes --overlap --mask-threshold`), a Dataset that decodes an image
   and its mask per item, a shuffled DataLoader (same batch size, `--workers`), the same model built from the
   same composed config, AdamW and the one-cycle schedule over the same steps, cross-entropy with the ignore
   index, in fp32 as tutorials train (the lab: the experiment's `trainer.precision=auto`, bf16 where the CPU has
   it natively); then the same evaluation (vision/segmentation.py's `confusion` and `scores`) of the same test
   scenes. The ratio is the lab's training images/s over the loop's.

Writes benchmarks/results/<name>.json (default segment_digits; segment_digits_avx2 on a CPU without native
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402

TARGET = 0.85  # mIoU over the 10 digit classes
BUDGET_S = 600  # within 10 minutes of training
# Each model's epochs sized to the budget on each kind of 2-core CPU. AVX2 (images/s at 64 px, fp32: FCN 96,
# U-Net 76, SegNet 41; U-Net and SegNet run their first convs at full size); AVX512-BF16, where the experiment's
# `trainer.precision=auto` trains in bf16 (FCN 410 images/s, U-Net 301, SegNet 200).
MODEL_ARGS = {"_avx2": {"unet": ["trainer.max_epochs=4"], "segnet": ["trainer.max_epochs=2"], "fcn": []},
              "": {"unet": ["trainer.max_epochs=6"], "segnet": ["trainer.max_epochs=3"],
                   "fcn": ["trainer.max_epochs=20"]}}[record.cpu_kind_suffix()]


def lab_side(args: list[str], run_dir: Path) -> dict[str, Any]:
    rows, wall = record.run_lab(args, run_dir)
    evals = record.evaluations(rows, "eval/miou", ("eval/miou", "eval/pixel_accuracy", "eval/mean_accuracy"))
    params = next(r["model/params"] for r in rows if "model/params" in r)
    hit = next((e for e in evals if e["miou_foreground"] >= TARGET), None)
    return {"command": " ".join(["python -m lab", *args]), "wall_s": round(wall, 1), "parameters": params,
            "evaluations": evals, "final": evals[-1], "best_miou_foreground": max(e["miou_foreground"] for e in evals),
            f"seconds_to_miou_{TARGET}": hit["elapsed_s"] if hit else None,
            f"step_to_miou_{TARGET}": hit["step"] if hit else None,
            "meets_target": bool(hit and hit["elapsed_s"] <= BUDGET_S),
            "train_images_per_s_median": record.median_samples_per_s(rows)}


class MaskFolder(torch.utils.data.Dataset):
    """A folder `python -m lab scenes` wrote, read per item as a tutorial's Dataset does: decode the image and
    its mask from their PNG files."""

    def __init__(self, folder: Path):
        self.images = sorted((folder / "images").glob("*.png"))
        self.folder = folder

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        from PIL import Image

        path = self.images[i]
        with Image.open(path) as im:
            image = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255)[None]
        with Image.open(self.folder / "masks" / path.name) as m:
            mask = torch.from_numpy(np.asarray(m, dtype=np.int64))
        return image, mask


def plain_side(cfg: Any, steps: int, workers: int, work: Path) -> dict[str, Any]:
    from lab.config import build
    from lab.optim import build_optimizer, build_scheduler
    from vision import scenes, segmentation_data
    from vision.segmentation import confusion, scores
    from vision.segmentation_data import IGNORE

    d = cfg.data
    folder = work / "scenes_train"
    scenes.main([str(folder), "--split", "train", "--n", str(d.n_train), "--size", str(d.size), "--objects",
                 *map(str, d.objects), "--scale", *map(str, d.scale), "--seed", str(d.seed), "--source", d.source,
                 *(["--overlap"] if d.overlap else []), "--mask-threshold", str(d.mask_threshold),
                 *(["--root", str(d.root)] if d.root else [])])
    test = segmentation_data.from_config(d, "test")
    loader = torch.utils.data.DataLoader(MaskFolder(folder), batch_size=int(d.batch_size), shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    torch.manual_seed(int(cfg.seed))
    model = build(cfg.model, "model", num_classes=len(test.classes), in_channels=int(d.channels), _recursive_=False)
    opt = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    sched = build_scheduler(cfg.scheduler, opt, steps)
    model.train()
    step, seen, t0 = 0, 0, time.perf_counter()
    while step < steps:
        for images, masks in loader:
            loss = torch.nn.functional.cross_entropy(model(images), masks, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step, seen = step + 1, seen + len(images)
            if step >= steps:
                break
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        x = torch.stack(test.images).float() / 255
        preds = [p for i in range(0, len(x), int(d.eval_batch_size))
                 for p in model(x[i: i + int(d.eval_batch_size)]).argmax(1).to(torch.uint8)]
    out, _, _ = scores(confusion(preds, test.masks, len(test.classes)), background=0)
    return {"steps": steps, "workers": workers, "train_s": round(train_s, 1),
            "train_images_per_s": round(seen / train_s, 2), "final": {k: round(v, 4) for k, v in out.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["fcn", "unet", "segnet"])
    ap.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    ap.add_argument("--lab-args", nargs="*", default=[], help="extra overrides for every run")
    ap.add_argument("--workers", type=int, default=1, help="the plain loop's DataLoader workers")
    ap.add_argument("--name", default="segment_digits" + record.cpu_kind_suffix())
    args = ap.parse_args()
    base = ["+experiment=segment_digits", "logger=none", "trainer.progress=false", *args.lab_args]
    figures: dict[str, Any] = {"target_miou_foreground": TARGET, "budget_s": BUDGET_S, "lab_args": args.lab_args,
                               "models": {}}
    with tempfile.TemporaryDirectory(prefix="lab-seg-") as tmp:
        work = Path(tmp)
        for m in args.models:
            figures["models"][m] = lab_side([*base, f"model={m}", *MODEL_ARGS.get(m, [])], work / m)
            print(json.dumps({m: figures["models"][m]["final"]}), flush=True)
            record.write(args.name, {**figures, "complete": False})
        best = max(figures["models"], key=lambda m: figures["models"][m]["final"]["miou_foreground"])
        figures["best_model"] = best
        figures["target_met_by_best"] = figures["models"][best]["meets_target"]
        if not args.no_plain:
            cfg = record.composed([*base, f"model={best}", *MODEL_ARGS.get(best, [])])
            if cfg.segmentation.class_weight not in (None, "none"):
                raise SystemExit("the plain loop has no class weights; run it with segmentation.class_weight=none")
            steps = record.planned_steps(cfg)
            figures["plain_loop"] = {"model": best, **plain_side(cfg, steps, args.workers, work)}
            lab = figures["models"][best]
            figures["images_per_s_ratio_lab_over_plain"] = round(
                lab["train_images_per_s_median"] / figures["plain_loop"]["train_images_per_s"], 3)
            figures["miou_lab_minus_plain"] = round(
                lab["final"]["miou_foreground"] - figures["plain_loop"]["final"]["miou_foreground"], 4)
    record.write(args.name, {**figures, "complete": True})


if __name__ == "__main__":
    main()
