"""Advantage Actor-Critic (synchronous A3C), SB3's ``A2C`` interface.

One gradient step per rollout on

    L = -E[log pi(a|s) * A] + vf_coef * E[(V - R)^2] - ent_coef * E[H(pi)]

with ``A`` from GAE (``gae_lambda=1``: n-step returns) and RMSprop as in SB3.
"""

from __future__ import annotations

from typing import Any

import torch

from agents.losses import normalize_advantages, policy_gradient_loss, value_loss
from agents.on_policy import OnPolicyAlgorithm
from agents.text_ppo import names_lm_policy, resolve_lm_n_steps
from agents.utils import explained_variance


class A2C(OnPolicyAlgorithm):
    """A2C.

    :param policy: ``"MlpPolicy"``, ``"MultiInputPolicy"``, ``"LMPolicy"`` or a policy class
    :param env: env id, ``gymnasium.Env``, ``gymnasium.vector.VectorEnv`` or SB3 ``VecEnv``
    :param learning_rate: number, ``"lin_<x>"`` or schedule
    :param n_steps: steps per env per update (default 5; with the language-model policy the
        text env's ``max_new_tokens + 1``, so every env finishes a response in every rollout,
        and a shorter value warns)
    :param gamma: discount factor
    :param gae_lambda: GAE's lambda (1.0: classic n-step advantage)
    :param ent_coef: entropy bonus weight
    :param vf_coef: value loss weight
    :param max_grad_norm: gradient-norm clip
    :param rms_prop_eps: RMSprop epsilon
    :param use_rms_prop: RMSprop (SB3's default) instead of Adam
    :param normalize_advantage: normalise advantages
    Other parameters (``tensorboard_log``, ``verbose``, ``seed``, ``device``, ``n_envs``,
    ``env_kwargs``, ``stats_window_size``): see :class:`OnPolicyAlgorithm`.
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        learning_rate: Any = 7e-4,
        n_steps: int | None = None,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        rms_prop_eps: float = 1e-5,
        use_rms_prop: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: Any = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = False,
        policy_kwargs: dict[str, Any] | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        policy_kwargs = dict(policy_kwargs or {})
        if use_rms_prop and "optimizer_class" not in policy_kwargs:
            policy_kwargs["optimizer_class"] = torch.optim.RMSprop
            policy_kwargs["optimizer_kwargs"] = dict(alpha=0.99, eps=rms_prop_eps, weight_decay=0)
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=5 if n_steps is None else n_steps,
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
        if names_lm_policy(policy):
            self.n_steps = resolve_lm_n_steps(n_steps, self.env, 5)
        self.normalize_advantage = normalize_advantage
        if _init_setup_model:
            self._setup_model()

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        params = [p for group in self.policy.optimizer.param_groups for p in group["params"]]
        for batch in self.rollout_buffer.get(batch_size=None):
            values, log_prob, entropy = self.policy.evaluate_actions(batch.observations, batch.actions)
            values = values.flatten()
            advantages = batch.advantages
            if self.normalize_advantage:
                advantages = normalize_advantages(advantages)

            pg_loss = policy_gradient_loss(log_prob, advantages).mean()
            v_loss = value_loss(values, batch.returns).mean()
            entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
            loss = pg_loss + self.ent_coef * entropy_loss + self.vf_coef * v_loss

            self.policy.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._clip_and_step(params, loss, grad_weight=len(advantages))  # data-parallel: mean over all ranks' samples
        self._n_updates += 1

        buffer = self.rollout_buffer
        valid = buffer.valid.reshape(-1)
        explained_var = explained_variance(buffer.values.reshape(-1)[valid], buffer.returns.reshape(-1)[valid])
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", pg_loss.item())
        self.logger.record("train/value_loss", v_loss.item())
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())

    def learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 100,
        tb_log_name: str = "A2C",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> "A2C":
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)
