"""The actor's frozen-trunk hidden states, kept from the rollout for the update.

When a trainer updates only the top ``k`` decoder blocks of the actor (the LM policy's
``train_layers=k``: embeddings and blocks ``0 .. s-1`` frozen, ``s = n - k``), the hidden
state entering block ``s`` of every token depends only on frozen weights. The env computes
it anyway while it generates (the prompt's prefill and one incremental step per token), so
:class:`envs.lm_core.Contexts` can keep it per context (``keep_trunk``), and the update's
teacher-forced forward runs only blocks ``s ..``, the final norm and the head on it
(:func:`top_hidden`), with gradients, instead of the whole model.

Exactness: the top forward is the model's own decoder forward (``model.model`` with
``inputs_embeds`` set to the kept states and only blocks ``s ..`` in its block list), so
the causal mask, the padding mask and the rotary position embeddings come from the same
code as in a full teacher-forced forward; the kept states equal that forward's input of
block ``s`` up to float rounding (they were computed with a KV cache, in other batch
shapes), so the log-probabilities agree to about 1e-5.

Staleness: kept states carry the :func:`frozen_signature` of the weights that made them
(the identity and in-place version counter of every parameter of the embeddings and of
blocks ``0 .. s-1``, and that none of them is trainable). A trainer uses them only while
the current signature is the same; any change (an optimizer step on those weights,
``load_state_dict``, a parameter turned trainable, LoRA adapters injected in a lower
block) makes it run the full forward. Not detected, as in :mod:`envs.reference`: changes
to a frozen block that touch no parameter (a forward hook, a replaced ``forward``).

Supported models: those of :func:`envs.reference.decoder_parts` (Llama-like causal LMs
whose logits are ``lm_head(norm(h))``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def frozen_blocks(parts: dict[str, Any]) -> int:
    """Number ``s`` of leading decoder blocks that, with the embeddings, have no trainable
    parameter, capped at ``n - 1`` (the top forward always runs at least one block);
    0 when the embeddings train."""
    if any(p.requires_grad for p in parts["embed"].parameters()):
        return 0
    layers = parts["layers"]
    frozen = 0
    for block in list(layers)[: len(layers) - 1]:
        if any(p.requires_grad for p in block.parameters()):
            break
        frozen += 1
    return frozen


def frozen_signature(parts: dict[str, Any], split: int) -> tuple | None:
    """What the hidden state entering block ``split`` depends on: ``(split, ids, version)``
    of the parameters of the embeddings and blocks ``0 .. split-1``; None when one of them
    is trainable (then kept states must not be used: their gradient would be missing)."""
    if split <= 0:
        return None
    ids, version = [], 0
    for module in [parts["embed"], *list(parts["layers"])[:split]]:
        for p in module.parameters():
            if p.requires_grad:
                return None
            ids.append(id(p))
            version += p._version
    return split, hash(tuple(ids)), version


@contextmanager
def capture_block_input(layer: nn.Module) -> Iterator[dict[str, Any]]:
    """Record ``box["hidden"]``, the hidden-state input of ``layer``, at each forward in the block."""
    box: dict[str, Any] = {}

    def hook(module, args, kwargs):
        box["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def _top_layers(parts: dict[str, Any], split: int) -> Iterator[None]:
    inner = parts["inner"]
    full = inner.layers
    inner.layers = nn.ModuleList(list(full)[split:])
    try:
        yield
    finally:
        inner.layers = full


def top_hidden(
    parts: dict[str, Any], split: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None, cache: Any = None,
) -> torch.Tensor:
    """The decoder's normed last hidden state ``(B, L, H)`` from the input of block ``split``:
    ``model.model(inputs_embeds=hidden)`` with only blocks ``split ..`` (default positions,
    as a right-padded teacher-forced forward over ``input_ids``, unless ``position_ids``).

    :param cache: a KV cache for blocks ``split ..`` (:func:`envs.reference.new_cache` with
        ``offset=split``) to fill, or None (no cache)
    """
    with _top_layers(parts, split):
        out = parts["inner"](inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=cache is not None)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(len_i, H)`` states with zeros: ``(B, L, H)`` and the ``(B, L)`` mask."""
    width = max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
    mask = torch.zeros((len(states), width), dtype=torch.long, device=states[0].device)
    for row, s in enumerate(states):
        out[row, : s.shape[0]] = s
        mask[row, : s.shape[0]] = 1
    return out, mask
