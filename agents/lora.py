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
) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place; only the adapters stay trainable.

    Idempotent: a model that already has adapters (a second policy on the same env) is
    left as it is.

    :param model: a Hugging Face causal LM.
    :param r: adapter rank.
    :param alpha: LoRA scaling numerator (default ``2 * r``).
    :param targets: names of the linear layers to adapt (``q_proj``, ``v_proj`` ...).
    :param dropout: dropout on the adapter input (0 keeps log-probs deterministic).
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
        config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets), lora_dropout=dropout)
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA adapter merged into its base weights and the
    LoRA layers replaced by plain ones: an ordinary Hugging Face model that
    ``save_pretrained`` writes and ``from_pretrained`` reads without ``peft``.
    A model without adapters is copied as it is."""
    out = copy.deepcopy(model)
    if not has_lora(out):
        return out
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.get_base_layer())
    for p in out.parameters():
        p.requires_grad_(True)
    return out
