"""A convolutional autoencoder and a VAE (Kingma & Welling 2013) on image data held on the device.

Encoder: Conv(32, 4, s2) ReLU -> Conv(64, 4, s2) ReLU -> Linear -> code (the VAE: mean and log-variance).
Decoder: Linear -> ConvTranspose(32, 4, s2) ReLU -> ConvTranspose(C, 4, s2) -> pixel logits.
Loss per image, in nats, summed over pixels as pytorch/examples' VAE does:

    autoencoder:  BCE(decoder(encoder(x)), x)
    VAE:          BCE(decoder(z), x) + KL(q(z|x) || N(0, I)),  z = mu + sigma * eps   (the negative ELBO)

Every evaluation logs the test loss per image, reconstructions next to their inputs, samples
decoded from random codes, the codes of the test set as a scatter coloured by class (the
latent plane itself for a 2-d code, else its first two principal components) with a decoded
grid over that plane, and the test accuracy of a linear classifier on the frozen codes next
to the same classifier on raw pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from lab import data, media
from lab.config import build
from lab.errors import LabError
from lab.optim import build_optimizer
from lab.plots import plt
from lab.task import RunContext, Task


class ConvAutoencoder(nn.Module):
    """`variational=False`: a plain autoencoder; `True`: the encoder outputs a Gaussian (mean, log-variance)."""

    def __init__(self, channels: int, image_size: int, latent_dim: int, width: int, variational: bool):
        super().__init__()
        if image_size % 4:
            raise LabError(f"the autoencoder needs an image size divisible by 4, got {image_size}")
        self.variational, self.latent_dim = variational, latent_dim
        self.side = image_size // 4
        flat = 2 * width * self.side**2
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(True),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(True), nn.Flatten(),
            nn.Linear(flat, latent_dim * (2 if variational else 1)))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, flat), nn.ReLU(True), nn.Unflatten(1, (2 * width, self.side, self.side)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(True),
            nn.ConvTranspose2d(width, channels, 4, 2, 1))  # logits

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The code (the VAE: its mean) and, for the VAE, the log-variance."""
        h = self.encoder(x)
        return h.chunk(2, dim=1) if self.variational else (h, None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.variational and self.training else mu
        return self.decoder(z), mu, logvar


def loss_per_image(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                   logvar: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, KL), each summed over an image and averaged over the batch, in nats."""
    n = len(x)
    rec = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="sum") / n
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / n) if logvar is not None else rec.new_zeros(())
    return rec + kl, rec, kl


class Autoencoder(Task):
    main_metric = "eval/loss"
    main_mode = "min"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        d, m = cfg.data, cfg.model
        train, test = data.from_config(d, "train"), data.from_config(d, "test")
        self.classes = train.spec.classes
        self.train_x = train.images[: d.get("subset")].to(ctx.device)
        self.train_y = train.labels[: d.get("subset")].to(ctx.device)
        self.test_x = test.images[: d.get("test_subset")].to(ctx.device)
        self.test_y = test.labels[: d.get("test_subset")].to(ctx.device)
        self.loader = data.TensorLoader(self.train_x, self.train_y, d.batch_size, seed=ctx.seed, rank=ctx.dist.rank,
                                        world_size=ctx.dist.world_size, transform=to_unit)
        _, c, h, _ = train.images.shape
        self.model = build(m, "model", channels=c, image_size=h)
        # Gaussian fitted to the training codes (mean, Cholesky factor): what the plain autoencoder samples from.
        self.register_buffer("code_mean", torch.zeros(m.latent_dim))
        self.register_buffer("code_chol", torch.eye(m.latent_dim))
        self.pixel_accuracy: float | None = None  # the raw-pixel linear classifier: trained once

    def optimizers(self, total_steps: int | None) -> dict[str, Any]:
        return {"model": build_optimizer(self.cfg.optimizer, self.model.parameters())}

    def train_data(self) -> data.TensorLoader:
        return self.loader

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], optim: Any) -> dict[str, Any]:
        x, _ = batch
        logits, mu, logvar = self.model(x)
        loss, rec, kl = loss_per_image(logits, x, mu, logvar)
        optim.step("model", loss)
        return {"loss": loss.detach(), "reconstruction": rec.detach(), "kl": kl.detach()}

    # ---- evaluation ------------------------------------------------------------------------------
    def codes(self, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        return torch.cat([self.model.encode(to_unit(images[i: i + batch]))[0].float()
                          for i in range(0, len(images), batch)])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(z).float().sigmoid()

    def evaluate(self) -> dict[str, float]:
        bs = self.cfg.data.eval_batch_size
        total = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
        for i in range(0, len(self.test_x), bs):
            x = to_unit(self.test_x[i: i + bs])
            # The test loss of the VAE samples z like training does (pytorch/examples' test loss does too).
            self.model.train(self.model.variational)
            logits, mu, logvar = self.model(x)
            self.model.eval()
            for k, v in zip(total, loss_per_image(logits, x, mu, logvar)):
                total[k] += v.item() * len(x)
        out = {k: v / len(self.test_x) for k, v in total.items()}
        if not self.model.variational:
            del out["kl"]

        train_codes, test_codes = self.codes(self.train_x), self.codes(self.test_x)
        self.code_mean.copy_(train_codes.mean(0))
        cov = torch.cov(train_codes.T.double()).reshape(len(self.code_mean), -1)
        eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.code_chol.copy_(torch.linalg.cholesky(cov + 1e-6 * eye).float())
        p = self.cfg.probe
        out["probe_accuracy_codes"] = linear_probe(train_codes, self.train_y, test_codes, self.test_y, p)
        if self.pixel_accuracy is None:
            flat = lambda x: to_unit(x).flatten(1)  # noqa: E731
            self.pixel_accuracy = linear_probe(flat(self.train_x), self.train_y, flat(self.test_x), self.test_y, p)
        out["probe_accuracy_pixels"] = self.pixel_accuracy
        self._log_images(test_codes)
        return out

    def _log_images(self, test_codes: torch.Tensor) -> None:
        log, n = self.ctx.logger, 32
        x = to_unit(self.test_x[:n])
        pairs = torch.stack([x, self.decode(test_codes[:n])], 1).flatten(0, 1)  # input, reconstruction, ...
        log.log_grid("reconstructions", pairs, nrow=16, caption="odd columns: test inputs; even: reconstructions")
        log.log_grid("samples", self.sample(64), nrow=8)
        log.log_image("latent_space", self._latent_figure(test_codes))

    def sample(self, n: int) -> torch.Tensor:
        """New images from random codes: N(0, I) for the VAE, the Gaussian fitted to the codes otherwise."""
        eps = torch.randn(n, len(self.code_mean), device=self.code_mean.device)
        z = eps if self.model.variational else self.code_mean + eps @ self.code_chol.T
        return self.decode(z)

    def _latent_figure(self, codes: torch.Tensor):
        """Test codes on a plane (the latent plane for 2-d codes, else the top two principal components),
        coloured by class, next to images decoded over a grid spanning that plane."""
        mean = codes.mean(0)
        if codes.shape[1] == 2:
            basis, title = torch.eye(2, device=codes.device), "latent space"
        else:
            basis = torch.linalg.svd(codes - mean, full_matrices=False)[2][:2].T  # (D, 2)
            title = "latent space: first two principal components"
        xy = ((codes - mean) @ basis).cpu()
        lo, hi = xy.quantile(0.02, 0).tolist(), xy.quantile(0.98, 0).tolist()
        k = int(self.cfg.probe.grid)
        u, v = torch.linspace(lo[0], hi[0], k), torch.linspace(hi[1], lo[1], k)
        plane = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], -1).reshape(-1, 2).to(codes.device)
        tiles = self.decode(mean + plane @ basis.T).cpu()
        from torchvision.utils import make_grid

        grid = make_grid(tiles, nrow=k, padding=0).permute(1, 2, 0).numpy()
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5))
        labels = self.test_y.cpu()
        sc = a.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=2, vmin=-0.5, vmax=9.5)
        a.set_xlim(lo[0], hi[0])
        a.set_ylim(lo[1], hi[1])
        a.set_title(title, fontsize=9)
        cbar = fig.colorbar(sc, ax=a, ticks=range(len(self.classes)))
        cbar.ax.set_yticklabels(self.classes, fontsize=7)
        b.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", extent=(lo[0], hi[0], lo[1], hi[1]),
                 aspect="auto")
        b.set_title("decoded over the same plane", fontsize=9)
        fig.tight_layout()
        return fig

    # ---- mode=generate ---------------------------------------------------------------------------
    def generate(self, n: int) -> dict[str, Any]:
        """`mode=generate checkpoint=PATH n=N`: N images decoded from random codes, `generated.png`."""
        return media.write_generated(self.ctx.run_dir, self.ctx.logger, self.sample(n).cpu())


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [0, 1] (the VAE's Bernoulli targets)."""
    return x.float() / 255


@torch.enable_grad()
def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 cfg: Any) -> float:
    """Test accuracy of multinomial logistic regression on standardised features (full-batch L-BFGS, L2)."""
    with torch.autocast(train_x.device.type, enabled=False):
        train_x, test_x = train_x.float(), test_x.float()
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        a, b = (train_x - mean) / std, (test_x - mean) / std
        n_classes = int(train_y.max()) + 1
        clf = nn.Linear(a.shape[1], n_classes).to(a.device)
        opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=cfg.max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(clf(a), train_y) + cfg.weight_decay * clf.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return (clf(b).argmax(1) == test_y).float().mean().item()
