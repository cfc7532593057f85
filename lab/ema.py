"""`trainer.ema`: an exponential moving average of the trained weights, which evaluation, best.pt and
`mode=eval`/`predict` use (torch's `AveragedModel`, one per network that trains).

After each step n (from 0) the average moves toward the weights by 1 - d_n, with d_n = min(decay, (1 + n) /
(10 + n)): early steps, when the weights are far from where they end, weigh less than a plain EMA would give
them (the warm-up of TensorFlow's ExponentialMovingAverage and timm's ModelEmaV2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lab.errors import LabError


def check(decay: Any) -> None:
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, float) or not 0 < decay < 1):
        raise LabError(f"trainer.ema={decay!r} must be a decay between 0 and 1 (e.g. 0.999) or null")


def _tensors(net: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in (*net.parameters(), *net.buffers())]


class Ema:
    """The averaged copies of `task`'s networks that have parameters to train."""

    def __init__(self, task: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.nets = {name: net for name, net in task.named_children()
                     if any(p.requires_grad for p in net.parameters())}
        if not self.nets:
            raise LabError("trainer.ema: this task has no network with trained parameters to average; "
                           "set trainer.ema=null")
        self.averaged = {name: AveragedModel(net, multi_avg_fn=self._move, use_buffers=True)
                         for name, net in self.nets.items()}

    def _move(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n: torch.Tensor) -> None:
        """One dtype's tensors (AveragedModel groups them): floats move toward the weights, counters copy."""
        if averaged[0].is_floating_point():
            n = self.updates
            torch._foreach_lerp_(averaged, current, 1.0 - min(self.decay, (1 + n) / (10 + n)))
        else:
            torch._foreach_copy_(averaged, current)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: every averaged network takes this step's weights in."""
        for name, net in self.nets.items():
            self.averaged[name].update_parameters(net)
        self.updates += 1

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """The networks hold the averaged weights inside (evaluation, best.pt); their own weights after."""
        live = [t for net in self.nets.values() for t in _tensors(net)]
        mean = [t for name in self.nets for t in _tensors(self.averaged[name].module)]
        kept = [t.clone() for t in live]
        torch._foreach_copy_(live, mean)
        try:
            yield
        finally:
            torch._foreach_copy_(live, kept)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "nets": {name: m.module.state_dict() for name, m in self.averaged.items()}}

    def load_state_dict(self, state: dict[str, Any] | None, path: Any) -> None:
        """A resumed run's average; a checkpoint written without `trainer.ema` is refused."""
        if not state:
            raise LabError(f"checkpoint {path} was written without trainer.ema; resume with trainer.ema=null, "
                           "or start a new run directory")
        from lab.checkpoint import load_state

        for name, m in self.averaged.items():
            load_state(m.module, state["nets"].get(name, {}), f"averaged {name!r} (trainer.ema)", path)
            m.n_averaged.fill_(int(state["updates"]))
        self.updates = int(state["updates"])


def averaged_task_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's task state with its averaged networks' weights in place of the trained ones, where the run
    averaged them (`trainer.ema`): what its evaluations measured."""
    task = dict(state["task"])
    for name, net in ((state.get("ema") or {}).get("nets") or {}).items():
        task.update({f"{name}.{k}": v for k, v in net.items()})
    return task
