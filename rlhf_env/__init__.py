"""rlhf-env: RLHF of language models as an ordinary Gymnasium problem.

``import rlhf_env`` registers ``TextRLHF-v0`` and ``TextRLHF-tiny-v0`` with Gymnasium.
The heavy parts (transformers, torch models) are imported lazily, on first use.
"""

from __future__ import annotations

import importlib

from rlhf_env.registration import TEXT_ENV_IDS, register_envs

register_envs()

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access
_LAZY = {
    "load_lm": "rlhf_env.models",
    "SHIPPED_MODELS": "rlhf_env.models",
    "cache_dir": "rlhf_env.models",
    "RewardModel": "rlhf_env.reward_model",
    "train_reward_model": "rlhf_env.reward_trainer",
    "load_preferences": "rlhf_env.data",
    "load_prompts": "rlhf_env.prompts",
    "load_rows": "rlhf_env.prompts",
    "encode_prompt": "rlhf_env.models",
    "train_sft": "rlhf_env.sft",
    "train_dpo": "rlhf_env.dpo",
    "train_expert_iteration": "rlhf_env.expert_iteration",
}

__all__ = ["__version__", "TEXT_ENV_IDS", "register_envs", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_env' has no attribute {name!r}")
