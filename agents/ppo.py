"""Proximal Policy Optimization (Schulman et al. 2017), SB3's ``PPO`` interface.

Per rollout, ``n_epochs`` passes of minibatches over the samples, minimising

    L = -E[min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)]        (loss_type="clip")
    L = -E[ratio * A - beta * KL(pi_old || pi)]                        (loss_type="kl_penalty")
      + vf_coef * E[(V - R)^2] - ent_coef * E[H(pi)]

with ``ratio = pi(a|s) / pi_old(a|s)``, ``A`` the GAE advantages (normalised per
minibatch), ``R`` the returns. With the KL penalty, ``beta`` adapts after each rollout:
halved when the measured KL is below ``kl_target / 1.5``, doubled above ``kl_target * 1.5``.
"""

from __future__ import annotations

from typing import Any

import torch

from agents import distributed
from agents.fast_mlp import FusedPPOLoss
from agents.fast_kernels import clip_grad_norm, optimizer_step
from agents.guards import check_finite, check_number
from agents.on_policy import OnPolicyAlgorithm
from agents.schedules import get_schedule_fn
from agents.losses import approx_kl, clip_fraction, clipped_surrogate, kl_penalty_surrogate, normalize_advantages, value_loss
from agents.text_ppo import (
    TEXT_PPO_DEFAULTS,
    RLHFConfig,
    TextPPOMixin,
    is_lm_policy,
    names_lm_policy,
    resolve_lm_n_steps,
)
from agents.utils import explained_variance


@torch.no_grad()
def kl_and_clip_fraction(
    ratios: list[torch.Tensor], log_ratios: list[torch.Tensor], clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per minibatch: the k3 estimate of KL(pi_old || pi) (:func:`agents.losses.approx_kl`)
    and the fraction of ratios outside ``1 +- clip_range``.

    :param ratios: each minibatch's ``pi(a|s) / pi_old(a|s)``
    :param log_ratios: their logarithms
    :param clip_range: the clip epsilon
    :return: ``(approx_kls, clip_fractions)``, one entry per minibatch
    """
    if not ratios:
        return torch.zeros(0), torch.zeros(0)
    sizes = [len(r) for r in ratios]
    ratio, log_ratio = torch.cat(ratios), torch.cat(log_ratios)
    per_sample = torch.stack((approx_kl(log_ratio), clip_fraction(ratio, clip_range)))
    if len(set(sizes)) == 1:  # equal minibatches: all means in one op
        means = per_sample.view(2, len(sizes), -1).mean(2)
    else:
        means = torch.stack([part.mean(1) for part in per_sample.split(sizes, dim=1)], dim=1)
    return means[0], means[1]


# SB3's PPO defaults (for the arguments left out when the policy is not the LM policy)
PPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-4, "n_steps": 2048, "batch_size": 64, "n_epochs": 10, "gamma": 0.99, "gae_lambda": 0.95,
    "max_grad_norm": 0.5,
}
TEXT_FALLBACK_N_STEPS = 128  # the LM policy on an env that is not a TextRLHF env (no max_new_tokens)


class PPO(TextPPOMixin, OnPolicyAlgorithm):
    """PPO with clipping (default) or an adaptive KL penalty.

    The arguments that default to None take SB3's values (:data:`PPO_DEFAULTS`: lr 3e-4,
    ``n_steps=2048``, ``batch_size=64``, ``n_epochs=10``, ``gamma=0.99``,
    ``gae_lambda=0.95``, ``max_grad_norm=0.5``), or, with the language-model policy
    (``"LMPolicy"``), the text values of :data:`agents.text_ppo.TEXT_PPO_DEFAULTS` (a small
    learning rate, ``gamma=1``, whole responses every rollout, an adaptive KL controller
    holding a single-digit KL per response). Values passed explicitly are kept.

    :param policy: ``"MlpPolicy"``, ``"MultiInputPolicy"``, ``"LMPolicy"`` or a policy class
    :param env: env id, ``gymnasium.Env``, ``gymnasium.vector.VectorEnv`` or SB3 ``VecEnv``
    :param learning_rate: number, ``"lin_<x>"`` or schedule of the remaining progress
    :param n_steps: steps per env per rollout; with the LM policy the default is the text
        env's ``max_new_tokens + 1``, so every env finishes a response in every rollout
        (and ``rollout/score_mean``, ``rollout/kl_mean``, ``rollout/response_len_mean``
        are in every log); a response still open at the end of a rollout continues in the next.
        A shorter ``n_steps`` with the LM policy warns: such a rollout can hold no finished response
    :param batch_size: minibatch size (with the LM policy: tokens, made of whole responses)
    :param n_epochs: passes over each rollout
    :param gamma: discount factor
    :param gae_lambda: GAE's lambda
    :param clip_range: ratio clip epsilon (number or schedule)
    :param clip_range_vf: value clip around the old value (None: no clipping)
    :param normalize_advantage: normalise advantages per minibatch
    :param ent_coef: entropy bonus weight
    :param vf_coef: value loss weight
    :param max_grad_norm: gradient-norm clip
    :param target_kl: stop the epochs of this rollout once approx KL > 1.5 * target_kl
    :param loss_type: ``"clip"`` (clipped surrogate) or ``"kl_penalty"`` (ratio*A - beta*KL)
    :param kl_beta: initial KL penalty coefficient (``loss_type="kl_penalty"``)
    :param kl_target: KL the adaptive beta aims at
    :param adaptive_kl: adapt ``kl_beta`` after each rollout
    :param rlhf: settings of the text path (adaptive KL coefficient of the env's reward,
        score normalisation, micro-batches, sample logging): an
        :class:`agents.text_ppo.RLHFConfig` or a dict of its fields. With the language-model
        policy (``"LMPolicy"``) PPO trains on whole responses, one forward per response
        (see :mod:`agents.text_ppo`).
    :param fused_update: with the plain MLP policy (``ActorCriticPolicy``, Discrete or Box
        actions, same hidden sizes for both networks, tanh or ReLU), compute the loss's
        gradients by hand (:mod:`agents.fast_mlp`, equal to autograd's up to rounding,
        several times faster for small networks); False: always autograd
    Other parameters (``tensorboard_log``, ``verbose``, ``seed``, ``device``, ``n_envs``,
    ``env_kwargs``, ``stats_window_size``): see :class:`OnPolicyAlgorithm`.
    """

    # the last text rollout is not state worth saving
    _excluded_save_params = OnPolicyAlgorithm._excluded_save_params + ("_segments",)

    def __init__(
        self,
        policy: Any,
        env: Any,
        learning_rate: Any = None,
        n_steps: int | None = None,
        batch_size: int | None = None,
        n_epochs: int | None = None,
        gamma: float | None = None,
        gae_lambda: float | None = None,
        clip_range: Any = 0.2,
        clip_range_vf: Any = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float | None = None,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: Any = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        loss_type: str = "clip",
        kl_beta: float = 1.0,
        kl_target: float = 0.01,
        adaptive_kl: bool = True,
        rlhf: RLHFConfig | dict | None = None,
        fused_update: bool = True,
        policy_kwargs: dict[str, Any] | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        # the arguments left out (None): SB3's defaults, or the text ones with the LM policy
        text = names_lm_policy(policy)
        given = dict(learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
                     gamma=gamma, gae_lambda=gae_lambda, max_grad_norm=max_grad_norm)
        defaults = TEXT_PPO_DEFAULTS if text else PPO_DEFAULTS
        resolved = {k: defaults[k] if v is None else v for k, v in given.items()}
        learning_rate, batch_size, n_epochs = resolved["learning_rate"], resolved["batch_size"], resolved["n_epochs"]
        gamma, gae_lambda, max_grad_norm = resolved["gamma"], resolved["gae_lambda"], resolved["max_grad_norm"]
        n_steps = resolved["n_steps"]
        if text and "detach_value" not in (policy_kwargs or {}):
            policy_kwargs = {**(policy_kwargs or {}), "detach_value": TEXT_PPO_DEFAULTS["detach_value"]}
        if loss_type not in ("clip", "kl_penalty"):
            raise ValueError(f"loss_type must be 'clip' or 'kl_penalty', got {loss_type!r}")
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("n_epochs", n_epochs, low=1, integer=True)
        if not callable(clip_range) and not isinstance(clip_range, str):
            check_number("clip_range", clip_range, low=0.0, low_open=True)
        if normalize_advantage and batch_size < 2:
            raise ValueError(f"batch_size={batch_size} with normalize_advantage=True: use batch_size > 1")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=1 if n_steps is None else n_steps,  # None (text): set from the env below
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            policy_kwargs=policy_kwargs,
            _init_setup_model=False,
            **kwargs,
        )
        if text or n_steps is None:
            self.n_steps = resolve_lm_n_steps(n_steps, self.env, TEXT_FALLBACK_N_STEPS)
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.loss_type = loss_type
        self.kl_beta = kl_beta
        self.kl_target = kl_target
        self.adaptive_kl = adaptive_kl
        self.rlhf = RLHFConfig.from_any(rlhf)
        self.fused_update = fused_update
        self._text_state = None
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        self.clip_range_schedule = get_schedule_fn(self.clip_range)
        self.clip_range_vf_schedule = None if self.clip_range_vf is None else get_schedule_fn(self.clip_range_vf)
        if is_lm_policy(self.policy):
            if self._text_state is None:
                self._setup_text_state(self.rlhf)
            else:  # loaded: the new env charges the saved run's KL coefficient and keeps trunk states
                self._attach_text_env()

    def collect_rollouts(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        if self._text_state is not None:  # language-model policy: whole responses (agents.text_ppo)
            return self._collect_text_rollout(env, callback, n_rollout_steps)
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def train(self) -> None:
        if self._text_state is not None:  # one forward per response instead of per token
            return self._train_text()
        if self.policy.training is not True:  # (the module-tree walk costs more than an update here)
            self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range_schedule(self._current_progress_remaining)
        clip_range_vf = None if self.clip_range_vf_schedule is None else self.clip_range_vf_schedule(self._current_progress_remaining)
        params = [p for group in self.policy.optimizer.param_groups for p in group["params"]]
        # hand-written gradients for the plain MLP policy (agents.fast_mlp); autograd otherwise
        fused = FusedPPOLoss.for_policy(self.policy) if getattr(self, "fused_update", True) else None
        is_distributed = distributed.is_distributed()
        # per-minibatch statistics stay tensors until the end: no sync per minibatch
        pg_losses, value_losses, entropy_losses, ratios, log_ratios = [], [], [], [], []
        raw_advantages = normalized_advantages = None
        continue_training = True
        # a rollout that fits in one minibatch is that same minibatch every epoch: fetch it once
        buffer = self.rollout_buffer
        n_samples = getattr(buffer, "buffer_size", 0) * getattr(buffer, "n_envs", 0)
        whole_rollout = list(buffer.get(self.batch_size)) if 0 < n_samples <= self.batch_size else None
        for epoch in range(self.n_epochs):
            for batch in whole_rollout if whole_rollout is not None else buffer.get(self.batch_size):
                advantages = batch.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    # normalised once when the same minibatch returns every epoch
                    if advantages is not raw_advantages:
                        raw_advantages = advantages
                        normalized_advantages = normalize_advantages(advantages)
                    advantages = normalized_advantages

                if fused is not None:
                    # the loss written out below, its gradients by hand (agents.fast_mlp):
                    # the same numbers as autograd without its per-op overhead
                    ratio, log_ratio, pg_loss, v_loss, entropy_loss, loss = fused.loss_and_grads(
                        batch.observations, batch.actions, batch.old_log_prob, advantages, batch.returns,
                        batch.old_values, clip_range, clip_range_vf, self.ent_coef, self.vf_coef,
                        kl_beta=self.kl_beta if self.loss_type == "kl_penalty" else None,
                    )
                else:
                    values, log_prob, entropy = self.policy.evaluate_actions(batch.observations, batch.actions)
                    values = values.flatten()

                    log_ratio = log_prob - batch.old_log_prob
                    ratio = torch.exp(log_ratio)
                    if self.loss_type == "clip":
                        pg_loss = clipped_surrogate(ratio, advantages, clip_range).mean()
                    else:
                        pg_loss = kl_penalty_surrogate(ratio, log_ratio, advantages, self.kl_beta).mean()
                    v_loss = value_loss(values, batch.returns, batch.old_values, clip_range_vf).mean()

                    # without an analytic entropy, -log_prob estimates it
                    entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)

                    loss = pg_loss + self.ent_coef * entropy_loss + self.vf_coef * v_loss

                pg_losses.append(pg_loss.detach())
                value_losses.append(v_loss.detach())
                entropy_losses.append(entropy_loss.detach())
                ratios.append(ratio.detach())
                log_ratios.append(log_ratio.detach())
                if self.target_kl is not None:
                    with torch.no_grad():
                        minibatch_kl = approx_kl(log_ratio).mean()
                    # ranks decide together (their KLs differ), else one would wait for the other forever
                    if distributed.allreduce_mean(minibatch_kl) > 1.5 * self.target_kl:
                        continue_training = False
                        if self.verbose >= 1:
                            print(f"Early stopping at step {epoch} due to reaching max kl: {minibatch_kl.item():.2f}")
                        break

                if fused is None:
                    for p in params:  # optimizer.zero_grad(set_to_none=True) without its profiler hooks
                        p.grad = None
                    loss.backward()
                if is_distributed:
                    # data-parallel: every rank applies the gradient of the mean loss over all ranks' samples
                    distributed.allreduce_gradients(params, weight=len(advantages))
                if fused is not None:  # its gradients share one buffer: one norm, one scale, one Adam step
                    grad_norm = fused.clip_grad_norm_(self.max_grad_norm)
                    if check_finite(loss, grad_norm, self._n_updates, self.on_nonfinite, self._last_checkpoint):
                        fused.optimizer_step()
                else:
                    grad_norm = clip_grad_norm(params, self.max_grad_norm)
                    if check_finite(loss, grad_norm, self._n_updates, self.on_nonfinite, self._last_checkpoint):
                        optimizer_step(self.policy.optimizer)
            self._n_updates += 1
            if not continue_training:
                break

        approx_kls, clip_fractions = kl_and_clip_fraction(ratios, log_ratios, clip_range)
        mean_kl = approx_kls.mean().item() if len(approx_kls) else 0.0
        if self.loss_type == "kl_penalty" and self.adaptive_kl:
            if mean_kl < self.kl_target / 1.5:
                self.kl_beta /= 2.0
            elif mean_kl > self.kl_target * 1.5:
                self.kl_beta *= 2.0
        valid = buffer.valid.reshape(-1)
        explained_var = explained_variance(buffer.values.reshape(-1)[valid], buffer.returns.reshape(-1)[valid])

        self.logger.record("train/entropy_loss", torch.stack(entropy_losses).mean().item())
        self.logger.record("train/policy_gradient_loss", torch.stack(pg_losses).mean().item())
        self.logger.record("train/value_loss", torch.stack(value_losses).mean().item())
        self.logger.record("train/approx_kl", mean_kl)
        self.logger.record("train/clip_fraction", clip_fractions.mean().item())
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        if self.loss_type == "kl_penalty":
            self.logger.record("train/kl_beta", self.kl_beta)
