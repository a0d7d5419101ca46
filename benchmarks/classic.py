"""Classic-control benchmark: agents vs Stable-Baselines3 (and REINFORCE vs the
pytorch/examples REINFORCE), same hyperparameters and seeds, measured in one run.

    python -m benchmarks.classic                      # everything (several minutes)
    python -m benchmarks.classic --only ppo-cartpole --seeds 0 1 2

Per seed it prints the steps to the threshold (first rollout where the mean return of the
last 20 training episodes reaches it), the final mean return over 20 deterministic
episodes, the wall time of ``learn`` and the ratios SB3-time / our-time in wall time and
in CPU time of the process (the CPU ratio is the steadier one on a shared machine). Both libraries run
with the same torch thread count (``--threads``, default 1: the fastest for these MLPs
on a small machine for both).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
import torch

CARTPOLE_PPO = dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0)
TASKS = {
    # name: (env id, steps, threshold, n_envs, kwargs, per-library schedule args)
    "ppo-cartpole": ("CartPole-v1", 100_000, 475.0, 8, CARTPOLE_PPO, {"lr": ("lin", 1e-3), "clip": ("lin", 0.2)}),
    "ppo-pendulum": (
        "Pendulum-v1", 200_000, -200.0, 8,  # as agents/hyperparams/ppo.yml
        dict(n_steps=256, batch_size=128, gae_lambda=0.95, gamma=0.9, n_epochs=20, ent_coef=0.0, max_grad_norm=10.0,
             policy_kwargs=dict(log_std_init=-1.0)),
        {"lr": ("lin", 1e-3), "clip": ("const", 0.2)},
    ),
}


def _schedule(kind_value: tuple[str, float]) -> Any:
    kind, value = kind_value
    if kind == "lin":
        return lambda progress: progress * value
    return value


def _threshold_tracker(base_class: type, threshold: float) -> Any:
    class Tracker(base_class):
        """Records the first step where the mean of the last 20 training episodes >= threshold."""

        def __init__(self):
            super().__init__()
            self.reached_at = None

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            eps = list(self.model.ep_info_buffer)[-20:]
            if self.reached_at is None and len(eps) >= 20 and np.mean([e["r"] for e in eps]) >= threshold:
                self.reached_at = self.model.num_timesteps

    return Tracker()


def run_sb3(task: str, seed: int) -> dict[str, float]:
    import stable_baselines3 as sb3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    env_id, steps, threshold, n_envs, kwargs, sched = TASKS[task]
    tracker = _threshold_tracker(BaseCallback, threshold)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = sb3.PPO("MlpPolicy", make_vec_env(env_id, n_envs=n_envs, seed=seed), learning_rate=_schedule(sched["lr"]),
                    clip_range=_schedule(sched["clip"]), seed=seed, device="cpu", **kwargs)
    model.learn(steps, callback=tracker)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    mean, _ = evaluate_policy(model, gym.make(env_id), n_eval_episodes=20, deterministic=True)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "final": mean, "reached_at": tracker.reached_at}


def run_ours(task: str, seed: int) -> dict[str, float]:
    import agents
    from agents.callbacks import BaseCallback

    env_id, steps, threshold, n_envs, kwargs, sched = TASKS[task]
    tracker = _threshold_tracker(BaseCallback, threshold)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = agents.PPO("MlpPolicy", env_id, n_envs=n_envs, learning_rate=_schedule(sched["lr"]),
                       clip_range=_schedule(sched["clip"]), seed=seed, device="cpu", **kwargs)
    model.learn(steps, callback=tracker)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    mean, _ = agents.evaluate_policy(model, gym.make(env_id), n_eval_episodes=20, deterministic=True)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "final": mean, "reached_at": tracker.reached_at}


# --- REINFORCE: agents vs pytorch/examples (reinforcement_learning/reinforce.py) ---------
def pytorch_examples_reinforce(seed: int, max_episodes: int) -> int | None:
    """The pytorch/examples REINFORCE, as published (128 hidden, dropout 0.6, Adam 1e-2,
    gamma 0.99, normalised returns, one update per episode); the episode at which its
    running reward (0.05 smoothing, from 10) first exceeds 475, or None."""
    from torch import nn
    from torch.nn import functional as F

    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.affine1 = nn.Linear(4, 128)
            self.dropout = nn.Dropout(p=0.6)
            self.affine2 = nn.Linear(128, 2)

        def forward(self, x):
            return F.softmax(self.affine2(F.relu(self.dropout(self.affine1(x)))), dim=1)

    torch.manual_seed(seed)
    env = gym.make("CartPole-v1")
    env.reset(seed=seed)
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    eps = np.finfo(np.float32).eps.item()
    running_reward = 10.0
    for episode in range(1, max_episodes + 1):
        state, _ = env.reset()
        log_probs, rewards = [], []
        for _ in range(1, 10000):
            probs = policy(torch.from_numpy(state).float().unsqueeze(0))
            m = torch.distributions.Categorical(probs)
            action = m.sample()
            log_probs.append(m.log_prob(action))
            state, reward, terminated, truncated, _ = env.step(action.item())
            rewards.append(reward)
            if terminated or truncated:
                break
        running_reward = 0.05 * sum(rewards) + 0.95 * running_reward
        returns, R = deque(), 0.0
        for r in rewards[::-1]:
            R = r + 0.99 * R
            returns.appendleft(R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + eps)
        loss = torch.cat([-lp * R for lp, R in zip(log_probs, returns)]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if running_reward > 475:
            return episode
    return None


def agents_reinforce(seed: int, max_episodes: int) -> int | None:
    """Our REINFORCE with the shipped CartPole hyperparameters; same running-reward rule."""
    from agents import REINFORCE
    from agents.callbacks import BaseCallback
    from agents.hyperparams import load_hyperparams

    class Solved(BaseCallback):
        def __init__(self):
            super().__init__()
            self.running, self.seen, self.solved_at = 10.0, 0, None

        def _on_step(self) -> bool:
            new = self.model._episode_num - self.seen
            if new:
                for ep in list(self.model.ep_info_buffer)[-new:]:
                    self.seen += 1
                    self.running = 0.05 * ep["r"] + 0.95 * self.running
                    if self.running > 475:
                        self.solved_at = self.seen
                        return False
            return self.seen < max_episodes

    params = load_hyperparams("reinforce", "CartPole-v1")
    params.pop("n_timesteps")
    policy = params.pop("policy")
    model = REINFORCE(policy, "CartPole-v1", seed=seed, **params)
    solved = Solved()
    model.learn(10**8, callback=solved)
    return solved.solved_at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["ppo-cartpole", "ppo-pendulum", "reinforce-cartpole"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--reinforce-seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both libraries (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": torch.get_num_threads()}
    for task in [t for t in args.only if t in TASKS]:
        env_id, steps, threshold, *_ = TASKS[task]
        print(f"\n## PPO on {env_id}, {steps} steps, threshold {threshold} (torch threads {torch.get_num_threads()})")
        print("| seed | SB3 steps to thr. | ours steps to thr. | SB3 final | ours final | SB3 s | ours s "
              "| SB3/ours wall | SB3/ours CPU |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = []
        for seed in args.seeds:
            sb3 = run_sb3(task, seed)
            ours = run_ours(task, seed)
            ratio = sb3["seconds"] / ours["seconds"]
            cpu_ratio = sb3["cpu_seconds"] / ours["cpu_seconds"]
            rows.append({"seed": seed, "sb3": sb3, "ours": ours, "ratio": ratio, "cpu_ratio": cpu_ratio})
            print(f"| {seed} | {sb3['reached_at']} | {ours['reached_at']} | {sb3['final']:.1f} | {ours['final']:.1f} | "
                  f"{sb3['seconds']:.1f} | {ours['seconds']:.1f} | {ratio:.2f}x | {cpu_ratio:.2f}x |", flush=True)
        results[task] = rows
    if "reinforce-cartpole" in args.only:
        print("\n## REINFORCE on CartPole-v1: episodes until the running reward > 475 (max 3000)")
        print("| seed | pytorch/examples | agents.REINFORCE |")
        print("|---|---|---|")
        rows = []
        for seed in args.reinforce_seeds:
            peer = pytorch_examples_reinforce(seed, 3000)
            ours = agents_reinforce(seed, 3000)
            rows.append({"seed": seed, "pytorch_examples": peer, "ours": ours})
            print(f"| {seed} | {peer} | {ours} |", flush=True)
        med = lambda xs: float(np.median([x if x is not None else 3000 for x in xs]))  # noqa: E731
        print(f"| median | {med([r['pytorch_examples'] for r in rows])} | {med([r['ours'] for r in rows])} |")
        results["reinforce-cartpole"] = rows
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
