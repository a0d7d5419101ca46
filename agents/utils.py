"""Small helpers every agent uses (SB3's ``common/utils``): the device, seeding, means of
episode statistics, the explained variance and the name of the env a model trains on."""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch

from agents import distributed


def get_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else as given."""
    if device == "auto" or device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.local_device(device)  # under torchrun: cuda -> cuda:LOCAL_RANK


def set_random_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def safe_mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def env_name(env: Any) -> str:
    """The registered id of the env behind ``env`` (a ``VecEnvAdapter``, vector env or env),
    else its class name."""
    for candidate in (env, getattr(env, "env", None), getattr(env, "unwrapped", None)):
        spec = getattr(candidate, "spec", None)
        if getattr(spec, "id", None):
            return str(spec.id)
        envs = getattr(candidate, "envs", None)
        if envs and getattr(getattr(envs[0], "spec", None), "id", None):
            return str(envs[0].spec.id)
    inner = getattr(env, "env", env)
    return type(getattr(inner, "unwrapped", inner)).__name__


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    """1 - Var[y_true - y_pred] / Var[y_true] (nan when y_true is constant)."""
    var_y = torch.var(y_true)
    return float("nan") if var_y == 0 else float(1 - torch.var(y_true - y_pred) / var_y)
