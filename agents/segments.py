"""Text segments: the tokens one environment produced in a row from one context.

In the token MDP every state is a prefix of the next one, so the generic on-policy path
(one policy forward per stored state, as SB3 does) repeats the same work once per token.
The text agents regroup a rollout into :class:`TextSegment` s (normally whole responses)
and evaluate all tokens of a segment with one teacher-forced forward
(:mod:`agents.lm_forward`). This module holds the segment and how segments are batched:
right-padded packing, per-token fields, micro-batches under a token budget, minibatches of
whole responses, and runs of segments that share a context (a GRPO group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from agents import distributed

@dataclass
class TextSegment:
    """The tokens one environment produced in a row from one context.

    :param context_ids: token ids of the state before the first action (the prompt, plus
        any part of the response generated in an earlier rollout).
    :param response_ids: the actions, one token id each, shape ``(T,)``.
    :param old_logprobs: ``log pi_old(a_t | s_t)`` under the policy that acted, ``(T,)``.
    :param rewards: per-token rewards from the env (KL penalty + score at the last), ``(T,)``.
    :param old_values: ``V_old(s_t)``, ``(T,)`` (zeros for critic-free agents).
    :param ref_logprobs: ``log pi_ref(a_t | s_t)`` from the env's info, ``(T,)``.
    :param terminated: whether the response ended inside this segment (EOS or length
        limit): then there is no value to bootstrap after the last token.
    :param last_value: ``V(s_T)`` to bootstrap from when not terminated.
    :param score: the reward-model score of the finished response (None if unfinished).
    :param prompt: the prompt text, for logging.
    :param response: the decoded response, for logging.
    :param group: index of the prompt group (GRPO), or -1.
    :param trunk_states: the actor's hidden states entering its first trainable block for
        the first ``len(context_ids) + T - 1`` tokens, kept by the env during the rollout
        (None when not kept); see :func:`kept_trunk_batch`.
    :param trunk_sig: the :func:`envs.trunk_states.frozen_signature` they were made under.
    """

    context_ids: torch.Tensor
    response_ids: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    terminated: bool = True
    last_value: float = 0.0
    score: float | None = None
    prompt: str = ""
    response: str = ""
    group: int = -1
    advantages: torch.Tensor | None = field(default=None, repr=False)
    returns: torch.Tensor | None = field(default=None, repr=False)
    trunk_states: torch.Tensor | None = field(default=None, repr=False)
    trunk_sig: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])


def is_truncated(segment: TextSegment, eos_ids: Collection[int]) -> bool:
    """Whether the response ended without an end-of-sequence token, cut by the length limit
    (TRL's truncated completion: its last token is not an EOS). An empty segment is not."""
    return len(segment) > 0 and int(segment.response_ids[-1]) not in eos_ids


def pack_segments(
    segments: Sequence[TextSegment], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``context + response`` of each segment into one batch.

    Right padding keeps every real token at its natural position (0, 1, ...), so no
    position ids are needed.

    :return: ``(input_ids, attention_mask, positions, targets)``: ``(B, L)`` ids and mask;
        ``positions`` ``(B, Tmax)`` the index of the token whose output predicts each
        response token (padded with 0) and ``targets`` ``(B, Tmax)`` the response tokens
        (padded with 0). A ``(B, Tmax)`` mask of real response tokens is
        ``positions > 0`` or better ``response_mask(segments)``.
    """
    lengths = [len(s.context_ids) + len(s) for s in segments]
    L = max(lengths)
    Tmax = max(len(s) for s in segments)
    B = len(segments)
    input_ids = torch.full((B, L), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, Tmax), dtype=torch.long)
    targets = torch.zeros((B, Tmax), dtype=torch.long)
    for i, s in enumerate(segments):
        c, T = len(s.context_ids), len(s)
        if c == 0:
            raise ValueError("a text segment needs a non-empty context (at least the prompt)")
        input_ids[i, :c] = s.context_ids
        input_ids[i, c : c + T] = s.response_ids
        attention_mask[i, : c + T] = 1
        positions[i, :T] = torch.arange(c - 1, c - 1 + T)
        targets[i, :T] = s.response_ids
    return input_ids.to(device), attention_mask.to(device), positions.to(device), targets.to(device)


def response_mask(segments: Sequence[TextSegment], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, Tmax)`` float mask of the real response tokens of :func:`pack_segments`."""
    Tmax = max(len(s) for s in segments)
    mask = torch.zeros((len(segments), Tmax))
    for i, s in enumerate(segments):
        mask[i, : len(s)] = 1.0
    return mask.to(device)


@torch.no_grad()
def add_masked_sums(sums: dict[str, float], mask: torch.Tensor, **values: torch.Tensor) -> None:
    """``sums[name] += sum of values[name] over the real response tokens`` (``mask`` from
    :func:`response_mask`; a ``(B, 1)`` value counts once per token of its response)."""
    for name, value in values.items():
        sums[name] += float((value.expand_as(mask) * mask).sum())


def pad_field(segments: Sequence[TextSegment], name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack the per-token field ``name`` of each segment into ``(B, Tmax)``, zero-padded."""
    Tmax = max(len(s) for s in segments)
    out = torch.zeros((len(segments), Tmax))
    for i, s in enumerate(segments):
        out[i, : len(s)] = getattr(s, name).float()
    return out.to(device)


def group_by_context(segments: Sequence[TextSegment]) -> list[list[TextSegment]]:
    """The segments split into runs with equal contexts (first-seen order, order kept
    inside each run), so each run's micro-batches can use :func:`evaluate_shared_context`."""
    runs: dict[tuple, list[TextSegment]] = {}
    for seg in segments:
        runs.setdefault(tuple(seg.context_ids.tolist()), []).append(seg)
    return list(runs.values())


def shared_context(segments: Sequence[TextSegment]) -> bool:
    """Whether two or more segments all continue the same context (a GRPO group's responses
    to one prompt), so :func:`evaluate_shared_context` applies."""
    if len(segments) < 2 or any(len(s) == 0 for s in segments):
        return False
    first = segments[0].context_ids
    return all(s.context_ids.shape == first.shape and torch.equal(s.context_ids, first) for s in segments[1:])


def micro_batches(items: Sequence, max_tokens: int, length: Callable[[object], int]) -> list[list]:
    """Split ``items`` into consecutive micro-batches whose padded size (count x longest)
    stays under ``max_tokens`` (at least one item each): gradient accumulation over
    these bounds the activation memory of a minibatch.

    :param items: the items (segments).
    :param max_tokens: budget of padded tokens per micro-batch.
    :param length: the padded length of an item (context + response).
    """
    batches: list[list] = []
    current: list = []
    longest = 0
    for item in items:
        n = length(item)
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def split_minibatches(segments: list[TextSegment], tokens_per_batch: int, generator: torch.Generator | None = None) -> list[list[TextSegment]]:
    """Shuffle whole responses into minibatches of about ``tokens_per_batch`` tokens."""
    order = torch.randperm(len(segments), generator=generator).tolist()
    total = sum(len(s) for s in segments)
    n_batches = max(1, min(len(segments), round(total / max(1, tokens_per_batch))))
    # under torchrun every rank must take as many optimizer steps (each ends in an all-reduce)
    n_batches = distributed.allreduce_min(n_batches)
    return [[segments[j] for j in chunk] for chunk in np.array_split(np.array(order), n_batches) if len(chunk)]
