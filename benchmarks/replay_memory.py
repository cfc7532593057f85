"""Memory of the lab's replay buffer for 1,000,000 Atari transitions, measured, against the alternatives.

    python benchmarks/replay_memory.py [--transitions 1000000] [--num-envs 8]

1. The lab's `agents.replay.ReplayBuffer` (frames stored once) for 1M transitions of 84x84 uint8
   frames in 4-frame stacks from 8 envs: `buffer.nbytes`, then the process's resident memory
   (VmRSS from /proc/self/status) before creating it, after creating it and after writing every
   slot through `buffer.add(...)` with (num_envs, 4, 84, 84) uint8 observations (random frames,
   episodes of random length with their terminal and autoreset steps), and the peak (VmHWM).
   Then batches of 32 and 256 are sampled and `sample()` is timed.
2. The alternatives for the same transitions: stacked observation and next observation stored per
   transition (computed), and stable-baselines3's `ReplayBuffer(..., optimize_memory_usage=True)`,
   instantiated but never filled; its arrays' `.nbytes` are its allocation.

Target: the lab's buffer at most 7.5 GB (decimal) for 1M transitions. Writes
benchmarks/results/replay_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from agents.replay import ReplayBuffer  # noqa: E402

FRAME = (84, 84)
STACK = 4
TARGET_GB = 7.5
GB = 1e9


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (/proc/self/status; psutil is not a dependency)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out


def episode_flags(slots: int, num_envs: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-slot flags of episodes of random length (500-3000 steps), as the agent writes them: the
    step that ends an episode terminates it (one in five truncates instead), the next step is the
    vector env's autoreset (real=False) and the one after it starts an episode (first=True)."""
    shape = (slots, num_envs)
    terminated, truncated = np.zeros(shape, bool), np.zeros(shape, bool)
    first, real = np.zeros(shape, bool), np.ones(shape, bool)
    for e in range(num_envs):
        t = 0
        first[0, e] = True
        while True:
            end = t + int(rng.integers(500, 3000)) - 1  # the episode's last step
            if end + 2 >= slots:
                break
            (truncated if rng.random() < 0.2 else terminated)[end, e] = True
            real[end + 1, e] = False
            first[end + 2, e] = True
            t = end + 2
    return {"actions": rng.integers(0, 6, shape, dtype=np.int64),
            "rewards": rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), shape, p=[0.01, 0.98, 0.01]),
            "terminated": terminated, "truncated": truncated, "first": first, "real": real}


def time_sample(buffer: ReplayBuffer, configs: list[tuple[int, int, int]], rounds: int,
                generator: torch.Generator) -> dict[str, Any]:
    """Milliseconds per `buffer.sample(batch_size, n_step, ...)`: for each (batch_size, n_step, calls), the mean
    over `calls` calls, measured in `rounds` interleaved rounds (after a warm-up); the median round and all."""
    for b, n, _ in configs:
        buffer.sample(b, n, 0.99, generator)
    per: dict[str, list[float]] = {f"batch_{b}_n_step_{n}": [] for b, n, _ in configs}
    for _ in range(rounds):
        for b, n, calls in configs:
            t0 = time.perf_counter()
            for _ in range(calls):
                buffer.sample(b, n, 0.99, generator)
            per[f"batch_{b}_n_step_{n}"].append(round((time.perf_counter() - t0) / calls * 1e3, 3))
    return {"median_ms": {k: statistics.median(v) for k, v in per.items()}, "rounds_ms": per,
            "torch_threads": torch.get_num_threads()}


def lab_buffer(transitions: int, num_envs: int, seed: int) -> dict[str, Any]:
    """Create, fill, sample and free the lab's buffer; every figure is measured."""
    rng = np.random.default_rng(seed)
    obs_shape = (STACK, *FRAME)
    before = proc_status()
    t0 = time.perf_counter()
    buffer = ReplayBuffer(transitions, num_envs, obs_shape, torch.uint8, STACK, "cpu")
    create_s = time.perf_counter() - t0
    created = proc_status()
    flags = episode_flags(buffer.slots, num_envs, rng)
    pool = rng.integers(0, 256, (16, num_envs, *obs_shape), dtype=np.uint8)  # random "observations", reused
    after_setup = proc_status()  # the flags and the pool are the benchmark's, not the buffer's
    t0 = time.perf_counter()
    for t in range(buffer.slots):
        buffer.add(pool[t % len(pool)], *(flags[k][t] for k in ("actions", "rewards", "terminated", "truncated",
                                                               "first", "real")))
    fill_s = time.perf_counter() - t0
    filled = proc_status()
    setup_bytes = after_setup["VmRSS"] - created["VmRSS"]
    # Prove it works: stacks are (B, 4, 84, 84) uint8 and equal the frames that were written.
    gen = torch.Generator().manual_seed(seed)
    checks = []
    for batch_size in (32, 32, 32, 256):
        b = buffer.sample(batch_size, 1, 0.99, gen)
        assert b["obs"].shape == (batch_size, STACK, *FRAME) and b["obs"].dtype == torch.uint8, b["obs"].shape
        assert b["next_obs"].shape == b["obs"].shape and b["actions"].shape == (batch_size,)
        checks.append({"batch": batch_size, "obs": list(b["obs"].shape), "dtype": str(b["obs"].dtype),
                       "obs_mean": round(b["obs"].float().mean().item(), 2),
                       "discount_zero": int((b["discounts"] == 0).sum())})
    # The newest frame of a sampled stack is the newest frame of the pool entry written in that slot.
    t = torch.tensor([buffer.slots - 10])
    env = torch.tensor([num_envs - 1])
    newest = buffer.observation(t, env)[0, -1].numpy()
    assert np.array_equal(newest, pool[(buffer.slots - 10) % len(pool)][num_envs - 1, -1]), "frame mismatch"
    sample_ms = time_sample(buffer, [(32, 1, 200), (256, 1, 50), (32, 3, 200), (256, 3, 50)], 5, gen)
    nbytes = buffer.nbytes
    arrays = {k: v.numel() * v.element_size() for k, v in buffer._tensors().items()}
    slots, held = buffer.slots, len(buffer)
    del buffer, flags, pool, b
    gc.collect()
    freed = proc_status()
    rss_increase = filled["VmRSS"] - before["VmRSS"] - setup_bytes
    return {
        "transitions": held, "num_envs": num_envs, "slots": slots, "frame": list(FRAME), "stack": STACK,
        "nbytes": nbytes, "nbytes_gb": round(nbytes / GB, 3), "arrays_bytes": arrays,
        "rss_bytes": {"before_creation": before["VmRSS"], "after_creation": created["VmRSS"],
                      "after_filling": filled["VmRSS"], "after_free": freed["VmRSS"],
                      "peak_vmhwm_after_filling": filled["VmHWM"],
                      "benchmark_setup_flags_and_pool": setup_bytes},
        "rss_increase_after_creation_gb": round((created["VmRSS"] - before["VmRSS"]) / GB, 3),
        "rss_increase_after_filling_gb": round(rss_increase / GB, 3),
        "rss_increase_note": "VmRSS after filling minus before creation, minus the benchmark's own flag arrays "
                             "and observation pool (measured between creation and filling)",
        "peak_rss_gb": round(filled["VmHWM"] / GB, 3),
        "create_seconds": round(create_s, 2), "fill_seconds": round(fill_s, 1),
        "adds_per_sec": round(slots / fill_s, 1),
        "sample_checks": checks, "sample_ms": sample_ms,
    }


def sb3_buffer(transitions: int) -> dict[str, Any]:
    """stable-baselines3's ReplayBuffer with optimize_memory_usage=True: its arrays' bytes (never filled)."""
    import stable_baselines3
    from gymnasium.spaces import Box, Discrete
    from stable_baselines3.common.buffers import ReplayBuffer as SB3ReplayBuffer

    obs_space, act_space = Box(0, 255, (STACK, *FRAME), np.uint8), Discrete(6)
    notes = []
    try:
        SB3ReplayBuffer(transitions, obs_space, act_space, optimize_memory_usage=True)
    except ValueError as e:  # SB3 refuses the combination with its default handle_timeout_termination=True
        notes.append(f"as asked (handle_timeout_termination=True by default): ValueError: {e}")
    kw = {"optimize_memory_usage": True, "handle_timeout_termination": False}
    size, scale = transitions, 1
    try:
        buf = SB3ReplayBuffer(size, obs_space, act_space, **kw)
    except MemoryError as e:  # numpy asks for the whole array at once; Linux's overcommit heuristic may refuse it
        notes.append(f"buffer_size={transitions:,} on this machine: {type(e).__name__}: {e}")
        size, scale = 10_000, transitions // 10_000
        buf = SB3ReplayBuffer(size, obs_space, act_space, **kw)
        notes.append(f"so instantiated with buffer_size={size:,}; every array is (buffer_size, n_envs, ...), "
                     f"so its bytes are multiplied by {scale}")
    arrays = {k: getattr(buf, k).nbytes * scale for k in ("observations", "actions", "rewards", "dones", "timeouts")}
    arrays_dtype = {k: str(getattr(buf, k).dtype) for k in arrays}
    assert getattr(buf, "next_observations", None) is None  # optimize_memory_usage: no next_observations array
    total = sum(arrays.values())
    del buf
    gc.collect()
    return {"version": stable_baselines3.__version__,
            "call": f"ReplayBuffer({transitions}, Box(0, 255, (4, 84, 84), uint8), Discrete(6), "
                    "optimize_memory_usage=True, handle_timeout_termination=False)",
            "instantiated_buffer_size": size, "arrays_bytes": arrays, "arrays_dtype": arrays_dtype,
            "nbytes": total, "nbytes_gb": round(total / GB, 3), "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transitions", type=int, default=1_000_000)
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0, load = time.perf_counter(), os.getloadavg()[0]
    sb3 = sb3_buffer(args.transitions)
    print(f"SB3 optimize_memory_usage=True: {sb3['nbytes_gb']} GB", flush=True)
    lab = lab_buffer(args.transitions, args.num_envs, args.seed)
    print(f"lab: nbytes {lab['nbytes_gb']} GB, RSS +{lab['rss_increase_after_filling_gb']} GB after filling, "
          f"peak {lab['peak_rss_gb']} GB, sample ms {lab['sample_ms']['median_ms']}", flush=True)
    obs_and_next = args.transitions * 2 * STACK * FRAME[0] * FRAME[1]
    measured = max(lab["nbytes"], lab["rss_increase_after_filling_gb"] * GB)
    figures = {
        "transitions": args.transitions,
        "lab": lab,
        "stacked_obs_and_next_obs_computed": {"formula": "transitions * 2 * 4 * 84 * 84 bytes (frames only)",
                                              "nbytes": obs_and_next, "nbytes_gb": round(obs_and_next / GB, 3)},
        "sb3_optimize_memory_usage": sb3,
        "sb3_bytes_over_lab": round(sb3["nbytes"] / lab["nbytes"], 2),
        "stacked_bytes_over_lab": round(obs_and_next / lab["nbytes"], 2),
        "target_gb": TARGET_GB,
        "target_met": bool(measured <= TARGET_GB * GB),
        "target_note": "met when both buffer.nbytes and the measured RSS increase after filling are <= 7.5e9 bytes",
        "benchmark_seconds": round(time.perf_counter() - t0, 1),
        "loadavg_1min_before": round(load, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "timing_note": "seconds and milliseconds are inflated when loadavg exceeds 1 (another process was running "
                       "on this 2-core machine); the bytes are not",
    }
    print(json.dumps({k: figures[k] for k in ("sb3_bytes_over_lab", "stacked_bytes_over_lab", "target_met",
                                              "benchmark_seconds")}))
    record.write("replay_memory", figures)


if __name__ == "__main__":
    main()
