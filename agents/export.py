"""Export a trained language-model policy as a plain Hugging Face model folder.

The folder holds the actor with any LoRA adapters merged into its weights (so
``AutoModelForCausalLM.from_pretrained(dir)`` reads it without ``peft``), its tokenizer
(chat template included) and ``rlhf_env_training.json``, a small record of how it was
trained (algorithm, base model, steps, hyperparameters, the env and its reward model).
``load_lm(dir)`` and ``gym.make("TextRLHF-v0", model=dir)`` accept it. The folder is
written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from agents.atomic import atomic_dir
from agents.lora import has_lora, merged_copy

TRAINING_FILE = "rlhf_env_training.json"


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it (recursively for lists and dicts), else its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def reward_file(spec: Any) -> str | None:
    """The file of a ``FILE.py:NAME`` reward spec when that file exists, else None."""
    where, sep, _ = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    return where if sep and where.endswith(".py") and os.path.isfile(where) else None


def describe_reward(named, actual) -> str:
    """How an export records its reward, so that ``rlhf-env eval`` can load it again: a name as
    given (``"default"``), a reward-model folder or a ``FILE.py:NAME`` by absolute path, else
    a reward object's own ``reward_name``, else ``"callable NAME"`` (which cannot be loaded).

    :param named: the reward as the user named it (a string or path), or None
    :param actual: the reward callable in use
    """
    if isinstance(named, (str, os.PathLike)):
        text = os.path.expanduser(os.fspath(named))
        if os.path.isdir(text):
            return os.path.abspath(text)
        where = reward_file(text)
        if where is not None:
            return f"{os.path.abspath(where)}:{text.rpartition(':')[2]}"
        return str(named)
    if isinstance(getattr(actual, "reward_name", None), str):  # a reward object that says how to load it again
        return actual.reward_name
    return f"callable {getattr(actual, '__name__', type(actual).__name__)}"


def env_description(env: Any) -> dict[str, Any] | None:
    """What an exported policy was trained on, for ``rlhf_env_training.json`` (and an agent
    zip's header): the env id; its reward model as the user named it (a name, or a folder by
    its absolute path), or as a reward object names itself (its ``reward_name``:
    ``RewardModel.load``/``default`` and the VADER rewards set one), else a callable by its
    name, which nothing can load back, and None for reward functions alone;
    ``max_new_tokens``, ``max_prompt_tokens``, ``system_prompt`` (a string, None, or
    ``"TEMPLATE_DEFAULT"``) and the KL coefficient in force. None when ``env`` holds no text env."""
    from agents.text_rollout import find_text_env

    text_env = find_text_env(env) if env is not None else None
    if text_env is None:
        return None
    spec = None
    for candidate in (env, getattr(env, "env", None), getattr(getattr(env, "env", None), "unwrapped", None), text_env):
        spec = getattr(candidate, "spec", None)
        if spec is not None:
            break
    named = (spec.kwargs or {}).get("reward_model") if spec is not None else None
    actual = getattr(text_env, "reward_model", None)
    reward = None if actual is None else describe_reward(named, actual)
    task = getattr(text_env, "task", None)
    system = getattr(task, "system_prompt", None)
    return {
        "id": getattr(spec, "id", None),
        "reward_model": reward,
        "max_new_tokens": getattr(text_env, "max_new_tokens", None),
        "max_prompt_tokens": getattr(text_env, "max_prompt_tokens", None),
        "system_prompt": system if system is None or isinstance(system, str) else repr(system),
        "kl_coef": float(text_env.kl_coef) if getattr(text_env, "kl_coef", None) is not None else None,
    }


def save_pretrained(model: nn.Module, tokenizer: Any, directory: os.PathLike | str, training: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (LoRA merged, on a copy: ``model`` keeps its adapters) and
    ``tokenizer`` as a Hugging Face folder, plus ``training`` as ``rlhf_env_training.json``.

    :param model: a Hugging Face causal LM (``PreTrainedModel``), with or without LoRA adapters
    :param tokenizer: its tokenizer
    :param directory: destination folder (replaced if it exists)
    :param training: how the model was trained (anything JSON cannot hold is written as its repr)
    :return: the folder
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pretrained needs a Hugging Face model (PreTrainedModel), got {type(model).__name__}")
    plain = merged_copy(model) if has_lora(model) else model
    with atomic_dir(directory) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if training is not None:
            (tmp / TRAINING_FILE).write_text(json.dumps(_jsonable(training), indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def read_training_info(directory: os.PathLike | str) -> dict[str, Any] | None:
    """The ``rlhf_env_training.json`` of an exported folder (None when it has none)."""
    path = Path(directory) / TRAINING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
