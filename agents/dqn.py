"""DQN on pixels or vectors: Nature-DQN network (optionally dueling), Double DQN, n-step returns,
Huber loss, a target network (hard or Polyak), linear epsilon, replay of frames stored once.

Every hyperparameter is in the experiment's yaml (`agent:`, `env:` and `optimizer:`); conf/experiment/dqn_pong.yaml
is the fast recipe, dqn_pong_nature.yaml the classic one. One trainer step is one iteration:

    for train_frequency / num_envs vector steps:
        act:    epsilon-greedy actions for all envs, sent to them (they step in C++ threads during ...)
        learn:  ... the updates spread over the iteration: sample (obs, a, n-step return, discount, next_obs),
                target = return + discount * Q_target(next_obs, argmax_a Q(next_obs))   # Double DQN
                loss = huber(Q(obs, a), target); optim.step("q", loss)
                (the first update's forward pass also gives the greedy actions of `act`)
        store:  the envs' step in the replay buffer; finished episodes' returns
    every target_update_interval env steps: Q_target <- tau * Q + (1 - tau) * Q_target

With `agent.cuda_graph` each update and each acting forward replay from CUDA graphs instead (the section
at the end); the steps are the same.

The budget is `agent.total_timesteps` env steps summed over the parallel envs; the trainer's
max_steps is derived from it in conf/agent/dqn.yaml.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from agents.envs import EpisodeTracker, Evaluator, is_atari, make_env, set_vector_env_state, vector_env_state
from agents.replay import ReplayBuffer
from lab.config import build
from lab.cuda_graph import GraphedStep
from lab.errors import LabError
from lab.optim import build_scheduler, constant_lr
from lab.task import RunContext, Task


def check_agent_config(a: Any) -> None:
    """The checks of an `agent:` block that the lab's DQN and the SB3 baseline share, one line each."""
    if a.num_envs < 1 or a.train_frequency < a.num_envs or a.train_frequency % a.num_envs:
        raise LabError(f"agent.train_frequency={a.train_frequency} (env steps per iteration) must be a "
                       f"multiple of agent.num_envs={a.num_envs}")
    if a.n_step < 1 or not 0 < a.gamma <= 1 or not 0 < a.tau <= 1 or not list(a.hidden):
        raise LabError("agent.n_step must be >= 1, agent.gamma and agent.tau in (0, 1], agent.hidden non-empty")
    if a.eval_episodes < 1 or a.eval_num_envs < 1:
        raise LabError(f"agent.eval_episodes={a.eval_episodes} and agent.eval_num_envs={a.eval_num_envs} "
                       "must be >= 1 (every run ends with an evaluation)")


class QNetwork(nn.Module):
    """Q-values for every action: the Nature-DQN conv torso for image stacks, an MLP for vectors;
    dueling heads (value + advantage - mean advantage) when asked."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, hidden: list[int], dueling: bool):
        super().__init__()
        self.pixels = len(obs_shape) == 3
        if self.pixels:
            c = obs_shape[0]
            self.torso = nn.Sequential(
                nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
                nn.Flatten(),
            )
            width = self.torso(torch.zeros(1, *obs_shape)).shape[1]
        else:
            layers: list[nn.Module] = []
            width = int(np.prod(obs_shape))
            for h in hidden[:-1]:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            self.torso = nn.Sequential(nn.Flatten(), *layers)
        last = hidden[-1]
        self.advantage = nn.Sequential(nn.Linear(width, last), nn.ReLU(), nn.Linear(last, n_actions))
        self.value = nn.Sequential(nn.Linear(width, last), nn.ReLU(), nn.Linear(last, 1)) if dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.pixels:  # uint8 frames straight to the compute dtype (bf16 under bf16 autocast): one pass, not three
            low = torch.is_autocast_enabled(obs.device.type)
            dtype = torch.get_autocast_dtype(obs.device.type) if low else torch.float32
            x = obs.to(dtype, copy=True).mul_(1 / 255)  # copy: never scale the caller's (float) frames in place
            if self.torso[0].weight.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = obs.float()
        h = self.torso(x)
        adv = self.advantage(h)
        if self.value is None:
            return adv
        return self.value(h) + adv - adv.mean(dim=1, keepdim=True)


class Agent(Task):
    """What every agent task (the lab's DQN, the SB3 baseline) shares: its main metric is the evaluation return,
    its charts run against env steps, it runs in one process, and one trainer step is one iteration of
    `agent.train_frequency` env steps (an endless stream: the budget is trainer.max_steps)."""

    main_metric = "eval/episode_return"
    step_metric = "env_steps"
    main_mode = "max"
    progress_keys = ("loss", "episode_return")
    single_process = "for more throughput raise agent.num_envs"

    def train_data(self) -> Iterator[int]:
        return itertools.count()

    def samples_in(self, batch: Any) -> int:
        return int(self.cfg.agent.train_frequency)  # env steps per iteration: perf/samples_per_sec = env steps/s


class DQN(Agent):

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        # A plain copy of the agent's settings: the loop reads them ~20 times an iteration, and each
        # DictConfig read cost about 50 us on a GPU machine's CPU (cProfile of dqn_pong on an H200 host).
        a = self.a = SimpleNamespace(**OmegaConf.to_container(cfg.agent, resolve=True))
        check_agent_config(a)
        self.graphed = bool(a.cuda_graph)
        if self.graphed and ctx.compile:
            raise LabError("agent.cuda_graph=true and trainer.compile=true: choose one (set trainer.compile=false)")
        if self.graphed and ctx.precision != "32":
            raise LabError(f"agent.cuda_graph=true needs trainer.precision=32 (it is {ctx.precision}): "
                           "autocast's weight cache cannot be captured")
        if self.graphed and not constant_lr(cfg.get("scheduler")):
            raise LabError("agent.cuda_graph=true replays the Adam step with a fixed learning rate: drop the "
                           "schedule (scheduler.name=none) or set agent.cuda_graph=false")
        self.learning_run = ctx.mode == "train"  # mode=eval builds no envs or buffer
        probe = make_env(cfg.env, 1, ctx.seed)
        self.atari = is_atari(str(cfg.env.id))
        self.frameskip = int(cfg.env.frameskip) if self.atari else 1
        obs_space, self.n_actions = probe.single_observation_space, int(probe.single_action_space.n)
        probe.close()
        if not isinstance(obs_space, gym.spaces.Box):
            raise LabError(f"env.id={cfg.env.id}: DQN needs Box observations, got {obs_space}")
        self.q = QNetwork(obs_space.shape, self.n_actions, list(a.hidden), bool(a.dueling))
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.rng = np.random.default_rng(ctx.seed)
        self.env_steps = 0
        self.updates = 0
        self.evaluator = Evaluator(cfg.env, cfg.agent, ctx.seed, ctx.logger)
        self.act_graphs: dict[tuple[int, ...], tuple[torch.Tensor, GraphedStep]] = {}  # agent.cuda_graph
        if not self.learning_run:
            return
        self.env = make_env(cfg.env, a.num_envs, ctx.seed)
        self.start_episodes(ctx.seed)
        device = ctx.device if a.buffer_device == "auto" else torch.device(a.buffer_device)
        dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
        stack = obs_space.shape[0] if self.atari else 1
        fewest = ReplayBuffer.min_slots(a.n_step, stack) * a.num_envs
        if a.buffer_size < fewest:
            raise LabError(f"agent.buffer_size={a.buffer_size} is too small to sample from with agent.n_step="
                           f"{a.n_step} and agent.num_envs={a.num_envs}: raise it to at least {fewest}")
        self.buffer = ReplayBuffer(a.buffer_size, a.num_envs, obs_space.shape, dtype, stack, device)
        self.generator = torch.Generator(device=device).manual_seed(ctx.seed)
        self.refill_from = 0  # buffer.written when learning may (re)start: a resume without replay refills it
        if self.graphed:  # static inputs of the graphs: filled in place before each replay
            if device != ctx.device:
                raise LabError("agent.cuda_graph=true needs the replay buffer on the training device: "
                               f"set agent.buffer_device=auto (it is {a.buffer_device})")
            if ctx.device.type != "cuda":
                print(f"[lab] agent.cuda_graph=true on {ctx.device}: no CUDA graphs there, the same steps run "
                      "eagerly", flush=True)
            self.bounds = torch.zeros(2, dtype=torch.long, device=device)  # the buffer's sample_range
            self.graph_update: GraphedStep | None = None  # captured at the first update (it needs `optim`)

    def start_episodes(self, seed: int) -> None:
        """Reset the training envs with `seed`: every env starts a new episode."""
        self.obs, info = self.env.reset(seed=seed)
        self.lives = info.get("lives")
        self.first = np.ones(self.a.num_envs, bool)  # the observation starts an episode
        self.tracker = EpisodeTracker(self.a.num_envs)

    # ---- trainer contract -------------------------------------------------------------------------
    def optimizers(self, total_steps: int | None) -> dict[str, Any]:
        """`optimizer:` (Adam in every recipe), fused into one kernel where torch has one; with agent.cuda_graph
        `capturable`, so that its step count lives on the GPU, inside the graph. `scheduler:` spans the updates."""
        device = next(self.q.parameters()).device
        fast: dict[str, Any] = {}
        if str(self.cfg.optimizer.get("_target_")) in ("torch.optim.Adam", "torch.optim.AdamW"):
            fast = {"fused": device.type in ("cuda", "cpu"), "capturable": self.graphed and device.type == "cuda"}
        elif self.graphed:
            raise LabError(f"agent.cuda_graph=true needs Adam (optimizer=adam), not {self.cfg.optimizer._target_}")
        opt = build(self.cfg.optimizer, "optimizer", self.q.parameters(), **fast)
        return {"q": (opt, build_scheduler(self.cfg.get("scheduler"), opt, self.total_updates()))}

    def total_updates(self) -> int:
        """Updates in the whole run: `scheduler:` (e.g. linear decay) spans them, learning_starts to the end."""
        a = self.a
        iterations = -(-a.total_timesteps // a.train_frequency)
        idle = -(-a.learning_starts // a.train_frequency)  # iterations before env_steps reaches learning_starts
        return max(1, (iterations - idle) * a.gradient_steps)

    def progress(self) -> dict[str, float]:
        return {"env_steps": self.env_steps, "frames": self.env_steps * self.frameskip}

    def epsilon(self) -> float:
        a = self.a
        span = max(1.0, a.exploration_fraction * a.total_timesteps)
        return a.epsilon_end + (a.epsilon_start - a.epsilon_end) * max(0.0, 1.0 - self.env_steps / span)

    def training_step(self, batch: Any, optim: Any) -> dict[str, Any]:
        """One iteration: for each vector step act, learn (its share of the updates), store; then the target."""
        a = self.a
        vector_steps = a.train_frequency // a.num_envs
        updates = a.gradient_steps if self.learning() else 0
        eps = self.epsilon()
        losses: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        episodes: list[tuple[float, int]] = []
        for i in range(vector_steps):
            k = updates * (i + 1) // vector_steps - updates * i // vector_steps  # updates during this vector step
            actions, first = self.act_and_send(eps, learn=k > 0)
            for loss, q in self.learn(k, optim, first):  # while AtariVectorEnv steps in its C++ threads
                losses.append(loss.detach())
                qs.append(q)
            episodes += self.store(actions)
        if updates:
            self.update_target()
        out: dict[str, Any] = {"epsilon": eps}
        if losses:
            out["loss"] = torch.stack(losses).mean()
            out["q_mean"] = torch.stack(qs).mean()
        if episodes:  # logged as a mean over the episodes
            out["episode_return"], out["episode_length"] = [r for r, _ in episodes], [n for _, n in episodes]
        return out

    def learning(self) -> bool:
        """Whether this iteration updates: past learning_starts, and (after a resume without the replay buffer)
        refilled with as many transitions."""
        a = self.a
        refilled = (self.buffer.written - self.refill_from) * a.num_envs >= min(a.learning_starts, a.buffer_size)
        return self.env_steps >= a.learning_starts and refilled and self.buffer.can_sample(a.n_step)

    def act_and_send(self, eps: float, learn: bool) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor] | None]:
        """Epsilon-greedy actions for every env, sent to the envs. With `learn` (eager), the first update's
        (loss, mean Q) come from the same forward pass that gives the greedy actions."""
        explore, actions = self.explore(self.a.num_envs, eps)
        act_obs = None if explore.all() else self.obs
        first = None
        if learn and not self.graphed:
            loss, q, greedy = self.td_loss(act_obs)
            first = (loss, q)
        else:
            greedy = None if act_obs is None else self.greedy(act_obs)
        if greedy is not None:
            actions = np.where(explore, actions, greedy)
        self._send(actions)
        return actions, first

    def learn(self, k: int, optim: Any, first: tuple[torch.Tensor, torch.Tensor] | None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """k updates, each yielding (loss, mean Q); the first eager one uses the loss `act_and_send` computed."""
        for j in range(k):
            if self.graphed:  # sampling, TD loss, backward and Adam: one launch
                loss, q = self.graphed_update(optim)
            else:
                loss, q = first if j == 0 and first is not None else self.td_loss()[:2]
                optim.step("q", loss)
            self.updates += 1
            yield loss, q

    def store(self, actions: np.ndarray) -> list[tuple[float, int]]:
        """Receive the envs' step and store it; (return, length) of each game that ended."""
        a = self.a
        obs, reward, term, trunc, info = self._recv(actions)
        real = ~self.tracker.resetting
        learn_term = term.copy()
        lives = info.get("lives")
        if a.terminal_on_life_loss and lives is not None and self.lives is not None:
            learn_term |= (lives < self.lives) & real
        self.lives = lives
        learn_reward = np.sign(reward) if a.clip_rewards else reward
        self.buffer.add(self.obs, actions, learn_reward, learn_term, trunc, self.first, real)
        ended = [(ret, length) for _, ret, length in self.tracker.update(reward, term, trunc)]
        self.first = ~real  # after an autoreset step the observation starts an episode
        self.obs = obs
        self.env_steps += a.num_envs
        return ended

    def update_target(self) -> None:
        """Every target_update_interval env steps: target <- tau * online + (1 - tau) * target."""
        a = self.a
        interval = a.target_update_interval
        crossed = self.env_steps // interval - (self.env_steps - a.train_frequency) // interval
        if crossed:  # k Polyak steps at once (interval < train_frequency): 1 - (1 - tau)^k of the way
            with torch.no_grad():
                torch._foreach_lerp_(list(self.q_target.parameters()), list(self.q.parameters()),
                                     1 - (1 - a.tau) ** crossed)

    def evaluate(self) -> dict[str, float]:
        # Its own random draws, one stream per evaluation: evaluating (how often, how long) never moves training's.
        rng = np.random.default_rng([self.ctx.seed, self.evaluator.count + 1])
        return self.evaluator(lambda obs: self.act(obs, float(self.a.eval_epsilon), rng))

    # ---- acting and learning ------------------------------------------------------------------------
    def explore(self, n: int, epsilon: float, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Which of n envs explore this step (probability epsilon), and a random action for each env."""
        rng = self.rng if rng is None else rng
        return rng.random(n) < epsilon, rng.integers(0, self.n_actions, n)

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """The greedy actions for a batch of observations (with agent.cuda_graph: replayed from a graph)."""
        if self.graphed:
            return self.graphed_greedy(obs)
        return self._greedy_q(torch.as_tensor(obs, device=next(self.q.parameters()).device)).cpu().numpy()

    def act(self, obs: np.ndarray, epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
        """Epsilon-greedy actions for a batch of observations (no forward pass when all are random)."""
        explore, actions = self.explore(obs.shape[0], epsilon, rng)
        return actions if explore.all() else np.where(explore, actions, self.greedy(obs))

    def td_loss(self, act_obs: np.ndarray | None = None, bounds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """The TD loss on a sampled batch, its mean Q, and the greedy actions for `act_obs` (current
        observations appended to the batch's forward pass; their rows carry no loss). `bounds`: the
        buffer's sample range as a device tensor (inside a CUDA graph, which draws from the default
        CUDA generator: capture supports it, seeded by `seed`)."""
        a = self.a
        device = next(self.q.parameters()).device
        generator = None if bounds is not None and device.type == "cuda" else self.generator
        b = {k: v.to(device, non_blocking=True) for k, v in
             self.buffer.sample(a.batch_size, a.n_step, a.gamma, generator, bounds).items()}
        with torch.no_grad():
            next_q = self.q_target(b["next_obs"]).float()
            if a.double:
                next_a = self.q(b["next_obs"]).argmax(1, keepdim=True)
                next_v = next_q.gather(1, next_a).squeeze(1)
            else:
                next_v = next_q.max(1).values
            target = b["returns"] + b["discounts"] * next_v
        obs = b["obs"] if act_obs is None else torch.cat([b["obs"], torch.as_tensor(act_obs, device=device)])
        q_all = self.q(obs).float()
        greedy = None if act_obs is None else q_all[a.batch_size:].detach().argmax(1).cpu().numpy()
        q = q_all[: a.batch_size].gather(1, b["actions"][:, None]).squeeze(1)
        loss = F.smooth_l1_loss(q, target) if a.loss == "huber" else F.mse_loss(q, target)
        return loss, q.detach().mean(), greedy

    # ---- agent.cuda_graph: the update and the acting forward replayed as CUDA graphs -------------------
    GRAPH_FIX = "run with agent.cuda_graph=false (the same steps, eagerly)"

    def graphed_update(self, optim: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One update (sample, TD loss, backward, Adam step) replayed from its graph; (loss, mean Q)."""
        first = self.graph_update is None
        if first:
            self.graph_update = GraphedStep(lambda: self._update_step(optim), self.bounds.device, what="the DQN update",
                                            fix=self.GRAPH_FIX)
        lo, hi = self.buffer.sample_range(self.a.n_step)
        self.bounds[0].fill_(lo)
        self.bounds[1].fill_(hi)
        loss, q = self.graph_update()
        if first:  # the capture's warm-up runs were updates too (Adam steps on new samples): count them
            self.updates += self.graph_update.warmup_runs
        return loss.clone(), q.clone()  # the next replay rewrites the graph's outputs

    def _update_step(self, optim: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss, q, _ = self.td_loss(bounds=self.bounds)
        optim.step("q", loss)
        return loss.detach(), q

    def graphed_greedy(self, obs: np.ndarray) -> np.ndarray:
        """The acting forward replayed from a graph: one per batch shape (training's envs, evaluation's)."""
        shape = tuple(obs.shape)
        if shape not in self.act_graphs:
            device = next(self.q.parameters()).device
            static_in = torch.as_tensor(obs, device=device).clone()  # the graph's input, filled before each replay
            self.act_graphs[shape] = (static_in, GraphedStep(lambda: self._greedy_q(static_in), device,
                                                             what="the acting forward", fix=self.GRAPH_FIX))
        static_in, step = self.act_graphs[shape]
        static_in.copy_(torch.as_tensor(obs))
        return step().cpu().numpy()

    @torch.no_grad()
    def _greedy_q(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(obs).argmax(1)

    def _send(self, actions: np.ndarray) -> None:
        if hasattr(self.env, "send"):  # AtariVectorEnv: the C++ threads step while we learn
            self.env.send(actions)

    def _recv(self, actions: np.ndarray) -> tuple[Any, ...]:
        return self.env.recv() if hasattr(self.env, "recv") else self.env.step(actions)

    # ---- checkpoint -----------------------------------------------------------------------------------
    def snapshot_state(self) -> dict[str, Any]:
        """best.pt: the weights and counters, without the replay buffer (no run resumes from best.pt)."""
        self._without_replay = True
        try:
            return self.state_dict()
        finally:
            self._without_replay = False

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"env_steps": self.env_steps, "updates": self.updates,
                                 "evaluations": self.evaluator.count, "rng": self.rng.bit_generator.state}
        if self.learning_run:
            state["replay_generator"] = self.generator.get_state()  # which transitions the updates draw
        if self.learning_run and self.a.save_replay and not getattr(self, "_without_replay", False):
            state["buffer"] = self.buffer.state_dict()
            envs = vector_env_state(self.env)  # gym.make_vec envs: a resume continues their episodes exactly
            if envs is not None:
                state["envs"] = {"vector": envs, "obs": torch.from_numpy(np.array(self.obs)),
                                 "first": torch.from_numpy(self.first.copy()), "tracker": self.tracker.state_dict(),
                                 "lives": None if self.lives is None else torch.from_numpy(np.array(self.lives))}
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps, self.updates = int(state["env_steps"]), int(state["updates"])
        self.evaluator.count = int(state.get("evaluations", 0))
        self.rng.bit_generator.state = state["rng"]
        if not self.learning_run:
            return
        if "replay_generator" in state:
            self.generator.set_state(state["replay_generator"])
        envs = state.get("envs")
        if "buffer" in state and envs and set_vector_env_state(self.env, envs["vector"]):
            # The replay and the envs where they were: the run goes on as if it had never stopped.
            self.obs, self.first = envs["obs"].numpy().copy(), envs["first"].numpy().copy()
            self.lives = None if envs["lives"] is None else envs["lives"].numpy().copy()
            self.tracker.load_state_dict(envs["tracker"])
            self.buffer.load_state_dict(state["buffer"])
            print(f"[lab] replay buffer restored: {len(self.buffer):,} transitions, and the envs where they were",
                  flush=True)
            return
        # These envs cannot be restored (Atari's run in C++): they restart, on episodes seeded from the restored RNG.
        self.start_episodes(int(self.rng.integers(2**31)))
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
            self.buffer.cut()  # the envs restart: no transition may run from the saved steps into new ones
            print(f"[lab] replay buffer restored: {len(self.buffer):,} transitions", flush=True)
        else:
            self.refill_from = self.buffer.written
            print(f"[lab] the checkpoint has no replay buffer (agent.save_replay=false): refilling "
                  f"{min(self.a.learning_starts, self.a.buffer_size):,} transitions before learning resumes",
                  flush=True)

    def close(self) -> None:
        self.evaluator.close()
        if getattr(self, "env", None) is not None:
            getattr(self, "env", None).close()
