"""DQN training-loop throughput on Pong: the lab versus stable-baselines3, same run, same machine.

    python benchmarks/dqn_throughput.py [--steps 6000] [--learning-starts 1000] [--num-envs 1] [--repeats 2]

Both train the Nature-DQN network on the same environment (ale-py's AtariVectorEnv with the
standard preprocessing; SB3 reads it through agents/sb3_dqn.SB3VecEnv) with the same
hyperparameters: batch 32, one update every 4 env steps, Adam 1e-4, target update every 1000
steps, replay buffer 100k, gradient clipping at 10, vanilla DQN (no Double, no dueling, 1-step).
Each runs in its own process, one after the other. Reported: env steps per second of the whole
training loop (acting, env stepping, replay, updates) from `learning_starts` to the end, the ratio,
and each process's peak resident memory. SB3 runs fp32 (it has no mixed precision). The lab runs twice:
fp32 (like for like) and with the CPU speed setting measured best on this kind of CPU (`--lab-args`
replaces it): bf16 autocast where oneDNN has bf16 kernels (AVX512-BF16: 1.78x SB3 there), else fp32
with channels-last (on an AVX2-only CPU bf16 is emulated and about 10x slower; channels-last makes
the update faster: benchmarks/dqn_update.py). A fourth runner, `plain`, is the floor of this machine's kernels: a
hand-written loop with the same network, update, batch-1 acting and env stepping (overlapped with the
update), but no replay bookkeeping (random stored frames), no episode tracking and no logging. A fifth,
`updates`, runs that loop's updates and nothing else: the env steps/s of a loop whose acting and env
stepping were free, the ceiling of any loop built on these kernels (`ceiling_over_sb3`).
The runners repeat `--repeats` times, interleaved, and the median of each is reported. Run it on an
otherwise idle machine: 2 cores shared with another torch process slow both several-fold.
Writes benchmarks/results/dqn_throughput.json (dqn_throughput_envs<N>.json with --num-envs N > 1; an _avx2
suffix on a CPU without native bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402
from lab.io import read_metrics  # noqa: E402

HPARAMS = dict(batch_size=32, train_frequency=4, gradient_steps=1, learning_rate=1e-4, target_update_interval=1000,
               buffer_size=100_000, gamma=0.99, exploration_fraction=0.1, epsilon_end=0.01)


def lab_speed() -> list[str]:
    """The CPU setting measured fastest for this loop: bf16 where oneDNN runs it natively (channels-last and
    compile measured no faster there, batch-1 acting), else fp32 with channels-last (compile measured slower)."""
    import torch

    from lab.devices import native_bf16

    if native_bf16(torch.device("cpu")):
        return ["trainer.precision=bf16"]
    return ["trainer.precision=32", "trainer.channels_last=true"]


def lab_args(steps: int, starts: int, envs: int, run_dir: str, extra: list[str]) -> list[str]:
    a = HPARAMS
    return ["-m", "lab", "+experiment=dqn_pong_nature", "logger=none", "trainer.progress=false", "trainer.grad_clip=10",
            f"hydra.run.dir={run_dir}", f"agent.total_timesteps={steps}", f"agent.learning_starts={starts}",
            f"agent.num_envs={envs}", "agent.eval_episodes=1", "agent.eval_num_envs=1", "agent.video=false",
            f"agent.eval_every={10 * steps}", f"agent.log_every={max(4 * envs, steps // 50)}",
            f"optimizer.lr={a['learning_rate']}", *[f"agent.{k}={v}" for k, v in a.items() if k != "learning_rate"],
            *extra]


def sb3_worker(steps: int, starts: int, envs: int, env_threads: int) -> None:
    """Runs in a child process: SB3's DQN on the lab's env; prints steps/s after learning_starts."""
    import torch
    from omegaconf import OmegaConf
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.sb3_dqn import SB3VecEnv, make_same_step_env

    env_cfg = OmegaConf.load(REPO / "conf" / "env" / "atari.yaml")
    env_cfg.num_threads = env_threads
    env = SB3VecEnv(make_same_step_env(env_cfg, envs, 0), clip_rewards=True, life_loss_done=True)
    marks: dict[str, tuple[float, int]] = {}

    class Clock(BaseCallback):
        def _on_step(self) -> bool:
            if "start" not in marks and self.num_timesteps >= starts:
                marks["start"] = (time.perf_counter(), self.num_timesteps)
            return True

    h = HPARAMS
    model = DQN("CnnPolicy", env, learning_rate=h["learning_rate"], buffer_size=h["buffer_size"],
                learning_starts=starts, batch_size=h["batch_size"], gamma=h["gamma"],
                train_freq=h["train_frequency"] // envs, gradient_steps=h["gradient_steps"],
                target_update_interval=h["target_update_interval"], exploration_fraction=h["exploration_fraction"],
                exploration_final_eps=h["epsilon_end"], max_grad_norm=10, verbose=0, seed=0, device="cpu")
    model.learn(total_timesteps=steps, callback=Clock())
    t1 = time.perf_counter()
    t0, n0 = marks["start"]
    print(json.dumps({"steps_per_sec": (model.num_timesteps - n0) / (t1 - t0), "timed_steps": model.num_timesteps - n0,
                      "timed_seconds": t1 - t0, "updates": model._n_updates, "torch_threads": torch.get_num_threads()}))


def update_step(q: Any, q_target: Any, opt: Any, obs: Any, next_obs: Any, actions: Any, rewards: Any,
                bf16: bool) -> None:
    """One vanilla-DQN update as the lab and SB3 do it here: target forward, online forward, Huber loss,
    backward, gradient clipping at 10, Adam (bf16 autocast for the forwards when asked)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            target = rewards + HPARAMS["gamma"] * q_target(next_obs).float().max(1).values
        loss = F.smooth_l1_loss(q(obs).float().gather(1, actions[:, None]).squeeze(1), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(q.parameters(), 10)
    opt.step()


def plain_worker(steps: int, starts: int, envs: int, env_threads: int, lab_extra: list[str],
                 updates_only: bool = False) -> None:
    """Runs in a child process: the floor of this machine's kernels. The lab's network, update and
    epsilon-greedy batch-1 acting, env steps sent before the update and received after it (as the lab
    does), same precision and memory format as the lab's speed setting; replay samples are random frames
    from a preallocated uint8 tensor. Prints steps/s over the steps after `starts`. `updates_only`: the
    same updates and nothing else (no acting, no env steps), so the steps/s any loop with these kernels
    could reach at most."""
    import copy

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from agents.dqn import QNetwork
    from agents.envs import make_env

    h = HPARAMS
    bf16, channels_last = "trainer.precision=bf16" in lab_extra, "trainer.channels_last=true" in lab_extra
    env_cfg = OmegaConf.load(REPO / "conf" / "env" / "atari.yaml")
    env_cfg.num_threads = env_threads
    env = make_env(env_cfg, envs, 0)
    obs, _ = env.reset(seed=0)
    q = QNetwork(obs.shape[1:], int(env.single_action_space.n), [512], dueling=False)
    if channels_last:
        q = q.to(memory_format=torch.channels_last)
    q_target = copy.deepcopy(q).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=h["learning_rate"], fused=True)
    frames = torch.randint(0, 256, (4096, *obs.shape[1:]), dtype=torch.uint8)
    rng = np.random.default_rng(0)
    n_actions, batch, per_update = int(env.single_action_space.n), h["batch_size"], h["train_frequency"] // envs

    def act(o: np.ndarray) -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            greedy = q(torch.as_tensor(o)).argmax(1).numpy()
        return np.where(rng.random(envs) < h["epsilon_end"], rng.integers(0, n_actions, envs), greedy)

    def update() -> None:
        i = torch.randint(0, len(frames) - 1, (batch,))
        update_step(q, q_target, opt, frames[i], frames[i + 1], torch.randint(0, n_actions, (batch,)),
                    torch.randn(batch), bf16)

    if updates_only:  # one update per train_frequency env steps, as in the loop; 3 warm-up updates first
        n_updates = (steps - starts) // h["train_frequency"]
        for _ in range(3):
            update()
        t0 = time.perf_counter()
        for _ in range(n_updates):
            update()
        seconds = time.perf_counter() - t0
        print(json.dumps({"steps_per_sec": n_updates * h["train_frequency"] / seconds, "updates": n_updates,
                          "ms_per_update": 1e3 * seconds / n_updates, "torch_threads": torch.get_num_threads()}))
        return
    step, t0 = 0, 0.0
    while step < steps:
        if step == starts:
            t0 = time.perf_counter()
        for k in range(per_update):
            env.send(act(obs))
            if k == 0 and step >= starts:
                update()
            obs = env.recv()[0]
            step += envs
    seconds = time.perf_counter() - t0
    print(json.dumps({"steps_per_sec": (steps - starts) / seconds, "timed_steps": steps - starts,
                      "timed_seconds": seconds, "torch_threads": torch.get_num_threads()}))


def run_child(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run a child process; returns it and its peak resident memory in GB (Linux ru_maxrss is KiB)."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")
    p = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args], cwd=REPO, env=env,
                       capture_output=True, text=True)
    peak = next((int(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")), 0)
    if p.returncode:
        raise SystemExit(f"child failed: {' '.join(args)}\n{p.stderr[-3000:]}")
    return p, peak * 1024 / 1e9


def lab_rate(run_dir: Path, starts: int) -> dict:
    rows = read_metrics(run_dir)
    train = [r for r in rows if "perf/steps_per_sec" in r and "train/loss" in r and r["env_steps"] > starts]
    first, last = train[0], train[-1]
    # The first row after learning starts closes a window that began before it: time from its end.
    steps = last["env_steps"] - first["env_steps"]
    seconds = last["perf/elapsed_s"] - first["perf/elapsed_s"]
    return {"steps_per_sec": steps / seconds, "timed_steps": steps, "timed_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--learning-starts", type=int, default=1000)
    ap.add_argument("--num-envs", type=int, default=1)
    ap.add_argument("--lab-args", nargs="*", default=None, help="the lab's speed setting (default: per CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--env-threads", type=int, default=0, help="ALE's C++ threads (0: one per env up to the cores)")
    ap.add_argument("--sb3-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--updates-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.num_envs not in (1, 2, 4):
        raise SystemExit("--num-envs must divide the 4 env steps between updates: 1, 2 or 4")
    if a.steps - a.learning_starts < 100 * HPARAMS["train_frequency"]:
        raise SystemExit(f"--steps ({a.steps}) must exceed --learning-starts ({a.learning_starts}) by at least "
                         f"{100 * HPARAMS['train_frequency']}: the runners are timed after learning starts")
    if a.lab_args is None:
        a.lab_args = lab_speed()
    if a.sb3_worker:
        return sb3_worker(a.steps, a.learning_starts, a.num_envs, a.env_threads)
    if a.plain_worker or a.updates_worker:
        return plain_worker(a.steps, a.learning_starts, a.num_envs, a.env_threads, a.lab_args, a.updates_worker)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "SB3_LOGDIR": tempfile.mkdtemp(prefix="sb3-"),
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))}
    out: dict = {"settings": {**HPARAMS, "total_timesteps": a.steps, "learning_starts": a.learning_starts,
                              "num_envs": a.num_envs, "env": "ALE/Pong-v5 via AtariVectorEnv, frameskip 4, stack 4",
                              "lab_args": a.lab_args, "repeats": a.repeats,
                              "env_threads": a.env_threads or f"auto ({min(a.num_envs, os.cpu_count() or 1)})"}}
    runs: dict[str, list[dict]] = {"lab_fp32": [], "lab": [], "sb3": [], "plain": [], "updates": []}
    for _ in range(a.repeats):
        for name, extra in (("lab_fp32", ["trainer.precision=32"]), ("lab", a.lab_args)):
            with tempfile.TemporaryDirectory(prefix="dqn-bench-") as tmp:
                t = time.perf_counter()
                _, peak = run_child(lab_args(a.steps, a.learning_starts, a.num_envs, tmp,
                                             [f"env.num_threads={a.env_threads}", *extra]), env)
                runs[name].append({**lab_rate(Path(tmp), a.learning_starts), "peak_rss_gb": round(peak, 3),
                                   "process_seconds": round(time.perf_counter() - t, 1)})
            print(name, runs[name][-1], flush=True)
        for name in ("sb3", "plain", "updates"):
            t = time.perf_counter()
            p, peak = run_child([str(Path(__file__).resolve()), f"--{name}-worker", "--steps", str(a.steps),
                                 "--learning-starts", str(a.learning_starts), "--num-envs", str(a.num_envs),
                                 "--env-threads", str(a.env_threads), "--lab-args", *a.lab_args], env)
            runs[name].append({**json.loads(p.stdout.strip().splitlines()[-1]), "peak_rss_gb": round(peak, 3),
                               "process_seconds": round(time.perf_counter() - t, 1)})
            print(name, runs[name][-1], flush=True)
    for name, rs in runs.items():
        rates = sorted(r["steps_per_sec"] for r in rs)
        out[name] = {"steps_per_sec_median": round(statistics.median(rates), 1), "steps_per_sec_runs": rates,
                     "peak_rss_gb_max": max(r["peak_rss_gb"] for r in rs), "runs": rs}
    sb3 = out["sb3"]["steps_per_sec_median"]
    out["speedup"] = round(out["lab"]["steps_per_sec_median"] / sb3, 2)
    out["speedup_fp32"] = round(out["lab_fp32"]["steps_per_sec_median"] / sb3, 2)
    out["speedup_plain"] = round(out["plain"]["steps_per_sec_median"] / sb3, 2)
    out["lab_of_plain"] = round(out["lab"]["steps_per_sec_median"] / out["plain"]["steps_per_sec_median"], 2)
    out["ceiling_over_sb3"] = round(out["updates"]["steps_per_sec_median"] / sb3, 2)
    out["target_speedup"] = 2.0
    out["meets_target"] = out["speedup"] >= 2.0
    print(f"speed-up {out['speedup']}x (lab fp32: {out['speedup_fp32']}x; the plain floor loop: "
          f"{out['speedup_plain']}x; the lab runs at {out['lab_of_plain']} of the floor; updates alone, with no "
          f"acting or env steps: {out['ceiling_over_sb3']}x)", flush=True)
    out["note"] = ("SB3 allocates its replay buffer lazily (numpy) and the lab eagerly (torch.zeros), so peak RSS "
                   "compares processes, not buffers: see benchmarks/results/replay_memory.json for buffers")
    record.write(f"dqn_throughput{'' if a.num_envs == 1 else f'_envs{a.num_envs}'}{record.cpu_kind_suffix()}", out)


if __name__ == "__main__":
    main()
