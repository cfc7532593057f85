"""A replay buffer that keeps every frame once and rebuilds frame stacks and n-step returns when sampling.

Parallel envs step together, so storage is a ring of `slots` time steps by `num_envs` columns.
Slot `t` of env `e` holds the newest frame of the observation the env showed at step `t`, and what
happened when acting from it: the action, the (clipped) reward, whether that step terminated or
truncated the episode, whether the observation was the first of an episode, and whether the step
was real (the step after an episode's end is the vector env's autoreset: its action is ignored and
its transition is never sampled). An 84x84 Atari frame is stored once instead of eight times
(4-frame stacks of observation and next observation): 1,000,000 transitions take 7.07 GB.

    obs(t)       = frames t-3 .. t of env e, zero before the episode's first frame (as AtariVectorEnv)
    return(t)    = r_t + g r_{t+1} + ... + g^(m-1) r_{t+m-1},  m = n, or fewer if the episode ends
    next_obs(t)  = obs(t + m);  discount = g^m, or 0 when step t+m-1 terminated (truncation bootstraps)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lab.errors import LabError


class ReplayBuffer:
    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                 stack: int, device: torch.device | str = "cpu"):
        if capacity < num_envs:
            raise LabError(f"agent.buffer_size={capacity} is smaller than agent.num_envs={num_envs}")
        self.slots = math.ceil(capacity / num_envs)
        self.num_envs, self.stack, self.device = num_envs, stack, torch.device(device)
        frame_shape = tuple(obs_shape[1:]) if stack > 1 else tuple(obs_shape)
        shape = (self.slots, num_envs)
        kw = {"device": self.device}
        self.frames = torch.zeros(shape + frame_shape, dtype=obs_dtype, **kw)
        self.actions = torch.zeros(shape, dtype=torch.int32, **kw)
        self.rewards = torch.zeros(shape, dtype=torch.float32, **kw)
        self.terminated = torch.zeros(shape, dtype=torch.bool, **kw)
        self.truncated = torch.zeros(shape, dtype=torch.bool, **kw)
        self.first = torch.zeros(shape, dtype=torch.bool, **kw)
        self.real = torch.zeros(shape, dtype=torch.bool, **kw)
        self.written = 0  # time steps written so far (slot = written % slots)
        self.pack_steps = self.device.type != "cpu"  # add(): one host-to-device copy per step

    # add()'s packing order: 4-byte fields (and float frames) before 1-byte ones
    _PACKED = ("actions", "rewards", "frames", "terminated", "truncated", "first", "real")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __len__(self) -> int:
        """Transitions held (real or not)."""
        return min(self.written, self.slots) * self.num_envs

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("frames", "actions", "rewards", "terminated", "truncated", "first",
                                              "real")}

    def add(self, obs: np.ndarray | torch.Tensor, action: Any, reward: Any, terminated: Any, truncated: Any,
            first: Any, real: Any) -> None:
        """Record one vector step: the observation acted on (its newest frame is kept) and what followed.

        On a GPU the step's fields travel packed as bytes in one host-to-device copy (each copy from
        pageable memory waits for the GPU: one wait per step, not seven) and are unpacked there; a buffer
        in host memory takes each field directly."""
        t = self.written % self.slots
        obs = torch.as_tensor(obs)
        host = {"frames": obs[:, -1] if self.stack > 1 else obs, "actions": action, "rewards": reward,
                "terminated": terminated, "truncated": truncated, "first": first, "real": real}
        dst = {k: getattr(self, k)[t] for k in self._PACKED}
        if self.pack_steps:
            parts = [torch.as_tensor(host[k]).to(dst[k].dtype).reshape(-1).view(torch.uint8) for k in self._PACKED]
            packed = torch.cat(parts).to(self.device, non_blocking=True)
            offset = 0
            for k in self._PACKED:  # 4-byte fields first: every view below starts on a multiple of its item size
                n = dst[k].numel() * dst[k].element_size()
                dst[k].copy_(packed[offset:offset + n].view(dst[k].dtype).view(dst[k].shape))
                offset += n
        else:
            for k in self._PACKED:
                dst[k].copy_(torch.as_tensor(host[k]).reshape(dst[k].shape))
        self.written += 1

    def can_sample(self, n_step: int) -> bool:
        lo, hi = self.sample_range(n_step)
        return hi > lo

    def sample_range(self, n_step: int) -> tuple[int, int]:
        """`sample` draws time steps t in [lo, hi): their stacks are intact and step t+n_step+2 is written
        (two steps of slack: a step that is not real moves to the next one, at most twice)."""
        lo = max(0, self.written - self.slots + self.stack - 1)
        return lo, self.written - n_step - 2

    @staticmethod
    def min_slots(n_step: int, stack: int) -> int:
        """The fewest time steps a full ring must hold for `sample_range` to be non-empty."""
        return n_step + stack + 2

    def sample(self, batch_size: int, n_step: int, gamma: float, generator: torch.Generator | None = None,
               bounds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`batch_size` random n-step transitions. `bounds`: `sample_range` as a tensor on the buffer's
        device, filled in place by the caller (a CUDA graph's kernels keep the arguments they were
        captured with, so Python ints would stay those of the capture)."""
        kw = {"device": self.device, "generator": generator}
        if bounds is None:
            lo, hi = self.sample_range(n_step)
            if hi <= lo:
                raise LabError(f"the replay buffer holds {len(self)} transitions, too few to sample; "
                               "raise agent.learning_starts")
            t = torch.randint(lo, hi, (batch_size,), **kw)
        else:
            span = (bounds[1] - bounds[0]).clamp_min(1)
            t = bounds[0] + torch.minimum((torch.rand(batch_size, **kw) * span).long(), span - 1)
        env = torch.randint(0, self.num_envs, (batch_size,), **kw)
        # A step that is not real (an autoreset step) moves to the next one, the first of an episode; a second
        # move happens only where cut() follows an autoreset step with another step that is not real.
        for _ in range(2):
            t = t + (~self.real[t % self.slots, env]).long()
        return self.transitions(t, env, n_step, gamma)

    def transitions(self, t: torch.Tensor, env: torch.Tensor, n_step: int, gamma: float) -> dict[str, torch.Tensor]:
        """The n-step transitions that start at time steps `t` of envs `env`."""
        steps = t[:, None] + torch.arange(n_step, device=self.device)  # (B, n)
        idx = steps % self.slots
        rewards = self.rewards[idx, env[:, None]]
        term = self.terminated[idx, env[:, None]]
        done = term | self.truncated[idx, env[:, None]]
        alive = torch.ones_like(done)
        alive[:, 1:] = torch.cumprod(~done[:, :-1], dim=1).bool()  # steps before the episode's end
        powers = gamma ** torch.arange(n_step, device=self.device, dtype=torch.float32)
        returns = (rewards * powers * alive).sum(1)
        m = alive.sum(1)
        terminal = (term & alive).any(1)
        discount = torch.where(terminal, 0.0, gamma ** m.float())
        obs, next_obs = self.observation(torch.cat([t, t + m]), torch.cat([env, env])).chunk(2)  # one gather
        return {"obs": obs, "actions": self.actions[t % self.slots, env].long(), "returns": returns,
                "discounts": discount, "next_obs": next_obs}

    def observation(self, t: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        """The observation at time steps `t` of envs `env`: a (B, stack, ...) stack, zero-padded at episode starts."""
        if self.stack == 1:
            return self.frames[t % self.slots, env]
        back = torch.arange(self.stack - 1, -1, -1, device=self.device)  # oldest first, as the env stacks them
        idx = (t[:, None] - back) % self.slots  # (B, S)
        first = self.first[idx, env[:, None]]
        # Keep a frame unless an episode starts after it, at a newer position of the same stack.
        keep = (first.flip(1).cumsum(1).flip(1) - first.long()) == 0
        rows = (idx * self.num_envs + env[:, None]).flatten()  # index_select on rows: far faster than 2-d indexing
        frames = self.frames.view(self.slots * self.num_envs, -1).index_select(0, rows)
        frames = frames.view(*idx.shape, *self.frames.shape[2:])
        return frames * keep.view(*keep.shape, *[1] * (frames.dim() - 2)).to(frames.dtype)

    def cut(self) -> None:
        """End every stored trajectory at the newest step whose next frame is known (after a restore,
        the envs start afresh): the step before it bootstraps from it, and it is never sampled (where the
        step before it was an autoreset step, `sample` moves past both)."""
        if self.written >= 2:
            self.real[(self.written - 1) % self.slots] = False
            self.truncated[(self.written - 2) % self.slots] = True

    def state_dict(self) -> dict[str, Any]:
        return {"written": self.written, **{k: v.cpu() for k, v in self._tensors().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self._tensors().items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise LabError(f"the saved replay buffer's {k} has shape {tuple(state[k].shape)}, this run "
                               f"{tuple(v.shape)}; resume with the same agent.buffer_size and agent.num_envs")
            v.copy_(state[k])
        self.written = int(state["written"])
