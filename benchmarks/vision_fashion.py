"""Fashion-MNIST on this machine: a lab preset versus a plain PyTorch loop, same network and recipe, same run.

    python benchmarks/vision_fashion.py --model cnn       # fashion_cnn: the book's deep CNN
    python benchmarks/vision_fashion.py --model resnet    # fashion_resnet: the CIFAR ResNet-20

1. The lab: `python -m lab +experiment=fashion_<model>` (bf16 autocast, channels-last, data and
   augmentation on the device, evaluation on the 10,000 test images every half epoch).
2. The plain loop, the way tutorials write it: torchvision's FashionMNIST with ToTensor, Normalize and
   the same augmentation as torchvision transforms, a DataLoader (same batch size, shuffle, 0 workers),
   fp32, the same network, optimizer and one-cycle schedule over the same epochs, evaluated at the
   same steps. It stops at the first evaluation at or above the target (92%) or after --plain-epochs.

Records the lab's best test accuracy and each one's seconds of training to 92% (evaluation included,
data set loading excluded) in benchmarks/results/vision_fashion_<model>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from lab.config import build  # noqa: E402
from lab.optim import build_optimizer, build_scheduler  # noqa: E402
from vision import transfer  # noqa: E402

TARGET = 0.92
PRESETS = {"cnn": "fashion_cnn", "resnet": "fashion_resnet"}


def composed(experiment: str) -> dict:
    """The preset's resolved config, as the lab composes it."""
    out = subprocess.run([sys.executable, "-m", "lab", f"+experiment={experiment}", "--cfg", "job", "--resolve"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return OmegaConf.to_container(OmegaConf.create(out), resolve=True)


def torchvision_root(src: Path) -> Path:
    """torchvision's FashionMNIST wants unpacked files in <root>/FashionMNIST/raw."""
    root = Path(tempfile.mkdtemp(prefix="fashion-tv-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        hit = next(p for d in (src / "FashionMNIST" / "raw", src / "fashion-mnist") for p in (d / f, d / (f + ".gz"))
                   if p.exists())
        with (gzip.open if hit.suffix == ".gz" else open)(hit, "rb") as i, open(raw / f, "wb") as o:
            shutil.copyfileobj(i, o)
    return root


def plain_loop(cfg: dict, root: Path, max_epochs: int, seed: int) -> dict:
    """The tutorial way with the preset's network, optimizer, schedule and augmentation."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    d, aug = cfg["data"], cfg["data"].get("augment") or {}
    norm = [transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))]
    train_tf = ([transforms.RandomCrop(28, padding=aug["crop_padding"])] if aug.get("crop_padding") else []) + \
        ([transforms.RandomHorizontalFlip(aug["hflip"])] if aug.get("hflip") else [])
    train = datasets.FashionMNIST(str(root), train=True, download=False, transform=transforms.Compose(train_tf + norm))
    test = datasets.FashionMNIST(str(root), train=False, download=False, transform=transforms.Compose(norm))
    train_loader = torch.utils.data.DataLoader(train, batch_size=d["batch_size"], shuffle=True, drop_last=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    model_cfg, _ = transfer.split_config(OmegaConf.create(cfg["model"]))
    model = build(model_cfg, "model", in_channels=1, num_classes=10, image_size=28)
    opt = build_optimizer(OmegaConf.create(cfg["optimizer"]), model.parameters())
    sched = build_scheduler(OmegaConf.create(cfg["scheduler"]), opt, cfg["trainer"]["max_epochs"] * len(train_loader))
    eval_every = cfg["trainer"]["eval_every"]
    evals, step, t0, to_target, samples, train_s = [], 0, time.perf_counter(), None, 0, 0.0

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        model.train()
        return correct / len(test)

    for epoch in range(max_epochs):
        t_train = time.perf_counter()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step, samples = step + 1, samples + len(x)
            if step % eval_every == 0:
                train_s += time.perf_counter() - t_train
                acc = evaluate()
                evals.append({"step": step, "test_accuracy": acc, "elapsed_s": round(time.perf_counter() - t0, 2)})
                print(f"plain step {step} (epoch {epoch + 1}): test accuracy {acc:.4f} at {evals[-1]['elapsed_s']}s",
                      flush=True)
                if acc >= TARGET:
                    to_target = evals[-1]["elapsed_s"]
                    break
                t_train = time.perf_counter()
        else:
            train_s += time.perf_counter() - t_train
            continue
        break
    return {"evaluations": evals, f"seconds_to_{TARGET}": to_target, "steps_per_epoch": len(train_loader),
            "samples_per_sec": round(samples / train_s, 1), "stopped": "target reached" if to_target else "max epochs"}


def lab_run(experiment: str, seed: int, extra: tuple[str, ...] = (), name: str | None = None) -> dict:
    """Run a preset; its curves, last confusion matrix and misclassified grid go to results/vision_<name>/."""
    run_dir = Path(tempfile.mkdtemp(prefix="lab-bench-"))
    cmd = [f"+experiment={experiment}", "logger=none", "trainer.progress=false", f"seed={seed}", *extra]
    rows, wall = record.run_lab(cmd, run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "perf/samples_per_sec" in r]
    last_train = train[-1]
    hit = next((r for r in evals if r["eval/accuracy"] >= TARGET), None)
    params = next(r["model/params"] for r in rows if "model/params" in r)
    figures = sorted((run_dir / "media").glob("*.png"))
    keep = REPO / "benchmarks" / "results" / f"vision_{name or experiment}"
    keep.mkdir(parents=True, exist_ok=True)
    for f in figures:  # curves, confusion matrix and misclassified grid of the last evaluation
        if f.name.startswith(("curves_", "eval_confusion_matrix_")) or f == max(
                (g for g in figures if g.name.startswith("eval_misclassified_")), default=None):
            shutil.copy(f, keep / (f.name.rsplit("_", 1)[0].replace("eval_", "") + ".png"))
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "command": " ".join(["python", "-m", "lab", *cmd]),
        "parameters": params,
        "evaluations": [{"step": r["step"], "test_accuracy": r["eval/accuracy"], "test_loss": round(r["eval/loss"], 4),
                         "elapsed_s": round(r["perf/elapsed_s"], 2)} for r in evals],
        "train_curve": [{"step": r["step"], "train_loss": round(r["train/loss"], 4),
                         "train_accuracy": round(r["train/accuracy"], 4)} for r in train],
        "best_test_accuracy": max(r["eval/accuracy"] for r in evals),
        "final_test_accuracy": evals[-1]["eval/accuracy"],
        "final_test_loss": round(evals[-1]["eval/loss"], 4),
        "last_logged_train_accuracy": round(last_train["train/accuracy"], 4),  # on augmented batches, dropout on
        "last_logged_train_loss": round(last_train["train/loss"], 4),
        f"seconds_to_{TARGET}": hit and round(hit["perf/elapsed_s"], 2),
        "training_seconds": round(evals[-1]["perf/elapsed_s"], 1),
        "samples_per_sec": round(sum(r["perf/samples_per_sec"] for r in train[1:]) / max(1, len(train) - 1), 1),
        "process_wall_s": round(wall, 1),
        "figures": str(keep.relative_to(REPO)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(PRESETS), required=True)
    ap.add_argument("--plain-epochs", type=int, default=5, help="stop the plain loop here if 92%% is not reached")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data_root = Path(os.environ.get("LAB_DATA_DIR") or REPO.parent / "shared" / "data")
    os.environ["LAB_DATA_DIR"] = str(data_root)
    experiment = PRESETS[args.model]
    cfg = composed(experiment)
    torch.set_num_threads(os.cpu_count() or 1)
    lab = lab_run(experiment, args.seed)
    print(f"lab: best {lab['best_test_accuracy']:.4f}, to {TARGET}: {lab[f'seconds_to_{TARGET}']}s", flush=True)
    tv_root = torchvision_root(data_root)
    try:
        plain = plain_loop(cfg, tv_root, args.plain_epochs, args.seed)
    finally:
        shutil.rmtree(tv_root, ignore_errors=True)
    a, b = lab[f"seconds_to_{TARGET}"], plain[f"seconds_to_{TARGET}"]
    figures = {"experiment": experiment, "target_test_accuracy": TARGET, "lab": lab, "plain_pytorch": plain,
               f"speedup_to_{TARGET}": round(b / a, 2) if a and b else None,
               "throughput_ratio": round(lab["samples_per_sec"] / plain["samples_per_sec"], 2)}
    print(json.dumps({k: figures[k] for k in (f"speedup_to_{TARGET}", "throughput_ratio")}))
    record.write(f"vision_fashion_{args.model}", figures)


if __name__ == "__main__":
    main()
