"""Judge a policy on held-out prompts against its reference: :func:`evaluate`.

A policy is judged by what it writes, next to what its starting model (the reference)
writes to the same prompts with the same seed:

* the reward model's score of its responses and its **win rate** against the reference's
  responses under that reward model (a win counts 1, a tie 1/2);
* every independent judge of :mod:`rlhf_env.judges` (tone, relevance, fluency as the
  reference's NLL per token, distinct-1/2, the share of responses holding the most common
  3-gram) for the policy and for the reference;
* the **KL per response** to the reference, ``sum_t log pi(a_t|s_t) - log ref(a_t|s_t)``
  over the sampled tokens (its mean estimates ``KL(pi || ref)`` per response);
* side-by-side samples.

:func:`check_targets` applies the default task's pass rule (:class:`Targets`) to a report;
:func:`format_table` prints it. ``evaluate(policy, task="chain_sum")`` scores a verifiable
task instead (:func:`rlhf_env.tasks.evaluate_task`).
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rlhf_env import judges
from rlhf_env.agents.atomic import write_text

JUDGE_KEYS = ("reward", "tone", "negative_share", "relevance", "fluency_nll", "distinct_1", "distinct_2", "distinct_2_fluent",
              "top_3gram_share", "kl")


def _reference_of(policy: Any, reference: Any, device: Any) -> tuple[Any, Any]:
    from rlhf_env.generation import resolve_policy

    if reference is not None:
        return resolve_policy(reference, device)
    core = getattr(getattr(policy, "policy", None), "core", None)
    if core is not None and getattr(core, "reference", None) is not None:
        return core.reference, core.tokenizer
    raise ValueError("evaluate needs the reference model: pass reference= (the policy's starting model: a name such as "
                     "'smollm2-135m', a model directory or a (model, tokenizer) pair)")


def _check_same_tokenizer(policy_tokenizer: Any, reference_tokenizer: Any) -> None:
    """The KL and the fluency score the policy's token ids under the reference: both must
    read the same vocabulary (a policy trained from the tiny model judged against SmolLM2
    gave a KL of 136 nats that meant nothing)."""
    if policy_tokenizer is reference_tokenizer:
        return
    if len(policy_tokenizer) != len(reference_tokenizer) or policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ValueError(f"the policy's tokenizer ({len(policy_tokenizer)} tokens) is not the reference's "
                         f"({len(reference_tokenizer)} tokens): judge a policy against its own starting model, "
                         "e.g. reference='tiny' (rlhf-env eval --reference tiny) for a policy trained from the tiny model")


def _score(reward: Callable, prompts: list[str], texts: list[str]) -> np.ndarray:
    return np.asarray(torch.as_tensor(reward(prompts, texts)).float().cpu().numpy(), dtype=np.float64)


def _side(prompts: list[str], texts: list[str], scores: np.ndarray, reference: Any, ids: list | None, encoder,
          nll: list[float] | None = None) -> tuple[dict[str, Any], list[float]]:
    """One column of the table (reward and judges of one set of responses) and the reference's
    NLL per token of each response (empty without a reference)."""
    share, gram = judges.top_ngram_share(texts, 3)
    tones = judges.tone(texts)
    if nll is None:
        nll = judges.fluency(reference[0], reference[1], prompts, ids if ids is not None else texts) if reference is not None else []
    per_response = [float(x) for x in nll]
    nll = [x for x in nll if x == x]
    return {
        "reward": float(scores.mean()),
        "reward_std": float(scores.std()),
        "tone": float(np.mean(tones)),
        "negative_share": judges.negative_fraction(tones),
        "relevance": float(np.mean(judges.relevance(prompts, texts, encoder))),
        "fluency_nll": float(np.mean(nll)) if nll else float("nan"),
        "distinct_1": judges.distinct_n(texts, 1),
        "distinct_2": judges.distinct_n(texts, 2),
        "top_3gram_share": share,
        "top_3gram": gram,
        "length": float(np.mean([len(x) for x in ids])) if ids else float("nan"),
    }, per_response


def _fluent_diversity(ref_col: dict, col: dict, ref_texts: list[str], texts: list[str], ref_nll: list | None,
                      nll: list | None) -> None:
    """Both columns' distinct-2 over the responses the reference reads as fluent, at the
    smaller side's count of them (:func:`rlhf_env.judges.fluent_distinct_n`); ``nan`` without
    each response's NLL (e.g. no reference, or a baseline written before reports kept it)."""
    if not ref_nll or not nll or len(ref_nll) != len(ref_texts) or len(nll) != len(texts):
        ref_col["distinct_2_fluent"] = col["distinct_2_fluent"] = float("nan")
        return
    k = min(sum(x <= judges.FLUENT_NLL for x in ref_nll), sum(x <= judges.FLUENT_NLL for x in nll))
    ref_col["distinct_2_fluent"] = judges.fluent_distinct_n(ref_texts, ref_nll, 2, k) if k >= 2 else float("nan")
    col["distinct_2_fluent"] = judges.fluent_distinct_n(texts, nll, 2, k) if k >= 2 else float("nan")
    ref_col["fluent_share"] = float(np.mean([x <= judges.FLUENT_NLL for x in ref_nll]))
    col["fluent_share"] = float(np.mean([x <= judges.FLUENT_NLL for x in nll]))


def _same_ids(a: Sequence | None, b: Sequence | None) -> bool:
    """Whether two lists of token-id lists hold the same ids (both None counts as the same)."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(list(x) == list(y) for x, y in zip(a, b))


def _side_by_side(prompts, ref_texts, texts, ref_scores, scores, n_show: int) -> list[dict]:
    """The first response of each of the first ``n_show`` distinct prompts, both sides."""
    rows, seen = [], set()
    for p, r, t, rs, s in zip(prompts, ref_texts, texts, ref_scores, scores):
        if p not in seen and len(rows) < n_show:
            seen.add(p)
            rows.append({"prompt": p, "reference": r, "policy": t, "reference_score": float(rs), "policy_score": float(s)})
    return rows


def compare(
    prompts: Sequence[str],
    responses: Sequence[str],
    reference_responses: Sequence[str],
    reward: Any = "default",
    *,
    reference: Any = None,
    response_ids: Sequence[Sequence[int]] | None = None,
    reference_ids: Sequence[Sequence[int]] | None = None,
    kls: Sequence[float] | None = None,
    response_nll: Sequence[float] | None = None,
    reference_nll: Sequence[float] | None = None,
    n_show: int = 3,
    baseline: dict | None = None,
    settings: dict | None = None,
) -> dict[str, Any]:
    """The report of :func:`evaluate` on given responses: one per prompt (repeat a prompt
    for several responses), the policy's and the reference's, in the same order.

    :param reward: scores both sides (:func:`rlhf_env.rewards.resolve_reward`)
    :param reference: ``(model, tokenizer)`` of the reference, for fluency (None: ``nan``)
    :param response_ids: the sampled token ids, scored for fluency instead of the texts
    :param reference_ids: the same for the reference's responses
    :param kls: KL of each response to the reference (None: unknown, ``nan``)
    :param response_nll: the reference's NLL per token of each response, if already known
    :param reference_nll: the same for the reference's responses
    :param baseline: a report whose reference column and scores are reused
    :param settings: stored in the report (and compared with the baseline's)
    """
    from rlhf_env.rewards import resolve_reward

    prompts, texts = list(prompts), list(responses)
    if len(prompts) != len(texts):
        raise ValueError(f"got {len(prompts)} prompts but {len(texts)} responses; pass one prompt per response")
    reward_fn = resolve_reward(reward)
    encoder = judges.default_encoder()
    if baseline is not None:
        if settings is not None and baseline.get("settings") != settings:
            raise ValueError(f"baseline= was made with {baseline.get('settings')}, not {settings}: evaluate both the same way")
        ref_col, ref_texts = baseline["reference"], baseline["responses"]["reference"]
        ref_scores = np.asarray(baseline["reference_scores"], dtype=np.float64)
        ref_nll = baseline.get("reference_nll")
    else:
        ref_texts = list(reference_responses)
        if len(ref_texts) != len(texts):
            raise ValueError(f"got {len(texts)} responses but {len(ref_texts)} reference responses")
        ref_scores = _score(reward_fn, prompts, ref_texts)
        ref_col, ref_nll = _side(prompts, ref_texts, ref_scores, reference, reference_ids, encoder,
                                 None if reference_nll is None else list(reference_nll))
        ref_col["kl"] = 0.0
    if baseline is None and texts == ref_texts and _same_ids(response_ids, reference_ids) \
            and (response_nll is None or reference_nll is None or list(response_nll) == list(reference_nll)):
        # the same responses (the reference judged against itself): the same scores and judges, computed once
        scores, col, nll = ref_scores, dict(ref_col), ref_nll
    else:
        scores = _score(reward_fn, prompts, texts)
        col, nll = _side(prompts, texts, scores, reference, response_ids, encoder,
                         None if response_nll is None else list(response_nll))
    col["kl"] = float(np.mean(kls)) if kls is not None and len(kls) else float("nan")
    ref_col = dict(ref_col)  # (a baseline's column is not changed)
    _fluent_diversity(ref_col, col, ref_texts, texts, ref_nll, nll)
    win = float(np.mean((scores > ref_scores) + 0.5 * (scores == ref_scores)))
    return {
        "settings": settings or {},
        "policy": col,
        "reference": ref_col,
        "win_rate": win,
        "samples": _side_by_side(prompts, ref_texts, texts, ref_scores, scores, n_show),
        "responses": {"policy": texts, "reference": ref_texts},
        "policy_scores": scores.tolist(),
        "reference_scores": ref_scores.tolist(),
        "policy_nll": nll,
        "reference_nll": ref_nll,
        "kls": [float(k) for k in kls] if kls is not None else None,
    }


def evaluate(
    policy: Any,
    prompts: Sequence[str] | None = None,
    task: Any = None,
    *,
    reference: Any = None,
    reward: Any = "default",
    num_samples: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    n_show: int = 3,
    baseline: dict | None = None,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    **task_kwargs: Any,
) -> dict[str, Any]:
    """Judge ``policy`` on held-out prompts against ``reference`` (see the module docstring).

    :param policy: a model name or directory, a ``(model, tokenizer)`` pair, or an agent
        trained on a text env (:func:`rlhf_env.generation.resolve_policy`)
    :param prompts: the prompts (default: the default task's held-out prompts,
        ``load_prompts(split="test")``)
    :param task: a verifiable task (name or object): returns
        ``rlhf_env.tasks.evaluate_task(policy, task, **task_kwargs)`` instead
    :param reference: the starting model, in any form ``policy`` takes (default: the
        agent's env reference; required for a model name or directory). When it is the
        policy's own model object, responses are sampled once and the KL is 0
    :param reward: the reward model or reward (``"default"``, a directory, a callable:
        :func:`rlhf_env.rewards.resolve_reward`)
    :param num_samples: responses per prompt (the same for policy and reference)
    :param max_new_tokens: response length limit
    :param temperature: sampling temperature (the env's distribution at 1)
    :param seed: sampling seed (the same for policy and reference)
    :param batch_size: sequences per generate call
    :param device: where models loaded here go
    :param n_show: side-by-side samples kept in the report
    :param baseline: an earlier report on the same prompts and settings: its reference
        column and responses are reused instead of sampled again
    :param progress: a progress bar
    :param out: write the report there as JSON too
    :return: the report (:func:`compare`): ``policy`` and ``reference`` columns
        (:data:`JUDGE_KEYS`, plus ``reward_std``, ``top_3gram``, ``length`` in tokens),
        ``win_rate``, ``samples``, ``responses``, ``kls``, the reference's NLL per token of
        each response (``policy_nll``, ``reference_nll``) and ``settings``
    """
    if task is not None:
        from rlhf_env.tasks import evaluate_task

        return evaluate_task(policy, task, seed=seed, device=device, progress=progress, n_show=n_show, out=out, **task_kwargs)
    if task_kwargs:
        raise TypeError(f"evaluate() got unexpected arguments {sorted(task_kwargs)} (they apply only with task=)")
    from tqdm.auto import tqdm

    from rlhf_env.generation import generate, resolve_policy
    from rlhf_env.prompts import load_prompts
    from rlhf_env.rewards import resolve_reward

    if prompts is None:
        prompts = load_prompts(split="test")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    model, tokenizer = resolve_policy(policy, device)
    ref = _reference_of(policy, reference, device)
    _check_same_tokenizer(tokenizer, ref[1])
    reward_fn = resolve_reward(reward, device=device or "cpu")
    settings = {"prompts": len(prompts), "num_samples": num_samples, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "seed": seed}
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    steps = tqdm(total=4 if baseline is None else 3, desc="evaluate", disable=not progress)

    def sample(m, tok, name):
        steps.set_postfix_str(f"sampling {name}")
        c = generate(m, tok, prompts, num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                     seed=seed, batch_size=batch_size, progress=False, logprobs=True)
        steps.update(1)
        # each response's own log-probs, from the sampling pass (no second forward of the sampler)
        lps = [torch.tensor(x) if x else None for group in c.logprobs for x in group]
        return c.flat(), [x for group in c.token_ids for x in group], lps

    def nll_of(lps):  # fluency is the reference's NLL at temperature 1
        return [float(-lp.mean()) if lp is not None else float("nan") for lp in lps] if temperature == 1.0 else None

    texts, ids, pol_lp = sample(model, tokenizer, "policy")
    same = model is ref[0]  # the reference judged against itself (e.g. before training): sample once, KL 0
    ref_texts, ref_ids, ref_nll = None, None, None
    if baseline is None and same:
        ref_texts, ref_ids, ref_nll = texts, ids, nll_of(pol_lp)
        steps.update(1)
    elif baseline is None:
        ref_texts, ref_ids, ref_own_lp = sample(*ref, "reference")
        ref_nll = nll_of(ref_own_lp)
    steps.set_postfix_str("KL")
    if same:
        kls, nll = [0.0] * len(ids), ref_nll
    else:
        ref_lp = judges.response_logprobs(ref[0], ref[1], flat_prompts, ids, temperature=temperature)
        kls = [float((a - b).sum()) if a is not None else 0.0 for a, b in zip(pol_lp, ref_lp)]
        nll = nll_of(ref_lp)
    steps.update(1)
    steps.set_postfix_str("judging")
    report = compare(flat_prompts, texts, ref_texts, reward_fn, reference=ref, response_ids=ids, reference_ids=ref_ids,
                     kls=kls, response_nll=nll, reference_nll=ref_nll, n_show=n_show, baseline=baseline, settings=settings)
    steps.update(1)
    steps.close()
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: dict, path: str | os.PathLike) -> pathlib.Path:
    """Write a report as JSON, atomically."""
    return write_text(path, json.dumps(report, indent=2))


@dataclass
class Targets:
    """The default task's pass rule: the policy against its reference on held-out prompts,
    by the independent judges, not by the reward model it was trained on.

    :param min_tone_gain: the VADER mean rises by at least this
    :param max_relevance_drop: relevance stays above the reference's minus this
    :param max_distinct_2_change: distinct-2 stays within this of the reference's
    :param max_top_3gram_share: no 3-gram appears in more than this share of responses
    :param max_kl: KL per response at most this (nats)
    :param max_negative_share_rise: if set, the share of responses VADER reads as negative
        (:func:`rlhf_env.judges.negative_share`) rises by at most this (None: not checked).
        ``Targets(min_tone_gain=-0.02, max_negative_share_rise=0.0)`` is the rule "no less
        friendly than the reference": see docs/alignment.md for why the mean VADER gain alone
        is a noisy target on 64 responses
    :param max_fluent_distinct_2_change: if set, distinct-2 of the fluent responses (the
        ``distinct_2_fluent`` column: :func:`rlhf_env.judges.fluent_distinct_n`) stays within
        this of the reference's (None: not checked). Plain distinct-2 also falls when a policy
        stops writing the garbled text of the reference's temperature-1 samples; see
        docs/alignment.md
    """

    min_tone_gain: float = 0.15
    max_relevance_drop: float = 0.02
    max_distinct_2_change: float = 0.03
    max_top_3gram_share: float = 0.20
    max_kl: float = 8.0
    max_negative_share_rise: float | None = None
    max_fluent_distinct_2_change: float | None = None


def check_targets(report: dict, targets: Targets | None = None) -> dict[str, Any]:
    """Apply the pass rule to a report of :func:`evaluate`.

    :return: ``{"passed": bool, "checks": {name: {"value", "target", "ok"}}, "targets": ...}``
    """
    t = targets or Targets()
    pol, ref = report["policy"], report["reference"]
    checks = {
        "tone_gain": (pol["tone"] - ref["tone"], f">= {t.min_tone_gain:g}", pol["tone"] - ref["tone"] >= t.min_tone_gain),
        "relevance_change": (pol["relevance"] - ref["relevance"], f">= -{t.max_relevance_drop:g}",
                             pol["relevance"] - ref["relevance"] >= -t.max_relevance_drop),
        "distinct_2_change": (pol["distinct_2"] - ref["distinct_2"], f"within +-{t.max_distinct_2_change:g}",
                              abs(pol["distinct_2"] - ref["distinct_2"]) <= t.max_distinct_2_change),
        "top_3gram_share": (pol["top_3gram_share"], f"<= {t.max_top_3gram_share:g}", pol["top_3gram_share"] <= t.max_top_3gram_share),
        "kl": (pol["kl"], f"<= {t.max_kl:g}", pol["kl"] <= t.max_kl),
    }
    if t.max_negative_share_rise is not None:
        rise = pol["negative_share"] - ref["negative_share"]
        checks["negative_share_change"] = (rise, f"<= {t.max_negative_share_rise:g}", rise <= t.max_negative_share_rise + 1e-12)
    if t.max_fluent_distinct_2_change is not None:
        change = pol.get("distinct_2_fluent", float("nan")) - ref.get("distinct_2_fluent", float("nan"))
        checks["distinct_2_fluent_change"] = (change, f"within +-{t.max_fluent_distinct_2_change:g}",
                                              abs(change) <= t.max_fluent_distinct_2_change)  # nan fails
    out = {name: {"value": float(v), "target": target, "ok": bool(ok)} for name, (v, target, ok) in checks.items()}
    return {"passed": all(c["ok"] for c in out.values()), "checks": out, "targets": asdict(t)}


def format_table(report: dict, verdict: dict | None = None) -> str:
    """The judges as a text table: reference and policy columns (and the pass rule's checks)."""
    names = {"reward": "reward-model score", "tone": "tone (VADER)", "negative_share": "VADER-negative share",
             "relevance": "relevance (MiniLM cos)",
             "fluency_nll": "fluency (ref NLL/token)", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
             "distinct_2_fluent": "distinct-2, fluent only", "fluent_share": "fluent share (NLL <= 3)",
             "top_3gram_share": "top 3-gram share", "kl": "KL per response (nats)", "length": "length (tokens)"}
    lines = [f"{'judge':26s} {'reference':>10s} {'policy':>10s}"]
    for key, name in names.items():
        if key in report["reference"] and key in report["policy"]:  # (reports written before a judge was added lack it)
            lines.append(f"{name:26s} {report['reference'][key]:10.3f} {report['policy'][key]:10.3f}")
    lines.append(f"{'win rate vs reference (RM)':26s} {'':>10s} {report['win_rate']:10.3f}")
    lines.append(f"top 3-gram: reference {report['reference']['top_3gram']!r}, policy {report['policy']['top_3gram']!r}")
    if verdict is not None:
        for name, c in verdict["checks"].items():
            lines.append(f"  {name:22s} {c['value']:+.3f}  target {c['target']:14s} {'ok' if c['ok'] else 'MISSED'}")
        lines.append(f"  pass rule: {'PASS' if verdict['passed'] else 'FAIL'}")
    return "\n".join(lines)
