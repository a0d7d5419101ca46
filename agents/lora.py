"""LoRA adapters on the env's actor, in place (``peft``), and merging them for export.

The text env and the LM policy share ONE actor module, so adapters are injected into
that module in place (``peft.inject_adapter_in_model``, no ``PeftModel`` wrapper): the env
then charges its KL with the adapted actor and the policy trains only the adapter
weights. The env's reference is the frozen copy it made of the starting model, so it
stays the starting model.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
# every linear layer of a Llama-like block (attention and MLP)
ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` already holds LoRA layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
    layers: Sequence[int] | None = None,
) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place; only the adapters stay trainable.

    Idempotent: a model that already has adapters (a second policy on the same env) is
    left as it is.

    :param model: a Hugging Face causal LM.
    :param r: adapter rank.
    :param alpha: LoRA scaling numerator (default ``2 * r``).
    :param targets: names of the linear layers to adapt (``q_proj``, ``v_proj`` ...).
    :param dropout: dropout on the adapter input (0 keeps log-probs deterministic).
    :param layers: indices of the transformer blocks to adapt (``None``: all of them).
    :return: the same module.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("LoRA needs the 'peft' package: pip install peft") from exc
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not linear layers of {type(model).__name__}; it has {sorted(names)}")
    if not has_lora(model):
        config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets), lora_dropout=dropout,
                            layers_to_transform=None if layers is None else [int(i) for i in layers])
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter of ``model`` into its base weights and put the plain layers
    back, in place: an ordinary Hugging Face model again, which ``save_pretrained`` writes
    and ``from_pretrained`` reads without ``peft``. All parameters require grad afterwards.
    A model without adapters is returned as it is.

    :return: the same module.
    """
    if not has_lora(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA adapters merged (:func:`merge_lora`); ``model`` keeps them."""
    return merge_lora(copy.deepcopy(model))
