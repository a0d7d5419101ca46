"""``evaluate_policy``: SB3's evaluation loop over any env the agents accept."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def evaluate_policy(
    model: Any,
    env: Any,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    render: bool = False,
    callback: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    reward_threshold: float | None = None,
    return_episode_rewards: bool = False,
    warn: bool = True,
) -> tuple[float, float] | tuple[list[float], list[int]]:
    """Run ``n_eval_episodes`` episodes and report the return.

    Episodes are spread over the sub-envs as SB3 does (env i runs ``(n + i) // n_envs``),
    so the set of episodes does not depend on which env finishes first.

    :param model: anything with ``predict(obs, state, episode_start, deterministic)``
    :param env: env id, ``gymnasium.Env``, ``gymnasium.vector.VectorEnv`` or SB3 ``VecEnv``
    :param n_eval_episodes: episodes to run
    :param deterministic: use the mode of the action distribution
    :param render: call ``env.render()`` each step (single envs only)
    :param callback: called with ``(locals(), globals())`` each step
    :param reward_threshold: raise ``AssertionError`` if the mean return is below it
    :param return_episode_rewards: return the per-episode returns and lengths instead
    :param warn: accepted for SB3 compatibility
    :return: ``(mean, std)`` of the returns, or ``(returns, lengths)``
    """
    from agents.vec_env import wrap_env

    venv = wrap_env(env)
    n_envs = venv.num_envs
    episode_rewards: list[float] = []
    episode_lengths: list[int] = []
    counts = np.zeros(n_envs, dtype=int)
    targets = np.array([(n_eval_episodes + i) // n_envs for i in range(n_envs)], dtype=int)
    current_rewards = np.zeros(n_envs)
    current_lengths = np.zeros(n_envs, dtype=int)
    observations = venv.reset()
    states = None
    episode_starts = np.ones(n_envs, dtype=bool)
    while (counts < targets).any():
        actions, states = model.predict(observations, state=states, episode_start=episode_starts, deterministic=deterministic)
        step = venv.step(actions)
        valid = step.valid
        current_rewards += step.rewards * valid
        current_lengths += valid
        done = (step.terminated | step.truncated) & valid
        for i in np.nonzero(done & (counts < targets))[0]:
            episode_rewards.append(float(current_rewards[i]))
            episode_lengths.append(int(current_lengths[i]))
            counts[i] += 1
        current_rewards[done] = 0.0
        current_lengths[done] = 0
        episode_starts = done
        observations = step.obs
        if callback is not None:
            callback(locals(), globals())
        if render and hasattr(venv.env, "render"):
            venv.env.render()
    if isinstance(env, str):  # made here, so closed here; the caller owns any other env
        venv.close()
    mean_reward, std_reward = float(np.mean(episode_rewards)), float(np.std(episode_rewards))
    if reward_threshold is not None:
        assert mean_reward > reward_threshold, f"mean reward {mean_reward:.2f} below the threshold {reward_threshold:.2f}"
    if return_episode_rewards:
        return episode_rewards, episode_lengths
    return mean_reward, std_reward
