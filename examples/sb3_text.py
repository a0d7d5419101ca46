"""Stable-Baselines3's own PPO trains the text env with rlhf-env's language-model policy.

``SB3VecEnv`` shows the batched text env to SB3 as a ``VecEnv`` (one forward pass for all
contexts, KV caches); ``LMActorCriticPolicy`` is an SB3 policy whose actor is the env's
language model and whose critic is a value head on the same trunk. ``VecMonitor`` gives
SB3's logs their ``rollout/ep_rew_mean`` (the score minus the KL penalty).

    python examples/sb3_text.py               # tiny model, well under a minute
    RLHF_ENV_QUICK=1 python examples/sb3_text.py   # seconds (what the test suite runs)
"""

import os

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

import rlhf_env  # noqa: F401  (registers TextRLHF-v0 and TextRLHF-tiny-v0)
from rlhf_env.agents.policies import LMActorCriticPolicy
from rlhf_env.envs.wrappers import SB3VecEnv
from rlhf_env.generation import generate
from rlhf_env.prompts import load_prompts

QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"

# the tiny model and its reward (VADER: a friendly tone scores high), 12 new tokens a response
venv = VecMonitor(SB3VecEnv(gym.make_vec("TextRLHF-tiny-v0", num_envs=8, max_new_tokens=12, autoreset_mode="SameStep")))
model = PPO(LMActorCriticPolicy, venv, n_steps=26, batch_size=104, n_epochs=4, learning_rate=1e-3, gamma=1.0, seed=0)

text_env = venv.unwrapped.venv  # the Gymnasium vector env inside the SB3 views
core, reward = text_env.core, text_env.reward_model  # its actor (the model the policy trains), tokenizer, reward
prompts = load_prompts(split="test")[:16]


def mean_score() -> float:
    texts = [t[0] for t in generate(core.actor, core.tokenizer, prompts, max_new_tokens=12, progress=False).texts]
    return float(reward(prompts, texts).mean())


before = mean_score()
model.learn(8 * 26 * (1 if QUICK else 10))
print(f"reward of sampled held-out responses: {before:.3f} before, {mean_score():.3f} after")
