"""Reward functions with TRL's convention (envs.reward_funcs), task rows (envs.rows) and
prompt encoding with a system message set, dropped or left to the template (envs.prompt).
Pure functions: no model is run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.prompt import TEMPLATE_DEFAULT, encode_prompt, prompt_text
from envs.reward_funcs import RewardFunctionError, RewardFunctions
from envs.rows import as_rows, column_names, columns_of

# SmolLM2-135M-Instruct's chat template (it adds a default system message)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.chat_template = SMOL_TEMPLATE
    return tok


# --- prompts as token ids -------------------------------------------------------------
def test_string_prompt_with_the_template_default_is_what_the_package_encoded_before(chat_tokenizer):
    from rlhf_env.models import encode_prompt

    ids = encode_prompt(chat_tokenizer, "Hi")
    assert ids == [int(i) for i in chat_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)["input_ids"]]
    assert ids == encode_prompt(chat_tokenizer, "Hi")
    assert "named SmolLM" in chat_tokenizer.decode(ids)


def test_system_prompt_none_drops_the_template_default_system_message(chat_tokenizer):
    ids = encode_prompt(chat_tokenizer, "Hi", system_prompt=None)
    assert chat_tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert len(ids) < len(encode_prompt(chat_tokenizer, "Hi"))


def test_system_prompt_string_and_a_rows_own_system_message(chat_tokenizer):
    ids = encode_prompt(chat_tokenizer, "Hi", system_prompt="Be brief.")
    assert chat_tokenizer.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    own = [{"role": "system", "content": "Count."}, {"role": "user", "content": "1, 2"}]
    for system in (TEMPLATE_DEFAULT, None, "Be brief."):  # the row's own system message wins
        assert chat_tokenizer.decode(encode_prompt(chat_tokenizer, own, system)).startswith("<|im_start|>system\nCount.<|im_end|>")
    # messages without a system message are the string prompt's encoding
    assert encode_prompt(chat_tokenizer, [{"role": "user", "content": "Hi"}], None) == encode_prompt(chat_tokenizer, "Hi", None)


def test_a_refused_prompt_reports_the_budget(chat_tokenizer):
    from envs.prompt import encode_env_prompt

    total = len(encode_prompt(chat_tokenizer, "Hi"))
    bare = len(encode_prompt(chat_tokenizer, "Hi", None))
    text = len(chat_tokenizer("Hi", add_special_tokens=False)["input_ids"])
    expected = (
        rf"prompts\[3\] is {total} tokens long after the chat template, more than max_prompt_tokens={total - 1}: "
        rf"{text} of prompt text and {total - text} of chat template/system message; shorten it, pass a larger "
        rf"max_prompt_tokens, or system_prompt=None to drop the template's default system message \({total - bare} tokens\)"
    )
    with pytest.raises(ValueError, match=expected):
        encode_env_prompt(chat_tokenizer, "Hi", total - 1, "prompts[3]")
    assert encode_env_prompt(chat_tokenizer, "Hi", bare, "prompts[3]", system_prompt=None) == encode_prompt(chat_tokenizer, "Hi", None)


def test_without_a_template_messages_are_joined_after_bos(tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert not tok.chat_template
    ids = encode_prompt(tok, [{"role": "system", "content": "the sea"}, {"role": "user", "content": "hello"}])
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "the sea\nhello"
    assert encode_prompt(tok, "hello", system_prompt="the sea") == ids
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == "q"


# --- rows -----------------------------------------------------------------------------
def test_rows_keep_every_column_and_columns_come_in_row_order():
    rows = as_rows([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2, "level": "hard"}])
    assert column_names(rows) == ["answer", "level"]
    assert columns_of([rows[1], None, rows[0]], ["answer", "level"]) == {"answer": [2, None, 1], "level": ["hard", None, None]}


def test_rows_from_a_datasets_dataset():
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    assert as_rows(ds) == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]


@pytest.mark.parametrize(
    "dataset, match",
    [
        ([{"prompt": "a"}, {"question": "b", "answer": 2}], r'dataset\[1\] has no "prompt" key \(its keys: question, answer\)'),
        ([], "dataset is empty"),
        (["a"], r"dataset\[0\] is a str, not a dict"),
        ([{"prompt": ""}], r'dataset\[0\]\["prompt"\] is an empty string'),
        ([{"prompt": 3}], r'dataset\[0\]\["prompt"\] must be a string or a non-empty list of chat messages'),
        ([{"prompt": [{"role": "user"}]}], r'dataset\[0\]\["prompt"\]\[0\] must be a chat message'),
        ([{"prompt": [{"role": "robot", "content": "x"}]}], r"has role 'robot'"),
        ([{"prompt": "a", "completions": "b"}], "column named 'completions'"),
    ],
)
def test_bad_rows_are_one_clear_error(dataset, match):
    with pytest.raises(ValueError, match=match):
        as_rows(dataset)


# --- reward functions -----------------------------------------------------------------
def _call(rf, rows, responses, ids=None):
    prompts = [r["prompt"] for r in rows]
    return rf(rows, prompts, responses, ids or [[1]] * len(responses))


def correct(prompts, completions, answer, **kwargs):
    """TRL style: a column by name, everything else through **kwargs."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def only_hard(prompts, completions, **kwargs):
    return [float(len(c)) if level == "hard" else None for c, level in zip(completions, kwargs["level"])]


def test_weighted_sum_skips_none_and_per_function_values_are_unweighted():
    rows = as_rows([
        {"prompt": "1+1", "answer": "2", "level": "easy"},
        {"prompt": "1+1", "answer": "3", "level": "hard"},  # same prompt, its own answer
        {"prompt": "2+2", "answer": "4", "level": "hard"},
    ])
    rf = RewardFunctions([correct, only_hard], reward_weights=[2.0, 0.5], columns=column_names(rows))
    scores, values = _call(rf, rows, ["2", "2", "four"])
    np.testing.assert_allclose(values["rewards/correct"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(values["rewards/only_hard"], [np.nan, 1.0, 4.0])
    np.testing.assert_allclose(scores, [2.0 * 1.0, 2.0 * 0.0 + 0.5 * 1.0, 0.5 * 4.0])
    assert rf.info_keys == ["rewards/correct", "rewards/only_hard"]


def test_reward_model_adds_with_weight_one_and_a_row_no_function_applies_to_scores_zero():
    def rm(prompts, responses):
        assert prompts == ["q", "r"]  # the message prompt reaches the reward model as its user text
        return torch.tensor([0.25, -1.0])

    rows = as_rows([{"prompt": "q", "level": "hard"}, {"prompt": [{"role": "user", "content": "r"}], "level": "easy"}])
    rf = RewardFunctions(only_hard, reward_model=rm, columns=column_names(rows))
    scores, values = _call(rf, rows, ["ab", "abc"])
    np.testing.assert_allclose(scores, [0.25 + 2.0, -1.0])
    np.testing.assert_allclose(values["rewards/reward_model"], [0.25, -1.0])
    alone = RewardFunctions(only_hard, columns=["level"])
    with pytest.warns(UserWarning, match="every reward function returned None"):
        scores, _ = _call(alone, rows, ["ab", "abc"])
    np.testing.assert_allclose(scores, [2.0, 0.0])


def test_conversational_rows_get_trl_shaped_completions_and_completion_ids():
    seen = {}

    def record(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, kwargs=kwargs)
        return [0.0] * len(completions)

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    rows = as_rows([{"prompt": msgs, "answer": "x"}])
    _call(RewardFunctions(record, columns=["answer"]), rows, ["hi"], [[5, 6]])
    assert seen == {"prompts": [msgs], "completions": [[{"role": "assistant", "content": "hi"}]], "ids": [[5, 6]], "kwargs": {"answer": ["x"]}}


def test_a_trl_reward_function_runs_unchanged():
    # as written in TRL's documentation (reward functions, "accuracy_reward" style)
    def accuracy_reward(completions, solution, **kwargs):
        contents = [completion[0]["content"] for completion in completions]
        return [1.0 if c == s else 0.0 for c, s in zip(contents, solution)]

    rows = as_rows([{"prompt": [{"role": "user", "content": "2+2"}], "solution": "4"}] * 2)
    scores, values = _call(RewardFunctions(accuracy_reward, columns=["solution"]), rows, ["4", "5"])
    np.testing.assert_allclose(scores, [1.0, 0.0])


@pytest.mark.parametrize(
    "func, match",
    [
        (lambda prompts, completions, **kw: None, r"'<lambda>' returned None, not a list of 2 scores"),
        (lambda prompts, completions, **kw: 1.0, r"returned a single float \(1.0\), not a list of 2 scores"),
        (lambda prompts, completions, **kw: torch.tensor(1.0), r"returned a single ndarray"),
        (lambda prompts, completions, **kw: [1.0], r"returned 1 scores for 2 completions"),
        (lambda prompts, completions, **kw: [1.0, float("nan")], r"returned nan for completion 1 \(prompt 'b'\): scores must be finite; return None"),
        (lambda prompts, completions, **kw: [1.0, "x"], r"returned a str for completion 1"),
        (lambda prompts, completions, **kw: 1 / 0, r"raised ZeroDivisionError: division by zero \(at test_reward_funcs.py:\d+\)"),
    ],
)
def test_bad_results_name_the_function(func, match):
    rows = as_rows([{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(RewardFunctionError, match=match) as info:
        _call(RewardFunctions(func), rows, ["x", "y"])
    assert "\n" not in str(info.value)


def test_a_raising_function_keeps_its_exception_but_shows_one_line():
    def broken(prompts, completions, answer, **kwargs):
        return [int(a) for a in answer]

    rows = as_rows([{"prompt": "a", "answer": "one"}])
    with pytest.raises(RewardFunctionError, match=r"^reward function 'broken' raised ValueError: invalid literal") as info:
        _call(RewardFunctions(broken, columns=["answer"]), rows, ["x"])
    assert isinstance(info.value.__context__, ValueError) and info.value.__suppress_context__


@pytest.mark.parametrize(
    "funcs, kwargs, match",
    [
        (lambda prompts, responses: [0.0], {}, r"'<lambda>' cannot be called as <lambda>\(prompts=..., completions=.*missing a required argument: 'responses'.*reward_model="),
        (lambda prompts, completions: [0.0], {}, r"cannot be called .*columns \(answer\).*unexpected keyword argument"),
        (lambda prompts, completions, gold, **kw: [0.0], {}, r"missing a required argument: 'gold'"),
        ("correct", {}, "reward_funcs must be a callable or a list of callables"),
        ([correct, 3], {}, r"reward_funcs\[1\] is a int"),
        ([correct], {"reward_weights": [1.0, 2.0]}, "got 2 reward_weights for 1 reward_funcs"),
        ([correct], {"reward_weights": [math.nan]}, r"reward_weights\[0\] must be a finite number"),
        (None, {}, "the env has no reward"),
    ],
)
def test_bad_reward_funcs_are_refused_when_built(funcs, kwargs, match):
    with pytest.raises((RewardFunctionError, TypeError, ValueError), match=match):
        RewardFunctions(funcs, columns=["answer"], **kwargs)


def test_reward_model_nan_and_count_are_clear():
    rows = as_rows([{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(RewardFunctionError, match=r"the reward model returned nan for completion 0 \(prompt 'a'\): scores must be finite$"):
        _call(RewardFunctions(reward_model=lambda p, r: [float("nan"), 0.0]), rows, ["x", "y"])
    with pytest.raises(RewardFunctionError, match="the reward model returned 3 scores for 2 completions"):
        _call(RewardFunctions(reward_model=lambda p, r: [0.0] * 3), rows, ["x", "y"])


def test_duplicate_names_log_apart():
    rf = RewardFunctions([correct, correct], columns=["answer"])
    assert rf.info_keys == ["rewards/correct", "rewards/correct_2"]
