"""Gymnasium environments of rlhf-env: token generation as an MDP.

The bottom layer: it imports neither ``agents`` nor ``rlhf_env``. The envs are built from
parts (a causal LM module and its tokenizer, a reward callable, a prompt list);
``import rlhf_env`` registers the ids ``TextRLHF-v0`` / ``TextRLHF-tiny-v0``, whose entry
points resolve names (models, rewards, prompt files) into those parts.
"""

from __future__ import annotations

import importlib

# public name -> module (relative to this package) that defines it; imported on first attribute access (torch is slow to import)
_LAZY = {
    "TextRLHFEnv": ".text_env",
    "TextRLHFVectorEnv": ".text_vec_env",
    "SB3VecEnv": ".wrappers",
    "encode_prompt": ".prompt",
    "TEMPLATE_DEFAULT": ".prompt",
    "RewardFunctionError": ".reward_funcs",
    "check_device": ".device",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'envs' has no attribute {name!r}")
