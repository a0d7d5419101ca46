"""Small helpers every agent uses (SB3's ``common/utils``): the device, seeding, means of
episode statistics, the explained variance, the name of the env a model trains on, and the
error for a misspelt keyword argument."""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch

from agents import distributed


def get_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else as given, checked
    (:func:`envs.device.check_device`, through :func:`agents.distributed.local_device`)."""
    return distributed.local_device(device)  # under torchrun: cuda -> cuda:LOCAL_RANK


# TRL's GRPOTrainer/RLOOTrainer names (GRPOConfig) of settings these agents or the text env spell otherwise
TRL_NAMES = {
    "num_generations": "group_size",
    "epsilon": "clip_range",
    "num_iterations": "n_epochs",
    "max_completion_length": "the env's max_new_tokens= (gym.make_vec(..., max_new_tokens=N))",
    "max_prompt_length": "the env's max_prompt_tokens=",
    "temperature": "the env's temperature=",
    "per_device_train_batch_size": "n_envs (completions per rollout: n_envs = rows x group_size)",
}


def unexpected_keyword(owner: str, unexpected: dict[str, Any], known: Iterable[str], hint: str = "",
                       aliases: dict[str, str] | None = None) -> TypeError:
    """The ``TypeError`` for keyword arguments ``owner`` does not take, naming what another
    library's name is called here (``aliases``, e.g. TRL's ``num_generations`` ->
    ``group_size``), else the closest known one (``learning_rat`` -> ``learning_rate``), else
    ``hint`` (where such settings go)."""
    import difflib

    known = sorted({k for k in known if not k.startswith("_") and k not in ("self", "args", "kwargs", "supported_action_spaces")})
    key = sorted(unexpected)[0]
    close = difflib.get_close_matches(key, known, n=1)
    if aliases and key in aliases:
        advice = f"; TRL's {key} is {aliases[key]} here"
    else:
        advice = f"; did you mean {close[0]!r}?" if close else hint
    return TypeError(f"{owner} got an unexpected keyword argument {key!r}{advice} (its arguments: {', '.join(known)})")


def init_parameters(cls: type) -> set[str]:
    """The keyword names the ``__init__`` methods along ``cls``'s MRO accept."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {n for n, p in inspect.signature(init).parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names


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
