"""``BaseAlgorithm``: what every agent shares (SB3's ``base_class``): env wrapping, the
``learn`` set-up, logging, callbacks, seeding, ``predict``, save/load and parameters."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import time
import zipfile
from collections import deque
from typing import Any, Iterable

import cloudpickle
import numpy as np
import torch
from gymnasium import spaces

from agents import distributed
from agents.atomic import atomic_file
from agents.callbacks import BaseCallback, CallbackList, ProgressBarCallback, convert_callback
from agents.fast_kernels import lean_adam_step, lean_clip_grad_norm
from agents.guards import check_number
from agents.logger import Logger, configure_logger
from agents.policies import BasePolicy, get_policy_class
from agents.preprocessing import check_observation_space
from agents.schedules import get_schedule_fn
from agents.vec_env import VecEnvAdapter, wrap_env

SAVE_FORMAT = "rlhf-env-agents"
SAVE_FORMAT_VERSION = 1


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


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``: through the lean version of
    :mod:`agents.fast_kernels` (same maths, without the per-call grouping that costs more than
    the clipping for a small network) where this torch has the kernels it calls, through
    torch's function otherwise.

    :return: the total gradient norm before clipping
    """
    total = lean_clip_grad_norm(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if total is None else total


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; for a fused single-group Adam whose state exists, the same
    kernels through :func:`agents.fast_kernels.lean_adam_step` (without the optimizer's Python
    bookkeeping, which costs more than the update for a small network) where this torch
    has them."""
    if not lean_adam_step(optimizer):
        optimizer.step()


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


class BaseAlgorithm:
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
        self.env: VecEnvAdapter | None = None
        self._logger: Logger | None = None
        self._last_obs: Any = None
        self._last_episode_starts: np.ndarray | None = None
        self.ep_info_buffer: deque = deque(maxlen=self._stats_window_size)
        self.ep_success_buffer: deque = deque(maxlen=self._stats_window_size)
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
            self.ep_info_buffer = deque(maxlen=self._stats_window_size)
            self.ep_success_buffer = deque(maxlen=self._stats_window_size)
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
                f"observation space mismatch: the env has {new.observation_space}, the model was built for "
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

    def _get_torch_save_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"policy": self.policy.state_dict()}
        if getattr(self.policy, "optimizer", None) is not None:
            params["policy.optimizer"] = self.policy.optimizer.state_dict()
        return params

    def _checkpoint_params(self) -> dict[str, Any]:
        """What :meth:`save` writes: :meth:`get_parameters`, except that a language-model
        policy leaves out its frozen actor weights (``"policy.frozen"`` records which, and a
        fingerprint of them): :meth:`load` rebuilds those from the recorded base model."""
        params = self._get_torch_save_params()
        if hasattr(self.policy, "checkpoint_state"):
            params["policy"], params["policy.frozen"] = self.policy.checkpoint_state()
        return params

    def get_parameters(self) -> dict[str, dict[str, Any]]:
        """``{"policy": state_dict, "policy.optimizer": state_dict}``."""
        return self._get_torch_save_params()

    def set_parameters(
        self, load_path_or_dict: str | dict[str, Any], exact_match: bool = True, device: torch.device | str = "auto"
    ) -> None:
        """Load parameters from a dict like :meth:`get_parameters` returns, or from a saved zip.

        :param exact_match: require every key (policy and optimizer) to be present
        """
        if isinstance(load_path_or_dict, dict):
            params = load_path_or_dict
        else:
            _, params, _ = _read_zip(load_path_or_dict, self.device)
        if "policy" not in params:
            raise ValueError(f"parameters have no 'policy' entry (keys: {sorted(params)})")
        if "policy.frozen" in params:  # a small checkpoint of a language-model policy
            if not hasattr(self.policy, "load_checkpoint_state"):
                raise ValueError("these parameters come from a language-model policy: load them into an LMPolicy model")
            self.policy.load_checkpoint_state(params["policy"], params["policy.frozen"])
        else:
            self.policy.load_state_dict(params["policy"], strict=exact_match)
        if "policy.optimizer" in params and getattr(self.policy, "optimizer", None) is not None:
            self.policy.optimizer.load_state_dict(params["policy.optimizer"])
        elif exact_match and getattr(self.policy, "optimizer", None) is not None:
            raise ValueError("parameters have no 'policy.optimizer' entry; pass exact_match=False to skip it")

    def save(self, path: str | os.PathLike, exclude: Iterable[str] | None = None, include: Iterable[str] | None = None) -> None:
        """One zip (``.zip`` added when the name has no suffix): hyperparameters and
        counters (cloudpickle), parameters and optimizer state (torch), RNG states, and a
        JSON header. Written to a temporary file and renamed, so a failed save leaves
        nothing behind.
        """
        path = os.fspath(path)
        if not os.path.splitext(path)[1]:
            path += ".zip"
        exclude = set(self._excluded_save_params) | set(exclude or ())
        exclude -= set(include or ())
        data = {k: v for k, v in self.__dict__.items() if k not in exclude}
        header = {
            "format": SAVE_FORMAT,
            "format_version": SAVE_FORMAT_VERSION,
            "algorithm": type(self).__name__,
            "num_timesteps": self.num_timesteps,
            "n_updates": self._n_updates,
            "torch_version": torch.__version__,
            "python_version": sys.version.split()[0],
        }
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("header.json", json.dumps(header, indent=2))
            archive.writestr("data.pkl", cloudpickle.dumps(data))
            for name, state in self._checkpoint_params().items():
                buf = io.BytesIO()
                torch.save(state, buf)
                # weights barely compress and deflating hundreds of MB takes a minute: stored as is
                archive.writestr(f"{name}.pth", buf.getvalue(), compress_type=zipfile.ZIP_STORED)
            buf = io.BytesIO()
            torch.save(rng, buf)
            archive.writestr("rng.pth", buf.getvalue())
        self._last_checkpoint = path

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Export the trained language model as a Hugging Face folder: the actor with any
        LoRA adapters merged, its tokenizer, and ``rlhf_env_training.json`` (algorithm, base
        model, steps, hyperparameters). ``AutoModelForCausalLM.from_pretrained(dir)``,
        ``load_lm(dir)`` and ``gym.make("TextRLHF-v0", model=dir)`` load it. (:meth:`save`
        writes a checkpoint to resume training instead.)

        :raises TypeError: the model's policy is not a language-model policy
        """
        if not hasattr(self.policy, "save_pretrained"):
            raise TypeError(
                f"save_pretrained exports a language-model policy; this {type(self).__name__} has a "
                f"{type(self.policy).__name__}: use model.save(path)"
            )
        hyper = {k: v for k, v in self.__dict__.items()
                 if k not in self._excluded_save_params and not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
        info = {"algorithm": type(self).__name__, "num_timesteps": self.num_timesteps, "n_updates": self._n_updates,
                "hyperparameters": hyper, "policy_kwargs": self.policy_kwargs}
        return os.fspath(self.policy.save_pretrained(directory, training=info))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        env: Any = None,
        device: torch.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> "BaseAlgorithm":
        """A model saved by :meth:`save`, with its parameters, optimizer state, counters and
        RNG states. ``env`` (optional) must have the saved spaces.

        :raises FileNotFoundError: no such file
        :raises ValueError: a corrupt file or one not written by this package (the message names the file)
        """
        distributed.init_distributed(device)
        device = get_device(device)
        header, params, data = _read_zip(path, device)
        if header["algorithm"] != cls.__name__:
            raise ValueError(f"{os.fspath(path)} holds a {header['algorithm']} model, not {cls.__name__}: use {header['algorithm']}.load")
        data.update(custom_objects or {})
        model = cls.__new__(cls)
        model.__dict__.update(data)
        model.__dict__.update(kwargs)
        model.device = device
        model.env = None
        model._logger = None
        model._last_obs = None
        model._last_episode_starts = None
        model._last_checkpoint = os.fspath(path)
        model.ep_info_buffer = deque(maxlen=model._stats_window_size)
        model.ep_success_buffer = deque(maxlen=model._stats_window_size)
        if env is not None:
            model.set_env(env, force_reset=True)  # takes the env's own space: the policy is built on its actor
        model._setup_model()
        model.set_parameters(params, exact_match=True)
        rng = params.get("rng")
        if rng is not None:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return model


def _read_zip(path: str | os.PathLike, device: torch.device) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(header, torch params incl. "rng", pickled data) of a saved model, with errors
    that name the file."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".zip"):
        path += ".zip"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved model at {path!r}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a saved model (not a valid zip file: {exc}); it may be truncated or corrupt") from exc
    with archive:
        names = set(archive.namelist())
        if "header.json" not in names:
            hint = " It looks like a Stable-Baselines3 save: load it with stable_baselines3." if "data" in names and "policy.pth" in names else ""
            raise ValueError(f"{path} is not a model saved by agents (no header.json).{hint}")
        try:
            header = json.loads(archive.read("header.json"))
            if header.get("format") != SAVE_FORMAT:
                raise ValueError(f"unknown format {header.get('format')!r}")
            data = cloudpickle.loads(archive.read("data.pkl"))
            params = {}
            for name in names:
                if name.endswith(".pth"):
                    params[name[: -len(".pth")]] = torch.load(io.BytesIO(archive.read(name)), map_location=device, weights_only=False)
        except (KeyError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError, json.JSONDecodeError, Exception) as exc:
            raise ValueError(f"{path} is corrupt or not a model saved by agents: {type(exc).__name__}: {exc}") from exc
    return header, params, data
