"""The reward model and DPO on TRL conversational pairs whose prompts carry a system message
(explicit prompts, implicit-prompt pairs, a ``datasets.Dataset``, a JSON Lines file through
the CLI): the system text is in the tokens the model trains on, and with a chat template the
prompt is exactly the template's rendering with the assistant header after it."""

import json

import pytest
import torch

from rlhf_env.models import encode_response, load_lm

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "You are a pirate."
QUESTIONS = [("Say hi.", "Ahoy matey!", "Hello."), ("Name a ship.", "The Black Pearl, arr!", "A ferry."),
             ("What do you drink?", "Rum, arr!", "Water."), ("Where do you sail?", "The seven seas, arr!", "Nowhere.")]
# a small chat template for the tiny model (which has none): role markers around each message
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _msg(role, content):
    return {"role": role, "content": content}


def records():
    """Explicit-prompt conversational records, then one implicit-prompt record."""
    rows = [{"prompt": [_msg("system", SYSTEM), _msg("user", q)], "chosen": [_msg("assistant", good)],
             "rejected": [_msg("assistant", bad)]} for q, good, bad in QUESTIONS]
    head = [_msg("system", SYSTEM), _msg("user", "Who are you?")]
    rows.append({"chosen": [*head, _msg("assistant", "Captain Jack, arr!")], "rejected": [*head, _msg("assistant", "A clerk.")]})
    return rows


def expected_prompts(tokenizer):
    """Every record's prompt ids and its two responses, as the trainers must encode them."""
    out = []
    for q, good, bad in [*QUESTIONS, ("Who are you?", "Captain Jack, arr!", "A clerk.")]:
        messages = [_msg("system", SYSTEM), _msg("user", q)]
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:  # no template: BOS, then the contents joined by newlines
            ids = [tokenizer.bos_token_id, *tokenizer(f"{SYSTEM}\n{q}", add_special_tokens=False)["input_ids"]]
        out.append((ids, good, bad))
    return out


def assert_sequences(tokenizer, seqs):
    """``seqs`` (token-id lists the model saw) hold every record's chosen and rejected
    sequence: the expected prompt ids, then the response ids (and EOS)."""
    seqs = [list(s) for s in seqs]
    for prompt_ids, good, bad in expected_prompts(tokenizer):
        for response in (good, bad):
            want = prompt_ids + encode_response(tokenizer, response)
            assert any(s[: len(want)] == want for s in seqs), (
                f"no sequence starts with {tokenizer.decode(want)!r}; seen: {[tokenizer.decode(s) for s in seqs][:4]}"
            )
    assert all(SYSTEM in tokenizer.decode(s) for s in seqs)


def _tiny_with_template():
    model, tokenizer = load_lm("tiny")
    tokenizer.chat_template = TEMPLATE
    return model, tokenizer


def _record_dpo_sequences(monkeypatch):
    from rlhf_env import dpo

    seen = []
    init = dpo._EncodedPairs.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.extend(ids for ids, _ in self.chosen + self.rejected)

    monkeypatch.setattr(dpo._EncodedPairs, "__init__", recording)
    return seen


def _record_reward_inputs(monkeypatch):
    from rlhf_env.reward_model import RewardModel

    seen = []
    forward = RewardModel.forward_ids

    def recording(self, input_ids, attention_mask):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return forward(self, input_ids, attention_mask)

    monkeypatch.setattr(RewardModel, "forward_ids", recording)
    return seen


@pytest.mark.parametrize("as_dataset", [False, True])
def test_dpo_trains_on_the_system_message_through_the_chat_template(monkeypatch, as_dataset):
    from datasets import Dataset

    from rlhf_env.dpo import DPOConfig, train_dpo

    seen = _record_dpo_sequences(monkeypatch)
    model, tokenizer = _tiny_with_template()
    data = Dataset.from_list(records()) if as_dataset else records()
    config = DPOConfig(learning_rate=3e-3, batch_size=2, epochs=1, trainable_layers=None)
    model, _ = train_dpo(data, model, tokenizer=tokenizer, config=config, progress=False)
    assert_sequences(tokenizer, seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_causal_reward_model_trains_on_the_system_message_through_the_chat_template(monkeypatch):
    from datasets import Dataset

    from rlhf_env.reward_model import RewardModel
    from rlhf_env.reward_trainer import RewardModelConfig, train_reward_model

    seen = _record_reward_inputs(monkeypatch)
    rm = RewardModel.from_backbone("tiny", seed=0)
    rm.tokenizer.chat_template = TEMPLATE
    train_reward_model(Dataset.from_list(records()), backbone=rm, config=RewardModelConfig(epochs=1, batch_size=2), progress=False)
    assert_sequences(rm.tokenizer, seen)
    # scoring a message prompt reads it the same way
    ids = rm.encode([_msg("system", SYSTEM), _msg("user", "Say hi.")], "Ahoy")
    assert ids[: len(expected_prompts(rm.tokenizer)[0][0])] == expected_prompts(rm.tokenizer)[0][0]


def test_encoder_reward_model_reads_the_system_message(monkeypatch):
    """The default (MiniLM encoder) backbone takes a message prompt as its contents joined by
    newlines, system message first (it failed with a tokenizer TypeError before)."""
    from rlhf_env.reward_trainer import RewardModelConfig, train_reward_model

    seen = _record_reward_inputs(monkeypatch)
    rm = train_reward_model(records(), config=RewardModelConfig(epochs=1, batch_size=2), progress=False)
    texts = [rm.tokenizer.decode(s) for s in seen]
    assert texts and all(text.startswith("[CLS] you are a pirate.") for text in texts), texts[:3]
    assert any("you are a pirate. who are you? [SEP] captain jack, arr! [SEP]" in text for text in texts)
    scores = rm.score([[_msg("system", SYSTEM), _msg("user", "Say hi.")], "Say hi."], ["Ahoy", "Ahoy"])
    assert scores[0] != scores[1]  # the system message changes the input


def test_cli_train_rm_and_dpo_on_a_conversational_file_with_a_system_message(tmp_path, monkeypatch):
    from rlhf_env.cli import main

    path = tmp_path / "pirate.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    _, tokenizer = load_lm("tiny")

    seen = _record_reward_inputs(monkeypatch)
    assert main(["train-rm", "--train", str(path), "--eval-fraction", "0.2", "--backbone", "tiny", "--epochs", "1",
                 "-o", str(tmp_path / "rm"), "--no-progress"]) == 0
    assert_sequences(tokenizer, seen)
    assert (tmp_path / "rm" / "reward_model.json").is_file()

    seen = _record_dpo_sequences(monkeypatch)
    assert main(["dpo", "--train", str(path), "--eval-fraction", "0.2", "--model", "tiny", "--epochs", "1",
                 "-o", str(tmp_path / "dpo"), "--no-progress"]) == 0
    assert_sequences(tokenizer, seen)
    assert (tmp_path / "dpo" / "config.json").is_file()


def _recording_reward(got: list):
    """A plain (prompts, responses) reward function that records the prompts it is given."""
    def plain(prompts, responses):
        got.extend(prompts)
        return [0.0] * len(responses)
    return plain


def _one_step_scores(reward, **env_kwargs):
    """The scores of one step of two TextRLHF-tiny-v0 envs answering with one token."""
    import gymnasium as gym
    import numpy as np

    import rlhf_env  # noqa: F401  (registers the envs)

    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, reward_model=reward, max_new_tokens=1, **env_kwargs)
    env.reset(seed=0)
    return env.step(np.array([5, 6]))[4]["score"]


def test_the_env_scores_message_prompts_with_the_system_message(monkeypatch):
    """A reward model trained with system messages scores the env's message rows with them
    (RewardModel.accepts_messages); a plain (prompts, responses) function gets the text."""
    from rlhf_env.reward_model import RewardModel

    rows = [{"prompt": [_msg("system", SYSTEM), _msg("user", q)]} for q, _, _ in QUESTIONS]
    rm = RewardModel.from_backbone("tiny", seed=0)
    seen = _record_reward_inputs(monkeypatch)
    got = []
    for reward in (rm, _recording_reward(got)):
        _one_step_scores(reward, dataset=rows)
    assert len(seen) == 2 and all(rm.tokenizer.decode(ids).startswith(f"<s>{SYSTEM}\n") for ids in seen), [rm.tokenizer.decode(i) for i in seen]
    assert len(got) == 2 and all(p in [q for q, _, _ in QUESTIONS] for p in got)


def test_the_envs_system_prompt_reaches_a_reward_model_that_takes_messages(monkeypatch):
    """``system_prompt=`` of the env reaches a reward model that takes messages as the rows'
    own system messages do (the same token sequences); a row's own system message still wins;
    a plain (prompts, responses) function keeps getting the user's text."""
    import numpy as np

    from rlhf_env.reward_model import RewardModel

    questions = [q for q, _, _ in QUESTIONS]
    rm = RewardModel.from_backbone("tiny", seed=0)
    seen = _record_reward_inputs(monkeypatch)
    got = []
    env_wide = _one_step_scores(rm, prompts=questions, system_prompt=SYSTEM)
    by_rows = _one_step_scores(rm, dataset=[{"prompt": [_msg("system", SYSTEM), _msg("user", q)]} for q in questions])
    assert len(seen) == 4 and seen[:2] == seen[2:], [rm.tokenizer.decode(i) for i in seen]
    assert all(rm.tokenizer.decode(ids).startswith(f"<s>{SYSTEM}\n") for ids in seen)
    np.testing.assert_array_equal(env_wide, by_rows)
    seen.clear()
    _one_step_scores(rm, dataset=[{"prompt": [_msg("system", SYSTEM), _msg("user", q)]} for q in questions], system_prompt="Be brief.")
    assert all(rm.tokenizer.decode(ids).startswith(f"<s>{SYSTEM}\n") for ids in seen)  # the row's own wins
    seen.clear()
    _one_step_scores(rm, prompts=questions, system_prompt=None)
    assert not any(SYSTEM in rm.tokenizer.decode(ids) for ids in seen) and len(seen) == 2
    _one_step_scores(_recording_reward(got), prompts=questions, system_prompt=SYSTEM)
    assert len(got) == 2 and all(p in questions for p in got)


@pytest.mark.slow
def test_smollm2_sequences_hold_the_system_message_in_its_chat_template():
    """With SmolLM2's own template: the pair's system message replaces the template's default one."""
    from transformers import AutoTokenizer

    from rlhf_env.data import as_pairs
    from rlhf_env.models import _smollm2_dir
    from rlhf_env.sft import encode_example

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_dir())
    pair = as_pairs(records()[:1])[0]
    ids, n_prompt = encode_example(tokenizer, pair.prompt, pair.chosen, 128)
    assert tokenizer.decode(ids[:n_prompt]) == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    assert tokenizer.decode(ids[n_prompt:]) == "Ahoy matey!<|im_end|>"
