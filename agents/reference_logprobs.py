"""The reference model's log-probabilities of sampled responses, ``log ref(a_t|s_t)`` per
response token, for the KL terms of GRPO's loss and RLOO's reward.

They are computed once per response after the rollout, not by the env (a per-token
reference forward during the rollout would cost one incremental forward per token for the
same numbers), in the env's distribution (same temperature, no top-k:
:meth:`envs.lm_core.LMCore.ref_log_probs`). Two ways, the cheaper where it is exact:

* :func:`reference_top_logprobs`: when the reference's lower blocks equal the actor's frozen
  ones (``train_layers=k``, :func:`shared_trunk`), only its top blocks run, on the actor's
  hidden state at the split (kept by the rollout or captured in the update's forward);
  :func:`reference_top_logprobs_shared` the same for a group, its prompt run once;
* :func:`reference_logprobs`: otherwise one teacher-forced, gradient-free forward of the
  reference per micro-batch (the prompt once for a group of responses to it).

Each fills ``seg.ref_logprobs`` of the :class:`agents.segments.TextSegment` s it is given.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from agents.lm_forward import HeadOptions, evaluate_kept, evaluate_kept_shared, evaluate_shared_context, evaluate_tokens
from agents.lm_forward import kept_trunk_batch
from agents.segments import TextSegment, group_by_context, micro_batches, pack_segments, shared_context


def _store(micro: Sequence[TextSegment], ref_log_prob: torch.Tensor) -> None:
    ref_log_prob = ref_log_prob.float().cpu()
    for i, seg in enumerate(micro):
        seg.ref_logprobs = ref_log_prob[i, : len(seg)].clone()


def _reference_options(core: Any) -> HeadOptions:
    """The reference's distribution, :meth:`envs.lm_core.LMCore.ref_log_probs`: the env's
    temperature, no top-k; log-probs only."""
    return HeadOptions(temperature=core.temperature, top_k=0, with_entropy=False)


def shared_trunk(core: Any, reference_share: str) -> tuple[Any, int]:
    """``(SharedTrunk, split)`` when the reference can take its lower ``split`` blocks from
    the actor (the env's ``reference_share`` is ``"auto"`` and they are frozen and equal),
    else ``(None, 0)``."""
    if reference_share != "auto":
        return None, 0
    trunk = core.shared_trunk()
    split = trunk.split()
    return (trunk, split) if split else (None, 0)


@torch.no_grad()
def reference_top_logprobs(
    core: Any, trunk: Any, split: int, hidden: torch.Tensor, attention_mask: torch.Tensor, micro: Sequence[TextSegment],
    positions: torch.Tensor, targets: torch.Tensor,
) -> None:
    """``seg.ref_logprobs`` of the segments of one micro-batch from the reference's blocks
    ``split ..`` (its own decoder code: :func:`envs.trunk_states.top_hidden`) run on the
    actor's input of block ``split`` (the tensor the reference's equal, frozen lower blocks
    would produce), right-padded ``(B, L, H)`` with its ``(B, L)`` mask."""
    ref_log_prob, _, _ = evaluate_kept(trunk.ref_parts, hidden.detach(), attention_mask, split, positions, targets,
                                       _reference_options(core))
    _store(micro, ref_log_prob)


@torch.no_grad()
def reference_top_logprobs_shared(core: Any, trunk: Any, split: int, micro: Sequence[TextSegment]) -> None:
    """:func:`reference_top_logprobs` for a group's responses to one prompt (their kept
    trunk states, :func:`agents.segments.shared_context`): the prompt's top blocks run
    once (:func:`agents.lm_forward.evaluate_kept_shared`) and the head only on the real
    response tokens."""
    ref_log_prob, _, _ = evaluate_kept_shared(trunk.ref_parts, micro, split, options=_reference_options(core))
    _store(micro, ref_log_prob)


@torch.no_grad()
def reference_logprobs(core: Any, micro: Sequence[TextSegment], device: torch.device) -> None:
    """``seg.ref_logprobs`` of every response token of one micro-batch, from one
    teacher-forced forward of the reference."""
    if not micro:
        return
    options = _reference_options(core)
    if shared_context(micro):  # one group's responses: the prompt runs once
        ref_log_prob, _, _ = evaluate_shared_context(core.reference, micro, core.pad_id, options)
    else:
        ids, attn, positions, targets = pack_segments(micro, core.pad_id, device)
        ref_log_prob, _, _ = evaluate_tokens(core.reference, ids, attn, positions, targets, options)
    _store(micro, ref_log_prob)


@torch.no_grad()
def fill_reference_logprobs(
    policy: Any, segments: Sequence[TextSegment], micro_batch_tokens: int, reference_share: str, device: torch.device,
) -> None:
    """``seg.ref_logprobs`` of every segment of a rollout (RLOO's KL reward), one micro-batch
    at a time: the reference's top blocks on the kept trunk states where they are shared
    with the actor, else its own forward."""
    core = policy.core
    trunk, split = shared_trunk(core, reference_share)
    for run in group_by_context(list(segments)):
        for micro in micro_batches(run, micro_batch_tokens, lambda s: len(s.context_ids) + len(s)):
            kept = kept_trunk_batch(policy.actor, micro)
            if kept is not None and split and split == kept[2] and shared_context(micro):
                reference_top_logprobs_shared(core, trunk, split, micro)
            elif kept is not None and split and split == kept[2]:
                _, _, positions, targets = pack_segments(micro, core.pad_id, device)
                reference_top_logprobs(core, trunk, split, kept[0], kept[1], micro, positions, targets)
            else:
                reference_logprobs(core, micro, device)
