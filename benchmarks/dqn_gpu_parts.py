"""The parts of a DQN iteration, timed alone on this machine: what bounds `dqn_pong`'s env steps/s.

    python benchmarks/dqn_gpu_parts.py [--seconds 3]

1. Env steps/s of ale-py's `AtariVectorEnv` on Pong (random actions, the lab's preprocessing) for
   16 envs on 16, 8 and 4 threads, and for 32 and 64 envs.
2. One update of the lab's Q-network (dueling Nature CNN, channels-last, fused Adam: target forward,
   online forward for Double DQN, online forward with grad, Huber loss, backward, step) at batch 512,
   256 and 32, in fp32 and bf16 autocast: milliseconds per update with the device synchronised after
   the loop (`update_ms_*`) and the host's time to issue them (`update_launch_ms_*`). Equal figures
   mean the update is bound by the host issuing kernels, not by the GPU.

Runs on a CPU too (updates at batch 512 only, bf16 only where it is native) and then writes
benchmarks/results/dqn_cpu_parts.json (_avx2 without native bf16); on a GPU, dqn_gpu_parts.json.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from agents.dqn import QNetwork  # noqa: E402
from lab.devices import native_bf16  # noqa: E402


def env_rate(num_envs: int, threads: int, seconds: float) -> int:
    from omegaconf import OmegaConf

    from agents.envs import atari_vector_env

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "env" / "atari.yaml"), {"num_threads": threads})
    env = atari_vector_env(cfg, "pong", num_envs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        env.step(rng.integers(0, 6, num_envs))
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        env.step(rng.integers(0, 6, num_envs))
        k += 1
    rate = round(k * num_envs / (time.perf_counter() - t))
    env.close()
    return rate


def update_ms(device: str, precision: str, batch: int, seconds: float) -> tuple[float, float]:
    torch.manual_seed(0)
    q = QNetwork((4, 84, 84), 6, [512], True).to(device).to(memory_format=torch.channels_last)
    q_target = copy.deepcopy(q).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=1e-4, fused=True)
    obs, next_obs = (torch.randint(0, 255, (batch, 4, 84, 84), dtype=torch.uint8, device=device) for _ in range(2))
    actions = torch.randint(0, 6, (batch,), device=device)
    bf16 = precision == "bf16"

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                next_q = q_target(next_obs).float()
                target = 0.99 * next_q.gather(1, q(next_obs).argmax(1, keepdim=True)).squeeze(1)
            q_taken = q(obs).float().gather(1, actions[:, None]).squeeze(1)
            loss = F.smooth_l1_loss(q_taken, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(10):
        step()
    sync()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        step()
        n += 1
    launch = (time.perf_counter() - t) / n
    sync()
    return round((time.perf_counter() - t) / n * 1e3, 3), round(launch * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per env setting (updates: half)")
    a = ap.parse_args()
    figures: dict[str, object] = {}
    try:
        figures["lscpu"] = subprocess.run("lscpu | grep -E 'Model name|^CPU\\(s\\)|Thread|Core|Socket|MHz'",
                                          shell=True, capture_output=True, text=True).stdout
    except OSError:
        pass
    for n, threads in ((16, 16), (16, 8), (16, 4), (32, 16), (64, 16)):
        figures[f"env_steps_per_s_n{n}_threads{threads}"] = env_rate(n, threads, a.seconds)
        print(figures, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for precision in ("32", "bf16") if device == "cuda" or native_bf16(torch.device("cpu")) else ("32",):
        for batch in (512, 256, 32) if device == "cuda" else (512,):
            total, launch = update_ms(device, precision, batch, a.seconds / 2)
            figures[f"update_ms_{precision}_b{batch}"] = total
            figures[f"update_launch_ms_{precision}_b{batch}"] = launch
            print(figures, flush=True)
    record.write("dqn_gpu_parts" if device == "cuda" else f"dqn_cpu_parts{record.cpu_kind_suffix()}", figures)


if __name__ == "__main__":
    main()
