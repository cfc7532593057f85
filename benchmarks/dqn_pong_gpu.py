"""`dqn_pong` on a GPU: wall-clock minutes and env steps to a mean evaluation return of +18 and +20.

    python benchmarks/dqn_pong_gpu.py [--minutes 30] [--out DIR] [lab overrides ...]

Runs `python -m lab +experiment=dqn_pong trainer.stop_at=20` and reads its metrics.jsonl: the
learning curve (evaluation return over 10 games against minutes of training and against env steps)
is saved as benchmarks/results/dqn_pong_gpu.json and .png, with the hardware. Minutes count the
whole training loop, evaluations included (`perf/elapsed_s`). Then the best checkpoint plays 10 new
games through `mode=eval` (which also records their video). Refuses to run without CUDA: GPU
figures are recorded only from a real GPU run. `--out DIR` also copies the record, the plot, the
metrics, the log and the video there. On a lent machine, `bash benchmarks/dqn_pong_gpu.sh MINUTES OUT`
runs it after a smoke test of `agent.cuda_graph=true`, with graphs when that passed. The record and the
metrics are written (and copied to `--out`) as soon as training ends, before the replay; while training
runs, `--out` holds its log and a copy of its metrics as of its latest `[lab]` line, so a command stopped
from outside keeps the curve so far.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from lab.io import read_metrics  # noqa: E402


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["return"] >= target), None)


def run_logged(cmd: list[str], log: Path, timeout: float,
               on_line: Callable[[str], None] | None = None) -> tuple[int | None, float]:
    """Run cmd in the repository, its output both printed and appended to `log` (and passed to `on_line`);
    (exit code or None when stopped at `timeout` seconds, wall seconds)."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                print(line, end="", flush=True)
                f.write(line)
                f.flush()
                if on_line:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # out of time: SIGINT lets the lab save and close, then stop it hard
            print(f"stopped after {timeout / 60:.1f} minutes", flush=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join(timeout=5)
            return None, time.perf_counter() - t0
        reader.join(timeout=5)
    return proc.returncode, time.perf_counter() - t0


def rows_of(run: Path) -> list[dict[str, Any]]:
    return read_metrics(run)


def gpu() -> dict[str, Any]:
    import torch

    p = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "multiprocessors": p.multi_processor_count}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def save(out: dict[str, Any], run: Path, dest: Path | None) -> Path:
    """Write the record; with `dest` (where the log is written already), copy it and the run's metrics there."""
    path = record.write("dqn_pong_gpu", out)
    if dest:
        for src, name in ((path, path.name), (run / "metrics.jsonl", "dqn_pong_metrics.jsonl")):
            if src.exists():
                shutil.copy(src, dest / name)
    return path


def plot(out: dict[str, Any], path: Path, dest: Path | None) -> None:
    """The learning curves (return against minutes and against env steps) as PNG beside the record."""
    from lab.plots import plt

    train, curve = out["train_curve"], out["eval_curve"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], "minutes", "minutes of training"), (axes[1], "env_steps", "env steps")):
        pts = [p for p in train if p["return"] is not None]
        ax.plot([p[x] for p in pts], [p["return"] for p in pts], alpha=0.4, label="training games")
        ax.plot([p[x] for p in curve], [p["return"] for p in curve], "o-", label="evaluation (10 games)")
        for level in (18, 20):
            ax.axhline(level, color="grey", lw=0.5, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("return")
    axes[0].legend()
    fig.suptitle(f"dqn_pong on {out['gpu']['name']}")
    fig.savefig(path.with_suffix(".png"), dpi=100, bbox_inches="tight")
    if dest:
        shutil.copy(path.with_suffix(".png"), dest / path.with_suffix(".png").name)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30, help="stop the training run after this long")
    ap.add_argument("--out", type=Path, help="also copy the record, plot, metrics, log and video here")
    ap.add_argument("--replay-seconds", type=float, default=60, help="time limit of the best checkpoint's replay")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark records GPU figures only from a real GPU run")
    run = Path(tempfile.mkdtemp(prefix="dqn-pong-"))
    log = run.parent / f"{run.name}.log"
    if a.out:  # the log (evaluation lines included) and the metrics reach --out while training runs: a command
        a.out.mkdir(parents=True, exist_ok=True)  # stopped from outside keeps the curve so far
        log = a.out / "dqn_pong.log"

    def keep_metrics(line: str) -> None:
        if line.startswith("[lab]") and (run / "metrics.jsonl").exists():
            shutil.copy(run / "metrics.jsonl", a.out / "dqn_pong_metrics.jsonl")

    train_args = ["+experiment=dqn_pong", "trainer.stop_at=20", "trainer.progress=false", *a.overrides]
    code, wall = run_logged([sys.executable, "-m", "lab", *train_args, f"hydra.run.dir={run}"], log, a.minutes * 60,
                            keep_metrics if a.out else None)
    rows = rows_of(run)
    curve = [{"minutes": round(r["perf/elapsed_s"] / 60, 3), "env_steps": r["env_steps"],
              "return": r["eval/episode_return"], "return_std": r["eval/episode_return_std"],
              "eval_seconds": round(r["perf/eval_seconds"], 2)}
             for r in rows if "eval/episode_return" in r]
    train = [{"minutes": round(r["perf/elapsed_s"] / 60, 3), "env_steps": r["env_steps"],
              "return": r.get("train/episode_return"), "env_steps_per_sec": r.get("perf/samples_per_sec")}
             for r in rows if "perf/samples_per_sec" in r]
    out: dict[str, Any] = {
        "lab_command": "python -m lab " + " ".join(train_args), "lab_exit_code": code,
        "process_wall_s": round(wall, 1), "gpu": gpu(), "eval_curve": curve, "train_curve": train,
        "to_18": first_reaching(curve, 18), "to_20": first_reaching(curve, 20),
        "target": "+18 within 10 minutes on one H100"}
    plot(out, save(out, run, a.out), a.out)  # kept even if the replay below runs out of time
    best = run / "checkpoints" / "best.pt"
    if best.exists():  # the best agent plays 10 new games (and is filmed): a second, independent estimate
        replay = run.parent / f"{run.name}-eval"
        eval_args = ["+experiment=dqn_pong", "mode=eval", f"checkpoint={best}",
                     *[o for o in a.overrides if not o.startswith(("trainer.stop_at", "agent.eval_episodes"))],
                     "agent.eval_episodes=10"]
        code, wall = run_logged([sys.executable, "-m", "lab", *eval_args, f"hydra.run.dir={replay}"], log,
                                a.replay_seconds)
        ev = next((r for r in rows_of(replay) if "eval/episode_return" in r), None)
        out["best_checkpoint_replay"] = {
            "command": "python -m lab " + " ".join(eval_args), "exit_code": code, "process_wall_s": round(wall, 1),
            **({"return": ev["eval/episode_return"], "return_std": ev["eval/episode_return_std"],
                "return_min": ev["eval/episode_return_min"]} if ev else {})}
        videos = sorted((replay / "media").glob("*.mp4"))
        if a.out and videos:
            shutil.copy(videos[-1], a.out / "dqn_pong_best_agent.mp4")
        save(out, run, a.out)

    print(json.dumps({k: out[k] for k in ("to_18", "to_20")}), flush=True)


if __name__ == "__main__":
    main()
