"""The text path of :class:`agents.PPO`: PPO on ``TextRLHF`` through the language-model policy.

``agents.PPO("LMPolicy", env)`` switches to this path by itself (the policy is an
:class:`agents.policies.lm.LMActorCriticPolicy`); ``"MlpPolicy"`` on CartPole never sees it,
and SB3's own PPO keeps its generic per-token path on the same env.

One iteration, in the order of the RLHF recipe:

1. **Rollout** (:func:`agents.lm_rollout.collect_text_rollout`): the env writes responses
   token by token; per token it charges ``r_t = -kl_coef * kl_t`` and adds the reward-model
   score on the last token; the policy's forward at each step is a lookup in the env's
   step cache, which gives ``log pi_old(a_t|s_t)`` and ``V_old(s_t)``.
2. Optional **score normalisation** (running mean / std of the scores) and clipping:
   the score part of the last token's reward is replaced by the normalised score.
3. **GAE per token** (:func:`agents.lm_rollout.token_gae`, ``gamma=1``, ``lambda=0.95``
   are the usual text settings), ``returns = advantages + values``.
4. **Update**: ``n_epochs`` passes over minibatches of whole responses; each minibatch is
   evaluated by ONE teacher-forced forward per micro-batch over ``prompt + response``
   (:func:`agents.lm_rollout.evaluate_tokens`), giving the new log-probs, entropies and
   values of every token (when only the top ``k`` blocks train, the rollout kept the
   frozen lower blocks' output and only the top blocks run:
   :func:`agents.lm_rollout.evaluate_kept`); the loss per token is the clipped surrogate
   ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)`` plus ``vf_coef * (V - R)^2``
   (optionally clipped around the old value) minus ``ent_coef * H``, averaged over the
   minibatch's tokens; micro-batches accumulate gradients so memory stays bounded.
5. **KL control**: the adaptive controller (Ziegler et al.) moves the env's ``kl_coef``
   towards the value that keeps the KL per response at ``target_kl``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents import distributed
from agents.guards import check_finite
from agents.kl_controller import get_env_kl_coef, make_kl_controller, set_env_kl_coef
from agents.lm_rollout import (
    RolloutStats,
    TextSegment,
    collect_text_rollout,
    evaluate_kept,
    evaluate_tokens,
    kept_trunk_batch,
    micro_batches,
    pack_segments,
    pad_field,
    response_mask,
    token_gae,
)


@dataclass
class RLHFConfig:
    """Text-specific settings of PPO (and GRPO) on a ``TextRLHF`` env.

    :param kl_coef: initial ``kl_coef`` written into the env (None keeps the env's own).
    :param target_kl: target KL per response (nats, summed over its tokens) of the
        adaptive KL controller; None keeps ``kl_coef`` fixed. Not to be confused with
        PPO's ``target_kl``, which stops the epochs early on the old-vs-new policy KL.
    :param kl_horizon: horizon of the adaptive controller, in env steps (tokens).
    :param score_norm: normalise scores by a running mean and std before they enter the
        reward.
    :param score_clip: clip the (normalised) score to ``[-score_clip, score_clip]``.
    :param micro_batch_tokens: padded tokens per forward of the update; a minibatch
        larger than this is split and its gradients accumulated.
    :param sample_every: log sample (prompt, response, score) triples as TensorBoard text
        every this many iterations (0: never).
    :param n_samples: how many samples to log.
    """

    kl_coef: float | None = None
    target_kl: float | None = None
    kl_horizon: int = 10_000
    score_norm: bool = False
    score_clip: float | None = None
    micro_batch_tokens: int = 4096
    sample_every: int = 5
    n_samples: int = 3

    @classmethod
    def from_any(cls, value: "RLHFConfig | dict | None") -> "RLHFConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"unknown RLHFConfig keys {sorted(unknown)}; valid keys: {sorted(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise TypeError(f"rlhf must be an RLHFConfig, a dict or None, got {type(value).__name__}")


class RunningMeanStd:
    """Running mean and variance (Chan et al. parallel update), for score normalisation."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            return
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), x.size
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


def is_lm_policy(policy: Any) -> bool:
    """Whether ``policy`` is the language-model actor-critic (then the text path applies)."""
    module = sys.modules.get("agents.policies.lm")  # not imported: it cannot be one
    return module is not None and isinstance(policy, module.LMActorCriticPolicy)


class TextPPOState:
    """What the text path keeps between iterations (pickled with the model)."""

    def __init__(self, config: RLHFConfig, env_kl_coef: float | None):
        self.config = config
        init = config.kl_coef if config.kl_coef is not None else (env_kl_coef if env_kl_coef is not None else 0.0)
        self.kl_controller = make_kl_controller(init, config.target_kl, config.kl_horizon)
        self.score_stats = RunningMeanStd()
        self.iteration = 0


def setup_text_state(algo: Any, config: RLHFConfig) -> TextPPOState:
    """Create the text state and write the initial ``kl_coef`` into the env."""
    state = TextPPOState(config, get_env_kl_coef(algo.env) if algo.env is not None else None)
    if algo.env is not None and (config.kl_coef is not None or config.target_kl is not None):
        set_env_kl_coef(algo.env, state.kl_controller.value)
    keep_trunk_states(algo.env)
    return state


def keep_trunk_states(env: Any) -> None:
    """Have the batched text env behind ``env`` keep the actor's frozen-trunk states from
    its next prefill on (for :func:`agents.lm_rollout.evaluate_kept`); other envs: nothing."""
    from agents.lm_rollout import find_text_env

    text_env = find_text_env(env) if env is not None else None
    if text_env is not None and hasattr(text_env, "num_envs") and hasattr(text_env, "keep_trunk"):
        text_env.keep_trunk = True


def shape_scores(segments: list[TextSegment], state: TextPPOState) -> None:
    """Score normalisation / clipping: replace the score in the last token's reward."""
    cfg = state.config
    if not cfg.score_norm and cfg.score_clip is None:
        return
    finished = [s for s in segments if s.score is not None]
    if cfg.score_norm:
        state.score_stats.update(np.array([s.score for s in finished]))
    for seg in finished:
        new = seg.score
        if cfg.score_norm:
            new = (new - state.score_stats.mean) / state.score_stats.std
        if cfg.score_clip is not None:
            new = float(np.clip(new, -cfg.score_clip, cfg.score_clip))
        seg.rewards = seg.rewards.clone()
        seg.rewards[-1] += new - seg.score


def compute_advantages(segments: list[TextSegment], gamma: float, gae_lambda: float, normalize: bool) -> None:
    """Per-token GAE of every segment; with ``normalize`` the advantages are whitened over
    all tokens of the rollout (mean 0, std 1), which keeps the scale steady across
    minibatches of a few responses."""
    for seg in segments:
        seg.advantages, seg.returns = token_gae(seg.rewards, seg.old_values, seg.last_value, seg.terminated, gamma, gae_lambda)
    if normalize:
        flat = torch.cat([s.advantages for s in segments])
        if flat.numel() > 1:
            mean, std = flat.mean(), flat.std()
            for seg in segments:
                seg.advantages = (seg.advantages - mean) / (std + 1e-8)


def split_minibatches(segments: list[TextSegment], tokens_per_batch: int, generator: torch.Generator | None = None) -> list[list[TextSegment]]:
    """Shuffle whole responses into minibatches of about ``tokens_per_batch`` tokens."""
    order = torch.randperm(len(segments), generator=generator).tolist()
    total = sum(len(s) for s in segments)
    n_batches = max(1, min(len(segments), round(total / max(1, tokens_per_batch))))
    # under torchrun every rank must take as many optimizer steps (each ends in an all-reduce)
    n_batches = distributed.allreduce_min(n_batches)
    return [[segments[j] for j in chunk] for chunk in np.array_split(np.array(order), n_batches) if len(chunk)]


def collect_text_ppo_rollout(algo: Any, env: Any, callback: Any, n_rollout_steps: int) -> bool:
    """PPO's text rollout: ``n_rollout_steps`` steps per env regrouped into segments
    (kept in ``algo._segments``), then the KL controller's update and the text metrics."""
    state: TextPPOState = algo._text_state
    ok, algo._segments, stats = collect_text_rollout(algo, env, callback, n_rollout_steps)
    state.iteration += 1
    kl_coef = update_kl_coef(algo, stats, state)
    record_rollout_stats(algo, stats, state, kl_coef)
    algo._last_rollout_stats = stats
    return ok


def train_text_ppo(algo: Any) -> None:
    """PPO's update on the last text rollout (see the module docstring)."""
    segments: list[TextSegment] = algo._segments
    state: TextPPOState = algo._text_state
    policy = algo.policy
    cfg = state.config
    policy.set_training_mode(True)
    algo._update_learning_rate(policy.optimizer)
    clip_range = algo.clip_range_schedule(algo._current_progress_remaining)
    clip_range_vf = None if algo.clip_range_vf_schedule is None else algo.clip_range_vf_schedule(algo._current_progress_remaining)
    segments = [s for s in segments if len(s) > 0]
    if not segments:
        return
    shape_scores(segments, state)
    compute_advantages(segments, algo.gamma, algo.gae_lambda, algo.normalize_advantage)
    params = [p for group in policy.optimizer.param_groups for p in group["params"]]
    device = algo.device
    core = policy.core
    stats = {k: [] for k in ("pg", "v", "ent", "clip", "kl", "loss")}
    continue_training = True
    for epoch in range(algo.n_epochs):
        for batch in split_minibatches(segments, algo.batch_size):
            n_tokens = sum(len(s) for s in batch)
            sums = dict.fromkeys(("pg", "v", "ent", "clip", "kl", "loss"), 0.0)
            policy.optimizer.zero_grad(set_to_none=True)
            # longest first, so micro-batches hold responses of similar length
            batch = sorted(batch, key=lambda s: len(s.context_ids) + len(s), reverse=True)
            for micro in micro_batches(batch, cfg.micro_batch_tokens, lambda s: len(s.context_ids) + len(s)):
                ids, attn, positions, targets = pack_segments(micro, core.pad_id, device)
                mask = response_mask(micro, device)
                kept = kept_trunk_batch(policy.actor, micro)
                if kept is not None:  # the rollout kept the frozen trunk's output: only the top blocks run
                    log_prob, entropy, values = evaluate_kept(
                        policy.actor, *kept, positions, targets, value_head=policy._values,
                        temperature=core.temperature, top_k=core.top_k, entropy_grad=algo.ent_coef != 0,
                    )
                else:
                    log_prob, entropy, values = evaluate_tokens(
                        policy.actor, ids, attn, positions, targets, value_head=policy._values,
                        temperature=core.temperature, top_k=core.top_k, entropy_grad=algo.ent_coef != 0,
                    )
                old_log_prob = pad_field(micro, "old_logprobs", device)
                advantages = pad_field(micro, "advantages", device)
                returns = pad_field(micro, "returns", device)
                old_values = pad_field(micro, "old_values", device)

                log_ratio = log_prob - old_log_prob
                ratio = torch.exp(log_ratio)
                pg_losses = -torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
                if clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
                v_losses = (values_pred - returns) ** 2
                entropy_losses = -entropy
                token_loss = pg_losses + algo.vf_coef * v_losses + algo.ent_coef * entropy_losses
                loss = (token_loss * mask).sum() / n_tokens
                loss.backward()
                with torch.no_grad():
                    sums["pg"] += float((pg_losses * mask).sum())
                    sums["v"] += float((v_losses * mask).sum())
                    sums["ent"] += float((entropy_losses * mask).sum())
                    sums["clip"] += float((((ratio - 1).abs() > clip_range).float() * mask).sum())
                    # k3 estimator of KL(pi_old || pi), as SB3 logs it
                    sums["kl"] += float((((ratio - 1) - log_ratio) * mask).sum())
                    sums["loss"] += float(loss) * n_tokens
            for key in stats:
                stats[key].append(sums[key] / n_tokens)
            approx_kl = sums["kl"] / n_tokens
            if algo.target_kl is not None and distributed.allreduce_mean(approx_kl) > 1.5 * algo.target_kl:
                continue_training = False
                if algo.verbose >= 1:
                    print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl:.2f}")
                break
            distributed.allreduce_gradients(params, weight=n_tokens)  # data-parallel: token mean over all ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(params, algo.max_grad_norm)
            if check_finite(sums["loss"], grad_norm, algo._n_updates, algo.on_nonfinite, algo._last_checkpoint):
                policy.optimizer.step()
        algo._n_updates += 1
        if not continue_training:
            break

    values_all = torch.cat([s.old_values for s in segments])
    returns_all = torch.cat([s.returns for s in segments])
    from agents.base import explained_variance

    logger = algo.logger
    logger.record("train/entropy_loss", float(np.mean(stats["ent"])))
    logger.record("train/policy_gradient_loss", float(np.mean(stats["pg"])))
    logger.record("train/value_loss", float(np.mean(stats["v"])))
    logger.record("train/approx_kl", float(np.mean(stats["kl"])))
    logger.record("train/clip_fraction", float(np.mean(stats["clip"])))
    logger.record("train/loss", float(stats["loss"][-1]))
    logger.record("train/explained_variance", explained_variance(values_all, returns_all))
    logger.record("train/n_updates", algo._n_updates, exclude="tensorboard")
    logger.record("train/clip_range", clip_range)
    if clip_range_vf is not None:
        logger.record("train/clip_range_vf", clip_range_vf)


def record_rollout_stats(algo: Any, stats: RolloutStats, state: TextPPOState, kl_coef: float | None) -> None:
    """Text metrics of a rollout, and sample responses every ``sample_every`` iterations."""
    logger = algo.logger
    if stats.scores:
        logger.record("rollout/score_mean", float(np.mean(stats.scores)))
        logger.record("rollout/kl_mean", float(np.mean(stats.kls)))
        logger.record("rollout/response_len_mean", float(np.mean(stats.lengths)))
    if kl_coef is not None:
        logger.record("train/kl_coef", float(kl_coef))
    cfg = state.config
    if cfg.sample_every and stats.samples and state.iteration % cfg.sample_every == 1 % cfg.sample_every:
        lines = []
        for prompt, response, score in stats.samples[: cfg.n_samples]:
            lines.append(f"**prompt:** {prompt}  \n**response:** {response}  \n**score:** {score:.3f}")
        logger.record("samples/responses", "\n\n---\n\n".join(lines), exclude="stdout")


def update_kl_coef(algo: Any, stats: RolloutStats, state: TextPPOState) -> float | None:
    """Adaptive KL control after a rollout; returns the coefficient now in the env."""
    if state.config.target_kl is None:
        return get_env_kl_coef(algo.env)
    if stats.kls:
        value = state.kl_controller.update(float(np.mean(stats.kls)), stats.n_steps * algo.env.num_envs)
        set_env_kl_coef(algo.env, value)
    return state.kl_controller.value

