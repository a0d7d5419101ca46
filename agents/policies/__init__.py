"""Policies and their SB3-style aliases.

``"MlpPolicy"`` and ``"MultiInputPolicy"`` name :class:`ActorCriticPolicy`; ``"LMPolicy"``
names ``LMActorCriticPolicy`` (the language-model actor-critic), which is imported on
first use because it needs transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from agents.policies.base import BasePolicy
from agents.policies.mlp import ActorCriticPolicy, MlpExtractor, MultiInputActorCriticPolicy

# alias -> "module:attribute" (module relative to this package), resolved on demand
POLICY_ALIASES: dict[str, str] = {
    "MlpPolicy": ".mlp:ActorCriticPolicy",
    "MultiInputPolicy": ".mlp:MultiInputActorCriticPolicy",
    "LMPolicy": ".lm:LMActorCriticPolicy",
}

_LAZY = {"LMActorCriticPolicy": ".lm"}

__all__ = [
    "BasePolicy",
    "ActorCriticPolicy",
    "MultiInputActorCriticPolicy",
    "MlpExtractor",
    "LMActorCriticPolicy",
    "POLICY_ALIASES",
    "get_policy_class",
]


def get_policy_class(policy: str | type[BasePolicy]) -> type[BasePolicy]:
    """Resolve ``"MlpPolicy"``-style aliases to a class; classes pass through.

    :param policy: an alias from :data:`POLICY_ALIASES` or a ``BasePolicy`` subclass
    """
    if isinstance(policy, str):
        if policy not in POLICY_ALIASES:
            raise ValueError(f"unknown policy {policy!r}: use one of {sorted(POLICY_ALIASES)} or a policy class.")
        module_name, attr = POLICY_ALIASES[policy].split(":")
        return getattr(importlib.import_module(module_name, __name__), attr)
    if isinstance(policy, type) and issubclass(policy, BasePolicy):
        return policy
    if isinstance(policy, type) and hasattr(policy, "evaluate_actions"):
        return policy  # an SB3 ActorCriticPolicy subclass has the same surface
    raise ValueError(f"policy must be an alias {sorted(POLICY_ALIASES)} or a policy class, got {policy!r}")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'agents.policies' has no attribute {name!r}")
