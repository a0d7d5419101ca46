"""Best-of-n sampling: the reward model's pick among a policy's own answers, no training.

For each prompt, draw ``n`` answers from the policy and keep the one the reward scores
highest. The kept answers come from a distribution whose KL to the policy's is at most
``log n - (n - 1) / n`` nats (:func:`kl_bound`; Beirami et al., 2024), and at a given KL it
raises the reward about as much as the KL-regularised optimum that RLHF's objective defines
(Gao et al., 2022, "Scaling laws for reward model overoptimization", measure both; Yang et
al., 2024, "Asymptotics of language model alignment"). That makes it two things: a way to
align at inference time at ``n`` times the sampling cost, and the yardstick of what a
reward model can give at little KL (``python -m benchmarks.best_of_n``): where best-of-n
under a reward model does not improve what the judges measure, a policy trained on that
reward model at that KL is not expected to either.

    from rlhf_env.best_of_n import best_of_n
    out = best_of_n("smollm2-135m", ["How do I keep basil alive?"], reward="default", n=8, max_new_tokens=48)
    out.chosen.texts[0][0], out.scores[0][0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlhf_env.envs.prompt import TEMPLATE_DEFAULT, prompt_text
from rlhf_env.generation import Completions, Prompt, generate, resolve_policy


def kl_bound(n: int) -> float:
    """Upper bound on the KL (nats) of best-of-``n`` to the sampled policy: ``log n - (n - 1) / n``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfN:
    """What :func:`best_of_n` returns.

    :ivar chosen: the kept answers, ``num_samples`` per prompt, as :func:`generate` returns
        them (texts, token ids, and the policy's log-probs when asked for).
    :ivar scores: ``scores[i][j]``: the reward of ``chosen.texts[i][j]``.
    :ivar candidates: every answer drawn, ``num_samples * n`` per prompt; answer ``j`` of
        prompt ``i`` was picked among ``candidates.texts[i][j * n : (j + 1) * n]``.
    :ivar candidate_scores: ``candidate_scores[i][j]``: the ``n`` rewards of that slot.
    :ivar n: answers drawn per kept answer.
    """

    chosen: Completions
    scores: list[list[float]]
    candidates: Completions
    candidate_scores: list[list[list[float]]]
    n: int

    @property
    def kl_bound(self) -> float:
        """The KL bound of the kept answers to the policy (:func:`kl_bound`)."""
        return kl_bound(self.n)


def select(candidates: Completions, scores: Sequence[Sequence[float]], n: int) -> Completions:
    """Keep the highest-scored answer of each slot of ``n`` consecutive candidates of a prompt
    (the first one on ties).

    :param candidates: ``num_samples * n`` answers per prompt
    :param scores: ``scores[i][k]``: the reward of ``candidates.texts[i][k]``
    """
    picks: list[list[int]] = []
    for i, group in enumerate(candidates.texts):
        if len(group) % n or len(scores[i]) != len(group):
            raise ValueError(f"prompt {i}: {len(group)} candidates and {len(scores[i])} scores, not slots of n={n}")
        picks.append([j + max(range(n), key=lambda k: scores[i][j + k]) for j in range(0, len(group), n)])

    def keep(rows):
        return None if rows is None else [[row[k] for k in ks] for row, ks in zip(rows, picks)]

    return Completions(keep(candidates.texts), keep(candidates.num_tokens), keep(candidates.finished),
                       keep(candidates.token_ids), keep(candidates.logprobs))


def best_of_n(
    policy: Any,
    prompts: Sequence[Prompt],
    reward: Any = "default",
    *,
    n: int = 4,
    num_samples: int = 1,
    tokenizer: Any = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    system_prompt: Any = TEMPLATE_DEFAULT,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    logprobs: bool = False,
) -> BestOfN:
    """Draw ``num_samples * n`` answers per prompt and keep the best of each ``n``.

    :param policy: a model name or directory, a ``(model, tokenizer)`` pair, a trained
        text agent (:func:`rlhf_env.generation.resolve_policy`), or a Hugging Face model
        with ``tokenizer=``
    :param prompts: strings or chat-message lists
    :param reward: what scores the answers: ``"default"``, a reward-model folder, a
        ``(prompts, responses) -> scores`` callable, ... (:func:`rlhf_env.rewards.resolve_reward`;
        a chat-message prompt is scored by its last user message's text)
    :param n: answers drawn per kept answer (1: plain sampling)
    :param num_samples: kept answers per prompt
    :param tokenizer: the policy's tokenizer when ``policy`` is a bare model
    :param max_new_tokens: length limit of an answer
    :param temperature: sampling temperature of the draws
    :param top_k: top-k of the draws (0: off)
    :param system_prompt: as :func:`rlhf_env.generation.generate`'s
    :param seed: the draws' seed (same seed, prompts and batch size: the same answers on CPU)
    :param batch_size: sequences per ``generate`` call
    :param device: where a model loaded here goes
    :param progress: progress bars
    :param logprobs: also keep the policy's log-probs of the kept answers' tokens
    """
    from rlhf_env.rewards import resolve_reward

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if tokenizer is None:
        policy, tokenizer = resolve_policy(policy, device)
    prompts = list(prompts)
    reward_fn = resolve_reward(reward, device=device or "cpu")
    drawn = generate(policy, tokenizer, prompts, num_samples=num_samples * n, temperature=temperature, top_k=top_k,
                     max_new_tokens=max_new_tokens, system_prompt=system_prompt, seed=seed, batch_size=batch_size,
                     device=device, progress=f"best of {n}: sampling" if progress else False, logprobs=logprobs)
    texts = [prompt_text(p) for p in prompts]
    flat = torch.as_tensor(reward_fn([t for t in texts for _ in range(num_samples * n)], drawn.flat())).float().cpu()
    per_prompt = flat.reshape(len(prompts), num_samples * n).tolist()
    slots = [[row[j : j + n] for j in range(0, len(row), n)] for row in per_prompt]
    return BestOfN(select(drawn, per_prompt, n), [[max(slot) for slot in row] for row in slots], drawn, slots, n)
