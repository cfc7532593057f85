"""Atomic file writes (a reader sees the old file or the new one, never half of one), and reading a run's metrics."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lab.errors import LabError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


class _Recording:
    """A file whose write errors are kept: torch.save reports a failed write (a full disk) as its own
    RuntimeError, without the OSError that says why."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> Any:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb",
                 hint: str = "what was there before is unchanged") -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it over `path`. The file gets
    the usual permissions (0666 less the umask), not mkstemp's private 0600. A write the file system refuses
    (a full disk, a file-size limit) raises one `LabError` naming the file, the reason and `hint`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    f = None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else getattr(f, "error", None)
        if isinstance(cause, OSError) and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise LabError(f"could not write {path} ({cause.strerror or cause}); {hint}") from None
        raise


def write_json(path: str | os.PathLike, obj: Any, **kw: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"), "w", **kw)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text), "w")


def torch_save(path: str | os.PathLike, obj: Any, **kw: Any) -> None:
    """`torch.save`, atomically: an interrupted save never replaces a good file."""
    write_atomic(path, lambda f: torch.save(obj, f), "wb", **kw)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` (a run directory or the file itself), skipping a torn last line of a killed
    run; none for a run that has not logged yet."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file's object (a run's summary.json), or {} when it is missing or unreadable (a run still going,
    or killed before writing it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
