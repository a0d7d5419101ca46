"""Agents with the Stable-Baselines3 API: ``REINFORCE``, ``A2C``, ``PPO``, ``GRPO``, ``RLOO``.

``from rlhf_env.agents import PPO`` (or the short ``from agents import PPO``: the same
objects) replaces ``from stable_baselines3 import PPO``; the long name works even beside a
user's own ``agents.py`` (see ``rlhf_env._packages``). ``ALGOS`` maps the command line's
``--algo`` names to classes; other modules may add entries.
"""

from __future__ import annotations

from agents.a2c import A2C
from agents.base import BaseAlgorithm
from agents.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from agents.evaluation import evaluate_policy
from agents.grpo import GRPO
from agents.on_policy import OnPolicyAlgorithm
from agents.ppo import PPO
from agents.reinforce import REINFORCE
from agents.rloo import RLOO
from agents.vec_env import make_vec_env

ALGOS: dict[str, type[BaseAlgorithm]] = {"reinforce": REINFORCE, "a2c": A2C, "ppo": PPO, "grpo": GRPO, "rloo": RLOO}

__all__ = [
    "ALGOS",
    "A2C",
    "GRPO",
    "PPO",
    "REINFORCE",
    "RLOO",
    "BaseAlgorithm",
    "OnPolicyAlgorithm",
    "BaseCallback",
    "CallbackList",
    "CheckpointCallback",
    "EvalCallback",
    "StopTrainingOnRewardThreshold",
    "evaluate_policy",
    "make_vec_env",
]
