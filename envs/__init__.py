"""Gymnasium environments of rlhf-env: token generation as an MDP."""

from envs.registration import TEXT_ENV_IDS, register_envs

__all__ = ["TEXT_ENV_IDS", "register_envs"]
