"""Augmentation against overfitting: the same small-data run with and without on-device augmentation.

    python benchmarks/vision_augment.py

The preset `fashion_small`: the book's CNN without dropout on the first 1,000 Fashion-MNIST images,
40 epochs, tested on 5,000 test images every 2 epochs. Without augmentation the training loss goes
to about zero while the test loss climbs (overfitting); with random crops, flips, small rotations,
shifts, zooms and brightness changes (all of the preset's augmentations), and with crops and flips only,
the same budget is run again. Writes
benchmarks/results/vision_augment.json and a figure of both test curves (vision_augment.png).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from vision_fashion import lab_run  # noqa: E402

import record  # noqa: E402
from lab.plots import plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("LAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    mild = ("data.augment.rotate=0", "data.augment.translate=0", "data.augment.scale=0", "data.augment.brightness=0")
    runs = {"without_augmentation": lab_run("fashion_small", args.seed, ("data.augment=null",), "augment_off"),
            "crop_and_flip": lab_run("fashion_small", args.seed, mild, "augment_crop_flip"),
            "all_augmentations": lab_run("fashion_small", args.seed, (), "augment_all")}
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    for (name, run), color in zip(runs.items(), ("C0", "C1", "C2")):
        steps = [e["step"] for e in run["evaluations"]]
        label = name.replace("_", " ")
        ax_acc.plot(steps, [e["test_accuracy"] for e in run["evaluations"]], color=color, label=f"{label}: test")
        ax_loss.plot(steps, [e["test_loss"] for e in run["evaluations"]], color=color, label=f"{label}: test")
        train = run["train_curve"]
        ax_loss.plot([t["step"] for t in train], [t["train_loss"] for t in train], color=color, ls=":", lw=1,
                     label=f"{label}: train")
    for ax, title in ((ax_acc, "test accuracy"), (ax_loss, "loss (train dotted)")):
        ax.set_title(f"{title}: CNN on 1,000 Fashion-MNIST images", fontsize=9)
        ax.set_xlabel("step (20 per epoch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(REPO / "benchmarks" / "results" / "vision_augment.png", dpi=100)
    record.write("vision_augment", runs)


if __name__ == "__main__":
    main()
