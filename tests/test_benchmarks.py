"""Benchmark scripts refuse settings they cannot time, in one line and before any run starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dqn_throughput_refuses_steps_that_leave_nothing_to_time(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dqn_throughput.py"), "--steps", "1000",
                        "--learning-starts", "1000"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--steps (1000) must exceed --learning-starts (1000) by at least 400" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing written
