"""rlhf_env.tasks: reasoning-gym rows, disjoint splits, extractors, reward functions, errors."""

from __future__ import annotations

import pytest

from rlhf_env.tasks import ANSWER_FORMATS, CURATED_TASKS, ReasoningGymTask, extract_answer, follows_format, format_reward, make_task
from rlhf_env.tasks.reasoning_gym import TEST_SEED, TRAIN_SEED


@pytest.mark.parametrize(
    "text, fmt, want",
    [
        ("3 + 4 = 7.", "last_number", "7"),
        ("The answer is -12", "last_number", "-12"),
        ("It is 1,000.5 in all", "last_number", "1000.5"),
        ("no digits here", "last_number", None),
        ("I think <answer> 42 </answer>", "answer_tag", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "answer_tag", "2"),
        ("<answer>7", "answer_tag", None),
        ([{"role": "assistant", "content": "<answer>5</answer>"}], "answer_tag", "5"),
    ],
)
def test_extractors_on_hand_made_strings(text, fmt, want):
    assert extract_answer(text, fmt) == want


def test_format_reward_on_hand_made_strings():
    tag = format_reward("answer_tag")
    assert tag.__name__ == "format_answer_tag"
    assert tag(["p"] * 4, ["<answer>3</answer>", "3", "<answer>1</answer><answer>2</answer>", "x <ANSWER>y</ANSWER>"]) == [1.0, 0.0, 0.0, 1.0]
    num = format_reward("last_number")
    assert num(["p", "p"], ["it is 4", "four"]) == [1.0, 0.0]
    assert follows_format("<answer>a</answer>", "answer_tag") and not follows_format("", "last_number")
    with pytest.raises(ValueError, match="unknown answer_format 'xml'"):
        format_reward("xml")


def test_train_and_held_out_splits_never_overlap():
    task = make_task("chain_sum")
    train, test = task.rows("train"), task.rows("test")
    assert len(test) == task.test_size == 64
    # disjoint generator seeds: item i of a split comes from seed split_seed + i
    assert TRAIN_SEED + task.train_size <= TEST_SEED
    assert task._train.seed == TRAIN_SEED and task._test.seed == TEST_SEED
    # and no held-out question is trained on (chain_sum 2 x 1 digit has only 200 questions)
    assert not {r["entry"]["question"] for r in train} & {r["entry"]["question"] for r in test}
    assert 0 < len(train) < task.train_size
    # the same task built again gives the same rows (a fixed held-out split)
    assert make_task("chain_sum").rows("test") == test


def test_rows_carry_prompt_answer_and_entry():
    task = make_task("chain_sum", system_prompt="Be brief.")
    row = task.rows("test")[0]
    system, user = row["prompt"]
    assert system == {"role": "system", "content": task.system_prompt} and user["role"] == "user"
    assert user["content"] == row["entry"]["question"] and row["answer"] == row["entry"]["answer"]
    assert row["task"] == "chain_sum"
    assert [m["role"] for m in make_task("chain_sum").rows("test")[0]["prompt"]] == ["user"]  # curated: no system message
    tagged = make_task("chain_sum", answer_format="answer_tag").rows("test")[0]["prompt"]
    assert tagged[0] == {"role": "system", "content": ANSWER_FORMATS["answer_tag"]}


def test_correctness_reward_uses_the_tasks_own_verifier_in_trls_convention():
    task = make_task("chain_sum")
    rows = task.rows("test")[:3]
    correctness = task.reward_funcs[0]
    assert correctness.__name__ == "correctness" and task.reward_weights == [1.0]
    completions = [f"The result is {rows[0]['answer']}.", "It is 1000.", "no idea"]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = correctness([r["prompt"] for r in rows], completions, **columns)
    assert scores == [1.0, 0.0, 0.0]
    assert correctness(["p"], ["1"], entry=[None]) == [None]  # a row of another task
    with pytest.raises(TypeError, match="'entry' column"):
        correctness(["p"], ["1"], answer=["1"])


def test_format_weight_adds_the_format_reward():
    task = make_task("chain_sum", answer_format="answer_tag", format_weight=0.1)
    assert [f.__name__ for f in task.reward_funcs] == ["correctness", "format_answer_tag"]
    assert task.reward_weights == [1.0, 0.1]
    row = task.rows("test")[0]
    assert task.score([f"<answer>{row['answer']}</answer>", row["answer"]], [row, row]) == [1.0, 0.0]


def test_any_reasoning_gym_task_works_and_curated_settings_can_be_overridden():
    task = make_task("letter_counting", {"max_words": 3})
    assert task.config == {"min_words": 3, "max_words": 3}
    other = ReasoningGymTask("spell_backward", test_size=4, train_size=16)
    row = other.rows("test")[0]
    assert other.answer_format == "answer_tag"
    assert other.score([f"<answer>{row['answer']}</answer>"], [row]) == [1.0]
    assert set(CURATED_TASKS) >= {"chain_sum"}


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(task="chain_summ"), "unknown task 'chain_summ'"),
        (dict(task="chain_sum", task_config={"max_term": 3}), "unknown task_config key 'max_term' for reasoning-gym task 'chain_sum': valid keys are min_terms"),
        (dict(task="chain_sum", task_config={"min_terms": 3, "max_terms": 2}), "reasoning-gym rejected the settings"),
        (dict(task="chain_sum", answer_format="json"), "unknown answer_format 'json'"),
    ],
)
def test_bad_task_input_is_one_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        make_task(**args)


def test_evaluate_task_report_and_cli(tiny_lm_dir, tmp_path, one_thread):
    import json

    from rlhf_env.cli import main
    from rlhf_env.tasks import evaluate_task
    from rlhf_env.tasks.evaluation import accuracy_line

    report = evaluate_task(str(tiny_lm_dir), "chain_sum", limit=3, num_samples=2, max_new_tokens=4, progress=False, n_show=3)
    assert report["n"] == 3 and report["split"] == "test" and len(report["samples"]) == 3 and report["sampled"]["k"] == 2
    # the accuracies are the verifier's scores of the completions the report shows, row by row
    task = make_task("chain_sum")
    rows = task.rows("test")[:3]
    assert [s["answer"] for s in report["samples"]] == [r["answer"] for r in rows]
    greedy = task.score([s["greedy"] for s in report["samples"]], rows)
    sampled = [task.score(s["sampled"], [row, row]) for s, row in zip(report["samples"], rows)]
    assert report["greedy"]["accuracy"] == pytest.approx(sum(greedy) / 3)
    assert report["sampled"]["accuracy"] == pytest.approx(sum(map(sum, sampled)) / 6)
    assert report["sampled"]["pass@2"] == pytest.approx(sum(max(s) >= 1.0 for s in sampled) / 3)
    assert "(3 test rows of chain_sum)" in accuracy_line(report)
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_lm_dir), "--task", "chain_sum", "--limit", "2", "-k", "1", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["n"] == 2 and saved["sampled"]["k"] == 1
    assert main(["eval", str(tiny_lm_dir), "--task", "chain_summ", "--no-progress"]) == 1  # one-line error


def test_correct_completions_score_one():
    """Completions that answer every held-out row correctly score 1.0 (the verifier and the extractor agree)."""
    task = make_task("chain_sum", test_size=8)
    answers = [f"So the result is {r['answer']}." for r in task.rows("test")]
    assert task.score(answers, task.rows("test")) == [1.0] * 8
