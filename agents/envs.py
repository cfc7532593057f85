"""Vector environments for the agents, episode bookkeeping, and greedy evaluation with a video.

Atari games run in ale-py's `AtariVectorEnv` (C++ threads) with the standard DQN preprocessing:
84x84 grey, 4-frame stack, frame-skip 4 with max-pool over the last two frames, up to 30 no-op
starts, FIRE on reset. Rewards come back unclipped (the agent clips them for learning only) and an
episode is a whole game (a lost life is reported through `info["lives"]`, not as an episode end).
Any other Gymnasium id goes through `gym.make_vec`. Both autoreset on the step after an episode
ends (Gymnasium's "next step" mode): that step ignores its action and returns the reset observation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig

from lab.errors import LabError


def ale_game(env_id: str) -> str | None:
    """The ROM of an Atari id with image observations (`ALE/Pong-v5`, `PongNoFrameskip-v4`,
    `ALE/TicTacToe3D-v5`), read from Gymnasium's registry; None for any other id (RAM variants included)."""
    import ale_py

    gym.register_envs(ale_py)
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        return None
    if spec.entry_point != "ale_py.env:AtariEnv" or spec.kwargs.get("obs_type", "rgb") == "ram":
        return None
    return spec.kwargs.get("game")


def is_atari(env_id: str) -> bool:
    return ale_game(env_id) is not None


def atari_vector_env(cfg: DictConfig, game: str, num_envs: int, **kwargs: Any) -> gym.vector.VectorEnv:
    """ale-py's `AtariVectorEnv` with the standard preprocessing of the `env:` block (kwargs: its autoreset_mode).

    One C++ thread per env up to the number of cores (`env.num_threads` overrides): spare threads wait
    spinning and slow the network on a small machine."""
    from ale_py.vector_env import AtariVectorEnv

    threads = int(cfg.get("num_threads") or min(num_envs, os.cpu_count() or 1))
    return AtariVectorEnv(
        game, num_envs, frameskip=int(cfg.frameskip), stack_num=int(cfg.frame_stack),
        noop_max=int(cfg.noop_max), repeat_action_probability=float(cfg.sticky_actions),
        use_fire_reset=bool(cfg.fire_reset), max_num_frames_per_episode=int(cfg.max_episode_frames),
        reward_clipping=False, episodic_life=False, num_threads=threads, **kwargs,
    )


def make_env(cfg: DictConfig, num_envs: int, seed: int, render: bool = False,
             autoreset_mode: gym.vector.AutoresetMode | None = None) -> gym.vector.VectorEnv:
    """`num_envs` copies of `cfg.id` (the experiment's `env:` block), seeded from `seed`; Gymnasium's
    "next step" autoreset unless `autoreset_mode` says otherwise (SB3 wants "same step")."""
    env_id = str(cfg.id)
    game = ale_game(env_id)
    mode = {} if autoreset_mode is None else {"autoreset_mode": autoreset_mode}
    if game is not None:
        if "frameskip" not in cfg:  # e.g. dqn_cartpole's `env: gym` block with an Atari id
            raise LabError(f"env.id={env_id!r} is an Atari game: add the Atari env settings, "
                           f"env=atari env.id={env_id}")
        env = atari_vector_env(cfg, game, num_envs, **mode)
    else:
        if render:  # pygame draws off-screen, with no display or sound device
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
            os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        try:
            env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=str(cfg.get("vectorization", "sync")),
                               render_mode="rgb_array" if render else None, vector_kwargs=mode)
        except gym.error.DependencyNotInstalled as e:
            raise LabError(f"env.id={env_id!r} needs a package that is not installed ({str(e).rstrip('.')}); "
                           "for the box2d envs (LunarLander-v3): pip install Box2D") from None
        except gym.error.Error as e:
            problem = str(e).rstrip(".")
            raise LabError(f"env.id={env_id!r}: {problem}{'' if problem.endswith('?') else '.'} Use a Gymnasium "
                           "id (CartPole-v1, Acrobot-v1) or an Atari one (ALE/Pong-v5, ALE/Breakout-v5, "
                           "PongNoFrameskip-v4)") from None
    if not isinstance(env.single_action_space, gym.spaces.Discrete):
        env.close()
        raise LabError(f"env.id={env_id!r} has {env.single_action_space} actions; DQN needs a Discrete action space")
    env.reset(seed=seed)
    return env


@dataclass
class EpisodeTracker:
    """Whole-episode returns (unclipped) and lengths of a vector env: in "next step" autoreset mode (the step
    after an episode's end is its reset and counts for nothing), or `same_step` (SB3's: that step resets too)."""

    num_envs: int
    same_step: bool = False
    returns: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)
    resetting: np.ndarray = field(init=False)  # this env's next step is an autoreset (its action is ignored)

    def __post_init__(self) -> None:
        self.returns = np.zeros(self.num_envs, np.float64)
        self.lengths = np.zeros(self.num_envs, np.int64)
        self.resetting = np.zeros(self.num_envs, bool)

    def update(self, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> list[tuple[int, float, int]]:
        """Feed one vector step; returns (env index, return, length) of each episode that just ended."""
        live = ~self.resetting
        self.returns[live] += reward[live]
        self.lengths[live] += 1
        done = (terminated | truncated) & live
        ended = [(int(i), float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(done)]
        self.returns[done] = 0.0
        self.lengths[done] = 0
        if not self.same_step:
            self.resetting = done
        return ended

    def state_dict(self) -> dict[str, Any]:
        return {"returns": self.returns.tolist(), "lengths": self.lengths.tolist(),
                "resetting": self.resetting.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns = np.array(state["returns"], np.float64)
        self.lengths = np.array(state["lengths"], np.int64)
        self.resetting = np.array(state["resetting"], bool)


def _chain(env: gym.vector.VectorEnv) -> list[Any]:
    """A sync vector env, then each copy's wrappers down to the env itself."""
    objs: list[Any] = [env]
    for e in env.envs:
        objs.append(e)
        while isinstance(e, gym.Wrapper):
            e = e.env
            objs.append(e)
    return objs


def vector_env_state(env: gym.vector.VectorEnv) -> list[dict[str, Any]] | None:
    """Where a `gym.make_vec` sync vector env stands (each copy's physics, step counters, random generators,
    pending autoresets) as tensors and plain values, which a checkpoint loads with weights_only=True; None
    for envs whose state lives outside Python (AtariVectorEnv's C++ threads, async subprocesses)."""
    if not isinstance(env, gym.vector.SyncVectorEnv):
        return None
    out = []
    for obj in _chain(env):
        fields: dict[str, Any] = {"__type__": type(obj).__name__}
        for k, v in vars(obj).items():
            if isinstance(v, np.random.Generator):
                fields[k] = {"bit_generator": v.bit_generator.state}
            elif isinstance(v, np.ndarray) and v.dtype != object:
                fields[k] = torch.from_numpy(v.copy())
            elif isinstance(v, np.generic):
                fields[k] = v.item()
            elif isinstance(v, (bool, int, float, type(None))):
                fields[k] = v
            elif isinstance(v, list) and v and all(isinstance(x, np.ndarray) for x in v):
                fields[k] = [torch.from_numpy(x.copy()) for x in v]
        out.append(fields)
    return out


def set_vector_env_state(env: gym.vector.VectorEnv, state: list[dict[str, Any]] | None) -> bool:
    """Put `vector_env_state`'s record back; False (nothing changed) when it does not fit this env."""
    objs = _chain(env) if isinstance(env, gym.vector.SyncVectorEnv) else []
    if not state or [type(o).__name__ for o in objs] != [f.get("__type__") for f in state]:
        return False
    for obj, fields in zip(objs, state):
        for k, v in fields.items():
            if k == "__type__":
                continue
            current = getattr(obj, k, None)
            if isinstance(v, dict) and isinstance(current, np.random.Generator):
                current.bit_generator.state = v["bit_generator"]
            elif isinstance(v, torch.Tensor):
                setattr(obj, k, v.numpy().copy())
            elif isinstance(v, list):
                setattr(obj, k, [t.numpy().copy() for t in v])
            else:
                setattr(obj, k, v)
    return True


def evaluate(policy: Callable[[np.ndarray], np.ndarray], env: gym.vector.VectorEnv, episodes: int, seed: int,
             video: bool = False, max_video_frames: int = 10_000) -> tuple[list[float], list[int], np.ndarray | None]:
    """Play `episodes` whole episodes, spread evenly over the env's copies; returns their returns, lengths
    and, with `video`, the frames (T, H, W, 3) uint8 of the first copy's first episode."""
    n = env.num_envs
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    obs, _ = env.reset(seed=seed)
    tracker = EpisodeTracker(n)
    returns: list[float] = []
    lengths: list[int] = []
    frames: list[np.ndarray] = []
    atari = obs.ndim == 4 and obs.dtype == np.uint8
    recording = video
    while len(returns) < episodes:
        if recording and len(frames) < max_video_frames:
            frames.append(_frame(env, obs, atari))
        obs, reward, term, trunc, _ = env.step(policy(obs))
        for i, ret, length in tracker.update(reward, term, trunc):
            if quota[i] > 0:
                quota[i] -= 1
                returns.append(ret)
                lengths.append(length)
            if i == 0:
                recording = False
    if not frames:
        return returns, lengths, None
    clip = np.stack(frames)
    if atari:  # grey 84x84 -> RGB 336x336, once for the whole clip
        clip = np.repeat(np.repeat(clip, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=3)
    return returns, lengths, clip


class Evaluator:
    """The agents' evaluation protocol: `agent.eval_episodes` whole games at `agent.eval_epsilon` in
    `agent.eval_num_envs` envs, seeded apart from training and anew each time, with a video of one."""

    def __init__(self, env_cfg: DictConfig, agent_cfg: DictConfig, seed: int, logger: Any):
        self.env_cfg, self.a, self.seed, self.logger = env_cfg, agent_cfg, seed, logger
        self.env: gym.vector.VectorEnv | None = None
        self.count = 0  # evaluations so far (checkpointed: a resumed run plays new games)

    def __call__(self, policy: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        a = self.a
        if self.env is None:
            k = min(int(a.eval_episodes), int(a.eval_num_envs))
            render = bool(a.video) and not is_atari(str(self.env_cfg.id))
            self.env = make_env(self.env_cfg, k, self.seed + 10_000, render=render)
        self.count += 1
        returns, lengths, frames = evaluate(policy, self.env, int(a.eval_episodes),
                                            seed=self.seed + 10_000 * self.count, video=bool(a.video))
        if frames is not None:
            self.logger.log_video("eval/video", frames, fps=int(a.video_fps))
        return {"episode_return": float(np.mean(returns)), "episode_return_std": float(np.std(returns)),
                "episode_return_min": float(np.min(returns)), "episode_length": float(np.mean(lengths)),
                "episodes": len(returns)}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


def _frame(env: gym.vector.VectorEnv, obs: np.ndarray, atari: bool) -> np.ndarray:
    """What the first copy shows: for Atari, the agent's newest 84x84 grey frame (`evaluate` scales the
    clip x4 to RGB at the end); else `render()`."""
    if atari:
        return obs[0, -1].copy()
    image = env.render()
    image = image[0] if isinstance(image, (tuple, list)) else image
    return np.asarray(image, dtype=np.uint8)
