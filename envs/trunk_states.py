"""The actor's frozen-trunk hidden states, kept from the rollout for the update.

When a trainer updates only the top ``k`` decoder blocks of the actor (the LM policy's
``train_layers=k``: embeddings and blocks ``0 .. s-1`` frozen, ``s = n - k``), the hidden
state entering block ``s`` of every token depends only on frozen weights. The env computes
it anyway while it generates (the prompt's prefill and one incremental step per token), so
:class:`envs.contexts.Contexts` can keep it per context (``keep_trunk``), and the update's
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

Supported models: those of :func:`envs.decoder.decoder_parts` (Llama-like causal LMs
whose logits are ``lm_head(norm(h))``).

The same shortcut for offline training (DPO): :class:`FrozenTrunk` computes, once per
sequence and without gradients, the hidden state entering block ``s``
(:func:`trunk_output`, which stops the forward there), keeps it, and every later forward
of that sequence runs only the top blocks (:func:`top_hidden`) and the head, at the
response positions only (on SmolLM2-135M the 49,152-token head costs about as much per
token as seven decoder blocks). Padding positions of a batch hold zeros instead of the pad
token's hidden state: right padding, so no real position attends to them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from envs.decoder import decoder_parts


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


class _Stop(Exception):
    """Raised by :func:`capture_block_input` with ``stop=True``: the blocks from there on need not run."""


@contextmanager
def capture_block_input(layer: nn.Module, stop: bool = False, with_kwargs: bool = False) -> Iterator[dict[str, Any]]:
    """Record ``box["hidden"]``, the hidden-state input of ``layer``, at each forward in the
    block; with ``stop`` the forward is cut short there (:func:`trunk_output` catches it);
    with ``with_kwargs`` also ``box["kwargs"]``, the layer's other inputs (causal mask,
    position embeddings ...), to run later layers on the same inputs."""
    box: dict[str, Any] = {}

    def hook(module, args, kwargs):
        if with_kwargs and len(args) > 1:
            raise RuntimeError(
                f"{type(module).__name__} got {len(args)} positional arguments; the shared reference trunk "
                "expects (hidden_states, **kwargs): build the env with reference_share='off'"
            )
        box["hidden"] = args[0] if args else kwargs["hidden_states"]
        if with_kwargs:
            box["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if stop:
            raise _Stop

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

    :param cache: a KV cache for blocks ``split ..`` (:func:`envs.kv_cache.new_cache` with
        ``offset=split``) to fill, or None (no cache)
    """
    with _top_layers(parts, split):
        out = parts["inner"](inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=cache is not None)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@torch.no_grad()
def trunk_output(parts: dict[str, Any], split: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state entering block ``split`` of a right-padded batch, ``(B, T, H)`` (the
    embeddings when ``split == 0``), without gradients; the blocks from ``split`` on do not run."""
    with capture_block_input(parts["layers"][split], stop=True) as box:
        try:
            parts["inner"](input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
    if "hidden" not in box:
        raise RuntimeError(f"the decoder's forward did not reach block {split}")
    return box["hidden"]


def pad_states(states: Sequence[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(len_i, H)`` states with zeros to ``width`` (default: the longest):
    ``(B, L, H)`` and the ``(B, L)`` mask."""
    width = width or max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
    mask = torch.zeros((len(states), width), dtype=torch.long, device=states[0].device)
    for row, s in enumerate(states):
        out[row, : s.shape[0]] = s
        mask[row, : s.shape[0]] = 1
    return out, mask


# --- offline training: the frozen trunk of each sequence, once -------------------------------


def unsupported_reason(model: nn.Module, trainable_layers: Optional[int]) -> Optional[str]:
    """Why :class:`FrozenTrunk` cannot serve ``model`` trained on its top ``trainable_layers``
    blocks (None when it can)."""
    if trainable_layers is None:
        return "all weights are trained (trainable_layers=None): nothing is frozen"
    parts, reason = decoder_parts(model)
    if parts is None:
        return reason
    layers = parts["layers"]
    if not 1 <= trainable_layers <= len(layers):
        return f"trainable_layers={trainable_layers} is not in 1..{len(layers)}"
    split = len(layers) - trainable_layers
    frozen = [parts["embed"]] + list(layers)[:split]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        return f"a parameter of the embeddings or of blocks 0..{split - 1} is trainable"
    return None


class FrozenTrunk:
    """Hidden states entering block ``n - trainable_layers``, kept per sequence, and the
    top forward that turns them into summed response log-probabilities (DPO's shortcut).

    Build with :meth:`build` (``None`` when unsupported). The model's lower blocks must stay
    frozen and unchanged while the kept states are used.

    :param model: the causal LM
    :param trainable_layers: the number ``k`` of top blocks that train
    """

    def __init__(self, model: nn.Module, trainable_layers: int):
        reason = unsupported_reason(model, trainable_layers)
        if reason is not None:
            raise ValueError(f"cannot keep the frozen trunk of {type(model).__name__}: {reason}")
        self.model = model
        self.parts = decoder_parts(model)[0]
        self.split = len(self.parts["layers"]) - trainable_layers

    @classmethod
    def build(cls, model: nn.Module, trainable_layers: Optional[int]) -> Optional["FrozenTrunk"]:
        """A trunk for ``model``, or ``None`` when :func:`unsupported_reason` gives a reason."""
        return None if unsupported_reason(model, trainable_layers) is not None else cls(model, trainable_layers)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state entering block ``split`` for a right-padded batch (:func:`trunk_output`)."""
        return trunk_output(self.parts, self.split, input_ids, attention_mask)

    def keep(self, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16, desc: Optional[str] = None) -> list[torch.Tensor]:
        """The hidden state entering block ``split`` of every sequence, unpadded: one
        ``(len, H)`` tensor per sequence, on the model's device, in the model's dtype.
        Equal sequences (a response in several pairs) are run once and share one tensor.

        :param sequences: token id lists
        :param pad_id: the pad token id
        :param batch_size: sequences per no-grad forward (sorted by length, so little padding)
        :param desc: progress-bar label (``None``: no bar)
        """
        from tqdm.auto import tqdm

        from envs.kv_cache import pad_token_ids

        device = next(self.model.parameters()).device
        unique: dict[tuple[int, ...], int] = {}
        slot = [unique.setdefault(tuple(s), len(unique)) for s in sequences]
        distinct = list(unique)
        states: list[Optional[torch.Tensor]] = [None] * len(distinct)
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
                idx = order[start : start + batch_size]
                ids, mask = pad_token_ids([distinct[i] for i in idx], pad_id, device, side="right")
                h = self.hidden(ids, mask)
                for row, i in enumerate(idx):
                    states[i] = h[row, : len(distinct[i])].clone()
        finally:
            self.model.train(was_training)
        return [states[j] for j in slot]  # type: ignore[misc]

    def logprobs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Summed ``log p(token | prefix)`` over the tokens where ``loss_mask`` is 1, from the
        kept hidden states (gradients flow into the top blocks and the norm).

        :param hidden: ``(B, T, H)`` hidden states entering block ``split`` (see :meth:`pad`)
        :param attention_mask: ``(B, T)`` right-padding mask
        :param input_ids: ``(B, T)`` the tokens (targets are ``input_ids[:, 1:]``)
        :param loss_mask: ``(B, T)`` 1 at the tokens whose probability counts
        :return: one float32 log-probability per row
        """
        h = top_hidden(self.parts, self.split, hidden, attention_mask)
        mask = loss_mask[:, 1:].bool()
        logits = self.parts["head"](h[:, :-1][mask]).float()  # (n_tokens, vocab): response positions only
        token_logp = -F.cross_entropy(logits, input_ids[:, 1:][mask], reduction="none")
        row = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
        return torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32).index_add(0, row, token_logp)

    @staticmethod
    def pad(kept: Sequence[torch.Tensor], width: Optional[int] = None) -> torch.Tensor:
        """Right-pad kept ``(len, H)`` states with zeros into ``(B, width, H)``."""
        return pad_states(kept, width)[0]
