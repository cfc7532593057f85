"""Sweeps: Hydra multirun (basic and joblib launchers, submitit's local executor), the resumable Optuna
sweeper, W&B sweep files, sweep grouping, and the offline report rendered in headless Chromium."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, SMALL, lab_env, run_lab

TINY = [*SMALL, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=100", "trainer.num_threads=1"]


def run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("summary.json") if ".submitit" not in p.parts)


def chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_multirun_2x2_with_joblib_gives_4_runs_grouped_as_one_sweep_and_a_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_lab(tmp_path, "-m", "+experiment=mnist_cnn", *TINY, "logger=wandb", "seed=1,2",
                "optimizer.lr=0.002,0.006", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                f"hydra.sweep.dir={sweep}", env=lab_env(tmp_path, WANDB_MODE="disabled", OMP_NUM_THREADS="1"),
                timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = run_dirs(sweep)
    assert len(runs) == 4
    configs = [yaml.safe_load((r / "config.yaml").read_text()) for r in runs]
    assert {(c["seed"], c["optimizer"]["lr"]) for c in configs} == {(1, .002), (1, .006), (2, .002), (2, .006)}
    assert {c["logger"]["group"] for c in configs} == {"mnist_cnn-sweep"}
    assert all("sweep" in c["logger"]["tags"] for c in configs)

    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "lab", "report", str(sweep), "--out", str(out)], cwd=tmp_path,
                       env=lab_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    page = (out / "report.html").read_text()
    assert "4 run(s)" in page and "Best run by eval/accuracy" in page
    assert "optimizer.lr" in page and "seed" in page  # the hyperparameters that differ
    assert page.count('<tr class="best">') == 1
    assert (out / "figures" / "eval_accuracy.png").exists()
    assert "src=\"data:image/png;base64," in page and "http" not in page.split("<body>")[1]  # self-contained

    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium: `make test` installs Debian's chromium package when it can (apt, root)")
    shot = tmp_path / "shot.png"
    c = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1280,1600", (out / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), c.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    non_white = (pixels < 235).any(axis=1).mean()
    colours = len(np.unique(pixels[:: 7], axis=0))
    assert non_white > 0.03, f"the screenshot is almost blank ({non_white:.1%} non-white)"
    assert colours > 50, "the screenshot has no charts (too few colours)"


def test_a_failing_run_does_not_end_the_sweep_and_the_exit_code_says_so(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_lab(tmp_path, "-m", "+experiment=mnist_cnn", *TINY, "trainer.precision=32,fp7",
                f"hydra.sweep.dir={sweep}")
    assert p.returncode == 2
    assert "1 run(s) of the sweep failed" in p.stderr and "fp7" in p.stderr
    assert "Traceback" not in p.stderr
    assert len(run_dirs(sweep)) == 1


def test_optuna_sweep_continues_after_an_interruption(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    fixed = [a for a in TINY if not a.startswith("data.batch_size=")]  # batch size is searched
    args = [sys.executable, "-m", "lab", "-m", "+experiment=mnist_cnn", "+hparams_search=mnist_optuna", *fixed,
            "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"]
    env = lab_env(tmp_path, OMP_NUM_THREADS="1")
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (sweep / "1").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # stop the sweep during its second trial
    first.communicate(timeout=120)

    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and 0 <= results["best_value"] <= 1
    assert set(results["best_params"]) == {"optimizer.lr", "model.dropout", "optimizer.weight_decay",
                                           "data.batch_size"}
    import optuna

    study = optuna.load_study(study_name="mnist_cnn", storage=f"sqlite:///{sweep}/optuna.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3  # the budget, not 3 more
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    job_dirs = [d for d in sweep.iterdir() if d.name.isdigit()]
    assert len(job_dirs) == len(study.trials)  # a rerun numbers its jobs after the old ones: nothing overwritten


def test_submitit_local_launcher_runs_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_lab(tmp_path, "-m", "hydra/launcher=local", "+experiment=mnist_cnn", *TINY, "seed=1,2",
                f"hydra.sweep.dir={sweep}", timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(run_dirs(sweep)) == 2
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit


def test_slurm_launcher_config_composes(tmp_path: Path) -> None:
    p = run_lab(tmp_path, "hydra/launcher=slurm", "+experiment=mnist_cnn", "hydra.launcher.partition=gpu",
                "--cfg", "hydra", "--package", "hydra.launcher")
    assert p.returncode == 0, p.stderr[-2000:]
    launcher = yaml.safe_load(p.stdout)
    launcher = launcher.get("hydra", {}).get("launcher", launcher)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["gpus_per_node"] == 1


W_AND_B_DISTRIBUTIONS = {"constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                         "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                         "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta",
                         "q_beta"}


@pytest.mark.parametrize("sweep_file", sorted((REPO / "conf" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_file_is_valid_and_its_command_runs_the_lab(sweep_file: Path, tmp_path: Path) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"]["goal"] in {"maximize", "minimize"} and "/" in sweep["metric"]["name"]
    assert set(sweep) <= {"program", "name", "description", "method", "metric", "parameters", "command",
                          "early_terminate", "run_cap", "project", "entity"}
    values = {}
    for name, spec in sweep["parameters"].items():
        if "values" in spec:
            assert isinstance(spec["values"], list) and spec["values"]
            values[name] = spec["values"][0]
        elif "value" in spec:
            values[name] = spec["value"]
        else:
            assert spec.get("distribution", "uniform") in W_AND_B_DISTRIBUTIONS and spec["min"] < spec["max"]
            values[name] = spec["min"]
    command = sweep["command"]
    assert command[:4] == ["${env}", "python", "-m", "lab"] and command[-1] == "${args_no_hyphens}"
    # Build the command line as `wandb agent` does, then let Hydra parse and compose it.
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args_no_hyphens"]
    p = run_lab(tmp_path, *command[4:-1], *args, "--cfg", "job")
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = yaml.safe_load(p.stdout)
    for key, v in values.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == v, f"{key}: the sweep sets {v}, the lab composed {node}"
    experiment = next(a.split("=", 1)[1] for a in command if a.startswith("+experiment="))
    import importlib

    task = cfg["task"].rsplit(".", 1)
    assert getattr(importlib.import_module(task[0]), task[1]).main_metric == sweep["metric"]["name"], experiment


@pytest.mark.parametrize("search", sorted((REPO / "conf" / "hparams_search").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_optuna_search_space_names_keys_of_its_experiment(search: Path, tmp_path: Path) -> None:
    experiment = {"mnist_optuna": "mnist_cnn", "dqn_cartpole_seeds_optuna": "dqn_cartpole"}.get(
        search.stem, search.stem.removesuffix("_optuna"))
    p = run_lab(tmp_path, f"+experiment={experiment}", f"+hparams_search={search.stem}", "--cfg", "job")
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = yaml.safe_load(p.stdout)
    sweeper = yaml.safe_load(search.read_text())["hydra"]["sweeper"]
    for key in sweeper["params"]:
        node = cfg
        for part in key.split("."):
            if isinstance(node, list):  # an element of a list, e.g. optimizer.betas.0 (Adam's beta1)
                assert part.isdigit() and int(part) < len(node), f"{search.name}: {key} is not in {experiment}"
                node = node[int(part)]
                continue
            assert part in node, f"{search.name}: {key} is not a key of {experiment}'s config"
            node = node[part]
    task = cfg["task"].rsplit(".", 1)
    import importlib

    cls = getattr(importlib.import_module(task[0]), task[1])
    assert sweeper["direction"] == {"max": "maximize", "min": "minimize"}[cls.main_mode]
