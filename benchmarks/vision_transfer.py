"""Transfer learning on a small labelled subset: pretrained VGG-16 conv layers versus from scratch, same budget.

    python benchmarks/vision_transfer.py

The preset `fashion_transfer`: the first 1,000 Fashion-MNIST training images, resized to 32x32 and
repeated to 3 channels, VGG-16, SGD with Nesterov momentum and a one-cycle schedule, 15 epochs
(300 steps of 50), tested on the first 2,000 test images. Three runs of the same budget:
fine-tune all layers from the weights file, train only the new head on the frozen backbone, and
from scratch (He initialisation). The weights are `vgg16_hed_features.pth` from the data root:
VGG16 (HED fine-tune), ImageNet VGG16 conv layers fine-tuned for edge detection, not pure ImageNet
weights. Writes benchmarks/results/vision_transfer.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from vision_fashion import lab_run  # noqa: E402

import record  # noqa: E402

RUNS = {"fine_tune": ("model.freeze=false",), "frozen_backbone": ("model.freeze=true",),
        "from_scratch": ("model.weights=null",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("LAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    results = {}
    for name, extra in RUNS.items():
        results[name] = lab_run("fashion_transfer", args.seed, extra, name=f"transfer_{name}")
        print(f"{name}: best test accuracy {results[name]['best_test_accuracy']:.4f}", flush=True)
    record.write("vision_transfer", {
        "weights": "vgg16_hed_features.pth: VGG16 (HED fine-tune), ImageNet VGG16 conv layers fine-tuned for HED "
                   "edge detection on BSDS500; not pure ImageNet weights",
        "setup": "first 1,000 Fashion-MNIST training images, 32x32, grey repeated to RGB, ImageNet normalisation; "
                 "test on the first 2,000 test images; 300 steps of 50 for every run",
        **results,
    })


if __name__ == "__main__":
    main()
