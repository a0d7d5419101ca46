"""Action distributions, one per action space.

Each distribution is built from the raw output of the policy's action head
(``proba_distribution(flat)``) and offers SB3's methods: ``sample``, ``mode``,
``log_prob``, ``entropy``, ``get_actions(deterministic)``. They are written with plain
tensor ops instead of ``torch.distributions`` because argument validation and object
construction cost more than the maths for the small batches of the rollout path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium import spaces
from torch import nn


class Distribution:
    """Common interface; subclasses fill ``proba_distribution`` and the maths."""

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        raise NotImplementedError

    def proba_distribution(self, flat: torch.Tensor) -> "Distribution":
        raise NotImplementedError

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def entropy(self) -> torch.Tensor:
        raise NotImplementedError

    def sample(self) -> torch.Tensor:
        raise NotImplementedError

    def mode(self) -> torch.Tensor:
        raise NotImplementedError

    def get_actions(self, deterministic: bool = False) -> torch.Tensor:
        return self.mode() if deterministic else self.sample()

    def actions_from_params(self, flat: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return self.proba_distribution(flat).get_actions(deterministic)

    def log_prob_from_params(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actions = self.actions_from_params(flat)
        return actions, self.log_prob(actions)


def _sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    # Gumbel-max: one uniform draw and an argmax, no normalisation needed
    u = torch.rand_like(logits).clamp_(min=1e-20)
    return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)


class CategoricalDistribution(Distribution):
    """Categorical over ``action_dim`` choices; actions are int64 of shape (batch,)."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim
        self.logits: torch.Tensor | None = None

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        return nn.Linear(latent_dim, self.action_dim)

    def proba_distribution(self, flat: torch.Tensor) -> "CategoricalDistribution":
        self.logits = torch.log_softmax(flat, dim=-1)
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.logits.exp() * self.logits).sum(-1)

    def sample(self) -> torch.Tensor:
        return _sample_categorical(self.logits)

    def mode(self) -> torch.Tensor:
        return torch.argmax(self.logits, dim=-1)


class MultiCategoricalDistribution(Distribution):
    """Independent categoricals, one per entry of a MultiDiscrete space."""

    def __init__(self, action_dims: list[int]):
        self.action_dims = [int(n) for n in action_dims]
        self.parts: list[torch.Tensor] = []

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        return nn.Linear(latent_dim, sum(self.action_dims))

    def proba_distribution(self, flat: torch.Tensor) -> "MultiCategoricalDistribution":
        self.parts = [torch.log_softmax(p, dim=-1) for p in torch.split(flat, self.action_dims, dim=-1)]
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        actions = actions.long()
        return torch.stack(
            [lp.gather(-1, actions[..., i : i + 1]).squeeze(-1) for i, lp in enumerate(self.parts)], dim=-1
        ).sum(-1)

    def entropy(self) -> torch.Tensor:
        return torch.stack([-(lp.exp() * lp).sum(-1) for lp in self.parts], dim=-1).sum(-1)

    def sample(self) -> torch.Tensor:
        return torch.stack([_sample_categorical(lp) for lp in self.parts], dim=-1)

    def mode(self) -> torch.Tensor:
        return torch.stack([torch.argmax(lp, dim=-1) for lp in self.parts], dim=-1)


class BernoulliDistribution(Distribution):
    """Independent Bernoullis for a MultiBinary space; actions are float 0/1."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim
        self.logits: torch.Tensor | None = None

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        return nn.Linear(latent_dim, self.action_dim)

    def proba_distribution(self, flat: torch.Tensor) -> "BernoulliDistribution":
        self.logits = flat
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        # log sigmoid(l) for a=1, log sigmoid(-l) for a=0
        return -nn.functional.binary_cross_entropy_with_logits(
            self.logits, actions.to(self.logits.dtype), reduction="none"
        ).sum(-1)

    def entropy(self) -> torch.Tensor:
        p = torch.sigmoid(self.logits)
        return nn.functional.binary_cross_entropy_with_logits(self.logits, p, reduction="none").sum(-1)

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits))

    def mode(self) -> torch.Tensor:
        return (self.logits > 0).to(self.logits.dtype)


class DiagGaussianDistribution(Distribution):
    """Diagonal Gaussian with a state-independent, learned log standard deviation
    (SB3's default for Box actions). Actions are clipped to the bounds by the algorithm,
    not here, so log-probabilities stay those of the unclipped sample."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim
        self.mean: torch.Tensor | None = None
        self.log_std: torch.Tensor | None = None

    def proba_distribution_net(self, latent_dim: int, log_std_init: float = 0.0) -> tuple[nn.Module, nn.Parameter]:
        return nn.Linear(latent_dim, self.action_dim), nn.Parameter(torch.full((self.action_dim,), float(log_std_init)))

    def proba_distribution(self, mean: torch.Tensor, log_std: torch.Tensor | None = None) -> "DiagGaussianDistribution":
        self.mean = mean
        self.log_std = log_std.expand_as(mean)
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (self.log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(-1)

    def sample(self) -> torch.Tensor:
        return self.mean + torch.randn_like(self.mean) * self.log_std.exp()

    def mode(self) -> torch.Tensor:
        return self.mean


def make_proba_distribution(action_space: spaces.Space) -> Distribution:
    """The distribution for ``action_space``; an unsupported space is a ``ValueError``."""
    if isinstance(action_space, spaces.Discrete):
        return CategoricalDistribution(int(action_space.n))
    if isinstance(action_space, spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(
                f"Box action space of shape {action_space.shape} is not supported: "
                "flatten it to one dimension (gymnasium.wrappers.FlattenObservation-like action wrapper)."
            )
        return DiagGaussianDistribution(int(action_space.shape[0]))
    if isinstance(action_space, spaces.MultiDiscrete):
        return MultiCategoricalDistribution(list(np.asarray(action_space.nvec).ravel()))
    if isinstance(action_space, spaces.MultiBinary):
        return BernoulliDistribution(int(np.prod(action_space.shape)))
    raise ValueError(
        f"action space {action_space!r} is not supported: use Discrete, Box, MultiDiscrete or MultiBinary."
    )
