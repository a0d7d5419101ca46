"""rlhf_env.prompts.load_prompts and the programmatic rewards of rlhf_env.rewards."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_env.prompts import default_prompts_path, load_prompts
from rlhf_env.rewards import REWARD_NAMES, SentimentReward, TinyReward, resolve_reward

# ------------------------------------------------------------------------------- prompts


def test_shipped_prompts():
    if not default_prompts_path("train").is_file():
        pytest.skip("shipped prompt files not written yet")
    train, test = load_prompts(), load_prompts(split="test")
    assert train and test and all(isinstance(p, str) and p.strip() == p and p for p in train + test)
    assert not set(train) & set(test)  # held-out prompts really are held out
    with pytest.raises(ValueError, match="unknown prompt split 'dev'"):
        load_prompts(split="dev")


def test_list_and_tuple():
    assert load_prompts(["a", "b c"]) == ["a", "b c"]
    assert load_prompts(("x",)) == ["x"]


def test_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n   \n  second prompt  \n", encoding="utf-8")
    assert load_prompts(path) == ["first prompt", "second prompt"]
    assert load_prompts(str(path)) == ["first prompt", "second prompt"]


def test_jsonl_file(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "什么是数据库？", "chosen": "c", "rejected": "r"}, {"prompt": "Hi there"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert load_prompts(path) == ["什么是数据库？", "Hi there"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"text": "no prompt key"}', r'bad\.jsonl:2: expected an object with a "prompt" key'),
        ('{"prompt": 3}', r'bad\.jsonl:2: "prompt" must be a non-empty string'),
        ('["prompt"]', r"bad\.jsonl:2"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_bad_prompt_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="the prompt list holds no prompts"):
        load_prompts([])
    with pytest.raises(ValueError, match="prompt 1 is a int, not a string"):
        load_prompts(["ok", 5])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        load_prompts(["  "])
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"missing\.txt' does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown type '\.csv'"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="got int"):
        load_prompts(7)


# ------------------------------------------------------------------------------- rewards


def test_sentiment_reward_scores_responses():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    reward = SentimentReward()
    responses = ["Thank you, that is wonderful news, I am so happy for you!", "That is terrible, I hate it.", "", "A chair."]
    scores = reward(["p"] * 4, responses)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores[0] > 0.8 and scores[1] < -0.5 and scores[2] == 0 and scores[3] == 0
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(r)["compound"] for r in responses]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))
    assert reward.score("p", "I love it") == reward(["p"], ["I love it"])  # single strings and .score
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        reward(["a", "b"], ["x"])


def test_tiny_reward_penalises_empty_responses():
    reward = TinyReward()
    scores = reward(["p", "p", "p"], ["", "   ", "I am so happy, thank you!"])
    assert scores[:2].tolist() == [-1.0, -1.0] and scores[2] > 0.5


def _with_one_thread(fn):
    # the tiny model is too small to gain from threads; on a busy 2-core machine they cost 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_tiny_reward_is_learnable_from_the_tiny_model():
    """The tiny model's samples span the reward's range, and a few policy-gradient steps raise it.

    This is what makes TextRLHF-tiny-v0 a reliable test signal for the agents.
    """
    from rlhf_env.models import load_lm

    model, tok = load_lm("tiny")
    reward = TinyReward()
    prompts = load_prompts(
        [
            "How can I sleep better?",
            'Reply to this message from a friend: "My flight was cancelled."',
            "Write a short review of the bike.",
            "What is a good gift for my mom?",
        ]
    )
    tok.padding_side = "left"  # batched generation continues every prompt from its last token
    torch.manual_seed(0)

    def sample(batch):
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=20, do_sample=True, pad_token_id=tok.pad_token_id)
        resp = out[:, enc["input_ids"].shape[1]:]
        return enc, out, resp, reward(batch, tok.batch_decode(resp, skip_special_tokens=True))

    def run():
        batch = prompts * 8
        before = sample(batch)[3]
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(12):  # REINFORCE with a mean baseline
            enc, out, resp, scores = sample(batch)
            advantages = scores - scores.mean()
            is_eos = resp == tok.eos_token_id
            live = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # tokens up to and including EOS
            mask = torch.cat([enc["attention_mask"], live.long()], 1)
            logits = model(input_ids=out, attention_mask=mask).logits[:, enc["input_ids"].shape[1] - 1 : -1]
            logprobs = torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0]
            loss = -(advantages[:, None] * logprobs * live).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        return before, sample(batch)[3]

    before, after = _with_one_thread(run)
    assert before.std() > 0.3 and before.min() < -0.3 and before.max() > 0.3
    assert after.mean() > before.mean() + 0.3, (before.mean(), after.mean())


def test_resolve_reward(tmp_path, monkeypatch):
    from rlhf_env import reward_model

    def fn(prompts, responses):
        return torch.zeros(len(responses))

    assert resolve_reward(fn) is fn
    assert type(resolve_reward("sentiment")) is SentimentReward
    assert type(resolve_reward("VADER")) is SentimentReward
    assert type(resolve_reward("tiny")) is TinyReward
    # the trained reward models are resolved lazily through RewardModel (stubbed: no training here)
    monkeypatch.setattr(reward_model.RewardModel, "default", classmethod(lambda cls, device="cpu": ("default", device)))
    monkeypatch.setattr(reward_model.RewardModel, "load", classmethod(lambda cls, d, device="cpu": ("load", d.name, device)))
    # the device reaches the model ("meta" exists on every machine; a GPU this one lacks is refused first)
    assert resolve_reward("default", device="meta") == ("default", "meta")
    with pytest.raises(ValueError, match=r"device 'cuda:99'"):
        resolve_reward("default", device="cuda:99")
    (tmp_path / "my_rm").mkdir()
    assert resolve_reward(tmp_path / "my_rm") == ("load", "my_rm", "cpu")
    assert resolve_reward(str(tmp_path / "my_rm")) == ("load", "my_rm", "cpu")
    for bad in ("happiness", tmp_path / "missing_rm", 3):
        with pytest.raises(ValueError, match=r"unknown reward_model .*'sentiment', 'vader', 'tiny', 'default'"):
            resolve_reward(bad)
    assert REWARD_NAMES == ("sentiment", "vader", "tiny", "default")


def test_check_reward_names_the_flag_and_the_closest_name_without_loading(tmp_path):
    from rlhf_env.rewards import check_reward

    for fine in ("default", "VADER", "my.py:kind", "pkg.mod:f", str(tmp_path), len):
        check_reward(fine)  # nothing loads: a FILE.py:NAME is checked when it is loaded
    with pytest.raises(ValueError, match=r"^unknown --reward 'sentimnet' \(did you mean 'sentiment'\?\): use one of 'sentiment'"):
        check_reward("sentimnet", "--reward")
    with pytest.raises(ValueError, match=r"^unknown reward_model 'happiness': use one of"):
        check_reward("happiness")
