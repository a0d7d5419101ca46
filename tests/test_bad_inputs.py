"""Bad input at every public entry point is refused with a message that names the problem
(and the file, where there is one), and nothing is written on failure.

Each case is (entry point call, exception type, a regex the message must match). The CLI
prints the same message in one line without a traceback and exits non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env  # noqa: F401  (registers the envs)
from agents import A2C, GRPO, PPO, REINFORCE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, each in a fresh folder."""
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "malformed.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": broken\n')
    (d / "missing_key.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    (d / "wrong_type.jsonl").write_text('{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "no_prompt_rows.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n')
    (d / "prompts.txt").write_text("Describe your favourite season.\nGive one tip for a job interview.\n")
    (d / "good.jsonl").write_text('{"prompt": "how are you", "chosen": "great thanks", "rejected": "bad"}\n' * 4)
    (d / "garbage.zip").write_bytes(b"this is not a zip archive")
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=8, batch_size=8, seed=0)
    model.save(d / "ppo_cartpole.zip")
    data = (d / "ppo_cartpole.zip").read_bytes()
    (d / "truncated.zip").write_bytes(data[: len(data) // 2])
    (d / "rm_corrupt").mkdir()
    (d / "rm_corrupt" / "reward_model.json").write_text("{not json")
    (d / "empty_dir").mkdir()
    return d


@pytest.fixture(scope="module")
def text_env():
    env = gym.make("TextRLHF-tiny-v0", max_new_tokens=4)
    env.reset(seed=0)
    return env


@pytest.fixture(scope="module")
def text_vec_env():
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=4)
    env.reset(seed=0)
    return env


@pytest.fixture(scope="module")
def cartpole_model():
    return PPO("MlpPolicy", "CartPole-v1", n_steps=8, batch_size=8, seed=0)


def _raises(fn, exc, match):
    with pytest.raises(exc, match=match) as info:
        fn()
    return info.value


# --- environments --------------------------------------------------------------------
class _KindnessReward:
    def __call__(self, prompts, responses):
        return [float("kind" in r) for r in responses]


NO_GPU = r"device 'cuda:99' (asks for a GPU but .*use device='cpu'|: this machine has \d+ CUDA GPU)"

ENV_CASES = {
    "max_new_tokens negative": (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 1, got -1"),
    "max_new_tokens float": (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer"),
    "max_new_tokens string": (dict(max_new_tokens="x"), TypeError, "max_new_tokens must be an integer"),
    "kl_coef negative": (dict(kl_coef=-1.0), ValueError, "kl_coef must be a number >= 0"),
    "kl_coef string": (dict(kl_coef="a"), ValueError, "kl_coef must be a number >= 0"),
    "prompts empty": (dict(prompts=[]), ValueError, "prompt list is empty"),
    "prompts not strings": (dict(prompts=[1, 2]), TypeError, "prompts must be strings"),
    "prompt file missing": (dict(prompts="{d}/no_prompts.txt"), ValueError, "no_prompts.txt' does not exist"),
    "model folder missing": (dict(model="{d}/no_model"), ValueError, "no_model"),
    "model wrong type": (dict(model=123), TypeError, "model must be a name, a path"),
    "reward folder missing": (dict(reward_model="{d}/no_rm"), ValueError, "no_rm"),
    "reward wrong type": (dict(reward_model=42), ValueError, "unknown reward_model 42"),
    "device unknown": (dict(device="bogus"), ValueError, "device 'bogus' is not a torch device"),
    # not torch's AssertionError from inside the model load (a CPU build) or a missing GPU index
    "device not on this machine": (dict(device="cuda:99"), ValueError, NO_GPU),
    # the tiny model knows 256 positions
    "context past the model's positions": (dict(max_new_tokens=250), ValueError,
                                           r"max_prompt_tokens \+ max_new_tokens = 64 \+ 250 = 314 is more than the model's 256 positions"),
    # offline: one line at once (a probe of the hub), not transformers' retries
    "hub id not cached": (dict(model="no-such-org/no-such-model"), ValueError,
                          "cannot load 'no-such-org/no-such-model': not a local folder, not in the Hugging Face cache"),
    "prompts a sentence": (dict(prompts="What is 2+2?"), ValueError,
                           r"'What is 2\+2\?' is a string that is not a file: .*to use it as the prompt pass a list, \['What is 2\+2\?'\]"),
    "dataset row without prompt": (dict(dataset=[{"prompt": "a"}, {"question": "b"}]), ValueError,
                                   r'dataset\[1\] has no "prompt" key \(its keys: question\)'),
    "dataset file missing": (dict(dataset="{d}/no_rows.jsonl"), ValueError, r"dataset file '.*no_rows.jsonl' does not exist"),
    "dataset file line without prompt": (dict(dataset="{d}/no_prompt_rows.jsonl"), ValueError,
                                         r'no_prompt_rows.jsonl:2: the row has no "prompt" key \(its keys: question, answer\)'),
    "dataset and prompts": (dict(dataset=[{"prompt": "a"}], prompts=["b"]), ValueError, "pass either prompts=.* or dataset=.*, not both"),
    "reward function signature": (dict(reward_funcs=lambda prompts, responses: [0.0]), ValueError,
                                  r"reward function '<lambda>' cannot be called as <lambda>\(prompts=..., completions=..."),
    "reward function column": (dict(dataset=[{"prompt": "a"}], reward_funcs=lambda prompts, completions, answer: [0.0]), ValueError,
                               r"with this dataset's columns \(none\): missing a required argument: 'answer'"),
    "reward_weights count": (dict(reward_funcs=[lambda prompts, completions, **kw: [0.0]], reward_weights=[1.0, 2.0]), ValueError,
                             "got 2 reward_weights for 1 reward_funcs"),
    "reward_funcs not callable": (dict(reward_funcs=["correct"]), TypeError, r"reward_funcs\[0\] is a str, not a callable"),
    "reward_model one argument": (dict(reward_model=lambda responses: [0.0]), ValueError,
                                  r"reward_model '<lambda>' cannot be called as <lambda>\(prompts, responses\): .*write it as"),
    "reward_model TRL-style": (dict(reward_model=lambda completions, **kw: [0.0]), ValueError,
                               r"cannot be called as <lambda>\(prompts, responses\).* as reward_funcs=\[...\]"),
    "reward_model a class": (dict(reward_model=_KindnessReward), ValueError, r"reward_model is the class _KindnessReward: pass an instance"),
    "unknown keyword": (dict(max_tokens=12), TypeError, r"unexpected keyword argument 'max_tokens'; did you mean 'max_new_tokens'\?"),
}

# refused before any model is loaded (so at once, not after the load)
EARLY_CASES = ["prompts a sentence", "dataset and prompts", "reward function signature", "reward function column",
               "reward_weights count", "reward_funcs not callable", "reward_model one argument", "reward_model TRL-style",
               "unknown keyword", "reward_model a class", "reward wrong type", "reward folder missing", "prompt file missing", "kl_coef negative",
               "device not on this machine"]


@pytest.mark.parametrize("case", list(ENV_CASES))
def test_env_constructor_refuses(case, files):
    kwargs, exc, match = ENV_CASES[case]
    kwargs = {k: v.format(d=files) if isinstance(v, str) else v for k, v in kwargs.items()}
    env_id = "TextRLHF-v0" if "model" in kwargs else "TextRLHF-tiny-v0"  # a bad model: no need to load the default
    _raises(lambda: gym.make(env_id, **kwargs), exc, match)


@pytest.mark.parametrize("case", EARLY_CASES)
@pytest.mark.parametrize("vector", [False, True])
def test_env_constructor_refuses_before_loading_a_model(case, vector, files, monkeypatch):
    import rlhf_env.models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(rlhf_env.models, "load_lm", no_load)
    kwargs, exc, match = ENV_CASES[case]
    kwargs = {k: v.format(d=files) if isinstance(v, str) else v for k, v in kwargs.items()}
    make = (lambda: gym.make_vec("TextRLHF-tiny-v0", num_envs=2, shared_model=False, **kwargs)) if vector else (
        lambda: gym.make("TextRLHF-tiny-v0", shared_model=False, **kwargs))
    _raises(make, exc, match)


def _raises_key(prompts, completions, **kwargs):
    return [kwargs["answer"] for _ in completions]


REWARD_RESULT_CASES = {
    "raises": (_raises_key, r"^reward function '_raises_key' raised KeyError: 'answer' \(at test_bad_inputs.py:\d+\)$"),
    "returns None": (lambda prompts, completions, **kw: None, r"^reward function '<lambda>' returned None, not a list of 2 scores"),
    "returns a scalar": (lambda prompts, completions, **kw: 1.0, r"returned a single float \(1.0\), not a list of 2 scores"),
    "wrong count": (lambda prompts, completions, **kw: [1.0], r"returned 1 scores for 2 completions"),
    "NaN": (lambda prompts, completions, **kw: [float("nan"), 0.0], r"returned nan for completion 0 \(prompt '.*'\): scores must be finite"),
    "not numbers": (lambda prompts, completions, **kw: ["1", "0"], r"returned a str for completion 0 .*scores must be numbers"),
}


@pytest.mark.parametrize("case", list(REWARD_RESULT_CASES))
def test_reward_function_mistakes_are_one_line_naming_the_function(case):
    from envs import RewardFunctionError

    func, match = REWARD_RESULT_CASES[case]
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=1, reward_funcs=func)
    env.reset(seed=0)
    err = _raises(lambda: env.step(np.array([5, 6])), RewardFunctionError, match)
    assert "\n" not in str(err)


def _model_raises(prompts, responses):
    return [len(r) / 0 for r in responses]


REWARD_MODEL_RESULT_CASES = {
    "raises": (_model_raises, r"^the reward model raised ZeroDivisionError: division by zero \(at test_bad_inputs.py:\d+\)$"),
    "returns None": (lambda prompts, responses: None, r"^the reward model returned None, not a list of 2 scores"),
    "returns a scalar": (lambda prompts, responses: 1.0, r"returned a single float \(1.0\), not a list of 2 scores .*called once per batch"),
    "wrong count": (lambda prompts, responses: [1.0], r"returned 1 scores for 2 completions"),
    "NaN": (lambda prompts, responses: [float("nan")] * len(responses), r"returned nan for completion 0 \(prompt '.*'\): scores must be finite"),
}


@pytest.mark.parametrize("case", list(REWARD_MODEL_RESULT_CASES))
def test_reward_model_mistakes_are_one_line(case):
    """The (prompts, responses) reward model: its mistakes are named at the first finished
    response (a NaN score as the reward's fault, not the learning rate's)."""
    from envs import RewardFunctionError

    func, match = REWARD_MODEL_RESULT_CASES[case]
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=1, reward_model=func)
    env.reset(seed=0)
    err = _raises(lambda: env.step(np.array([5, 6])), RewardFunctionError, match)
    assert "\n" not in str(err)


def test_vec_env_constructor_refuses(files):
    _raises(lambda: gym.make_vec("TextRLHF-tiny-v0", num_envs=0), ValueError, "num_envs must be >= 1")
    _raises(lambda: gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=0), ValueError, "max_new_tokens must be >= 1")
    _raises(lambda: gym.make_vec("TextRLHF-tiny-v0", num_envs=2, kl_coef=float("nan")), ValueError, "kl_coef")


@pytest.mark.parametrize(
    "action,exc,match",
    [
        ("vocab", ValueError, r"is not a token id: the vocabulary size is \d+"),
        (-1, ValueError, "action -1 is not a token id"),
        ("a", ValueError, "action must be one token id"),
        (np.array([1, 2]), ValueError, "action must be one token id"),
        (1.5, ValueError, "action must be one token id"),
    ],
)
def test_env_step_refuses_bad_actions(text_env, action, exc, match):
    if isinstance(action, str) and action == "vocab":
        action = text_env.action_space.n
    before = text_env.unwrapped._response_ids[:] if hasattr(text_env.unwrapped, "_response_ids") else None
    _raises(lambda: text_env.step(action), exc, match)
    if before is not None:
        assert text_env.unwrapped._response_ids == before  # a refused action changes nothing


def test_env_step_before_reset_is_refused():
    env = gym.make("TextRLHF-tiny-v0", max_new_tokens=4)
    _raises(lambda: env.step(1), Exception, "reset")


def test_vec_env_step_refuses_bad_actions(text_vec_env):
    n = text_vec_env.single_action_space.n
    _raises(lambda: text_vec_env.step(np.array([1, 2, 3])), ValueError, r"expected 2 actions .* got shape \(3,\)")
    _raises(lambda: text_vec_env.step(np.array([1, n])), ValueError, f"action {n} is not a token id")
    _raises(lambda: text_vec_env.step(1), ValueError, "expected 2 actions")


# --- agents ---------------------------------------------------------------------------
AGENT_CASES = {
    "unknown env id": (lambda: PPO("MlpPolicy", "NoSuchEnv-v0"), ValueError, "unknown environment id 'NoSuchEnv-v0'"),
    "env id without its version": (lambda: PPO("LMPolicy", "TextRLHF-tiny"), ValueError,
                                   r"unknown environment id 'TextRLHF-tiny': .*; did you mean 'TextRLHF-tiny-v0'\?"),
    "unknown policy": (lambda: PPO("NoSuchPolicy", "CartPole-v1"), ValueError, "unknown policy 'NoSuchPolicy'"),
    "env of wrong type": (lambda: PPO("MlpPolicy", 42), ValueError, "env must be an environment id"),
    "env None": (lambda: PPO("MlpPolicy", None), ValueError, "env=None: PPO needs an environment"),
    "n_steps zero": (lambda: PPO("MlpPolicy", "CartPole-v1", n_steps=0), ValueError, "n_steps must be >= 1, got 0"),
    "n_steps float": (lambda: A2C("MlpPolicy", "CartPole-v1", n_steps=2.5), TypeError, "n_steps must be an integer"),
    "batch_size zero": (lambda: PPO("MlpPolicy", "CartPole-v1", batch_size=0), ValueError, "batch_size must be >= 1"),
    "n_epochs zero": (lambda: PPO("MlpPolicy", "CartPole-v1", n_epochs=0), ValueError, "n_epochs must be >= 1"),
    "gamma above 1": (lambda: PPO("MlpPolicy", "CartPole-v1", gamma=2.0), ValueError, "gamma must be <= 1.0"),
    "gamma negative": (lambda: REINFORCE("MlpPolicy", "CartPole-v1", gamma=-1.0), ValueError, "gamma must be >= 0.0"),
    "gae_lambda string": (lambda: PPO("MlpPolicy", "CartPole-v1", gae_lambda="x"), TypeError, "gae_lambda must be a number"),
    "clip_range negative": (lambda: PPO("MlpPolicy", "CartPole-v1", clip_range=-0.1), ValueError, "clip_range must be > 0"),
    "learning_rate unreadable": (lambda: PPO("MlpPolicy", "CartPole-v1", learning_rate="abc"), ValueError, "cannot read schedule 'abc'"),
    "loss_type unknown": (lambda: PPO("MlpPolicy", "CartPole-v1", loss_type="huber"), ValueError, "loss_type must be 'clip' or 'kl_penalty'"),
    "device unknown": (lambda: PPO("MlpPolicy", "CartPole-v1", device="bogus"), ValueError, "device 'bogus' is not a torch device"),
    "device not on this machine": (lambda: PPO("MlpPolicy", "CartPole-v1", device="cuda:99"), ValueError, NO_GPU),
    "misspelt keyword": (lambda: PPO("MlpPolicy", "CartPole-v1", learning_rat=1e-3), TypeError,
                         r"^PPO got an unexpected keyword argument 'learning_rat'; did you mean 'learning_rate'\?"),
    "misspelt GRPO keyword": (lambda: GRPO("LMPolicy", gym.make_vec("TextRLHF-tiny-v0", num_envs=4, max_new_tokens=4), group_sise=4),
                              TypeError, r"^GRPO got an unexpected keyword argument 'group_sise'; did you mean 'group_size'\?"),
    "TRL's name for the group size": (lambda: GRPO("LMPolicy", gym.make_vec("TextRLHF-tiny-v0", num_envs=4, max_new_tokens=4),
                                                   num_generations=4), TypeError,
                                      r"^GRPO got an unexpected keyword argument 'num_generations'; TRL's num_generations is group_size here"),
    "text setting outside rlhf=": (lambda: PPO("LMPolicy", gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=4), kl_per_response=3),
                                   TypeError, r"unexpected keyword argument 'kl_per_response'; text settings .* go in rlhf=dict"),
    # a misspelt policy_kwargs key used to be swallowed: train_layer=4 then trained every weight
    "misspelt policy_kwargs key": (lambda: PPO("LMPolicy", gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=4),
                                               policy_kwargs={"train_layer": 1}), TypeError,
                                   r"LMActorCriticPolicy \(policy_kwargs\) got an unexpected keyword argument 'train_layer'; did you mean 'train_layers'\?"),
    "unsupported action space": (lambda: PPO("MlpPolicy", gym.make("Blackjack-v1")), ValueError, "observation space|Tuple"),
    "MlpPolicy on a text env": (lambda: PPO("MlpPolicy", gym.make("TextRLHF-tiny-v0", max_new_tokens=4)), ValueError,
                                r'MlpPolicy on a text env .* PPO\("LMPolicy", env\)'),
    "GRPO on a single env": (lambda: GRPO("LMPolicy", gym.make("TextRLHF-tiny-v0", max_new_tokens=4)), ValueError,
                             r"got a single env \(gym.make\): pass gym.make_vec\('TextRLHF-v0', num_envs=N\)"),
    "GRPO n_envs not a multiple of group_size": (lambda: GRPO("LMPolicy", "TextRLHF-tiny-v0", n_envs=3), ValueError,
                                                 r"n_envs=3 is not a multiple of group_size=4: use n_envs = prompts_per_step \* group_size"),
}


@pytest.mark.parametrize("case", list(AGENT_CASES))
def test_agent_constructor_refuses(case):
    fn, exc, match = AGENT_CASES[case]
    _raises(fn, exc, match)


def test_group_size_mismatch_is_refused_before_the_env_is_built(monkeypatch):
    import rlhf_env.models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(rlhf_env.models, "load_lm", no_load)
    _raises(lambda: GRPO("LMPolicy", "TextRLHF-tiny-v0", n_envs=6), ValueError, r"n_envs=6 is not a multiple of group_size=4: .*\(e.g. 4\)")


def test_learn_refuses_bad_total_timesteps(cartpole_model):
    _raises(lambda: cartpole_model.learn(-1), ValueError, "total_timesteps must be >= 0, got -1")
    _raises(lambda: cartpole_model.learn("x"), TypeError, "total_timesteps must be an integer")
    assert cartpole_model.num_timesteps == 0


@pytest.mark.parametrize(
    "obs,match",
    [
        (np.zeros(3), r"unexpected observation shape \(3,\).*use \(4,\)"),
        (np.zeros((2, 3)), r"unexpected observation shape \(2, 3\)"),
        ("hello", "unexpected observation"),
    ],
)
def test_predict_refuses_wrong_observations(cartpole_model, obs, match):
    _raises(lambda: cartpole_model.predict(obs), ValueError, match)


def test_set_env_refuses_mismatched_spaces(cartpole_model):
    _raises(lambda: cartpole_model.set_env(gym.make("Acrobot-v1")), ValueError, r"observation space mismatch: the env has Box")
    _raises(lambda: cartpole_model.set_env(gym.make("MountainCarContinuous-v0")), ValueError, "observation space mismatch")
    assert cartpole_model.observation_space.shape == (4,)  # unchanged


@pytest.mark.parametrize(
    "name,exc,match",
    [
        ("missing.zip", FileNotFoundError, "no saved model at .*missing.zip"),
        ("garbage.zip", ValueError, "garbage.zip is not a saved model .*truncated or corrupt"),
        ("truncated.zip", ValueError, "truncated.zip is not a saved model"),
        ("empty_dir", FileNotFoundError, "no saved model at .*empty_dir"),
    ],
)
def test_load_refuses_missing_or_corrupt_files(files, name, exc, match):
    _raises(lambda: PPO.load(files / name), exc, match)


def test_load_refuses_other_algorithm_and_mismatched_env(files):
    _raises(lambda: A2C.load(files / "ppo_cartpole.zip"), ValueError, "ppo_cartpole.zip holds a PPO model, not A2C: use PPO.load")
    _raises(lambda: PPO.load(files / "ppo_cartpole.zip", env=gym.make("Acrobot-v1")), ValueError, "observation space mismatch")


def test_a_text_agent_on_an_env_of_other_lengths_is_told_which_max_new_tokens(tmp_path):
    """A text agent's observation space is max_prompt_tokens + max_new_tokens long: the
    mismatch says so and gives the max_new_tokens that matches, not two Dict spaces."""
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=6)
    PPO("LMPolicy", env, n_steps=7).save(tmp_path / "text.zip")
    other = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=4)
    _raises(lambda: PPO.load(tmp_path / "text.zip", env=other), ValueError,
            r"^observation space mismatch: the env's contexts hold 68 tokens \(max_prompt_tokens 64 \+ max_new_tokens 4\), "
            r"the agent was trained on 70: make the env with max_new_tokens=6$")


def test_save_into_an_unwritable_place_leaves_nothing(files, tmp_path, cartpole_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _raises(lambda: cartpole_model.save(blocker / "model.zip"), OSError, "a_file")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# --- data loaders ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,exc,match",
    [
        ("missing.jsonl", FileNotFoundError, "missing.jsonl' does not exist"),
        ("malformed.jsonl", ValueError, r"malformed.jsonl:2: not valid JSON"),
        ("missing_key.jsonl", ValueError, r"missing_key.jsonl:1: missing key\(s\) \['rejected'\]"),
        ("wrong_type.jsonl", ValueError, r"wrong_type.jsonl:1: .*chosen"),
        ("empty.jsonl", ValueError, "empty.jsonl: the file holds no preference pairs"),
    ],
)
def test_load_preferences_names_file_and_line(files, name, exc, match):
    from rlhf_env import load_preferences

    _raises(lambda: load_preferences(files / name), exc, match)


def test_loaders_refuse_wrong_types_and_empty_sources(files):
    from rlhf_env import load_preferences, load_prompts
    from rlhf_env.sft import load_sft_examples

    _raises(lambda: load_preferences(42), TypeError, "needs a path to a JSON Lines file, got int")
    _raises(lambda: load_prompts(42), ValueError, "prompts must be None .* got int")
    _raises(lambda: load_prompts(files / "empty.jsonl"), ValueError, "empty.jsonl holds no prompts")
    _raises(lambda: load_prompts(files / "nope.txt"), ValueError, "nope.txt' does not exist")
    _raises(lambda: load_sft_examples(files / "malformed.jsonl"), ValueError, "malformed.jsonl:2: not valid JSON")
    _raises(lambda: load_sft_examples(files / "nope.jsonl"), FileNotFoundError, "nope.jsonl")


# --- reward model and trainers --------------------------------------------------------
def test_reward_model_load_refuses_missing_and_corrupt_folders(files):
    from rlhf_env import RewardModel

    _raises(lambda: RewardModel.load(files / "empty_dir"), FileNotFoundError, "empty_dir' is not a reward-model folder")
    _raises(lambda: RewardModel.load(files / "rm_corrupt"), ValueError, r"rm_corrupt/reward_model.json is corrupt")


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    from tests.test_sft_dpo import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("bad_inputs_lm"))


def _trainer_cases(files, lm):
    from rlhf_env.dpo import DPOConfig, train_dpo
    from rlhf_env.reward_model import RewardModelConfig, train_reward_model
    from rlhf_env.sft import SFTConfig, train_sft

    good = files / "good.jsonl"
    return {
        "rm: malformed data": (lambda out: train_reward_model(files / "malformed.jsonl", backbone=lm, output_dir=out, progress=False), ValueError, "malformed.jsonl:2"),
        "rm: no pairs": (lambda out: train_reward_model([], backbone=lm, output_dir=out, progress=False), ValueError, "no preference pairs given"),
        "rm: batch_size 0": (lambda out: train_reward_model(good, backbone=lm, config=RewardModelConfig(batch_size=0), output_dir=out, progress=False), ValueError, "batch_size must be a positive integer"),
        "rm: backbone missing": (lambda out: train_reward_model(good, backbone=str(files / "no_backbone"), output_dir=out, progress=False), (ValueError, FileNotFoundError), "no_backbone"),
        "sft: model missing": (lambda out: train_sft(good, str(files / "no_model"), output_dir=out, progress=False), ValueError, "no_model"),
        "sft: epochs 0": (lambda out: train_sft(good, lm, config=SFTConfig(epochs=0), output_dir=out, progress=False), ValueError, "epochs must be a positive integer"),
        "sft: on_nonfinite unknown": (lambda out: train_sft(good, lm, on_nonfinite="ignore", output_dir=out, progress=False), ValueError, "on_nonfinite must be"),
        "dpo: batch_size -1": (lambda out: train_dpo(good, lm, config=DPOConfig(batch_size=-1), output_dir=out, progress=False), ValueError, "batch_size must be a positive integer"),
        "dpo: beta string": (lambda out: train_dpo(good, lm, beta="x", output_dir=out, progress=False), ValueError, "beta must be a number > 0"),
        "dpo: resume missing": (lambda out: train_dpo(good, lm, resume_from=files / "no_ckpt", output_dir=out, progress=False), FileNotFoundError, "no_ckpt"),
        "dpo: resume garbage": (lambda out: train_dpo(good, lm, resume_from=files / "garbage.zip", output_dir=out, progress=False), ValueError, "garbage.zip is not a readable trainer checkpoint"),
    }


CASE_NAMES = ["rm: malformed data", "rm: no pairs", "rm: batch_size 0", "rm: backbone missing", "sft: model missing", "sft: epochs 0",
              "sft: on_nonfinite unknown", "dpo: batch_size -1", "dpo: beta string", "dpo: resume missing", "dpo: resume garbage"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_trainer_refuses_and_writes_nothing(case, files, tiny_lm_path, tmp_path):
    fn, exc, match = _trainer_cases(files, str(tiny_lm_path))[case]
    out = tmp_path / "out"
    _raises(lambda: fn(out), exc, match)
    assert os.listdir(tmp_path) == []  # no output folder, no temporary folder


# --- command line ---------------------------------------------------------------------
CLI_CASES = {
    "train: unknown env": (["train", "--algo", "ppo", "--env", "NoSuchEnv-v0", "--timesteps", "10"], "NoSuchEnv-v0"),
    "train: corrupt resume": (["train", "--algo", "ppo", "--env", "CartPole-v1", "--resume", "{d}/garbage.zip", "--save", "{out}/m.zip"], "garbage.zip is not a saved model"),
    "train: --save-only-model alone": (["train", "--algo", "ppo", "--env", "CartPole-v1", "--save-only-model"],
                                       "--save-only-model applies to --save and checkpoints: pass --save PATH.zip or --checkpoint-dir DIR too"),
    "train: negative timesteps": (["train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "-5", "--save", "{out}/m.zip"], "total_timesteps must be >= 0"),
    "train-rm: malformed data": (["train-rm", "--train", "{d}/malformed.jsonl", "--eval", "none", "--output", "{out}/rm"], "malformed.jsonl:2: not valid JSON"),
    "sft: missing data": (["sft", "--data", "{d}/nope.jsonl", "--model", "tiny", "--output", "{out}/sft"], "nope.jsonl"),
    "dpo: missing model": (["dpo", "--train", "{d}/good.jsonl", "--eval", "none", "--model", "{d}/no_model", "--output", "{out}/dpo"], "no_model"),
    "plot: missing log dir": (["plot", "{d}/no_logs", "--out", "{out}/curve.png"], "no log directory .*no_logs"),
    "dpo: bad beta": (["dpo", "--train", "{d}/good.jsonl", "--eval", "none", "--model", "tiny", "--beta", "-1", "--output", "{out}/dpo"], "beta must be a number > 0"),
    "train: env-kwargs not JSON": (["train", "--algo", "ppo", "--env", "TextRLHF-tiny-v0", "--env-kwargs", "max_new_tokens=8", "--save", "{out}/m.zip"],
                                   r"--env-kwargs must be a JSON object, e.g. --env-kwargs '\{\"max_new_tokens\": 16\}' .*got 'max_new_tokens=8'"),
    "train: env-kwargs unknown key": (["train", "--algo", "ppo", "--env", "TextRLHF-tiny-v0", "--env-kwargs", '{{"max_tokens": 8}}', "--save", "{out}/m.zip"],
                                      "unexpected keyword argument 'max_tokens'; did you mean 'max_new_tokens'"),
    "demo: --algo ppo with --task": (["demo", "--quick", "--task", "chain_sum", "--algo", "ppo", "--out", "{out}"],
                                     "--algo ppo belongs to the RLHF demo"),
    "train: task-config not JSON": (["train", "--algo", "grpo", "--task", "chain_sum", "--task-config", "{{max_terms: 3}}", "--save", "{out}/m.zip"],
                                    "--task-config must be a JSON object"),
    "eval: a CartPole agent": (["eval", "{d}/ppo_cartpole.zip", "--out", "{out}/report.json"],
                               r"ppo_cartpole.zip holds a PPO agent whose policy is a ActorCriticPolicy, not a language model: .*evaluate_policy"),
    "train: device not on this machine": (["train", "--algo", "ppo", "--env", "TextRLHF-tiny-v0", "--device", "cuda:99", "--save", "{out}/m.zip"], NO_GPU),
    "demo: device not on this machine": (["demo", "--quick", "--device", "cuda:99", "--out", "{out}"], NO_GPU),
    "eval: a missing agent zip": (["eval", "{d}/no_agent.zip", "--out", "{out}/report.json"], r"no agent file '.*no_agent.zip' \(from .*\): pass an agent .zip"),
    "eval: a missing model folder": (["eval", "{d}/no_policy", "--out", "{out}/report.json"],
                                     r"unknown policy '.*no_policy': no such directory .* not a shipped model \(smollm2-135m, tiny\)"),
    "eval: --prompts with --task": (["eval", "tiny", "--task", "chain_sum", "--prompts", "{d}/prompts.txt"],
                                    "--prompts is for the RLHF judges; with --task the task's held-out split is judged"),
    "train: a prompt list as --dataset": (["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--dataset", "{d}/prompts.txt",
                                           "--save", "{out}/m.zip"],
                                          r"unknown type '.txt'; use .jsonl .*a list of prompts, one per line, goes in prompts= "
                                          r"instead \(rlhf-env train: --prompts .*prompts.txt\)"),
    "train: --prompts with --dataset": (["train", "--algo", "grpo", "--env", "TextRLHF-tiny-v0", "--dataset", "{d}/good.jsonl",
                                         "--prompts", "{d}/prompts.txt", "--save", "{out}/m.zip"],
                                        "--prompts and --dataset both give the prompts: pass one of them"),
    "train-rm: file with a missing key": (["train-rm", "--train", "{d}/missing_key.jsonl", "--eval", "none", "--output", "{out}/rm"],
                                          r"missing_key.jsonl:1: missing key\(s\) \['rejected'\]"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_prints_one_line_and_exits_nonzero(case, files, tmp_path, capsys):
    from rlhf_env.cli import main

    argv, match = CLI_CASES[case]
    out = tmp_path / "out"
    argv = [a.format(d=files, out=out) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"rlhf-env {argv[0]}: error: ")
    import re

    assert re.search(match, err[0]), err[0]
    assert not out.exists()
    with pytest.raises(Exception, match=match):  # --debug: the exception itself, so its traceback
        main(["--debug"] + argv)


def test_cli_takes_rl_zoo3_spelling_and_hints_at_misspelled_flags(tmp_path, capsys):
    from rlhf_env.cli import main

    argv = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--eval-episodes", "0", "--verbose", "0"]
    assert main(argv + ["--n-timesteps", "64", "--save", str(tmp_path / "m.zip")]) == 0  # rl-zoo3's flag
    capsys.readouterr()
    assert main(argv + ["--n-timesteps", "64", "-P"]) == 0  # rl-zoo3's progress-bar flag
    assert "steps/s]" in capsys.readouterr().err  # tqdm's bar
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--timesteps", "64", "--svae", str(tmp_path / "m.zip")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(argv + ["--timesteps", "64", "--tb", str(tmp_path / "runs")])
    assert "--tb -> -tb" in capsys.readouterr().err  # rl-zoo3's single-dash -tb, not --task
    # the algorithm in capitals, as the classes are spelled, is taken
    assert main(["train", "--algo", "PPO", "--env", "CartPole-v1", "--eval-episodes", "0", "--verbose", "0", "--timesteps", "64"]) == 0
    # the subcommand's usage (not the top-level one) and the likely flag
    assert "usage: rlhf-env train" in err and "unrecognized arguments: --svae" in err and "--svae -> --save" in err


def test_cli_debug_flag_shows_the_traceback_in_a_real_process(files):
    cmd = [sys.executable, "-m", "rlhf_env", "train-rm", "--train", str(files / "malformed.jsonl"), "--eval", "none", "--output", str(files / "cli_out")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1
    assert quiet.stderr.strip().count("\n") == 0 and "malformed.jsonl:2" in quiet.stderr and "Traceback" not in quiet.stderr
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300)
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr and "malformed.jsonl:2" in loud.stderr
    assert not (files / "cli_out").exists()


def test_a_device_this_machine_lacks_is_refused_before_any_load(monkeypatch, tmp_path):
    """load_lm, resolve_reward and the demo check device= first (the demo's default reward
    would otherwise fall back to VADER on the load's error and hide it)."""
    import rlhf_env.models
    from rlhf_env.demo import quick_config, run_demo
    from rlhf_env.models import load_lm
    from rlhf_env.rewards import resolve_reward

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(rlhf_env.models, "_load_dir", no_load)
    _raises(lambda: load_lm("tiny", device="cuda:99"), ValueError, NO_GPU)
    _raises(lambda: resolve_reward("default", device="cuda:99"), ValueError, NO_GPU)
    cfg = quick_config()
    cfg.device, cfg.reward = "cuda:99", "default"
    _raises(lambda: run_demo(tmp_path / "demo", config=cfg, log=lambda line: None), ValueError, NO_GPU)


def test_demo_kl_stop_that_is_not_a_number_names_the_flag(capsys):
    from rlhf_env.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--kl-stop", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # was "invalid _kl_stop value: 'abc'"
    assert "argument --kl-stop: 'abc' is neither a number of nats nor 'none'" in err and "_kl_stop" not in err
