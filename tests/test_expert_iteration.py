"""rlhf_env.expert_iteration: the policy fine-tuned on its own best-of-n answers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from rlhf_env.best_of_n import best_of_n
from rlhf_env.expert_iteration import ExpertIterationConfig, kept_sequences, train_expert_iteration
from rlhf_env.generation import generate, prompt_ids
from rlhf_env.models import load_lm
from rlhf_env.sft import SFTConfig, encode_example, train_sft, train_sft_tokens, trim_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["hello there", "what is the weather", "tell me a story", "how are you", "name a colour", "count to three"]


def vowel_share(prompts, responses):
    """A reward the tiny model's answers differ on and can learn: the share of vowels."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def test_trim_tokens_by_hand():
    assert trim_tokens([1, 2, 3], [7, 8], 10) == ([1, 2, 3, 7, 8], 3)
    assert trim_tokens([1, 2, 3], [7, 8], 4) == ([2, 3, 7, 8], 2)  # the prompt's start goes first
    assert trim_tokens([1, 2, 3], [7, 8, 9, 10], 3) == ([3, 7, 8], 1)  # one prompt token always stays


def test_kept_sequences_are_the_prompt_then_the_drawn_tokens(tiny_lm_dir):
    _, tok = load_lm(tiny_lm_dir)
    eos = tok.eos_token_id
    kept = [[[5, 6, eos]], [[]], [[9, 10, 11]]]  # a stopped answer, nothing drawn, an answer cut at the limit
    seqs = kept_sequences(tok, ["hi", "yo", "hey"], kept, max_length=256)
    p0, p2 = prompt_ids(tok, "hi"), prompt_ids(tok, "hey")
    assert seqs == [(p0 + [5, 6, eos], len(p0)), (p2 + [9, 10, 11], len(p2))]
    short = kept_sequences(tok, ["hi"], [[[5, 6, eos]]], max_length=5)
    assert short == [(p0[-2:] + [5, 6, eos], 2)]


def test_sft_on_tokens_trains_as_sft_on_the_same_text(tiny_lm_dir):
    """train_sft_tokens is train_sft's loop: on the sequences encode_example makes, the same weights."""
    examples = [("hello there", "general kenobi"), ("how are you", "fine thanks"), ("name a colour", "blue")]
    cfg = SFTConfig(learning_rate=1e-2, batch_size=2, epochs=2)
    a, tok = train_sft(examples, str(tiny_lm_dir), config=cfg, progress=False)
    b, _ = load_lm(tiny_lm_dir)
    b, _ = train_sft_tokens([encode_example(tok, p, r, cfg.max_length) for p, r in examples], b, tok, cfg, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert a.sft_metrics == pytest.approx(b.sft_metrics)
    with pytest.raises(ValueError, match="at least one prompt token and one response token"):
        train_sft_tokens([([1, 2, 3], 3)], b, tok, cfg, progress=False)


def test_a_round_fine_tunes_on_exactly_the_best_of_n_answers(tiny_lm_dir, monkeypatch):
    import rlhf_env.expert_iteration as ei

    seen = []
    real = ei.train_sft_tokens
    monkeypatch.setattr(ei, "train_sft_tokens", lambda seqs, *a, **k: seen.append(seqs) or real(seqs, *a, **k))
    cfg = ExpertIterationConfig(n=4, rounds=1, max_new_tokens=8, seed=3)
    model, tok = load_lm(tiny_lm_dir)
    expected = best_of_n(model, TRAIN, vowel_share, tokenizer=tok, n=4, max_new_tokens=8, seed=3, progress=False)
    train_expert_iteration(TRAIN, str(tiny_lm_dir), reward=vowel_share, config=cfg, progress=False, log=None)
    assert seen == [kept_sequences(tok, TRAIN, expected.chosen.token_ids, cfg.max_length)]


def test_expert_iteration_raises_the_reward_on_unseen_draws_and_saves(tiny_lm_dir, tmp_path):
    from agents.export import read_training_info

    cfg = ExpertIterationConfig(n=8, rounds=3, max_new_tokens=12, learning_rate=3e-3, epochs=4, batch_size=4)
    model, tok = train_expert_iteration(TRAIN, str(tiny_lm_dir), reward=vowel_share, config=cfg, output_dir=tmp_path / "ei",
                                        log_dir=tmp_path / "tb", progress=False, log=None)
    rounds = model.expert_iteration_metrics
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["rollout/best_of_n_reward_mean"] >= r["rollout/reward_mean"] for r in rounds)

    def mean_reward(policy):  # fresh draws (a seed no round used) of the trained and the starting model
        out = generate(policy, tok, TRAIN, num_samples=8, max_new_tokens=12, seed=99, progress=False)
        return float(np.mean(vowel_share(None, out.flat())))

    start, _ = load_lm(tiny_lm_dir)
    before, after = mean_reward(start), mean_reward(model)
    assert after > before + 0.08, (before, after)  # 0.12 -> 0.28 when written
    saved, _ = load_lm(tmp_path / "ei")
    for pa, pb in zip(model.parameters(), saved.parameters()):
        torch.testing.assert_close(pa, pb)
    info = read_training_info(tmp_path / "ei")
    assert info["algorithm"].startswith("expert iteration") and info["base_model"] == str(tiny_lm_dir.resolve())
    assert info["max_new_tokens"] == 12 and info["hyperparameters"]["n"] == 8 and len(info["rounds"]) == 3
    assert len(list((tmp_path / "tb").iterdir())) == 1  # one run for all rounds


@pytest.mark.parametrize("bad, message", [({"n": 0}, "n must be a positive integer"),
                                          ({"rounds": 0}, "rounds must be a positive integer"),
                                          ({"temperature": 0.0}, "temperature must be > 0"),
                                          ({"batch_size": 1.5}, "batch_size must be a positive integer")])
def test_bad_settings_are_refused_before_any_model_loads(bad, message):
    with pytest.raises(ValueError, match=message):
        train_expert_iteration(TRAIN, "/no/such/model", reward=vowel_share, config=ExpertIterationConfig(**bad))


def test_cli_trains_and_eval_judges_with_the_recorded_reward_and_length(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    import rlhf_env.evaluate
    from rlhf_env.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TRAIN) + "\n")
    out = tmp_path / "ei"
    assert main(["expert-iteration", "--prompts", str(prompts), "--model", str(tiny_lm_dir), "--reward", "tiny", "--n", "2",
                 "--max-new-tokens", "6", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reward_mean=-?[\d.]+ best_of_n_reward_mean=-?[\d.]+ train/loss=[\d.]+ saved=", printed)
    assert f"rlhf-env eval {out}" in printed
    assert json.loads((out / "rlhf_env_training.json").read_text())["reward_model"] == "tiny"
    seen = []
    monkeypatch.setattr(rlhf_env.evaluate, "evaluate",
                        lambda policy, reference, reward, **kw: seen.append((reference, reward, kw.get("max_new_tokens"))) or {})
    monkeypatch.setattr(rlhf_env.evaluate, "format_table", lambda report: "")
    assert main(["eval", str(out)]) == 0
    assert seen == [(str(tiny_lm_dir.resolve()), "tiny", 6)]
    # mistakes: one line each, exit 1 (a bad setting) or 2 (a misspelled flag)
    assert main(["expert-iteration", "--model", str(tiny_lm_dir), "--n", "0", "--output", str(tmp_path / "x")]) == 1
    assert "n must be a positive integer" in capsys.readouterr().err
    assert main(["expert-iteration", "--prompts", str(tmp_path / "none.txt"), "--output", str(tmp_path / "x")]) == 1
    assert "none.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["expert-iteration", "--rouns", "2", "--output", str(tmp_path / "x")])
    assert "--rounds" in capsys.readouterr().err


def test_min_reward_keeps_only_the_answers_that_reach_it(tiny_lm_dir, monkeypatch):
    import rlhf_env.expert_iteration as ei

    seen = []
    real = ei.train_sft_tokens
    monkeypatch.setattr(ei, "train_sft_tokens", lambda seqs, *a, **k: seen.append(seqs) or real(seqs, *a, **k))
    model, tok = load_lm(tiny_lm_dir)
    drawn = best_of_n(model, TRAIN, vowel_share, tokenizer=tok, n=2, max_new_tokens=8, seed=5, progress=False)
    cut = float(np.median([s[0] for s in drawn.scores]))
    keep = [ids if s[0] >= cut else [] for ids, s in zip(drawn.chosen.token_ids, drawn.scores)]
    cfg = ExpertIterationConfig(n=2, max_new_tokens=8, seed=5, min_reward=cut)
    trained, _ = train_expert_iteration(TRAIN, str(tiny_lm_dir), reward=vowel_share, config=cfg, progress=False, log=None)
    assert seen == [kept_sequences(tok, TRAIN, keep, cfg.max_length)] and 0 < len(seen[0]) < len(TRAIN)
    assert trained.expert_iteration_metrics[0]["kept_share"] == len(seen[0]) / len(TRAIN)
    with pytest.raises(RuntimeError, match="no best-of-2 answer scored at least min_reward=2.0"):
        train_expert_iteration(TRAIN, str(tiny_lm_dir), reward=vowel_share, progress=False, log=None,
                               config=ExpertIterationConfig(n=2, max_new_tokens=8, min_reward=2.0))


def test_a_tasks_prompt_reward_is_its_verifier_by_question():
    from rlhf_env.envs.prompt import prompt_text
    from rlhf_env.tasks import make_task

    task = make_task("chain_sum")
    rows = task.rows("train")[:3]
    reward = task.prompt_reward("train")
    questions = [prompt_text(r["prompt"]) for r in rows]
    assert questions == [r["entry"]["question"] for r in rows]
    right = [f"The answer is {r['answer']}" for r in rows]
    wrong = [f"The answer is {int(r['answer']) + 1}" for r in rows]
    assert reward(questions, right) == [1.0] * 3 and reward(questions, wrong) == [0.0] * 3
    with pytest.raises(ValueError, match="is not a question of task 'chain_sum'"):
        reward(["What is 2 + 2?"], ["4"])


def test_cli_on_a_task_keeps_correct_answers_only(tiny_lm_dir, tmp_path, capsys):
    """--task: the task's questions and verifier; the random tiny model answers none right,
    so with the default min_reward of 1 there is nothing to learn, said in one line."""
    from rlhf_env.cli import main

    assert main(["expert-iteration", "--task", "chain_sum", "--limit", "4", "--model", str(tiny_lm_dir), "--n", "2",
                 "--output", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "no best-of-2 answer scored at least min_reward=1.0 and ended before max_new_tokens" in capsys.readouterr().err
    assert main(["expert-iteration", "--task", "chain_sum", "--limit", "4", "--model", str(tiny_lm_dir), "--n", "2",
                 "--min-reward", "0", "--no-finished-only", "--max-new-tokens", "4", "--output", str(tmp_path / "ei"), "--no-progress"]) == 0
    assert f"rlhf-env eval {tmp_path / 'ei'} --task chain_sum" in capsys.readouterr().out
    info = json.loads((tmp_path / "ei" / "rlhf_env_training.json").read_text())
    hp = info["hyperparameters"]
    assert info["task"] == "chain_sum" and hp["min_reward"] == 0.0 and hp["finished_only"] is False and info["max_new_tokens"] == 4
    assert main(["expert-iteration", "--task", "chain_sum", "--reward", "tiny", "--output", str(tmp_path / "x")]) == 1
    assert "--task brings its own prompts and verifier" in capsys.readouterr().err


def test_finished_only_drops_the_answers_the_length_limit_cut(tiny_lm_dir, monkeypatch):
    import rlhf_env.expert_iteration as ei
    from rlhf_env.best_of_n import BestOfN
    from rlhf_env.generation import Completions

    model, tok = load_lm(tiny_lm_dir)
    eos = tok.eos_token_id
    chosen = Completions(texts=[["a"], ["b"], ["c"]], num_tokens=[[3], [2], [3]], finished=[[True], [False], [True]],
                         token_ids=[[[5, 6, eos]], [[7, 8]], [[9, 10, eos]]])
    drawn = BestOfN(chosen, [[1.0], [1.0], [0.0]], chosen, [[[1.0]], [[1.0]], [[0.0]]], n=1)
    monkeypatch.setattr(ei, "best_of_n", lambda *a, **k: drawn)
    seen = []
    monkeypatch.setattr(ei, "train_sft_tokens", lambda seqs, model, tok, *a, **k: seen.append(seqs) or (model, tok))
    model.sft_metrics = {}
    prompts = ["hi", "yo", "hey"]
    for cfg, rows in ((ExpertIterationConfig(n=1, finished_only=True), [0, 2]),
                      (ExpertIterationConfig(n=1, finished_only=True, min_reward=1.0), [0]),
                      (ExpertIterationConfig(n=1), [0, 1, 2])):
        seen.clear()
        train_expert_iteration(prompts, model, tokenizer=tok, reward=vowel_share, config=cfg, progress=False, log=None)
        assert seen == [kept_sequences(tok, [prompts[i] for i in rows], [chosen.token_ids[i] for i in rows], cfg.max_length)]
