"""`dqn_pong` on a GPU: wall-clock minutes and env steps to a mean evaluation return of +18 and +20.

    python benchmarks/dqn_pong_gpu.py [--minutes 30] [lab overrides ...]

Runs `python -m lab +experiment=dqn_pong trainer.stop_at=20` and reads its metrics.jsonl: the
learning curve (evaluation return over 10 games against minutes of training and against env steps)
is saved as benchmarks/results/dqn_pong_gpu.json and .png, with the hardware. Minutes count the
whole training loop, evaluations included (`perf/elapsed_s`). Refuses to run without CUDA:
GPU figures are recorded only from a real GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["return"] >= target), None)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30, help="stop the run after this long")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark records GPU figures only from a real GPU run")
    run = Path(tempfile.mkdtemp(prefix="dqn-pong-"))
    cmd = [sys.executable, "-m", "lab", "+experiment=dqn_pong", "trainer.stop_at=20", "trainer.progress=false",
           f"hydra.run.dir={run}", *a.overrides]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    try:
        subprocess.run(cmd, cwd=REPO, env=env, timeout=a.minutes * 60)
    except subprocess.TimeoutExpired:
        print(f"stopped after {a.minutes} minutes", flush=True)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [{"minutes": round(r["perf/elapsed_s"] / 60, 3), "env_steps": r["env_steps"],
              "return": r["eval/episode_return"], "return_std": r["eval/episode_return_std"]}
             for r in rows if "eval/episode_return" in r]
    train = [{"minutes": round(r["perf/elapsed_s"] / 60, 3), "env_steps": r["env_steps"],
              "return": r["train/episode_return"], "env_steps_per_sec": r.get("perf/samples_per_sec")}
             for r in rows if "train/episode_return" in r]
    out = {"run_dir": str(run), "lab_command": " ".join(cmd[1:]), "eval_curve": curve, "train_curve": train,
           "to_18": first_reaching(curve, 18), "to_20": first_reaching(curve, 20),
           "target": "+18 within 10 minutes on one H100"}
    path = record.write("dqn_pong_gpu", out)

    from lab.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], "minutes", "minutes of training"), (axes[1], "env_steps", "env steps")):
        ax.plot([p[x] for p in train], [p["return"] for p in train], alpha=0.4, label="training games")
        ax.plot([p[x] for p in curve], [p["return"] for p in curve], "o-", label="evaluation (10 games)")
        for level in (18, 20):
            ax.axhline(level, color="grey", lw=0.5, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("return")
    axes[0].legend()
    fig.suptitle(f"dqn_pong on {torch.cuda.get_device_name(0)}")
    fig.savefig(path.with_suffix(".png"), dpi=100, bbox_inches="tight")
    print(json.dumps({k: out[k] for k in ("to_18", "to_20")}), flush=True)


if __name__ == "__main__":
    main()
