"""The replay buffer rebuilds exactly the stacks the envs showed, and n-step targets by the book."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import FrameStackObservation

from agents.envs import EpisodeTracker
from agents.replay import ReplayBuffer
from lab.errors import LabError


class Counter(gym.Env):
    """Frames filled with a running counter (never 0); episodes end by termination or truncation."""

    observation_space = gym.spaces.Box(0, 255, (3, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.limit = 0, int(self.np_random.integers(3, 12))
        self.value = int(self.np_random.integers(1, 200))
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        self.value = self.value % 250 + 1
        terminated = bool(self.np_random.random() < 0.08)
        truncated = not terminated and self.t >= self.limit
        return self._frame(), float(self.np_random.normal()), terminated, truncated, {}

    def _frame(self):
        return np.full((3, 3), self.value, np.uint8)


def drive(env: gym.vector.VectorEnv, buffer: ReplayBuffer, steps: int, seed: int = 0) -> dict[str, list]:
    """Play random actions as agents/dqn.py does, storing into `buffer`; returns what the env showed."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    n = env.num_envs
    tracker, first = EpisodeTracker(n), np.ones(n, bool)
    hist: dict[str, list] = {k: [] for k in ("obs", "reward", "term", "trunc", "real")}
    for _ in range(steps):
        actions = rng.integers(0, env.single_action_space.n, n)
        nxt, reward, term, trunc, _ = env.step(actions)
        real = ~tracker.resetting
        buffer.add(obs, actions, reward, term, trunc, first, real)
        tracker.update(reward, term, trunc)
        for k, v in zip(hist, (obs, reward, term, trunc, real)):
            hist[k].append(np.array(v))
        first, obs = ~real, nxt
    hist["obs"].append(obs)
    return hist


def reference(hist: dict[str, list], t: int, e: int, n: int, gamma: float) -> tuple[float, float, int]:
    """The n-step return, bootstrap discount and next time step, written out plainly."""
    ret = 0.0
    for i in range(n):
        s = t + i
        ret += gamma**i * float(hist["reward"][s][e])
        if hist["term"][s][e]:
            return ret, 0.0, s + 1
        if hist["trunc"][s][e]:
            return ret, gamma ** (i + 1), s + 1
    return ret, gamma**n, t + n


def sampleable(buffer: ReplayBuffer, hist: dict[str, list], n: int) -> list[tuple[int, int]]:
    lo, hi = buffer.sample_range(n)
    return [(t, e) for t in range(lo, hi) for e in range(buffer.num_envs) if hist["real"][t][e]]


def test_stacks_match_frame_stack_observation_across_episode_ends():
    env = gym.vector.SyncVectorEnv([lambda: FrameStackObservation(Counter(), 4, padding_type="zero")] * 3)
    buffer = ReplayBuffer(3 * 60, 3, (4, 3, 3), torch.uint8, stack=4)
    hist = drive(env, buffer, 200)  # the ring wraps more than three times
    pairs = sampleable(buffer, hist, 1)
    assert len(pairs) > 100
    ends = sum(bool(hist["term"][t][e] or hist["trunc"][t][e]) for t, e in pairs)
    assert ends > 10  # episode boundaries are covered
    t, e = (torch.tensor(x) for x in zip(*pairs))
    got = buffer.transitions(t, e, 1, 0.99)
    want_obs = np.stack([hist["obs"][i][j] for i, j in pairs])
    want_next = np.stack([hist["obs"][i + 1][j] for i, j in pairs])
    np.testing.assert_array_equal(got["obs"].numpy(), want_obs)
    np.testing.assert_array_equal(got["next_obs"].numpy(), want_next)
    np.testing.assert_array_equal(got["actions"].numpy() >= 0, True)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_n_step_targets_stop_at_termination_and_bootstrap_after_truncation(n):
    gamma = 0.9
    env = gym.vector.SyncVectorEnv([lambda: FrameStackObservation(Counter(), 4, padding_type="zero")] * 2)
    buffer = ReplayBuffer(2 * 400, 2, (4, 3, 3), torch.uint8, stack=4)
    hist = drive(env, buffer, 300, seed=1)
    pairs = sampleable(buffer, hist, n)
    t, e = (torch.tensor(x) for x in zip(*pairs))
    got = buffer.transitions(t, e, n, gamma)
    kinds = set()
    for k, (i, j) in enumerate(pairs):
        ret, discount, nxt = reference(hist, i, j, n, gamma)
        assert got["returns"][k].item() == pytest.approx(ret, abs=1e-5)
        assert got["discounts"][k].item() == pytest.approx(discount, abs=1e-6)
        np.testing.assert_array_equal(got["next_obs"][k].numpy(), hist["obs"][nxt][j])
        kinds.add("term" if discount == 0 else "trunc" if hist["trunc"][nxt - 1][j] else "full")
    assert kinds == {"term", "trunc", "full"}


def test_sampling_never_returns_autoreset_steps_and_matches_atari_vector_env():
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv("pong", 2, max_num_frames_per_episode=240, reward_clipping=False)
    buffer = ReplayBuffer(2 * 150, 2, (4, 84, 84), torch.uint8, stack=4)
    hist = drive(env, buffer, 200)
    env.close()
    pairs = sampleable(buffer, hist, 1)
    t, e = (torch.tensor(x) for x in zip(*pairs))
    got = buffer.transitions(t, e, 1, 0.99)
    np.testing.assert_array_equal(got["obs"].numpy(), np.stack([hist["obs"][i][j] for i, j in pairs]))
    np.testing.assert_array_equal(got["next_obs"].numpy(), np.stack([hist["obs"][i + 1][j] for i, j in pairs]))
    # Random draws land only on real steps: an autoreset step moves to the first step of the next episode.
    batch = buffer.sample(4096, 1, 0.99, torch.Generator().manual_seed(0))
    firsts = {hist["obs"][i][j].tobytes() for i, j in pairs}
    assert all(o.numpy().tobytes() in firsts for o in batch["obs"][:256])
    # The same with the range as a tensor (agent.cuda_graph): every draw in [lo, hi), and all of it reached.
    lo, hi = buffer.sample_range(1)
    in_range = {hist["obs"][i][j].tobytes() for i, j in pairs if lo <= i < hi}
    graphed = buffer.sample(4096, 1, 0.99, torch.Generator().manual_seed(0), bounds=torch.tensor([lo, hi]))
    seen = {o.numpy().tobytes() for o in graphed["obs"]}
    assert seen <= in_range and len(seen) > 0.9 * len(in_range)


def test_vector_observations_and_errors():
    env = gym.make_vec("CartPole-v1", num_envs=2)
    buffer = ReplayBuffer(100, 2, (4,), torch.float32, stack=1)
    hist = drive(env, buffer, 80)
    pairs = sampleable(buffer, hist, 1)
    t, e = (torch.tensor(x) for x in zip(*pairs))
    got = buffer.transitions(t, e, 1, 0.99)
    np.testing.assert_allclose(got["obs"].numpy(), np.stack([hist["obs"][i][j] for i, j in pairs]))
    with pytest.raises(LabError, match="smaller than agent.num_envs"):
        ReplayBuffer(1, 2, (4,), torch.float32, stack=1)
    with pytest.raises(LabError, match="too few"):
        ReplayBuffer(100, 2, (4,), torch.float32, stack=1).sample(4, 1, 0.99)


def test_state_round_trip_and_cut():
    env = gym.vector.SyncVectorEnv([lambda: FrameStackObservation(Counter(), 4, padding_type="zero")] * 2)
    buffer = ReplayBuffer(2 * 50, 2, (4, 3, 3), torch.uint8, stack=4)
    drive(env, buffer, 40)
    copy = ReplayBuffer(2 * 50, 2, (4, 3, 3), torch.uint8, stack=4)
    copy.load_state_dict(buffer.state_dict())
    assert copy.written == buffer.written and torch.equal(copy.frames, buffer.frames)
    copy.cut()
    last, before = (copy.written - 1) % copy.slots, (copy.written - 2) % copy.slots
    assert not copy.real[last].any() and copy.truncated[before].all()
    with pytest.raises(LabError, match="same agent.buffer_size"):
        ReplayBuffer(2 * 60, 2, (4, 3, 3), torch.uint8, stack=4).load_state_dict(buffer.state_dict())


class Late(Counter):
    """Counter after a resume: frames of 255 (Counter never shows it) and rewards of 100."""

    def step(self, action):
        frame, _, terminated, truncated, info = super().step(action)
        return frame, 100.0, terminated, truncated, info

    def _frame(self):
        return np.full((3, 3), 255, np.uint8)


def test_no_sampled_transition_joins_steps_from_before_and_after_a_cut():
    """Resume with agent.save_replay: the restored steps and the restarted envs' steps never meet in one
    transition, also for an env whose last step before the cut was an autoreset step."""
    n, buffer = 8, None
    for steps in range(30, 60):  # the first length at which some env's step before the last one was an autoreset
        buffer = ReplayBuffer(8 * 200, n, (4, 3, 3), torch.uint8, stack=4)
        hist = drive(gym.vector.SyncVectorEnv([lambda: FrameStackObservation(Counter(), 4, padding_type="zero")] * n),
                     buffer, steps)
        if not hist["real"][-2].all():
            break
    assert not hist["real"][-2].all()
    buffer.cut()
    drive(gym.vector.SyncVectorEnv([lambda: FrameStackObservation(Late(), 4, padding_type="zero")] * n), buffer, 30, 1)
    for n_step in (1, 3):
        got = buffer.sample(20_000, n_step, 0.9, torch.Generator().manual_seed(0))
        before = (got["obs"] != 255).flatten(1).all(1)  # starts in the restored steps
        assert before.any() and (~before).any()
        assert (got["next_obs"][before] != 255).all(), "a restored step bootstraps from a restarted env's frames"
        assert (got["returns"][before].abs() < 50).all(), "a restored step sums a restarted env's rewards"


@pytest.mark.parametrize("shape, dtype, stack", [((4, 3, 3), torch.uint8, 4), ((4,), torch.float32, 1)])
def test_packed_and_direct_adds_store_the_same(shape, dtype, stack):
    """add() packs a step into one host-to-device copy for a GPU buffer and copies each field directly
    into a host one: both store the same (the packed path runs here on the CPU too)."""
    rng = np.random.default_rng(0)
    direct, packed = (ReplayBuffer(40, 2, shape, dtype, stack) for _ in range(2))
    packed.pack_steps = True
    assert not direct.pack_steps
    for _ in range(30):  # past the ring's 20 slots
        obs = rng.integers(0, 256, (2, *shape)).astype(np.uint8 if dtype == torch.uint8 else np.float64)
        step = (obs, rng.integers(0, 6, 2), rng.normal(size=2), rng.random(2) < 0.3, rng.random(2) < 0.1,
                rng.random(2) < 0.2, rng.random(2) < 0.9)
        direct.add(*step)
        packed.add(*step)
    for k, v in direct.state_dict().items():
        assert torch.equal(v, packed.state_dict()[k]) if isinstance(v, torch.Tensor) else v == packed.state_dict()[k], k
