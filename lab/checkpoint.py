"""Checkpoint files: atomic saves, safe loads (`weights_only=True`), clear errors, RNG state."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab import io
from lab.ema import averaged_task_state
from lab.errors import LabError

FORMAT_VERSION = 1


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename)."""
    io.torch_save(path, {"format_version": FORMAT_VERSION, **state},
                  hint=f"the previous {Path(path).name} is unchanged: free disk space, then resume=true continues "
                       "from the last checkpoint")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it; unreadable files raise `LabError`."""
    path = Path(path)
    if path.is_dir():
        raise LabError(f"checkpoint {path} is a directory; pass a checkpoint file (a run's checkpoints/last.pt)")
    if not path.is_file():
        raise LabError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file (a text file's bytes raise KeyError, IndexError, ...)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours its weights_only advice
        first = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        raise LabError(
            f"checkpoint {path} is corrupt or not a lab checkpoint ({first}). "
            "Delete or move it to start afresh, or point `checkpoint=`/`hydra.run.dir=` at a good one."
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise LabError(
            f"checkpoint {path} has format {found!r}, this lab reads format {FORMAT_VERSION}; "
            "it was written by another program or version."
        )
    return state


def load_weights(path: str | Path, option: str = "model.weights") -> dict[str, torch.Tensor]:
    """A torchvision-format state dict (name -> tensor) from a file, read without executing code from it
    (`{"state_dict": ...}` wrappers unwrapped; a lab checkpoint gives its task's network, e.g. a classifier's
    `model`); problems raise one-line `LabError`s naming `option`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LabError(f"{option}={path} does not exist (not a file); pass a torchvision-format state dict (.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file
        raise LabError(f"{path} is not a loadable state dict ({' '.join(str(e).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("task"), dict):  # a lab run's best.pt or last.pt
        state = averaged_task_state(state)  # the evaluated weights (trainer.ema's average, where it ran)
        prefixes = {k.split(".")[0] for k in state}
        if len(prefixes) == 1:  # one network (a classifier's `model.`): its own names
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LabError(f"{path} is not a state dict (name -> tensor); save one with torch.save(m.state_dict())")
    return state


def load_state(target: Any, state: dict[str, Any], what: str, path: str | Path) -> None:
    """`target.load_state_dict(state)`, turning a mismatch into a `LabError` that says what differs."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        detail = " ".join(str(e).split())[:600]
        raise LabError(
            f"checkpoint {path} does not fit this run's {what} ({detail}). "
            "Resume with the configuration it was written with, or start a new run directory."
        ) from None


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
