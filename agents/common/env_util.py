"""``stable_baselines3.common.env_util`` path: ``make_vec_env`` builds a Gymnasium vector
env (the env's native one when registered), which every agent here accepts."""

from agents.vec_env import make_vec_env

__all__ = ["make_vec_env"]
