"""rlhf-env train on text envs uses the language-model policy with the shipped text hyperparameters."""

from __future__ import annotations

import zipfile

import pytest

from rlhf_env.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_train_on_the_tiny_text_env_trains_the_lm_policy(algo, tmp_path, capsys):
    out = tmp_path / f"{algo}.zip"
    argv = ["train", "--algo", algo, "--env", "TextRLHF-tiny-v0", "--timesteps", "300", "--verbose", "0", "--save", str(out),
            "--env-kwargs", '{"max_new_tokens": 8}']
    assert main(argv) == 0
    with zipfile.ZipFile(out) as archive:
        data = archive.read("data.pkl")
    assert b"LMActorCriticPolicy" in data and b"mlp" not in data.lower()
    assert "mean return (score - KL penalty) of the last" in capsys.readouterr().out


@pytest.mark.parametrize("algo", ["a2c", "reinforce"])
def test_a2c_and_reinforce_learn_the_tiny_text_env_with_their_shipped_entries(algo, tmp_path, capsys):
    """The same agents that train CartPole train the text env from the CLI: the shipped
    TextRLHF-tiny-v0 entry (CartPole's settings drove REINFORCE's KL past 200 nats) raises the
    score while the KL per response stays bounded and responses do not collapse."""
    import numpy as np

    from rlhf_env.agents.hyperparams import load_hyperparams
    from rlhf_env.cli.plot import read_runs

    entry = load_hyperparams(algo, "TextRLHF-tiny-v0")
    assert entry["policy"] == "LMPolicy" and entry["learning_rate"] <= 1e-3 and entry["gamma"] == 1.0
    out = tmp_path / f"{algo}.zip"
    argv = ["train", "--algo", algo, "--env", "TextRLHF-tiny-v0", "--timesteps", "4000", "--seed", "0", "--verbose", "0",
            "--tensorboard-log", str(tmp_path / "tb"), "--log-interval", "1", "--save", str(out)]
    assert main(argv) == 0
    assert "no shipped" not in capsys.readouterr().out
    with zipfile.ZipFile(out) as archive:
        assert b"LMActorCriticPolicy" in archive.read("data.pkl")
    (run,) = read_runs(str(tmp_path / "tb"))
    scores = run.scalars["rollout/score_mean"][1]
    kls = run.scalars["rollout/kl_mean"][1]
    lengths = run.scalars["rollout/response_len_mean"][1]
    assert len(scores) >= 8
    k = max(1, len(scores) // 4)
    assert np.mean(scores[-k:]) > np.mean(scores[:k]) + 0.1, scores  # the tiny reward's std is about 0.6 a response
    assert max(kls) < 15.0, kls  # nats per response
    assert min(lengths[-k:]) >= 5.0, lengths  # no collapse to empty responses


def test_eval_loads_an_agent_zip(tmp_path, capsys):
    out = tmp_path / "grpo.zip"
    assert main(["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--timesteps", "200", "--verbose", "0", "--save", str(out)]) == 0
    assert main(["eval", str(out), "--task", "chain_sum", "--limit", "2", "-k", "1", "--max-new-tokens", "3", "--no-progress"]) == 0
    assert "(2 test rows of chain_sum)" in capsys.readouterr().out


def test_bad_train_flags_are_one_line_errors(capsys):
    assert main(["train", "--algo", "grpo"]) == 1
    assert "--env is required" in capsys.readouterr().err
    assert main(["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--env-kwargs", "[1]"]) == 1
    assert "--env-kwargs must be a JSON object" in capsys.readouterr().err


def test_train_with_task_trains_on_reasoning_gym_and_reports_held_out_accuracy(tmp_path, capsys):
    # the shipped ReasoningGym-v0 entry trains SmolLM2's top 4 blocks; the tiny model has 2
    hyperparams = tmp_path / "rloo.yml"
    hyperparams.write_text("ReasoningGym-v0:\n  n_envs: 8\n  policy: LMPolicy\n  group_size: 4\n  learning_rate: 0.001\n")
    argv = ["train", "--algo", "rloo", "--task", "chain_sum", "--env-kwargs", '{"model": "tiny", "max_new_tokens": 4}',
            "--hyperparams", str(hyperparams), "--timesteps", "40", "--eval-episodes", "2", "--verbose", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained rloo on ReasoningGym-v0" in out and "(2 test rows of chain_sum)" in out


def test_train_takes_env_kwargs_from_the_hyperparams_and_lets_the_command_line_win(tmp_path, monkeypatch):
    # a YAML entry's env_kwargs (rl-zoo3's dict string) build the env; --env-kwargs overrides them
    from rlhf_env.agents import ALGOS

    built = []

    class Recorded(ALGOS["rloo"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setitem(ALGOS, "rloo", Recorded)
    hyperparams = tmp_path / "rloo.yml"
    hyperparams.write_text('ReasoningGym-v0:\n  n_envs: 4\n  group_size: 4\n  env_kwargs: "dict(temperature=0.5, max_new_tokens=2)"\n')
    argv = ["train", "--algo", "rloo", "--task", "chain_sum", "--env-kwargs", '{"model": "tiny", "max_new_tokens": 3}',
            "--hyperparams", str(hyperparams), "--timesteps", "4", "--eval-episodes", "0", "--verbose", "0"]
    assert main(argv) == 0
    (agent,) = built
    assert agent.policy.temperature == 0.5  # from the YAML
    assert agent.env.env.unwrapped.max_new_tokens == 3  # --env-kwargs wins over the YAML's 2


@pytest.mark.parametrize("n_envs", ["1", "2"])
def test_resume_of_a_text_agent_keeps_env_kwargs_and_its_own_actor(tmp_path, n_envs):
    """--resume builds the env (with --env-kwargs, for any --n-envs) before loading, so the
    loaded policy acts on a fresh actor: no warning about reusing a trained one, and the
    resumed agent's env is the one asked for."""
    import json
    import warnings

    from rlhf_env import registration

    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    common = ["train", "--algo", "ppo", "--env", "TextRLHF-tiny-v0", "--timesteps", "20", "--verbose", "0",
              "--eval-episodes", "0", "--n-envs", n_envs, "--env-kwargs", '{"max_new_tokens": 4}']
    assert main(common + ["--save", str(first)]) == 0
    registration._LOADED.clear()  # as in a new process: the actor trained above is not in memory
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(common + ["--resume", str(first), "--save", str(second)]) == 0
    assert not [w for w in caught if "shares the actor" in str(w.message)]
    with zipfile.ZipFile(second) as archive:
        header = json.loads(archive.read("header.json"))
    assert header["env"]["max_new_tokens"] == 4 and header["num_timesteps"] > 20


REWARDS_PY = """
def correct(prompts, completions, answer, **kwargs):
    return [1.0 if a == "7" else 0.0 for a in answer]

def length(prompts, completions, completion_ids, **kwargs):
    return [-float(len(ids)) for ids in completion_ids]

def kindness(prompts, responses):
    return [3.0 for _ in responses]
"""


def test_train_takes_reward_functions_by_file_and_name_with_dataset_columns(tmp_path, capsys, monkeypatch):
    """--reward-funcs FILE.py:NAME / MODULE.NAME reach the env as TRL-style functions with the
    --dataset columns; --reward-weights weighs them (every row's answer is 7, so correct = 1)."""
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "3 + 4 =", "answer": "7"}\n{"prompt": "5 + 2 =", "answer": "7"}\n')
    argv = ["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--dataset", str(rows), "--timesteps", "64",
            "--reward-funcs", "my_rewards.py:correct", "my_rewards.length", "--reward-weights", "2", "0",
            "--env-kwargs", '{"max_new_tokens": 4}', "--n-envs", "8", "--log-interval", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"correct/mean\s*\|\s*1\s", out) and re.search(r"correct/std\s*\|\s*0\s", out), out
    assert re.search(r"length/mean\s*\|\s*-[1-4]", out), out  # 1 to 4 tokens a response
    assert re.search(r"score_mean\s*\|\s*2\s", out), out  # 2 x correct + 0 x length


def test_own_prompts_file_with_a_trl_style_reward_function(tmp_path, monkeypatch, capsys):
    """--prompts FILE.txt (one a line) and --reward-funcs FILE.py:NAME: the function sees only
    the user's prompts."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seen.py").write_text("def seen(prompts, completions, **kwargs):\n"
                                      "    open('seen.txt', 'a').write('\\n'.join(prompts) + '\\n')\n"
                                      "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "mine.txt").write_text("Describe your favourite season.\n\nGive one tip for a job interview.\n")
    assert main(["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--prompts", "mine.txt", "--reward-funcs", "seen.py:seen",
                 "--timesteps", "64", "--n-envs", "4", "--verbose", "0", "--env-kwargs", '{"max_new_tokens": 4}']) == 0
    seen = set((tmp_path / "seen.txt").read_text().split("\n")) - {""}
    assert seen == {"Describe your favourite season.", "Give one tip for a job interview."}


def test_a_reward_model_function_by_file_and_name(tmp_path, monkeypatch):
    import gymnasium as gym

    import rlhf_env  # noqa: F401

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    env = gym.make("TextRLHF-tiny-v0", reward_model="my_rewards.py:kindness", max_new_tokens=2, kl_coef=0.0)
    env.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert info["score"] == 3.0


@pytest.mark.parametrize("flags, match", [
    (["--reward-funcs", "my_rewards.py:corect"], r"'my_rewards.py' has no 'corect' \(its functions: correct, kindness, length\)"),
    (["--reward-funcs", "nofile.py:f"], r"--reward-funcs 'nofile.py:f': no file 'nofile.py'"),
    (["--reward-funcs", "correct"], r"name it as FILE.py:NAME .* or MODULE.NAME"),
    (["--reward-funcs", "no_such_module.f"], r"cannot import module 'no_such_module'"),
    (["--reward-weights", "1"], r"--reward-weights weighs --reward-funcs"),
    (["--reward-funcs", "my_rewards.py:kindness"], r"reward function 'kindness' cannot be called as kindness\(prompts=..., completions=..."),
])
def test_reward_function_flag_mistakes_are_one_line(flags, match, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    assert main(["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--timesteps", "8", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err


def test_a_text_env_without_a_shipped_entry_says_the_defaults_are_for_mlps(capsys):
    from rlhf_env.cli.train import resolve_hyperparams

    assert resolve_hyperparams("a2c", "TextRLHF-v0", None) == {}
    out = capsys.readouterr().out
    assert "no shipped a2c hyperparameters for TextRLHF-v0: using the algorithm's defaults (made for small MLPs" in out
    assert "TextRLHF-tiny-v0 entry of" in out and out.rstrip().endswith("a2c.yml)")


def test_train_takes_a_model_a_reward_and_prompts_without_env(tmp_path, monkeypatch, capsys):
    """A new user's first command: --model, --prompts and --reward FILE.py:NAME pick the text env
    themselves (TextRLHF-tiny-v0 for --model tiny), the reward sees only the user's prompts, and
    the export records the reward by its absolute path (what rlhf-env eval then judges with)."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("def kind(prompts, responses):\n"
                                      "    open('seen.txt', 'a').write('\\n'.join(prompts) + '\\n')\n"
                                      "    return [float('kind' in r) for r in responses]\n")
    (tmp_path / "mine.txt").write_text("Describe your favourite season.\nGive one tip for a job interview.\n")
    assert main(["train", "--algo", "grpo", "--model", "tiny", "--prompts", "mine.txt", "--reward", "mine.py:kind",
                 "--timesteps", "64", "--n-envs", "4", "--verbose", "0", "--env-kwargs", '{"max_new_tokens": 4}',
                 "--export", "out"]) == 0
    assert set((tmp_path / "seen.txt").read_text().split("\n")) - {""} == {"Describe your favourite season.",
                                                                         "Give one tip for a job interview."}
    env = json.loads((tmp_path / "out" / "rlhf_env_training.json").read_text())["env"]
    assert env["id"] == "TextRLHF-tiny-v0" and env["reward_model"] == f"{tmp_path / 'mine.py'}:kind"


@pytest.mark.parametrize("flags, match", [
    (["--model", "tiny", "--reward", "tiny", "--reward-funcs", "my_rewards.py:length"], r"--reward and --reward-funcs both give the reward"),
    (["--task", "chain_sum", "--reward", "tiny"], r"--reward and --task both give the reward: pass one of them \(the task's verifier"),
    (["--env", "CartPole-v1", "--model", "tiny"], r"--model, --reward, .* need a text env .*not CartPole-v1"),
    (["--reward", "defualt"], r"unknown --reward 'defualt' \(did you mean 'default'\?\): use one of"),
])
def test_model_and_reward_flag_mistakes_are_one_line(flags, match, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    assert main(["train", "--algo", "grpo", "--timesteps", "8", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
