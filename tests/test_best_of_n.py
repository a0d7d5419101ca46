"""rlhf_env.best_of_n: the reward's pick among the policy's own answers."""

from __future__ import annotations

import math

import pytest

from rlhf_env.best_of_n import BestOfN, best_of_n, kl_bound, select
from rlhf_env.generation import Completions, generate
from rlhf_env.models import load_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_lm(tiny_lm_dir)


def n_vowels(prompts, responses):
    """A reward the tiny model's answers differ on: the vowels in the answer."""
    return [float(sum(c in "aeiou" for c in r)) for r in responses]


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bound(8) == pytest.approx(math.log(8) - 7 / 8)
    with pytest.raises(ValueError, match="n must be >= 1"):
        kl_bound(0)


def test_select_keeps_the_best_of_each_slot_first_on_ties():
    c = Completions(texts=[["a", "b", "c", "d"], ["e", "f", "g", "h"]], num_tokens=[[1, 2, 3, 4], [5, 6, 7, 8]],
                    finished=[[True] * 4, [False] * 4], token_ids=[[[1], [2], [3], [4]], [[5], [6], [7], [8]]])
    kept = select(c, [[0.0, 2.0, 5.0, 5.0], [3.0, 1.0, 0.0, 0.5]], n=2)
    assert kept.texts == [["b", "c"], ["e", "h"]]
    assert kept.num_tokens == [[2, 3], [5, 8]] and kept.token_ids == [[[2], [3]], [[5], [8]]]
    assert kept.logprobs is None
    with pytest.raises(ValueError, match="not slots of n=3"):
        select(c, [[0.0] * 4, [0.0] * 4], n=3)


def test_best_of_n_picks_the_highest_reward_among_its_own_draws(lm, tiny_prompts):
    model, tok = lm
    out = best_of_n((model, tok), tiny_prompts, n_vowels, n=4, num_samples=2, max_new_tokens=12, seed=3,
                    progress=False, logprobs=True)
    assert isinstance(out, BestOfN) and out.kl_bound == pytest.approx(kl_bound(4))
    # the draws are plain sampling with the same seed
    plain = generate(model, tok, tiny_prompts, num_samples=8, max_new_tokens=12, seed=3, progress=False)
    assert out.candidates.texts == plain.texts
    gained = 0.0
    for i in range(len(tiny_prompts)):
        for j in range(2):
            slot = out.candidate_scores[i][j]
            assert slot == n_vowels(None, out.candidates.texts[i][4 * j : 4 * j + 4])
            assert out.scores[i][j] == max(slot)
            assert n_vowels(None, [out.chosen.texts[i][j]]) == [max(slot)]
            assert len(out.chosen.logprobs[i][j]) == out.chosen.num_tokens[i][j]
            gained += max(slot) - sum(slot) / 4
    assert gained > 0  # the answers differ, so picking the best beats the average draw


def test_best_of_one_is_plain_sampling(lm, tiny_prompts):
    model, tok = lm
    out = best_of_n(model, tiny_prompts, n_vowels, tokenizer=tok, n=1, max_new_tokens=8, seed=5, progress=False)
    assert out.chosen.texts == generate(model, tok, tiny_prompts, max_new_tokens=8, seed=5, progress=False).texts
    assert out.kl_bound == 0.0


def test_best_of_n_bad_arguments(lm):
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n(lm, ["hi"], n_vowels, n=0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        best_of_n(lm, ["hi"], n_vowels, num_samples=0)


def test_benchmark_keeps_the_best_of_the_first_n_of_each_slot():
    """benchmarks/best_of_n.py judges best-of-1, 2, 4 ... from one pool: the first n of each slot."""
    import numpy as np

    from benchmarks.best_of_n import best_of_first

    c = Completions(texts=[["a", "b", "c", "d", "e", "f"]], num_tokens=[[1] * 6], finished=[[True] * 6],
                    token_ids=[[[k] for k in range(6)]])
    key = np.array([[[0.0, 1.0, 9.0], [5.0, 2.0, 7.0]]])  # 1 prompt, 2 slots of 3
    assert best_of_first(c, key, 1).texts == [["a", "d"]]
    assert best_of_first(c, key, 2).texts == [["b", "d"]]
    assert best_of_first(c, key, 3).texts == [["c", "f"]]
    assert key[0, 0, 2] == 9.0  # the key is left as it was
