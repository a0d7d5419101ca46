"""Teacher-forced forwards of a causal LM over text segments: the new log-probs,
entropies and values of every response token in one forward.

For every response token ``a_t`` one forward over ``context + response`` gives
``log pi(a_t | s_t)``, the entropy of ``pi(. | s_t)`` and the value ``V(s_t)`` (the value
head reads the trunk's hidden state at the last token of ``s_t``, the same position whose
logits predict ``a_t``). :class:`HeadOptions` says which of these to compute and in which
sampling distribution. The variants give the same numbers up to float rounding:

* :func:`evaluate_tokens` (and :func:`evaluate_segments` on segments): the full forward.
* :func:`evaluate_shared_context`: responses to one prompt, the prompt run once.
* :func:`kept_trunk_batch` / :func:`evaluate_kept`: from the frozen lower blocks' output
  that the rollout kept, only the trainable top blocks run;
  :func:`evaluate_kept_shared` the same for a group's responses, its prompt run once.

The two prompt-once variants share :func:`_context_once`. Given the real length of each
row, the head (vocabulary-sized, the costliest part of a small model's update) runs on the
real response tokens only, not on the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from agents.segments import TextSegment, pack_segments
from envs.decoder import trunk_and_head
from envs.sampling import sampling_log_probs

# (logprobs, entropies, values), each (B, T); the last two None when not asked for
TokenOutputs = tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class HeadOptions:
    """What the head computes at each response token, and in which distribution.

    :param temperature: the sampling temperature of the env; log-probs are those of
        ``softmax(logits / temperature)``, the distribution the actions were drawn from.
    :param top_k: the env's top-k (0 = off), part of the sampling distribution.
    :param with_entropy: also return the entropy of each predicted distribution.
    :param entropy_grad: False computes the entropies without gradient (for logging only:
        a loss with ``ent_coef = 0`` then skips their vocabulary-sized backward).
    :param value_head: maps hidden states ``(..., H)`` to values ``(..., 1)`` or ``(...)``;
        None for no values.
    """

    temperature: float = 1.0
    top_k: int = 0
    with_entropy: bool = True
    entropy_grad: bool = True
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None


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
    options: HeadOptions = HeadOptions(),
    lengths: Sequence[int] | None = None,
) -> TokenOutputs:
    """One teacher-forced forward: log-probs (and entropies, values) of the target tokens.

    Only the hidden states at ``positions`` go through the LM head, so the prompt tokens
    cost no vocabulary-sized matrix product.

    :param model: Hugging Face causal LM (possibly PEFT-wrapped).
    :param input_ids: ``(B, L)``.
    :param attention_mask: ``(B, L)``.
    :param positions: ``(B, T)`` index of the hidden state that predicts each target.
    :param targets: ``(B, T)`` target token ids.
    :param options: the sampling distribution and which outputs to compute.
    :param lengths: the number of real targets of each row (None: all ``T``); the head
        then runs on those only and the padding entries of the outputs are 0.
    :return: ``(logprobs, entropies, values)``, each ``(B, T)`` (the last two may be None).
    """
    trunk, head = trunk_and_head(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
    return _token_outputs(hidden, head, positions, targets, options, lengths)


def _token_outputs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    positions: torch.Tensor | None,
    targets: torch.Tensor,
    options: HeadOptions,
    lengths: Sequence[int] | None = None,
) -> TokenOutputs:
    """Log-probs, entropies and values at ``positions`` of the decoder's normed last
    hidden state ``(B, L, H)`` (the tail of every variant); ``positions`` None when
    ``hidden[:, t]`` already predicts ``targets[:, t]``.

    With ``lengths`` (the number of real targets of each row, the rest padding) the head
    and everything after it run on the real tokens only (the vocabulary-sized head and
    its backward are the costliest part of a small model's update) and the padding
    entries of the outputs are 0."""
    if positions is None:
        h = hidden.contiguous()  # (B, T, H)
    else:
        h = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, T, H)
    real = None
    if lengths is not None:
        B, T = targets.shape
        real = torch.arange(T, device=targets.device)[None] < torch.as_tensor(list(lengths), device=targets.device)[:, None]
        if bool(real.all()):
            real = None
        else:
            h, targets = h[real], targets[real]  # (N, H), (N,)
    logp_all = sampling_log_probs(head(h), options.temperature, options.top_k)
    logprobs = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
    entropies = None
    if options.with_entropy:
        with torch.set_grad_enabled(options.entropy_grad and torch.is_grad_enabled()):
            entropies = -(logp_all.exp() * logp_all).sum(-1)
    values = None
    if options.value_head is not None:
        values = options.value_head(h)
        if values.dim() == h.dim():  # (..., 1)
            values = values.squeeze(-1)
        values = values.float()
    if real is not None:
        logprobs, entropies, values = (None if x is None else _scatter_rows(x, real) for x in (logprobs, entropies, values))
    return logprobs, entropies, values


def _scatter_rows(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` zeros with the packed values ``x`` ``(N,)`` at the ``real`` entries (differentiable)."""
    return torch.zeros(real.shape, dtype=x.dtype, device=x.device).masked_scatter(real, x)


def _context_once(
    run: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Any], tuple[torch.Tensor, Any]],
    context: torch.Tensor,
    responses: torch.Tensor,
    lengths: Sequence[int],
) -> torch.Tensor:
    """The normed last hidden state that predicts each response token, ``(B, Tmax, H)``
    (right-padded), of responses to ONE common context: the context runs once, its KV
    cache (with gradients) is repeated to every response, then the responses run. A group
    of ``G`` responses to a context of ``c`` tokens costs ``c + G * T`` token-forwards
    instead of ``G * (c + T)``.

    :param run: ``run(inputs, attention_mask, position_ids, cache) -> (hidden, cache)``:
        the decoder (or its top blocks) on ``inputs`` ``(b, n, ...)``, extending ``cache``
        (None: a new one); the masks and positions are None for the context alone.
    :param context: the context's inputs ``(1, c, ...)``.
    :param responses: each response's inputs but its last token's (which predicts nothing),
        right-padded ``(B, Tmax - 1, ...)``.
    :param lengths: the number of tokens of each response.
    """
    c, B, T = context.shape[1], len(lengths), max(lengths)
    first, cache = run(context, None, None, None)
    hidden = first[:, -1:].expand(B, 1, -1)
    if T == 1:
        return hidden
    device = hidden.device
    cache.batch_repeat_interleave(B)
    # a padded query still sees the context, so no row of the attention is fully masked
    rest_mask = (torch.arange(T - 1)[None] < torch.tensor(lengths)[:, None] - 1).long()
    attention_mask = torch.cat([torch.ones((B, c), dtype=torch.long), rest_mask], 1).to(device)
    position_ids = (c + torch.arange(T - 1, device=device))[None].expand(B, T - 1)
    rest, _ = run(responses, attention_mask, position_ids, cache)
    return torch.cat([hidden, rest], 1)


def _response_targets(segments: Sequence[TextSegment], device: torch.device) -> torch.Tensor:
    """The segments' response ids right-padded with 0: ``(B, Tmax)``, as :func:`pack_segments` gives them."""
    targets = torch.zeros((len(segments), max(len(s) for s in segments)), dtype=torch.long)
    for i, s in enumerate(segments):
        targets[i, : len(s)] = s.response_ids
    return targets.to(device)


def evaluate_shared_context(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    pad_token_id: int,
    options: HeadOptions = HeadOptions(),
) -> TokenOutputs:
    """:func:`evaluate_tokens` for segments with one common context (:func:`shared_context`),
    the context run once (:func:`_context_once`). Same outputs, in the layout of
    :func:`pack_segments` (``(B, Tmax)``), up to float rounding; gradients flow through
    the shared context into every weight. The padding entries of the outputs are 0.
    """
    from envs.kv_cache import output_cache

    trunk, head = trunk_and_head(model)
    device = next(model.parameters()).device
    lengths = [len(s) for s in segments]
    targets = _response_targets(segments, device)
    # the responses' tokens but the last, right-padded with the pad id
    feed = targets[:, :-1].clone()
    for i, n in enumerate(lengths):
        feed[i, n - 1:] = int(pad_token_id)

    def run(input_ids, attention_mask, position_ids, cache):
        if cache is None:
            out = trunk(input_ids=input_ids, use_cache=True)
        else:
            out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=True)
        return out.last_hidden_state, output_cache(out)

    hidden = _context_once(run, segments[0].context_ids.to(device)[None], feed, lengths)
    return _token_outputs(hidden, head, None, targets, options, lengths)


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
    model: torch.nn.Module | dict,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    split: int,
    positions: torch.Tensor,
    targets: torch.Tensor,
    options: HeadOptions = HeadOptions(),
    lengths: Sequence[int] | None = None,
) -> TokenOutputs:
    """:func:`evaluate_tokens` from kept frozen-trunk states (:func:`kept_trunk_batch`):
    only blocks ``split ..``, the final norm and the head run (with gradients), on the
    model's own decoder code (:func:`envs.trunk_states.top_hidden`); equal to the full
    forward up to float rounding. ``model`` may also be the :func:`envs.decoder.decoder_parts`
    of one (the reference's, :func:`agents.reference_logprobs.reference_top_logprobs`);
    ``lengths`` as in :func:`evaluate_tokens`."""
    from envs.trunk_states import top_hidden

    parts = _parts(model)
    h = top_hidden(parts, split, hidden, attention_mask)
    return _token_outputs(h, parts["head"], positions, targets, options, lengths)


def _parts(model: torch.nn.Module | dict) -> dict:
    """:func:`envs.decoder.decoder_parts` of ``model`` (or ``model`` itself when it is them)."""
    from envs.decoder import decoder_parts

    return model if isinstance(model, dict) else decoder_parts(model)[0]


def kept_shared_hidden(parts: dict, split: int, segments: Sequence[TextSegment]) -> torch.Tensor:
    """The normed last hidden state that predicts each response token, ``(B, Tmax, H)``
    (right-padded), from blocks ``split ..`` of ``parts`` (:func:`envs.decoder.decoder_parts`)
    run on the kept frozen-trunk states of segments with ONE common context (a group's
    responses to its prompt, :func:`agents.segments.shared_context`), the context's states
    run once (:func:`_context_once`); equal to :func:`envs.trunk_states.top_hidden` over
    the right-padded batch (:func:`kept_trunk_batch`) at the prediction positions, up to
    float rounding."""
    from envs.kv_cache import new_cache
    from envs.trunk_states import pad_states, top_hidden

    device = next(parts["inner"].parameters()).device
    c, lengths = len(segments[0].context_ids), [len(s) for s in segments]
    states = [s.trunk_states.to(device) for s in segments]  # (c + T_i - 1, H) each
    rest = pad_states([s[c:] for s in states], max(lengths) - 1)[0] if max(lengths) > 1 else None

    def run(inputs, attention_mask, position_ids, cache):
        if cache is None:  # the context alone
            attention_mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=device)
            cache = new_cache(None, split) if max(lengths) > 1 else None
        return top_hidden(parts, split, inputs, attention_mask, position_ids=position_ids, cache=cache), cache

    return _context_once(run, states[0][None, :c], rest, lengths)


def evaluate_kept_shared(
    model: torch.nn.Module | dict,
    segments: Sequence[TextSegment],
    split: int,
    targets: torch.Tensor | None = None,
    options: HeadOptions = HeadOptions(),
) -> TokenOutputs:
    """:func:`evaluate_kept` for segments with one common context, the context's top
    blocks run once (:func:`kept_shared_hidden`); ``targets`` ``(B, Tmax)`` as
    :func:`agents.segments.pack_segments` gives them (None: built here). Same outputs up
    to float rounding; the padding entries are 0 (the head runs on the real tokens only)."""
    parts = _parts(model)
    h = kept_shared_hidden(parts, split, segments)
    if targets is None:
        targets = _response_targets(segments, h.device)
    return _token_outputs(h, parts["head"], None, targets, options, [len(s) for s in segments])


def evaluate_segments(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    pad_token_id: int,
    options: HeadOptions = HeadOptions(),
) -> SegmentEval:
    """:func:`evaluate_tokens` on whole segments: one forward for all their tokens.

    :param model: Hugging Face causal LM.
    :param segments: the segments to evaluate (one forward for all of them: split them
        into micro-batches upstream to bound memory).
    :param pad_token_id: id used to right-pad.
    :param options: see :class:`HeadOptions`.
    :return: per-segment log-probs, entropies and values.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, positions, targets = pack_segments(segments, pad_token_id, device)
    logprobs, entropies, values = evaluate_tokens(model, input_ids, attention_mask, positions, targets, options)
    lengths = [len(s) for s in segments]
    return SegmentEval(
        logprobs=[logprobs[i, :T] for i, T in enumerate(lengths)],
        entropies=[entropies[i, :T] for i, T in enumerate(lengths)] if entropies is not None else [],
        values=[values[i, :T] for i, T in enumerate(lengths)] if values is not None else None,
    )
