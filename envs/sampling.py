"""The policy's sampling distribution and the per-token KL terms the env charges.

The policy samples from ``softmax(logits / temperature)`` restricted to its ``top_k`` most
likely tokens; the env charges log-probabilities under exactly that distribution, and the
reference's under the same temperature without top-k (:meth:`envs.lm_core.LMCore.ref_log_probs`).
The KL estimators are those of :mod:`envs.kl`, plus ``full``, the exact KL of the two
next-token distributions.
"""

from __future__ import annotations

import torch

from envs.kl import kl_estimate

KL_ESTIMATORS = ("k1", "k3", "full")

# Masked (top-k) logits use the most negative finite float instead of -inf, so that
# probabilities are exactly 0 while entropies and KL sums stay finite (0 * -inf is nan).
_MASKED = torch.finfo(torch.float32).min


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Logits of the policy's sampling distribution: float32, divided by ``temperature``,
    and, when ``top_k > 0``, every token outside the ``top_k`` largest set to the most
    negative float (probability exactly 0).

    :param logits: raw next-token logits, shape (..., vocab)
    :param temperature: softmax temperature (> 0)
    :param top_k: keep only the ``top_k`` most likely tokens; 0 keeps all
    """
    scaled = logits.float()
    if temperature != 1.0:  # x / 1.0 == x exactly: skip a vocabulary-sized copy (and its backward)
        scaled = scaled / temperature
    if top_k and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, _MASKED)
    return scaled


def sampling_log_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """``log_softmax`` of :func:`sampling_logits` (the log-probabilities the env charges)."""
    return torch.log_softmax(sampling_logits(logits, temperature, top_k), dim=-1)


def kl_terms(
    actor_logp: torch.Tensor, ref_logp: torch.Tensor, actions: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(logprob, ref_logprob, kl)`` of ``actions`` given full log-prob rows.

    ``k1 = log pi(a) - log ref(a)``; ``k3 = (exp(r) - 1) - r`` with ``r = log ref(a) - log pi(a)``;
    ``full = sum_v pi(v) (log pi(v) - log ref(v))`` (exact KL of the next-token distributions).
    """
    logprob = actor_logp.gather(-1, actions[:, None]).squeeze(-1)
    ref_logprob = ref_logp.gather(-1, actions[:, None]).squeeze(-1)
    if estimator in ("k1", "k3"):
        kl = kl_estimate(ref_logprob - logprob, estimator)
    elif estimator == "full":
        probs = actor_logp.exp()
        # tokens outside the actor's top-k have probability 0 and contribute nothing
        kl = torch.where(probs > 0, probs * (actor_logp - ref_logp), torch.zeros_like(probs)).sum(-1)
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return logprob, ref_logprob, kl
