"""A run directory belongs to one run: one process at a time, and a finished run is never silently overwritten.

    claim(dir, resume, overwrite)   # before anything is written there
      - an exclusive OS lock (flock) on dir/.lock, held until the process ends: the kernel releases it when
        the process dies, so a crash (kill -9 included) never leaves a stale lock; a second process is refused
        with the holder's PID and host
      - a directory that already holds a run (summary.json, metrics.jsonl, seeds.json or a checkpoint) is refused unless
        resume=true continues it or overwrite=true first moves it aside to dir.<timestamp> (never deleted)
      - temporary files of a save that a killed process left behind are removed
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from lab.errors import LabError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # directory -> the descriptor holding its lock, for this process's whole life


def holds_run(path: Path) -> bool:
    """Whether `path` holds a run's results: its summary, its metrics, a checkpoint, or a multi-seed run's seeds."""
    return any((path / f).exists() for f in ("summary.json", "metrics.jsonl", "seeds.json")) or \
        any((path / "checkpoints").glob("*.pt"))


def _lock(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that wrote no name"
        os.close(fd)
        raise LabError(f"{path} is in use by another run ({holder}); wait for it to end, or give this run its own "
                       "directory (hydra.run.dir=...)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    return fd


def _aside(path: Path) -> Path:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    target, n = path.with_name(f"{path.name}.{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{stamp}.{n}")
    return target


def claim(path: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path | None:
    """Take `path` for this process (see the module docstring); returns where an old run was moved, if one was."""
    path = Path(path).resolve()
    if path in _held:
        return None
    fd = _lock(path)
    moved = None
    if holds_run(path) and not resume:
        if not overwrite:
            os.close(fd)
            raise LabError(f"{path} already holds a run; continue it with resume=true, start a new one elsewhere "
                           f"(hydra.run.dir=...), or pass overwrite=true to move the old run aside to "
                           f"{path.name}.<timestamp> first")
        moved = _aside(path)
        os.rename(path, moved)  # the old run keeps its files, its lock file included
        os.close(fd)
        fd = _lock(path)
        print(f"[lab] overwrite=true: the run that was in {path} is now in {moved}", flush=True)
    for stale in [*path.glob(".*.tmp"), *path.glob("checkpoints/.*.tmp")]:  # a killed save's leftovers
        stale.unlink(missing_ok=True)
    _held[path] = fd
    return moved


def release(path: str | os.PathLike) -> None:
    """Give up this process's claim on `path` (tests; a process's claims end with it anyway)."""
    fd = _held.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)
