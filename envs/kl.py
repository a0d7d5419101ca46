"""Schulman's estimators of a KL divergence from samples (http://joschu.net/blog/kl-approx.html).

For ``x ~ p`` and ``log_ratio = log q(x) - log p(x)``, each estimator's mean over samples
estimates ``KL(p || q)``:

* ``k1 = -log_ratio``: unbiased, high variance, negative for some samples;
* ``k2 = log_ratio^2 / 2``: biased (exact to second order), low variance, >= 0;
* ``k3 = (exp(log_ratio) - 1) - log_ratio``: unbiased, low variance, >= 0.

The env charges ``KL(pi || ref)`` per token with ``p = pi`` (the policy that sampled) and
``q = ref``; PPO's ``approx_kl`` is ``KL(pi_old || pi)`` with ``p = pi_old`` and ``q = pi``;
GRPO's penalty is ``KL(pi || ref)``. This is the one definition of the three; the agents
call it too (:mod:`agents.losses`).
"""

from __future__ import annotations

import torch

KL_SAMPLE_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_ratio: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-sample estimate of ``KL(p || q)`` from ``log_ratio = log q(x) - log p(x)``, ``x ~ p``.

    :param log_ratio: any shape.
    :param estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).
    :return: same shape as ``log_ratio``.
    """
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be one of {KL_SAMPLE_ESTIMATORS}, got {estimator!r}")
