"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), SB3's interface.

GRPO drops PPO's critic: it samples ``G`` responses to each prompt and uses the score of
each response relative to its group as the advantage of every one of its tokens.

Per iteration:

1. ``n_envs / group_size`` prompts are drawn; the batched text env is reset with each
   row repeated ``group_size`` times (``reset(options={"row": [...]})``) and runs
   until every sub-env has finished its response
   (:class:`agents.group_rollout.GroupRolloutAlgorithm`).
2. ``A_i = (score_i - mean(group)) / (std(group) + eps)`` for response ``i``, on each of
   its tokens.
3. ``n_epochs`` passes of minibatches of whole responses; one teacher-forced forward per
   micro-batch gives the new log-probs ``log pi(a_t|s_t)``; the loss per token is::

       -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3_t
       k3_t = exp(log ref - log pi) - (log ref - log pi) - 1

   aggregated as TRL's ``loss_type`` says (:func:`agents.losses.aggregate_token_loss`;
   default ``"dapo"``: the mean over the minibatch's tokens, no length bias). TRL's other
   options are here under TRL's names: ``scale_rewards`` (``"group"``, ``"batch"``,
   ``"none"``), ``epsilon_high`` (DAPO's clip-higher),
   ``importance_sampling_level="sequence"`` (GSPO: one ratio per response,
   ``exp(mean_t log ratio_t)``, clipped and applied to all its tokens) and
   ``mask_truncated_completions`` (responses the length limit cut, without EOS, give no
   gradient; DAPO's overlong filtering). Micro-batches hold responses to one prompt,
   whose prompt then runs once for the whole group
   (:func:`agents.lm_forward.evaluate_shared_context`; exact up to float rounding). ``log ref`` is computed once per response in the first epoch, not by
   the env (:mod:`agents.reference_logprobs`): when the reference's lower blocks equal the
   actor's frozen ones (``train_layers=k``) only its top blocks run, on the actor's hidden
   state; else one teacher-forced, gradient-free forward of the reference per micro-batch.

   When only the top ``k`` blocks train, the rollout kept the output of the frozen lower
   blocks for every token (:attr:`agents.segments.TextSegment.trunk_states`) and the
   update runs only the top blocks, the norm and the head on it, a group's prompt once
   (:func:`agents.lm_forward.evaluate_kept_shared`), the head on the real response
   tokens only (exact up to float rounding; the full forward whenever the lower weights
   changed, see :mod:`envs.trunk_states`).

**The env's KL reward and per-token reference are switched off**: GRPO sets the env's
``kl_coef`` to 0 and ``reference_logprobs`` to False when it is built (the KL to the
reference enters through the loss term ``beta * k3`` instead, as in the paper), so the
env's rewards are the scores alone and its infos carry no ``ref_logprob``/``kl``.
``old log pi`` is the log-probability the rollout sampled with (no extra actor forward).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from agents import distributed
from agents.group_rollout import GroupRolloutAlgorithm
from agents.lm_forward import (
    HeadOptions,
    evaluate_kept,
    evaluate_kept_shared,
    evaluate_shared_context,
    evaluate_tokens,
    kept_trunk_batch,
)
from agents.losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS,
    aggregate_token_loss,
    aggregation_weight,
    approx_kl,
    clip_fraction,
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
    sequence_log_ratio,
)
from agents.reference_logprobs import (
    fill_reference_logprobs,
    reference_logprobs,
    reference_top_logprobs,
    reference_top_logprobs_shared,
    shared_trunk,
)
from agents.schedules import get_schedule_fn
from agents.segments import (
    TextSegment,
    add_masked_sums,
    group_by_context,
    is_truncated,
    micro_batches,
    pack_segments,
    pad_field,
    response_mask,
    shared_context,
    split_minibatches,
)
from agents.text_ppo import record_train_stats


class GRPO(GroupRolloutAlgorithm):
    """GRPO on a batched ``TextRLHF`` env.

    :param policy: ``"LMPolicy"`` (the language-model policy; its value head is unused)
    :param env: the batched text env (``gym.make_vec("TextRLHF-v0", num_envs=N)``, or the
        id with ``n_envs=N``); ``N`` must be a multiple of ``group_size``
    :param learning_rate: number, ``"lin_<x>"`` or schedule
    :param group_size: responses per prompt (``G``)
    :param batch_size: tokens per minibatch (the minibatches are made of whole responses)
    :param n_epochs: passes over each rollout (TRL's ``num_iterations``)
    :param clip_range: ratio clip epsilon (TRL's ``epsilon``; the lower bound ``1 - eps``)
    :param epsilon_high: upper clip epsilon (the bound ``1 + epsilon_high``; DAPO's
        clip-higher, which recommends 0.28); None: ``clip_range``
    :param beta: coefficient of the k3 KL-to-reference loss term (0 switches it off)
    :param loss_type: how per-token losses become the minibatch's loss, TRL's names:
        ``"dapo"`` (sum / tokens of the minibatch), ``"grpo"`` (mean per response, then
        over responses), ``"dr_grpo"`` (sum / (responses * max_new_tokens))
    :param scale_rewards: ``"group"`` (divide by the group's std), ``"batch"`` (by the
        std of all scores of the rollout) or ``"none"`` (Dr. GRPO); True/False mean
        ``"group"``/``"none"``
    :param importance_sampling_level: ``"token"`` (one ratio per token) or
        ``"sequence"`` (GSPO: ``exp`` of the mean token log-ratio of the response)
    :param mask_truncated_completions: leave responses that the length limit cut (no EOS)
        out of the loss, as TRL's option of that name and DAPO's overlong filtering do:
        their score still counts in their group's baseline, but they give no gradient (with
        ``loss_type="grpo"``/``"dr_grpo"`` and in RLOO they stay in the mean over responses
        as a zero, with ``"dapo"`` their tokens leave the token count: TRL's arithmetic).
        The score of a cut response says little about the policy (the last number of a
        cut sentence is whatever the cut left), and reinforcing it teaches responses that
        never end. ``rollout/truncated_frac`` logs the share of cut responses either way.
    :param eps: added to the std when scaling rewards
    :param log_kl: with ``beta=0``, still run the reference once per rollout to log the KL
        per response (``rollout/kl_mean``); False skips that forward
    :param ent_coef: entropy bonus weight
    :param max_grad_norm: gradient-norm clip
    :param micro_batch_tokens: padded tokens per forward; larger minibatches accumulate
        gradients over several forwards
    :param sample_every: log sample responses to TensorBoard every this many iterations
    :param policy_kwargs: as SB3's; Adam/AdamW default to ``fused=True`` (pass
        ``optimizer_kwargs={"fused": False}`` for the per-tensor loop)
    Other parameters (``tensorboard_log``, ``verbose``, ``seed``, ``device``, ``n_envs``,
    ``env_kwargs``, ``stats_window_size``): see :class:`agents.group_rollout.GroupRolloutAlgorithm`.
    """

    _excluded_save_params = GroupRolloutAlgorithm._excluded_save_params + ("_segments", "_refs_filled")

    def __init__(
        self,
        policy: Any,
        env: Any,
        learning_rate: Any = 1e-5,
        group_size: int = 4,
        batch_size: int = 4096,
        n_epochs: int = 1,
        clip_range: Any = 0.2,
        beta: float = 0.04,
        loss_type: str = "dapo",
        scale_rewards: str | bool = "group",
        epsilon_high: float | None = None,
        importance_sampling_level: str = "token",
        eps: float = 1e-4,
        mask_truncated_completions: bool = False,
        log_kl: bool = True,
        ent_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        micro_batch_tokens: int = 4096,
        sample_every: int = 5,
        policy_kwargs: dict[str, Any] | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if scale_rewards not in SCALE_REWARDS + (True, False):
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
            )
        if epsilon_high is not None and not epsilon_high > 0:
            raise ValueError(f"epsilon_high must be > 0 (or None for clip_range), got {epsilon_high!r}")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        policy_kwargs = dict(policy_kwargs or {})
        if policy_kwargs.get("optimizer_class", torch.optim.Adam) in (torch.optim.Adam, torch.optim.AdamW):
            # one fused kernel over all weights (TRL's default, adamw_torch_fused): the
            # per-tensor loop costs ~0.4 s a step on one CPU thread for 135M weights
            policy_kwargs["optimizer_kwargs"] = {"fused": True, **(policy_kwargs.get("optimizer_kwargs") or {})}
        super().__init__(
            policy,
            env,
            group_size=group_size,
            sample_every=sample_every,
            learning_rate=learning_rate,
            ent_coef=ent_coef,
            max_grad_norm=max_grad_norm,
            policy_kwargs=policy_kwargs,
            _init_setup_model=False,
            **kwargs,
        )
        self.batch_size = int(batch_size)
        self.n_epochs = int(n_epochs)
        self.clip_range = clip_range
        self.beta = float(beta)
        self.loss_type = loss_type
        self.scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
        self.epsilon_high = None if epsilon_high is None else float(epsilon_high)
        self.importance_sampling_level = importance_sampling_level
        self.eps = float(eps)
        self.mask_truncated_completions = bool(mask_truncated_completions)
        self.log_kl = bool(log_kl)
        self.micro_batch_tokens = int(micro_batch_tokens)
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self.clip_range_schedule = get_schedule_fn(self.clip_range)
        super()._setup_model()

    # --- update -----------------------------------------------------------------------
    @property
    def _kl_in_loss(self) -> bool:
        """Whether the loss has the ``beta * k3`` term (RLOO puts the KL in the reward)."""
        return self.beta != 0

    def _kl_of_response(self, seg: TextSegment) -> float:
        """The KL of one response to the reference as the loss's ``beta * k3`` term counts
        it: k3 summed over its tokens (at ``pi = pi_old``, the first epoch's)."""
        return float(kl_to_reference(seg.old_logprobs, seg.ref_logprobs).sum())

    def _response_advantages(self, segments: list[TextSegment]) -> torch.Tensor:
        """One advantage per response: :func:`agents.losses.group_advantages` of the scores."""
        scores = torch.tensor([s.score for s in segments])
        groups = torch.tensor([s.group for s in segments])
        return group_advantages(scores, groups, eps=self.eps, scale=self.scale_rewards)

    def _policy_loss(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        clip_range: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-token policy loss, ratio)``: the clipped surrogate with the token ratio, or
        with GSPO's sequence ratio ``(B, 1)`` broadcast over the response's tokens."""
        log_ratio = log_prob - old_log_prob
        if self.importance_sampling_level == "sequence":
            log_ratio = sequence_log_ratio(log_ratio, mask, "mean")
            advantages = advantages[:, :1]  # one advantage per response
        ratio = torch.exp(log_ratio)
        return clipped_surrogate(ratio, advantages, clip_range, self.epsilon_high), ratio

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range_schedule(self._current_progress_remaining)
        segments: list[TextSegment] = [s for s in self._segments if len(s) > 0 and s.score is not None]
        if not segments:
            return
        measure_kl = self._kl_in_loss or self.log_kl
        self._refs_filled = False
        response_advantages = self._response_advantages(segments)  # RLOO runs the reference here
        for seg, adv in zip(segments, response_advantages.tolist()):
            seg.advantages = torch.full((len(seg),), adv)
        # responses the length limit cut: out of the loss with mask_truncated_completions
        # (after the advantages: their scores still count in their groups' baselines)
        eos_ids = self.policy.core.eos_ids
        truncated = {id(s) for s in segments if is_truncated(s, eos_ids)}
        self.logger.record("rollout/truncated_frac", len(truncated) / len(segments))
        masked = truncated if self.mask_truncated_completions else set()

        policy = self.policy
        params = [p for group in policy.optimizer.param_groups for p in group["params"]]
        max_len = int(self._text_env().max_new_tokens)
        stats = {k: [] for k in ("pg", "kl_ref", "ent", "clip", "kl", "loss")}
        for epoch in range(self.n_epochs):
            # the reference's log-probs, once per rollout
            with_ref = measure_kl and epoch == 0 and not self._refs_filled
            for batch in split_minibatches(segments, self.batch_size):
                n_sequences = len(batch)  # masked responses included, as TRL's loss counts them
                batch = [s for s in batch if id(s) not in masked]
                n_tokens = sum(len(s) for s in batch)
                sums = dict.fromkeys(stats, 0.0)
                policy.optimizer.zero_grad(set_to_none=True)
                if not batch:
                    # every response of this minibatch was cut: nothing to learn from; the
                    # ranks of a torchrun job still step together (zero gradient here)
                    if distributed.is_distributed():
                        self._clip_and_step(params, 0.0, grad_weight=0.0)
                    continue
                batch = sorted(batch, key=lambda s: len(s.context_ids) + len(s), reverse=True)
                # micro-batches within one prompt's group: its prompt then runs once
                micros = [m for run in group_by_context(batch)
                          for m in micro_batches(run, self.micro_batch_tokens, lambda s: len(s.context_ids) + len(s))]
                for micro in micros:
                    log_prob, entropy = self._evaluate_micro(micro, with_ref)
                    device = log_prob.device
                    mask = response_mask(micro, device)
                    pg_losses, ratio = self._policy_loss(
                        log_prob, pad_field(micro, "old_logprobs", device), pad_field(micro, "advantages", device),
                        mask, clip_range,
                    )
                    # beta = 0 or RLOO: no KL term in the loss (the reference's log-probs may be NaN)
                    if self._kl_in_loss:
                        kl_ref = kl_to_reference(log_prob, pad_field(micro, "ref_logprobs", device))
                    else:
                        kl_ref = torch.zeros_like(log_prob)
                    token_loss = pg_losses + self.beta * kl_ref - self.ent_coef * entropy
                    loss = aggregate_token_loss(token_loss, mask, self.loss_type, n_sequences, n_tokens, max_len)
                    loss.backward()
                    with torch.no_grad():
                        log_ratio = log_prob - pad_field(micro, "old_logprobs", device)
                        add_masked_sums(sums, mask, pg=pg_losses, kl_ref=kl_ref, ent=-entropy,
                                        clip=clip_fraction(ratio, clip_range, self.epsilon_high), kl=approx_kl(log_ratio))
                        sums["loss"] += float(loss) * n_tokens
                for key in stats:
                    stats[key].append(sums[key] / n_tokens)
                # data-parallel: the loss's mean over all ranks
                self._clip_and_step(params, sums["loss"], grad_weight=aggregation_weight(self.loss_type, n_sequences, n_tokens))
            self._n_updates += 1

        logger = self.logger
        if measure_kl:
            # KL(pi_old || ref) per response, as the method penalises it (over the responses
            # the reference scored: a masked response may have skipped the update's forward)
            kls = [self._kl_of_response(s) for s in segments if not torch.isnan(s.ref_logprobs).any()]
            if kls:
                logger.record("rollout/kl_mean", float(np.mean(kls)))
        if not any(stats.values()):
            return  # every response was cut and masked: no update was made
        record_train_stats(self, stats)
        logger.record("train/beta", self.beta)
        logger.record("train/advantage_std", float(response_advantages.std()) if len(segments) > 1 else 0.0)

    def _evaluate_micro(self, micro: list[TextSegment], with_ref: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prob, entropy)`` ``(B, Tmax)`` of the responses of one micro-batch under the
        actor (with gradients), by the cheapest exact forward; with ``with_ref`` also fill
        their ``ref_logprobs`` (sharing the frozen trunk with the actor where it can)."""
        policy, core, device = self.policy, self.policy.core, self.device
        # the reference's lower blocks equal the actor's frozen ones (train_layers=k): its top
        # blocks run on the actor's hidden state at block `split` (kept from the rollout, or
        # captured in the update's forward); else one forward of its own per micro-batch
        trunk, split = self._shared_trunk() if with_ref else (None, 0)
        options = HeadOptions(temperature=core.temperature, top_k=core.top_k, entropy_grad=self.ent_coef != 0)
        ids, attn, positions, targets = pack_segments(micro, core.pad_id, device)
        kept = kept_trunk_batch(policy.actor, micro)
        lengths = [len(s) for s in micro]
        if kept is not None and shared_context(micro):
            # kept frozen-trunk states of one group: only the top blocks run, the prompt once
            kept_split = kept[2]
            log_prob, entropy, _ = evaluate_kept_shared(policy.actor, micro, kept_split, targets, options)
            if with_ref and split == kept_split:
                reference_top_logprobs_shared(core, trunk, split, micro)
            elif with_ref:
                reference_logprobs(core, micro, device)
        elif kept is not None:
            # the frozen trunk's output was kept by the rollout: only the top blocks run
            hidden, kept_mask, kept_split = kept
            log_prob, entropy, _ = evaluate_kept(
                policy.actor, hidden, kept_mask, kept_split, positions, targets, options, lengths=lengths
            )
            if with_ref and split == kept_split:
                reference_top_logprobs(core, trunk, split, hidden, kept_mask, micro, positions, targets)
            elif with_ref:
                reference_logprobs(core, micro, device)
        elif shared_context(micro) and not (split and with_ref):
            # one group's responses: the prompt runs once (for the reference too)
            if with_ref:
                reference_logprobs(core, micro, device)
            log_prob, entropy, _ = evaluate_shared_context(policy.actor, micro, core.pad_id, options)
        else:
            if with_ref and not split:
                reference_logprobs(core, micro, device)
            with contextlib.ExitStack() as stack:
                captured = stack.enter_context(trunk.capture(split)) if split and with_ref else None
                log_prob, entropy, _ = evaluate_tokens(policy.actor, ids, attn, positions, targets, options,
                                                       lengths=lengths)
            if captured is not None:
                if "hidden" not in captured:
                    raise RuntimeError("the actor's forward did not reach the captured block (no hidden state recorded)")
                reference_top_logprobs(core, trunk, split, captured["hidden"][:, :-1], attn[:, :-1], micro, positions, targets)
        return log_prob, entropy

    def _shared_trunk(self) -> tuple[Any, int]:
        """:func:`agents.reference_logprobs.shared_trunk` of this model and its env."""
        return shared_trunk(self.policy.core, self._text_env().contexts.reference_share)

    def _fill_reference_logprobs(self, segments: list[TextSegment]) -> None:
        """``seg.ref_logprobs`` of every segment before the update (RLOO's KL reward)."""
        fill_reference_logprobs(self.policy, segments, self.micro_batch_tokens, self._text_env().contexts.reference_share, self.device)
