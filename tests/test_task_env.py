"""ReasoningGym-v0 (a task's train rows and verifier as a text env) and the task demo on the tiny model."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env  # noqa: F401  (registers the envs)
from rlhf_env.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_make_vec_serves_train_rows_and_scores_with_the_tasks_verifier():
    task = make_task("chain_sum")
    env = gym.make_vec("ReasoningGym-v0", num_envs=2, task=task, model="tiny", max_new_tokens=3, kl_coef=0.0)
    assert env.unwrapped.max_new_tokens == 3
    train_questions = {r["entry"]["question"] for r in task.rows("train")}
    held_out = {r["entry"]["question"] for r in task.rows("test")}
    obs, info = env.reset(seed=0)
    rows = [task.rows("train")[int(i)] for i in info["row"]]
    assert all(r["entry"]["question"] in train_questions - held_out for r in rows)
    done = np.zeros(2, dtype=bool)
    scores = {}
    while not done.all():
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        for i in np.flatnonzero(terminated & ~done):
            scores[i] = (float(reward[i]), info["response"][i])
        done |= terminated
    for i, (reward, response) in scores.items():
        assert reward == task.score([response], [rows[i]])[0]


def test_single_env_and_task_by_name():
    env = gym.make("ReasoningGym-v0", task="chain_sum", task_config={"max_terms": 3}, model="tiny")
    _, info = env.reset(seed=1)
    assert info["prompt"].startswith("State the final answer")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="no_such_task"), "unknown task 'no_such_task'"),
        (dict(task="chain_sum", task_config={"digits": 2}), "unknown task_config key 'digits'"),
        (dict(task="chain_sum", dataset=[{"prompt": "hi"}]), "takes its dataset from the task"),
    ],
)
def test_bad_task_env_arguments_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gym.make_vec("ReasoningGym-v0", num_envs=2, model="tiny", **kwargs)


def test_task_demo_writes_summary_policy_and_curve(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_env.tasks.train import quick_task_config, run_task_demo

    cfg = quick_task_config()
    cfg.max_iterations, cfg.eval_limit = 2, 4
    summary = run_task_demo(tmp_path / "demo", config=cfg, log=lambda line: None, progress=False)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["iterations"] == 2 == len(saved["history"])
    for key in ("accuracy_before", "accuracy_after"):
        assert set(saved[key]) == {"greedy", "sampled", "pass@2"}
    assert saved["seconds"] > 0 and saved["cpu_seconds"] > 0 and summary["task"] == "chain_sum"
    assert (tmp_path / "demo" / "curve.png").stat().st_size > 0
    policy = tmp_path / "demo" / "policy"
    assert AutoModelForCausalLM.from_pretrained(policy) is not None
    env = gym.make("ReasoningGym-v0", model=str(policy), max_new_tokens=2)
    env.reset(seed=0)


def test_train_task_runs_one_rollout_and_one_update_per_iteration():
    # one recorded iteration is one group rollout (n_envs responses) and one optimizer update,
    # the unit the benchmark compares with one step of TRL's GRPOTrainer
    from rlhf_env.tasks.train import make_task_agent, quick_task_config, train_task

    cfg = quick_task_config()
    cfg.max_iterations, cfg.train_seconds = 3, 1e9
    agent, _ = make_task_agent(cfg)
    history = train_task(agent, cfg)
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert agent._iteration == 3 and agent._n_updates == 3
    assert agent.num_timesteps <= 3 * agent.n_envs * agent.n_steps


def test_task_config_temperature_samples_the_rollouts_and_not_the_evaluation():
    # TaskTrainConfig.temperature is the env's sampling temperature (the distribution the
    # policy's log-probs are computed in); the held-out evaluation still samples at 1
    from rlhf_env.tasks.train import _accuracy, make_task_agent, quick_task_config

    cfg = quick_task_config()
    cfg.temperature, cfg.eval_limit = 0.7, 2
    agent, task = make_task_agent(cfg)
    assert agent.env.env.unwrapped.core.temperature == 0.7  # the env samples at 0.7
    assert agent.policy.temperature == 0.7  # and the policy's log-probs are those of logits / 0.7
    assert _accuracy(agent, task, cfg, progress=False)["sampled"]["temperature"] == 1.0


def test_shipped_rloo_settings_for_tasks_match_the_demo():
    # `rlhf-env train --algo rloo --task ...` reads rloo.yml's ReasoningGym-v0 entry and the
    # task demo reads TaskTrainConfig: the same measured settings (8 rows x 4 completions)
    from agents.hyperparams import load_hyperparams
    from rlhf_env.tasks.train import TaskTrainConfig

    cfg, shipped = TaskTrainConfig(), load_hyperparams("rloo", "ReasoningGym-v0")
    assert (cfg.algo, cfg.group_size, cfg.prompts_per_step) == ("rloo", 4, 8)
    assert shipped["n_envs"] == cfg.group_size * cfg.prompts_per_step and shipped["group_size"] == cfg.group_size
    assert (shipped["learning_rate"], shipped["beta"]) == (cfg.learning_rate, cfg.beta)
    assert shipped["policy_kwargs"] == {"train_layers": cfg.train_layers}
    assert shipped["env_kwargs"] == {"temperature": cfg.temperature}  # the rollouts' sampling temperature
