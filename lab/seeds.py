"""Several seeds as one run, and aggregates over seeds that do not flatter a lucky one.

    python -m lab +experiment=dqn_cartpole seeds=[0,1,2,3,4]            # five runs, one result: their IQM

With `seeds` set, the run trains the same config once per seed, each in its own process under
`<run dir>/seed_<k>/` (as many at once as `seeds_processes`, default one per core), and its result is an
aggregate of the seeds' *final* main metric (the last evaluation, not the best): `iqm` (the interquartile
mean, rliable's `aggregate_iqm`), `mean`, or `worst` (the minimum of a metric to maximise, the maximum of one
to minimise). That is the objective an Optuna trial returns (conf/hparams_search/dqn_cartpole_seeds_optuna.yaml),
so the search favours recipes that hold on every seed. `seeds.json` in the run directory lists each seed's
result; each seed's directory is an ordinary run (its metrics, summary, checkpoints).

`resume=true` on a multi-seed run continues it seed by seed: a seed whose run completed is read, not run
again; one with a checkpoint resumes from it; one killed before its first checkpoint starts again (its
partial directory moved aside to seed_<k>.<timestamp>, as `overwrite=true` does).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lab import io
from lab.errors import LabError

AGGREGATES = ("iqm", "mean", "worst")
SEED_KEYS = ("seed", "seeds", "seeds_aggregate", "seeds_processes", "resume", "overwrite")


def iqm(values: list[float] | np.ndarray) -> float:
    """The mean of the middle 50% of the values (scipy's 25%-trimmed mean), as rliable's `aggregate_iqm`."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, dtype=np.float64), 0.25))


def aggregate(values: list[float], how: str, mode: str = "max") -> float:
    """`how` (iqm | mean | worst) of the seeds' results; `mode` says which end is worst."""
    if how == "iqm":
        return iqm(values)
    if how == "mean":
        return float(np.mean(values))
    if how == "worst":
        return float(min(values) if mode == "max" else max(values))
    raise LabError(f"seeds_aggregate={how!r} is not an aggregate; use one of {', '.join(AGGREGATES)}")


def interval(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The IQM of `values` and its 95% stratified-bootstrap confidence interval (rliable)."""
    from rliable import library as rly
    from rliable import metrics

    scores = {"run": np.asarray(values, dtype=np.float64).reshape(-1, 1)}  # (runs, tasks)
    np.random.seed(seed)  # rliable's bootstrap draws from NumPy's global generator
    point, ci = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
    return float(point["run"][0]), float(ci["run"][0, 0]), float(ci["run"][1, 0])


def check(cfg: Any) -> list[int]:
    """The seeds of a multi-seed run, checked (one line each)."""
    seeds = list(cfg.seeds)
    integers = all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not seeds or not integers or len(set(seeds)) < len(seeds):
        raise LabError(f"seeds={seeds} must be a list of distinct integers, e.g. seeds=[0,1,2,3]")
    if str(cfg.get("seeds_aggregate", "iqm")) not in AGGREGATES:
        raise LabError(f"seeds_aggregate={cfg.seeds_aggregate!r} is not an aggregate; use one of "
                       f"{', '.join(AGGREGATES)}")
    procs = cfg.get("seeds_processes")
    if procs is not None and (isinstance(procs, bool) or not isinstance(procs, int) or procs < 1):
        raise LabError(f"seeds_processes={procs!r} must be a positive integer or null (one per core)")
    return seeds


def run(cfg: Any, run_dir: Path, overrides: list[str], main_metric: str, main_mode: str) -> float:
    """Train every seed of `cfg.seeds` in its own `python -m lab` process with this run's `overrides`; write
    seeds.json and return the aggregate of their final `main_metric`."""
    seeds = check(cfg)
    how = str(cfg.get("seeds_aggregate", "iqm"))
    cores = os.cpu_count() or 1
    procs = min(len(seeds), int(cfg.get("seeds_processes") or cores))
    keep = [o for o in overrides if o.lstrip("+~").split("=")[0].split("@")[0] not in SEED_KEYS
            and not o.lstrip("+~").startswith("hydra")]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    print(f"[lab] seeds {seeds}: {procs} at a time, each in {run_dir}/seed_<k>", flush=True)

    resume = bool(cfg.get("resume"))

    def one(seed: int) -> float | None:
        seed_dir = run_dir / f"seed_{seed}"
        summary = io.read_json(seed_dir / "summary.json")
        if resume and summary.get("status") == "completed":
            code = 0
            print(f"[lab] seed {seed}: completed before, read from {seed_dir}", flush=True)
        else:
            again = (["resume=true"] if (seed_dir / "checkpoints" / "last.pt").exists()
                     else ["overwrite=true"]) if resume else []
            with open(run_dir / f"seed_{seed}.log", "a" if resume else "w") as log:
                cmd = [sys.executable, "-m", "lab", *keep, f"seed={seed}", "seeds=null", *again,
                       f"hydra.run.dir={seed_dir}"]
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            summary = io.read_json(seed_dir / "summary.json")
        value = summary.get(main_metric)
        ok = code == 0 and isinstance(value, (int, float)) and math.isfinite(value)
        print(f"[lab] seed {seed}: final {main_metric}={value if ok else 'failed'}", flush=True)
        return float(value) if ok else None

    with ThreadPoolExecutor(max_workers=procs) as pool:
        results = dict(zip(seeds, pool.map(one, seeds)))
    failed = [s for s, v in results.items() if v is None]
    values = [results[s] for s in seeds if results[s] is not None]
    out: dict[str, Any] = {"seeds": seeds, "main_metric": main_metric, "main_mode": main_mode, "aggregate": how,
                           "final": {str(s): results[s] for s in seeds}, "failed": failed}
    if values:
        out.update({"iqm": iqm(values), "mean": float(np.mean(values)), "min": float(min(values)),
                    "max": float(max(values)), how: aggregate(values, how, main_mode)})
    io.write_json(run_dir / "seeds.json", out)
    if failed:
        raise LabError(f"seed(s) {failed} failed (their logs: {run_dir}/seed_<k>.log); the others' results are in "
                       f"{run_dir / 'seeds.json'}")
    result = aggregate(values, how, main_mode)
    print(f"[lab] seeds {seeds}: {how} of the final {main_metric} = {result:.4g}", flush=True)
    return result
