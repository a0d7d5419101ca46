"""``OnPolicyAlgorithm``: collect ``n_steps`` from every env into a rollout buffer, then
``train()`` on it (SB3's split). Subclasses write ``train()``; text algorithms may also
override ``_make_rollout_buffer`` or ``collect_rollouts``.

The rollout path is batched: one policy forward for all envs per step, observations
copied once into the buffer's preallocated tensor, episode statistics kept as arrays.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from agents.base import BaseAlgorithm
from agents.buffers import RolloutBuffer
from agents import distributed
from agents.callbacks import BaseCallback
from agents.fast_kernels import clip_grad_norm
from agents.guards import check_finite, check_number, training_guard
from agents.preprocessing import as_tensor
from agents.text_rollout import text_episode_stats
from agents.utils import TRL_NAMES, init_parameters, safe_mean, unexpected_keyword
from agents.vec_env import VecEnvAdapter


class OnPolicyAlgorithm(BaseAlgorithm):
    """Base of PPO, A2C (and the text algorithms built on them).

    :param n_steps: steps per env per rollout
    :param gamma: discount factor
    :param gae_lambda: GAE's lambda
    :param ent_coef: entropy bonus weight
    :param vf_coef: value loss weight
    :param max_grad_norm: gradient-norm clip
    :param use_sde: accepted for SB3 compatibility (must be False)
    :param sde_sample_freq: accepted for SB3 compatibility
    :param rollout_buffer_class: buffer class (default :class:`RolloutBuffer`)
    :param rollout_buffer_kwargs: extra buffer arguments
    :param stats_window_size: episodes averaged for ``rollout/ep_rew_mean``
    Other parameters: see :class:`BaseAlgorithm`.
    """

    rollout_buffer: RolloutBuffer

    def __init__(
        self,
        policy: Any,
        env: Any,
        learning_rate: Any,
        n_steps: int,
        gamma: float,
        gae_lambda: float,
        ent_coef: float,
        vf_coef: float,
        max_grad_norm: float,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        monitor_wrapper: bool = True,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        _init_setup_model: bool = True,
        supported_action_spaces: tuple[type[spaces.Space], ...] | None = None,
        n_envs: int = 1,
        env_kwargs: dict[str, Any] | None = None,
        **unexpected: Any,
    ):
        if unexpected:  # a misspelt keyword names the agent and the closest argument, not this base class
            raise unexpected_keyword(
                type(self).__name__, unexpected, init_parameters(type(self)),
                "; text settings (target_kl, kl_coef, ...) go in rlhf=dict(...), policy ones in policy_kwargs=dict(...)"
                if "rlhf" in init_parameters(type(self)) else "; policy settings go in policy_kwargs=dict(...)",
                aliases=TRL_NAMES,
            )
        if use_sde:
            raise ValueError("use_sde=True is not supported by agents; pass use_sde=False")
        check_number("n_steps", n_steps, low=1, integer=True)
        check_number("gamma", gamma, low=0.0, high=1.0)
        check_number("gae_lambda", gae_lambda, low=0.0, high=1.0)
        check_number("ent_coef", ent_coef)
        check_number("vf_coef", vf_coef)
        check_number("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        super().__init__(
            policy,
            env,
            learning_rate,
            policy_kwargs=policy_kwargs,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            n_envs=n_envs,
            env_kwargs=env_kwargs,
            supported_action_spaces=supported_action_spaces,
        )
        self.n_steps = n_steps
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.ent_coef = ent_coef
        self.vf_coef = vf_coef
        self.max_grad_norm = max_grad_norm
        self.use_sde = False
        self.sde_sample_freq = sde_sample_freq
        self.rollout_buffer_class = rollout_buffer_class or RolloutBuffer
        self.rollout_buffer_kwargs = dict(rollout_buffer_kwargs or {})
        self._stats_window_size = stats_window_size
        self._clear_episode_stats()  # the buffers were sized with the default window
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        if self.observation_space is None:
            raise ValueError(f"env=None: {type(self).__name__} needs an environment to build its policy; pass one (env=None is only for load)")
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.rollout_buffer = self._make_rollout_buffer()
        self.policy = self._make_policy()

    def _make_rollout_buffer(self) -> RolloutBuffer:
        return self.rollout_buffer_class(
            self.n_steps,
            self.observation_space,
            self.action_space,
            device=self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self.rollout_buffer_kwargs,
        )

    def _on_n_envs_changed(self) -> None:
        self.rollout_buffer = self._make_rollout_buffer()

    def _env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Policy actions -> what the env accepts: numpy, Box actions clipped to the
        bounds (the buffer keeps the unclipped sample, whose log-prob was computed)."""
        env_actions = actions.cpu().numpy()
        if isinstance(self.action_space, spaces.Box):
            if getattr(self.policy, "squash_output", False):
                env_actions = self.policy.unscale_action(env_actions)
            else:
                env_actions = np.clip(env_actions, self.action_space.low, self.action_space.high)
        return env_actions

    def _clip_and_step(self, params: list[torch.Tensor], loss: torch.Tensor | float, grad_weight: float) -> None:
        """The end of an update whose gradients are accumulated: average them over the
        data-parallel ranks (each rank's weighted by ``grad_weight``, its share of the loss),
        clip their norm to ``max_grad_norm`` (``inf``: no clipping) and step the optimizer,
        unless the loss or a gradient is not finite (:func:`agents.guards.check_finite`)."""
        distributed.allreduce_gradients(params, weight=grad_weight)
        grad_norm = clip_grad_norm(params, self.max_grad_norm) if math.isfinite(self.max_grad_norm) else None
        if check_finite(loss, grad_norm, self._n_updates, self.on_nonfinite, self._last_checkpoint):
            self.policy.optimizer.step()

    def collect_rollouts(
        self, env: VecEnvAdapter, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """Fill ``rollout_buffer`` with ``n_rollout_steps`` steps of every env, then compute
        advantages and returns. Returns False if a callback asked to stop."""
        assert self._last_obs is not None, "no previous observation: call _setup_learn first"
        if self.policy.training is not False:
            self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        obs_is_dict = isinstance(self.observation_space, spaces.Dict)
        device = self.device
        if not obs_is_dict:
            # per-row views, made once: each step writes its observation into its row
            obs_rows = rollout_buffer.observations.unbind(0)
            # on the CPU through numpy, cheaper per call than a torch copy
            obs_rows_np = rollout_buffer.observations.numpy() if rollout_buffer.observations.device.type == "cpu" else None
        # loop invariants, looked up once
        steps_per_iteration = env.num_envs * distributed.world_size()  # counted over all ranks
        env_actions, next_step_autoreset = self._env_actions, env.next_step_autoreset
        inference_mode = torch.inference_mode()  # one context object, entered once per step
        text_stats = text_episode_stats(self, env)  # None unless a text env (A2C with the LM policy)
        n_steps = 0
        step = None
        while n_steps < n_rollout_steps:
            t = rollout_buffer.pos
            # write the observation straight into the buffer and act from that slot
            if obs_is_dict:
                for key, value in self._last_obs.items():
                    rollout_buffer.observations[key][t].copy_(torch.as_tensor(value), non_blocking=True)
                obs_tensor = {key: value[t] for key, value in rollout_buffer.observations.items()}
            else:
                obs_tensor = obs_rows[t]
                if obs_rows_np is not None:
                    obs_rows_np[t] = self._last_obs
                else:
                    obs_tensor.copy_(torch.as_tensor(self._last_obs), non_blocking=True)
            # inference mode: no autograd bookkeeping per op; the outputs are only copied
            with inference_mode:
                actions, values, log_probs = self.policy(obs_tensor)
            step = env.step(env_actions(actions))
            # counted over all ranks, so every rank runs the same number of iterations
            self.num_timesteps += steps_per_iteration
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            done = step.terminated | step.truncated
            self._update_episode_stats(step.rewards, done, step.valid)
            if text_stats is not None:
                text_stats.update(step.infos, step.valid, done & step.valid)
            n_steps += 1
            # numpy flags are staged by the buffer and moved to the device once per rollout
            rollout_buffer.add(
                None,  # the observation is already in its row
                actions,
                step.rewards,
                self._last_episode_starts,
                values,
                log_probs,
                terminated=step.terminated,
                truncated=step.truncated,
                valid=step.valid,
            )
            if step.final_obs is not None and step.truncated.any():
                # SAME_STEP autoreset: obs already is the reset one; bootstrap the time
                # limit with the value of the final observation instead
                with torch.no_grad():
                    final_values = self.policy.predict_values(as_tensor(step.final_obs, self.observation_space, device))
                truncated = torch.as_tensor(step.truncated).to(device)
                rollout_buffer.final_values[t] = torch.where(truncated, final_values.reshape(-1), rollout_buffer.final_values[t])
                rollout_buffer.final_values_given = True
            self._last_obs = step.obs
            # NEXT_STEP autoreset: the row after a done only resets, so the episode starts
            # one row later, where the step was not valid
            self._last_episode_starts = ~step.valid if next_step_autoreset else done
        with torch.no_grad():
            last_values = self.policy.predict_values(as_tensor(self._last_obs, self.observation_space, device))
        rollout_buffer.compute_returns_and_advantage(last_values=last_values)
        if text_stats is not None:
            text_stats.record(self.logger)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def train(self) -> None:
        """One update from ``self.rollout_buffer`` (the algorithm's loss)."""
        raise NotImplementedError

    # SB3's order: a rollout's table is written before the update on it, so train/ values
    # appear one row later. True (GRPO, RLOO): after the update, since what they measure of a
    # rollout (its KL to the reference) is computed there, and belongs in the rollout's row
    _log_after_train: bool = False

    def _dump_logs(self, iteration: int) -> None:
        time_elapsed = max((time.time_ns() - self.start_time) / 1e9, sys.float_info.epsilon)
        fps = int((self.num_timesteps - self._num_timesteps_at_start) / time_elapsed)
        self.logger.record("time/iterations", iteration, exclude="tensorboard")
        if len(self.ep_info_buffer) > 0:
            self.logger.record("rollout/ep_rew_mean", safe_mean(ep["r"] for ep in self.ep_info_buffer))
            self.logger.record("rollout/ep_len_mean", safe_mean(ep["l"] for ep in self.ep_info_buffer))
        self.logger.record("time/fps", fps)
        self.logger.record("time/time_elapsed", int(time_elapsed), exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    def learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> "OnPolicyAlgorithm":
        """Train for ``total_timesteps`` env steps (all envs together).

        :param total_timesteps: env steps to collect
        :param callback: a callback, a list of callbacks or None
        :param log_interval: iterations (rollouts) between log dumps
        :param tb_log_name: TensorBoard run name (``{tensorboard_log}/{tb_log_name}_{k}``);
            None: the class name (``"PPO"``, ``"GRPO"``, ...)
        :param reset_num_timesteps: False continues counters and the TensorBoard run
        :param progress_bar: show a tqdm progress bar
        """
        iteration = 0
        tb_log_name = tb_log_name or type(self).__name__
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        # Ctrl-C/SIGTERM with a CheckpointCallback: stop at a step, save, raise TrainingInterrupted
        with training_guard(self, callback) as callback:
            callback.on_training_start(locals(), globals())
            while self.num_timesteps < total_timesteps:
                continue_training = self.collect_rollouts(self.env, callback, self.rollout_buffer, n_rollout_steps=self.n_steps)
                if not continue_training:
                    break
                iteration += 1
                self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
                log_now = log_interval is not None and iteration % log_interval == 0
                if log_now and not self._log_after_train:
                    self._dump_logs(iteration)
                self.train()
                if log_now and self._log_after_train:
                    self._dump_logs(iteration)
            callback.on_training_end()
        return self
