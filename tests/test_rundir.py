"""A run directory never loses data: no silent overwrite, one process at a time, kill -9 anywhere, a full disk,
and reports of runs of several experiments. Faults are injected, not assumed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import lab_env, read_metrics, run_lab, without_perf
from lab import rundir
from lab.errors import LabError

QUIET = ["logger=none", "trainer.progress=false"]
XOR = [*QUIET, "+experiment=xor_mlp", "trainer.max_steps=200", "trainer.checkpoint_every=100"]


def one_thread(tmp_path: Path, **extra: str) -> dict[str, str]:
    return lab_env(tmp_path, OMP_NUM_THREADS="1", **extra)


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_run_is_never_overwritten_without_being_asked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_lab(tmp_path, *XOR, f"hydra.run.dir={run}").returncode == 0
    before = _files(run)
    again = run_lab(tmp_path, *XOR, f"hydra.run.dir={run}")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    (line,) = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert line == (f"error: {run} already holds a run; continue it with resume=true, start a new one elsewhere "
                    "(hydra.run.dir=...), or pass overwrite=true to move the old run aside to run.<timestamp> first")
    after = _files(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}

    moved = run_lab(tmp_path, *XOR, f"hydra.run.dir={run}", "overwrite=true")
    assert moved.returncode == 0, moved.stderr
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert f"is now in {aside}" in moved.stdout
    kept = _files(aside)
    assert {k: v for k, v in kept.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    assert (run / "summary.json").is_file() and len(read_metrics(run)) == len(read_metrics(aside))


def test_one_process_per_run_directory_and_no_stale_lock_after_a_crash(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "lab", *QUIET, "+experiment=xor_mlp", "trainer.max_steps=10000000",
                              "trainer.eval_every=1000000", f"hydra.run.dir={run}"], cwd=tmp_path,
                             env=one_thread(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        t0 = time.monotonic()
        second = run_lab(tmp_path, *XOR, f"hydra.run.dir={run}", "resume=true")
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"is in use by another run (pid {first.pid} on host {os.uname().nodename})" in second.stderr
        assert time.monotonic() - t0 < 30  # refused at once, not after waiting for the lock
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rundir.claim(run, resume=True)  # the kernel released the dead process's lock: nothing stale to clean up
    rundir.release(run)


def _names(folder: Path) -> set[str]:
    """The files in `folder` now (none while it does not exist, or is being moved aside by overwrite=true)."""
    try:
        return {f.name for f in os.scandir(folder)}
    except OSError:
        return set()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("perf/") and k != "elapsed_s"}


def _kill_nine(tmp_path: Path, args: list[str], kills: int, seed: int) -> dict:
    """Run `args` to its end, killing it with SIGKILL `kills` times (seeded: half the kills at a random moment
    of training, half while a checkpoint is being written) and resuming after each; then the same run
    uninterrupted. Returns where the kills landed, the run time, and both runs' directories."""
    rng = random.Random(seed)
    run, straight = tmp_path / "killed", tmp_path / "straight"
    landed: list[str] = []
    t0 = time.perf_counter()
    while len(landed) < kills:
        resume = ["resume=true"] if (run / "checkpoints" / "last.pt").exists() else ["overwrite=true"]
        p = subprocess.Popen([sys.executable, "-m", "lab", *args, f"hydra.run.dir={run}", *resume], cwd=tmp_path,
                             env=one_thread(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        in_save = rng.random() < 0.5
        nth_save, delay = rng.randint(1, 3), rng.uniform(0.0, 0.4)
        metrics = run / "metrics.jsonl"
        start = _mtime(metrics)
        saves: set[str] = set()
        armed_at = None
        while p.poll() is None:
            if in_save:
                saves |= {n for n in _names(run / "checkpoints") if n.endswith(".tmp")}
                if len(saves) >= nth_save:
                    break
            else:
                if armed_at is None and _mtime(metrics) not in (0, start):
                    armed_at = time.perf_counter()  # training has begun (the logger rewrote metrics.jsonl)
                if armed_at is not None and time.perf_counter() - armed_at >= delay:
                    break
                time.sleep(0.002)
        if p.poll() is not None:  # it finished before the kill: the budget was too small for the test
            assert p.returncode == 0, p.stderr.read()[-3000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        left = [n for n in _names(run / "checkpoints") if n.endswith(".tmp")]
        landed.append("inside a save" if left else "elsewhere")
    final = run_lab(tmp_path, *args, f"hydra.run.dir={run}", "resume=true", env=one_thread(tmp_path))
    assert final.returncode == 0, final.stderr[-3000:]
    seconds = time.perf_counter() - t0
    reference = run_lab(tmp_path, *args, f"hydra.run.dir={straight}", env=one_thread(tmp_path))
    assert reference.returncode == 0, reference.stderr[-3000:]
    return {"landed": landed, "seconds": seconds, "run": run, "straight": straight}


def _same_run(killed: Path, straight: Path) -> None:
    rows = without_perf(read_metrics(killed))
    assert rows == without_perf(read_metrics(straight))  # every logged step once, with the same values
    keys = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys))
    a = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["task"]
    b = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["task"]
    weights = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)  # bit-identical
    summaries = [json.loads((d / "summary.json").read_text()) for d in (killed, straight)]
    assert _without_timing(summaries[0]) == _without_timing(summaries[1])
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # the killed saves' leftovers were cleaned up


def _report(name: str, result: dict) -> None:
    inside = result["landed"].count("inside a save")
    print(f"\n[kill -9 {name}] {len(result['landed'])} kills, {inside} inside a checkpoint save, "
          f"{len(result['landed']) - inside} elsewhere; {result['seconds']:.1f} s", file=sys.__stderr__)


def test_kill_nine_anywhere_classifier(tmp_path: Path) -> None:
    args = [*QUIET, "+experiment=mnist_cnn", "data.subset=500", "data.test_subset=200", "data.batch_size=50",
            "trainer.max_epochs=16", "trainer.eval_every=20", "trainer.log_every=5", "trainer.checkpoint_every=5",
            "trainer.deterministic=true", "trainer.precision=32", "trainer.device=cpu", "trainer.num_threads=1"]
    result = _kill_nine(tmp_path, args, kills=4, seed=11)  # aims: in the 3rd save, elsewhere, elsewhere, in a save
    _report("mnist_cnn", result)
    assert len(result["landed"]) == 4 and "inside a save" in result["landed"] and "elsewhere" in result["landed"]
    _same_run(result["run"], result["straight"])


def test_kill_nine_anywhere_dqn_cartpole_with_its_replay(tmp_path: Path) -> None:
    args = [*QUIET, "+experiment=dqn_cartpole", "agent.save_replay=true", "agent.video=false",
            "agent.total_timesteps=4000", "agent.num_envs=2", "agent.train_frequency=8", "agent.gradient_steps=2",
            "agent.batch_size=32", "agent.learning_starts=400", "agent.buffer_size=4000", "agent.eval_every=2000",
            "agent.eval_episodes=2", "agent.eval_num_envs=1", "agent.log_every=400", "agent.target_update_interval=200",
            "trainer.checkpoint_every=25", "trainer.deterministic=true"]
    result = _kill_nine(tmp_path, args, kills=4, seed=3)  # aims: in the 3rd save, elsewhere, in a save, in a save
    _report("dqn_cartpole", result)
    assert len(result["landed"]) == 4 and "inside a save" in result["landed"] and "elsewhere" in result["landed"]
    _same_run(result["run"], result["straight"])


def test_a_full_disk_stops_the_run_in_one_line_and_resume_continues(tmp_path: Path) -> None:
    """RLIMIT_FSIZE in the child stands in for a full disk: files may not grow past 16 KB, and last.pt is 21 KB."""
    import resource

    run = tmp_path / "run"
    assert run_lab(tmp_path, *XOR, f"hydra.run.dir={run}").returncode == 0
    good = (run / "checkpoints" / "last.pt").read_bytes()
    longer = [*XOR[:-2], "trainer.max_steps=400", "trainer.checkpoint_every=100", f"hydra.run.dir={run}", "resume=true"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    full = subprocess.run([sys.executable, "-m", "lab", *longer], cwd=tmp_path, env=one_thread(tmp_path),
                          capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    (line,) = [ln for ln in full.stderr.splitlines() if ln.strip()]
    assert line == (f"error: could not write {run / 'checkpoints' / 'last.pt'} (File too large); the previous "
                    "last.pt is unchanged: free disk space, then resume=true continues from the last checkpoint")
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 200
    again = run_lab(tmp_path, *longer, env=one_thread(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and json.loads((run / "summary.json").read_text())["step"] == 400
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 400


def test_a_summary_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from lab.logger import RunLogger

    logger = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    (tmp_path / "summary.json").mkdir()  # os.replace cannot put a file there: the write fails like a full disk
    with pytest.raises(LabError, match=r"could not write .*summary.json \(Is a directory\); the checkpoints and "
                                       r"metrics.jsonl are written: free disk space, then resume=true"):
        logger.summary({"step": 1})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_of_mixed_runs_is_grouped_by_experiment(tmp_path: Path) -> None:
    xor, agent = tmp_path / "runs" / "xor", tmp_path / "runs" / "acrobot"
    assert run_lab(tmp_path, *XOR, f"hydra.run.dir={xor}").returncode == 0
    r = run_lab(tmp_path, *QUIET, "+experiment=dqn_cartpole", "env.id=Acrobot-v1", "agent.video=false",
                "agent.total_timesteps=1024", "agent.learning_starts=256", "agent.eval_every=512",
                "agent.eval_episodes=1", "agent.eval_num_envs=1", "agent.log_every=256", "agent.gradient_steps=4",
                f"hydra.run.dir={agent}", env=one_thread(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "lab", "report", str(tmp_path / "runs"), "--out", str(out)],
                       cwd=tmp_path, env=lab_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    page = (out / "report.html").read_text()
    assert "2 run(s) of 2 experiment(s)" in page
    xor_part, dqn_part = page.split('<h2 id="xor_mlp">')[1], page.split('<h2 id="dqn_cartpole">')[1].split("<h2")[0]
    assert "charts against step" in xor_part and "charts against env_steps" in dqn_part
    assert "hyperparameters that differ: none" in xor_part and "hyperparameters that differ: none" in dqn_part
    assert page.count('<tr class="best">') == 2  # one best run per experiment
    assert (out / "figures" / "xor_mlp" / "eval_accuracy.png").is_file()
    assert (out / "figures" / "dqn_cartpole" / "eval_episode_return.png").is_file()
