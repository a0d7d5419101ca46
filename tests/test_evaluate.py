"""rlhf_env.evaluate: a policy judged against its reference, and the pass rule."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rlhf_env import judges
from rlhf_env.evaluate import Targets, check_targets, compare, evaluate, format_table
from rlhf_env.generation import generate
from rlhf_env.models import load_lm

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["the cat", "a good day starts with", "what is the best way to learn"]


def test_policy_equal_to_reference_has_zero_kl_and_even_odds(tmp_path):
    model, tok = load_lm("tiny")
    report = evaluate((model, tok), PROMPTS, reference=(model, tok), reward="tiny", max_new_tokens=8, num_samples=2,
                      progress=False, out=tmp_path / "r.json")
    assert report["policy"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert report["win_rate"] == 0.5
    assert report["responses"]["policy"] == report["responses"]["reference"]
    for key in ("reward", "tone", "relevance", "fluency_nll", "distinct_2", "top_3gram_share"):
        assert report["policy"][key] == pytest.approx(report["reference"][key], abs=1e-6)
    assert len(report["responses"]["policy"]) == 6
    assert [row["prompt"] for row in report["samples"]] == PROMPTS  # one per prompt, side by side
    assert json.loads((tmp_path / "r.json").read_text())["win_rate"] == 0.5
    assert "fluency (ref NLL/token)" in format_table(report, check_targets(report))
    # fluency from the sampling pass's own log-probs: a teacher-forced forward's numbers
    flat = [p for p in PROMPTS for _ in range(2)]
    ids = [x for g in generate(model, tok, PROMPTS, num_samples=2, max_new_tokens=8, progress=False).token_ids for x in g]
    nll = judges.fluency(model, tok, flat, ids)
    assert report["reference_nll"] == pytest.approx(nll, abs=1e-5) and report["policy_nll"] == report["reference_nll"]


def test_the_reference_judged_against_itself_is_scored_once():
    model, tok = load_lm("tiny")
    calls = []

    def reward(prompts, responses):
        calls.append(len(responses))
        return torch.tensor([float(len(r)) for r in responses])

    report = evaluate((model, tok), PROMPTS, reference=(model, tok), reward=reward, max_new_tokens=8, num_samples=2,
                      progress=False)
    assert calls == [6]  # one call for both columns: the same responses
    assert report["policy_scores"] == report["reference_scores"] == [float(len(r)) for r in report["responses"]["reference"]]
    assert report["policy"] == dict(report["reference"], kl=0.0)


def test_kl_is_the_summed_log_ratio_of_the_sampled_tokens():
    ref, tok = load_lm("tiny")
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
    report = evaluate((policy, tok), PROMPTS, reference=(ref, tok), reward="tiny", max_new_tokens=8, seed=3, progress=False)
    ids = [x for g in generate(policy, tok, PROMPTS, max_new_tokens=8, seed=3, progress=False).token_ids for x in g]
    expected = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, ids):
            from rlhf_env.models import encode_prompt

            ctx = encode_prompt(tok, p)
            x = torch.tensor([ctx + r])
            lp = torch.log_softmax(policy(input_ids=x).logits[0].float(), -1)
            lr = torch.log_softmax(ref(input_ids=x).logits[0].float(), -1)
            expected.append(float(sum(lp[len(ctx) - 1 + t, a] - lr[len(ctx) - 1 + t, a] for t, a in enumerate(r))))
    assert report["kls"] == pytest.approx(expected, abs=1e-4)
    assert report["policy"]["kl"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    nll = judges.fluency(ref, tok, PROMPTS, ids)  # fluency reuses the KL's reference pass: the same numbers
    assert report["policy"]["fluency_nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert report["policy_nll"] == pytest.approx(nll, abs=1e-5)  # each response's, kept in the report
    ref_ids = [x for g in generate(ref, tok, PROMPTS, max_new_tokens=8, seed=3, progress=False).token_ids for x in g]
    assert report["reference_nll"] == pytest.approx(judges.fluency(ref, tok, PROMPTS, ref_ids), abs=1e-5)
    # the reference column can be reused
    again = evaluate((policy, tok), PROMPTS, reference=(ref, tok), reward="tiny", max_new_tokens=8, seed=3, progress=False,
                     baseline=report)
    same = json.dumps(again["reference"], sort_keys=True) == json.dumps(report["reference"], sort_keys=True)  # (nan == nan)
    assert same and again["kls"] == pytest.approx(report["kls"])
    assert again["reference_nll"] == report["reference_nll"]
    with pytest.raises(ValueError, match="evaluate both the same way"):
        evaluate((policy, tok), PROMPTS, reference=(ref, tok), reward="tiny", max_new_tokens=9, seed=3, progress=False,
                 baseline=report)


def test_pass_rule_fails_a_degenerate_responder_the_reward_model_loves():
    """A responder that repeats a cheerful phrase to every prompt: the reward (a stand-in
    reward model that learned cheerful words) scores it far above the reference and it
    wins every comparison, yet the judges fail it."""
    prompts = ["How do I keep basil alive?", "How can I fall asleep faster?", "What should I pack for a weekend trip?",
               "How do I fix a squeaky door?", "Reply to a friend who got a puppy."]
    reference = ["Water it when the soil is dry and give it six hours of sun.",
                 "Keep a regular bedtime, avoid screens late and keep the room cool.",
                 "Clothes for two days, a toothbrush, a charger and a book.",
                 "Put a little oil on the hinge pin and open and close it a few times.",
                 "A puppy! Congratulations, send me pictures soon."]
    degenerate = ["I'm happy to help! I'm happy to help! I'm happy to help! Great question!"] * len(prompts)

    def cheerful_reward(ps, rs):
        return torch.tensor([5.0 * r.lower().count("happy") + r.count("!") for r in rs])

    report = compare(prompts, degenerate, reference, cheerful_reward, kls=[1.0] * len(prompts))
    assert report["win_rate"] == 1.0 and report["policy"]["reward"] > report["reference"]["reward"] + 10
    verdict = check_targets(report)
    assert not verdict["passed"]
    assert not verdict["checks"]["top_3gram_share"]["ok"] and verdict["checks"]["top_3gram_share"]["value"] == 1.0
    assert not verdict["checks"]["distinct_2_change"]["ok"]
    assert not verdict["checks"]["relevance_change"]["ok"]
    assert verdict["checks"]["tone_gain"]["ok"] and verdict["checks"]["kl"]["ok"]  # what the reward did see is fine
    # the fluent-only distinct-2 bound (off by default) fails it too, on the same responses judged fluent
    report = compare(prompts, degenerate, reference, cheerful_reward, kls=[1.0] * len(prompts),
                     response_nll=[1.0] * len(prompts), reference_nll=[2.0] * len(prompts))
    assert report["policy"]["distinct_2_fluent"] == pytest.approx(judges.distinct_n(degenerate, 2))
    assert report["reference"]["distinct_2_fluent"] == pytest.approx(judges.distinct_n(reference, 2))
    verdict = check_targets(report, Targets(max_fluent_distinct_2_change=0.03))
    assert not verdict["checks"]["distinct_2_fluent_change"]["ok"] and not verdict["passed"]
    # unknown KL fails too
    assert not check_targets(compare(prompts, reference, reference, cheerful_reward))["checks"]["kl"]["ok"]


def test_pass_rule_on_hand_made_reports():
    ref = {"tone": 0.30, "relevance": 0.40, "distinct_2": 0.90, "top_3gram_share": 0.10, "kl": 0.0}
    good = {"tone": 0.50, "relevance": 0.39, "distinct_2": 0.88, "top_3gram_share": 0.15, "kl": 6.0}
    assert check_targets({"policy": good, "reference": ref})["passed"]
    for key, value in [("tone", 0.44), ("relevance", 0.37), ("distinct_2", 0.86), ("distinct_2", 0.94),
                       ("top_3gram_share", 0.25), ("kl", 8.5)]:
        bad = dict(good, **{key: value})
        assert not check_targets({"policy": bad, "reference": ref})["passed"], key
    assert check_targets({"policy": dict(good, kl=8.5), "reference": ref}, Targets(max_kl=9.0))["passed"]


def test_evaluate_errors():
    model, tok = load_lm("tiny")
    with pytest.raises(ValueError, match="pass reference="):
        evaluate((model, tok), PROMPTS, reward="tiny", progress=False)
    with pytest.raises(TypeError, match="only with task="):
        evaluate((model, tok), PROMPTS, reference=(model, tok), reward="tiny", limit=3, progress=False)
    with pytest.raises(ValueError, match="one prompt per response"):
        compare(["a"], ["b", "c"], ["d", "e"], "tiny")
    # a reference with another vocabulary: its log-probabilities of the policy's token ids mean nothing
    other = copy.deepcopy(tok)
    other.add_tokens(["<not-in-the-policy>"])
    with pytest.raises(ValueError, match=r"the policy's tokenizer \(\d+ tokens\) is not the reference's \(\d+ tokens\): judge a "
                                         r"policy against its own starting model"):
        evaluate((model, tok), PROMPTS, reference=(model, other), reward="tiny", progress=False)
    evaluate((model, tok), PROMPTS[:1], reference=(copy.deepcopy(model), copy.deepcopy(tok)), reward="tiny",
             max_new_tokens=2, progress=False)  # an equal vocabulary in another object is the same
    assert judges.top_ngram_share(["a b c"])[0] == 1.0



def test_negative_share_rule_is_off_by_default_and_holds_the_share_when_set():
    ref = {"tone": 0.30, "negative_share": 0.20, "relevance": 0.40, "distinct_2": 0.90, "top_3gram_share": 0.10, "kl": 0.0}
    pol = {"tone": 0.29, "negative_share": 0.20, "relevance": 0.45, "distinct_2": 0.89, "top_3gram_share": 0.10, "kl": 3.0}
    default = check_targets({"policy": pol, "reference": ref})
    assert "negative_share_change" not in default["checks"] and not default["checks"]["tone_gain"]["ok"]
    rule = Targets(min_tone_gain=-0.02, max_negative_share_rise=0.0)
    verdict = check_targets({"policy": pol, "reference": ref}, rule)
    assert verdict["passed"] and verdict["checks"]["negative_share_change"]["value"] == pytest.approx(0.0)
    assert not check_targets({"policy": dict(pol, negative_share=0.22), "reference": ref}, rule)["passed"]
    assert not check_targets({"policy": dict(pol, tone=0.27), "reference": ref}, rule)["passed"]


def test_report_columns_carry_the_negative_share():
    prompts = ["a", "b", "c", "d"]
    texts = ["This is terrible.", "good", "fine", "awful and sad"]
    ref = ["good", "good", "good", "good"]
    report = compare(prompts, texts, ref, lambda ps, rs: torch.zeros(len(rs)), kls=[0.0] * 4)
    assert report["policy"]["negative_share"] == pytest.approx(0.5) and report["reference"]["negative_share"] == 0.0
    assert "VADER-negative share" in format_table(report)
