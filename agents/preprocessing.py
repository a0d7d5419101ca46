"""Observation helpers: shape checks, numpy -> torch, flattening for MLPs.

Observations keep their space's dtype on the way to the policy (token ids stay
integers); only the MLP's feature extractor turns them into floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch.nn import functional as F

SUPPORTED_OBS = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary, spaces.Dict)


def check_observation_space(space: spaces.Space) -> None:
    """Raise a ``ValueError`` naming ``space`` if no policy here can read it."""
    if isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            if isinstance(sub, spaces.Dict):
                raise ValueError(f"nested Dict observation space (key {key!r}) is not supported: flatten it.")
            check_observation_space(sub)
        return
    if not isinstance(space, SUPPORTED_OBS):
        raise ValueError(
            f"observation space {space!r} is not supported: use Box, Discrete, MultiDiscrete, MultiBinary "
            "or a Dict of those (wrap the env, e.g. with gymnasium.wrappers.FlattenObservation)."
        )


def obs_shape(space: spaces.Space) -> tuple[int, ...]:
    """Shape of one observation as stored (Discrete is a scalar)."""
    if isinstance(space, spaces.Discrete):
        return ()
    return tuple(space.shape)


def flat_dim(space: spaces.Space) -> int:
    """Number of features the MLP sees after :func:`preprocess_obs`."""
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.MultiDiscrete):
        return int(np.sum(space.nvec))
    if isinstance(space, spaces.Dict):
        return sum(flat_dim(s) for s in space.spaces.values())
    return int(np.prod(space.shape))


def preprocess_obs(obs: torch.Tensor | dict[str, torch.Tensor], space: spaces.Space) -> torch.Tensor:
    """Batched observation -> float features of shape (batch, flat_dim(space))."""
    if isinstance(space, spaces.Dict):
        return torch.cat([preprocess_obs(obs[key], sub) for key, sub in space.spaces.items()], dim=1)
    if isinstance(space, spaces.Discrete):
        return F.one_hot((obs.long() - int(space.start)).reshape(-1), int(space.n)).float()
    if isinstance(space, spaces.MultiDiscrete):
        obs = obs.long().reshape(obs.shape[0], -1)
        nvec = np.asarray(space.nvec).ravel()
        return torch.cat([F.one_hot(obs[:, i], int(n)).float() for i, n in enumerate(nvec)], dim=1)
    return obs.reshape(obs.shape[0], -1).float()


def is_vectorized_observation(observation: Any, space: spaces.Space) -> bool:
    """True for a batch of observations, False for a single one; a shape that is
    neither raises a ``ValueError`` that gives the expected shapes."""
    if isinstance(space, spaces.Dict):
        if not isinstance(observation, dict):
            raise ValueError(f"expected a dict observation with keys {list(space.spaces)}, got {type(observation).__name__}")
        missing = set(space.spaces) - set(observation)
        if missing:
            raise ValueError(f"observation is missing the keys {sorted(missing)} of the Dict observation space")
        flags = {key: is_vectorized_observation(observation[key], sub) for key, sub in space.spaces.items()}
        if len(set(flags.values())) > 1:
            raise ValueError(f"Dict observation mixes single and batched entries: {flags}")
        return next(iter(flags.values()))
    observation = np.asarray(observation)
    shape = obs_shape(space)
    if observation.shape == shape:
        return False
    if observation.shape[1:] == shape:
        return True
    name = type(space).__name__
    raise ValueError(
        f"unexpected observation shape {observation.shape} for the {name} observation space: "
        f"use {shape} for one observation or (n_env, {', '.join(map(str, shape))}) for a batch."
    )


def as_tensor(obs: Any, space: spaces.Space, device: torch.device | str) -> torch.Tensor | dict[str, torch.Tensor]:
    """numpy (or nested dict of numpy) -> tensor on ``device`` keeping the dtype."""
    if isinstance(space, spaces.Dict):
        return {key: as_tensor(obs[key], sub, device) for key, sub in space.spaces.items()}
    if isinstance(obs, torch.Tensor):
        return obs.to(device)
    return torch.as_tensor(np.asarray(obs), device=device)
