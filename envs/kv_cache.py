"""Batched forwards of a causal LM with a KV cache: padding, one prefill, and the cache objects.

:func:`prefill` runs a model once over left-padded token sequences with explicit positions
(``position_ids`` = number of real tokens before each token), so a row's keys keep their
rotary positions wherever its columns sit, and returns the last token's logits, hidden
state and the per-layer keys and values (padding columns zeroed). :func:`new_cache` wraps
keys and values into a transformers ``DynamicCache`` (an offset one for a model's top
blocks only, see :mod:`envs.reference`); :func:`cache_layers` reads them back.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def pad_token_ids(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu", side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (``long``, ``(len(seqs), longest)``) of token id lists
    padded with ``pad_id`` on the ``"left"`` (generation, the env's prefill) or the
    ``"right"`` (teacher-forced training)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def prefill(
    model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, use_cache: bool = True, hidden: bool = True
) -> dict[str, Any]:
    """One full forward of ``model`` over left-padded ``seqs`` (explicit positions).

    :return: dict with ``logits`` (raw next-token logits of the last token, (n, vocab)),
        ``hidden`` (last-layer hidden state of the last token, (n, H), if ``hidden``),
        ``mask`` ((n, P) long) and, with ``use_cache``, ``kv``: per layer ``(keys, values)``
        of shape (n, heads, P, head_dim) with the padding columns zeroed (a fully masked
        query can produce non-finite states, which must not leak into the cache).
    """
    device = next(model.parameters()).device
    ids, mask = pad_token_ids(seqs, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=use_cache,
        output_hidden_states=hidden,
        logits_to_keep=1,
    )
    result: dict[str, Any] = {"logits": out.logits[:, -1], "mask": mask}
    if hidden:
        result["hidden"] = out.hidden_states[-1][:, -1]
    if use_cache:
        cache = output_cache(out)
        keep = mask[:, None, :, None].bool()
        result["kv"] = [
            (torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0)) for layer in cache_layers(cache)
        ]
    return result


def output_cache(out: Any):
    """The KV cache a Hugging Face forward returned (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the model returned no KV cache; the text env needs a causal LM with use_cache support")
    return cache


def cache_layers(cache: Any) -> list:
    """The per-layer (``keys``, ``values``) entries of a ``DynamicCache`` (full attention only)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError(f"unsupported KV cache type {type(cache).__name__}: the text env needs a transformers DynamicCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                f"KV cache layer {type(layer).__name__} (sliding window or recurrent) is not supported by the batched "
                "text env; use a model with full attention in every layer"
            )
    return layers


_OFFSET_CACHE: type | None = None


def _offset_cache_class() -> type:
    """``DynamicCache`` subclass holding only layers ``offset ..`` of a model (entry ``i`` is
    layer ``offset + i``); built on first use because importing transformers is slow."""
    global _OFFSET_CACHE
    if _OFFSET_CACHE is None:
        from transformers import DynamicCache

        class OffsetDynamicCache(DynamicCache):
            def __init__(self, offset: int, ddp_cache_data=None):
                super().__init__(ddp_cache_data=ddp_cache_data)
                self.offset = offset

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)

        _OFFSET_CACHE = OffsetDynamicCache
    return _OFFSET_CACHE


def new_cache(kv: list | None, offset: int = 0):
    """A KV cache holding ``kv`` (per layer ``(keys, values)``; None = empty) for the
    model's layers ``offset ..``."""
    if offset == 0:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=kv)
    return _offset_cache_class()(offset, kv)
