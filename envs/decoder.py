"""The parts of a Hugging Face model that the env, the agents, SFT/DPO, the reward model
and the benchmarks reach for: its transformer blocks, its decoder trunk and head, and which
of its weights train.

One place, so they cannot disagree on one model:

* :func:`decoder_blocks`: the transformer blocks of any causal LM (the ``nn.ModuleList``
  of ``config.num_hidden_layers`` modules), or of an encoder;
* :func:`trunk_and_head`: its decoder (``get_decoder()``) and its LM head;
* :func:`decoder_parts`: the named parts of a Llama-like model whose logits are exactly
  ``lm_head(norm(h))`` (model types in :data:`SUPPORTED_MODEL_TYPES`), or why not: what the
  exact frozen-trunk shortcuts (:mod:`envs.reference`, :mod:`envs.trunk_states`) need;
* :func:`encoder_parts`: the embeddings and blocks of a BERT-like encoder, or why not: what
  the reward model's frozen lower trunk (``train_layers``) needs;
* :func:`set_trainable`: train every weight, or only the last ``k`` blocks and the final
  norm (the embeddings and the often tied head stay frozen: on CPU they are the most
  expensive weights to train).

PEFT-wrapped models (``get_base_model()``) are unwrapped first; LoRA layers injected in
place stay inside the blocks they were injected into.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Causal LMs whose ForCausalLM forward is exactly lm_head(norm(last hidden)) (no logit
# scaling or soft-capping) and whose decoder layers take (hidden_states, **kwargs) with the
# KV cache as the ``cache`` (or ``past_key_values``) keyword.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def base_model(model: nn.Module) -> nn.Module:
    """The model itself, or the base model of a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Hugging Face causal LM.

    :raises TypeError: when the model has no ``nn.ModuleList`` of ``num_hidden_layers`` modules
    """
    model = base_model(model)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            return module
    raise TypeError(f"cannot find the transformer blocks of {type(model).__name__} (no ModuleList of num_hidden_layers)")


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder trunk (its forward returns ``last_hidden_state``) and the LM head of a
    Hugging Face causal LM.

    :raises TypeError: when the model has no decoder or no output embedding
    """
    base = base_model(model)
    head = base.get_output_embeddings()
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if head is None or trunk is None:
        raise TypeError(
            f"{type(base).__name__} is not a Hugging Face causal LM with a decoder and an "
            "output embedding; the text agents need one (e.g. AutoModelForCausalLM)"
        )
    return trunk, head


def decoder_parts(model: nn.Module) -> tuple[dict[str, Any] | None, str | None]:
    """``({"embed", "layers", "norm", "head", "inner"}, None)`` of a supported Llama-like
    causal LM, or ``(None, reason)`` saying why it is not supported."""
    model = base_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return None, f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    embed = getattr(inner, "embed_tokens", None)
    if not isinstance(layers, nn.ModuleList) or not all(isinstance(m, nn.Module) for m in (norm, head, embed)):
        return None, f"{type(model).__name__} has no model.layers / model.norm / model.embed_tokens / lm_head"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        return None, f"its layers use different attention masks ({sorted(set(layer_types))})"
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return None, f"its logits are rescaled ({attr}={getattr(config, attr)})"
    return {"embed": embed, "layers": layers, "norm": norm, "head": head, "inner": inner}, None


def encoder_parts(model: nn.Module) -> tuple[dict[str, Any] | None, str | None]:
    """``({"embed", "layers"}, None)`` of a BERT-like encoder: its ``embeddings`` module and
    its blocks (:func:`decoder_blocks`), which run as ``layer(hidden, mask)``; or
    ``(None, reason)`` saying why it is not one (a causal LM, another layout)."""
    model = base_model(model)
    config = getattr(model, "config", None)
    embed = getattr(model, "embeddings", None)
    if getattr(config, "is_decoder", False) or not isinstance(embed, nn.Module):
        return None, f"{type(model).__name__} is not a BERT-like encoder with .embeddings"
    try:
        layers = decoder_blocks(model)
    except TypeError as err:
        return None, str(err)
    return {"embed": embed, "layers": layers}, None


def set_trainable(model: nn.Module, train_layers: int | None) -> None:
    """Choose which weights train: all (``None``) or the last ``train_layers`` blocks and
    the final norm (embeddings and LM head frozen: with tied embeddings they are the most
    expensive weights to train).

    :raises ValueError: when ``train_layers`` is not in ``[0, number of blocks]``
    :raises TypeError: when the blocks cannot be found (see :func:`decoder_blocks`)
    """
    if train_layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    blocks = decoder_blocks(model)
    if not 0 <= train_layers <= len(blocks):
        raise ValueError(f"train_layers must be in [0, {len(blocks)}] for this {len(blocks)}-block model, got {train_layers}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - train_layers :]:
        for p in block.parameters():
            p.requires_grad_(True)
    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "base_model", None)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "ln_f", None)  # Llama-like / GPT-2-like
    if train_layers > 0 and isinstance(norm, nn.Module):
        for p in norm.parameters():
            p.requires_grad_(True)
