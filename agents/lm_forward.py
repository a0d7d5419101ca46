"""Teacher-forced forwards of a causal LM over text segments: the new log-probs,
entropies and values of every response token in one forward.

For every response token ``a_t`` one forward over ``context + response`` gives
``log pi(a_t | s_t)``, the entropy of ``pi(. | s_t)`` and the value ``V(s_t)`` (the value
head reads the trunk's hidden state at the last token of ``s_t``, the same position whose
logits predict ``a_t``). Three variants give the same numbers up to float rounding:

* :func:`evaluate_tokens` (and :func:`evaluate_segments` on segments): the full forward.
* :func:`evaluate_shared_context`: responses to one prompt, the prompt run once.
* :func:`kept_trunk_batch` / :func:`evaluate_kept`: from the frozen lower blocks' output
  that the rollout kept, only the trainable top blocks run;
  :func:`evaluate_kept_shared` the same for a group's responses, its prompt run once.

Given the real length of each row, the head (vocabulary-sized, the costliest part of a
small model's update) runs on the real response tokens only, not on the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from agents.segments import TextSegment, pack_segments
from envs.decoder import trunk_and_head
from envs.sampling import sampling_log_probs

@dataclass
class SegmentEval:
    """Outputs of :func:`evaluate_segments`, each a list with one ``(T_i,)`` tensor per
    segment (``values`` is None without a value head)."""

    logprobs: list[torch.Tensor]
    entropies: list[torch.Tensor]
    values: list[torch.Tensor] | None


def evaluate_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
    lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One teacher-forced forward: log-probs (and entropies, values) of the target tokens.

    Only the hidden states at ``positions`` go through the LM head, so the prompt tokens
    cost no vocabulary-sized matrix product.

    :param model: Hugging Face causal LM (possibly PEFT-wrapped).
    :param input_ids: ``(B, L)``.
    :param attention_mask: ``(B, L)``.
    :param positions: ``(B, T)`` index of the hidden state that predicts each target.
    :param targets: ``(B, T)`` target token ids.
    :param value_head: maps hidden states ``(..., H)`` to values ``(..., 1)`` or ``(...)``;
        None for no values.
    :param temperature: the sampling temperature of the env; log-probs are those of
        ``softmax(logits / temperature)``, the distribution the actions were drawn from.
    :param with_entropy: also return the entropy of each predicted distribution.
    :param top_k: the env's top-k (0 = off), part of the sampling distribution.
    :param entropy_grad: False computes the entropies without gradient (for logging only:
        a loss with ``ent_coef = 0`` then skips their vocabulary-sized backward).
    :param lengths: the number of real targets of each row (None: all ``T``); the head
        then runs on those only and the padding entries of the outputs are 0.
    :return: ``(logprobs, entropies, values)``, each ``(B, T)`` (the last two may be None).
    """
    trunk, head = trunk_and_head(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
    return _token_outputs(hidden, head, positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad,
                          lengths)


def _token_outputs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    positions: torch.Tensor,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None,
    temperature: float,
    with_entropy: bool,
    top_k: int,
    entropy_grad: bool = True,
    lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs, entropies and values at ``positions`` of the decoder's normed last
    hidden state ``(B, L, H)`` (the tail of :func:`evaluate_tokens`).

    With ``lengths`` (the number of real targets of each row, the rest padding) the head
    and everything after it run on the real tokens only (the vocabulary-sized head and
    its backward are the costliest part of a small model's update) and the padding
    entries of the outputs are 0."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    h = torch.gather(hidden, 1, index)  # (B, T, H)
    real = None
    if lengths is not None:
        B, T = targets.shape
        real = torch.arange(T, device=targets.device)[None] < torch.as_tensor(list(lengths), device=targets.device)[:, None]
        if bool(real.all()):
            real = None
        else:
            h, targets = h[real], targets[real]  # (N, H), (N,)
    logp_all = sampling_log_probs(head(h), temperature, top_k)
    logprobs = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
    entropies = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropies = -(logp_all.exp() * logp_all).sum(-1)
    values = None
    if value_head is not None:
        values = value_head(h)
        if values.dim() == h.dim():  # (..., 1)
            values = values.squeeze(-1)
        values = values.float()
    if real is not None:
        logprobs, entropies, values = (None if x is None else _scatter_rows(x, real) for x in (logprobs, entropies, values))
    return logprobs, entropies, values


def _scatter_rows(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` zeros with the packed values ``x`` ``(N,)`` at the ``real`` entries (differentiable)."""
    return torch.zeros(real.shape, dtype=x.dtype, device=x.device).masked_scatter(real, x)


def evaluate_shared_context(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    pad_token_id: int,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`evaluate_tokens` for segments with one common context (:func:`shared_context`):
    the context runs ONCE (its KV cache, with gradients, repeated to every segment) and
    then the responses, so a group of ``G`` responses to a prompt of ``c`` tokens costs
    ``c + G * T`` token-forwards instead of ``G * (c + T)``. Same outputs, in the layout of
    :func:`pack_segments` (``(B, Tmax)``), up to float rounding; gradients flow through
    the shared context into every weight. The padding entries of the outputs are 0.
    """
    from envs.kv_cache import output_cache

    trunk, head = trunk_and_head(model)
    device = next(model.parameters()).device
    context = segments[0].context_ids.to(device)
    c, B, T = len(context), len(segments), max(len(s) for s in segments)
    first = trunk(input_ids=context[None], use_cache=True)
    hidden = first.last_hidden_state[:, -1:].expand(B, 1, -1)
    targets = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(segments):
        targets[i, : len(s)] = s.response_ids
    targets = targets.to(device)
    if T > 1:
        cache = output_cache(first)
        cache.batch_repeat_interleave(B)
        # the responses' tokens but the last (which predicts nothing), right-padded
        response_mask = torch.zeros((B, T - 1), dtype=torch.long)
        for i, s in enumerate(segments):
            response_mask[i, : len(s) - 1] = 1
        feed = targets[:, : T - 1].masked_fill(~response_mask.bool().to(device), int(pad_token_id))
        attention_mask = torch.cat([torch.ones((B, c), dtype=torch.long), response_mask], 1).to(device)
        position_ids = (c + torch.arange(T - 1, device=device))[None].expand(B, T - 1)
        rest = trunk(input_ids=feed, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        hidden = torch.cat([hidden, rest.last_hidden_state], 1)
    positions = torch.arange(T, device=device)[None].expand(B, T)
    return _token_outputs(hidden, head, positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad,
                          [len(s) for s in segments])


def kept_trunk_batch(model: torch.nn.Module, segments: Sequence[TextSegment]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(hidden (B, L, H), attention_mask (B, L), split)``: the kept frozen-trunk states of
    ``segments`` right-padded, when every segment has them and they were made by the
    model's current frozen weights (same :func:`envs.trunk_states.frozen_signature`, so
    the lower blocks are still frozen and unchanged); else None (run the full forward).
    ``L`` is one less than :func:`pack_segments`'s width: the last token predicts nothing."""
    from envs.decoder import decoder_parts
    from envs.trunk_states import frozen_signature, pad_states

    sig = segments[0].trunk_sig if segments else None
    if sig is None or any(s.trunk_states is None or s.trunk_sig != sig for s in segments):
        return None
    parts = decoder_parts(model)[0]
    if parts is None or frozen_signature(parts, sig[0]) != sig:
        return None
    device = next(model.parameters()).device
    hidden, mask = pad_states([s.trunk_states.to(device) for s in segments])
    return hidden, mask, sig[0]


def evaluate_kept(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    split: int,
    positions: torch.Tensor,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
    lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`evaluate_tokens` from kept frozen-trunk states (:func:`kept_trunk_batch`):
    only blocks ``split ..``, the final norm and the head run (with gradients), on the
    model's own decoder code (:func:`envs.trunk_states.top_hidden`); equal to the full
    forward up to float rounding. ``lengths`` as in :func:`evaluate_tokens`."""
    from envs.decoder import decoder_parts
    from envs.trunk_states import top_hidden

    parts = decoder_parts(model)[0]
    h = top_hidden(parts, split, hidden, attention_mask)
    return _token_outputs(h, parts["head"], positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad,
                          lengths)


def kept_shared_hidden(parts: dict, split: int, segments: Sequence[TextSegment]) -> torch.Tensor:
    """The normed last hidden state that predicts each response token, ``(B, Tmax, H)``
    (right-padded), from blocks ``split ..`` of ``parts`` (:func:`envs.decoder.decoder_parts`)
    run on the kept frozen-trunk states of segments with ONE common context (a group's
    responses to its prompt, :func:`agents.segments.shared_context`): the context's states
    run once, their KV cache (with gradients) is repeated to every segment, then the
    responses' states run. A group of ``G`` responses to a prompt of ``c`` tokens costs
    ``c + G * T`` top-block token-forwards instead of ``G * (c + T)``; equal to
    :func:`envs.trunk_states.top_hidden` over the right-padded batch
    (:func:`kept_trunk_batch`) at the prediction positions, up to float rounding."""
    from envs.kv_cache import new_cache
    from envs.trunk_states import pad_states, top_hidden

    device = next(parts["inner"].parameters()).device
    c, B, T = len(segments[0].context_ids), len(segments), max(len(s) for s in segments)
    states = [s.trunk_states.to(device) for s in segments]  # (c + T_i - 1, H) each
    cache = new_cache(None, split) if T > 1 else None
    ones = torch.ones((1, c), dtype=torch.long, device=device)
    first = top_hidden(parts, split, states[0][None, :c], ones, cache=cache)
    hidden = first[:, -1:].expand(B, 1, -1)
    if T > 1:
        cache.batch_repeat_interleave(B)
        # each response's tokens but the last (which predicts nothing), right-padded; a
        # padded query still sees the context, so no row of the attention is fully masked
        rest, rest_mask = pad_states([s[c:] for s in states], T - 1)
        attention_mask = torch.cat([ones.expand(B, c), rest_mask], 1)
        position_ids = (c + torch.arange(T - 1, device=device))[None].expand(B, T - 1)
        out = top_hidden(parts, split, rest, attention_mask, position_ids=position_ids, cache=cache)
        hidden = torch.cat([hidden, out], 1)
    return hidden


def evaluate_kept_shared(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    split: int,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`evaluate_kept` for segments with one common context, the context's top
    blocks run once (:func:`kept_shared_hidden`); ``targets`` ``(B, Tmax)`` as
    :func:`agents.segments.pack_segments` gives them. Same outputs up to float rounding;
    the padding entries are 0 (the head runs on the real tokens only)."""
    from envs.decoder import decoder_parts

    parts = decoder_parts(model)[0]
    h = kept_shared_hidden(parts, split, segments)
    positions = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
    return _token_outputs(h, parts["head"], positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad,
                          [len(s) for s in segments])


def evaluate_segments(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    pad_token_id: int,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
) -> SegmentEval:
    """:func:`evaluate_tokens` on whole segments: one forward for all their tokens.

    :param model: Hugging Face causal LM.
    :param segments: the segments to evaluate (one forward for all of them: split them
        into micro-batches upstream to bound memory).
    :param pad_token_id: id used to right-pad.
    :param value_head: see :func:`evaluate_tokens`.
    :param temperature: see :func:`evaluate_tokens`.
    :param with_entropy: see :func:`evaluate_tokens`.
    :param top_k: see :func:`evaluate_tokens`.
    :return: per-segment log-probs, entropies and values.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, positions, targets = pack_segments(segments, pad_token_id, device)
    logprobs, entropies, values = evaluate_tokens(
        model, input_ids, attention_mask, positions, targets, value_head, temperature, with_entropy, top_k
    )
    lengths = [len(s) for s in segments]
    return SegmentEval(
        logprobs=[logprobs[i, :T] for i, T in enumerate(lengths)],
        entropies=[entropies[i, :T] for i, T in enumerate(lengths)] if entropies is not None else [],
        values=[values[i, :T] for i, T in enumerate(lengths)] if values is not None else None,
    )
