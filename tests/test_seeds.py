"""Several seeds as one trial (lab/seeds.py): the aggregate objective, rliable's interval, and the report's
aggregate over runs that differ only in their seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import lab_env, run_lab_cases
from lab import seeds
from lab.errors import LabError


def test_aggregates_on_known_returns() -> None:
    from rliable import metrics

    returns = [500.0, 500.0, 480.0, 100.0, 20.0, 500.0, 490.0, 475.0]
    assert seeds.iqm(returns) == pytest.approx(metrics.aggregate_iqm(np.array(returns).reshape(-1, 1)))
    assert seeds.iqm(returns) == pytest.approx(np.mean(sorted(returns)[2:6]))  # the middle half
    assert seeds.aggregate(returns, "worst") == 20.0 and seeds.aggregate([3.0, 9.0], "worst", mode="min") == 9.0
    assert seeds.aggregate(returns, "mean") == pytest.approx(np.mean(returns))
    point, lo, hi = seeds.interval(returns, reps=500)
    assert point == pytest.approx(seeds.iqm(returns)) and lo <= point <= hi and lo >= 20.0 and hi <= 500.0
    assert seeds.interval(returns, reps=500) == (point, lo, hi)  # seeded: the same interval every time
    with pytest.raises(LabError, match="not an aggregate"):
        seeds.aggregate(returns, "median")


def test_bad_seed_lists_are_refused_in_one_line(tmp_path: Path) -> None:
    cases = [["+experiment=xor_mlp", "seeds=[0,0]"], ["+experiment=xor_mlp", "seeds=[0,1]", "seeds_aggregate=max"],
             ["+experiment=xor_mlp", "seeds=[0,1]", "seeds_processes=0"]]
    needles = ["distinct integers", "not an aggregate", "seeds_processes=0"]
    for r, needle in zip(run_lab_cases(tmp_path, [[*c, f"hydra.run.dir={tmp_path / str(i)}"]
                                                  for i, c in enumerate(cases)]), needles):
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_optuna_trial_of_several_seeds_returns_their_aggregate_and_the_report_shows_it(tmp_path: Path) -> None:
    """One trial of the multi-seed search on a tiny budget: two DQN seeds in parallel processes; the study's
    value is the worst of their final evaluation returns, and the report aggregates the two runs (their IQM)."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "lab", "-m", "+experiment=dqn_cartpole", "+hparams_search=dqn_cartpole_seeds_optuna",
            "logger=none", "trainer.progress=false", "seeds=[0,1]", "seeds_processes=2", "hydra.sweeper.n_trials=1",
            "agent.total_timesteps=1024", "agent.learning_starts=256", "agent.eval_every=512", "agent.eval_episodes=2",
            "agent.eval_num_envs=1", "agent.video=false", "agent.log_every=256", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(args, cwd=tmp_path, env=lab_env(tmp_path, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    trial = sweep / "0"
    record = json.loads((trial / "seeds.json").read_text())
    finals = [json.loads((trial / f"seed_{s}" / "summary.json").read_text())["eval/episode_return"] for s in (0, 1)]
    assert record["final"] == {"0": finals[0], "1": finals[1]} and record["failed"] == []
    assert record["iqm"] == pytest.approx(np.mean(finals))  # two seeds: nothing to trim
    configs = [yaml.safe_load((trial / f"seed_{s}" / "config.yaml").read_text()) for s in (0, 1)]
    assert [c["seed"] for c in configs] == [0, 1] and all(c["seeds"] is None for c in configs)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert record["aggregate"] == "worst" and record["worst"] == min(finals)
    assert results["best_value"] == pytest.approx(min(finals))  # the trial's objective: the worst seed's

    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "lab", "report", str(trial), "--out", str(out)], cwd=tmp_path,
                       env=lab_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    page = (out / "report.html").read_text()
    point, lo, hi = seeds.interval(finals)
    assert f"Across 2 seeds: IQM of the final eval/episode_return = <b>{point:.4g}</b>" in page
    assert f"(95% CI {lo:.4g} to {hi:.4g})" in page


def test_resume_continues_a_multi_seed_run_seed_by_seed(tmp_path: Path) -> None:
    """resume=true reads a completed seed and restarts one killed before its first checkpoint, its partial
    directory moved aside (not deleted); a seed with a checkpoint would resume from it."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "lab", "+experiment=xor_mlp", "logger=none", "trainer.progress=false",
            "seeds=[0,1]", "seeds_processes=2", f"hydra.run.dir={run}"]
    env = lab_env(tmp_path, OMP_NUM_THREADS="1")
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    before = json.loads((run / "seeds.json").read_text())["final"]
    metrics0 = (run / "seed_0" / "metrics.jsonl").stat().st_mtime_ns
    (run / "seed_1" / "summary.json").unlink()
    for ckpt in (run / "seed_1" / "checkpoints").glob("*.pt"):  # as if killed before its first checkpoint
        ckpt.unlink()
    p = subprocess.run([*args, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed 0: completed before" in p.stdout and "seed 1: completed before" not in p.stdout
    assert (run / "seed_0" / "metrics.jsonl").stat().st_mtime_ns == metrics0  # not run again
    aside = [d for d in run.glob("seed_1.*") if d.is_dir()]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists()  # the partial run, kept
    assert json.loads((run / "seed_1" / "summary.json").read_text())["status"] == "completed"
    after = json.loads((run / "seeds.json").read_text())["final"]
    assert after["0"] == before["0"] and after["1"] == pytest.approx(before["1"])  # seeded: the same result
