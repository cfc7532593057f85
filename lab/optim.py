"""Optimizers and learning-rate schedules from config, shared by every task."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig

from lab.config import build
from lab.errors import LabError


def build_optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`cfg` names a torch optimizer (`_target_: torch.optim.Adam`, `lr: ...`)."""
    return build(cfg, "optimizer", params)


def build_scheduler(cfg: DictConfig | None, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
    """A per-step schedule: `name: none | onecycle | cosine | step` with its parameters."""
    name = (cfg or {}).get("name", "none") if cfg is not None else "none"
    if name in ("none", None):
        return None
    if total_steps is None and name in ("onecycle", "cosine"):
        raise LabError(f"scheduler.name={name} needs a step budget: set trainer.max_epochs or trainer.max_steps")
    S = torch.optim.lr_scheduler
    if name == "onecycle":
        return S.OneCycleLR(optimizer, max_lr=cfg.max_lr, total_steps=total_steps,
                            pct_start=cfg.get("pct_start", 0.25), div_factor=cfg.get("div_factor", 25.0),
                            final_div_factor=cfg.get("final_div_factor", 1e4))
    if name == "cosine":
        return S.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.get("eta_min", 0.0))
    if name == "step":
        return S.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.get("gamma", 0.1))
    raise LabError(f"scheduler.name={name!r} is unknown; use none, onecycle, cosine or step")
