"""Image classification: cross-entropy on a torchvision-style data set held on the device.

Config: `model` (any nn.Module taking in_channels, num_classes, image_size), `optimizer`,
`scheduler`, `data` (name, batch sizes, subset, augmentation). Logs loss and accuracy, and
a grid of misclassified test images with their label and prediction at every evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lab import augment, data
from lab.config import build
from lab.optim import build_optimizer, build_scheduler
from lab.plots import plt
from lab.task import RunContext, Task


class Classification(Task):
    main_metric = "eval/accuracy"
    main_mode = "max"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        d = cfg.data
        train = data.load(d.name, "train", d.root, d.download)
        test = data.load(d.name, "test", d.root, d.download)
        self.classes = train.spec.classes
        tr_x, tr_y = train.images[: d.get("subset")], train.labels[: d.get("subset")]
        self.test_x = test.images[: d.get("test_subset")].to(ctx.device)
        self.test_y = test.labels[: d.get("test_subset")].to(ctx.device)
        self.normalize = data.normalizer(train.spec.mean, train.spec.std, ctx.device)
        aug = augment.augmenter(**d.get("augment", {}))
        self.loader = data.TensorLoader(
            tr_x.to(ctx.device), tr_y.to(ctx.device), d.batch_size, seed=ctx.seed, rank=ctx.dist.rank,
            world_size=ctx.dist.world_size, transform=lambda x: self.normalize(aug(x)))
        self.eval_batch_size = d.eval_batch_size
        _, c, h, _ = train.images.shape
        self.model = build(cfg.model, "model", in_channels=c, num_classes=len(self.classes), image_size=h)

    def optimizers(self, total_steps: int | None) -> dict:
        opt = build_optimizer(self.cfg.optimizer, self.model.parameters())
        return {"model": (opt, build_scheduler(self.cfg.get("scheduler"), opt, total_steps))}

    def train_data(self) -> data.TensorLoader:
        return self.loader

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], optim) -> dict:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.get("label_smoothing", 0.0))
        optim.step("model", loss)
        return {"loss": loss, "accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate(self) -> dict:
        loss, correct, wrong = 0.0, 0, []
        for i in range(0, len(self.test_x), self.eval_batch_size):
            x, y = self.test_x[i: i + self.eval_batch_size], self.test_y[i: i + self.eval_batch_size]
            logits = self.model(self.normalize(x)).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(1)
            correct += (pred == y).sum().item()
            if sum(len(w[0]) for w in wrong) < 36:
                miss = (pred != y).nonzero().flatten()
                wrong.append((x[miss].cpu(), y[miss].cpu(), pred[miss].cpu()))
        n = len(self.test_x)
        if wrong:
            self.ctx.logger.log_image("eval/misclassified", self._grid(*map(torch.cat, zip(*wrong))))
        return {"loss": loss / n, "accuracy": correct / n}

    def _grid(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, n: int = 36, cols: int = 6):
        """One figure of up to n misclassified images, each titled 'label → prediction'."""
        from torchvision.utils import make_grid

        n = min(n, len(images))
        pad, size = 14, images.shape[-1]  # room above each image for its caption
        grid = make_grid(images[:n], nrow=cols, padding=pad, pad_value=255).permute(1, 2, 0).numpy()
        rows = -(-n // cols)
        fig, ax = plt.subplots(figsize=(cols * 1.3, rows * 1.45))
        ax.imshow(grid[..., 0] if images.shape[1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        for i in range(n):
            r, c = divmod(i, cols)
            ax.text(pad + c * (size + pad) + size / 2, pad + r * (size + pad) - 2,
                    f"{self.classes[labels[i]]} → {self.classes[preds[i]]}", ha="center", va="bottom",
                    fontsize=6, color="crimson")
        ax.set_title("misclassified test images: label → prediction", fontsize=8)
        ax.axis("off")
        return fig
