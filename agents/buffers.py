"""Rollout storage and generalised advantage estimation.

The buffer is a set of preallocated (n_steps, n_envs, ...) tensors on the algorithm's
device. Observations keep their space's dtype (token ids stay integers). A ``valid``
mask marks real transitions: with Gymnasium's NEXT_STEP autoreset the step after an
episode end only resets the sub-env, and that row must not be trained on.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from gymnasium import spaces

from agents import distributed
from agents.losses import compute_gae
from agents.preprocessing import obs_shape


class RolloutBufferSamples(NamedTuple):
    observations: torch.Tensor | dict[str, torch.Tensor]
    actions: torch.Tensor
    old_values: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def torch_dtype(space: spaces.Space) -> torch.dtype:
    """The torch dtype that holds ``space``'s samples without loss."""
    if isinstance(space, spaces.Discrete):
        return torch.int64
    return torch.from_numpy(np.zeros((), dtype=space.dtype)).dtype


class RolloutBuffer:
    """On-policy storage for ``buffer_size`` steps of ``n_envs`` environments.

    :param buffer_size: steps per environment (``n_steps``)
    :param observation_space: observation space of one environment (Box, Discrete, ..., Dict)
    :param action_space: action space of one environment
    :param device: where the tensors live
    :param gae_lambda: GAE's lambda
    :param gamma: discount factor
    :param n_envs: number of environments
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "cpu",
        gae_lambda: float = 1.0,
        gamma: float = 0.99,
        n_envs: int = 1,
    ):
        self.buffer_size = buffer_size
        self.observation_space = observation_space
        self.action_space = action_space
        self.device = torch.device(device)
        self.gae_lambda = gae_lambda
        self.gamma = gamma
        self.n_envs = n_envs
        self._allocate()
        self.reset()

    def _obs_storage(self, space: spaces.Space) -> torch.Tensor:
        return torch.zeros((self.buffer_size, self.n_envs, *obs_shape(space)), dtype=torch_dtype(space), device=self.device)

    def reset(self) -> None:
        """Start a new rollout (storage is reused; every row is rewritten by ``add``)."""
        self.pos = 0
        self.full = False
        self.final_values_given = False
        self.final_values.zero_()
        self.valid.fill_(True)
        self._staging["valid"].fill(True)
        self._staged.clear()
        self._pending.clear()
        self._full_batch: RolloutBufferSamples | None = None

    def _allocate(self) -> None:
        shape, device = (self.buffer_size, self.n_envs), self.device
        if isinstance(self.observation_space, spaces.Dict):
            self.observations = {k: self._obs_storage(s) for k, s in self.observation_space.spaces.items()}
        else:
            self.observations = self._obs_storage(self.observation_space)
        act_shape = () if isinstance(self.action_space, spaces.Discrete) else tuple(self.action_space.shape)
        act_dtype = torch.int64 if isinstance(self.action_space, (spaces.Discrete, spaces.MultiDiscrete)) else torch.float32
        self.actions = torch.zeros((*shape, *act_shape), dtype=act_dtype, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        self.log_probs = torch.zeros(shape, device=device)
        self.episode_starts = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.truncated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.final_values = torch.zeros(shape, device=device)
        self.valid = torch.ones(shape, dtype=torch.bool, device=device)
        self.advantages = torch.zeros(shape, device=device)
        self.returns = torch.zeros(shape, device=device)
        # per-step numpy inputs (rewards, flags) are staged here and copied to the device
        # once per rollout: one transfer instead of five small ones per step
        self._staging = {
            "rewards": np.zeros(shape, np.float32),
            "episode_starts": np.zeros(shape, np.float32),
            "terminated": np.zeros(shape, bool),
            "truncated": np.zeros(shape, bool),
            "valid": np.ones(shape, bool),
        }
        self._staged: set[str] = set()
        # (actions, values, log_probs) of the steps added since the last flush, from row _pending_start
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_start = 0

    def add(
        self,
        obs: torch.Tensor | dict[str, torch.Tensor],
        actions: torch.Tensor,
        rewards: torch.Tensor,
        episode_starts: torch.Tensor,
        values: torch.Tensor,
        log_probs: torch.Tensor,
        terminated: torch.Tensor | None = None,
        truncated: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Store one step for all envs (tensors with first axis n_envs).

        ``obs`` None: the observation is already in ``observations[pos]`` (the rollout loop
        writes it there before acting). Actions, values and log-probs are kept as given
        and copied into their tensors in one op each when the rollout ends
        (:meth:`compute_returns_and_advantage`, :meth:`get`)."""
        t = self.pos
        if isinstance(obs, dict):
            for key, value in obs.items():
                self.observations[key][t] = value
        elif obs is not None:
            self.observations[t] = obs
        if not self._pending:
            self._pending_start = t
        self._pending.append((actions, values, log_probs))
        for name, value in (
            ("rewards", rewards),
            ("episode_starts", episode_starts),
            ("terminated", terminated),
            ("truncated", truncated),
            ("valid", True if valid is None else valid),
        ):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                getattr(self, name)[t] = value
            else:  # numpy or a Python scalar: staged, copied in _flush_staging
                self._staging[name][t] = value
                self._staged.add(name)
        self.pos += 1
        self.full = self.pos == self.buffer_size

    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: torch.Tensor | None = None) -> None:
        """Fill ``advantages`` and ``returns`` by :func:`compute_gae`.

        ``dones`` is accepted for SB3 compatibility; the buffer's own ``terminated`` and
        ``truncated`` flags decide bootstrapping."""
        self._flush_staging()
        self._full_batch = None
        self.advantages, self.returns = compute_gae(
            self.rewards,
            self.values,
            self.terminated,
            self.truncated,
            last_values.reshape(-1),
            self.final_values if self.final_values_given else None,
            self.gamma,
            self.gae_lambda,
        )

    def _flush_staging(self) -> None:
        for name in self._staged:
            getattr(self, name).copy_(torch.from_numpy(self._staging[name]))
        self._staged.clear()
        if self._pending:
            start, n = self._pending_start, len(self._pending)
            actions, values, log_probs = zip(*self._pending)
            self._pending.clear()
            rows = slice(start, start + n)
            self.actions[rows] = torch.stack(actions).reshape(self.actions[rows].shape)
            self.values[rows] = torch.stack(values).reshape(n, self.n_envs)
            self.log_probs[rows] = torch.stack(log_probs).reshape(n, self.n_envs)

    def flat_valid_indices(self) -> torch.Tensor:
        return torch.nonzero(self.valid.reshape(-1), as_tuple=True)[0]

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.buffer_size * self.n_envs, *tensor.shape[2:])

    def get(self, batch_size: int | None = None) -> Iterator[RolloutBufferSamples]:
        """Minibatches over the valid transitions in a fresh random order
        (the last one may be smaller)."""
        self._flush_staging()
        if isinstance(self.observations, dict):
            obs = {k: self._flat(v) for k, v in self.observations.items()}
        else:
            obs = self._flat(self.observations)
        flat = [self._flat(x) for x in (self.actions, self.values, self.log_probs, self.advantages, self.returns)]
        n_total = self.buffer_size * self.n_envs
        if batch_size is None or batch_size >= n_total:
            # one minibatch of all valid rows: the order does not change a mean loss, so
            # no shuffle, and the selection is made once per rollout, not once per epoch
            if self._full_batch is None:
                if bool(self.valid.all()):
                    self._full_batch = RolloutBufferSamples(obs, *flat)
                else:
                    idx = self.flat_valid_indices()
                    batch_obs = {k: v[idx] for k, v in obs.items()} if isinstance(obs, dict) else obs[idx]
                    self._full_batch = RolloutBufferSamples(batch_obs, *(x[idx] for x in flat))
            yield self._full_batch
            return
        indices = self.flat_valid_indices()
        indices = indices[torch.randperm(len(indices), device=indices.device)]
        if batch_size is None:
            batch_size = len(indices)
        if distributed.is_distributed():
            # ranks hold different numbers of valid rows but must run the same number of
            # minibatches (each one ends in a gradient all-reduce): split by the full size
            chunks = torch.tensor_split(indices, -(-n_total // batch_size))
        else:
            chunks = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
        for idx in chunks:
            batch_obs = {k: v[idx] for k, v in obs.items()} if isinstance(obs, dict) else obs[idx]
            yield RolloutBufferSamples(batch_obs, *(x[idx] for x in flat))
