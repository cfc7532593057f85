"""Shared helpers: run `python -m lab` in a subprocess on a small slice of the real MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAB_DATA_DIR") or REPO.parent / "shared" / "data")

# A run of a few steps: 1,000 training images in batches of 50, 500 test images.
SMALL = ["logger=none", "trainer.progress=false", "data.subset=1000", "data.test_subset=500",
         "data.batch_size=50", "trainer.log_every=5", "trainer.eval_every=10", "trainer.checkpoint_every=10"]


def lab_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(LAB_DATA_DIR=str(DATA), HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"),
               TORCHINDUCTOR_CACHE_DIR=str(REPO / ".cache" / "inductor"), SB3_LOGDIR=str(tmp_path / "sb3"),
               MPLCONFIGDIR=str(REPO / ".cache" / "matplotlib"),  # one font cache, not one built per run
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    env.update(extra)
    return env


def run_lab(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 240,
            module: tuple[str, ...] = ("-m", "lab")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *module, *args], cwd=tmp_path, env=env or lab_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


# Runs `lab.cli.main(argv)` for each argv of a JSON list in one process; prints one JSON result line.
_CASES = """
import contextlib, io, json, sys, traceback
from lab import cli
results = []
for argv in json.loads(sys.argv[1]):
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stderr": err.getvalue()})
print("LAB_CASES " + json.dumps(results))
"""


def run_lab_cases(tmp_path: Path, cases: list[list[str]], timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Several `python -m lab ARGS...` that stop before training, run one after another in one process
    (each process start imports torch and Hydra: seconds); each case's exit code and stderr."""
    p = subprocess.run([sys.executable, "-c", _CASES, json.dumps(cases)], cwd=tmp_path, env=lab_env(tmp_path),
                       capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LAB_CASES ")), None)
    assert line is not None, p.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, r["returncode"], "", r["stderr"])
            for argv, r in zip(cases, json.loads(line.removeprefix("LAB_CASES ")))]


def read_metrics(run_dir: Path) -> list[dict]:
    from lab.io import read_metrics as rows

    assert (run_dir / "metrics.jsonl").is_file(), f"no metrics.jsonl in {run_dir}"
    return rows(run_dir)


def short_run(tmp_path: Path, args: list[str], key: str) -> tuple[Path, dict[str, str], list[float], list[dict]]:
    """`python -m lab ARGS` on one thread into tmp_path/run (it must succeed): the run dir, its env, its
    train/loss values and its rows that hold `key`."""
    run = tmp_path / "run"
    env = lab_env(tmp_path, OMP_NUM_THREADS="1")
    p = run_lab(tmp_path, *args, f"hydra.run.dir={run}", env=env, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(run)
    return run, env, [r["train/loss"] for r in rows if "train/loss" in r], [r for r in rows if key in r]


def without_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="session", autouse=True)
def _need_data():
    if not (DATA / "mnist").is_dir() and not (DATA / "MNIST").is_dir():
        pytest.exit(f"MNIST not found under {DATA}: set LAB_DATA_DIR (see README)", returncode=2)


def compose(experiment: str, *overrides: str):
    """The config `python -m lab +experiment=NAME OVERRIDES...` composes (Hydra's compose API, no run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lab import config  # noqa: F401 - registers ${ceil_div:...}

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[f"+experiment={experiment}", *overrides])


def build_task(tmp_path: Path, experiment: str, *overrides: str, device: str = "cpu"):
    """The experiment's Task built in-process on `device`, with a RunContext resolved from its trainer block
    as `lab.cli.run` resolves it (no logger backend, no run directory of Hydra's)."""
    import hydra.utils
    import torch
    from omegaconf import OmegaConf

    from lab.distributed import DistInfo
    from lab.logger import RunLogger
    from lab.trainer import run_context

    cfg = compose(experiment, "logger=none", *overrides)
    task_cls = hydra.utils.get_class(cfg.task)
    logger = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    ctx = run_context(cfg.trainer, task_cls, torch.device(device), DistInfo(), logger, tmp_path, int(cfg.seed),
                      str(cfg.mode))
    return task_cls(cfg, ctx)
