"""Saving and loading an agent (SB3's ``save``/``load``): one zip with a JSON header,
hyperparameters and counters (cloudpickle), parameters and optimizer state (torch) and RNG
states; ``get_parameters``/``set_parameters``; ``save_pretrained`` exports a language-model
policy as a Hugging Face folder. :class:`SaveLoadMixin` holds them for
:class:`agents.base.BaseAlgorithm`."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import zipfile
from typing import TYPE_CHECKING, Any, Iterable

import cloudpickle
import numpy as np
import torch

from agents import distributed
from agents.atomic import atomic_file
from agents.export import env_description
from agents.utils import get_device

if TYPE_CHECKING:
    from agents.base import BaseAlgorithm

SAVE_FORMAT = "rlhf-env-agents"
SAVE_FORMAT_VERSION = 1


class SaveLoadMixin:
    """``save``, ``load``, ``get_parameters``, ``set_parameters`` and ``save_pretrained`` of
    an agent. ``save`` pickles the instance's attributes except ``_excluded_save_params``
    (the policy, the env, buffers, the logger: what is rebuilt or not worth keeping);
    ``load`` rebuilds a model through the class's ``_clear_runtime_state`` and
    ``_setup_model``."""

    _excluded_save_params: tuple[str, ...] = ()

    def _get_torch_save_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"policy": self.policy.state_dict()}
        if getattr(self.policy, "optimizer", None) is not None:
            params["policy.optimizer"] = self.policy.optimizer.state_dict()
        return params

    def _checkpoint_params(self, with_optimizer: bool = True) -> dict[str, Any]:
        """What :meth:`save` writes: :meth:`get_parameters` (without ``"policy.optimizer"``
        when not ``with_optimizer``), except that a language-model policy leaves out its
        frozen actor weights (``"policy.frozen"`` records which, and a fingerprint of them):
        :meth:`load` rebuilds those from the recorded base model."""
        params = self._get_torch_save_params()
        if not with_optimizer:
            params.pop("policy.optimizer", None)
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

        :param exact_match: require every key (policy and optimizer) to be present; a zip
            saved with ``save_only_model=True`` needs no optimizer entry (the optimizer
            keeps its state, fresh after :meth:`load`)
        """
        optimizer_saved = True
        if isinstance(load_path_or_dict, dict):
            params = load_path_or_dict
        else:
            header, params, _ = read_zip(load_path_or_dict, self.device)
            optimizer_saved = header.get("optimizer_state", True)
        self._load_parameters(params, exact_match, optimizer_saved)

    def _load_parameters(self, params: dict[str, Any], exact_match: bool, optimizer_saved: bool) -> None:
        """:meth:`set_parameters` of a dict; ``optimizer_saved`` False (a zip saved with
        ``save_only_model=True``) accepts the missing optimizer entry."""
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
        elif exact_match and optimizer_saved and getattr(self.policy, "optimizer", None) is not None:
            raise ValueError("parameters have no 'policy.optimizer' entry; pass exact_match=False to skip it")

    def save(
        self,
        path: str | os.PathLike,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
        save_only_model: bool = False,
    ) -> None:
        """One zip (``.zip`` added when the name has no suffix): hyperparameters and
        counters (cloudpickle), parameters and optimizer state (torch), RNG states, and a
        JSON header. Written to a temporary file and renamed, so a failed save leaves
        nothing behind. :meth:`load` of it resumes training exactly where it stopped.

        :param exclude: attribute names not to pickle (SB3's ``exclude``); naming
            ``"policy.optimizer"`` here is the same as ``save_only_model=True``
        :param include: attribute names to pickle although excluded by default
        :param save_only_model: leave out the optimizer state (Hugging Face Trainer's
            ``save_only_model``): for Adam two moments per trained weight, two thirds of a
            text agent's checkpoint. :meth:`load` still works and training continues with a
            fresh optimizer (Adam's moments restart at zero), so the resumed run is not
            identical to an uninterrupted one.
        """
        path = os.fspath(path)
        if not os.path.splitext(path)[1]:
            path += ".zip"
        exclude = set(self._excluded_save_params) | set(exclude or ())
        exclude -= set(include or ())
        with_optimizer = not save_only_model and "policy.optimizer" not in exclude
        data = {k: v for k, v in self.__dict__.items() if k not in exclude}
        header = {
            "format": SAVE_FORMAT,
            "format_version": SAVE_FORMAT_VERSION,
            "algorithm": type(self).__name__,
            "num_timesteps": self.num_timesteps,
            "n_updates": self._n_updates,
            "optimizer_state": with_optimizer,
            "env": env_description(self.env),  # a text env's id, reward model, lengths (rlhf-env eval reads it)
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
            for name, state in self._checkpoint_params(with_optimizer).items():
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
        model, steps, hyperparameters, and under ``"env"`` the env id, reward model,
        ``max_new_tokens`` and system prompt, which ``rlhf-env eval DIR`` judges with).
        ``AutoModelForCausalLM.from_pretrained(dir)``, ``load_lm(dir)`` and
        ``gym.make("TextRLHF-v0", model=dir)`` load it. (:meth:`save` writes a checkpoint to
        resume training instead.)

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
                "hyperparameters": hyper, "policy_kwargs": self.policy_kwargs, "env": env_description(self.env)}
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
        RNG states. ``env`` (optional) must have the saved spaces. A zip saved with
        ``save_only_model=True`` loads with a fresh optimizer.

        :raises FileNotFoundError: no such file
        :raises ValueError: a corrupt file or one not written by this package (the message names the file)
        """
        distributed.init_distributed(device)
        device = get_device(device)
        header, params, data = read_zip(path, device)
        if header["algorithm"] != cls.__name__:
            raise ValueError(f"{os.fspath(path)} holds a {header['algorithm']} model, not {cls.__name__}: use {header['algorithm']}.load")
        data.update(custom_objects or {})
        model = cls.__new__(cls)
        model.__dict__.update(data)
        model.__dict__.update(kwargs)
        model.device = device
        model._clear_runtime_state()
        model._last_checkpoint = os.fspath(path)
        if env is not None:
            model.set_env(env, force_reset=True)  # takes the env's own space: the policy is built on its actor
        model._setup_model()
        # saved with save_only_model=True: the optimizer _setup_model built stays, fresh
        model._load_parameters(params, exact_match=True, optimizer_saved=header.get("optimizer_state", True))
        rng = params.get("rng")
        if rng is not None:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return model


def read_zip(path: str | os.PathLike, device: torch.device) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
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
