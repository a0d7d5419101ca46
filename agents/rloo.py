"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"), SB3's interface.

Like :class:`agents.GRPO` (same env, group resets, rollout and update machinery), RLOO
samples ``G`` responses to each prompt and has no critic; it differs in the baseline and
where the KL goes, as TRL's ``RLOOTrainer`` does:

1. The reward of response ``i`` is its score minus the KL penalty of the whole response,
   ``R_i = score_i - beta * sum_t (log pi_old(a_t|s_t) - log ref(a_t|s_t))`` (k1 summed over
   its tokens, as in the paper; the reference runs once per response before the update).
2. Its advantage is ``R_i`` minus the mean reward of the OTHER responses of its group,
   ``A_i = R_i - (sum_j R_j - R_i) / (G - 1)`` (:func:`agents.losses.rloo_advantages`): an
   unbiased baseline, since it does not depend on response ``i``.
3. The loss is REINFORCE on whole responses, ``-A_i * log pi(y_i|x)``, written as TRL
   writes it with one importance ratio per response, ``rho_i = pi(y_i|x) / pi_old(y_i|x)``
   (the exp of the SUM of its token log-ratios), clipped as in PPO and averaged over the
   responses; with ``n_epochs=1`` (the default) ``rho = 1`` and the gradient is exactly
   REINFORCE's.
"""

from __future__ import annotations

from typing import Any

import torch

from agents.grpo import GRPO
from agents.losses import clipped_surrogate, normalize_advantages, rloo_advantages, sequence_log_ratio
from agents.segments import TextSegment


class RLOO(GRPO):
    """RLOO on a batched ``TextRLHF`` env (see the module docstring).

    :param policy: ``"LMPolicy"``
    :param env: the batched text env (``gym.make_vec("TextRLHF-v0", num_envs=N)``), ``N`` a
        multiple of ``group_size``
    :param learning_rate: number, ``"lin_<x>"`` or schedule
    :param group_size: responses per prompt (``G`` >= 2; TRL's ``num_generations``)
    :param beta: coefficient of the KL penalty in the reward (TRL's default 0.05; 0: none)
    :param clip_range: clip epsilon of the response's ratio (TRL's ``epsilon``)
    :param epsilon_high: upper clip epsilon (None: ``clip_range``)
    :param normalize_advantages: whiten the advantages over the rollout (TRL's
        ``normalize_advantages``, default False)
    Other parameters: see :class:`agents.GRPO` (``batch_size``, ``n_epochs``,
    ``max_grad_norm``, ``micro_batch_tokens``, ...). GRPO's ``loss_type``,
    ``scale_rewards`` and ``importance_sampling_level`` do not apply: the loss is one term
    per response, averaged over responses.
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        learning_rate: Any = 1e-5,
        group_size: int = 4,
        beta: float = 0.05,
        clip_range: Any = 0.2,
        epsilon_high: float | None = None,
        normalize_advantages: bool = False,
        **kwargs: Any,
    ):
        for name in ("loss_type", "scale_rewards", "importance_sampling_level"):
            if name in kwargs:
                raise TypeError(f"RLOO has no {name!r} (its loss is one REINFORCE term per response): drop it, or use GRPO")
        self.normalize_advantages = bool(normalize_advantages)
        super().__init__(
            policy, env, learning_rate=learning_rate, group_size=group_size, beta=beta, clip_range=clip_range,
            epsilon_high=epsilon_high, loss_type="grpo", **kwargs,
        )

    @property
    def _kl_in_loss(self) -> bool:
        return False  # the KL is in the reward

    def _kl_of_response(self, seg: TextSegment) -> float:
        """k1 summed over the response's tokens, the KL its reward is charged."""
        return float((seg.old_logprobs.double() - seg.ref_logprobs.double()).sum())

    def _response_advantages(self, segments: list[TextSegment]) -> torch.Tensor:
        rewards = torch.tensor([s.score for s in segments], dtype=torch.float64)
        if self.beta != 0 or self.log_kl:
            self._fill_reference_logprobs(segments)
            self._refs_filled = True
        if self.beta != 0:
            kl = torch.tensor([self._kl_of_response(s) for s in segments], dtype=torch.float64)
            rewards = rewards - self.beta * kl
        advantages = rloo_advantages(rewards, torch.tensor([s.group for s in segments]))
        if self.normalize_advantages and len(advantages) > 1:
            advantages = normalize_advantages(advantages, eps=1e-4)
        return advantages

    def _policy_loss(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        clip_range: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1)`` loss per response, ``-min(rho * A, clip(rho) * A)`` with the response's
        ratio ``rho = exp(sum_t log ratio_t)``; ``loss_type="grpo"`` then averages it over
        the responses."""
        ratio = torch.exp(sequence_log_ratio(log_prob - old_log_prob, mask, "sum"))
        return clipped_surrogate(ratio, advantages[:, :1], clip_range, self.epsilon_high), ratio
