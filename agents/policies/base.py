"""``BasePolicy``: the method surface of SB3's ``ActorCriticPolicy``.

A subclass that fills ``forward``, ``evaluate_actions``, ``predict_values`` and
``get_distribution`` works inside our algorithms and inside stable_baselines3's PPO and
A2C, which call exactly these methods, plus ``optimizer``, ``set_training_mode``,
``reset_noise``, ``squash_output`` and ``predict``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from agents.distributions import Distribution
from agents.preprocessing import as_tensor, is_vectorized_observation

Schedule = Callable[[float], float]


class BasePolicy(nn.Module):
    """Actor-critic policy base with SB3's interface.

    :param observation_space: observation space of one environment
    :param action_space: action space of one environment
    :param lr_schedule: learning rate as a function of the remaining progress (1 -> 0);
        used for the optimizer's initial learning rate
    :param optimizer_class: optimizer built over ``self.parameters()`` by :meth:`build_optimizer`
    :param optimizer_kwargs: extra keyword arguments for the optimizer
    :param use_sde: accepted for SB3 compatibility; only ``False`` is supported
    :param squash_output: whether actions are tanh-squashed (then unscaled to the bounds)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule | None = None,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
        squash_output: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        if use_sde:
            raise ValueError("use_sde=True (generalized state-dependent exploration) is not supported; pass use_sde=False.")
        self.observation_space = observation_space
        self.action_space = action_space
        self.lr_schedule = lr_schedule
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.squash_output = squash_output
        self.optimizer: torch.optim.Optimizer | None = None

    # --- to be provided by subclasses -------------------------------------------------
    def forward(self, obs: Any, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample actions; return ``(actions, values, log_prob)``, values of shape (batch, 1)."""
        raise NotImplementedError

    def evaluate_actions(self, obs: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(values, log_prob, entropy)`` of ``actions`` under the current policy."""
        raise NotImplementedError

    def predict_values(self, obs: Any) -> torch.Tensor:
        """State values, shape (batch, 1)."""
        raise NotImplementedError

    def get_distribution(self, obs: Any) -> Distribution:
        """The action distribution at ``obs``."""
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------------
    def build_optimizer(self, lr_schedule: Schedule | None = None) -> None:
        """Create ``self.optimizer`` over all parameters at ``lr_schedule(1)``."""
        lr_schedule = lr_schedule or self.lr_schedule
        lr = float(lr_schedule(1.0)) if lr_schedule is not None else 3e-4
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(params, lr=lr, **self.optimizer_kwargs)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _predict(self, observation: Any, deterministic: bool = False) -> torch.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)

    def set_training_mode(self, mode: bool) -> None:
        """Put the module in training (dropout, batch norm) or evaluation mode."""
        self.train(mode)

    def reset_noise(self, n_envs: int = 1) -> None:
        """No state-dependent exploration noise to resample (SB3 calls this with gSDE)."""

    def is_vectorized_observation(self, observation: Any) -> bool:
        return is_vectorized_observation(observation, self.observation_space)

    def obs_to_tensor(self, observation: Any) -> tuple[torch.Tensor | dict[str, torch.Tensor], bool]:
        """numpy observation (single or batched, dict for Dict spaces) -> batched tensor
        on the policy's device, and whether the input was already batched."""
        if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict) and not isinstance(
            self.observation_space, spaces.Dict
        ):
            raise ValueError(
                "predict() got a (obs, info) tuple: pass only the observation, e.g. `obs, info = env.reset(); model.predict(obs)`."
            )
        vectorized = is_vectorized_observation(observation, self.observation_space)
        if isinstance(self.observation_space, spaces.Dict):
            observation = {
                key: np.asarray(observation[key]).reshape((-1, *self.observation_space[key].shape))
                for key in self.observation_space.spaces
            }
        else:
            shape = () if isinstance(self.observation_space, spaces.Discrete) else self.observation_space.shape
            observation = np.asarray(observation).reshape((-1, *shape))
        return as_tensor(observation, self.observation_space, self.device), vectorized

    def scale_action(self, action: np.ndarray) -> np.ndarray:
        low, high = self.action_space.low, self.action_space.high
        return 2.0 * ((action - low) / (high - low)) - 1.0

    def unscale_action(self, scaled_action: np.ndarray) -> np.ndarray:
        low, high = self.action_space.low, self.action_space.high
        return low + 0.5 * (scaled_action + 1.0) * (high - low)

    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Action(s) for ``observation`` as numpy, clipped to Box bounds; ``state`` is
        passed through (no recurrent policies here).

        :param observation: one observation or a batch (first axis = env)
        :param state: recurrent state, returned unchanged
        :param episode_start: accepted for SB3 compatibility
        :param deterministic: take the mode of the distribution instead of sampling
        """
        self.set_training_mode(False)
        obs_tensor, vectorized = self.obs_to_tensor(observation)
        with torch.no_grad():
            actions = self._predict(obs_tensor, deterministic=deterministic)
        actions = actions.cpu().numpy().reshape((-1, *self.action_space.shape))
        if isinstance(self.action_space, spaces.Box):
            if self.squash_output:
                actions = self.unscale_action(actions)
            else:
                actions = np.clip(actions, self.action_space.low, self.action_space.high)
        if not vectorized:
            actions = actions.squeeze(axis=0)
        return actions, state

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """The arguments that rebuild this policy (SB3's); subclasses add their own."""
        return dict(
            observation_space=self.observation_space,
            action_space=self.action_space,
            lr_schedule=self.lr_schedule,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
        )
