"""Benchmark scripts refuse settings they cannot time, in one line and before any run starts; their
reports compute what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_dqn_throughput_refuses_steps_that_leave_nothing_to_time(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dqn_throughput.py"), "--steps", "1000",
                        "--learning-starts", "1000"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--steps (1000) must exceed --learning-starts (1000) by at least 400" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_multi_seed_benchmarks_reliability_on_known_returns(tmp_path: Path) -> None:
    """benchmarks/dqn_seeds.py's report: the IQM of the final returns (rliable's), how many seeds reach the
    threshold, and the IQM curve over the evaluations all seeds share, drawn as a PNG."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from dqn_seeds import reliability

    finals = [-80.0, -90.0, -95.0, -120.0, -500.0]
    runs = [{"final_eval_return": f, "evaluations": [{"env_steps": 1000, "eval_return": -500.0},
                                                     {"env_steps": 2000, "eval_return": f}]} for f in finals]
    out = reliability({"lab": runs}, -100.0, "Acrobot-v1", tmp_path / "curve.png")["lab"]
    middle = np.mean([-90.0, -95.0, -120.0])  # 5 seeds: the IQM drops one at each end
    assert out["iqm_final_return"] == pytest.approx(middle, abs=0.01)
    lo, hi = out["iqm_final_return_ci95"]
    assert lo <= out["iqm_final_return"] <= hi
    assert out["seeds_at_threshold"] == 3 and out["share_final_at_threshold"] == 0.6
    assert out["iqm_curve"]["env_steps"] == [1000, 2000] and out["iqm_curve"]["iqm"][0] == -500.0
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_a_studys_export_keeps_every_trial_and_the_best_with_its_seeds(tmp_path: Path) -> None:
    """benchmarks/optuna_study.py on a sweep directory as the lab's Optuna sweeper leaves it."""
    import optuna

    sys.path.insert(0, str(REPO / "benchmarks"))
    from optuna_study import export

    from lab.io import write_json

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    for value in (300.0, 500.0):
        trial = study.ask()
        trial.suggest_float("optimizer.lr", 1e-4, 1e-2)
        trial.set_user_attr("+experiment", "dqn_cartpole")
        study.tell(trial, value)
        seeds = {"final": {"0": value, "1": value + 1}, "iqm": value + 0.5, "min": value, "aggregate": "worst"}
        write_json(tmp_path / str(trial.number) / "seeds.json", seeds)
    out = export(tmp_path)
    assert [t["value"] for t in out["trials"]] == [300.0, 500.0] and out["trials_complete"] == 2
    assert out["best"]["number"] == 1 and out["best"]["seeds_final"] == {"0": 500.0, "1": 501.0}
    assert out["search_command"] == "python -m lab -m +experiment=dqn_cartpole"
    with pytest.raises(SystemExit, match="does not exist"):
        export(tmp_path / "missing")


def test_the_multi_seed_benchmark_reads_finished_runs_from_its_runs_dir(tmp_path: Path, monkeypatch) -> None:
    """--runs-dir: a side whose seeds' runs finished there is read (no subprocess), evaluations and finals."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import dqn_seeds

    from lab.io import write_json

    run = tmp_path / "dqn_acrobot"
    for seed, final in ((0, -90.0), (1, -80.0)):
        d = run / f"seed_{seed}"
        write_json(d / "summary.json", {"status": "completed", "perf/elapsed_s": 10.0})
        rows = [{"env_steps": 100, "eval/episode_return": -500.0}, {"env_steps": 200, "eval/episode_return": final}]
        (d / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows))
        (d / "config.yaml").write_text("agent: {n_step: 5}\noptimizer: {lr: 0.001}\ntrainer: {grad_clip: 10}\n")
    monkeypatch.setattr(dqn_seeds.subprocess, "run", lambda *a, **k: pytest.fail("ran a finished side again"))
    out = dqn_seeds.run_seeds("dqn_acrobot", [0, 1], 2, [], tmp_path)
    assert [r["final_eval_return"] for r in out["runs"]] == [-90.0, -80.0]
    assert out["multi_seed_wall_s"] is None and out["reused_run_dir"] == str(run)
    assert out["settings"]["agent"] == {"n_step": 5} and out["seeds_json"] is None
