"""DCGAN on MNIST (32 px) on this machine: the lab versus a plain pytorch/examples-style loop, same run.

    python benchmarks/dcgan_mnist.py [--epochs 2] [--seeds 0 1] [--workers 0] [--lab-args key=value ...]

1. The lab: `python -m lab +experiment=dcgan_mnist trainer.max_epochs=E` (bf16 autocast,
   channels-last, the data set as a uint8 tensor batched on the device, BCE with logits).
2. The plain loop, written the way pytorch/examples/dcgan writes it: torchvision MNIST with
   Resize(32)+ToTensor+Normalize(0.5, 0.5), a DataLoader (batch 128, shuffle), the same
   networks with D ending in Sigmoid and BCELoss, fp32, Adam 2e-4 betas (0.5, 0.999).

Both: nz 100, ngf = ndf = 64, batch 128, E epochs, the same seed. Images per second count
training only (FID evaluations excluded). `eval/fid` after every epoch is computed for both
with the same code and the same cached feature classifier (generative/fid.py, seed `fid.seed`, the
same for every run): 10,000 samples from G in eval mode against the 10,000 test images. A GAN's FID
after a given epoch moves by several points from seed to seed and epoch to epoch, so each seed in
`--seeds` runs both loops, and the means are compared. Writes benchmarks/results/dcgan_mnist.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mnist_cnn import torchvision_root  # noqa: E402

import record  # noqa: E402
from generative.fid import FID  # noqa: E402
from lab import data as lab_data  # noqa: E402


# ---- pytorch/examples/dcgan/main.py, sized for 32x32 (one stride-2 layer fewer than its 64x64) ---------
def weights_init(m: nn.Module) -> None:
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 1):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, nc: int = 1):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


def plain_loop(root: Path, epochs: int, workers: int, seed: int, fid: FID) -> dict:
    """pytorch/examples' training loop; nothing here is tuned."""
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    torch.manual_seed(seed)
    dataset = dset.MNIST(root=str(root), download=False, transform=transforms.Compose([
        transforms.Resize(32), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, num_workers=workers)
    netG, netD = Generator(), Discriminator()
    netG.apply(weights_init)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    real_label, fake_label = 1, 0
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    curve, train_s, images = [], 0.0, 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for data in dataloader:
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            real_cpu = data[0]
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype)
            output = netD(real_cpu)
            errD_real = criterion(output, label)
            errD_real.backward()
            noise = torch.randn(batch_size, 100, 1, 1)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            errD_fake.backward()
            optimizerD.step()
            # (2) Update G network: maximize log(D(G(z)))
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake)
            errG = criterion(output, label)
            errG.backward()
            optimizerG.step()
            images += batch_size
        train_s += time.perf_counter() - t0
        netG.eval()
        with torch.no_grad():
            value = fid(lambda n: (netG(torch.randn(n, 100, 1, 1)) + 1) / 2)
        netG.train()
        curve.append({"epoch": epoch, "fid": round(value, 3), "train_s": round(train_s, 1)})
        print(f"plain epoch {epoch}: fid {value:.2f}, {images / train_s:.0f} images/s", flush=True)
    return {"per_epoch": curve, "final_fid": curve[-1]["fid"], "images_per_sec": round(images / train_s, 1),
            "train_seconds": round(train_s, 1), "dataloader_workers": workers}


def lab_run(epochs: int, cache: Path, extra: list[str], name: str) -> tuple[dict, dict]:
    run_dir = REPO / "outputs" / "benchmarks" / name  # kept: its sample grids and samples.gif
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["+experiment=dcgan_mnist", "logger=none", "trainer.progress=false", f"trainer.max_epochs={epochs}",
           f"fid.cache_dir={cache}", *extra]
    rows, wall = record.run_lab(cmd, run_dir)
    evals = [r for r in rows if "eval/fid" in r]
    train = [r for r in rows if "perf/samples_per_sec" in r]
    config = OmegaConf.load(run_dir / "config.yaml")
    # Throughput: the logging windows after the first (which includes warm-up), as benchmarks/mnist_cnn.py does.
    rate = sum(r["perf/samples_per_sec"] for r in train[1:]) / max(1, len(train) - 1)
    return {"command": " ".join(["-m", "lab", *cmd]),
            "per_epoch": [{"epoch": i + 1, "fid": round(r["eval/fid"], 3), "step": r["step"]}
                          for i, r in enumerate(evals)],
            "final_fid": round(evals[-1]["eval/fid"], 3), "images_per_sec": round(rate, 1),
            "fid_classifier_test_accuracy": evals[-1]["eval/fid_classifier_accuracy"],
            "process_wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(REPO))}, config


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else None, "runs": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="plain loop DataLoader workers (pytorch/examples: 2; "
                    "0 was faster on this 2-core machine, see benchmarks/results/mnist_cnn.json)")
    ap.add_argument("--lab-args", nargs="*", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    data_root = Path(os.environ.get("LAB_DATA_DIR") or REPO.parent / "shared" / "data")
    os.environ["LAB_DATA_DIR"] = str(data_root)
    cache = Path(tempfile.mkdtemp(prefix="fid-cache-"))  # one FID classifier for every run (fid.seed)
    tv_root = torchvision_root(data_root)
    runs = []
    try:
        for seed in args.seeds:
            name = "dcgan_mnist" if seed == args.seeds[0] else f"dcgan_mnist_seed{seed}"
            lab, cfg = lab_run(args.epochs, cache, [f"seed={seed}", *args.lab_args], name)
            print(f"seed {seed} lab: {lab['per_epoch']}, {lab['images_per_sec']} images/s", flush=True)
            train, test = lab_data.from_config(cfg.data, "train"), lab_data.from_config(cfg.data, "test")
            fid = FID(cfg.fid, cfg.data, train.images, train.labels, test.images, test.labels, train.spec.mean,
                      train.spec.std, torch.device("cpu"))  # the lab run's classifier, from the cache
            plain = plain_loop(tv_root, args.epochs, args.workers, seed, fid)
            runs.append({"seed": seed, "lab": lab, "plain_pytorch_examples": plain,
                         "throughput_ratio": round(lab["images_per_sec"] / plain["images_per_sec"], 2)})
    finally:
        shutil.rmtree(tv_root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    lab_fid = mean_std([r["lab"]["final_fid"] for r in runs])
    plain_fid = mean_std([r["plain_pytorch_examples"]["final_fid"] for r in runs])
    ratio = round(statistics.mean(r["throughput_ratio"] for r in runs), 2)
    figures = {
        "epochs": args.epochs, "seeds": args.seeds, "runs": runs,
        "final_fid": {"lab": lab_fid, "plain_pytorch_examples": plain_fid,
                      "lab_minus_plain": round(lab_fid["mean"] - plain_fid["mean"], 3)},
        "throughput_ratio": ratio,
        "meets_target": ratio >= 1.5 and lab_fid["mean"] <= plain_fid["mean"],
        "fid_note": "Frechet distance in the 50-d penultimate features of the mnist_cnn network trained on MNIST "
                    "at 32 px (generative/fid.py, fid.seed=0 for every run); not comparable with Inception FIDs",
        "goal": "lab >= 1.5x the training images/s at equal or better (lower) FID, means over the seeds",
    }
    print(json.dumps({k: figures[k] for k in ("throughput_ratio", "final_fid", "meets_target")}))
    record.write("dcgan_mnist", figures)


if __name__ == "__main__":
    main()
