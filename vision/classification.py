"""Image classification: cross-entropy on an image data set held on the device.

Config: `model` (any nn.Module taking in_channels, num_classes, image_size; plus the transfer keys
`weights`, `freeze`, `arch` of vision/transfer.py), `optimizer`, `scheduler`, `label_smoothing`, and
`data` (lab/data.py: name or folder path, resize, channels, batch sizes, subset, augmentation).
Logs train and test loss and accuracy; at every evaluation the confusion matrix (CSV; the last one also
as a PNG) and a grid of misclassified test images with label and prediction; once, the parameter counts
(also in model.txt with the network's layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lab import augment, data
from lab.config import build
from lab.optim import build_optimizer, build_scheduler
from lab.plots import confusion_figure, plt
from lab.task import RunContext, Task
from vision import transfer


class Classification(Task):
    main_metric = "eval/accuracy"
    main_mode = "max"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        d = cfg.data
        train, test = data.from_config(d, "train"), data.from_config(d, "test")
        self.classes = train.spec.classes
        tr_x, tr_y = train.images, train.labels  # data.subset / data.test_subset: already the first N
        self.test_x, self.test_y = test.images.to(ctx.device), test.labels.to(ctx.device)
        self.normalize = data.normalizer(train.spec.mean, train.spec.std, ctx.device)
        aug = augment.from_config(d.get("augment"))
        self.loader = data.TensorLoader(
            tr_x.to(ctx.device), tr_y.to(ctx.device), d.batch_size, seed=ctx.seed, rank=ctx.dist.rank,
            world_size=ctx.dist.world_size, transform=lambda x: self.normalize(aug(x)))
        self.eval_batch_size = d.eval_batch_size
        _, c, h, _ = train.images.shape

        model_cfg, tl = transfer.split_config(cfg.model)
        self.model = build(model_cfg, "model", in_channels=c, num_classes=len(self.classes), image_size=h)
        self.frozen_bn: list[torch.nn.Module] = []
        if tl["weights"]:
            loaded = transfer.load_pretrained(self.model, str(tl["weights"]), tl["arch"])
            print(f"[lab] loaded {len(loaded)} tensors from {tl['weights']}; new head for {len(self.classes)} "
                  "classes", flush=True)
        if tl["freeze"]:
            self.frozen_bn = transfer.freeze_backbone(self.model)
        self.params = {"model/params": sum(p.numel() for p in self.model.parameters()),
                       "model/trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
        if ctx.dist.is_main:
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            (ctx.run_dir / "model.txt").write_text(
                f"{self.model}\n\nparameters: {self.params['model/params']:,} "
                f"(trainable: {self.params['model/trainable_params']:,})\n")
        self.confusion: tuple[int, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> Classification:
        super().train(mode)
        for m in self.frozen_bn:  # a frozen backbone keeps its BatchNorm statistics too
            m.eval()
        return self

    def optimizers(self, total_steps: int | None) -> dict:
        opt = build_optimizer(self.cfg.optimizer, [p for p in self.model.parameters() if p.requires_grad])
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
        if "model/params" not in self.ctx.logger.last:  # once per run, a resumed one included
            self.ctx.logger.log(self.params)
        k = len(self.classes)
        loss, confusion, wrong = 0.0, torch.zeros(k * k, dtype=torch.int64, device=self.test_y.device), []
        for i in range(0, len(self.test_x), self.eval_batch_size):
            x, y = self.test_x[i: i + self.eval_batch_size], self.test_y[i: i + self.eval_batch_size]
            logits = self.model(self.normalize(x)).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(1)
            confusion += torch.bincount(y * k + pred, minlength=k * k)
            if sum(len(w[0]) for w in wrong) < 36:
                miss = (pred != y).nonzero().flatten()
                wrong.append((x[miss].cpu(), y[miss].cpu(), pred[miss].cpu()))
        n = len(self.test_x)
        confusion = confusion.view(k, k).cpu()
        if any(len(w[0]) for w in wrong):
            self.ctx.logger.log_image("eval/misclassified", self._grid(*map(torch.cat, zip(*wrong))))
        self.confusion = (self.ctx.logger.step, confusion)  # drawn once, for the last evaluation, by close()
        self.ctx.logger.log_table("eval/confusion_matrix", ["label \\ prediction", *self.classes],
                                  [[c, *row] for c, row in zip(self.classes, confusion.tolist())])
        return {"loss": loss / n, "accuracy": confusion.diag().sum().item() / n}

    def close(self) -> None:
        if self.confusion is not None:
            step, confusion = self.confusion
            self.ctx.logger.log_image("eval/confusion_matrix", confusion_figure(confusion, self.classes), step=step)
            self.confusion = None

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
