"""The VAE on MNIST: test negative ELBO (nats per image) after 10 epochs, as pytorch/examples' VAE reports it.

    python benchmarks/vae_mnist.py [--epochs 10] [--lab-args key=value ...]

Runs `python -m lab +experiment=vae_mnist` (the convolutional VAE, latent 20, batch 128, Adam
1e-3, fp32) and records the test loss after every epoch: binary cross-entropy summed over the
784 pixels plus the KL term, averaged over the 10,000 test images, z sampled as in training
(pytorch/examples' MLP VAE reports about 105 after 10 epochs). Also records the linear-probe
accuracies (codes vs raw pixels). Writes benchmarks/results/vae_mnist.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lab-args", nargs="*", default=[])
    args = ap.parse_args()
    os.environ.setdefault("LAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    run_dir = REPO / "outputs" / "benchmarks" / "vae_mnist"  # kept: its reconstructions, samples, latent space
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["+experiment=vae_mnist", "logger=none", "trainer.progress=false", f"trainer.max_epochs={args.epochs}",
           *args.lab_args]
    rows, wall = record.run_lab(cmd, run_dir)
    evals = [r for r in rows if "eval/loss" in r]
    train = [r for r in rows if "perf/samples_per_sec" in r]
    last = evals[-1]
    figures = {
        "command": " ".join(["-m", "lab", *cmd]), "epochs": args.epochs,
        "test_negative_elbo_per_epoch": [round(r["eval/loss"], 2) for r in evals],
        "test_negative_elbo": round(last["eval/loss"], 2),
        "test_reconstruction": round(last["eval/reconstruction"], 2), "test_kl": round(last["eval/kl"], 2),
        "probe_accuracy_codes": round(last["eval/probe_accuracy_codes"], 4),
        "probe_accuracy_pixels": round(last["eval/probe_accuracy_pixels"], 4),
        "train_images_per_sec": round(sum(r["perf/samples_per_sec"] for r in train[1:]) / max(1, len(train) - 1), 1),
        "process_wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(REPO)),
        "reference": "pytorch/examples vae (MLP 784-400-20, same loss): about 105 after 10 epochs",
    }
    print(json.dumps({k: figures[k] for k in ("test_negative_elbo", "probe_accuracy_codes", "probe_accuracy_pixels")}))
    record.write("vae_mnist", figures)


if __name__ == "__main__":
    main()
