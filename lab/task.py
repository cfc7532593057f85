"""The contract between a task (model, loss, data, evaluation) and the trainer (everything else).

A task is an `nn.Module` that owns its networks. The trainer calls, in this order:

    task = TaskClass(cfg, ctx)            # build networks and data (ctx: resolved run settings, logger)
    task.optimizers(total_steps)          # {"name": optimizer} or {"name": (optimizer, scheduler)}
    for each step:
        task.training_step(batch, optim)  # forward, then optim.step("name", loss) per update phase
    task.evaluate()                       # every N steps and at the end: {"metric": value}

`optim.step(name, loss)` does backward, gradient scaling (fp16), clipping, the optimizer and
scheduler steps for the optimizer called `name`. A task with several networks or update
phases (a GAN's discriminator then generator; a DQN acting then learning) calls it once per
phase. Precision, devices, DDP, compile, checkpoints and logging stay in the trainer: a task reads the
resolved run settings from `ctx` (never `cfg.trainer`) and declares what it needs with class attributes
(`progress_keys`, `single_process`, `fp32_only`) that the trainer checks once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from lab.distributed import DistInfo
from lab.logger import RunLogger


@dataclass
class RunContext:
    """What a task may know about the run it is in: settings as resolved for this run (`trainer.precision=auto`
    is already "32" or "bf16" here)."""

    device: torch.device
    dist: DistInfo
    logger: RunLogger  # media helpers: log_image, log_grid, log_video, log_table
    run_dir: Path
    seed: int
    precision: str = "32"  # 32 | bf16 | fp16: the autocast the trainer runs the task's steps under
    compile: bool = False  # the trainer compiles the task's child modules
    channels_last: bool = False  # the trainer converts the task's modules to NHWC
    grad_clip: float | None = None  # the global gradient norm `optim.step` clips to
    mode: str = "train"  # train | eval | generate


class Optim(Protocol):
    def step(self, name: str, loss: torch.Tensor) -> None: ...


class Task(nn.Module):
    """Base class for every experiment's task. Child modules are moved, compiled and DDP-wrapped by the trainer."""

    main_metric: str | None = None  # e.g. "eval/accuracy": chooses best.pt and the sweep objective
    main_mode: str = "max"  # or "min"
    step_metric: str = "step"  # the x-axis of this task's charts in W&B (an agent's: "env_steps")
    progress_keys: tuple[str, ...] = ("loss",)  # train/ metrics the progress bar shows beside the throughput
    # Capabilities, checked by the trainer before the task is built. A string is the reason, shown to the user.
    single_process: bool | str = False  # True: refused under torchrun (DDP)
    fp32_only: bool | str = False  # True: refused unless the run's precision is 32

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def optimizers(self, total_steps: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def train_data(self) -> Iterable[Any]:
        """One epoch of batches (may be endless); `set_epoch(epoch)` is called when present."""
        raise NotImplementedError

    def training_step(self, batch: Any, optim: Optim) -> dict[str, Any]:
        """One step; returns scalars to log under `train/` (tensors are fine: no sync needed). A list holds
        several samples of a metric (e.g. the returns of the episodes that ended): the log averages them all."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics to log under `eval/` (a key with a prefix, `perf/...`, is logged as is); called on rank 0
        in eval mode under `torch.no_grad`."""
        return {}

    def snapshot_state(self) -> dict[str, Any]:
        """What best.pt holds: the evaluated task, which no run resumes from. Defaults to `state_dict()`; a task
        may leave out large resume-only state (an agent's replay buffer)."""
        return self.state_dict()

    def close(self) -> None:
        """Release what the task holds outside torch (environments); called once the run ends."""

    def progress(self) -> dict[str, float]:
        """Counters logged with every row besides the trainer's step (an agent's `env_steps`, `frames`)."""
        return {}

    def samples_in(self, batch: Any) -> int | None:
        """How many samples a batch holds (for samples/s); the leading size of its first tensor."""
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return first.shape[0] if isinstance(first, torch.Tensor) else None
