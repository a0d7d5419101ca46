"""Export a trained language-model policy as a plain Hugging Face model folder.

The folder holds the actor with any LoRA adapters merged into its weights (so
``AutoModelForCausalLM.from_pretrained(dir)`` reads it without ``peft``), its tokenizer
(chat template included) and ``rlhf_env_training.json``, a small record of how it was
trained (algorithm, base model, steps, hyperparameters). ``load_lm(dir)`` and
``gym.make("TextRLHF-v0", model=dir)`` accept it. The folder is written to a temporary
sibling and renamed into place.
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
