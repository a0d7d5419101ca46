"""The independent judges (rlhf_env.judges), each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_env import judges
from rlhf_env.models import encode_prompt, encode_response, load_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_words_and_ngrams():
    assert judges.words("I'm SO happy, it's 4!") == ["i'm", "so", "happy", "it's", "4"]
    assert judges.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert judges.ngrams(["a"], 2) == []


def test_distinct_n_by_hand():
    texts = ["The cat sat.", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6; bigrams: (the cat) x2, (cat sat), (cat ran) -> 3 of 4
    assert judges.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert judges.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert judges.distinct_n(["a"], 2) == 0.0


def test_fluent_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran", "zq xv wk qq"]
    nll = [1.0, 2.0, 6.0]  # the third is garbled: left out
    # fluent: (the cat) in both, (cat sat), (cat ran): all of them -> 3 distinct of 4
    assert judges.fluent_distinct_n(texts, nll, 2) == pytest.approx(3 / 4)
    # one response drawn of the two: always 2 distinct of 2 bigrams
    assert judges.fluent_distinct_n(texts, nll, 2, count=1) == pytest.approx(1.0)
    # three fluent responses, two drawn: E[distinct] = (the cat: held by 2 -> 1 - C(1,2)/C(3,2) = 1) + 3 x (held by 1
    # -> 1 - C(2,2)/C(3,2) = 2/3) = 3, E[total] = 2/3 x 6 = 4 -> 0.75; by enumeration: (3 + 3 + 3) / (4 + 4 + 4)
    three = ["the cat sat", "the cat ran", "the cat hid"]
    assert judges.fluent_distinct_n(three, [1.0] * 3, 2, count=2) == pytest.approx(0.75)
    assert judges.fluent_distinct_n(three, [1.0] * 3, 2, count=3) == pytest.approx(judges.distinct_n(three, 2))
    assert math.isnan(judges.fluent_distinct_n(texts, nll, 2, count=3))  # only two are fluent
    assert math.isnan(judges.fluent_distinct_n(texts, [float("nan")] * 3, 2))
    with pytest.raises(ValueError, match="one per response"):
        judges.fluent_distinct_n(texts, nll[:2], 2)


def test_top_ngram_share_by_hand():
    texts = ["I am happy to help you", "I am happy to help", "no thanks here", "happy to help happy to help"]
    # "happy to help" is in responses 0, 1 and 3 (twice in 3, counted once): 3 of 4
    share, gram = judges.top_ngram_share(texts)
    assert (share, gram) == (0.75, "happy to help")
    assert judges.top_ngram_share(["x y z", "a b c"]) == (0.5, "x y z")  # a tie: the first met
    assert judges.top_ngram_share([]) == (0.0, "")
    assert judges.top_ngram_share(["too short"]) == (0.0, "")


def test_tone_is_vader_compound():
    # VADER: "good" has valence 1.9; compound = x / sqrt(x^2 + 15)
    assert judges.tone(["good", ""]) == pytest.approx([1.9 / math.sqrt(1.9**2 + 15), 0.0], abs=1e-4)
    assert judges.tone(["This is terrible."])[0] < 0


def test_relevance_is_the_cosine_of_mean_pooled_embeddings():
    enc = judges.default_encoder()
    prompts = ["How do I keep basil alive?", "How do I keep basil alive?", "Tell me about trains."]
    responses = ["Water basil when the soil is dry and give it sun.", "Great question! I'm so happy to help!",
                 "How do I keep basil alive?"]

    def by_hand(text):  # one text at a time: no padding at all
        ids = enc.tokenizer(text, return_tensors="pt")
        hidden = enc.model(**ids).last_hidden_state[0]
        v = hidden.mean(0)
        return v / v.norm()

    with torch.no_grad():
        expected = [float(by_hand(p) @ by_hand(r)) for p, r in zip(prompts, responses)]
    got = judges.relevance(prompts, responses, enc)
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[0] > got[1]  # an answer about basil beats boilerplate
    assert judges.relevance(["same text"], ["same text"], enc)[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per response"):
        judges.relevance(["a"], ["b", "c"], enc)


def test_fluency_is_the_reference_nll_per_token():
    model, tok = load_lm("tiny")
    prompts = ["the cat", "a good day starts with"]
    responses = ["sat on the mat", "a warm cup of tea and a long walk"]

    expected = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ctx, resp = encode_prompt(tok, p), encode_response(tok, r)
            ids = torch.tensor([ctx + resp])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            nll = [-logp[len(ctx) - 1 + t, tok_id] for t, tok_id in enumerate(resp)]
            expected.append(float(sum(nll) / len(nll)))
    assert judges.fluency(model, tok, prompts, responses) == pytest.approx(expected, rel=1e-4)
    ids = [encode_response(tok, r) for r in responses]
    assert judges.fluency(model, tok, prompts, ids, batch_size=1) == pytest.approx(expected, rel=1e-4)
    assert math.isnan(judges.fluency(model, tok, ["x"], [""])[0])


def test_judge_reports_every_measure():
    model, tok = load_lm("tiny")
    prompts = ["the cat", "the dog"]
    responses = ["sat on the mat, happy", "ran to the sea"]
    out = judges.judge(prompts, responses, model, tok)
    assert set(out) == {"tone", "relevance", "fluency_nll", "distinct_1", "distinct_2", "top_3gram_share", "top_3gram"}
    assert out["tone"] == pytest.approx(sum(judges.tone(responses)) / 2)
    assert out["distinct_2"] == judges.distinct_n(responses, 2)
    assert out["top_3gram_share"] == 0.5
    assert "fluency_nll" not in judges.judge(prompts, responses)


def test_negative_share_counts_responses_vader_reads_as_negative():
    texts = ["This is terrible.", "good", "", "The door is broken and the noise is awful.", "It is a door."]
    scores = judges.tone(texts)
    assert scores[0] < -0.05 and scores[3] < -0.05 and scores[1] > 0.05 and scores[2] == scores[4] == 0.0
    assert judges.negative_share(texts) == pytest.approx(2 / 5)
    assert judges.negative_share(texts, threshold=0.0) == pytest.approx(4 / 5)  # neutral texts count at 0
    assert judges.negative_share([]) == 0.0


def test_negative_fraction_of_computed_tones_matches_negative_share():
    texts = ["This is terrible.", "good", "", "The door is broken and the noise is awful.", "It is a door."]
    tones = judges.tone(texts)
    assert judges.negative_fraction(tones) == judges.negative_share(texts) == pytest.approx(2 / 5)
    assert judges.negative_fraction([-0.05, -0.049, 0.0], threshold=-0.05) == pytest.approx(1 / 3)  # the cut-off counts
    assert judges.negative_fraction([]) == 0.0


def test_tone_noise_scores_each_response_once(monkeypatch):
    """benchmarks/tone_noise.py: per seed, VADER over the first prompts' responses and over all,
    from one VADER pass over the texts."""
    import rlhf_env.generation
    from benchmarks.tone_noise import tone_by_seed
    from rlhf_env.generation import Completions

    texts = {0: ["This is terrible.", "good", "fine", "awful noise"], 1: ["great", "ok", "bad", "lovely"]}
    monkeypatch.setattr(rlhf_env.generation, "generate", lambda *a, seed, **k: Completions(texts=[texts[seed][:2], texts[seed][2:]]))
    calls = []
    real_tone = judges.tone
    monkeypatch.setattr(judges, "tone", lambda xs: calls.append(list(xs)) or real_tone(xs))
    rows = tone_by_seed(None, None, ["p1", "p2"], [0, 1], first=1, num_samples=2)
    assert calls == [texts[0], texts[1]]  # one pass per seed, every response once
    for row, seed in zip(rows, (0, 1)):
        t = real_tone(texts[seed])
        assert row["tone_first"] == pytest.approx((t[0] + t[1]) / 2) and row["tone_all"] == pytest.approx(sum(t) / 4)
        assert row["negative_first"] == judges.negative_share(texts[seed][:2])
        assert row["negative_all"] == judges.negative_share(texts[seed])


def test_diversity_noise_picks_each_prompts_most_fluent_responses():
    """benchmarks/diversity_noise.py: the 'no policy' column keeps, per prompt, the most fluent
    of the two columns' responses, and its changes are the judges' differences."""
    from benchmarks.diversity_noise import change, most_fluent

    a = (["a b c", "zq xv wk", "d e f", "g h i"], [1.0, 6.0, 2.0, 2.5])
    b = (["a b x", "a b y", "qq ww ee", "j k l"], [1.5, 0.5, 7.0, 1.0])
    texts, nll = most_fluent(a, b, per_prompt=2)
    assert texts == ["a b y", "a b c", "j k l", "d e f"] and nll == [0.5, 1.0, 1.0, 2.0]
    c = change(a, (texts, nll))
    assert c["distinct_2"] == pytest.approx(judges.distinct_n(texts, 2) - judges.distinct_n(a[0], 2))
    k = 3  # a has 3 fluent responses, the selection 4
    assert c["fluent_distinct_2"] == pytest.approx(judges.fluent_distinct_n(texts, nll, 2, k) - judges.fluent_distinct_n(a[0], a[1], 2, k))
