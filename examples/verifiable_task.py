"""Reinforcement learning from verifiable rewards: RLOO on reasoning-gym's chain_sum.

A task is rows (a chat prompt, the gold answer, the reasoning-gym item) plus the task's own
verifier as a TRL-style reward function; ``ReasoningGym-v0`` is the text env over its train
split, and ``evaluate_task`` scores a policy on the held-out split (greedy and sampled).

    python examples/verifiable_task.py                        # tiny model, seconds (0 accuracy: it cannot add)
    MODEL=smollm2-135m python examples/verifiable_task.py     # SmolLM2-135M-Instruct: it learns (minutes)
    RLHF_ENV_QUICK=1 python examples/verifiable_task.py       # what the test suite runs

``rlhf-env demo --task chain_sum --out DIR`` runs the full demo (before/after accuracy,
DIR/policy, DIR/curve.png); ``rlhf-env eval DIR/policy --task chain_sum`` scores a model.
"""

import os

import gymnasium as gym

import rlhf_env  # noqa: F401  (registers ReasoningGym-v0)
from rlhf_env.agents import RLOO
from rlhf_env.tasks import accuracy_line, evaluate_task, make_task

MODEL = os.environ.get("MODEL", "tiny")
QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"
real = MODEL != "tiny"

task = make_task("chain_sum")  # a + b or a - b with one-digit numbers; any reasoning-gym name works
print(task.rows("test")[0]["prompt"], "->", task.rows("test")[0]["answer"])

group, rows_per_step = (4, 8) if real else (4, 2)  # the demo's 8 rows x 4 completions a step
env = gym.make_vec("ReasoningGym-v0", num_envs=group * rows_per_step, task=task, model=MODEL)
agent = RLOO("LMPolicy", env, group_size=group, learning_rate=1e-4 if real else 1e-3, beta=0.0, seed=0,
             policy_kwargs={"train_layers": 4} if real else {})

limit, k = (64, 4) if real else (4, 2)
print("before:", accuracy_line(evaluate_task(agent, task, limit=limit, num_samples=k, progress=False)))
iterations = 1 if QUICK else (30 if real else 3)
for i in range(iterations):  # one iteration = a group of completions per row, then one update
    agent.learn(1, reset_num_timesteps=i == 0)
print("after: ", accuracy_line(evaluate_task(agent, task, limit=limit, num_samples=k, progress=False)))
