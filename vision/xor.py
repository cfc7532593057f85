"""XOR: four points no line separates. A tiny task for the MLP (conf/experiment/xor_mlp.yaml).

Every step is one full batch of the four points (0,0)->0, (0,1)->1, (1,0)->1, (1,1)->0; evaluation
reports the accuracy on them. A linear model reaches at most 0.75, one hidden ReLU layer reaches 1.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lab.config import build
from lab.optim import build_optimizer, build_scheduler
from lab.task import RunContext, Task
from vision import transfer


class XOR(Task):
    main_metric = "eval/accuracy"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], device=ctx.device)
        self.y = torch.tensor([0, 1, 1, 0], device=ctx.device)
        self.model = build(transfer.split_config(cfg.model)[0], "model", in_channels=2, num_classes=2, image_size=1)

    def optimizers(self, total_steps: int | None) -> dict:
        opt = build_optimizer(self.cfg.optimizer, self.model.parameters())
        return {"model": (opt, build_scheduler(self.cfg.get("scheduler"), opt, total_steps))}

    def train_data(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x, self.y)]  # one epoch = one full batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], optim) -> dict:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        optim.step("model", loss)
        return {"loss": loss, "accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate(self) -> dict:
        logits = self.model(self.x).float()
        return {"loss": F.cross_entropy(logits, self.y).item(),
                "accuracy": (logits.argmax(1) == self.y).float().mean().item()}
