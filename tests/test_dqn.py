"""The DQN agent end to end: CartPole learns, a short Pong run leaves checkpoint, metrics and video,
`mode=eval` replays a checkpoint, resume refills the replay buffer, bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.dqn import DQN
from conftest import build_task, read_metrics, run_lab, run_lab_cases
from lab.cuda_graph import GraphedStep
from lab.errors import LabError

QUIET = ["logger=none", "trainer.progress=false"]
# Pong on 2 CPU cores: 4 envs, tiny buffer, one short evaluation game (env.max_episode_frames caps it).
PONG = [*QUIET, "+experiment=dqn_pong", "trainer.num_threads=1", "trainer.compile=false", "trainer.precision=32",
        "trainer.channels_last=false",
        "agent.num_envs=4", "agent.train_frequency=8", "agent.batch_size=32", "agent.total_timesteps=800",
        "agent.learning_starts=400", "agent.buffer_size=2000", "agent.eval_episodes=1", "agent.eval_num_envs=1",
        "agent.log_every=200", "env.max_episode_frames=800"]


@pytest.mark.timeout(600)
def test_cartpole_reaches_475(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # The full recipe (50k env steps), evaluated every 5,120, ending at the first evaluation of 475 or more.
    # The recipe ends at 475 or more on each of 10 seeds (benchmarks/results/dqn_seeds_cartpole.json); evaluation
    # draws its own random numbers, so the evaluation cadence does not change the training run.
    r = run_lab(tmp_path, "logger=none", "+experiment=dqn_cartpole", "agent.video=false", "agent.eval_every=5_120",
                "trainer.stop_at=475", f"hydra.run.dir={run}", "seed=0", timeout=400)  # with its progress bar
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [m for m in read_metrics(run) if "eval/episode_return" in m]
    assert evals[-1]["eval/episode_return"] >= 475, evals
    assert all(e["eval/episode_return"] < 475 for e in evals[:-1])  # it stopped at the first that reached it
    assert "reached trainer.stop_at=475" in r.stdout + r.stderr
    assert "episode_return=" in r.stderr  # the bar shows the training return beside the loss
    assert r.stdout.count("[lab] step ") == len(evals)  # one console line per evaluation
    episodes = [m["train/episode_return"] for m in read_metrics(run) if "train/episode_return" in m]
    assert max(episodes) > 5 * min(episodes)  # training episodes got longer as it learned


def test_short_pong_run_then_eval_mode_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_lab(tmp_path, *PONG, f"hydra.run.dir={run}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run)
    train = [m for m in rows if "train/loss" in m]
    assert train and all(np.isfinite(m["train/loss"]) for m in train)
    assert rows[-1]["env_steps"] == 800 and rows[-1]["frames"] == 3200
    final = rows[-1]
    assert "eval/episode_return" in final and -21 <= final["eval/episode_return"] <= 21
    assert list((run / "media").glob("eval_video_*.mp4"))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["task"]["_extra_state"]["env_steps"] == 800
    assert "buffer" not in state["task"]["_extra_state"]  # agent.save_replay=false

    evaluated = tmp_path / "eval"
    r = run_lab(tmp_path, *PONG, "mode=eval", f"checkpoint={run / 'checkpoints' / 'best.pt'}",
                f"hydra.run.dir={evaluated}", "agent.eval_episodes=2", "agent.eval_num_envs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = read_metrics(evaluated)
    assert row["eval/episodes"] == 2 and row["env_steps"] == 800
    assert list((evaluated / "media").glob("eval_video_*.mp4"))

    r = run_lab(tmp_path, *PONG, f"hydra.run.dir={run}", "resume=true", "agent.total_timesteps=1600")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refilling 400 transitions" in r.stdout
    rows = read_metrics(run)
    assert rows[-1]["env_steps"] == 1600
    resumed = [m for m in rows if m.get("env_steps", 0) > 800 and "train/loss" in m]
    assert resumed and resumed[0]["env_steps"] >= 1200  # no update until 400 new transitions were stored


def test_save_replay_puts_the_buffer_in_last_pt_not_best_pt_and_resume_restores_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*QUIET, "+experiment=dqn_cartpole", "agent.video=false", "agent.learning_starts=256",
            "agent.gradient_steps=4", "agent.eval_every=512", "agent.eval_episodes=1", "agent.eval_num_envs=1",
            "agent.save_replay=true", f"hydra.run.dir={run}"]
    r = run_lab(tmp_path, *args, "agent.total_timesteps=1024")
    assert r.returncode == 0, r.stderr[-3000:]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["task"]["_extra_state"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["task"]["_extra_state"]
    assert last["buffer"]["written"] == 1024 // 4 and "buffer" not in best  # 4 envs: 256 time steps
    r = run_lab(tmp_path, *args, "agent.total_timesteps=1536", "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replay buffer restored: 1,024 transitions" in r.stdout and "refilling" not in r.stdout
    assert read_metrics(run)[-1]["env_steps"] == 1536


def test_breakout_experiment_trains_a_few_steps(tmp_path: Path) -> None:
    """dqn_breakout end to end on a tiny budget: 4 actions (FIRE starts each game), dueling heads, a
    final evaluation game (capped by env.max_episode_frames) and its video."""
    run = tmp_path / "run"
    r = run_lab(tmp_path, *QUIET, "+experiment=dqn_breakout", "trainer.num_threads=1", "agent.num_envs=2",
                "agent.train_frequency=4", "agent.batch_size=16", "agent.total_timesteps=256",
                "agent.learning_starts=128", "agent.buffer_size=512", "agent.eval_episodes=1", "agent.eval_num_envs=1",
                "agent.log_every=64", "env.max_episode_frames=2000", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run)
    assert any(np.isfinite(m.get("train/loss", np.nan)) for m in rows)
    assert rows[-1]["env_steps"] == 256 and rows[-1]["eval/episodes"] == 1
    assert list((run / "media").glob("eval_video_*.mp4"))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["task"]
    assert state["q.advantage.2.weight"].shape == (4, 512) and state["q.value.2.weight"].shape == (1, 512)


def test_bad_agent_settings_are_refused(tmp_path: Path) -> None:
    cases = {
        ("+experiment=dqn_cartpole", "agent.train_frequency=6"): "must be a multiple of agent.num_envs",
        ("+experiment=dqn_cartpole", "env.id=NoSuchEnv-v0"): "env.id='NoSuchEnv-v0'",
        ("+experiment=dqn_cartpole", "agent.train_frequency=0"): "ceil_div needs",
        ("+experiment=dqn_cartpole", "mode=eval"): "mode=eval needs checkpoint=PATH",
        ("+experiment=dqn_cartpole", "mode=eval", "checkpoint=nope.pt"): "does not exist",
        ("+experiment=dqn_cartpole", "agent.buffer_size=12"): "n_step=5 and agent.num_envs=4: raise it to at least 32",
        ("+experiment=dqn_cartpole", "agent.eval_episodes=0"): "must be >= 1",
        ("+experiment=dqn_cartpole", "env.id=ALE/Pong-v5"): "env=atari env.id=ALE/Pong-v5",
    }
    results = run_lab_cases(tmp_path, [[*QUIET, *args] for args in cases])
    for (args, message), r in zip(cases.items(), results):
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_atari_ids_map_to_their_roms_through_gymnasiums_registry() -> None:
    from agents.envs import ale_game

    assert [ale_game(i) for i in ("ALE/Pong-v5", "PongNoFrameskip-v4", "ALE/TicTacToe3D-v5")] == [
        "pong", "pong", "tic_tac_toe_3d"]
    assert all(ale_game(i) is None for i in ("ALE/Pong-ram-v5", "CartPole-v1", "pong", "NoSuchEnv-v0"))


def _task(tmp_path: Path, device: str, experiment: str, *overrides: str) -> DQN:
    """A DQN task built in-process as the CLI composes its experiment, on `device`."""
    return build_task(tmp_path, experiment, *overrides, device=device).to(device)


def test_the_update_forward_also_acts_and_frames_scale_in_the_compute_dtype(tmp_path: Path) -> None:
    """td_loss(obs) gives the loss of td_loss() plus the greedy actions for obs, from one forward pass;
    uint8 frames go straight to the autocast dtype with the same values as `obs.float() / 255`."""
    torch.set_num_threads(1)
    task = _task(tmp_path, "cpu", "dqn_pong_nature", "agent.num_envs=2", "agent.buffer_size=400",
                 "agent.learning_starts=10000", "agent.batch_size=8", "agent.eval_episodes=1")
    for _ in range(40):  # 160 env steps, all random (epsilon 1): fills the buffer, no updates
        task.training_step(None, None)
    state = task.generator.get_state()
    loss, q, greedy = task.td_loss(task.obs)
    task.generator.set_state(state)
    loss_alone, q_alone, none = task.td_loss()
    assert none is None and greedy.shape == (2,)
    torch.testing.assert_close(loss, loss_alone)
    torch.testing.assert_close(q, q_alone)
    assert (greedy == task.greedy(task.obs)).all()

    obs = torch.as_tensor(task.obs)
    reference = task.q.advantage(task.q.torso(obs.float() / 255.0))
    with torch.no_grad():
        torch.testing.assert_close(task.q(obs), reference)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(task.q(obs), task.q.advantage(task.q.torso(obs.float() / 255.0)))
    task.close()


def _cartpole_task(tmp_path: Path, device: str, *overrides: str) -> DQN:
    return _task(tmp_path, device, "dqn_cartpole", "agent.video=false", *overrides)


class Lives(gym.Env):
    """A game of 3 lives, one lost every 4 steps, each step scoring 5: 12 steps, 60 points."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {"lives": 3}

    def step(self, action):
        self.t += 1
        lives = 3 - self.t // 4
        return np.full(2, self.t / 12, np.float32), 5.0, lives == 0, False, {"lives": lives}


def test_a_lost_life_ends_bootstrapping_not_the_game_and_rewards_are_clipped_for_learning_only(tmp_path) -> None:
    gym.register("LabLives-v0", entry_point=Lives)
    task = _cartpole_task(tmp_path, "cpu", "env.id=LabLives-v0", "agent.num_envs=2", "agent.train_frequency=2",
                          "agent.learning_starts=10000", "agent.buffer_size=200", "agent.clip_rewards=true",
                          "agent.terminal_on_life_loss=true")
    out = [task.training_step(None, None) for _ in range(26)]  # 2 games of 12 steps (+ autoreset) per env
    episodes = [r for o in out for r in o.get("episode_return", [])]
    assert episodes == [60.0] * 4  # whole games, unclipped
    real = task.buffer.real[:26].numpy()
    assert (task.buffer.rewards[:26].numpy()[real] == 1.0).all()  # sign(5) for learning
    term = task.buffer.terminated[:26, 0].numpy()
    assert term[:13].nonzero()[0].tolist() == [3, 7, 11]  # each lost life ends bootstrapping, the last the game
    task.close()


def test_double_dqn_dueling_targets_and_the_epsilon_schedule_by_hand(tmp_path: Path) -> None:
    task = _cartpole_task(tmp_path, "cpu", "agent.learning_starts=10000", "agent.double=true", "agent.dueling=true",
                          "agent.n_step=3", "agent.batch_size=16", "agent.total_timesteps=10000",
                          "agent.exploration_fraction=0.5")
    for _ in range(2):
        task.training_step(None, None)
    torch.nn.init.normal_(task.q_target.advantage[-1].weight)  # target and online nets differ
    state = task.generator.get_state()
    loss, _, _ = task.td_loss()
    task.generator.set_state(state)
    b = task.buffer.sample(16, 3, task.a.gamma, task.generator)
    with torch.no_grad():
        h = task.q.torso(b["next_obs"].float())
        adv = task.q.advantage(h)
        torch.testing.assert_close(task.q(b["next_obs"]), task.q.value(h) + adv - adv.mean(1, keepdim=True))
        pick = task.q(b["next_obs"]).argmax(1)  # Double DQN: the online net picks, the target net rates
        target = b["returns"] + b["discounts"] * task.q_target(b["next_obs"])[torch.arange(16), pick]
        q = task.q(b["obs"])[torch.arange(16), b["actions"]]
    torch.testing.assert_close(loss, torch.nn.functional.smooth_l1_loss(q, target))
    for steps, eps in ((0, 1.0), (2500, (1.0 + 0.04) / 2), (5000, 0.04), (9000, 0.04)):
        task.env_steps = steps
        assert task.epsilon() == pytest.approx(eps)
    task.close()


def test_evaluating_draws_its_own_random_numbers_not_trainings(tmp_path: Path) -> None:
    task = _cartpole_task(tmp_path, "cpu", "agent.eval_episodes=2", "agent.eval_num_envs=2", "agent.eval_epsilon=0.5")
    state = task.rng.bit_generator.state
    first, second = task.evaluate(), task.evaluate()
    assert task.rng.bit_generator.state == state  # how often a run evaluates does not change how it trains
    assert first["episodes"] == second["episodes"] == 2
    task.close()


@pytest.mark.parametrize("tau, interval", [(1.0, 100), (0.3, 2)])
def test_target_updates_follow_the_schedule_outside_autograd(tmp_path: Path, tau: float, interval: int) -> None:
    """Every target_update_interval env steps: target <- tau * online + (1 - tau) * target, k times at once when
    an iteration (train_frequency env steps) crosses k intervals; the target never joins the autograd graph."""
    from lab.trainer import Optimizers

    task = _cartpole_task(tmp_path, "cpu", "agent.learning_starts=64", "agent.train_frequency=8",
                          "agent.gradient_steps=1", "agent.num_envs=4", "agent.batch_size=8", f"agent.tau={tau}",
                          f"agent.target_update_interval={interval}")
    optim = Optimizers(task.optimizers(None), torch.device("cpu"), "32", None)
    while task.env_steps < 64:
        task.training_step(None, optim)
    for _ in range(30):
        old = [p.clone() for p in task.q_target.parameters()]
        steps = task.env_steps
        task.training_step(None, optim)
        k = task.env_steps // interval - steps // interval
        w = 1 - (1 - tau) ** k
        for t, o, p in zip(task.q_target.parameters(), old, task.q.parameters()):
            torch.testing.assert_close(t, o + w * (p.detach() - o))
            assert not t.requires_grad and t.grad_fn is None
    assert task.updates == 30
    task.close()


def test_resume_restores_the_replay_generator_and_restarts_envs_on_new_seeds(tmp_path: Path) -> None:
    task = _cartpole_task(tmp_path, "cpu", "agent.learning_starts=10000")
    for _ in range(4):  # random play, no updates
        task.training_step(None, None)
    task.generator.manual_seed(7)  # as if updates had drawn from it
    state = task.get_extra_state()
    resumed = _cartpole_task(tmp_path, "cpu", "agent.learning_starts=10000")
    fresh_obs = resumed.obs.copy()
    resumed.set_extra_state(state)
    assert torch.equal(resumed.generator.get_state(), task.generator.get_state())
    assert resumed.env_steps == task.env_steps and resumed.first.all()
    assert not np.array_equal(resumed.obs, fresh_obs)  # not the first run's opening episodes again
    task.close()
    resumed.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"))])
def test_cuda_graph_steps_learn_from_new_samples_each_update(tmp_path: Path, device: str) -> None:
    """agent.cuda_graph: acting and updating through GraphedStep (on a CPU the same steps run eagerly).
    Each update draws a new batch from the buffer's current range and moves the weights; outputs are
    copies that the next replay does not overwrite; the greedy actions are those of the eager forward,
    from one acting graph per batch shape."""
    from lab.trainer import Optimizers

    torch.manual_seed(0)
    task = _cartpole_task(tmp_path, device, "agent.cuda_graph=true", "scheduler.end_factor=1.0",
                          "agent.learning_starts=200",
                          "agent.train_frequency=4", "agent.gradient_steps=1", "agent.num_envs=4",
                          "agent.batch_size=16")
    optim = Optimizers(task.optimizers(None), torch.device(device), "32", None)
    while task.env_steps < 200:  # random play fills the buffer
        task.training_step(None, optim)
    assert task.updates == 0
    before = [p.detach().clone() for p in task.q.parameters()]
    losses = []
    for _ in range(8):
        out = task.training_step(None, optim)
        losses.append(out["loss"])
    warmup = task.graph_update.warmup_runs
    assert warmup == (3 if device == "cuda" else 0)
    assert task.updates == 8 + warmup  # on CUDA the capture's 3 warm-up runs stepped Adam too
    assert optim.named["q"][0].state[task.q.advantage[0].weight]["step"].item() == task.updates
    assert len({round(float(v), 6) for v in losses}) == 8  # a new batch every update, kept apart
    assert all(torch.isfinite(v) for v in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, task.q.parameters()))
    lo, hi = task.buffer.sample_range(task.a.n_step)
    assert task.bounds.tolist() == [lo, hi - 1]  # filled before the last update, one vector step ago
    with torch.no_grad():  # acting (training's 4 envs, evaluation's 10): one graph per batch shape, eager's actions
        for obs in (task.obs, np.concatenate([task.obs] * 3)[:10]):
            eager = task.q(torch.as_tensor(obs, device=device)).argmax(1).cpu().numpy()
            assert (task.graphed_greedy(obs) == eager).all() and (task.greedy(obs) == eager).all()
    assert sorted(task.act_graphs) == [(4, 4), (10, 4)]
    # Replays draw new random numbers (a graph that replayed the same batch would still move the weights)
    generator = None if device == "cuda" else task.generator
    draw = GraphedStep(lambda: task.buffer.sample(64, 1, 0.99, generator, task.bounds)["obs"], torch.device(device))
    first, second = draw().clone(), draw().clone()
    assert not torch.equal(first, second)
    task.close()


def test_a_failed_capture_ends_in_one_line_with_the_fix(monkeypatch) -> None:
    """No CUDA here: the CUDA calls around the capture are stand-ins, and `fn` fails where a capture fails
    (inside `torch.cuda.graph`, after its eager warm-up runs), as torch does on a host sync."""
    import contextlib
    from types import SimpleNamespace

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    capturing = {"on": False}

    @contextlib.contextmanager
    def graph(g):
        capturing["on"] = True
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    calls = []

    def fn() -> None:
        calls.append(capturing["on"])
        if capturing["on"]:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")

    step = GraphedStep(fn, torch.device("cuda"), what="the DQN update", fix=DQN.GRAPH_FIX)
    with pytest.raises(LabError) as e:
        step()
    assert calls == [False, False, False, True]  # three eager warm-up runs, then the capture
    message = str(e.value)
    assert message.startswith("capturing the DQN update as a CUDA graph failed (RuntimeError: CUDA error: "
                              "operation not permitted when stream is capturing CUDA kernel errors ...)")
    assert message.endswith("run with agent.cuda_graph=false (the same steps, eagerly)") and "\n" not in message
    assert step.graph is None and step.warmup_runs == 0  # nothing half-captured is kept for replay


def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path: Path) -> None:
    for overrides, message in ((["agent.buffer_device=cpu"], "agent.buffer_device=auto"),
                               (["trainer.precision=bf16"], "needs trainer.precision=32"),
                               (["trainer.compile=true"], "choose one"),
                               (["scheduler.end_factor=0.5"], "fixed learning rate")):
        with pytest.raises(LabError, match=message):  # meta: not the buffer's device
            _cartpole_task(tmp_path, "meta", "agent.cuda_graph=true", "scheduler.end_factor=1.0", *overrides)


def test_a_linear_learning_rate_schedule_spans_the_runs_updates(tmp_path: Path) -> None:
    """scheduler.name=linear: optimizer.lr down to end_factor times it over the updates, from learning_starts to
    the end of the budget (the last iteration's updates end exactly on it)."""
    run = tmp_path / "run"
    r = run_lab(tmp_path, *QUIET, "+experiment=dqn_cartpole", "agent.video=false", "agent.total_timesteps=2048",
                "agent.learning_starts=512", "agent.gradient_steps=4", "agent.log_every=256", "agent.eval_every=2048",
                "agent.eval_episodes=1", "agent.eval_num_envs=1", "optimizer.lr=0.002", "scheduler.name=linear",
                "scheduler.end_factor=0.25", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    lrs = [m["train/lr"] for m in read_metrics(run) if "train/lr" in m]
    assert len(lrs) == 8 and lrs[:2] == [0.002, 0.002]  # no update before learning_starts: lr untouched
    assert lrs[-1] == pytest.approx(0.0005) and all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[2] == pytest.approx(0.002 * (1 - 0.75 * 4 / 24))  # 6 learning iterations x 4 updates
    task = build_task(tmp_path, "dqn_cartpole", "agent.total_timesteps=2048", "agent.learning_starts=512",
                      "agent.gradient_steps=4")
    assert task.total_updates() == 24
    task.close()
    with pytest.raises(LabError, match="fixed learning rate"):
        build_task(tmp_path, "dqn_cartpole", "agent.cuda_graph=true", "scheduler.end_factor=0.5")


def test_an_env_whose_package_is_missing_names_the_install(monkeypatch) -> None:
    from omegaconf import OmegaConf

    from agents.envs import make_env

    def missing(*args, **kwargs):
        raise gym.error.DependencyNotInstalled("Box2D is not installed")

    monkeypatch.setattr(gym, "make_vec", missing)
    with pytest.raises(LabError, match=r"env.id='LunarLander-v3' needs a package .* pip install Box2D") as e:
        make_env(OmegaConf.create({"id": "LunarLander-v3"}), 1, seed=0)
    assert "\n" not in str(e.value)
