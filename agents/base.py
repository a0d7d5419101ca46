"""``BaseAlgorithm``: what every agent shares (SB3's ``base_class``): env wrapping, the
``learn`` set-up, logging, callbacks, seeding and ``predict``; save/load and parameters come
from :class:`agents.save_load.SaveLoadMixin`."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from agents import distributed
from agents.callbacks import BaseCallback, CallbackList, ProgressBarCallback, convert_callback
from agents.guards import check_number
from agents.logger import Logger, configure_logger
from agents.policies import BasePolicy, get_policy_class
from agents.preprocessing import check_observation_space
from agents.save_load import SaveLoadMixin
from agents.schedules import get_schedule_fn
from agents.utils import env_name, get_device, set_random_seed
from agents.vec_env import VecEnvAdapter, wrap_env


class BaseAlgorithm(SaveLoadMixin):
    """Base of all agents.

    :param policy: ``"MlpPolicy"``, ``"MultiInputPolicy"``, ``"LMPolicy"`` or a policy class
    :param env: env id, ``gymnasium.Env``, ``gymnasium.vector.VectorEnv``, SB3 ``VecEnv``, or
        None (only when loading)
    :param learning_rate: number, ``"lin_<x>"`` or a schedule of the remaining progress
    :param policy_kwargs: extra policy arguments (``net_arch``, ``activation_fn``,
        ``ortho_init``, ``optimizer_class``, ``optimizer_kwargs``, ...)
    :param tensorboard_log: directory for TensorBoard runs (None: no TensorBoard)
    :param verbose: 0 quiet, 1 SB3's table every ``log_interval`` iterations
    :param device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``
    :param seed: seed for Python, numpy, torch and the env
    :param n_envs: copies of the env when ``env`` is an id (SB3's ``make_vec_env(n_envs=)``)
    :param env_kwargs: constructor arguments when ``env`` is an id
    """

    policy_aliases: dict[str, Any] = {}
    supported_action_spaces: tuple[type[spaces.Space], ...] = (
        spaces.Box,
        spaces.Discrete,
        spaces.MultiDiscrete,
        spaces.MultiBinary,
    )
    # attributes that are not hyperparameters or counters, so not pickled by save()
    _excluded_save_params = (
        "policy",
        "env",
        "rollout_buffer",
        "_logger",
        "_last_obs",
        "_last_episode_starts",
        "ep_info_buffer",
        "ep_success_buffer",
        "_ep_returns",
        "_ep_lengths",
        "_episode_storage",
        "_last_checkpoint",
        "_text_episodes",
    )
    # what a NaN/inf loss or gradient does: "raise" (NonFiniteError naming the update and
    # the last checkpoint) or "skip" (drop the batch); set model.on_nonfinite to change it
    on_nonfinite: str = "raise"
    _last_checkpoint: str | None = None

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: Any,
        learning_rate: float | str | Any,
        policy_kwargs: dict[str, Any] | None = None,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        n_envs: int = 1,
        env_kwargs: dict[str, Any] | None = None,
        supported_action_spaces: tuple[type[spaces.Space], ...] | None = None,
    ):
        self.policy_class = get_policy_class(policy) if not isinstance(policy, dict) else policy
        distributed.init_distributed(device)  # no-op unless launched by torchrun
        self.device = get_device(device)
        self.verbose = verbose
        self.policy_kwargs = {} if policy_kwargs is None else dict(policy_kwargs)
        self.tensorboard_log = tensorboard_log
        self.learning_rate = learning_rate
        self.seed = seed
        if supported_action_spaces is not None:
            self.supported_action_spaces = supported_action_spaces
        self.num_timesteps = 0
        self._total_timesteps = 0
        self._num_timesteps_at_start = 0
        self._episode_num = 0
        self._n_updates = 0
        self._current_progress_remaining = 1.0
        self._stats_window_size = 100
        self.start_time = 0.0
        self.policy: BasePolicy | None = None
        self._clear_runtime_state()
        self.observation_space: spaces.Space | None = None
        self.action_space: spaces.Space | None = None
        self.n_envs = n_envs
        if env is not None:
            self.env = wrap_env(env, n_envs=n_envs, env_kwargs=env_kwargs)
            self.observation_space = self.env.observation_space
            self.action_space = self.env.action_space
            self.n_envs = self.env.num_envs
            self._check_spaces(self.observation_space, self.action_space, policy if isinstance(policy, str) else None)

    def _check_spaces(self, observation_space: spaces.Space, action_space: spaces.Space, policy_name: str | None = None) -> None:
        if not isinstance(action_space, self.supported_action_spaces):
            names = ", ".join(s.__name__ for s in self.supported_action_spaces)
            raise ValueError(f"{type(self).__name__} does not support the action space {action_space!r}: use {names}.")
        from envs.spaces import TextObservationSpace

        if isinstance(observation_space, TextObservationSpace) and isinstance(self.policy_class, type):
            from agents.policies.lm import LMActorCriticPolicy

            if not issubclass(self.policy_class, LMActorCriticPolicy):
                raise ValueError(
                    f"{policy_name or self.policy_class.__name__} on a text env would learn from raw token ids: use the language-model "
                    f"policy, {type(self).__name__}(\"LMPolicy\", env)"
                )
        if self.policy_class is not None and isinstance(self.policy_class, type) and issubclass(self.policy_class, BasePolicy):
            from agents.policies.mlp import ActorCriticPolicy

            if issubclass(self.policy_class, ActorCriticPolicy):
                check_observation_space(observation_space)

    def _clear_runtime_state(self) -> None:
        """No env and nothing from running one (logger, last observation, episode
        statistics): what a new model starts from, and what :meth:`load` starts from too
        (:meth:`save` keeps none of it)."""
        self.env: VecEnvAdapter | None = None
        self._logger: Logger | None = None
        self._last_obs: Any = None
        self._last_episode_starts: np.ndarray | None = None
        self._clear_episode_stats()

    def _clear_episode_stats(self) -> None:
        self.ep_info_buffer: deque = deque(maxlen=self._stats_window_size)
        self.ep_success_buffer: deque = deque(maxlen=self._stats_window_size)

    # --- set-up ---------------------------------------------------------------------
    def _setup_lr_schedule(self) -> None:
        self.lr_schedule = get_schedule_fn(self.learning_rate)

    def _setup_model(self) -> None:
        raise NotImplementedError

    def _make_policy(self, **extra: Any) -> BasePolicy:
        policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule, **extra, **self.policy_kwargs)
        policy = policy.to(self.device)
        distributed.broadcast_parameters(policy)  # every rank starts from rank 0's weights
        # the optimizer must see parameters on their final device (fused/foreach kernels)
        if getattr(policy, "optimizer", None) is not None and hasattr(policy, "build_optimizer"):
            policy.build_optimizer(self.lr_schedule)
        return policy

    @property
    def logger(self) -> Logger:
        if self._logger is None:
            self._logger = configure_logger(0, None)
        return self._logger

    def set_logger(self, logger: Logger) -> None:
        self._logger = logger

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        if self.env is None:
            raise ValueError("this model has no environment: pass one with model.set_env(env) before learn()")
        total_timesteps = check_number("total_timesteps", total_timesteps, low=0, integer=True)
        self.start_time = time.time_ns()
        if reset_num_timesteps:
            self._clear_episode_stats()
            self.num_timesteps = 0
            self._episode_num = 0
        else:
            total_timesteps += self.num_timesteps
        self._total_timesteps = total_timesteps
        self._num_timesteps_at_start = self.num_timesteps
        if reset_num_timesteps or self._last_obs is None:
            self._last_obs = self.env.reset()
            self._last_episode_starts = np.ones(self.env.num_envs, dtype=bool)
            self._ep_returns = np.zeros(self.env.num_envs)
            self._ep_lengths = np.zeros(self.env.num_envs, dtype=np.int64)
        if self._logger is None or reset_num_timesteps or not self._logger.output_formats:
            if self._logger is not None:
                self._logger.close()
            if distributed.is_main_process():
                self._logger = configure_logger(self.verbose, self.tensorboard_log, tb_log_name, reset_num_timesteps)
            else:  # other ranks: no table, no TensorBoard
                self._logger = configure_logger(0, None)
        # which env the run trained on, for TensorBoard readers (rlhf-env plot groups runs by it)
        self._logger.record("run/env", env_name(self.env), exclude="stdout")
        callback = convert_callback(callback)
        if progress_bar and distributed.is_main_process():
            callback = CallbackList([callback, ProgressBarCallback()])
        callback.init_callback(self)
        return total_timesteps, callback

    def _update_current_progress_remaining(self, num_timesteps: int, total_timesteps: int) -> None:
        self._current_progress_remaining = 1.0 - float(num_timesteps) / float(total_timesteps)

    def _update_learning_rate(self, optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer]) -> None:
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def _update_episode_stats(self, rewards: np.ndarray, done: np.ndarray, valid: np.ndarray) -> None:
        """Own bookkeeping of episode returns/lengths (no Monitor wrapper needed)."""
        self._ep_returns += rewards * valid
        self._ep_lengths += valid
        finished = done & valid
        if finished.any():
            now = round((time.time_ns() - self.start_time) / 1e9, 6)
            for i in np.nonzero(finished)[0]:
                self.ep_info_buffer.append({"r": float(self._ep_returns[i]), "l": int(self._ep_lengths[i]), "t": now})
            self._episode_num += int(finished.sum())
            self._ep_returns[finished] = 0.0
            self._ep_lengths[finished] = 0

    # --- public API -----------------------------------------------------------------
    def learn(self, total_timesteps: int, callback: Any = None, log_interval: int = 1, tb_log_name: str = "run",
              reset_num_timesteps: bool = True, progress_bar: bool = False) -> "BaseAlgorithm":
        raise NotImplementedError

    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Action(s) for one observation or a batch; see ``BasePolicy.predict``."""
        return self.policy.predict(observation, state, episode_start, deterministic)

    def set_random_seed(self, seed: int | None = None) -> None:
        """Seed Python, numpy, torch, the action space and the env's next reset
        (``model.seed`` holds the seed given to the constructor, as in SB3)."""
        if seed is None:
            return
        # under torchrun each rank draws other data: rank r seeds its envs from seed + r * n_envs
        seed = distributed.rank_seed(seed, self.n_envs)
        set_random_seed(seed)
        if self.action_space is not None:
            self.action_space.seed(seed)
        if self.env is not None:
            self.env.seed(seed)

    def get_env(self) -> Any:
        """The env the model trains on: an SB3 ``VecEnv`` given by the user as is, otherwise
        a view with SB3's ``VecEnv`` API (``reset() -> obs``, ``step -> obs, rewards, dones,
        infos``) whose ``.unwrapped`` is the Gymnasium vector env."""
        if self.env is None:
            return None
        if self.env.is_sb3:
            return self.env.env
        from agents.vec_env import SB3VecEnvView

        return SB3VecEnvView(self.env)

    def set_env(self, env: Any, force_reset: bool = True) -> None:
        """Train on ``env`` from now on; its spaces must equal the model's.

        :raises ValueError: naming the observation or action space that differs
        """
        new = wrap_env(env, n_envs=self.n_envs)
        if new.observation_space != self.observation_space:
            raise ValueError(
                _text_space_mismatch(new, self.observation_space)
                or f"observation space mismatch: the env has {new.observation_space}, the model was built for "
                f"{self.observation_space}"
            )
        if new.action_space != self.action_space:
            raise ValueError(
                f"action space mismatch: the env has {new.action_space}, the model was built for {self.action_space}"
            )
        n_envs_changed = new.num_envs != self.n_envs
        self.env = new
        # the env's own (equal) space: a text env's carries the handle of the env's live models,
        # so a model loaded with env= acts with that env's actor
        self.observation_space = new.observation_space
        self.n_envs = new.num_envs
        if n_envs_changed:
            self._on_n_envs_changed()
        if force_reset or n_envs_changed:
            self._last_obs = None

    def _on_n_envs_changed(self) -> None:
        pass


def _text_space_mismatch(env: Any, model_space: Any) -> str | None:
    """For two text envs' spaces, what differs in words: the context length
    (``max_prompt_tokens + max_new_tokens``) with the ``max_new_tokens`` that would match, or
    the vocabulary (another model); None for other spaces."""
    from agents.text_rollout import find_text_env

    env_space = env.observation_space
    try:
        (env_len,), (model_len,) = env_space["input_ids"].shape, model_space["input_ids"].shape
        env_vocab, model_vocab = int(env_space["input_ids"].high[0]) + 1, int(model_space["input_ids"].high[0]) + 1
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        return None
    if env_vocab != model_vocab:
        return (f"observation space mismatch: the env's model has a vocabulary of {env_vocab} tokens, the agent's "
                f"{model_vocab}: make the env with the model the agent was trained on")
    text_env = find_text_env(env)
    prompt = getattr(text_env, "max_prompt_tokens", None)
    if env_len == model_len or prompt is None:
        return None
    hint = f"max_new_tokens={model_len - prompt}" if model_len > prompt else f"a max_prompt_tokens + max_new_tokens of {model_len}"
    return (f"observation space mismatch: the env's contexts hold {env_len} tokens (max_prompt_tokens {prompt} + "
            f"max_new_tokens {env_len - prompt}), the agent was trained on {model_len}: make the env with {hint}")
