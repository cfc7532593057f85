"""Tree crowns in real aerial images: the lab's `detect_trees` from a pretrained backbone against the same
detector trained from scratch, same data, steps and schedule.

    python benchmarks/detect_trees.py                        # pretrained, then from scratch
    python benchmarks/detect_trees.py --only pretrained      # one side
    python benchmarks/detect_trees.py --lab-args data.tile_size=384 --name detect_trees_384

1. Pretrained: `python -m lab +experiment=detect_trees logger=none trainer.progress=false`: Faster R-CNN on a
   VGG16 whose conv layers load from `weights/vgg16_hed_features.pth` (VGG16, HED fine-tune: ImageNet VGG16
   fine-tuned for edge detection; see the data README), frozen up to its stride-8 maps.
2. From scratch: the same command with `model.weights=null model.freeze=false` (every layer trains from
   He initialisation).

Both evaluate on the whole held-out image (`data.test_images`, never seen in training; its 279 crowns, each
once) every `trainer.eval_every` steps with COCO's evaluation (up to 1,000 boxes), detecting it in 256 px
windows as the model trained (`detection.window`: overlapping by 128, cut boxes dropped, the windows' boxes
merged) in its eight dihedral views, fused (`detection.tta`); the last checkpoint is also scored in one view
(`mode=eval detection.tta=null`, `final_one_view`). With `trainer.ema` (the yaml's), every evaluation scores the
averaged weights, and the last checkpoint's trained weights are scored too (eight views, `final_trained_weights`):
the same training without the average. The record keeps every evaluation (AP50, mAP@[.5:.95],
AP75, recall), the final and best AP50, the training images/s and wall seconds of each side, and whether the
pretrained side's final AP50 reaches the target. Both train in the experiment's `trainer.precision=auto`:
bf16 on a CPU that has it natively, which then trains 32 epochs instead of the yaml's 8, evaluating every 512
steps (`KIND_ARGS`).
Writes benchmarks/results/<name>.json (default detect_trees; detect_trees_avx2 on a CPU without native bf16)
and, beside it, each side's last precision-recall curve and the test image with its boxes (PNG).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402

TARGET_AP50 = 0.5
SIDES = {"pretrained": [], "scratch": ["model.weights=null", "model.freeze=false"]}
# Epochs per kind of 2-core CPU: AVX2 trains the pretrained side in fp32 at 1.5 tiles/s (8 epochs in 14 minutes);
# AVX512-BF16 in bf16 at 2.5-5.6 tiles/s, as the machine goes (32 epochs in 13 to 27 minutes, from scratch 2x).
KIND_ARGS = {"_avx2": [], "": ["trainer.max_epochs=32", "trainer.eval_every=512"]}[record.cpu_kind_suffix()]


def side(args: list[str], run_dir: Path) -> dict[str, Any]:
    rows, wall = record.run_lab(args, run_dir)
    evals = record.evaluations(rows, "eval/map", ("eval/map", "eval/mar"))
    config = OmegaConf.load(run_dir / "config.yaml")
    model, last = config.model, run_dir / "checkpoints" / "last.pt"
    figures: dict[str, Any] = {"final_one_view": last_eval([*args, "mode=eval", f"checkpoint={last}",
                                                            "detection.tta=null"], run_dir, "_one_view")}
    if config.trainer.ema is not None:  # the trained weights, without the average: its checkpoint less "ema"
        import torch

        trained = run_dir.with_name(run_dir.name + "_trained.pt")
        torch.save({**torch.load(last, weights_only=True), "ema": None}, trained)
        figures["final_trained_weights"] = last_eval([*args, "mode=eval", f"checkpoint={trained}"], run_dir,
                                                     "_trained")
    return {**figures, "command": " ".join(["python -m lab", *args]), "wall_s": round(wall, 1), "evaluations": evals,
            "final": evals[-1], "best_map_50": max(e["map_50"] for e in evals), "ema": config.trainer.ema,
            "train_images_per_s_median": record.median_samples_per_s(rows),
            "backbone": OmegaConf.to_container(model.backbone), "weights": model.weights, "freeze": model.freeze}


def last_eval(args: list[str], run_dir: Path, suffix: str) -> dict[str, float]:
    """`mode=eval` with `args` in a run directory beside `run_dir`: its eval/ figures."""
    rows, _ = record.run_lab(args, run_dir.with_name(run_dir.name + suffix))
    row = next(r for r in reversed(rows) if "eval/map_50" in r)
    return {k.split("/", 1)[1]: round(v, 4) for k, v in row.items() if k.startswith(("eval/map", "eval/mar"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=tuple(SIDES), default=None)
    ap.add_argument("--lab-args", nargs="*", default=[], help="extra overrides for both sides")
    ap.add_argument("--name", default="detect_trees" + record.cpu_kind_suffix())
    args = ap.parse_args()
    base = ["+experiment=detect_trees", "logger=none", "trainer.progress=false", *KIND_ARGS, *args.lab_args]
    figures: dict[str, Any] = {"target_ap50": TARGET_AP50, "kind_args": KIND_ARGS, "lab_args": args.lab_args}
    with tempfile.TemporaryDirectory(prefix="lab-trees-") as tmp:
        for name, extra in SIDES.items():
            if args.only not in (None, name):
                continue
            figures[name] = side([*base, *extra], Path(tmp) / name)
            media = Path(tmp) / name / "media"
            for kind in ("precision_recall", "detections"):  # the last evaluation's, beside the record
                last = sorted(media.glob(f"eval_{kind}_*.png"))[-1]
                shutil.copyfile(last, record.RESULTS / f"{args.name}_{name}_{kind}.png")
            print(json.dumps({name: figures[name]["final"]}), flush=True)
            record.write(args.name, {**figures, "complete": False})
    if "pretrained" in figures:
        figures["pretrained_meets_target"] = figures["pretrained"]["final"]["map_50"] >= TARGET_AP50
    if "pretrained" in figures and "scratch" in figures:
        figures["ap50_pretrained_minus_scratch"] = round(
            figures["pretrained"]["final"]["map_50"] - figures["scratch"]["final"]["map_50"], 4)
    record.write(args.name, {**figures, "complete": args.only is None})


if __name__ == "__main__":
    main()
