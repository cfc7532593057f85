"""One Nature-DQN update on this CPU in each precision and memory format: which setting is fast here.

    python benchmarks/dqn_update.py [--seconds 4]

The update of benchmarks/dqn_throughput.py (batch 32 of 4x84x84 uint8 frames: target forward, online
forward, Huber loss, backward, clipping, fused Adam) timed for fp32 and bf16 autocast, NCHW and
channels-last, and fp32 channels-last under torch.compile. Each variant warms up, then repeats for
`--seconds` (at least 3 updates); the median milliseconds per update are reported. On a CPU without
native bf16 (AVX2 only) oneDNN emulates bf16, which is why `trainer.precision=auto` picks 32 there.
`bound`: the update's floating-point operations against this CPU's float32 matmul rate, the lower bound on
its time and the fraction of that rate the fastest variant reaches.
Writes benchmarks/results/dqn_update.json (dqn_update_avx2.json on a CPU without native bf16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dqn_throughput import HPARAMS, update_step  # noqa: E402

import record  # noqa: E402
from agents.dqn import QNetwork  # noqa: E402

VARIANTS = {"fp32": (False, False, False), "fp32_channels_last": (False, True, False),
            "bf16": (True, False, False), "bf16_channels_last": (True, True, False),
            "fp32_channels_last_compiled": (False, True, True)}


def time_update(bf16: bool, channels_last: bool, compiled: bool, seconds: float) -> dict[str, float]:
    torch.manual_seed(0)
    q = QNetwork((4, 84, 84), 6, [512], dueling=False)
    if channels_last:
        q = q.to(memory_format=torch.channels_last)
    q_target = copy.deepcopy(q).requires_grad_(False)
    if compiled:
        q.compile(dynamic=False)
        q_target.compile(dynamic=False)
    opt = torch.optim.Adam(q.parameters(), lr=HPARAMS["learning_rate"], fused=True)
    b = HPARAMS["batch_size"]
    obs, next_obs = (torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8) for _ in range(2))
    actions, rewards = torch.randint(0, 6, (b,)), torch.randn(b)
    for _ in range(3):  # warm-up (and compilation)
        update_step(q, q_target, opt, obs, next_obs, actions, rewards, bf16)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        update_step(q, q_target, opt, obs, next_obs, actions, rewards, bf16)
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms_per_update_median": round(statistics.median(times), 2), "updates_timed": len(times)}


def arithmetic_bound(fastest_ms: float) -> dict[str, float]:
    """How far the update can go on this CPU: its floating-point operations (torch's FlopCounterMode) against
    the machine's float32 matrix-multiply rate (2048x2048 matmuls, all torch threads), the fastest kernel
    this CPU runs; convolutions at batch 32 run below it."""
    from torch.utils.flop_counter import FlopCounterMode

    q = QNetwork((4, 84, 84), 6, [512], dueling=False)
    q_target = copy.deepcopy(q).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=HPARAMS["learning_rate"])
    b = HPARAMS["batch_size"]
    obs, next_obs = (torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8) for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        update_step(q, q_target, opt, obs, next_obs, torch.randint(0, 6, (b,)), torch.randn(b), False)
    gflop = counter.get_total_flops() / 1e9
    x, y = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        x @ y
    rates = []
    for _ in range(10):
        t = time.perf_counter()
        x @ y
        rates.append(2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    peak = statistics.median(rates)
    return {"update_gflop": round(gflop, 3), "matmul_gflops_median": round(peak, 1),
            "update_ms_at_matmul_rate": round(gflop / peak * 1e3, 1),
            "fastest_update_gflops": round(gflop / fastest_ms * 1e3, 1),
            "fastest_fraction_of_matmul_rate": round(gflop / fastest_ms * 1e3 / peak, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per variant")
    a = ap.parse_args()
    out: dict = {"settings": {"batch_size": HPARAMS["batch_size"], "network": "Nature DQN, 6 actions",
                              "seconds_per_variant": a.seconds}}
    for name, (bf16, channels_last, compiled) in VARIANTS.items():
        out[name] = time_update(bf16, channels_last, compiled, a.seconds)
        print(name, out[name], flush=True)
    fastest = min(VARIANTS, key=lambda n: out[n]["ms_per_update_median"])
    out["fastest"] = fastest
    out["bound"] = arithmetic_bound(out[fastest]["ms_per_update_median"])
    print("bound", out["bound"], flush=True)
    out["bf16_over_fp32"] = round(out["bf16"]["ms_per_update_median"] / out["fp32"]["ms_per_update_median"], 2)
    out["channels_last_speedup_fp32"] = round(
        out["fp32"]["ms_per_update_median"] / out["fp32_channels_last"]["ms_per_update_median"], 2)
    print(f"fastest: {fastest}; bf16 takes {out['bf16_over_fp32']}x the fp32 time", flush=True)
    record.write(f"dqn_update{record.cpu_kind_suffix()}", out)


if __name__ == "__main__":
    main()
