"""The stable-baselines3 DQN baseline (agents/sb3_dqn.py): its VecEnv adapter against the lab's own envs,
a Pong run through `python -m lab`, resume, and the settings it refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from agents.envs import make_env
from agents.sb3_dqn import SB3DQN, SB3VecEnv, check_config, check_replay_memory, learning_rate, make_same_step_env
from conftest import REPO, build_task, compose, lab_env, read_metrics, run_lab
from lab.distributed import DistInfo
from lab.errors import LabError
from lab.logger import RunLogger
from lab.task import RunContext
from lab.trainer import check_task, run_precision

FAST = ["logger=none", "trainer.progress=false", "trainer.device=cpu"]


def one_thread(tmp_path: Path) -> dict[str, str]:
    """The lab's test environment with one torch thread: SB3's batch-32 updates gain little from a second core,
    and two OpenMP threads slow down 10x or more when other processes share this 2-core machine."""
    return lab_env(tmp_path, OMP_NUM_THREADS="1")


def atari_cfg(**overrides: Any) -> DictConfig:
    """conf/env/atari.yaml with some keys changed."""
    cfg = OmegaConf.load(REPO / "conf" / "env" / "atari.yaml")
    cfg.update(overrides)
    return cfg


def lockstep(cfg: DictConfig, num_envs: int, steps: int, life_loss_done: bool = False) -> Iterator[tuple[Any, Any]]:
    """Play the adapter and agents.envs.make_env's env (next-step autoreset) side by side with the same seed
    and actions; yields (reference step, adapter step) up to the first episode end, then (the reference's
    autoreset step, None)."""
    ref = make_env(cfg, num_envs, seed=0)
    sb3 = SB3VecEnv(make_same_step_env(cfg, num_envs, seed=0), clip_rewards=True, life_loss_done=life_loss_done)
    ref_obs, _ = ref.reset(seed=0)
    sb3.seed(0)
    assert np.array_equal(sb3.reset(), ref_obs)
    rng = np.random.default_rng(0)
    try:
        for _ in range(steps):
            actions = rng.integers(0, sb3.action_space.n, num_envs)
            ref_step = ref.step(actions)
            sb3.step_async(actions)
            yield ref_step, sb3.step_wait()
            if (ref_step[2] | ref_step[3]).any():
                ref_next = ref.step(actions)  # the reference's autoreset step: its observation is the reset one
                yield ref_next, None
                return
        raise AssertionError(f"no episode ended in {steps} steps")
    finally:
        ref.close()
        sb3.close()


def test_adapter_gives_sb3_terminal_observations_and_whole_episode_infos() -> None:
    # Pong truncated after 400 frames (100 agent steps): both envs end together, by the time limit.
    steps = list(lockstep(atari_cfg(max_episode_frames=400), num_envs=2, steps=200))
    ref_rewards = np.zeros(2)
    for (ref_obs, ref_reward, ref_term, ref_trunc, _), sb3_step in steps[:-1]:
        obs, reward, dones, infos = sb3_step
        ref_rewards += ref_reward
        assert np.array_equal(reward, np.sign(ref_reward)) and reward.dtype == np.float32
        assert np.array_equal(dones, ref_term | ref_trunc)
        if not dones.any():
            assert np.array_equal(obs, ref_obs) and infos == [{}, {}]
    assert len(steps) - 1 == 100
    assert ref_rewards.min() < 0  # random play lost points: the returns below are not all zero
    (ref_final, _, _, ref_trunc, _), (obs, _, dones, infos) = steps[-2]
    (ref_reset, *_), _ = steps[-1]
    assert dones.all() and ref_trunc.all()
    for i in range(2):
        assert np.array_equal(infos[i]["terminal_observation"], ref_final[i])  # what the game showed at its end
        assert np.array_equal(obs[i], ref_reset[i])  # the step already returns the next game's first observation
        assert infos[i]["TimeLimit.truncated"] is True
        assert infos[i]["episode"] == {"r": ref_rewards[i], "l": 100}


def test_adapter_reports_unclipped_returns_and_life_losses_without_resetting() -> None:
    # Space Invaders: 5-30 points an alien, 3 lives; random play loses all three in a few hundred steps.
    steps = list(lockstep(atari_cfg(id="ALE/SpaceInvaders-v5"), num_envs=1, steps=3000, life_loss_done=True))
    life_losses, points, clipped = 0, 0.0, 0.0
    for (ref_obs, ref_reward, _, _, _), (obs, reward, dones, infos) in steps[:-2]:
        points += ref_reward[0]
        clipped += reward[0]
        assert reward[0] == np.sign(ref_reward[0])
        assert np.array_equal(obs, ref_obs)  # a lost life does not reset the game
        if dones[0]:
            life_losses += 1
            assert infos == [{}]  # no terminal_observation (the next observation is the game's), no episode end
    assert life_losses == 2
    (_, ref_reward, ref_term, _, _), (_, _, dones, infos) = steps[-2]
    points += ref_reward[0]
    assert ref_term[0] and dones[0] and infos[0]["TimeLimit.truncated"] is False
    assert infos[0]["episode"] == {"r": points, "l": len(steps) - 1}  # the whole game's points, unclipped
    assert points >= 5 * clipped > 0


def test_adapter_over_gymnasium_make_vec() -> None:
    env = SB3VecEnv(make_same_step_env(OmegaConf.create({"id": "CartPole-v1"}), 3, seed=0))
    env.seed(0)
    env.reset()
    lengths = np.zeros(3, int)
    ended = 0
    for _ in range(30):  # always push left: the pole falls within about 10 steps
        obs, reward, dones, infos = env.step(np.zeros(3, np.int64))
        lengths += 1
        assert np.array_equal(reward, np.ones(3, np.float32))
        for i in np.flatnonzero(dones):
            final = infos[i]["terminal_observation"]
            assert abs(final[2]) > 0.2095 or abs(final[0]) > 2.4  # the state that ended the episode ...
            assert np.abs(obs[i]).max() <= 0.05  # ... and the new episode's first one
            assert infos[i]["TimeLimit.truncated"] is False
            assert infos[i]["episode"] == {"r": float(lengths[i]), "l": int(lengths[i])}
            lengths[i] = 0
            ended += 1
    assert ended >= 6 and len(env.pop_episodes()) == ended and env.pop_episodes() == []
    env.close()


def sb3_cartpole_cfg(*overrides: str) -> DictConfig:
    """sb3_dqn_cartpole as `python -m lab` composes it, without a run."""
    return compose("sb3_dqn_cartpole", *overrides)


@pytest.mark.parametrize("override, message", [
    ("agent.double=true", "no Double DQN"), ("agent.dueling=true", "no dueling heads"),
    ("agent.loss=mse", "Huber loss only"), ("agent.num_envs=5", "multiple of agent.num_envs=5"),
    ("agent.save_replay=true", "does not checkpoint its replay buffer"), ("optimizer=sgd", "trains with Adam"),
    ("agent.buffer_device=cuda", "host memory"), ("agent.n_step=0", "n_step must be >= 1"),
])
def test_refuses_what_sb3_cannot_do_in_one_line(override: str, message: str) -> None:
    check_config(sb3_cartpole_cfg())  # the recipe itself is fine
    with pytest.raises(LabError, match=message) as e:
        check_config(sb3_cartpole_cfg(override))
    assert "\n" not in str(e.value)


def test_refuses_torchrun_and_other_precisions(tmp_path: Path) -> None:
    """SB3DQN's capability flags, as the trainer checks them before the task is built."""
    logger = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    cpu = torch.device("cpu")
    with pytest.raises(LabError, match="one process"):
        check_task(SB3DQN, RunContext(cpu, DistInfo(world_size=2), logger, tmp_path, 0))
    with pytest.raises(LabError, match="float32"):
        check_task(SB3DQN, RunContext(cpu, DistInfo(), logger, tmp_path, 0, precision="bf16"))
    assert run_precision("auto", cpu, SB3DQN) == "32"  # auto never picks a precision the task refuses


def test_adam_settings_reach_sb3(tmp_path: Path) -> None:
    """optimizer.lr, .eps, .betas and .weight_decay of the experiment are SB3's learning rate and Adam's."""
    task = build_task(tmp_path, "sb3_dqn_cartpole", "optimizer.lr=0.0007", "optimizer.eps=0.001",
                      "optimizer.betas=[0.8,0.9]", "optimizer.weight_decay=0.01", "agent.buffer_size=2000")
    group = task.model.policy.optimizer.param_groups[0]
    assert type(task.model.policy.optimizer) is torch.optim.Adam
    assert (group["lr"], group["eps"], group["betas"], group["weight_decay"]) == (0.0007, 0.001, (0.8, 0.9), 0.01)
    task.close()


def test_refuses_a_replay_buffer_larger_than_memory() -> None:
    pong = make_env(atari_cfg(), 1, seed=0)
    space = pong.single_observation_space
    pong.close()
    assert check_replay_memory(100_000, space, total_bytes=8 * 10**9) == 2 * 100_000 * 4 * 84 * 84  # 5.6 GB
    with pytest.raises(LabError, match=r"agent.buffer_size=1,000,000: .* 56.4 GB, more than this machine's 32.0 GB"):
        check_replay_memory(1_000_000, space, total_bytes=32 * 10**9)


def test_sb3_pong_through_the_lab(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # 512 env steps, updates from 256 on; games truncated after 1,000 frames (250 agent steps) so that two end in
    # training and the evaluation game is short.
    p = run_lab(tmp_path, "+experiment=sb3_dqn_pong", *FAST, "agent.total_timesteps=512", "agent.learning_starts=256",
                "agent.buffer_size=2000", "agent.eval_episodes=1", "agent.eval_num_envs=1", "agent.log_every=128",
                "env.max_episode_frames=1000", f"hydra.run.dir={run_dir}", env=one_thread(tmp_path), timeout=180)
    assert p.returncode == 0, p.stderr
    rows = read_metrics(run_dir)
    train = [r for r in rows if "train/epsilon" in r]
    assert [r["step"] for r in train] == [32, 64, 96, 128]
    assert [r["env_steps"] for r in train] == [128, 256, 384, 512]
    assert [r["frames"] for r in train] == [512, 1024, 1536, 2048]
    assert ["train/loss" in r for r in train] == [False, False, True, True]  # SB3 learns after learning_starts
    eps = [r["train/epsilon"] for r in train]  # means over the rows' 32 steps; 1.0 -> 0.01 over 10%: 51 steps
    assert 0.01 < eps[0] < 1.0 and eps[1:] == pytest.approx([0.01] * 3)
    games = [r for r in train if "train/episode_return" in r]  # truncated at env steps 250 and 500
    assert [r["env_steps"] for r in games] == [256, 512] and [r["train/episode_length"] for r in games] == [250] * 2
    assert all(-21 <= r["train/episode_return"] <= 0 for r in games)
    evals = [r for r in rows if "eval/episode_return" in r]
    assert len(evals) == 1 and evals[0]["env_steps"] == 512 and evals[0]["eval/episodes"] == 1
    assert -21 <= evals[0]["eval/episode_return"] <= 21 and evals[0]["eval/episode_length"] <= 250
    assert list((run_dir / "media").glob("eval_video_*.mp4"))
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    extra = state["task"]["_extra_state"]
    assert "policy.q_net.features_extractor.cnn.0.weight" in state["task"]
    assert "policy.q_net_target.q_net.0.weight" in state["task"]
    assert extra["num_timesteps"] == 512 and extra["n_updates"] == 64  # one update per rollout after env step 256
    assert state["step"] == 128 and (run_dir / "checkpoints" / "best.pt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["main_metric"] == "eval/episode_return"
    assert not (tmp_path / "sb3").exists()  # SB3 wrote no logs ($SB3_LOGDIR) ...
    assert sorted(q.name for q in tmp_path.iterdir() if q.name != "home") == ["run"]  # ... nor anything in the CWD
    # mode=eval plays the checkpoint's policy
    p = run_lab(tmp_path, "+experiment=sb3_dqn_pong", *FAST, "mode=eval", f"checkpoint={run_dir}/checkpoints/last.pt",
                "agent.eval_episodes=1", "agent.eval_num_envs=1", "agent.video=false", "env.max_episode_frames=1000",
                f"hydra.run.dir={tmp_path / 'eval'}", env=one_thread(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["status"] == "evaluated" and summary["env_steps"] == 512 and summary["eval/episodes"] == 1


def test_sb3_resume_continues_counters_optimizer_and_schedule(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["+experiment=sb3_dqn_cartpole", *FAST, "agent.total_timesteps=1024", "agent.train_frequency=128",
            "agent.gradient_steps=16", "agent.learning_starts=256", "agent.exploration_fraction=1.0",
            "agent.log_every=128", "agent.eval_every=100000", "agent.eval_episodes=2", "agent.video=false",
            f"hydra.run.dir={run_dir}"]
    first = run_lab(tmp_path, *args, "trainer.max_steps=4", env=one_thread(tmp_path))
    assert first.returncode == 0, first.stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["task"]["_extra_state"]
    assert state["num_timesteps"] == 512 and state["n_updates"] == 32  # rollouts ending at 384 and 512
    second = run_lab(tmp_path, *args, "trainer.max_steps=8", "resume=true", env=one_thread(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "refilling 256 transitions" in second.stdout
    rows = [r for r in read_metrics(run_dir) if "train/epsilon" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["env_steps"] for r in rows] == [128 * k for k in range(1, 9)]
    # epsilon goes on from where it was (1.0 -> 0.04 over the 1,024 steps), not from 1.0
    assert [r["train/epsilon"] for r in rows] == pytest.approx([1 - 0.96 * k / 8 for k in range(1, 9)], abs=1e-6)
    # no updates while the empty replay buffer refills 256 transitions, then one train() per step again
    assert ["train/loss" in r for r in rows] == [False, False, True, True, False, False, True, True]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["task"]["_extra_state"]
    assert state["num_timesteps"] == 1024 and state["n_updates"] == 64
    assert all(s["step"] == 64 for s in state["optimizer"]["state"].values())  # Adam's state was restored


def test_a_linear_schedule_is_sb3s_learning_rate_over_its_progress(tmp_path: Path) -> None:
    task = build_task(tmp_path, "sb3_dqn_cartpole", "optimizer.lr=0.002", "scheduler.name=linear",
                      "scheduler.end_factor=0.5", "agent.buffer_size=2000")
    schedule = task.model.lr_schedule  # of SB3's progress remaining: 1 at the start, 0 at total_timesteps
    assert (schedule(1.0), schedule(0.5), schedule(0.0)) == pytest.approx((0.002, 0.0015, 0.001))
    task.close()
    assert learning_rate(sb3_cartpole_cfg()) == 2.3e-3  # RL Zoo's constant learning rate (end_factor 1)
    assert learning_rate(sb3_cartpole_cfg("scheduler.name=none")) == 2.3e-3
    with pytest.raises(LabError, match="only the linear schedule"):
        learning_rate(sb3_cartpole_cfg("scheduler.name=cosine"))
