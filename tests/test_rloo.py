"""RLOO: registered, GRPO's env and groups, the KL in the reward, and learning on TextRLHF-tiny-v0.
(Its advantages and loss against hand computations: tests/test_losses.py.)"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401
from tests.conftest import tiny_v0_scorer
from agents import ALGOS, RLOO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rloo_groups_kl_in_reward_and_logs(tiny_lm_dir, tiny_prompts, length_reward):
    env = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=5, shared_model=False)
    model = RLOO("LMPolicy", env, group_size=2, learning_rate=1e-3, beta=0.05, seed=0)
    assert ALGOS["rloo"] is RLOO
    assert env.unwrapped.kl_coef == 0.0  # the agent charges the KL itself, per response
    model.learn(4 * 6 * 2, log_interval=10**6)  # (no table: the logged values stay readable)
    segs = model._segments
    assert len(segs) == 4 and all(s.score is not None for s in segs)
    assert all(torch.isfinite(s.ref_logprobs).all() for s in segs)  # the reference ran once per response
    logged = model.logger.name_to_value
    assert np.isfinite(logged["rollout/kl_mean"]) and logged["train/kl_ref"] == 0.0  # KL in the reward, not the loss


def test_rloo_raises_the_reward_of_tiny_v0():
    torch.manual_seed(0)
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=16, max_new_tokens=12, shared_model=False)
    mean_score = tiny_v0_scorer(env)

    before = mean_score()
    model = RLOO("LMPolicy", env, group_size=4, learning_rate=1e-3, n_epochs=2, beta=0.02, seed=0)
    model.learn(16 * 13 * 12)  # 12 rollouts of 16 responses
    after = mean_score()
    assert after > before + 0.25, (before, after)
