"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"), "w")


def write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save`, atomically: an interrupted save never replaces a good file."""
    _atomic(path, lambda f: torch.save(obj, f), "wb")
