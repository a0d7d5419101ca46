"""Preference data: loading, clear errors, and the shipped default-task files."""

import json
from pathlib import Path

import pytest

from rlhf_env.data import PreferencePair, as_pairs, example_path, load_preferences, save_preferences
from rlhf_env.default_task import ASSETS, TASK_DIR, handwritten_pairs, shipped_samples
from rlhf_env.default_task.prompts import make_prompts, split_prompts, write_prompts


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_example_file_holds_the_design_card_example():
    pairs = load_preferences(example_path())
    assert PreferencePair("什么是数据库？", "数据库是一个有组织的数据集合，允许高效的数据存储、检索和管理。", "数据库用于存储数据。") in pairs
    assert len(pairs) >= 3


def test_round_trip(tmp_path):
    pairs = [PreferencePair("p", "good", "bad"), PreferencePair("q\nline", "ü", '"x"')]
    save_preferences(pairs, tmp_path / "a.jsonl")
    assert load_preferences(tmp_path / "a.jsonl") == pairs


def test_broken_json_line_names_file_and_line(tmp_path):
    ok = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = _write(tmp_path / "broken.jsonl", [ok, '{"prompt": "p", "chosen": ', ok])
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        load_preferences(path)


def test_missing_key_names_key_and_line(tmp_path):
    ok = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = _write(tmp_path / "missing.jsonl", [ok, ok, "", json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl:4: missing key\(s\) \['rejected'\]"):
        load_preferences(path)


def test_wrong_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"t\.jsonl:1: expected a JSON object"):
        load_preferences(_write(tmp_path / "t.jsonl", ["[1, 2, 3]"]))
    with pytest.raises(ValueError, match=r"u\.jsonl:1: field 'chosen' must be a string"):
        load_preferences(_write(tmp_path / "u.jsonl", [json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"})]))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file holds no preference pairs"):
        load_preferences(empty)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preferences(tmp_path / "nope.jsonl")


def test_as_pairs_accepts_dicts_tuples_and_rejects_junk():
    pairs = as_pairs([{"prompt": "a", "chosen": "b", "rejected": "c"}, ("d", "e", "f")])
    assert pairs == [PreferencePair("a", "b", "c"), PreferencePair("d", "e", "f")]
    with pytest.raises(ValueError, match="pair 0"):
        as_pairs([("only", "two")])
    with pytest.raises(ValueError, match="no preference pairs"):
        as_pairs([])


def test_prompt_files_are_the_scripted_split(tmp_path):
    train, test = write_prompts(tmp_path)
    for name, expected in (("prompts_train.txt", train), ("prompts_test.txt", test)):
        shipped = (ASSETS / name).read_text(encoding="utf-8")
        assert shipped == (tmp_path / name).read_text(encoding="utf-8"), f"{name} is stale: run python -m rlhf_env.default_task --prompts-only"
        lines = shipped.splitlines()
        assert lines == expected and all(line.strip() for line in lines)
    assert not set(train) & set(test)
    assert 250 <= len(train) + len(test) == len(make_prompts()) <= 600
    assert split_prompts(make_prompts()) == (train, test)


def _row(response, tone, relevance, nll):
    return {"response": response, "score": tone, "relevance": relevance, "nll": nll}


# the kinds added for default-v6 off, and no cap on judged pairs
_JUDGED_ONLY = {"warm": False, "cold": False, "praise": False, "judged_per_prompt": None}


def _no_relevance(prompts, responses):
    return [0.0] * len(responses)


def test_relabel_keeps_the_pairs_the_judges_agree_on():
    from rlhf_env.default_task.relabel import RelabelConfig, relabel

    samples = {
        "How do I keep basil alive?": [
            _row("Water it when the soil is dry and give it plenty of sun, it will thrive.", 0.8, 0.6, 2.0),  # good
            _row("Basil needs water and light.", 0.0, 0.6, 2.1),  # plainer, as relevant: tone decides
            _row("Wonderful wonderful joy, the stars are lovely tonight!", 0.9, 0.1, 2.2),  # cheerful, off-topic
            _row("Basil basil zq florp water sun happy.", 0.6, 0.45, 6.0),  # garbled: high NLL
            _row("", 0.0, 0.0, 0.0),  # empty: never used
        ],
    }
    # the rule of default-v4/v5: judged pairs and the failure modes, none of the tone-only kinds
    cfg = RelabelConfig(relevance_quantile=0.5, nll_quantile=0.5, failure_chosen=1, **_JUDGED_ONLY)
    pairs = relabel(samples, cfg, relevance_fn=_no_relevance)
    judged = {(r["chosen"][:12], r["rejected"][:12]) for r in pairs if r["kind"] == "judged"}
    # good > plain (tone +0.8, relevance tie, more fluent) and good > garbled (all judges agree);
    # not good > cheerful (tone disagrees), not cheerful > anything (it is not an answer: low relevance),
    # not plain > garbled (tone disagrees), nothing with the empty response
    assert judged == {("Water it whe", "Basil needs "), ("Water it whe", "Basil basil ")}
    kinds = [r["kind"] for r in pairs if r["kind"] != "judged"]
    assert kinds == ["boilerplate", "repetition", "rude"]  # one prompt: no other prompt to take off-topic cheer from
    # with cold=True the best answer (one sentence here) has no warmest sentence to drop: no cold pair
    assert [r["kind"] for r in relabel(samples, RelabelConfig(failure_chosen=1, **{**_JUDGED_ONLY, "cold": True}),
                                       relevance_fn=_no_relevance) if r["kind"] != "judged"] == kinds
    failure = [r for r in pairs if r["kind"] != "judged"]
    assert all(r["chosen"].startswith("Water it") for r in failure)
    boiler, repeated, unfriendly = (r["rejected"] for r in failure)
    assert failure[2]["chosen"] in unfriendly and unfriendly != failure[2]["chosen"]  # the same answer, made rude
    from rlhf_env.default_task.relabel import _CLOSERS, _MIDDLES, _OPENERS

    assert any(boiler.startswith(o) for o in _OPENERS) and any(m in boiler for m in _MIDDLES) and any(boiler.endswith(c) for c in _CLOSERS)
    phrase = repeated.split("!")[0]
    assert repeated.count(phrase) >= 3


def test_relabel_require_tone_keeps_friendlier_answers_that_are_as_relevant():
    from rlhf_env.default_task.relabel import RelabelConfig, relabel

    samples = {
        "How do I keep basil alive?": [
            _row("Water it when the soil is dry and give it plenty of sun, it will thrive.", 0.8, 0.60, 2.00),  # good
            _row("Basil needs water and light.", 0.0, 0.62, 1.90),  # plainer, as relevant (within tolerance)
            _row("Basil dies. Water.", 0.7, 0.20, 2.10),  # friendly enough but much less relevant
            _row("Plants. Sun.", 0.75, 0.30, 2.05),  # less relevant, tone about equal to the good one
            _row("Basil needs water, sun and patience; a sunny window is best, trust me.", 0.2, 0.61, 3.00),  # clumsy
        ],
    }
    tolerant = RelabelConfig(failure_chosen=1, require_tone=True, relevance_tolerance=0.05, nll_tolerance=0.2)
    judged = {(r["chosen"][:12], r["rejected"][:12]) for r in relabel(samples, tolerant, relevance_fn=_no_relevance)
              if r["kind"] == "judged"}
    # good > plain: tone +0.8 and relevance / fluency within tolerance. Not good > "Basil dies"
    # (relevance better by 0.4 but tone only +0.1: the relevance-only pair is dropped), not good >
    # "Plants" (tone tie), not good > clumsy (tone +0.6 but NLL 1.0 worse: beyond tolerance)
    assert judged == {("Water it whe", "Basil needs ")}
    strict = RelabelConfig(failure_chosen=1, require_tone=True, relevance_tolerance=0.0, nll_tolerance=0.0)
    # without tolerance the plainer answer's slightly higher relevance vetoes the pair
    assert not [r for r in relabel(samples, strict, relevance_fn=_no_relevance) if r["kind"] == "judged"]
    # the default rule keeps the relevance-only pairs ("Basil dies", "Plants") instead
    default = {(r["chosen"][:12], r["rejected"][:12]) for r in relabel(samples, RelabelConfig(failure_chosen=1), relevance_fn=_no_relevance)
               if r["kind"] == "judged"}
    assert ("Water it whe", "Basil dies. ") in default and ("Water it whe", "Basil needs ") not in default


def test_cold_drops_the_warmest_sentence_only_when_that_cools_the_answer():
    from rlhf_env.default_task.relabel import cold
    from rlhf_env.judges import tone

    warm = "I'm so glad you asked, this is a lovely question! Water basil when the soil is dry. Give it sun."
    assert cold(warm, tone, 0.3) == "Water basil when the soil is dry. Give it sun."
    assert tone([warm])[0] - tone(["Water basil when the soil is dry. Give it sun."])[0] >= 0.3
    assert cold("Water basil when the soil is dry. Give it sun.", tone, 0.3) is None  # nothing warm to remove
    assert cold("What a lovely, wonderful question, I love it!", tone, 0.3) is None  # one sentence
    assert cold("Great! Water it.", tone, 0.3) is None  # what is left is under four words


def test_relabel_warm_pairs_prefer_the_friendlier_of_equally_good_answers():
    from rlhf_env.default_task.relabel import RelabelConfig, relabel

    samples = {
        "How do I keep basil alive?": [
            _row("What a lovely plant to grow! Water it when the soil is dry and give it sun.", 0.8, 0.62, 2.00),  # warm
            _row("Water it when the soil is dry and keep it in the sun.", 0.0, 0.60, 1.90),  # plain, as good
            _row("Basil needs water when the soil is dry, six hours of sun and its flowers pinched.", 0.1, 0.75, 2.00),
            _row("Basil needs water, sun and patience; a sunny window is best, trust me.", 0.2, 0.61, 3.00),  # clumsy
        ],
    }
    cfg = RelabelConfig(failure_chosen=1, warm=True, relevance_tolerance=0.05, nll_tolerance=0.2, stock_share=1.0)
    pairs = relabel(samples, cfg, relevance_fn=_no_relevance)
    warm = {(r["chosen"][:12], r["rejected"][:12]) for r in pairs if r["kind"] == "warm"}
    # warm > plain: tone +0.8, as relevant, NLL 0.1 worse (within tolerance; the judged rule
    # vetoes it). Not warm > the more relevant answer (0.13 less relevant), not warm > clumsy
    # (already a judged pair: every judge agrees), nothing from the plain answers (not friendlier)
    assert warm == {("What a lovel", "Water it whe")}
    judged = {(r["chosen"][:12], r["rejected"][:12]) for r in pairs if r["kind"] == "judged"}
    assert ("What a lovel", "Basil needs ") in judged and not warm & judged
    # off by default: the pairs are those of warm=False, and the other kinds' draws do not move
    base = relabel(samples, RelabelConfig(failure_chosen=1, warm=False, relevance_tolerance=0.05, nll_tolerance=0.2,
                                          stock_share=1.0), relevance_fn=_no_relevance)
    assert [r for r in pairs if r["kind"] != "warm"] == base
    # at most warm_per_prompt of them
    capped = RelabelConfig(failure_chosen=1, warm=True, relevance_tolerance=0.5, nll_tolerance=2.0, stock_share=1.0)
    assert len([r for r in relabel(samples, capped, relevance_fn=_no_relevance) if r["kind"] == "warm"]) == 2
    capped.warm_per_prompt = 1
    assert len([r for r in relabel(samples, capped, relevance_fn=_no_relevance) if r["kind"] == "warm"]) == 1


def test_relabel_warm_pairs_do_not_reward_a_stock_phrase():
    from rlhf_env.default_task.relabel import RelabelConfig, adds_stock, relabel, stock_ngrams

    texts = ["I'm happy to help! Water it.", "I'm happy to help, sun.", "Water it.", "Sun helps basil."]
    stock = stock_ngrams(texts, 0.4)  # in more than 40%: 2 of 4 texts
    assert stock == {("i'm", "happy", "to"), ("happy", "to", "help")}
    assert adds_stock("I'm happy to help! Water it.", "Water it daily.", stock)
    assert not adds_stock("I'm happy to help! Water it.", "I'm happy to help you.", stock)  # both hold it
    assert not adds_stock("Lovely! Water it.", "Water it daily.", stock)
    samples = {
        "How do I keep basil alive?": [
            _row("I'm happy to help! Water it when the soil is dry.", 0.8, 0.60, 2.0),
            _row("Water it when the soil is dry, it will love that.", 0.7, 0.60, 2.0),
            _row("Water it when the soil is dry.", 0.0, 0.61, 1.9),
        ],
        "How do I fix a squeaky door?": [
            _row("I'm happy to help! Oil the hinges.", 0.8, 0.60, 2.0),
            _row("Oil the hinges.", 0.0, 0.61, 1.9),
        ],
    }
    cfg = RelabelConfig(failure_chosen=1, warm=True, relevance_tolerance=0.05, nll_tolerance=0.2, stock_share=0.3)
    warm = [(r["chosen"][:12], r["rejected"][:12]) for r in relabel(samples, cfg, relevance_fn=_no_relevance) if r["kind"] == "warm"]
    # "I'm happy to help" opens 2 of 5 samples: its answers are never the warm side against one without it
    assert warm == [("Water it whe", "Water it whe")]


def test_relabel_praise_pairs_prefer_the_answer_to_itself_in_canned_praise():
    from rlhf_env.default_task.relabel import _CLOSERS, _OPENERS, RelabelConfig, relabel

    samples = {"How do I keep basil alive?": [_row("Water it when the soil is dry.", 0.0, 0.6, 2.0),
                                              _row("Basil.", 0.0, 0.2, 4.0)]}
    pairs = relabel(samples, RelabelConfig(failure_chosen=1, praise=True), relevance_fn=_no_relevance)
    (row,) = [r for r in pairs if r["kind"] == "praise"]
    assert row["chosen"] == "Water it when the soil is dry." and row["chosen"] in row["rejected"]
    extra = row["rejected"].replace(row["chosen"], "").strip()
    assert extra and (any(extra.startswith(o) for o in _OPENERS) or any(extra.endswith(c) for c in _CLOSERS))
    # the other kinds and their draws are those of praise=False
    no_praise = RelabelConfig(failure_chosen=1, praise=False)
    assert [r for r in pairs if r["kind"] != "praise"] == relabel(samples, no_praise, relevance_fn=_no_relevance)


def test_relabel_adds_off_topic_cheer_only_when_it_is_off_topic():
    from rlhf_env.default_task.relabel import RelabelConfig, relabel

    samples = {
        "p1": [_row("an answer to p1", 0.5, 0.7, 2.0), _row("a worse answer", 0.1, 0.7, 2.5)],
        "p2": [_row("cheer about p2!", 0.9, 0.6, 2.0), _row("meh", 0.0, 0.6, 2.5)],
    }
    cfg = RelabelConfig(failure_chosen=1)
    off = [r for r in relabel(samples, cfg, relevance_fn=lambda ps, rs: [0.2] * len(rs)) if r["kind"] == "off_topic"]
    assert [(r["prompt"], r["chosen"]) for r in off] == [("p1", "an answer to p1"), ("p2", "cheer about p2!")]
    assert off[0]["rejected"].endswith("cheer about p2!") and off[1]["rejected"].endswith("an answer to p1")
    # the candidate is as relevant to this prompt as the chosen answer: no off-topic pair
    assert not [r for r in relabel(samples, cfg, relevance_fn=lambda ps, rs: [0.65] * len(rs)) if r["kind"] == "off_topic"]
    # the same seed gives the same pairs
    assert relabel(samples, cfg, seed=3, relevance_fn=_no_relevance) == relabel(samples, cfg, seed=3, relevance_fn=_no_relevance)


def test_overused_ngrams_are_the_policys_own_phrases_across_prompts():
    from rlhf_env.default_task.relabel import holds_overused, overused_ngrams

    policy = {"How do I fix a squeaky door?": ["Glad you asked! Oil a squeaky door hinge."],
              "Is a squeaky door dangerous?": ["Glad you asked! A squeaky door is harmless."],
              "What should I cook?": ["Glad you asked! Try pasta, the soil is fine.", "Glad you asked again."]}
    others = ["Oil the hinge.", "Try pasta tonight.", "Glad you asked! Try rice.", "the soil is dry", "the soil is wet",
              "A squeaky door is loud.", "Soup.", "Rice."]
    # "glad you asked" is in the answers to 3 of 3 prompts (once per prompt, though twice for the last)
    # and in 1 of 8 other samples: 1.0 >= 3 x 0.125. "a squeaky door" is in two prompts' answers but both
    # prompts hold it; "the soil is" answers one prompt only
    assert overused_ngrams(policy, others, 0.5, 3.0) == {("glad", "you", "asked")}
    assert overused_ngrams(policy, others, 0.5, 9.0) == set()  # the starting model writes it too often for that ratio
    # "the soil is": 1 of 3 prompts, but 2 of 8 other samples (ratio 1.3): both write it, not over-used
    assert ("the", "soil", "is") not in overused_ngrams(policy, others, 0.2, 3.0)
    assert ("the", "soil", "is") in overused_ngrams(policy, others, 0.2, 1.0)
    assert ("a", "squeaky", "door") not in overused_ngrams(policy, others, 0.2, 1.0)
    stock = {("glad", "you", "asked"), ("a", "squeaky", "door")}
    assert holds_overused("What should I cook?", "Glad you asked! Pasta.", stock)
    assert not holds_overused("Is a squeaky door dangerous?", "A squeaky door is harmless.", stock)  # the prompt's words
    assert not holds_overused("What should I cook?", "Pasta.", stock)


def _policy_row(response, tone, relevance, nll):
    return {**_row(response, tone, relevance, nll), "policy": "RLOO lr 0.0001 seed 0 (hand-made)"}


def test_relabel_overused_pairs_reject_the_policys_stock_opener():
    from rlhf_env.default_task.relabel import RelabelConfig, relabel

    glad = "I'm glad to hear that"
    samples = {
        "How do I keep basil alive?": [
            _policy_row(f"{glad} you love basil! Water it when the soil is dry.", 0.8, 0.60, 2.0),  # stock opener
            _row("Basil loves sun; water it when the soil is dry and it will thrive.", 0.75, 0.62, 2.2),  # as good
            _row("Water it when the soil is dry.", 0.0, 0.60, 2.0),  # plain: far less friendly
            _row("Lovely stars are out tonight, what a joy!", 0.9, 0.10, 2.1),  # cheerful, off-topic
            _row("Basil basil wonderful water sun sun happy plant.", 0.7, 0.60, 4.0),  # garbled: far less fluent
        ],
        "How do I fix a squeaky door?": [
            _policy_row(f"{glad} your door matters! Oil the hinges.", 0.7, 0.60, 2.0),
            _row("Oil the hinges and the squeak will be gone, happily.", 0.6, 0.60, 2.1),
        ],
        "What should I cook tonight?": [
            _policy_row(f"{glad} you want to cook! Try pasta.", 0.7, 0.60, 2.0),
            _policy_row("A warm soup is a lovely pick for a cold night.", 0.7, 0.60, 2.0),  # the policy, no stock phrase
            _row("Pasta is quick.", 0.0, 0.50, 2.5),
        ],
    }
    # every sample answers its prompt (no quantile floor): the judges alone decide
    cfg = RelabelConfig(relevance_quantile=0.0, nll_quantile=1.0, overused_share=0.5, overused_ratio=3.0, stock_share=1.0,
                        policy_samples=True)
    pairs = relabel(samples, cfg, relevance_fn=_no_relevance)
    overused = {(r["chosen"][:12], r["rejected"][:12]) for r in pairs if r["kind"] == "overused"}
    # "i'm glad to" / "glad to hear" / "to hear that" open the policy's answers to 3 of 3 prompts and
    # no starting-model sample: each such answer is rejected for an as-good answer without it; not for
    # the plain one (0.8 less friendly), the off-topic one (0.5 less relevant), the garbled one (NLL +2)
    assert overused == {("Basil loves ", "I'm glad to "), ("Oil the hing", "I'm glad to "), ("A warm soup ", "I'm glad to ")}
    # an answer built on the opener is never a chosen side, of any kind
    assert pairs and not [r for r in pairs if r["chosen"].startswith(glad)]
    # at most overused_per_prompt per prompt
    lenient = RelabelConfig(relevance_quantile=0.0, nll_quantile=1.0, overused_share=0.5, stock_share=1.0, policy_samples=True,
                            overused_tone_tolerance=1.0, relevance_tolerance=1.0, nll_tolerance=5.0, overused_per_prompt=1)
    per_prompt = [r["prompt"] for r in relabel(samples, lenient, relevance_fn=_no_relevance) if r["kind"] == "overused"]
    assert sorted(per_prompt) == sorted(samples)
    # policy_samples=False (the default): the policy's answers are left out, none is over-used
    off = relabel(samples, RelabelConfig(**{**cfg.__dict__, "policy_samples": False}), relevance_fn=_no_relevance)
    assert off and not [r for r in off if r["kind"] == "overused" or r["rejected"].startswith(glad) or r["chosen"].startswith("A warm soup")]
    # without policy samples (no row records a policy) nothing is over-used: the pairs of overused=False
    plain = {p: [{k: v for k, v in r.items() if k != "policy"} for r in rows] for p, rows in samples.items()}
    assert relabel(plain, cfg, relevance_fn=_no_relevance) == relabel(
        plain, RelabelConfig(**{**cfg.__dict__, "overused": False}), relevance_fn=_no_relevance)
    assert not [r for r in relabel(plain, cfg, relevance_fn=_no_relevance) if r["kind"] == "overused"]


def test_stock_swap_swaps_the_warmest_sentence_for_a_stock_one_that_is_no_friendlier():
    import random

    from rlhf_env.default_task.relabel import stock_swap
    from rlhf_env.judges import tone

    answer = "Water it when the soil is dry. What a wonderful, lovely plant to grow! Give it sun."
    stock = ["I'm glad to hear that you asked."]
    same = lambda prompts, responses: [0.5] * len(responses)  # noqa: E731  relevance: a tie
    swapped = stock_swap("How do I keep basil alive?", answer, stock, tone, same, random.Random(0))
    assert swapped == "Water it when the soil is dry. I'm glad to hear that you asked. Give it sun."
    assert tone([swapped])[0] <= tone([answer])[0]  # the rejected side is no friendlier
    # a stock sentence warmer than the warmest one would make the rejected side friendlier: none
    assert stock_swap("q", "Water it when the soil is dry. Give it sun.", ["I'm so glad, this is wonderful and amazing!"],
                      tone, same, random.Random(0)) is None
    assert stock_swap("q", "What a wonderful, lovely plant to grow!", stock, tone, same, random.Random(0)) is None  # one sentence
    # a stock sentence that makes the answer less relevant would teach relevance, not the phrase: none
    drop = lambda prompts, responses: [0.6] + [0.4] * (len(responses) - 1)  # noqa: E731
    assert stock_swap("q", answer, stock, tone, drop, random.Random(0)) is None


def test_repetition_by_hand():
    from rlhf_env.default_task.relabel import repetition

    assert repetition("a b c a b c") == pytest.approx(1 - 3 / 4)  # 3-grams abc bca cab abc: 3 distinct of 4
    assert repetition("one two three four") == 0.0 and repetition("hi") == 0.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_pairs_follow_the_judges(split):
    from rlhf_env.default_task.relabel import RelabelConfig, adds_stock, agree, friendlier, repetition, stock_ngrams

    rows = [json.loads(line) for line in (TASK_DIR / f"pairs_{split}.jsonl").read_text(encoding="utf-8").split("\n") if line]
    prompts = set((ASSETS / f"prompts_{split}.txt").read_text(encoding="utf-8").splitlines())
    samples = shipped_samples(split)
    # 8 samples per prompt in the env's context, 2 in the friendly round (its system message recorded),
    # 2 from trained policies (the online round r3, each recording its policy)
    assert all(len(v) == 12 and sum(bool(r.get("system")) for r in v) == 2 and sum(bool(r.get("policy")) for r in v) == 2
               for v in samples.values()) and set(samples) == prompts
    judged = {(p, r["response"]): {"tone": r["score"], "relevance": r["relevance"], "nll": r["nll"],
                                   "repetition": repetition(r["response"])} for p, rs in samples.items() for r in rs}
    kinds = {r["kind"] for r in rows}
    # the default rule leaves the policy round out: default-v6's pairs
    assert kinds == {"judged", "warm", "boilerplate", "repetition", "off_topic", "rude", "praise", "cold"}
    assert len(rows) >= (1000 if split == "train" else 200) and all(r["prompt"] in prompts for r in rows)
    cfg = RelabelConfig()
    stock = stock_ngrams([r["response"] for rs in samples.values() for r in rs if not r.get("policy")], cfg.stock_share)
    policy = {(p, r["response"]) for p, rs in samples.items() for r in rs if r.get("policy")}
    per_prompt = {}
    for r in rows:
        assert (r["prompt"], r["chosen"]) in judged  # the chosen side is always a real answer
        assert (r["prompt"], r["chosen"]) not in policy and (r["prompt"], r["rejected"]) not in policy
        if r["kind"] == "judged":
            assert agree(judged[(r["prompt"], r["chosen"])], judged[(r["prompt"], r["rejected"])], cfg)
            per_prompt[r["prompt"]] = per_prompt.get(r["prompt"], 0) + 1
        elif r["kind"] == "warm":
            assert friendlier(judged[(r["prompt"], r["chosen"])], judged[(r["prompt"], r["rejected"])], cfg)
        if r["kind"] in ("warm", "cold"):
            assert not adds_stock(r["chosen"], r["rejected"], stock)
        if r["kind"] in ("rude", "praise"):
            assert r["chosen"] in r["rejected"]  # the same answer, only its wrapping differs
    assert max(per_prompt.values()) <= cfg.judged_per_prompt


def test_policy_round_pairs_reject_the_phrases_the_policy_over_uses():
    """The default-v7 candidate's rule (policy_samples=True) on the held-out split's samples."""
    from rlhf_env.default_task.relabel import RelabelConfig, build_pairs, holds_overused, policy_overused

    cfg = RelabelConfig(policy_samples=True)
    overused = policy_overused({**shipped_samples("train"), **shipped_samples("test")}, cfg)
    # the stock openers of the two RLOO policies on default-v6 ("i'm glad to", "here's a simple", ...)
    assert {("i'm", "glad", "to"), ("glad", "to", "hear"), ("here's", "a", "simple"), ("a", "simple", "way")} <= overused
    pairs, stats = build_pairs("test", cfg=cfg)
    assert stats["overused"] >= 10 and stats["stock_swap"] >= 10
    samples = shipped_samples("test")
    policy = {(p, r["response"]) for p, rs in samples.items() for r in rs if r.get("policy")}
    answers = {(p, r["response"]) for p, rs in samples.items() for r in rs}
    for r in pairs:
        assert (r["prompt"], r["chosen"]) in answers and not holds_overused(r["prompt"], r["chosen"], overused)
        if r["kind"] == "overused":
            assert (r["prompt"], r["rejected"]) in policy and holds_overused(r["prompt"], r["rejected"], overused)
        if r["kind"] == "stock_swap":
            assert holds_overused(r["prompt"], r["rejected"], overused) and r["rejected"] != r["chosen"]


def test_shipped_pairs_are_rebuilt_from_shipped_samples():
    from rlhf_env.default_task.relabel import build_pairs

    for split in ("train", "test"):
        pairs, _ = build_pairs(split)
        shipped = [json.loads(line) for line in (TASK_DIR / f"pairs_{split}.jsonl").read_text(encoding="utf-8").split("\n") if line]
        assert pairs == shipped, f"pairs_{split}.jsonl is stale: run python -m rlhf_env.default_task"


def test_handwritten_pairs_use_new_prompts():
    pairs = load_preferences(ASSETS / "task" / "handwritten.jsonl")
    assert len(pairs) >= 60
    assert all(len(handwritten_pairs(kind)) >= 16 for kind in ("tone", "relevance", "correctness"))
    known = set(make_prompts())
    assert not any(p.prompt in known for p in pairs)


# --- TRL's formats ------------------------------------------------------------------------
def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


TRL_RECORDS = {
    "conversational": {"prompt": [_user("What is 2+2?")], "chosen": [_assistant("4")], "rejected": [_assistant("5")]},
    "implicit conversation": {"chosen": [_user("What is 2+2?"), _assistant("4")],
                              "rejected": [_user("What is 2+2?"), _assistant("5")]},
    "implicit text": {"chosen": "What is 2+2? 4", "rejected": "What is 2+2? 5"},
}


@pytest.mark.parametrize("name", list(TRL_RECORDS))
def test_trl_preference_formats_read_as_the_flat_pair(tmp_path, name):
    path = _write(tmp_path / "trl.jsonl", [json.dumps(TRL_RECORDS[name])] * 2)
    expected = PreferencePair("What is 2+2?", "4", "5") if name != "implicit text" else PreferencePair("What is 2+2?", " 4", " 5")
    assert load_preferences(path) == [expected, expected]
    assert as_pairs([TRL_RECORDS[name]]) == [expected]


def test_a_system_message_keeps_the_prompt_as_messages(tmp_path):
    record = {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")], "chosen": [_assistant("Hello")],
              "rejected": [_assistant("Go away")]}
    (pair,) = load_preferences(_write(tmp_path / "sys.jsonl", [json.dumps(record)]))
    assert pair.prompt == ({"role": "system", "content": "Be brief."}, _user("Hi")) and pair.chosen == "Hello"
    assert len({pair.prompt: 1}) == 1  # hashable: trainers group pairs by prompt
    save_preferences([pair], tmp_path / "out.jsonl")
    assert load_preferences(tmp_path / "out.jsonl") == [pair]


def test_a_datasets_dataset_is_accepted():
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list([TRL_RECORDS["conversational"], TRL_RECORDS["conversational"]])
    assert load_preferences(ds) == [PreferencePair("What is 2+2?", "4", "5")] * 2
    with pytest.raises(ValueError, match=r"pass one split, e\.g\. data\['train'\]"):
        as_pairs(DatasetDict(train=ds))


@pytest.mark.parametrize(
    "record,match",
    [
        ({"prompt": [_user("q")], "chosen": [_user("x")], "rejected": [_assistant("y")]}, r"bad\.jsonl:2: 'chosen' must be ONE assistant message"),
        ({"chosen": [_user("a"), _assistant("x")], "rejected": [_user("b"), _assistant("y")]}, r"bad\.jsonl:2: .* must share the prompt"),
        ({"chosen": "abc", "rejected": "xyz"}, r"bad\.jsonl:2: no 'prompt', and 'chosen' and 'rejected' share no beginning"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"bad\.jsonl:2: message 0 must be"),
        ({"chosen": [_assistant("x")], "rejected": [_assistant("y")]}, r"bad\.jsonl:2: without 'prompt', 'chosen' must be a conversation"),
    ],
)
def test_malformed_trl_records_name_file_and_line(tmp_path, record, match):
    ok = json.dumps(TRL_RECORDS["conversational"])
    with pytest.raises(ValueError, match=match):
        load_preferences(_write(tmp_path / "bad.jsonl", [ok, json.dumps(record)]))


def test_sft_reads_trl_formats(tmp_path):
    from datasets import Dataset

    from rlhf_env.sft import load_sft_examples

    records = [
        {"prompt": "What is 2+2?", "completion": "4"},
        {"prompt": [_user("What is 2+2?")], "completion": [_assistant("4")]},
        {"messages": [_user("What is 2+2?"), _assistant("4")]},
        {"prompt": "What is 2+2?", "response": "4"},
        TRL_RECORDS["conversational"],
    ]
    path = _write(tmp_path / "sft.jsonl", [json.dumps(r) for r in records])
    assert load_sft_examples(path) == [("What is 2+2?", "4")] * 5
    assert load_sft_examples(Dataset.from_list(records[2:3])) == [("What is 2+2?", "4")]
    bad = _write(tmp_path / "bad_sft.jsonl", [json.dumps(records[0]), json.dumps({"messages": [_user("only a question")]})])
    with pytest.raises(ValueError, match=r"bad_sft\.jsonl:2: without 'prompt', 'messages' must be a conversation"):
        load_sft_examples(bad)


def test_a_json_array_file_reads_like_json_lines(tmp_path):
    """A .json file holding one array of objects (what load_dataset("json") also reads) gives
    the same records as JSON Lines, for preferences, prompts and rows; errors name the item."""
    import json

    from rlhf_env.prompts import load_prompts, load_rows

    pairs = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs, indent=2))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert load_preferences(tmp_path / "pairs.json") == load_preferences(tmp_path / "pairs.jsonl")
    assert load_prompts(tmp_path / "pairs.json") == ["a", "d"]
    assert load_rows(tmp_path / "pairs.json") == pairs
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "a"}, {"question": "b"}]))
    with pytest.raises(ValueError, match=r"bad.json\[1\]: the row has no \"prompt\" key"):
        load_rows(tmp_path / "bad.json")
    # a JSON Lines file whose lines are arrays is still read line by line and refused there
    (tmp_path / "lists.jsonl").write_text('[1, 2]\n[3]\n')
    with pytest.raises(ValueError, match=r"lists.jsonl:1"):
        load_rows(tmp_path / "lists.jsonl")


def test_builder_refuses_a_policy_round_it_cannot_sample(tmp_path, capsys):
    """``python -m rlhf_env.default_task --policy DIR`` says in one line what is wrong
    (no --round; a folder that does not exist) before it writes anything."""
    from rlhf_env.default_task.build import main

    for argv, message in ((["--policy", str(tmp_path)], "give --round R too"),
                          (["--round", "9", "--policy", str(tmp_path / "missing")], "no such directory")):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--out-dir", str(tmp_path / "out")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ranked_pairs_follow_the_combined_z_score_on_a_hand_made_set():
    """ranked_pairs: z(rm) + w z(tone) over a prompt's samples; each of the 2 best against every
    sample lower by the gap; never a repetitive chosen side or one holding an avoided phrase."""
    import random

    from rlhf_env.default_task.relabel import RelabelConfig, ranked_pairs, repetition

    def row(text, rm, tone, policy=False):
        return {"response": text, "rm": rm, "tone": tone, "repetition": repetition(text), "policy": policy}

    # z(rm) over the five starting-model rows (mean 0.2, std 0.748) + z(tone) (mean 0.36, std 0.525)
    rows = [row("A warm and useful answer about basil care.", 1.0, 0.9),     # 1.069 + 1.029 = 2.098 (best)
            row("A plain useful answer about basil.", 1.0, 0.0),             # 1.069 - 0.686 = 0.383
            row("An answer of middling use.", 0.0, 0.45),                    # -0.267 + 0.171 = -0.096
            row("A cold, useless answer.", -1.0, -0.45),                     # -1.604 - 1.543 = -3.147
            row("I'm glad to say nothing much.", 0.0, 0.9),                  # -0.267 + 1.029 = 0.762 (second)
            row("A policy answer, left out.", 5.0, 1.0, policy=True)]
    cfg = RelabelConfig(ranked_gap=1.5, ranked_per_prompt=10)
    got = set(ranked_pairs("basil?", rows, cfg, set(), set(), random.Random(0)))
    best, second = rows[0]["response"], rows[4]["response"]
    # best beats plain, middling and cold by >= 1.5; the second beats only cold (middling is 0.86 below it)
    assert got == {(best, rows[1]["response"]), (best, rows[2]["response"]), (best, rows[3]["response"]), (second, rows[3]["response"])}
    # an avoided phrase keeps "I'm glad to ..." off the chosen side; the cap draws from the candidates
    avoided = set(ranked_pairs("basil?", rows, cfg, set(), {("i'm", "glad", "to")}, random.Random(0)))
    assert avoided == got - {(second, rows[3]["response"])}
    capped = ranked_pairs("basil?", rows, RelabelConfig(ranked_gap=1.5, ranked_per_prompt=2), set(), set(), random.Random(0))
    assert len(capped) == 2 and set(capped) <= got
    # tone weighed 0: the reward model's order alone (plain ties the warm answer; only cold is 1.5 below them)
    plain = set(ranked_pairs("basil?", rows, RelabelConfig(ranked_tone_weight=0.0, ranked_gap=1.5, ranked_per_prompt=10),
                             set(), set(), random.Random(0)))
    assert plain == {(best, rows[3]["response"]), (rows[1]["response"], rows[3]["response"])}
    # a sample without its reward-model score: no ranked pairs for the prompt
    assert ranked_pairs("basil?", rows[:4] + [{**rows[4], "rm": None}], cfg, set(), set(), random.Random(0)) == []


def test_shipped_ranked_pairs_are_rebuilt_from_the_shipped_scores():
    """The shipped samples carry default-v6's score (rm): the ranked pairs come from them, the
    other kinds stay exactly the shipped pairs, and no chosen side holds the online round's
    over-used phrases."""
    from rlhf_env.default_task.relabel import RelabelConfig, build_pairs, holds_overused, policy_overused

    samples = shipped_samples("test")
    assert all(isinstance(r.get("rm"), float) for rs in samples.values() for r in rs if not r.get("policy"))
    pairs, stats = build_pairs("test", cfg=RelabelConfig(ranked=True))
    shipped = [json.loads(line) for line in (TASK_DIR / "pairs_test.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert [r for r in pairs if r["kind"] != "ranked"] == shipped and stats["ranked"] >= 150
    overused = policy_overused({**shipped_samples("train"), **samples}, RelabelConfig())
    assert not any(holds_overused(r["prompt"], r["chosen"], overused) for r in pairs if r["kind"] == "ranked")


def test_rank_samples_scores_the_starting_models_rows_once(tmp_path, monkeypatch):
    import torch

    from rlhf_env.default_task import build

    rows = [{"prompt": "p", "response": "one two", "score": 0.1}, {"prompt": "p", "response": "three", "score": 0.2},
            {"prompt": "p", "response": "policy", "score": 0.3, "policy": "rloo"}]
    build.write_jsonl(tmp_path / "samples_train.jsonl", rows)
    build.write_jsonl(tmp_path / "samples_test.jsonl", rows[:1])
    calls = []

    class Words:
        def score(self, prompts, responses):
            calls.append(len(responses))
            return torch.tensor([float(len(r.split())) for r in responses])

    monkeypatch.setattr(build, "ranking_model", lambda device: Words())
    assert build.rank_samples(tmp_path) == {"samples_train.jsonl": 2, "samples_test.jsonl": 1}
    got = build.read_jsonl(tmp_path / "samples_train.jsonl")
    assert [r.get("rm") for r in got] == [2.0, 1.0, None] and got[2]["policy"] == "rloo"
    assert build.rank_samples(tmp_path) == {} and calls == [2, 1]  # scored rows are not scored again
    assert build.rank_samples(tmp_path, force=True) == {"samples_train.jsonl": 2, "samples_test.jsonl": 1}
    partly = build.read_jsonl(tmp_path / "samples_train.jsonl")
    del partly[1]["rm"]
    build.write_jsonl(tmp_path / "samples_train.jsonl", partly)
    assert build.rank_samples(tmp_path) == {"samples_train.jsonl": 1} and calls[-1] == 1  # only the row without one
    assert [r.get("rm") for r in build.read_jsonl(tmp_path / "samples_train.jsonl")] == [2.0, 1.0, None]
