"""A causal LM's frozen lower trunk, run once per sequence: training the top blocks re-runs only them.

When a trainer updates only the last ``k`` decoder blocks and the final norm (the
embeddings and the head frozen, as :func:`rlhf_env.training.train_last_layers` sets it),
the hidden state that enters block ``s = n - k`` of a given sequence never changes during
training. :class:`FrozenTrunk` computes it once (no gradients) and keeps it per
sequence; every later forward of that sequence runs only blocks ``s .. n-1``, the final
norm and the head, on the kept hidden state. Several epochs then cost little more than
one, and the reference log-probabilities (the policy before training) come from the same
kept states.

Exactness: the top forward is the model's own decoder forward (``model.model`` with
``inputs_embeds`` set to the kept hidden state and only the top blocks in its block
list), so the causal mask, the padding mask and the rotary position embeddings are built
by the same code from the same shapes as in a full forward; log-probabilities agree with
the full forward's up to float rounding (tested to 1e-4). Padding positions of a batch
hold zeros instead of the pad token's hidden state: right padding, so no real position
attends to them.

The head is applied only at the positions whose log-probability counts (the response
tokens), not at every position: on SmolLM2-135M the 49,152-token head costs about as much
per token as seven decoder blocks.

Supported models: Llama-like causal LMs whose decoder feeds ``inputs_embeds`` unscaled to
its blocks and whose logits are ``lm_head(norm(h))`` (model types in
:data:`SUPPORTED_MODEL_TYPES`). :meth:`FrozenTrunk.build` returns ``None`` (with the reason
in :func:`unsupported_reason`) for any other model, or when a parameter below the top
blocks is trainable; the caller then runs full forwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from envs.reference import SUPPORTED_MODEL_TYPES, decoder_parts  # noqa: F401 (SUPPORTED_MODEL_TYPES: re-exported, documented above)


class _Stop(Exception):
    """Raised by the capture hook: the blocks above the frozen trunk need not run."""


def _parts(model: nn.Module) -> tuple[Optional[tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module]], Optional[str]]:
    """``((inner, layers, embed, head), None)`` or ``(None, reason)`` (see
    :func:`envs.reference.decoder_parts`, which the env's shared reference uses too)."""
    parts, reason = decoder_parts(model)
    if parts is None:
        return None, reason
    return (parts["inner"], parts["layers"], parts["embed"], parts["head"]), None


def unsupported_reason(model: nn.Module, trainable_layers: Optional[int]) -> Optional[str]:
    """Why :class:`FrozenTrunk` cannot serve ``model`` trained on its top ``trainable_layers``
    blocks (None when it can)."""
    if trainable_layers is None:
        return "all weights are trained (trainable_layers=None): nothing is frozen"
    parts, reason = _parts(model)
    if parts is None:
        return reason
    _, layers, embed, _ = parts
    if not 1 <= trainable_layers <= len(layers):
        return f"trainable_layers={trainable_layers} is not in 1..{len(layers)}"
    split = len(layers) - trainable_layers
    frozen = [embed] + list(layers)[:split]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        return f"a parameter of the embeddings or of blocks 0..{split - 1} is trainable"
    return None


class FrozenTrunk:
    """Hidden states entering block ``n - trainable_layers``, kept per sequence, and the
    top forward that turns them into summed response log-probabilities.

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
        self.inner, self.layers, self.embed, self.head = _parts(model)[0]
        self.split = len(self.layers) - trainable_layers

    @classmethod
    def build(cls, model: nn.Module, trainable_layers: Optional[int]) -> Optional["FrozenTrunk"]:
        """A trunk for ``model``, or ``None`` when :func:`unsupported_reason` gives a reason."""
        return None if unsupported_reason(model, trainable_layers) is not None else cls(model, trainable_layers)

    # --- the frozen part, once -------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state entering block ``split`` for a right-padded batch, ``(B, T, H)``
        (the embeddings when ``split == 0``); the blocks from ``split`` on do not run."""
        box: dict = {}

        def hook(module, args, kwargs):
            box["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.layers[self.split].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "hidden" not in box:
            raise RuntimeError(f"the forward of {type(self.model).__name__} did not reach block {self.split}")
        return box["hidden"]

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

        from rlhf_env.training import pad_right

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
                ids, mask = pad_right([distinct[i] for i in idx], pad_id, device)
                h = self.hidden(ids, mask)
                for row, i in enumerate(idx):
                    states[i] = h[row, : len(distinct[i])].clone()
        finally:
            self.model.train(was_training)
        return [states[j] for j in slot]  # type: ignore[misc]

    # --- the top blocks, every step --------------------------------------------------------
    @contextmanager
    def _top_blocks(self) -> Iterator[None]:
        """The decoder's block list holds only blocks ``split ..`` inside the block."""
        full = self.inner.layers
        self.inner.layers = nn.ModuleList(list(full)[self.split :])
        try:
            yield
        finally:
            self.inner.layers = full

    def logprobs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Summed ``log p(token | prefix)`` over the tokens where ``loss_mask`` is 1, from the
        kept hidden states (gradients flow into the top blocks and the norm).

        :param hidden: ``(B, T, H)`` hidden states entering block ``split`` (see :meth:`pad`)
        :param attention_mask: ``(B, T)`` right-padding mask
        :param input_ids: ``(B, T)`` the tokens (targets are ``input_ids[:, 1:]``)
        :param loss_mask: ``(B, T)`` 1 at the tokens whose probability counts
        :return: one float32 log-probability per row, as :func:`rlhf_env.training.sequence_logprobs`
        """
        with self._top_blocks():
            h = self.inner(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = loss_mask[:, 1:].bool()
        logits = self.head(h[:, :-1][mask]).float()  # (n_tokens, vocab): response positions only
        token_logp = -F.cross_entropy(logits, input_ids[:, 1:][mask], reduction="none")
        row = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
        return torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32).index_add(0, row, token_logp)

    @staticmethod
    def pad(kept: Sequence[torch.Tensor], width: Optional[int] = None) -> torch.Tensor:
        """Right-pad kept ``(len, H)`` states with zeros into ``(B, width, H)``."""
        width = width or max(h.shape[0] for h in kept)
        out = kept[0].new_zeros((len(kept), width, kept[0].shape[-1]))
        for row, h in enumerate(kept):
            out[row, : h.shape[0]] = h
        return out
