"""The formulas of the agents, each written once: advantages, policy losses, value loss,
KL estimates and how a per-token loss becomes a minibatch loss.

PPO (classic and text, and its hand-written fast path :mod:`agents.fast_mlp`), A2C,
REINFORCE, GRPO and RLOO call these; the tests compare each with a hand computation.
Every function is pure (tensors in, tensors out) and per-sample unless it says otherwise,
so the caller chooses the mean (over samples, over tokens, over sequences).

Advantages
    :func:`compute_gae` / :func:`token_gae` (Schulman et al. 2016), :func:`group_advantages`
    (GRPO, Shao et al. 2024, with TRL's ``scale_rewards``), :func:`rloo_advantages`
    (leave-one-out baseline, Ahmadian et al. 2024), :func:`normalize_advantages` (whitening
    over a batch).
Policy losses
    :func:`policy_gradient_loss` (REINFORCE, A2C), :func:`clipped_surrogate` (PPO, Schulman et al. 2017; DAPO's clip-higher with
    ``clip_range_high``), :func:`kl_penalty_surrogate` (PPO's adaptive-KL variant),
    :func:`sequence_log_ratio` (GSPO's sequence-level importance ratio, Zheng et al. 2025).
KL
    :func:`approx_kl` (``KL(pi_old || pi)``) and :func:`kl_to_reference`
    (``KL(pi || ref)``), both Schulman's k3 from :func:`envs.kl.kl_estimate`.
Aggregation
    :func:`aggregate_token_loss`: TRL's ``loss_type`` (``"grpo"``, ``"dr_grpo"``, ``"dapo"``).
"""

from __future__ import annotations

import torch

from envs.kl import kl_estimate

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


# --- advantages ----------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    last_values: torch.Tensor,
    final_values: torch.Tensor | None = None,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, n_envs) rollout.

    ``delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)``
    ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``, ``done = terminated | truncated``,
    ``returns = A + V``.

    A terminated step has no future. A truncated step was cut by a time limit, so it
    bootstraps with the value of its final observation ``final_values[t]``; the
    advantage recursion still stops there because the next row starts a new episode.

    :param rewards: r_t, shape (T, n_envs)
    :param values: V(s_t) of the stored observations, shape (T, n_envs)
    :param terminated: episode ended in a terminal state at t (bool or 0/1)
    :param truncated: episode cut by a time limit at t
    :param last_values: V of the observation after the last step, shape (n_envs,)
    :param final_values: V of the final observation where ``truncated``; ``None`` means
        it is the next stored row's value (NEXT_STEP autoreset layout, where the
        observation after a done step is the final one), ``last_values`` for the last row
    :param gamma: discount factor
    :param gae_lambda: GAE's lambda (1 = Monte-Carlo returns, 0 = one-step TD)
    :return: ``(advantages, returns)``, each (T, n_envs)
    """
    terminated = terminated.to(values.dtype)
    done = torch.maximum(terminated, truncated.to(values.dtype))
    next_values = torch.cat([values[1:], last_values.reshape(1, -1).to(values.dtype)], dim=0)
    if final_values is not None:
        next_values = torch.where(truncated.bool(), final_values.to(values.dtype), next_values)
    deltas = rewards + gamma * next_values * (1.0 - terminated) - values
    decay = gamma * gae_lambda * (1.0 - done)
    advantages = torch.empty_like(values)
    # one op per step: A_t = delta_t + decay_t * A_{t+1}, written straight into its row
    last_gae = torch.zeros_like(values[0])
    for delta, dec, out in zip(reversed(deltas.unbind(0)), reversed(decay.unbind(0)), reversed(advantages.unbind(0))):
        last_gae = torch.addcmul(delta, dec, last_gae, out=out)
    return advantages, advantages + values


def token_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    last_value: float = 0.0,
    terminated: bool = True,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_gae` over the tokens of one response (or part of one).

    :param rewards: per-token rewards, shape ``(T,)``.
    :param values: ``V(s_t)`` for each token, ``(T,)``.
    :param last_value: value of the state after the last token, used when not terminated.
    :param terminated: the response ended with the last token (nothing to bootstrap).
    :param gamma: discount (1 for text: the score arrives at the end of a short episode).
    :param gae_lambda: GAE lambda.
    :return: ``(advantages, returns)``, each ``(T,)``.
    """
    T = rewards.shape[0]
    terminal = torch.zeros((T, 1))
    terminal[-1, 0] = float(terminated)
    advantages, returns = compute_gae(
        rewards.float().reshape(T, 1),
        values.float().reshape(T, 1),
        terminated=terminal,
        truncated=torch.zeros((T, 1)),
        last_values=torch.tensor([0.0 if terminated else float(last_value)]),
        gamma=gamma,
        gae_lambda=gae_lambda,
    )
    return advantages.reshape(T), returns.reshape(T)


def _scale_rewards_name(scale: str | bool) -> str:
    if scale is True:  # the earlier boolean spelling
        return "group"
    if scale is False:
        return "none"
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    return scale


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4, scale: str | bool = "group"
) -> torch.Tensor:
    """GRPO's advantage of each response: ``(score - group mean) / (std + eps)``.

    :param scores: one score per response, ``(N,)``.
    :param group_ids: the prompt group of each response, ``(N,)`` (integers).
    :param eps: added to the standard deviation, so a group whose responses all scored
        the same gets advantage 0 instead of a division by zero.
    :param scale: TRL's ``scale_rewards``: ``"group"`` divides by the group's standard
        deviation (the paper), ``"batch"`` by the standard deviation of all scores,
        ``"none"`` does not divide (Dr. GRPO). Standard deviations are unbiased, as in
        TRL; a singleton has none (0). ``True``/``False`` mean ``"group"``/``"none"``.
    :return: advantages, ``(N,)``.
    """
    scale = _scale_rewards_name(scale)
    scores = scores.double()
    advantages = torch.zeros_like(scores)
    zero = torch.zeros((), dtype=scores.dtype)
    for g in torch.unique(group_ids):
        members = group_ids == g
        s = scores[members]
        centred = s - s.mean()
        if scale == "group":
            centred = centred / ((s.std() if s.numel() > 1 else zero) + eps)
        advantages[members] = centred
    if scale == "batch":
        advantages = advantages / ((scores.std() if scores.numel() > 1 else zero) + eps)
    return advantages.float()


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO's advantage of each response: its score minus the mean score of the OTHER
    responses of its group, ``s_i - (sum_j s_j - s_i) / (k - 1)`` (Ahmadian et al. 2024;
    TRL's ``RLOOTrainer``). Equal to ``k / (k - 1) * (s_i - group mean)``. A group of one
    has no baseline: advantage 0.

    :param scores: one score per response, ``(N,)``.
    :param group_ids: the prompt group of each response, ``(N,)``.
    :return: advantages, ``(N,)``.
    """
    scores = scores.double()
    advantages = torch.zeros_like(scores)
    for g in torch.unique(group_ids):
        members = group_ids == g
        s = scores[members]
        k = s.numel()
        if k > 1:
            advantages[members] = s - (s.sum() - s) / (k - 1)
    return advantages.float()


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages whitened over the batch, ``(A - mean(A)) / (std(A) + eps)`` (SB3's
    ``normalize_advantage``; TRL's RLOO uses ``eps = 1e-4``). Needs two or more entries:
    the caller skips a batch of one, whose std is undefined."""
    return (advantages - advantages.mean()) / (advantages.std() + eps)


# --- policy losses -------------------------------------------------------------------


def policy_gradient_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The vanilla policy-gradient loss per sample, ``-A * log pi(a|s)`` (REINFORCE, A2C):
    its gradient is ``-A * grad log pi``, the score-function estimator."""
    return -advantages * log_prob


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, clip_range_high: float | None = None
) -> torch.Tensor:
    """PPO's clipped surrogate loss per sample, ``-min(ratio * A, clip(ratio, 1 - eps_low,
    1 + eps_high) * A)``, with ``eps_low = clip_range`` and ``eps_high = clip_range_high``
    (DAPO's clip-higher; None: ``clip_range``). Broadcasts ``ratio`` against ``advantages``."""
    high = clip_range if clip_range_high is None else clip_range_high
    return -torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + high))


def kl_penalty_surrogate(
    ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, beta: float
) -> torch.Tensor:
    """PPO's KL-penalty loss per sample, ``-ratio * A + beta * k3(pi_old || pi)``."""
    return -ratio * advantages + beta * approx_kl(log_ratio)


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """One log importance ratio per sequence from per-token ones, ``(B, T) -> (B, 1)``.

    ``"mean"``: the mean over the sequence's tokens (GSPO; TRL's
    ``importance_sampling_level="sequence"``), so ``exp`` of it is the geometric mean of the
    token ratios; ``"sum"``: the log-ratio of the whole sequence's probabilities (TRL's RLOO).
    """
    total = (log_ratio * mask).sum(-1, keepdim=True)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def clip_fraction(ratio: torch.Tensor, clip_range: float, clip_range_high: float | None = None) -> torch.Tensor:
    """1.0 where the ratio lies outside ``[1 - clip_range, 1 + clip_range_high]``, else 0.0."""
    high = clip_range if clip_range_high is None else clip_range_high
    return ((ratio < 1 - clip_range) | (ratio > 1 + high)).to(ratio.dtype)


# --- value loss ----------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_range_vf: float | None = None,
) -> torch.Tensor:
    """Squared error per sample ``(V_pred - R)^2``, with ``V_pred = V`` or, given
    ``clip_range_vf``, ``V_old + clip(V - V_old, -clip_range_vf, clip_range_vf)`` (SB3's
    value clipping; the mean of this is SB3's ``F.mse_loss(returns, values_pred)``)."""
    if clip_range_vf is not None:
        values = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    return (values - returns).square()


# --- KL --------------------------------------------------------------------------------


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 estimate of ``KL(pi_old || pi)`` per sample, ``(ratio - 1) - log ratio`` with
    ``log_ratio = log pi - log pi_old`` on actions drawn from ``pi_old`` (what SB3 logs
    as ``train/approx_kl``; unbiased, >= 0)."""
    return kl_estimate(log_ratio, "k3")


def kl_to_reference(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Estimate of ``KL(pi || ref)`` per token on tokens drawn from ``pi``: with k3,
    ``exp(log ref - log pi) - (log ref - log pi) - 1`` (GRPO's penalty; TRL's)."""
    return kl_estimate(ref_log_prob - log_prob, estimator)


# --- aggregation -----------------------------------------------------------------------


def aggregate_token_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    n_sequences: int,
    n_tokens: int,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """A minibatch's loss from per-token losses, as TRL's ``loss_type`` aggregates them.

    Computed over a part of the minibatch (a micro-batch), the parts' results add up to
    the minibatch's loss, so gradients can be accumulated:

    * ``"grpo"``: each sequence's mean over its tokens, then the mean over the
      ``n_sequences`` sequences (the paper; longer responses weigh less per token);
    * ``"dr_grpo"``: the sum over all tokens / ``(n_sequences * max_completion_length)``
      (Dr. GRPO, Liu et al. 2025: no length bias);
    * ``"dapo"``: the sum over all tokens / ``n_tokens`` of the minibatch (DAPO, Yu et al.
      2025: every token weighs the same).

    :param token_loss: ``(B, T)`` per-token losses, or ``(B, 1)`` for one per sequence
        (then broadcast to the sequence's tokens, as TRL does).
    :param mask: ``(B, T)`` 1.0 on real response tokens.
    :param loss_type: ``"grpo"``, ``"dr_grpo"`` or ``"dapo"``.
    :param n_sequences: sequences in the whole minibatch.
    :param n_tokens: response tokens in the whole minibatch.
    :param max_completion_length: the longest a response can be (``"dr_grpo"``).
    :return: a scalar.
    """
    masked = token_loss * mask
    if loss_type == "grpo":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / max(1, n_sequences)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (the env's max_new_tokens)")
        return masked.sum() / (max(1, n_sequences) * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / max(1, n_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def aggregation_weight(loss_type: str, n_sequences: int, n_tokens: int) -> float:
    """A minibatch's weight in the mean of gradients over data-parallel ranks under
    :func:`aggregate_token_loss`: its tokens for ``"dapo"``, its sequences otherwise."""
    return float(n_tokens) if loss_type == "dapo" else float(n_sequences)
