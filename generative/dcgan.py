"""DCGAN (Radford et al. 2015) as in pytorch/examples, on the common trainer.

Generator: z (nz) -> ConvTranspose 4x4 -> [ConvTranspose stride 2, BatchNorm, ReLU] x k -> tanh image.
Discriminator: [Conv stride 2, BatchNorm (not on the first), LeakyReLU 0.2] x k -> Conv 4x4 -> logit.
Weights N(0, 0.02), BatchNorm scales N(1, 0.02); `optimizer:` (Adam 2e-4, betas (0.5, 0.999)) for each
network. One trainer step:

    fake = G(z)
    loss_d = bce(D(real), 1) + bce(D(fake.detach()), 0);   optim.step("d", loss_d)
    loss_g = bce(D(fake), 1)  (through the updated D);     optim.step("g", loss_g)

Departure from pytorch/examples: D returns logits and the loss is BCE-with-logits (the same
loss, stable under bf16/fp16 autocast) instead of a Sigmoid layer and BCELoss. Every evaluation
(each epoch) logs a grid from a fixed noise batch and `eval/fid` (generative/fid.py); the run
ends with an animation of those grids. `mode=generate checkpoint=PATH n=64` writes new samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from generative.fid import FID, classifier_seed
from lab import data, media
from lab.errors import LabError
from lab.optim import build_optimizer
from lab.task import RunContext, Task


def _layers(image_size: int) -> int:
    """Stride-2 layers between 4x4 and the image: 3 for 32 px, 4 for 64 px."""
    k = math.log2(image_size / 4)
    if image_size < 16 or k != int(k):
        raise LabError(f"gan.image_size={image_size} must be a power of two >= 16 (32 or 64 as in DCGAN)")
    return int(k)


class Generator(nn.Module):
    def __init__(self, nz: int, ngf: int, channels: int, image_size: int):
        super().__init__()
        k = _layers(image_size)
        width = ngf * 2 ** (k - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(True)]
        for _ in range(k - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(len(z), -1, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, ndf: int, channels: int, image_size: int):
        super().__init__()
        k = _layers(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(k - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()  # one logit per image


def dcgan_init(m: nn.Module, std: float) -> None:
    """pytorch/examples' weights_init: conv weights N(0, std), BatchNorm weight N(1, std) and bias 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, std)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, std)
        nn.init.zeros_(m.bias)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """tanh output in [-1, 1] -> image in [0, 1]."""
    return (x.float() + 1) / 2


class DCGAN(Task):
    main_metric = "eval/fid"
    main_mode = "min"
    progress_keys = ("loss_d", "loss_g")
    single_process = "DDP would sync BatchNorm buffers between the two D forwards of a step; raise data.batch_size"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        g, d = cfg.gan, cfg.data
        if d.get("image_size") != g.image_size:
            raise LabError(f"data.image_size={d.get('image_size')} must equal gan.image_size={g.image_size}")
        train = data.from_config(d, "train")
        self.channels = train.images.shape[1]
        self.train_x = train.images[: d.get("subset")].to(ctx.device)
        self.train_y = train.labels[: d.get("subset")]
        self.spec = train.spec
        self.loader = data.TensorLoader(self.train_x, self.train_y.to(ctx.device), d.batch_size, seed=ctx.seed,
                                        transform=lambda x: x.float() / 127.5 - 1)  # uint8 -> [-1, 1]
        self.netG = Generator(g.nz, g.ngf, self.channels, g.image_size)
        self.netD = Discriminator(g.ndf, self.channels, g.image_size)
        self.netG.apply(lambda m: dcgan_init(m, g.init_std))
        self.netD.apply(lambda m: dcgan_init(m, g.init_std))
        # The fixed noise of the sample grids is part of the checkpoint: a resumed run draws the same grid.
        self.register_buffer("fixed_noise", torch.randn(g.grid_samples, g.nz,
                                                        generator=torch.Generator().manual_seed(ctx.seed)))
        self.fid: FID | None = None  # built at the first evaluation (mode=generate never needs it)
        self.fid_enabled = bool(cfg.fid.enabled)
        classifier_seed(cfg.fid)  # refuse a bad fid.seed before training, not at the first evaluation

    # ---- trainer contract -----------------------------------------------------------------------------
    def optimizers(self, total_steps: int | None) -> dict[str, Any]:
        """One `optimizer:` setting, an optimizer for each network."""
        return {"d": build_optimizer(self.cfg.optimizer, self.netD.parameters()),
                "g": build_optimizer(self.cfg.optimizer, self.netG.parameters())}

    def train_data(self) -> data.TensorLoader:
        return self.loader

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], optim: Any) -> dict[str, Any]:
        real, _ = batch
        z = torch.randn(len(real), self.cfg.gan.nz, device=real.device)
        fake = self.netG(z)
        ones, zeros = torch.ones(len(real), device=real.device), torch.zeros(len(real), device=real.device)
        d_real, d_fake = self.netD(real).float(), self.netD(fake.detach()).float()
        loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        optim.step("d", loss_d)
        d_gen = self.netD(fake).float()
        loss_g = F.binary_cross_entropy_with_logits(d_gen, ones)
        optim.step("g", loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "d_real": d_real.detach().sigmoid().mean(),
                "d_fake": d_fake.detach().sigmoid().mean(), "d_gen": d_gen.detach().sigmoid().mean()}

    def evaluate(self) -> dict[str, float]:
        self.ctx.logger.log_grid("samples", to_unit(self.netG(self.fixed_noise)), nrow=8)
        if not self.fid_enabled:
            return {}
        if self.fid is None:
            if self.train_y.max() < 1:
                print("[lab] eval/fid needs class labels to train its feature classifier, and this data has one "
                      "class: no FID (set fid.enabled=false to silence this)", flush=True)
                self.fid_enabled = False
                return {}
            test = data.from_config(self.cfg.data, "test")
            n = self.cfg.data.get("test_subset")
            self.fid = FID(self.cfg.fid, self.cfg.data, self.train_x, self.train_y, test.images[:n], test.labels[:n],
                           self.spec.mean, self.spec.std, self.ctx.device)
        fid = self.fid(self.sample)
        return {"fid": fid, "fid_classifier_accuracy": self.fid.accuracy}

    def sample(self, n: int) -> torch.Tensor:
        """n new images in [0, 1]."""
        device = self.fixed_noise.device
        return to_unit(self.netG(torch.randn(n, self.cfg.gan.nz, device=device)))

    # ---- mode=generate and the end of the run ----------------------------------------------------------
    def generate(self, n: int) -> dict[str, Any]:
        """`mode=generate checkpoint=PATH n=N`: a grid of N new samples, `generated.png` in the run directory."""
        images = torch.cat([self.sample(min(500, n - i)).cpu() for i in range(0, n, 500)])
        return media.write_generated(self.ctx.run_dir, self.ctx.logger, images)

    def close(self) -> None:
        """The animation of the fixed-noise grids over training (all epochs, resumed runs included)."""
        if self.ctx.mode == "train" and self.ctx.dist.is_main:
            frames = sorted((self.ctx.run_dir / "media").glob("samples_*.png"))
            if len(frames) > 1:
                media.save_animation(self.ctx.run_dir / "samples.gif", frames, self.cfg.gan.animation_fps)
                from PIL import Image

                video = [np.asarray(Image.open(f).convert("RGB")) for f in frames]
                self.ctx.logger.log_video("samples_animation", np.stack(video), fps=self.cfg.gan.animation_fps)
