"""Tuned hyperparameters in rl-zoo3's YAML format: ``{algo}.yml`` holds one entry per env id.

``load_hyperparams("ppo", "CartPole-v1")`` returns the constructor keyword arguments plus
``n_envs``, ``n_timesteps`` and ``policy``; ``policy_kwargs`` strings such as
``"dict(net_arch=[64, 64], activation_fn=nn.ReLU)"`` become dicts, and so do ``env_kwargs``
strings (the env's constructor arguments, e.g. ``"dict(temperature=0.7)"``; a caller's own
env arguments override them).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def shipped_file(algo: str) -> str:
    """Path of the YAML shipped for ``algo``."""
    return os.path.join(HERE, f"{algo}.yml")


def _eval_kwargs(text: str, where: str, key: str = "policy_kwargs") -> dict[str, Any]:
    from torch import nn

    try:
        value = eval(text, {"__builtins__": {}}, {"dict": dict, "nn": nn, "list": list})  # noqa: S307 (rl-zoo3 format)
    except Exception as exc:
        raise ValueError(f"{where}: cannot read {key} {text!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key} must be a dict, got {text!r}")
    return value


def load_hyperparams(algo: str, env_id: str, path: str | None = None) -> dict[str, Any]:
    """The entry for ``env_id`` in ``path`` (default: the shipped ``{algo}.yml``).

    :raises FileNotFoundError: no such file
    :raises KeyError: the file has no entry for ``env_id`` (the message lists those it has)
    """
    path = path or shipped_file(algo)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no hyperparameter file {path!r}")
    with open(path, encoding="utf-8") as fh:
        try:
            table = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    if env_id not in table:
        raise KeyError(f"{path} has no entry for {env_id!r}; it has {sorted(table)}")
    params = dict(table[env_id] or {})
    for key in ("policy_kwargs", "env_kwargs"):
        if isinstance(params.get(key), str):
            params[key] = _eval_kwargs(params[key], f"{path} [{env_id}]", key)
    unsupported = {"normalize", "frame_stack", "env_wrapper", "use_sde", "sde_sample_freq"} & set(params)
    if unsupported:
        raise ValueError(f"{path} [{env_id}]: {sorted(unsupported)} are not supported by agents; remove them")
    return params
