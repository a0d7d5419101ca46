"""A one-call demo: PPO on CartPole-v1 with rl-zoo3's tuned settings, then evaluation."""

from __future__ import annotations

import os
import time
from typing import Any


def cartpole_demo(out_dir: str | None = None, timesteps: int | None = None, seed: int = 0, verbose: int = 0) -> dict[str, Any]:
    """Train PPO on CartPole-v1 (shipped rl-zoo3 hyperparameters), evaluate it on 20
    deterministic episodes, print and return the result.

    :param out_dir: if given, the model (``ppo_cartpole.zip``) and TensorBoard logs go here
    :param timesteps: training steps (default: the YAML's 100k)
    :param seed: random seed
    :param verbose: 1 prints SB3's table during training
    :return: ``{"mean_reward", "std_reward", "timesteps", "train_seconds", "model_path"}``
    """
    import torch

    from agents import PPO, evaluate_policy
    from agents.hyperparams import load_hyperparams

    params = load_hyperparams("ppo", "CartPole-v1")
    total = int(timesteps if timesteps is not None else params.pop("n_timesteps"))
    params.pop("n_timesteps", None)
    n_envs = params.pop("n_envs")
    policy = params.pop("policy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-64 MLP: extra threads only add synchronisation
    try:
        model = PPO(
            policy, "CartPole-v1", n_envs=n_envs, seed=seed, verbose=verbose,
            tensorboard_log=os.path.join(out_dir, "tensorboard") if out_dir else None, **params,
        )
        start = time.perf_counter()
        model.learn(total)
        train_seconds = time.perf_counter() - start
        mean, std = evaluate_policy(model, "CartPole-v1", n_eval_episodes=20, deterministic=True)
    finally:
        torch.set_num_threads(threads)
    model_path = None
    if out_dir:
        model_path = os.path.join(out_dir, "ppo_cartpole.zip")
        model.save(model_path)
    result = {
        "mean_reward": mean,
        "std_reward": std,
        "timesteps": model.num_timesteps,
        "train_seconds": train_seconds,
        "model_path": model_path,
    }
    print(
        f"PPO on CartPole-v1: {model.num_timesteps} steps in {train_seconds:.1f} s; "
        f"evaluation over 20 deterministic episodes: {mean:.1f} +/- {std:.1f} (solved at >= 475)"
    )
    return result
