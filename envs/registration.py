"""Registration of the text environments with Gymnasium (entry points are strings,
so registering costs nothing until ``gym.make``)."""

from __future__ import annotations

import gymnasium as gym

TEXT_ENV_IDS = ("TextRLHF-v0", "TextRLHF-tiny-v0")


def register_envs() -> None:
    """Register ``TextRLHF-v0`` and ``TextRLHF-tiny-v0`` (idempotent)."""
    registry = gym.envs.registration.registry
    if "TextRLHF-v0" not in registry:
        gym.register(
            id="TextRLHF-v0",
            entry_point="envs.text_env:TextRLHFEnv",
            vector_entry_point="envs.text_vec_env:TextRLHFVectorEnv",
            # the package's trained reward model (built from the shipped preference pairs on
            # first use, then cached); reward_model="sentiment" gives the VADER reward instead
            kwargs={"model": "smollm2-135m", "reward_model": "default"},
        )
    if "TextRLHF-tiny-v0" not in registry:
        gym.register(
            id="TextRLHF-tiny-v0",
            entry_point="envs.text_env:TextRLHFEnv",
            vector_entry_point="envs.text_vec_env:TextRLHFVectorEnv",
            kwargs={"model": "tiny", "reward_model": "tiny"},
        )
