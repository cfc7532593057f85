"""Frechet distance between generated and real images in the feature space of a classifier the lab trains.

Inception FID (Heusel et al. 2017) compares Gaussians fitted to 2048-d pool features of an
ImageNet Inception-v3 on 299 px RGB. Here the feature network is the `mnist_cnn` network
(vision/deep_cnn.py: the deep CNN of "Deep Learning from Scratch" ch. 8) trained on the
same data set at the generator's resolution, and the features are its 50-d penultimate
layer (after ReLU). The formula is the same,

    FD = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)),

but the numbers are not comparable with published Inception FIDs (other features, other
dimension, other data): compare them between runs that use the same classifier only.
The classifier is trained once per (data set, size, recipe) and cached in `fid.cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lab import io
from lab.devices import native_bf16
from lab.errors import LabError
from vision.deep_cnn import DeepCNN


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2): a symmetric PSD matrix, so eigvalsh is exact.
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


class FeatureNet(nn.Module):
    """The classifier with a `features` method: its penultimate activations."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden: int):
        super().__init__()
        self.net = DeepCNN(in_channels, num_classes, image_size, hidden=hidden, dropout=0.25, final_dropout=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classifier[:2](self.net.features(x))  # Linear(flat, hidden) + ReLU


def classifier_seed(cfg: Any) -> int:
    """`fid.seed`: the metric's own seed, not the run's, so runs of any seed are measured by one classifier."""
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LabError(f"fid.seed={seed!r} must be an integer (the FID classifier's seed; default 0)")
    return seed


class FID:
    """`FID(cfg.fid, train, test, device)(generate)`: the distance between `n_fake` generated images and the
    first `n_real` test images. Images are uint8 (N, C, H, W) for the data and [0, 1] floats from `generate`."""

    def __init__(self, cfg: Any, data_cfg: Any, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.cfg, self.device = cfg, device
        seed = classifier_seed(cfg)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        _, c, size, _ = train_x.shape
        num_classes = int(train_y.max()) + 1
        self.net = FeatureNet(c, num_classes, size, int(cfg.hidden)).to(device)
        recipe = {"data": str(data_cfg.get("name")), "path": str(data_cfg.get("path")), "size": size, "channels": c,
                  "n_train": len(train_x), "classes": num_classes, "epochs": cfg.epochs, "hidden": cfg.hidden,
                  "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": seed,
                  "precision": "bf16" if native_bf16(device) else "32"}
        key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
        path = Path(str(cfg.cache_dir)).expanduser() / f"{recipe['data']}_{size}px_{key}.pt"
        if path.is_file():
            state = torch.load(path, map_location=device, weights_only=True)
            self.net.load_state_dict(state["model"])
            self.accuracy = float(state["test_accuracy"])
        else:
            print(f"[lab] training the FID feature classifier ({cfg.epochs} epochs on {len(train_x):,} images); "
                  f"cached at {path}", flush=True)
            train_classifier(self.net, train_x.to(device), train_y.to(device), self.normalize, cfg, seed)
            self.accuracy = accuracy(self.net, test_x.to(device), test_y.to(device), self.normalize)
            io.torch_save(path, {"model": self.net.state_dict(), "test_accuracy": self.accuracy, "recipe": recipe})
        self.net.eval().requires_grad_(False)
        self.real = self.features_of(test_x[: cfg.n_real].to(device).float() / 255)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    @torch.no_grad()
    def features_of(self, x01: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """Penultimate features of images in [0, 1], in float32 whatever the run's precision."""
        with torch.autocast(self.device.type, enabled=False):
            return torch.cat([self.net.features(self.normalize(x01[i: i + batch].float()))
                              for i in range(0, len(x01), batch)])

    @torch.no_grad()
    def __call__(self, generate: Callable[[int], torch.Tensor], batch: int = 500) -> float:
        """`generate(n)` returns n images in [0, 1]; the distance of `n_fake` of them to the test images."""
        n = int(self.cfg.n_fake)
        feats = [self.features_of(generate(min(batch, n - i)).float().clamp(0, 1)) for i in range(0, n, batch)]
        return frechet_distance(self.real, torch.cat(feats))


@torch.enable_grad()  # FID is set up inside the trainer's no-grad evaluation
def train_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Callable, cfg: Any,
                     seed: int) -> None:
    """The mnist_cnn recipe: Adam with a one-cycle schedule, batch 100, bf16 autocast where the device runs
    bf16 natively (float32 elsewhere: an AVX2-only CPU emulates bf16 several times slower)."""
    low = native_bf16(x.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    steps_per_epoch = len(x) // cfg.batch_size
    if steps_per_epoch < 1:
        raise LabError(f"{len(x)} images are too few to train the FID classifier (batch {cfg.batch_size}); "
                       "use more data or fid.enabled=false")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(10, cfg.epochs * steps_per_epoch),
                                                pct_start=0.2)
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size: (i + 1) * cfg.batch_size]
            # No autocast weight cache: inside the trainer's bf16 evaluation the outer autocast never exits,
            # so cached bf16 copies of the weights would stay those of the first step.
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low, cache_enabled=False):
                loss = F.cross_entropy(net(normalize(x[idx].float() / 255)).float(), y[idx])
            with torch.autocast(x.device.type, enabled=False):  # backward and step outside autocast
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Callable, batch: int = 1000) -> float:
    """Test accuracy in float32, like the features (an enclosing autocast may hold stale bf16 weight copies)."""
    with torch.autocast(x.device.type, enabled=False):
        return _accuracy(net, x, y, normalize, batch)


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Callable, batch: int) -> float:
    correct = sum((net(normalize(x[i: i + batch].float() / 255)).argmax(1) == y[i: i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / len(x)
