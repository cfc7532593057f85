"""Shared by the benchmarks: run the lab, describe the machine and write a result record atomically."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parents[1]))  # the repository, for lab.io and lab.trainer

from lab.devices import native_bf16  # noqa: E402
from lab.io import read_metrics  # noqa: E402


def run_lab(args: list[str], run_dir: Path, **kwargs: Any) -> tuple[list[dict[str, Any]], float]:
    """`python -m lab *args hydra.run.dir=run_dir` in a subprocess (a failure raises): the rows of its
    metrics.jsonl and the wall seconds of the whole process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lab", *args, f"hydra.run.dir={run_dir}"], cwd=RESULTS.parents[1],
                   check=True, **kwargs)
    wall = time.perf_counter() - t0
    return read_metrics(run_dir), wall


def composed(args: list[str]) -> Any:
    """The experiment's resolved config, as `python -m lab ARGS --cfg job --resolve` composes it."""
    from omegaconf import OmegaConf

    out = subprocess.run([sys.executable, "-m", "lab", *args, "--cfg", "job", "--resolve"], cwd=RESULTS.parents[1],
                         capture_output=True, text=True, check=True).stdout
    return OmegaConf.create(out)


def planned_steps(cfg: Any) -> int:
    """The optimizer steps a composed scene-set run trains: trainer.max_steps, else epochs of n_train // batch_size
    (what a plain loop beside it must match)."""
    return int(cfg.trainer.max_steps or 0) or int(cfg.trainer.max_epochs) * (int(cfg.data.n_train)
                                                                           // int(cfg.data.batch_size))


def evaluations(rows: list[dict[str, Any]], marker: str, keep: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows holding `marker` as {step, elapsed_s, <metric>: value} with the metrics whose names start with
    one of `keep` (their "eval/" dropped, values to 4 places)."""
    return [{"step": r["step"], "elapsed_s": round(r["perf/elapsed_s"], 1),
             **{k.split("/", 1)[1]: round(r[k], 4) for k in r if k.startswith(keep)}} for r in rows if marker in r]


def median_samples_per_s(rows: list[dict[str, Any]]) -> float:
    """The median training samples/s over the logged rows, the first (warm-up) left out."""
    import statistics

    rates = [r["perf/samples_per_sec"] for r in rows if "perf/samples_per_sec" in r][1:]
    return round(statistics.median(rates), 2)


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # The CPU's vector unit decides which precision is fast: "AVX2" CPUs emulate bf16 (about 10x slower).
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": native_bf16(torch.device("cpu"))}
    for pkg in ("torchvision", "numpy", "hydra", "wandb"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    # LAB_GIT_COMMIT names the commit of a copied tree (a GPU machine's) whose .git is missing or stale
    info["git_commit"] = os.environ.get("LAB_GIT_COMMIT")
    if not info["git_commit"]:
        try:
            info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True, cwd=RESULTS.parent).stdout.strip()
            info["git_uncommitted"] = uncommitted(RESULTS.parents[1])
        except OSError:
            pass
    return info


def uncommitted(repo: Path) -> list[str]:
    """The tracked files of `repo` that differ from its HEAD, records under benchmarks/results/ aside: what a run
    measured beyond its commit."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True, cwd=repo).stdout.splitlines()
    return sorted(line[3:] for line in status if not line[3:].startswith("benchmarks/results/"))


def cpu_kind_suffix() -> str:
    """"" on a CPU with native bf16 (AVX512), "_avx2" without it: precision-
    dependent benchmarks keep one record per kind of CPU, since their figures differ several-fold."""
    import torch

    return "" if native_bf16(torch.device("cpu")) else "_avx2"


def write(name: str, figures: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with the figures, the machine and the command."""
    from lab import io

    record = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "machine": machine(),
              **figures}
    path = RESULTS / f"{name}.json"
    io.write_json(path, record)
    print(f"wrote {path}")
    return path
