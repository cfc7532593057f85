"""Checkpoint files: atomic writes, safe loading, RNG state round trip."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import checkpoint, io
from lab.errors import LabError


def test_interrupted_save_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"step": 1})

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt  # as if the process were stopped in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        io.torch_save(path, {"step": 2, "x": Boom()})
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_refuses_code_and_garbage(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Evil()}, path)
    with pytest.raises(LabError, match="corrupt or not a lab checkpoint"):
        checkpoint.load(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(LabError, match="corrupt"):
        checkpoint.load(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(LabError, match="format"):
        checkpoint.load(path)
    with pytest.raises(LabError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(LabError, match="is a directory"):
        checkpoint.load(tmp_path)
    for garbage in (b"hello\n", b"12345678", b"experiment: x\n"):  # text files: KeyError, IndexError inside torch
        path.write_bytes(garbage)
        with pytest.raises(LabError, match="corrupt or not a lab checkpoint"):
            checkpoint.load(path)
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: torch's advice comes coloured
    with pytest.raises(LabError, match="corrupt") as refused:
        checkpoint.load(path)
    assert "\x1b" not in str(refused.value)


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_writes_get_the_usual_file_permissions(tmp_path: Path) -> None:
    import stat

    from lab import io as lab_io

    lab_io.write_json(tmp_path / "summary.json", {"a": 1})
    lab_io.write_atomic(tmp_path / "x.bin", lambda f: f.write(b"\0"))
    for name in ("summary.json", "x.bin"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~lab_io._UMASK, oct(mode)  # not mkstemp's owner-only 0600
    assert not list(tmp_path.glob(".*.tmp"))
