"""The text environments' Gymnasium ids and the one place their keyword arguments are resolved.

``import rlhf_env`` registers ``TextRLHF-v0`` (SmolLM2-135M-Instruct, the package's trained
reward model) and ``TextRLHF-tiny-v0`` (the tiny model and reward, for tests and CI). Their
entry points, :func:`make_text_env` and :func:`make_text_vec_env`, turn the names a user
writes into the objects :mod:`envs` takes (:func:`resolve_text_env_kwargs`):

- ``model``: a shipped name (``"smollm2-135m"``, ``"tiny"``), a local Hugging Face directory
  or a hub id (:func:`rlhf_env.models.load_lm`), or a module (then ``tokenizer=``);
- ``reference``: None (a frozen copy of the starting model), a module, or a name/path;
- ``reward_model``: a callable, a name (``"sentiment"``, ``"tiny"``, ``"default"``) or a
  reward-model directory (:func:`rlhf_env.rewards.resolve_reward`);
- ``prompts``: None (the shipped prompt set), a list of strings, or a ``.txt`` / ``.jsonl``
  file (:func:`rlhf_env.prompts.load_prompts`);
- ``dataset``: rows with a ``"prompt"`` and any columns: a list of dicts, a Hugging Face
  ``datasets.Dataset`` or a JSON Lines file (:func:`rlhf_env.prompts.load_rows`), used
  instead of ``prompts``;
- ``reward_funcs``: TRL-style reward functions (see :mod:`envs.reward_funcs`). They replace
  the id's default reward model; a ``reward_model=`` passed too is added to their score.

Every other keyword goes to the env class unchanged. With ``shared_model=True`` (the
default) envs of one process made with the same model name, device, dtype, reference and
sampling configuration get the same loaded modules, so they share one actor (the one the
policy trains) and one reference, as the N copies of a ``DummyVecEnv`` must. An env made after a
policy trained that shared actor gets the trained weights, with a warning that says to
pass ``shared_model=False`` for a freshly loaded model.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import gymnasium as gym

from rlhf_env.envs.lm_core import dtype_name

TEXT_ENV_IDS = ("TextRLHF-v0", "TextRLHF-tiny-v0")

# (model name, device, dtype, reference, temperature, top_k) -> (actor, tokenizer, reference or None,
# envs.lm_core.actor_changes(actor) when it was loaded), the modules held weakly: an entry lives as
# long as an env or a policy uses its modules
_LOADED: dict[tuple, tuple[weakref.ref, Any, weakref.ref | None, int]] = {}


# id -> default keyword arguments. TextRLHF-v0: the package's trained reward model (built from
# the shipped preference pairs on first use, then cached); reward_model="sentiment" gives
# the VADER reward instead. TextRLHF-tiny-v0: the tiny model and reward, for tests and CI.
class IdDefault(str):
    """A keyword value that comes from the registered id, not from the user (a ``str``, so
    ``env.spec.kwargs`` reads as before): ``reward_funcs=`` drops the id's default reward model
    but keeps one the user passed."""

    __slots__ = ()


_DEFAULTS = {
    "TextRLHF-v0": {"model": "smollm2-135m", "reward_model": IdDefault("default")},
    "TextRLHF-tiny-v0": {"model": "tiny", "reward_model": IdDefault("tiny")},
}


def register_envs() -> None:
    """Register ``TextRLHF-v0``, ``TextRLHF-tiny-v0`` and ``ReasoningGym-v0`` (idempotent)."""
    for env_id in TEXT_ENV_IDS:
        if env_id not in gym.envs.registration.registry:
            gym.register(
                id=env_id,
                entry_point="rlhf_env.registration:make_text_env",
                vector_entry_point="rlhf_env.registration:make_text_vec_env",
                kwargs=dict(_DEFAULTS[env_id]),
            )
    if "ReasoningGym-v0" not in gym.envs.registration.registry:
        # a verifiable task's train rows and reward functions (rlhf_env.tasks.env), SmolLM2 by default
        gym.register(
            id="ReasoningGym-v0",
            entry_point="rlhf_env.tasks.env:make_task_env",
            vector_entry_point="rlhf_env.tasks.env:make_task_vec_env",
            kwargs={"model": "smollm2-135m", "task": "chain_sum"},
        )


def make_text_env(**kwargs: Any):
    """A :class:`envs.text_env.TextRLHFEnv` from names or objects (see the module docstring);
    the entry point of ``gym.make("TextRLHF-v0")``."""
    from rlhf_env.envs.text_env import TextRLHFEnv

    check_keywords(TextRLHFEnv, kwargs)
    return TextRLHFEnv(**resolve_text_env_kwargs(**kwargs))


def make_text_vec_env(num_envs: int = 1, **kwargs: Any):
    """A :class:`envs.text_vec_env.TextRLHFVectorEnv` from names or objects; the vector entry
    point of ``gym.make_vec("TextRLHF-v0", num_envs=N)``."""
    from rlhf_env.envs.text_vec_env import TextRLHFVectorEnv

    if int(num_envs) < 1:  # before any model is loaded
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    check_keywords(TextRLHFVectorEnv, kwargs)
    return TextRLHFVectorEnv(num_envs=num_envs, **resolve_text_env_kwargs(**kwargs))


def check_keywords(env_class: type, kwargs: dict[str, Any]) -> None:
    """A ``TypeError`` naming an unknown keyword (and the closest known one) before any model
    is loaded, instead of the env class's own error after the load (the agents' message,
    :func:`agents.utils.unexpected_keyword`)."""
    import inspect

    from rlhf_env.agents.utils import unexpected_keyword

    known = set(inspect.signature(resolve_text_env_kwargs).parameters) | set(inspect.signature(env_class).parameters)
    known -= {"self", "env_kwargs", "lm_spec"}
    unknown = [key for key in kwargs if key not in known]
    if unknown:  # the first one, in the order given
        raise unexpected_keyword(env_class.__name__, {unknown[0]: kwargs[unknown[0]]}, known)


def _a_reward_model(prompts: Any, responses: Any) -> None:
    """A placeholder ``(prompts, responses)`` scorer (see :func:`_check_reward`)."""


def _check_reward(reward_model: Any, reward_funcs: Any, reward_weights: Any, dataset: Any) -> None:
    """The reward's checks of :class:`envs.reward_funcs.RewardFunctions` (signatures, weights,
    a missing reward) and an unknown reward name, run before the slow model load (a trained
    reward model itself is loaded after it): the env repeats them on its rows."""
    from rlhf_env.envs.reward_funcs import RewardFunctions
    from rlhf_env.envs.rows import column_names
    from rlhf_env.rewards import REWARD_NAMES, resolve_reward

    if reward_model is not None and not callable(reward_model):
        named = isinstance(reward_model, str) and reward_model.lower() in REWARD_NAMES
        if not named and not (isinstance(reward_model, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(reward_model))):
            resolve_reward(reward_model)  # raises, naming the valid choices
        reward_model = _a_reward_model  # stands in for the named model in the signature checks

    if dataset is None:
        columns: list[str] = []
    elif isinstance(getattr(dataset, "column_names", None), list):
        columns = [c for c in dataset.column_names if c != "prompt"]
    elif isinstance(dataset, list) and all(isinstance(row, dict) for row in dataset):
        columns = column_names(dataset)
    else:
        return  # the env reports what is wrong with the rows
    RewardFunctions(reward_funcs, reward_weights, reward_model, columns)


def resolve_text_env_kwargs(
    model: Any = "smollm2-135m",
    reward_model: Any = "sentiment",
    prompts: Any = None,
    reference: Any = None,
    tokenizer: Any = None,
    device: Any = "cpu",
    dtype: Any = None,
    temperature: float = 1.0,
    top_k: int = 0,
    shared_model: bool = True,
    reference_share: str = "auto",
    dataset: Any = None,
    reward_funcs: Any = None,
    **env_kwargs: Any,
) -> dict[str, Any]:
    """The env class's keyword arguments from what a user passes to ``gym.make``: names and
    files resolved to modules, a tokenizer, a reward callable and a prompt list. Cheap
    checks run before any model is loaded."""
    import torch

    from rlhf_env.envs.reference import check_reference_share
    from rlhf_env.envs.text_env import check_config
    from rlhf_env.prompts import load_prompts, load_rows
    from rlhf_env.rewards import resolve_reward

    check_config(
        env_kwargs.get("max_new_tokens", 32), env_kwargs.get("max_prompt_tokens", 64), env_kwargs.get("kl_estimator", "k1"),
        env_kwargs.get("render_mode"), ("ansi", "human"), env_kwargs.get("kl_coef", 0.05), device,
    )
    reference_share = check_reference_share(reference_share)  # before the (slow) model load
    if dataset is not None:
        if prompts is not None:
            raise ValueError('pass either prompts=[...] (strings) or dataset=[...] (rows with a "prompt"), not both')
        dataset = load_rows(dataset)
    elif prompts is None or isinstance(prompts, (str, os.PathLike)):
        prompts = load_prompts(prompts)
    if isinstance(reward_model, str) and ":" in reward_model and not os.path.isdir(os.path.expanduser(reward_model)):
        from rlhf_env.rewards import load_function

        reward_model = load_function(reward_model, "reward_model")  # 'FILE.py:NAME': its signature is checked below
    if reward_funcs is not None and isinstance(reward_model, IdDefault):
        reward_model = None  # the reward functions replace the id's default reward model
    _check_reward(reward_model, reward_funcs, env_kwargs.get("reward_weights"), dataset)
    lm_spec = None
    if not isinstance(model, torch.nn.Module):
        # a local folder is recorded by its absolute path: an agent saved here loads from any folder
        name = os.path.abspath(os.path.expanduser(model)) if isinstance(model, (str, os.PathLike)) and os.path.isdir(
            os.path.expanduser(model)) else str(model)
        lm_spec = {"model": name, "dtype": dtype_name(dtype), "loader": "rlhf_env.registration:load_spec_model"}
        model, tokenizer, reference = _load_models(model, tokenizer, reference, device, dtype, temperature, top_k, shared_model)
    elif reference is not None and not isinstance(reference, torch.nn.Module):
        from rlhf_env.models import load_lm

        reference, _ = load_lm(reference, device=device, dtype=dtype)
    return dict(
        model=model, tokenizer=tokenizer, reference=reference,
        reward_model=None if reward_model is None else resolve_reward(reward_model, device=device),
        prompts=prompts, dataset=dataset, reward_funcs=reward_funcs, device=device, dtype=dtype_name(dtype), temperature=temperature, top_k=top_k,
        shared_model=shared_model, reference_share=reference_share, lm_spec=lm_spec, **env_kwargs,
    )


def _load_models(name: Any, tokenizer: Any, reference: Any, device: Any, dtype: Any, temperature: float, top_k: int,
                 shared: bool, warn_trained: bool = True):
    """``(actor, tokenizer, reference)`` for a model name or path (and a reference None, a
    module or a name), reusing the modules of an earlier env of this process made with the
    same settings when ``shared`` (with a warning, when ``warn_trained``, if a policy has
    changed that actor since it was loaded)."""
    from rlhf_env.envs.lm_core import actor_changes
    from rlhf_env.models import load_lm

    if not isinstance(name, (str, bytes)) and not hasattr(name, "__fspath__"):
        raise TypeError(f"model must be a name, a path or a causal LM module, got {type(name).__name__}")
    ref_by_name = isinstance(reference, (str, os.PathLike))
    ref_key = os.fspath(reference) if ref_by_name else None if reference is None else ("module", id(reference))
    key = (os.fspath(name), str(device), dtype_name(dtype), ref_key, float(temperature), int(top_k))
    if shared and key in _LOADED:
        actor_ref, loaded_tokenizer, reference_ref, loaded_changes = _LOADED[key]
        actor, loaded_reference = actor_ref(), reference_ref() if reference_ref is not None else None
        if actor is not None and (not ref_by_name or loaded_reference is not None):
            if warn_trained and actor_changes(actor) != loaded_changes:
                warnings.warn(
                    f"model={os.fspath(name)!r}: this env shares the actor that an earlier env of this process "
                    "built and a policy has since trained (shared_model=True, the default, so the envs of one "
                    "agent act with one actor); a new agent on it starts from those trained weights. Pass "
                    "shared_model=False for a freshly loaded model.",
                    stacklevel=4,
                )
            return actor, tokenizer or loaded_tokenizer, loaded_reference if ref_by_name else reference
    actor, loaded_tokenizer = load_lm(name, device=device, dtype=dtype)
    if ref_by_name:
        reference, _ = load_lm(reference, device=device, dtype=dtype)
    if shared:
        for dead in [k for k, (actor_ref, *_) in _LOADED.items() if actor_ref() is None]:
            del _LOADED[dead]
        _LOADED[key] = (weakref.ref(actor), loaded_tokenizer, weakref.ref(reference) if ref_by_name else None,
                        actor_changes(actor))
    return actor, tokenizer or loaded_tokenizer, reference


def load_spec_model(spec: dict[str, Any], device: Any = "cpu"):
    """``(model, tokenizer)`` of an observation space's model description (the ``loader``
    named in the spec; see :func:`envs.lm_core.core_from_spec`): a policy loaded from disk
    in a process without its env rebuilds its actor from the model name or path."""
    model, tokenizer, _ = _load_models(spec["model"], None, None, device, spec.get("dtype"), spec.get("temperature", 1.0),
                                       spec.get("top_k", 0), True, warn_trained=False)
    return model, tokenizer
