"""RLOO and GRPO raise held-out accuracy on a tiny verifiable task (tiny model, seeded budget).

The task: short questions whose gold answer (the ``answer`` column) is a word the shipped
tiny model writes now and then ("Try"); the correctness reward (TRL's convention, reading
that column) is 1 when the completion's first word is the row's answer. Held-out questions
are not trained on.
"""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env  # noqa: F401  (registers the envs)
from agents import GRPO, RLOO
from rlhf_env.generation import generate

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["Should I try?", "Is it good?", "What should I do?", "Can I go now?", "Is it hard?", "Should I ask?"]
TEST = ["Should I start?", "Is it fun?", "What should I say?", "Can I stay?"]


def rows(split: str) -> list[dict]:
    return [{"prompt": q, "answer": "Try"} for q in (TRAIN if split == "train" else TEST)]


def correctness(prompts, completions, answer, **columns):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    first = [(re.findall(r"[A-Za-z]+", t) or [""])[0] for t in texts]
    return [1.0 if f.lower() == a.lower() else 0.0 for f, a in zip(first, answer)]


def greedy_accuracy(agent, test_rows) -> float:
    core = agent.policy.core
    out = generate(core.actor, core.tokenizer, [r["prompt"] for r in test_rows], greedy=True, max_new_tokens=4, progress=False)
    return float(np.mean(correctness(None, [t[0] for t in out.texts], [r["answer"] for r in test_rows])))


@pytest.mark.parametrize("algo", [GRPO, RLOO])
def test_group_methods_raise_accuracy_on_a_tiny_verifiable_task(algo):
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=16, dataset=rows("train"), reward_funcs=correctness, max_new_tokens=4,
                   shared_model=False)  # a fresh copy of the tiny model for each test
    agent = algo("LMPolicy", env, group_size=8, learning_rate=3e-3, beta=0.0, seed=0)
    test = rows("test")
    before = greedy_accuracy(agent, test)
    agent.learn(16 * 5 * 8)  # 8 iterations of 2 questions x 8 completions
    after = greedy_accuracy(agent, test)
    assert before <= 0.25 and after >= 0.75, (before, after)


def test_group_rollouts_read_every_step_from_the_env_cache():
    """Envs whose response has finished idle until the group is done; the policy does not act
    for them (their final context is not in the env's step cache, so acting would cost one full
    forward without KV cache per idle env and step: measured 3x slower GRPO steps on SmolLM2)."""
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=8, dataset=rows("train"), reward_funcs=correctness, max_new_tokens=16,
                       shared_model=False)
    agent = GRPO("LMPolicy", env, group_size=4, learning_rate=1e-3, beta=0.0, seed=0)
    core = agent.policy.core
    agent.learn(8 * 17 * 2)
    lengths = [len(s) for s in agent._segments]
    assert min(lengths) < max(lengths)  # some responses finished early, so some envs idled
    assert core.misses == 0 and core.hits > 0
