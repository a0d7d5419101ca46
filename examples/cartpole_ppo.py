"""PPO on CartPole-v1 with the Stable-Baselines3 API (swap ``stable_baselines3`` for ``agents``).

    python examples/cartpole_ppo.py            # 100k steps, about 20 s on one CPU core: mean reward 500
    RLHF_ENV_QUICK=1 python examples/cartpole_ppo.py   # a few seconds (what the test suite runs)
"""

import os

from rlhf_env.agents import PPO, evaluate_policy
from rlhf_env.agents.schedules import linear_schedule

QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"

# rl-zoo3's tuned CartPole settings, the same ones agents/hyperparams/ppo.yml ships
model = PPO(
    "MlpPolicy", "CartPole-v1", n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
    n_epochs=20, ent_coef=0.0, learning_rate=linear_schedule(1e-3), clip_range=linear_schedule(0.2), seed=0,
)
model.learn(5_000 if QUICK else 100_000, progress_bar=not QUICK)
mean_reward, std_reward = evaluate_policy(model, model.get_env(), n_eval_episodes=5 if QUICK else 20, deterministic=True)
print(f"CartPole-v1: mean reward {mean_reward:.1f} +- {std_reward:.1f} over {5 if QUICK else 20} episodes")
