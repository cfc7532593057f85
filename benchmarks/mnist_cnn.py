"""MNIST deep CNN on this machine: the lab versus a plain PyTorch loop, same network, same run.

    python benchmarks/mnist_cnn.py [--plain-epochs 6] [--lab-args key=value ...]

1. The plain loop, written the way tutorials write it: torchvision's MNIST with
   ToTensor+Normalize, a DataLoader (batch 100, shuffle), the same DeepCNN, Adam 1e-3, fp32,
   test accuracy after every epoch.
2. The lab: `python -m lab +experiment=mnist_cnn` (its recipe: bf16 autocast where native, else fp32; channels-last,
   data on the device, one-cycle schedule, evaluation every 200 steps).
3. Input pipelines alone: one epoch of the DataLoader with 0 and 2 workers vs the TensorLoader.

Reports test accuracy per epoch, seconds of training to 99.0% test accuracy for each, and the
ratio; times count from the first training step (data set loading excluded for both) and include
evaluation time. Writes benchmarks/results/mnist_cnn.json (mnist_cnn_avx2.json on a CPU without native bf16).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from lab import data as lab_data  # noqa: E402
from vision.deep_cnn import DeepCNN  # noqa: E402

TARGET = 0.99


def torchvision_root(src: Path) -> Path:
    """torchvision's MNIST wants unpacked files in <root>/MNIST/raw: make that from the data root."""
    root = Path(tempfile.mkdtemp(prefix="mnist-tv-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        hit = next(p for d in (src / "MNIST" / "raw", src / "mnist") for p in (d / f, d / (f + ".gz")) if p.exists())
        with (gzip.open if hit.suffix == ".gz" else open)(hit, "rb") as i, open(raw / f, "wb") as o:
            shutil.copyfileobj(i, o)
    return root


def plain_loop(root: Path, epochs: int, seed: int) -> dict:
    """The tutorial way. Nothing here is tuned."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    test = datasets.MNIST(str(root), train=False, download=False, transform=tf)
    train_loader = torch.utils.data.DataLoader(train, batch_size=100, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    model = DeepCNN(final_dropout=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve, t0, to_target, train_s = [], time.perf_counter(), None, 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t_epoch = time.perf_counter()
        for x, y in train_loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t_epoch
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        acc = correct / len(test)
        elapsed = time.perf_counter() - t0
        curve.append({"epoch": epoch, "test_accuracy": acc, "elapsed_s": round(elapsed, 2)})
        print(f"plain epoch {epoch}: test accuracy {acc:.4f} at {elapsed:.1f}s", flush=True)
        if to_target is None and acc >= TARGET:
            to_target = elapsed
            break
    return {"per_epoch": curve, "seconds_to_99.0": to_target,
            "samples_per_sec": round(len(train) * len(curve) / train_s, 1)}  # training only, like the lab's


def lab_run(extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="lab-bench-"))
    cmd = ["+experiment=mnist_cnn", "logger=none", "trainer.progress=false", *extra]
    rows, wall = record.run_lab(cmd, run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "perf/samples_per_sec" in r]
    per_epoch, steps_per_epoch = [], round(train[0]["step"] / train[0]["train/epoch"])  # from the run's own log
    for r in evals:
        if r["step"] % steps_per_epoch == 0:
            per_epoch.append({"epoch": r["step"] // steps_per_epoch, "test_accuracy": r["eval/accuracy"],
                              "elapsed_s": round(r["perf/elapsed_s"], 2)})
    hit = next((r for r in evals if r["eval/accuracy"] >= TARGET), None)
    hit_epoch = next((e for e in per_epoch if e["test_accuracy"] >= TARGET), None)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "command": " ".join(["-m", "lab", *cmd]),
        "evaluations": [{"step": r["step"], "test_accuracy": r["eval/accuracy"],
                         "elapsed_s": round(r["perf/elapsed_s"], 2)} for r in evals],
        "per_epoch": per_epoch,
        "final_test_accuracy": evals[-1]["eval/accuracy"],
        "seconds_to_99.0": hit and round(hit["perf/elapsed_s"], 2),
        "seconds_to_99.0_at_epoch_ends": hit_epoch and hit_epoch["elapsed_s"],
        "samples_per_sec": round(sum(r["perf/samples_per_sec"] for r in train[1:]) / max(1, len(train) - 1), 1),
        "process_wall_s": round(wall, 1),
    }


def pipelines(root: Path, data_root: Path) -> dict:
    """Samples per second of the input pipeline alone: one epoch each."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    out = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        out[f"dataloader_{workers}_workers"] = round(n / (time.perf_counter() - t0), 1)
    mnist = lab_data.load("mnist", "train", data_root)
    loader = lab_data.TensorLoader(mnist.images, mnist.labels, 100,
                                   transform=lab_data.normalizer((0.1307,), (0.3081,), "cpu"))
    t0 = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    out["lab_tensor_loader"] = round(n / (time.perf_counter() - t0), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain-epochs", type=int, default=6, help="stop the plain loop here if 99.0%% is not reached")
    ap.add_argument("--lab-args", nargs="*", default=[], help="extra overrides for the lab run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data_root = Path(os.environ.get("LAB_DATA_DIR") or REPO.parent / "shared" / "data")
    os.environ["LAB_DATA_DIR"] = str(data_root)
    tv_root = torchvision_root(data_root)
    try:
        pipes = pipelines(tv_root, data_root)
        print("input pipelines (samples/s):", pipes, flush=True)
        lab = lab_run([f"seed={args.seed}", *args.lab_args])
        print(f"lab: {lab['per_epoch']}, to 99.0%: {lab['seconds_to_99.0']}s", flush=True)
        plain = plain_loop(tv_root, args.plain_epochs, args.seed)
    finally:
        shutil.rmtree(tv_root, ignore_errors=True)
    ratio = plain["seconds_to_99.0"] / lab["seconds_to_99.0"] if plain["seconds_to_99.0"] and lab["seconds_to_99.0"] \
        else None
    epoch_ratio = (plain["seconds_to_99.0"] / lab["seconds_to_99.0_at_epoch_ends"]
                   if plain["seconds_to_99.0"] and lab["seconds_to_99.0_at_epoch_ends"] else None)
    figures = {
        "target_test_accuracy": TARGET,
        "lab": lab, "plain_pytorch": plain, "input_pipelines_samples_per_sec": pipes,
        "speedup_to_99.0": ratio and round(ratio, 2),
        "speedup_to_99.0_both_at_epoch_ends": epoch_ratio and round(epoch_ratio, 2),
        "throughput_ratio": round(lab["samples_per_sec"] / plain["samples_per_sec"], 2),
        "goal": "lab at least 3x faster to 99.0% test accuracy with the same network",
    }
    print(json.dumps({k: figures[k] for k in ("speedup_to_99.0", "speedup_to_99.0_both_at_epoch_ends",
                                              "throughput_ratio")}))
    record.write(f"mnist_cnn{record.cpu_kind_suffix()}", figures)


if __name__ == "__main__":
    main()
