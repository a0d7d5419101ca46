"""REINFORCE (Williams 1992): Monte-Carlo policy gradient on complete episodes.

After every ``n_episodes`` finished episodes, one gradient step on

    L = -E[log pi(a_t|s_t) * (G_t - b(s_t))] + vf_coef * E[(V(s_t) - G_t)^2] - ent_coef * E[H]

with the discounted reward-to-go ``G_t = sum_k gamma^k r_{t+k}`` of the episode,
``b = V`` when ``use_baseline`` (a learned state value, else 0), and ``G - b`` normalised
to zero mean and unit variance per update when ``normalize_returns``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from agents.callbacks import BaseCallback
from agents.losses import normalize_advantages, policy_gradient_loss, value_loss
from agents.on_policy import OnPolicyAlgorithm
from agents.preprocessing import as_tensor
from agents.text_rollout import text_episode_stats
from agents.vec_env import VecEnvAdapter


def discounted_reward_to_go(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma * G_{t+1} * (1 - done_t)`` over a (T, n_envs) array: the return
    from t to the end of t's episode."""
    returns = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running * (1.0 - dones[t])
        returns[t] = running
    return returns


class REINFORCE(OnPolicyAlgorithm):
    """REINFORCE with optional learned baseline.

    :param policy: ``"MlpPolicy"``, ``"MultiInputPolicy"``, ``"LMPolicy"`` or a policy class
    :param env: env id, ``gymnasium.Env``, ``gymnasium.vector.VectorEnv`` or SB3 ``VecEnv``
    :param learning_rate: number, ``"lin_<x>"`` or schedule
    :param n_episodes: finished episodes per gradient step (over all envs)
    :param gamma: discount factor
    :param use_baseline: subtract the learned state value from the return
    :param normalize_returns: normalise ``G - b`` per update
    :param ent_coef: entropy bonus weight
    :param vf_coef: value loss weight (with a baseline)
    :param max_grad_norm: gradient-norm clip (None: no clipping)
    With several envs, the unfinished episodes at the end of a collection are kept and
    finished in the next one (their early steps come from the previous policy).
    Other parameters (``tensorboard_log``, ``verbose``, ``seed``, ``device``, ``n_envs``,
    ``env_kwargs``, ``stats_window_size``): see :class:`OnPolicyAlgorithm`.
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        learning_rate: Any = 1e-2,
        n_episodes: int = 1,
        gamma: float = 0.99,
        use_baseline: bool = True,
        normalize_returns: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        from agents.distributed import launched_by_torchrun

        if launched_by_torchrun():
            # ranks finish different numbers of episodes per update, so their gradient
            # all-reduces would not line up and the run would hang
            raise RuntimeError(
                "REINFORCE is not data-parallel: it updates after a number of finished episodes, "
                "which differs between ranks; run it in one process, or use PPO/A2C under torchrun"
            )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=1,
            gamma=gamma,
            gae_lambda=1.0,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm if max_grad_norm is not None else float("inf"),
            _init_setup_model=False,
            **kwargs,
        )
        self.n_episodes = n_episodes
        self.use_baseline = use_baseline
        self.normalize_returns = normalize_returns
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        self._clear_episodes()

    def _clear_episodes(self) -> None:
        self._obs: list[Any] = []
        self._actions: list[torch.Tensor] = []
        self._rewards: list[np.ndarray] = []
        self._dones: list[np.ndarray] = []
        self._valid: list[np.ndarray] = []

    def _make_rollout_buffer(self) -> Any:
        return None  # episodes are kept as lists of per-step batches

    def _on_n_envs_changed(self) -> None:
        self._clear_episodes()

    def collect_rollouts(self, env: VecEnvAdapter, callback: BaseCallback, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """Step all envs until ``n_episodes`` episodes have finished since the last update."""
        if len(self._valid) and self._valid[0].shape[0] != env.num_envs:
            self._clear_episodes()
        self.policy.set_training_mode(False)
        callback.on_rollout_start()
        text_stats = text_episode_stats(self, env)  # None unless a text env (the LM policy)
        finished = 0
        while finished < self.n_episodes:
            obs_tensor = as_tensor(self._last_obs, self.observation_space, self.device)
            with torch.no_grad():
                actions = self.policy._predict(obs_tensor)
            step = env.step(self._env_actions(actions))
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            done = step.terminated | step.truncated
            self._update_episode_stats(step.rewards, done, step.valid)
            if text_stats is not None:
                text_stats.update(step.infos, step.valid, done & step.valid)
            self._obs.append(obs_tensor)
            self._actions.append(actions)
            self._rewards.append(step.rewards)
            self._dones.append(done)
            self._valid.append(step.valid)
            finished += int((done & step.valid).sum())
            self._last_obs = step.obs
        if text_stats is not None:
            text_stats.record(self.logger)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        rewards = np.stack(self._rewards)
        dones = np.stack(self._dones)
        valid = np.stack(self._valid)
        n_rows = rewards.shape[0]
        # rows up to each env's last finished episode are complete; the rest wait
        finished_rows = dones & valid
        any_done_later = np.flip(np.cumsum(np.flip(finished_rows, 0), 0), 0) > 0
        complete = valid & any_done_later
        returns = discounted_reward_to_go(rewards, dones.astype(np.float64), self.gamma)

        t_idx, e_idx = np.nonzero(complete)
        if isinstance(self.observation_space, spaces.Dict):
            obs = {k: torch.stack([o[k] for o in self._obs])[t_idx, e_idx] for k in self.observation_space.spaces}
        else:
            obs = torch.stack(self._obs)[t_idx, e_idx]
        actions = torch.stack(self._actions)[t_idx, e_idx]
        returns_t = torch.as_tensor(returns[t_idx, e_idx], dtype=torch.float32, device=self.device)

        values, log_prob, entropy = self.policy.evaluate_actions(obs, actions)
        values = values.flatten()
        advantages = returns_t - values.detach() if self.use_baseline else returns_t
        if self.normalize_returns and len(advantages) > 1:
            advantages = normalize_advantages(advantages)

        pg_loss = policy_gradient_loss(log_prob, advantages).mean()
        v_loss = value_loss(values, returns_t).mean() if self.use_baseline else torch.zeros((), device=self.device)
        entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
        loss = pg_loss + self.ent_coef * entropy_loss + self.vf_coef * v_loss

        self.policy.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._clip_and_step(list(self.policy.parameters()), loss, grad_weight=len(advantages))
        self._n_updates += 1

        # keep the unfinished tails: rows after an env's last finished episode
        last_finished = np.where(any_done_later.any(0), n_rows - 1 - np.argmax(np.flip(finished_rows, 0), 0), -1)
        start = int(last_finished.min()) + 1
        self._obs, self._actions = self._obs[start:], self._actions[start:]
        self._rewards, self._dones = self._rewards[start:], self._dones[start:]
        self._valid = [v & (start + offset > last_finished) for offset, v in enumerate(self._valid[start:])]

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/policy_gradient_loss", pg_loss.item())
        self.logger.record("train/value_loss", v_loss.item())
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/loss", loss.item())

    def learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 10,
        tb_log_name: str = "REINFORCE",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> "REINFORCE":
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)
