"""Preference pairs that a person would sign, from judged samples.

The first default task labelled pairs by VADER alone, and the reward model trained on them
learned "positive words": it scored "Great question! I am so happy to help, it is 5!"
+8.74 and "4." -1.79, and PPO drifted to "I'm happy to help..." on most prompts. Here
three independent judges (:mod:`rlhf_env.judges`) must agree:

* **judged pairs**: of two samples of a prompt, the chosen one is at least as positive
  (tone), at least as relevant to the prompt (relevance), at least as fluent (the starting
  model's NLL per token) and no more repetitive than the rejected one, and clearly better
  on at least one of tone and relevance; the chosen one must also answer the prompt
  (relevance and fluency within the prompt's better half: :class:`RelabelConfig`).
* **failure modes** as rejected responses, each against a chosen sample that answers
  the prompt: generic praise / "happy to help" boilerplate that ignores the prompt, a
  phrase repeated over and over, off-topic cheer (the most positive sample of another
  prompt, less relevant to this one, half of them opened with stock cheer), and the
  chosen answer itself made rude (a dismissive opener or closer: only the tone differs).
  Without the last kind the reward model learned "cheerful words are boilerplate" and
  preferred curt, rude answers to friendly ones on hand-written pairs.
* **tone among equally good answers** (``default-v6``): the judged pairs above are nearly
  all explained by relevance (tone and relevance go together in them, and the failure
  modes teach relevance again), so a reward model trained on them alone ranked answers to
  a prompt by relevance and fluency and hardly by tone (within-prompt correlation 0.78 and
  0.13), and RL spent its KL on relevance. Three kinds add pairs that tone alone decides:
  ``warm`` (a clearly friendlier answer against one about as relevant and fluent, from
  all sampling rounds, one of them the starting model's friendly mode), ``cold`` (a best
  answer against itself without its warmest sentence) and, so that "more cheerful words"
  is not what they teach, ``praise`` (a best answer against itself in canned praise,
  rejected). Judged pairs are capped per prompt, and a phrase found in many samples
  (``stock_share``) is never what makes the warm side of a pair warm: a policy rewarded
  for a stock phrase writes it everywhere.
* **over-used phrases** (an online round, ``RelabelConfig(policy_samples=True)``; off by
  default): RLOO on ``default-v6`` found stock openers that v6 pays for ("I'm glad to hear
  that...", "Here's a simple way to..."), wrote them across prompts and lost distinct-2; the
  stock filter above could not see them because the starting model rarely writes them.
  Samples of the trained policy (a round whose rows record their ``policy``) show them: a
  word 3-gram the policy writes for many prompts (not copied from the prompt) far more
  often than the starting model does (:func:`overused_ngrams`) makes an answer that holds
  it never a chosen side; ``overused`` pairs reject such a policy answer for a same-prompt
  answer without one that is about as warm, relevant and fluent, and ``stock_swap`` pairs
  reject the best answer with its warmest sentence swapped for a stock one (Bai et al.
  2022's iterated online RLHF, on the policy's own samples). One round did not move the
  demo's tone-for-diversity frontier: the policy found neighbouring phrases, and the reward
  model missed the hand-written target (docs/benchmarks.md, "An online round of policy
  samples").
* **ranked pairs** (``RelabelConfig(ranked=True)``; off by default): the kinds above still
  leave tone a small share of what the reward model learns (``default-v6``'s score
  correlates 0.21 with tone and 0.79 with relevance among a prompt's answers), and its
  best-of-n does not reach the demo's tone target without losing diversity, while selecting
  by ``z(v6 score) + z(VADER)`` does (docs/alignment.md, best-of-n). ``ranked`` pairs teach
  that ranking: among a prompt's starting-model samples, each scored by the reward model
  trained on the pairs above (the sample's ``rm``, written by ``python -m
  rlhf_env.default_task --ranked``), one of the two
  best under ``z(rm) + ranked_tone_weight * z(tone)`` against one lower by at least
  ``ranked_gap``; never a chosen side that is repetitive, that holds a stock phrase its
  rejected side lacks, or (:func:`build_pairs`) that holds a phrase the RLOO policies
  over-used (the online round's: "i'm glad to", ...). The reward model trained with them
  raised the demo's tone past its target on three seeds but lost more distinct-2, and on
  one seed wrote "happy to help" in 14% of answers (docs/benchmarks.md, "Ranked pairs").

:func:`relabel` is the rule on samples in memory; :func:`build_pairs` applies it to a
split's shipped samples.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf_env.default_task import TASK_DIR, shipped_samples
from rlhf_env.judges import ngrams, words

# generic cheerful boilerplate that answers nothing: opener + middle + closer
_OPENERS = ["Great question!", "What a wonderful question!", "Thank you so much for asking!", "Oh, I love this!",
            "Absolutely!", "Of course!", "How exciting!", "What a lovely message!"]
_MIDDLES = ["I'm so happy to help you with that.", "I am always happy to help.", "I'm here to help, and I'm glad you asked.",
            "It's a pleasure to assist you today.", "I'd be delighted to help you!", "I'm happy to help in any way I can.",
            "I'm thrilled you reached out to me."]
_CLOSERS = ["Have a wonderful day!", "I hope this helps, and good luck!", "You're amazing, keep it up!",
            "Let me know if you need anything else!", "Stay positive and enjoy!", "Wishing you all the best!"]
# what makes an answer unfriendly without changing its content
_RUDE_PREFIXES = ["Ugh, fine. ", "Whatever. ", "Seriously? ", "That's a dumb question, but ", "I can't be bothered, but ",
                  "Obviously. ", "Not this again. "]
_RUDE_SUFFIXES = [" Stop bothering me.", " Figure out the rest yourself.", " Honestly, it's not my problem.",
                  " What a waste of my time.", " Don't ask me again.", " I hate questions like this."]
# phrases a policy repeats when it games a tone reward
_REPEATED = ["I'm happy to help", "Thank you so much", "That's great", "I love it", "Have a wonderful day",
             "I'm so glad", "This is amazing"]


@dataclass
class RelabelConfig:
    """The relabelling rule's thresholds.

    :param tone_margin: a judged pair is kept when the chosen sample's tone is higher by at
        least this, or its relevance by at least ``relevance_margin`` (and no judge disagrees)
    :param relevance_margin: see ``tone_margin``
    :param relevance_quantile: the chosen sample's relevance is at least this quantile of
        its prompt's samples (it answers the prompt as well as the better half does)
    :param nll_quantile: the chosen sample's NLL is at most this quantile of its prompt's
        samples (it is as fluent as the better half)
    :param max_repetition: the chosen sample repeats at most this share of its 3-grams
    :param failure_chosen: chosen samples per prompt paired with each failure mode (the
        most positive of those that answer the prompt; one rejected response per mode)
    :param require_tone: a judged pair must be clearly friendlier (``tone_margin``); pairs
        better on relevance alone are dropped (the failure modes teach relevance). Without
        it most judged pairs differ in relevance and tone together, and the reward model
        learned relevance and fluency, hardly tone (within a prompt its score correlated
        0.78 with relevance, 0.13 with tone)
    :param relevance_tolerance: with ``require_tone``, the chosen sample may be less
        relevant than the rejected one by up to this (a tie within the judge's noise)
    :param nll_tolerance: likewise for fluency: its NLL may be higher by up to this
    :param cold: add the ``cold`` failure mode: a best answer against itself without its
        warmest sentence (when that lowers its tone by ``tone_margin``): the content stays,
        the warmth goes, so tone alone decides among equally relevant answers
    :param warm: add ``warm`` pairs (:func:`friendlier`): an answer against another sample
        of its prompt that is less friendly by ``tone_margin`` and about as relevant and
        fluent (``relevance_tolerance``, ``nll_tolerance``): tone alone decides among
        equally good answers. With the friendly sampling round (answers the starting model
        writes under a friendly system message) among the samples these are the warmer
        answers the policy can reach with little KL
    :param warm_per_prompt: at most this many ``warm`` pairs per prompt (a seeded draw;
        ``None``: all), to keep the pair count and the training time near today's
    :param judged_per_prompt: at most this many judged pairs per prompt (a seeded draw;
        ``None``: all). Most judged pairs are clearly better on relevance, and the failure
        modes teach relevance too; capping them keeps tone's share of the pairs (and the
        pair count) from being swamped
    :param praise: add the ``praise`` failure mode: a best answer against itself wrapped in
        canned praise (a stock cheerful opener and/or closer): tone-only pairs (``cold``,
        ``warm``) otherwise teach "more cheerful words, more reward", and the reward model
        then preferred wrong cheerful answers to correct plain ones
    :param stock_share: a ``warm`` or ``cold`` pair is dropped when its chosen answer holds
        a stock phrase that its rejected one lacks: a word 3-gram found in more than this share of
        the split's samples (e.g. "i'm happy to"). A policy rewarded for a stock phrase
        puts it in every answer
    :param policy_samples: use the samples of trained policies (rows with a ``policy``: the
        online round r3); ``False`` (the default) leaves them out, and the pairs are those
        ``default-v6`` trains on. ``True`` builds the ``default-v7`` candidates'
        pairs (docs/benchmarks.md): the over-used-phrase kinds below need them
    :param overused: with policy samples among the samples (rows with a ``policy``), find
        the phrases the policy over-uses (:func:`overused_ngrams`: ``overused_share``,
        ``overused_ratio``), keep every answer that holds one off the chosen side of all
        pairs, and add ``overused`` pairs: a policy answer holding one, rejected, against a
        same-prompt answer without one, at most ``overused_tone_tolerance`` less friendly,
        ``relevance_tolerance`` less relevant and ``nll_tolerance`` less fluent
    :param overused_share: a 3-gram is over-used when policy answers to more than this share
        of the prompts hold it (outside the prompt's own words) ...
    :param overused_ratio: ... and that share is at least this many times its share of the
        other samples (the starting model's): phrases the policy learned, not ones both write
    :param overused_tone_tolerance: see ``overused``
    :param overused_per_prompt: at most this many ``overused`` pairs per prompt (a seeded draw;
        ``None``: all)
    :param stock_swap: with over-used phrases found, add a ``stock_swap`` pair per prompt: the
        first of its best answers (``failure_chosen``) that has one, against itself with its
        warmest sentence swapped for a sentence the policy wrote around an over-used phrase
        (:func:`stock_sentences`, a seeded draw among those that leave the swapped answer no
        friendlier by VADER and about as relevant: :func:`stock_swap`): the content, the tone
        and the relevance stay, the stock phrase is what differs. Natural answers as good as
        the policy's are few (its answers are warmer and, to the starting model, more
        likely), so ``overused`` pairs alone are a small share of the pairs
    :param overused_policy_only: keep only the policy's answers that hold an over-used phrase
        off the chosen side (the starting model's then follow ``stock_share`` alone)
    :param stock_opener: add ``stock_opener`` pairs instead: the best answer against itself
        opened with such a sentence. The rejected side is then always the warmer one, and
        the reward model learned "a warm sentence costs" (docs/benchmarks.md, candidate v7a)
    :param ranked: add ``ranked`` pairs (:func:`ranked_pairs`; the samples need their ``rm``
        score: ``python -m rlhf_env.default_task --ranked``), after all the others
    :param ranked_tone_weight: the weight of tone's z-score against the reward model's
    :param ranked_gap: the least difference of the combined z-scores in a ranked pair
    :param ranked_chosen: chosen sides are among the prompt's this many best
    :param ranked_per_prompt: at most this many ``ranked`` pairs per prompt (a seeded draw)
    """

    tone_margin: float = 0.3
    relevance_margin: float = 0.1
    relevance_quantile: float = 0.5
    nll_quantile: float = 0.5
    max_repetition: float = 0.1
    failure_chosen: int = 2
    require_tone: bool = False
    relevance_tolerance: float = 0.1
    nll_tolerance: float = 0.3
    cold: bool = True
    warm: bool = True
    warm_per_prompt: int | None = None
    judged_per_prompt: int | None = 4
    praise: bool = True
    stock_share: float = 0.02
    policy_samples: bool = False
    overused: bool = True
    overused_share: float = 0.03
    overused_ratio: float = 5.0
    overused_tone_tolerance: float = 0.1
    overused_per_prompt: int | None = 2
    stock_swap: bool = True
    overused_policy_only: bool = False
    stock_opener: bool = False
    ranked: bool = False
    ranked_tone_weight: float = 1.0
    ranked_gap: float = 1.5
    ranked_chosen: int = 2
    ranked_per_prompt: int = 4


def repetition(text: str, n: int = 3) -> float:
    """The share of a text's word ``n``-grams that repeat an earlier one in it (0: none)."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    k = q * (len(s) - 1)
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def friendlier(a: dict, b: dict, cfg: RelabelConfig) -> bool:
    """Whether sample ``a`` is clearly friendlier than ``b`` (tone higher by ``tone_margin``)
    and about as good otherwise: relevance lower by at most ``relevance_tolerance``, NLL
    higher by at most ``nll_tolerance``, no more repetitive."""
    return (a["tone"] - b["tone"] >= cfg.tone_margin and a["relevance"] >= b["relevance"] - cfg.relevance_tolerance
            and a["nll"] <= b["nll"] + cfg.nll_tolerance and a["repetition"] <= b["repetition"])


def stock_ngrams(texts: Sequence[str], share: float, n: int = 3) -> set[tuple[str, ...]]:
    """The word ``n``-grams found in more than ``share`` of the texts (counted once per text)."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(set(ngrams(words(t), n)))
    return {g for g, c in counts.items() if c > share * len(texts)}


def overused_ngrams(policy: dict[str, Sequence[str]], others: Sequence[str], share: float, ratio: float,
                    n: int = 3) -> set[tuple[str, ...]]:
    """The word ``n``-grams a policy over-uses: found in its answers to more than ``share``
    of its prompts (counted once per prompt, never when the prompt holds it: "a squeaky
    door" answers a prompt about one) and at least ``ratio`` times as often as in
    ``others`` (counted once per text; the starting model's samples).

    :param policy: ``{prompt: [policy answer, ...]}``
    """
    counts: Counter = Counter()
    for prompt, texts in policy.items():
        own = set(ngrams(words(prompt), n))
        counts.update(set().union(*(set(ngrams(words(t), n)) for t in texts)) - own if texts else set())
    base: Counter = Counter()
    for t in others:
        base.update(set(ngrams(words(t), n)))
    return {g for g, c in counts.items() if c > share * len(policy)
            and c / len(policy) >= ratio * base[g] / max(1, len(others))}


def holds_overused(prompt: str, text: str, overused: set[tuple[str, ...]], n: int = 3) -> bool:
    """Whether ``text`` holds an over-used ``n``-gram (:func:`overused_ngrams`) that ``prompt`` does not."""
    return bool((set(ngrams(words(text), n)) & overused) - set(ngrams(words(prompt), n)))


def stock_sentences(samples: dict[str, list[dict]], overused: set[tuple[str, ...]], n: int = 3) -> list[str]:
    """The complete sentences (4 to 30 words, ending in ``.``, ``!`` or ``?``) of the policy
    samples (rows with a ``policy``) that hold an over-used ``n``-gram not in their prompt,
    each once, in the samples' order ("I'm glad to hear that you're looking to help out.")."""
    out: dict[str, None] = {}
    for p, rows in samples.items():
        own = set(ngrams(words(p), n))
        for row in rows:
            if not row.get("policy"):
                continue
            for sentence in _SENTENCE_END.split(row["response"].strip()):
                sentence = sentence.strip()
                if (4 <= len(sentence.split()) <= 30 and sentence[-1:] in ".!?"
                        and (set(ngrams(words(sentence), n)) & overused) - own):
                    out[sentence] = None
    return list(out)


def _capped(pairs: list[tuple[str, str]], cap: int | None, rng: random.Random) -> list[tuple[str, str]]:
    """The distinct ``pairs`` in order, or ``cap`` of them drawn with ``rng`` when there are more."""
    pairs = list(dict.fromkeys(pairs))
    return rng.sample(pairs, cap) if cap is not None and len(pairs) > cap else pairs


def adds_stock(chosen: str, rejected: str, stock: set[tuple[str, ...]], n: int = 3) -> bool:
    """Whether ``chosen`` holds a stock ``n``-gram (:func:`stock_ngrams`) that ``rejected`` lacks."""
    return bool((set(ngrams(words(chosen), n)) & stock) - set(ngrams(words(rejected), n)))


def agree(a: dict, b: dict, cfg: RelabelConfig) -> bool:
    """Whether every judge prefers sample ``a`` to ``b`` (ties allowed) and tone or
    relevance clearly: ``a`` and ``b`` hold ``tone``, ``relevance``, ``nll``, ``repetition``.
    With ``cfg.require_tone``: whether ``a`` is :func:`friendlier`."""
    if cfg.require_tone:
        return friendlier(a, b, cfg)
    no_judge_disagrees = (a["tone"] >= b["tone"] and a["relevance"] >= b["relevance"] and a["nll"] <= b["nll"]
                          and a["repetition"] <= b["repetition"])
    clear = a["tone"] - b["tone"] >= cfg.tone_margin or a["relevance"] - b["relevance"] >= cfg.relevance_margin
    return no_judge_disagrees and clear


def boilerplate(rng: random.Random) -> str:
    """Generic cheerful boilerplate that ignores the prompt (opener, middle, closer)."""
    return " ".join([rng.choice(_OPENERS), rng.choice(_MIDDLES), rng.choice(_CLOSERS)])


def rude(rng: random.Random, chosen: str) -> str:
    """The same answer made unfriendly: a dismissive opener, closer, or both (tone alone differs)."""
    k = rng.randrange(3)
    prefix = rng.choice(_RUDE_PREFIXES) if k != 1 else ""
    suffix = rng.choice(_RUDE_SUFFIXES) if k != 0 else ""
    return prefix + chosen + suffix


def praised(rng: random.Random, chosen: str) -> str:
    """The same answer wrapped in canned praise: a stock cheerful opener, closer, or both
    (``_OPENERS`` / ``_MIDDLES`` / ``_CLOSERS``): friendlier words, no friendlier answer."""
    k = rng.randrange(3)
    prefix = " ".join([rng.choice(_OPENERS)] + ([rng.choice(_MIDDLES)] if rng.random() < 0.5 else [])) + " " if k != 1 else ""
    suffix = " " + rng.choice(_CLOSERS) if k != 0 else ""
    return prefix + chosen + suffix


def repeated_phrase(rng: random.Random, chosen: str) -> str:
    """A phrase repeated 3-5 times: a cheerful stock phrase, or the chosen answer's first words."""
    first = " ".join(chosen.split()[:5]).rstrip(".,!?;:")
    phrase = rng.choice(_REPEATED) if rng.random() < 0.5 or len(first.split()) < 3 else first
    return " ".join([phrase + "!"] * rng.randint(3, 5))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cold(chosen: str, tone_fn: Callable[[list[str]], list[float]], margin: float) -> str | None:
    """The answer without its warmest sentence (the one VADER scores most positive), or
    None when it has a single sentence, what is left is under four words, or its tone
    drops by less than ``margin``."""
    sentences = [x for x in _SENTENCE_END.split(chosen.strip()) if x]
    if len(sentences) < 2:
        return None
    scores = tone_fn(sentences)
    k = max(range(len(sentences)), key=lambda i: scores[i])
    rest = " ".join(sentences[:k] + sentences[k + 1:])
    if len(rest.split()) < 4:
        return None
    before, after = tone_fn([chosen, rest])
    return rest if before - after >= margin else None


def policy_overused(samples: dict[str, list[dict]], cfg: RelabelConfig) -> set[tuple[str, ...]]:
    """:func:`overused_ngrams` of the policy samples (rows with a ``policy``) against the
    others (the starting model's), with ``cfg``'s thresholds; empty without policy samples."""
    policy = {p: [r["response"] for r in rows if r.get("policy") and r["response"].strip()] for p, rows in samples.items()}
    policy = {p: texts for p, texts in policy.items() if texts}
    if not policy:
        return set()
    others = [r["response"] for rows in samples.values() for r in rows if not r.get("policy") and r["response"].strip()]
    return overused_ngrams(policy, others, cfg.overused_share, cfg.overused_ratio)


def stock_swap(prompt: str, chosen: str, stock: Sequence[str], tone_fn: Callable[[list[str]], list[float]],
               relevance_fn: Callable[[list[str], list[str]], list[float]], rng: random.Random, tries: int = 8,
               relevance_tolerance: float = 0.05) -> str | None:
    """The answer with its warmest sentence (by VADER) swapped for one of the ``stock``
    sentences (up to ``tries`` seeded draws), the first that leaves the answer no friendlier
    than it was and at most ``relevance_tolerance`` less relevant to the prompt (a stock
    sentence about something else would teach relevance, not the phrase); None when it has a
    single sentence or no draw qualifies."""
    sentences = [x for x in _SENTENCE_END.split(chosen.strip()) if x]
    if len(sentences) < 2 or not stock:
        return None
    scores = tone_fn(sentences)
    k = max(range(len(sentences)), key=lambda i: scores[i])
    candidates = list(dict.fromkeys(" ".join(sentences[:k] + [rng.choice(stock)] + sentences[k + 1:]) for _ in range(tries)))
    before, *after = tone_fn([chosen] + candidates)
    candidates = [c for c, t in zip(candidates, after) if t <= before and c != chosen]
    if not candidates:
        return None
    rel, *rels = relevance_fn([prompt] * (len(candidates) + 1), [chosen] + candidates)
    return next((c for c, r in zip(candidates, rels) if r >= rel - relevance_tolerance), None)


def ranked_pairs(prompt: str, rows: Sequence[dict], cfg: RelabelConfig, stock: set[tuple[str, ...]],
                 avoid: set[tuple[str, ...]], rng: random.Random) -> list[tuple[str, str]]:
    """A prompt's ``ranked`` pairs (see the module docstring): among its starting-model
    samples (``rows`` as :func:`relabel` judges them, each with ``rm``, the reward model's
    score, and ``tone``), each of the ``ranked_chosen`` best under ``z(rm) +
    ranked_tone_weight * z(tone)`` (z-scores over the prompt's samples) against every sample
    lower by at least ``ranked_gap``, at most ``ranked_per_prompt`` of them (a seeded draw).
    A chosen side is never repetitive (``max_repetition``), never holds a phrase of ``avoid``
    (outside the prompt's words) and never a stock phrase its rejected side lacks.

    :return: ``[(chosen, rejected), ...]``; none for a prompt with fewer than 3 samples or a
        sample without ``rm``
    """
    import numpy as np

    rows = [r for r in rows if not r["policy"]]
    if len(rows) < 3 or any(r.get("rm") is None for r in rows):
        return []
    rm = np.array([r["rm"] for r in rows], dtype=float)
    tone = np.array([r["tone"] for r in rows], dtype=float)
    z = (rm - rm.mean()) / (rm.std() + 1e-8) + cfg.ranked_tone_weight * (tone - tone.mean()) / (tone.std() + 1e-8)
    order = np.argsort(-z)
    pairs = []
    for i in order[: cfg.ranked_chosen]:
        chosen = rows[i]["response"]
        if rows[i]["repetition"] > cfg.max_repetition or (avoid and holds_overused(prompt, chosen, avoid)):
            continue
        pairs += [(chosen, rows[j]["response"]) for j in order[::-1]
                  if z[i] - z[j] >= cfg.ranked_gap and not adds_stock(chosen, rows[j]["response"], stock)]
    rng.shuffle(pairs)
    return pairs[: cfg.ranked_per_prompt]


def relabel(samples: dict[str, list[dict]], cfg: RelabelConfig | None = None, seed: int = 0,
            relevance_fn: Callable[[list[str], list[str]], list[float]] | None = None,
            overused: set[tuple[str, ...]] | None = None, avoid: set[tuple[str, ...]] | None = None) -> list[dict]:
    """Preference pairs from judged samples (see the module docstring).

    :param samples: ``{prompt: [row, ...]}``; a row holds ``response``, ``score`` (tone),
        ``relevance`` and ``nll``
    :param cfg: the thresholds
    :param seed: seed of the failure modes' choices
    :param relevance_fn: the relevance judge for off-topic candidates (default:
        :func:`rlhf_env.judges.relevance`)
    :param overused: the phrases the policy over-uses (with ``cfg.overused``; default:
        :func:`policy_overused` of ``samples``)
    :param avoid: phrases never on the chosen side of a ``ranked`` pair (default: none;
        :func:`build_pairs` passes the online round's over-used phrases)
    :return: rows ``{prompt, chosen, rejected, kind}``; ``kind`` is ``judged``, ``warm``,
        ``overused``, ``boilerplate``, ``repetition``, ``off_topic``, ``rude``, ``praise``,
        ``stock_swap``, ``stock_opener``, ``cold`` or ``ranked`` (all ``ranked`` pairs last)
    """
    cfg = cfg or RelabelConfig()
    if relevance_fn is None:
        from rlhf_env.judges import relevance as relevance_fn
    from rlhf_env.judges import tone as tone_fn
    rng = random.Random(seed)
    prompts = list(samples)
    judged: dict[str, list[dict]] = {}
    for p in prompts:
        rows = []
        for row in samples[p]:
            if not row["response"].strip() or row.get("nll") is None or (row.get("policy") and not cfg.policy_samples):
                continue
            rows.append({"response": row["response"], "tone": row["score"], "relevance": row["relevance"],
                         "nll": row["nll"], "repetition": repetition(row["response"]), "policy": bool(row.get("policy")),
                         "rm": row.get("rm")})
        judged[p] = rows
    # the phrases a trained policy over-uses (none without policy samples): never on a chosen side
    if not (cfg.overused and cfg.policy_samples):
        overused = set()
    elif overused is None:
        overused = policy_overused(samples, cfg)
    for p, rows in judged.items():
        for r in rows:
            r["overused"] = bool(overused) and holds_overused(p, r["response"], overused)
    # the samples that answer their prompt: relevant and fluent within the prompt's better half
    answers: dict[str, list[dict]] = {}
    for p, rows in judged.items():
        if not rows:
            answers[p] = []
            continue
        rel_floor = _quantile([r["relevance"] for r in rows], cfg.relevance_quantile)
        nll_ceiling = _quantile([r["nll"] for r in rows], cfg.nll_quantile)
        ok = [r for r in rows if r["relevance"] >= rel_floor and r["nll"] <= nll_ceiling and r["repetition"] <= cfg.max_repetition
              and not (r["overused"] and (r["policy"] or not cfg.overused_policy_only))]
        answers[p] = sorted(ok, key=lambda r: -r["tone"])
    # the most positive sample of each prompt: off-topic cheer for the others
    cheer = {p: max(rows, key=lambda r: r["tone"])["response"] for p, rows in judged.items() if rows}
    stock = stock_ngrams([r["response"] for rows in judged.values() for r in rows], cfg.stock_share) if cfg.warm or cfg.cold else set()
    warm_rng = random.Random(seed + 7919)  # the caps' own generator: the failure modes' draws do not move
    overused_rng = random.Random(seed + 104729)  # the overused kinds' own: the other kinds' draws do not move
    openers = stock_sentences(samples, overused) if overused and (cfg.stock_opener or cfg.stock_swap) else []
    out: list[dict] = []
    seen: set[tuple[str, str]] = set()

    def add(prompt: str, kind: str, pairs: list[tuple[str, str]]) -> None:
        for chosen, rejected in pairs:
            seen.add((chosen, rejected))
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind})

    for p in prompts:
        seen.clear()
        agreed = []
        for a in answers[p]:
            for b in judged[p]:
                if a["response"] != b["response"] and (a["response"], b["response"]) not in seen and agree(a, b, cfg):
                    seen.add((a["response"], b["response"]))
                    agreed.append((a["response"], b["response"]))
        add(p, "judged", _capped(agreed, cfg.judged_per_prompt, warm_rng))
        if cfg.warm:
            add(p, "warm", _capped([(a["response"], b["response"]) for a in answers[p] for b in judged[p]
                                    if a["response"] != b["response"] and (a["response"], b["response"]) not in seen
                                    and friendlier(a, b, cfg) and not adds_stock(a["response"], b["response"], stock)],
                                   cfg.warm_per_prompt, warm_rng))
        if overused:
            # a policy answer built on an over-used phrase against one as good without it
            add(p, "overused", _capped(
                [(a["response"], b["response"]) for b in judged[p] if b["policy"] and b["overused"] for a in answers[p]
                 if (a["response"], b["response"]) not in seen and a["tone"] >= b["tone"] - cfg.overused_tone_tolerance
                 and a["relevance"] >= b["relevance"] - cfg.relevance_tolerance and a["nll"] <= b["nll"] + cfg.nll_tolerance
                 and a["repetition"] <= max(b["repetition"], cfg.max_repetition)],
                cfg.overused_per_prompt, overused_rng))
        # one response per failure mode and prompt, paired with each of the best answers
        best = answers[p][: cfg.failure_chosen]
        if not best:
            continue
        failures = [("boilerplate", boilerplate(rng)), ("repetition", repeated_phrase(rng, best[0]["response"]))]
        others = [q for q in prompts if q != p and q in cheer]
        if others:
            candidates = [cheer[q] for q in rng.sample(others, min(5, len(others)))]
            rel = relevance_fn([p] * len(candidates), candidates)
            k = min(range(len(candidates)), key=lambda i: rel[i])
            if rel[k] < min(a["relevance"] for a in best) - cfg.relevance_margin:
                # half of them opened with stock cheer: a cheerful answer to something else
                cheer_text = candidates[k] if rng.random() < 0.5 else rng.choice(_OPENERS) + " " + candidates[k]
                failures.append(("off_topic", cheer_text))
        for kind, rejected in failures:
            for a in best:
                out.append({"prompt": p, "chosen": a["response"], "rejected": rejected, "kind": kind})
        for a in best:  # the same answer, unfriendly: tone alone decides
            out.append({"prompt": p, "chosen": a["response"], "rejected": rude(rng, a["response"]), "kind": "rude"})
        if cfg.praise:
            for a in best:  # the same answer in canned praise: stock cheer is not a friendlier answer
                out.append({"prompt": p, "chosen": a["response"], "rejected": praised(warm_rng, a["response"]), "kind": "praise"})
        if openers and cfg.stock_opener:  # the best answer behind a sentence the policy wrote around an over-used phrase
            out.append({"prompt": p, "chosen": best[0]["response"], "rejected": overused_rng.choice(openers) + " " + best[0]["response"],
                        "kind": "stock_opener"})
        if openers and cfg.stock_swap:
            for a in best:  # its warmest sentence swapped for a stock one: as warm, the phrase differs (one a prompt)
                swapped = stock_swap(p, a["response"], openers, tone_fn, relevance_fn, overused_rng)
                if swapped is not None:
                    out.append({"prompt": p, "chosen": a["response"], "rejected": swapped, "kind": "stock_swap"})
                    break
        if cfg.cold:
            for a in best:  # the same answer, less warm
                rest = cold(a["response"], tone_fn, cfg.tone_margin)
                if rest is not None and not adds_stock(a["response"], rest, stock):  # not warmth by a stock phrase
                    out.append({"prompt": p, "chosen": a["response"], "rejected": rest, "kind": "cold"})
    if cfg.ranked:  # after all the other kinds, with a generator of their own: the kinds above stay as they were
        ranked_rng = random.Random(seed)
        for p in prompts:
            out += [{"prompt": p, "chosen": c, "rejected": r, "kind": "ranked"}
                    for c, r in ranked_pairs(p, judged[p], cfg, stock, avoid or set(), ranked_rng)]
    return out


def build_pairs(split: str, task_dir: Path = TASK_DIR, seed: int = 0, cfg: RelabelConfig | None = None) -> tuple[list[dict], dict[str, Any]]:
    """:func:`relabel` on a split's shipped, judged samples (all rounds).

    The test split's failure modes are drawn with another seed than the train split's. The
    phrases the policy over-uses (:func:`policy_overused`) are those of the policy round over
    both splits' prompts (the 60 held-out prompts alone are too few: at a 3% share a 3-gram
    in the answers to 2 of them would count), the same set for both.

    :return: ``(pairs, counts by kind)``
    """
    cfg = cfg or RelabelConfig()
    samples = shipped_samples(split, task_dir)
    if cfg.ranked and not any(row.get("rm") is not None for rows in samples.values() for row in rows):
        raise ValueError(f"the {split} samples have no reward-model score ('rm') for the ranked pairs: run "
                         "python -m rlhf_env.default_task --ranked, or relabel with RelabelConfig(ranked=False)")
    overused = avoid = None
    if (cfg.overused and cfg.policy_samples) or cfg.ranked:
        both = {**shipped_samples("train", task_dir), **shipped_samples("test", task_dir)}
        found = policy_overused(both, cfg)
        overused = found if cfg.overused and cfg.policy_samples else None
        avoid = found if cfg.ranked else None
    pairs = relabel(samples, cfg, seed=seed + (0 if split == "train" else 1), overused=overused, avoid=avoid)
    stats: dict[str, Any] = {"pairs": len(pairs)}
    for row in pairs:
        stats[row["kind"]] = stats.get(row["kind"], 0) + 1
    stats["prompts"] = len({row["prompt"] for row in pairs})
    return pairs, stats
