"""stable-baselines3's DQN as a baseline next to the lab's own (agents/dqn.py): the same envs, the same
`agent:` hyperparameters, the same metric names, the same evaluation protocol.

    python -m lab +experiment=sb3_dqn_pong                  # or any DQN experiment with agent=sb3_dqn

SB3 owns the learning (its replay buffer, optimizer, target network, epsilon schedule); the lab owns the run
(budget, logging, evaluation with video, checkpoints). One trainer step is one `model.learn()` call of
`agent.train_frequency` env steps: SB3 collects them, then does `agent.gradient_steps` updates.

How the lab's keys map onto `stable_baselines3.DQN`:

    optimizer.lr               -> learning_rate
    scheduler (name: linear)   -> learning_rate as a function of SB3's progress (over env steps, not updates)
    optimizer.eps, .betas, .weight_decay -> the Adam optimizer's (optimizer_kwargs); SB3 uses Adam only
    buffer_size, learning_starts, batch_size, gamma, tau, gradient_steps,
    target_update_interval, exploration_fraction  -> the same names
    train_frequency            -> train_freq = train_frequency // num_envs (SB3 counts vector steps)
    epsilon_start, epsilon_end -> exploration_initial_eps, exploration_final_eps (over the whole total_timesteps)
    n_step                     -> n_steps (stable-baselines3 >= 2.7)
    hidden                     -> MLP: net_arch; pixels: the NatureCNN's features_dim (hidden[-1])
    trainer.grad_clip          -> max_grad_norm (null: SB3's default, 10)

SB3's DQN has no Double DQN, dueling heads or MSE loss, and trains in float32: those settings are refused, and
so is `trainer.compile` (SB3 calls its Q-networks directly, not the compiled policy module).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from agents.dqn import Agent, check_agent_config
from agents.envs import EpisodeTracker, Evaluator, is_atari, make_env
from lab.errors import LabError
from lab.optim import constant_lr
from lab.task import RunContext

SB3_DEFAULT_MAX_GRAD_NORM = 10.0


def make_same_step_env(cfg: DictConfig, num_envs: int, seed: int) -> gym.vector.VectorEnv:
    """`agents.envs.make_env`'s env, but autoresetting in the *same* step (SB3's convention): the step that
    ends an episode returns the reset observation and puts the last one in `info["final_obs"]`."""
    return make_env(cfg, num_envs, seed, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


class SB3VecEnv(VecEnv):
    """SB3's `VecEnv` over a Gymnasium vector env in same-step autoreset mode.

    At an episode end `step_wait` returns the reset observation, with the last one in
    `infos[i]["terminal_observation"]`, `infos[i]["TimeLimit.truncated"]` for a time limit, and
    `infos[i]["episode"] = {"r": unclipped return, "l": length}` (SB3's Monitor convention). Rewards are
    sign-clipped for learning with `clip_rewards`; with `life_loss_done` a lost life is a `done` for SB3
    (no bootstrapping past it) while the game goes on: the next observation is the game's, not a reset.
    """

    def __init__(self, env: gym.vector.VectorEnv, clip_rewards: bool = False, life_loss_done: bool = False):
        if env.metadata.get("autoreset_mode") != gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError("SB3VecEnv needs a vector env in AutoresetMode.SAME_STEP (see make_same_step_env)")
        self.env = env
        self.clip_rewards, self.life_loss_done = clip_rewards, life_loss_done
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self.tracker = EpisodeTracker(self.num_envs, same_step=True)
        self.lives: np.ndarray | None = None
        self.episodes: list[tuple[float, int]] = []  # (return, length) of games ended since pop_episodes()
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        seed = self._seeds[0]  # VecEnv.seed(s) asks for s, s+1, ...: what an int seed gives every sub-env
        obs, info = self.env.reset(seed=seed)
        self._reset_seeds()
        self.tracker = EpisodeTracker(self.num_envs, same_step=True)
        self.lives = info.get("lives")
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        if hasattr(self.env, "send"):  # AtariVectorEnv: the C++ threads step until step_wait
            self.env.send(self._actions)

    def step_wait(self) -> VecEnvStepReturn:
        if hasattr(self.env, "recv"):
            obs, reward, term, trunc, info = self.env.recv()
        else:
            obs, reward, term, trunc, info = self.env.step(self._actions)
        ended = self.tracker.update(reward, term, trunc)
        dones = term | trunc
        lives = info.get("lives")
        if self.life_loss_done and lives is not None and self.lives is not None:
            dones |= lives < self.lives  # after a game's reset lives only go up
        self.lives = lives
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i, ret, length in ended:
            infos[i]["terminal_observation"] = info["final_obs"][i]
            infos[i]["TimeLimit.truncated"] = bool(trunc[i] and not term[i])
            infos[i]["episode"] = {"r": ret, "l": length}
            self.episodes.append((ret, length))
        learn_reward = np.sign(reward) if self.clip_rewards else reward
        return obs, learn_reward.astype(np.float32), dones, infos

    def pop_episodes(self) -> list[tuple[float, int]]:
        """The (unclipped return, length) of each game that ended since the last call."""
        out, self.episodes = self.episodes, []
        return out

    def close(self) -> None:
        self.env.close()

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.env, attr_name)] * len(self._indices(indices))  # the sub-envs are alike

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise NotImplementedError("SB3VecEnv's sub-envs live inside one vector env: no per-env attributes")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        raise NotImplementedError("SB3VecEnv's sub-envs live inside one vector env: no per-env methods")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._indices(indices))


class _Chunks(BaseCallback):
    """Lets `learn()` run in chunks: keeps epsilon on the run's whole budget (SB3 would span each call) and
    collects the loss of every `train()` in a chunk."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget
        self.losses: list[float] = []
        self._updates = 0

    def _on_training_start(self) -> None:
        self.model._total_timesteps = self.budget  # what _current_progress_remaining (epsilon) is measured on
        self._updates = self.model._n_updates

    def _on_rollout_start(self) -> None:  # right after the previous rollout's train()
        self._take_loss()

    def _on_training_end(self) -> None:
        self._take_loss()

    def _on_step(self) -> bool:
        return True

    def _take_loss(self) -> None:
        if self.model._n_updates != self._updates:
            self._updates = self.model._n_updates
            self.losses.append(float(self.logger.name_to_value["train/loss"]))


def check_config(cfg: DictConfig) -> None:
    """Refuse what SB3's DQN (or this baseline) cannot do, with one line each."""
    a = cfg.agent
    for key, what in (("double", "Double DQN"), ("dueling", "dueling heads")):
        if a.get(key):
            raise LabError(f"agent.{key}=true: stable-baselines3's DQN has no {what}; set agent.{key}=false "
                           "or use the lab's DQN (agent=dqn)")
    if str(a.get("loss", "huber")) != "huber":
        raise LabError(f"agent.loss={a.loss}: stable-baselines3's DQN uses the Huber loss only; set agent.loss=huber")
    if a.get("save_replay"):
        raise LabError("agent.save_replay=true: the SB3 baseline does not checkpoint its replay buffer; "
                       "set agent.save_replay=false (a resume refills it)")
    if a.get("cuda_graph"):
        raise LabError("agent.cuda_graph=true: the SB3 baseline runs SB3's own update; set agent.cuda_graph=false")
    if str(a.get("buffer_device", "auto")) not in ("auto", "cpu"):
        raise LabError(f"agent.buffer_device={a.buffer_device}: SB3 keeps its replay buffer in host memory; "
                       "use auto or cpu")
    check_agent_config(a)
    if a.n_step > 1 and "n_steps" not in inspect.signature(DQN).parameters:
        raise LabError(f"agent.n_step={a.n_step}: n-step returns need stable-baselines3 >= 2.7; upgrade it or set "
                       "agent.n_step=1")
    target = str(cfg.optimizer.get("_target_"))
    if target != "torch.optim.Adam":
        raise LabError(f"optimizer._target_={target}: stable-baselines3's DQN trains with Adam; use optimizer=adam")


def learning_rate(cfg: DictConfig) -> Any:
    """`optimizer.lr`, or with `scheduler.name=linear` SB3's schedule of it: a function of the progress remaining
    (1 at the start, 0 at total_timesteps) from optimizer.lr down to end_factor times it."""
    lr = float(cfg.optimizer.lr)
    sched = cfg.get("scheduler") or {}
    if constant_lr(sched):
        return lr
    name = str(sched.get("name"))
    if name != "linear":
        raise LabError(f"scheduler.name={name}: the SB3 baseline has only the linear schedule; use "
                       "scheduler.name=linear or none")
    end = float(sched.get("end_factor", 0.0))
    return lambda progress_remaining: lr * (end + (1.0 - end) * progress_remaining)


def adam_kwargs(opt: DictConfig) -> dict[str, Any]:
    """The `optimizer:` block's Adam settings besides the learning rate, as SB3's `optimizer_kwargs`."""
    kwargs = {k: v for k, v in OmegaConf.to_container(opt, resolve=True).items() if k not in ("_target_", "lr")}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return kwargs


def check_replay_memory(buffer_size: int, obs_space: gym.spaces.Space, total_bytes: int | None = None) -> int:
    """Bytes of SB3's replay buffer, which stores obs and next_obs (allocated lazily: a buffer larger than the
    machine's memory would fail only once it fills, hours into a run); refuses one that cannot fit."""
    need = 2 * buffer_size * int(np.prod(obs_space.shape)) * np.dtype(obs_space.dtype).itemsize
    if total_bytes is None:
        try:
            total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no check
            return need
    if need > total_bytes:
        raise LabError(f"agent.buffer_size={buffer_size:,}: SB3's replay buffer stores obs and next_obs, "
                       f"{need / 1e9:.1f} GB, more than this machine's {total_bytes / 1e9:.1f} GB; lower "
                       f"agent.buffer_size (RL Zoo uses 100_000 for Atari)")
    return need


class SB3DQN(Agent):
    """stable-baselines3's DQN trained and evaluated by the lab (see the module docstring)."""

    fp32_only = "as stable-baselines3 does"

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        check_config(cfg)
        if ctx.compile:
            raise LabError("trainer.compile=true: SB3 calls its Q-networks directly, so nothing would be compiled; "
                           "set trainer.compile=false")
        a = self.a = cfg.agent
        self.train_mode = ctx.mode == "train"
        # mode=eval builds the model only to load weights into: one env, no replay memory.
        n = int(a.num_envs) if self.train_mode else 1
        self.env = SB3VecEnv(make_same_step_env(cfg.env, n, ctx.seed), clip_rewards=bool(a.clip_rewards),
                             life_loss_done=bool(a.terminal_on_life_loss))
        self.atari = is_atari(str(cfg.env.id))
        self.frameskip = int(cfg.env.frameskip) if self.atari else 1
        if self.train_mode:
            check_replay_memory(int(a.buffer_size), self.env.observation_space)
        pixels = len(self.env.observation_space.shape) == 3
        hidden = [int(h) for h in a.hidden]
        policy_kwargs: dict[str, Any] = {"optimizer_kwargs": adam_kwargs(cfg.optimizer)}
        if pixels:  # NatureCNN: conv torso + Linear(features_dim) + ReLU, then Linear(n_actions): the lab's net
            policy_kwargs.update(net_arch=[], features_extractor_kwargs={"features_dim": hidden[-1]})
        else:
            policy_kwargs["net_arch"] = hidden
        grad_clip = ctx.grad_clip
        self.model = DQN(
            "CnnPolicy" if pixels else "MlpPolicy", self.env,
            learning_rate=learning_rate(cfg), buffer_size=int(a.buffer_size) if self.train_mode else n,
            learning_starts=int(a.learning_starts), batch_size=int(a.batch_size), tau=float(a.tau),
            gamma=float(a.gamma), train_freq=int(a.train_frequency) // n, gradient_steps=int(a.gradient_steps),
            optimize_memory_usage=False, target_update_interval=int(a.target_update_interval),
            exploration_fraction=float(a.exploration_fraction), exploration_initial_eps=float(a.epsilon_start),
            exploration_final_eps=float(a.epsilon_end),
            max_grad_norm=float(grad_clip) if grad_clip else SB3_DEFAULT_MAX_GRAD_NORM,
            tensorboard_log=None, policy_kwargs=policy_kwargs, verbose=0, seed=ctx.seed, device=ctx.device,
            **({"n_steps": int(a.n_step)} if a.n_step > 1 else {}),
        )
        self.model.set_logger(Logger(folder=None, output_formats=[]))  # in memory: no stdout, no log dir
        self.policy = self.model.policy  # a child module: its q_net and q_net_target go into checkpoints
        self.chunks = _Chunks(int(a.total_timesteps))
        self.rng = np.random.default_rng(ctx.seed)
        self.evaluator = Evaluator(cfg.env, cfg.agent, ctx.seed, ctx.logger)
        self.refill_until = 0  # after a resume (no replay saved): env steps before updates start again

    # ---- trainer contract -------------------------------------------------------------------------
    def optimizers(self, total_steps: int | None) -> dict[str, Any]:
        return {}  # SB3 owns its optimizer; its state is in get_extra_state

    def progress(self) -> dict[str, float]:
        return {"env_steps": self.model.num_timesteps, "frames": self.model.num_timesteps * self.frameskip}

    def training_step(self, batch: Any, optim: Any) -> dict[str, Any]:
        m, a = self.model, self.a
        m.gradient_steps = 0 if m.num_timesteps < self.refill_until else int(a.gradient_steps)
        m.learn(total_timesteps=int(a.train_frequency), callback=self.chunks, log_interval=None,
                reset_num_timesteps=False)
        out: dict[str, Any] = {"epsilon": m.exploration_rate}
        if self.chunks.losses:
            out["loss"] = float(np.mean(self.chunks.losses))
            self.chunks.losses.clear()
        episodes = self.env.pop_episodes()
        if episodes:
            out["episode_return"] = [float(r) for r, _ in episodes]  # logged as a mean over episodes
            out["episode_length"] = [float(n) for _, n in episodes]
        return out

    def evaluate(self) -> dict[str, float]:
        """agents/dqn.py's protocol: `eval_episodes` whole games at `eval_epsilon`, on a separately seeded env."""
        return self.evaluator(lambda obs: self.act(obs, float(self.a.eval_epsilon)))

    @torch.no_grad()
    def act(self, obs: np.ndarray, epsilon: float) -> np.ndarray:
        """Epsilon-greedy actions from SB3's Q-network (which scales uint8 images to [0, 1] itself)."""
        n = obs.shape[0]
        explore = self.rng.random(n) < epsilon
        actions = self.rng.integers(0, self.env.action_space.n, n)
        if not explore.all():
            tensor, _ = self.model.policy.obs_to_tensor(obs)
            greedy = self.model.q_net(tensor).argmax(1).cpu().numpy()
            actions = np.where(explore, actions, greedy)
        return actions

    # ---- checkpoint ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        m = self.model
        return {"num_timesteps": int(m.num_timesteps), "n_updates": int(m._n_updates), "n_calls": int(m._n_calls),
                "episode_num": int(m._episode_num), "exploration_rate": float(m.exploration_rate),
                "progress_remaining": float(m._current_progress_remaining),
                "optimizer": m.policy.optimizer.state_dict(), "evaluations": self.evaluator.count,
                "rng": self.rng.bit_generator.state}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        m = self.model
        m.num_timesteps, m._n_updates, m._n_calls = int(state["num_timesteps"]), int(state["n_updates"]), \
            int(state["n_calls"])
        m._episode_num, m.exploration_rate = int(state["episode_num"]), float(state["exploration_rate"])
        m._current_progress_remaining = float(state["progress_remaining"])
        m.policy.optimizer.load_state_dict(state["optimizer"])
        self.evaluator.count = int(state["evaluations"])
        self.rng.bit_generator.state = state["rng"]
        if self.train_mode:
            refill = min(int(self.a.learning_starts), int(self.a.buffer_size))
            self.refill_until = m.num_timesteps + refill
            print(f"[lab] SB3 baseline: checkpoints hold no replay buffer; refilling {refill:,} transitions "
                  "(epsilon-greedy) before learning resumes", flush=True)

    def close(self) -> None:
        self.evaluator.close()
        if self.env is not None:
            self.env.close()
