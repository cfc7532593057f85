"""Reinforcement learning: the lab's DQN (dqn.py), the stable-baselines3 baseline (sb3_dqn.py), replay, envs."""
