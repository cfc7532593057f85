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


def constant_lr(cfg: DictConfig | None) -> bool:
    """Whether `scheduler:` leaves the learning rate at optimizer.lr throughout (none, or linear to 1.0 of it)."""
    name = str((cfg or {}).get("name", "none"))
    return name == "none" or (name == "linear" and float(cfg.get("end_factor", 0.0)) == 1.0)


def build_scheduler(cfg: DictConfig | None, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
    """A per-step schedule: `name: none | onecycle | cosine | step | linear` with its parameters.

    onecycle: peaks at the optimizer's lr (`optimizer.lr`), `pct_start`, `div_factor`, `final_div_factor`;
    momentum (or Adam's beta1) cycles too when the optimizer has one. cosine: `eta_min`, `warmup` (share of
    the budget, linear from lr/100). step: `step_size` and `gamma` (StepLR), or `milestones` as shares of
    the budget, e.g. [0.5, 0.75] for He et al.'s lr/10 at 50% and 75%. linear: from `optimizer.lr` down to
    `end_factor` times it at the end of the budget (RL Zoo's `lin_<lr>` schedules with end_factor 0).
    """
    name = (cfg or {}).get("name", "none") if cfg is not None else "none"
    if name is None or constant_lr(cfg):  # none, or linear to 1.0 of the lr
        return None
    if total_steps is None and name in ("onecycle", "cosine", "linear"):
        raise LabError(f"scheduler.name={name} needs a step budget: set trainer.max_epochs or trainer.max_steps")
    S = torch.optim.lr_scheduler
    if name == "onecycle":
        if cfg.get("max_lr") is not None:
            raise LabError("scheduler.max_lr is not a key: the one-cycle schedule peaks at optimizer.lr; set "
                           "optimizer.lr instead")
        group = optimizer.defaults
        has_momentum = group.get("momentum", 0) > 0 or "betas" in group  # never add momentum to plain SGD
        # torch divides by the warm-up's length, zero when pct_start * steps = 1 (5 steps at 0.2): from 3 steps on,
        # each phase lasts at least a step; a run of 1 or 2 steps (a smoke test) starts past the warm-up
        pct = float(cfg.get("pct_start", 0.25))
        pct = min(max(pct, 2 / total_steps), 1 - 1 / total_steps) if total_steps >= 3 else min(pct, 0.4 / total_steps)
        return S.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                            pct_start=pct, div_factor=cfg.get("div_factor", 25.0),
                            final_div_factor=cfg.get("final_div_factor", 1e4),
                            cycle_momentum=cfg.get("cycle_momentum", has_momentum))
    if name == "cosine":
        warmup = int(total_steps * cfg.get("warmup", 0.0))
        cosine = S.CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=cfg.get("eta_min", 0.0))
        if not warmup:
            return cosine
        ramp = S.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        return S.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    if name == "step":
        if cfg.get("milestones") is not None:
            if total_steps is None:
                raise LabError("scheduler.milestones are shares of the budget: set trainer.max_epochs or max_steps")
            steps = [int(total_steps * f) for f in cfg.milestones]
            return S.MultiStepLR(optimizer, milestones=steps, gamma=cfg.get("gamma", 0.1))
        return S.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.get("gamma", 0.1))
    if name == "linear":
        end = float(cfg.get("end_factor", 0.0))
        if not 0 <= end <= 1:
            raise LabError(f"scheduler.end_factor={end} must be in [0, 1] (the share of optimizer.lr left at the end)")
        return S.LinearLR(optimizer, start_factor=1.0, end_factor=end, total_iters=max(1, total_steps))
    raise LabError(f"scheduler.name={name!r} is unknown; use none, onecycle, cosine, step or linear")
