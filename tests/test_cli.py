"""End to end through `python -m lab`: files a run writes, resume, signals, errors, determinism."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DATA, SMALL, lab_env, read_metrics, run_lab, run_lab_cases, without_perf


def test_mnist_run_writes_everything_with_offline_wandb(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [a for a in SMALL if a != "logger=none"]
    p = run_lab(tmp_path, "+experiment=mnist_cnn", "trainer.max_steps=20", f"hydra.run.dir={run_dir}", *args)
    assert p.returncode == 0, p.stderr
    assert "logging offline" in p.stderr  # the one-line notice: no key, no WANDB_MODE
    assert "[lab] step 10: eval/loss=" in p.stdout and "[lab] step 20: eval/loss=" in p.stdout  # one line per eval
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20]
    assert all("step" in r for r in rows)
    assert {"train/loss", "train/accuracy", "train/lr", "perf/samples_per_sec"} <= set(rows[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 20 and summary["status"] == "completed"
    assert summary["main_metric"] == "eval/accuracy" and 0.0 <= summary["eval/accuracy"] <= 1.0
    assert summary["best/eval/accuracy"] >= summary["eval/accuracy"]
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert "model.features.0.weight" in state["task"]
    assert state["logger_run_id"] == offline[0].name.split("-")[-1]
    # Read the offline W&B run back: the config is the resolved Hydra config, metrics are namespaced.
    wandb_cli = Path(sys.executable).parent / "wandb"
    dump = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(offline[0])], capture_output=True,
                          text=True, timeout=120).stdout
    records = [json.loads(line) for line in dump.splitlines() if line.startswith("{")]
    history = [r for r in records if r.get("type") == "history"]
    assert any("train/loss" in json.dumps(r) for r in history) and any("eval/accuracy" in json.dumps(r)
                                                                      for r in history)
    assert any('"max_steps"' in json.dumps(r) for r in records if r.get("type") in ("run", "config"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert f"root: {DATA}" in (run_dir / "config.yaml").read_text()  # the resolved config
    assert list((run_dir / "media").glob("eval_misclassified_*.png"))
    assert (run_dir / "media" / "curves_00000020.png").is_file()


def test_resume_continues_from_step_20_to_40_like_an_uninterrupted_run(tmp_path: Path) -> None:
    base = [*SMALL, "+experiment=mnist_cnn", "trainer.deterministic=true", "trainer.max_epochs=3"]
    run_dir = tmp_path / "run"
    first = run_lab(tmp_path, *base, "trainer.max_steps=20", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    second = run_lab(tmp_path, *base, "trainer.max_steps=40", "resume=true", f"hydra.run.dir={run_dir}")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 40
    straight = tmp_path / "straight"
    p = run_lab(tmp_path, *base, "trainer.max_steps=40", f"hydra.run.dir={straight}")
    assert p.returncode == 0, p.stderr
    # Same data order, same RNG, same optimizer state: the resumed run is the uninterrupted one.
    assert without_perf(rows) == without_perf(read_metrics(straight))


def test_sigterm_saves_a_loadable_checkpoint_and_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "+experiment=mnist_cnn", "trainer.max_steps=100000", "trainer.max_epochs=1000",
            "trainer.checkpoint_every=100000", "trainer.eval_every=100000", "trainer.eval_each_epoch=false",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "lab", *args], cwd=tmp_path, env=lab_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == state["step"] > 0
    assert "resume=true" in err
    resumed = run_lab(tmp_path, *args[:-1], f"trainer.max_steps={state['step'] + 5}", "resume=true",
                      f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == state["step"] + 5


def test_two_deterministic_cpu_runs_match(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        p = run_lab(tmp_path, *SMALL, "+experiment=mnist_cnn", "trainer.max_steps=15", "seed=7",
                    "trainer.deterministic=true", f"hydra.run.dir={tmp_path / name}")
        assert p.returncode == 0, p.stderr
        runs.append(without_perf(read_metrics(tmp_path / name)))
    assert runs[0] == runs[1] and len(runs[0]) >= 4


def _fails_cleanly(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    for needle in needles:
        assert needle in p.stderr, p.stderr


def test_no_or_unknown_experiment_lists_the_experiments(tmp_path: Path) -> None:
    none, unknown = run_lab_cases(tmp_path, [[], ["+experiment=nope"]])
    _fails_cleanly(none, "No experiment chosen", "mnist_cnn")
    _fails_cleanly(unknown, "Unknown experiment: 'nope'", "mnist_cnn")


def test_every_experiment_composes_resolves_and_names_an_importable_task() -> None:
    """Each conf/experiment/*.yaml, as `python -m lab +experiment=NAME` composes it: every interpolation
    resolves, the trainer block passes the trainer's checks and `task` names a class that exists (the
    experiments the end-to-end tests do not run, e.g. dqn_breakout and fashion_resnet, included)."""
    import importlib

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lab.cli import CONF_DIR, experiments
    from lab.task import Task
    from lab.trainer import check_config

    assert {"dqn_breakout", "dqn_pong", "fashion_resnet", "mnist_cnn"} <= set(experiments())
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for name in experiments():
            cfg = compose("config", overrides=[f"+experiment={name}"])
            OmegaConf.to_container(cfg, resolve=True)  # raises on an interpolation that does not resolve
            check_config(cfg.trainer)
            module, _, cls = str(cfg.task).rpartition(".")
            assert issubclass(getattr(importlib.import_module(module), cls), Task), name


def test_missing_conf_dir_says_how_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    from lab import cli

    monkeypatch.setattr(cli, "CONF_DIR", tmp_path / "conf")
    with pytest.raises(SystemExit) as stop:
        cli.main(["+experiment=mnist_cnn"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "conf") in err and "pip install -e ." in err, err


def test_bad_config_values_are_refused_before_anything_runs(tmp_path: Path) -> None:
    cases = [("trainer.precision=fp8", "trainer.precision"), ("trainer.device=tpu", "trainer.device"),
             ("trainer.max_steps=-3", "trainer.max_steps"), ("data.name=imagenet", "unknown data set"),
             ("optimizer.lr=-1", "cannot build the optimizer"), ("data.batch_size=0", "batch size"),
             ("model._target_=vision.nope.Net", "cannot build the model")]
    run_dirs = [tmp_path / arg.replace("=", "_") for arg, _ in cases]
    results = run_lab_cases(tmp_path, [[*SMALL, "+experiment=mnist_cnn", arg, f"hydra.run.dir={run_dir}"]
                                       for (arg, _), run_dir in zip(cases, run_dirs)])
    for (_, needle), run_dir, p in zip(cases, run_dirs, results):
        _fails_cleanly(p, needle)
        assert not (run_dir / "checkpoints").exists()


def test_corrupt_or_incompatible_checkpoint_is_refused_and_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [*SMALL, "+experiment=mnist_cnn", f"hydra.run.dir={run_dir}"]
    assert run_lab(tmp_path, *base, "trainer.max_steps=10").returncode == 0
    corrupt_dir = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt_dir)
    last = corrupt_dir / "checkpoints" / "last.pt"
    last.write_bytes(b"not a checkpoint")
    misfit, missing, corrupt = run_lab_cases(tmp_path, [
        [*base, "trainer.max_steps=20", "resume=true", "model.hidden=64"],
        [*SMALL, "+experiment=mnist_cnn", "resume=true", f"hydra.run.dir={tmp_path / 'empty'}"],
        [*SMALL, "+experiment=mnist_cnn", "trainer.max_steps=20", "resume=true", f"hydra.run.dir={corrupt_dir}"]])
    _fails_cleanly(misfit, "does not fit", "Resume with the configuration")
    _fails_cleanly(missing, "no checkpoint at")
    _fails_cleanly(corrupt, "corrupt")
    assert last.read_bytes() == b"not a checkpoint"


def test_ddp_two_gloo_processes_train_and_only_rank_0_writes(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "ddp"
    p = run_lab(tmp_path, "--nproc-per-node=2", "--master-port=29517", "-m", "lab", *SMALL,
                "+experiment=mnist_cnn", "trainer.device=cpu", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
                module=("-m", "torch.distributed.run"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [d.name for d in (tmp_path / "outputs").iterdir()] == ["ddp"]
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows if "train/loss" in r]
    # 1,000 images over 2 ranks in batches of 50: 10 steps make the epoch (20 on one process).
    assert steps == [5, 10] and len(rows) == len({json.dumps(r) for r in rows})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 10 and summary["epoch"] == 1 and summary["eval/accuracy"] > 0
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_lab_console_script_is_python_m_lab(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lab"
    assert script.is_file(), "pip install -e . should have made the `lab` console script"
    p = subprocess.run([str(script), "+experiment=nope"], cwd=tmp_path, env=lab_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    _fails_cleanly(p, "Unknown experiment: 'nope'", "mnist_cnn")
