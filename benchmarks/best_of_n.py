"""What a reward model can give at little KL: best-of-n of the starting model, judged as the demo judges.

Best-of-n sampling (draw n answers, keep the one the reward model scores highest) is the
KL-efficient reference point of RLHF (Gao et al., 2022; Beirami et al., 2024): its KL to
the starting model is at most ``log n - (n - 1) / n`` nats, and it changes nothing but which
of the model's own answers are kept. Where best-of-n under a reward model does not meet
the demo's targets, no policy trained on that reward model at that KL can be expected to.

For each sampling seed the script draws ``--n`` answers per held-out prompt and per slot
(the demo's two slots, length and temperature), scores them with the reward model, and
judges the best of the first 1, 2, 4, ... of each slot against the demo's reference column
(the starting model sampled with the demo's evaluation seed, ``--ref-seed``) with
:func:`rlhf_env.evaluate.compare`: tone, relevance, fluency, distinct-2 (plain and
fluent-only), the most common 3-gram, and the pass rule of :class:`rlhf_env.evaluate.Targets`. ``n = 1`` is another draw of the
starting model itself: the judges' sampling noise.

``--tone-weight`` adds selections by ``z(score) + w * z(VADER)`` (both standardised over
all the answers drawn for a prompt): what a reward model that weighed tone ``w`` times as
much as its own score would select. ``--by-judge`` adds selections by each judge alone (tone,
relevance, fluency): how much distinct-2 any selection costs, whatever it selects for. Both
use the judges, so they are diagnoses of the reward model, never policies to report as
trained.

``--top-k 50`` samples without the garbled tail of the model's full distribution at
temperature 1: what the selections cost distinct-2 among fluent answers.

    python -m benchmarks.best_of_n [--n 8] [--seeds 1] [--ref-seed 12345] [--tone-weight 0,0.5] [--by-judge] [--top-k 0] [--reward default] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _standardised(x: np.ndarray) -> np.ndarray:
    """``x`` (prompts x slots x n) standardised over each prompt's answers."""
    return (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-8)


def best_of_first(candidates, key: np.ndarray, n: int):
    """The answers with the highest ``key`` among the first ``n`` of each slot.

    :param candidates: :class:`rlhf_env.generation.Completions`, slots of ``key.shape[2]``
        consecutive answers per prompt
    :param key: prompts x slots x answers per slot
    """
    from rlhf_env.best_of_n import select

    key = key.astype(np.float64)  # a copy: the caller's key is not changed
    key[..., n:] = -np.inf
    return select(candidates, key.reshape(key.shape[0], -1).tolist(), key.shape[2])


def main() -> None:
    from benchmarks.tone_noise import starting_model_and_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="answers drawn per prompt and slot (best of 1, 2, 4, ... up to it)")
    parser.add_argument("--seeds", default="1", help="comma-separated sampling seeds of the drawn answers")
    parser.add_argument("--ref-seed", type=int, default=12345, help="sampling seed of the reference column "
                        "(12345: the demo's evaluation seed at its seed 0)")
    parser.add_argument("--tone-weight", default="0", help="comma-separated weights w of z(VADER) in the selection (0: the reward model alone)")
    parser.add_argument("--by-judge", action="store_true", help="also select by tone, relevance and fluency alone")
    parser.add_argument("--top-k", type=int, default=0, help="sample the reference and the draws from the top k tokens "
                        "(0: all, the demo's distribution); log-probs and fluency are then the top-k distribution's")
    parser.add_argument("--reward", default="default", help="the reward model that selects (a name or folder)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    from rlhf_env import judges
    from rlhf_env.best_of_n import best_of_n, kl_bound
    from rlhf_env.evaluate import check_targets, compare
    from rlhf_env.generation import generate
    from rlhf_env.rewards import resolve_reward

    cfg, model, tok, prompts = starting_model_and_prompts(args)
    reward = resolve_reward(args.reward)
    slots, n_max = cfg.eval_samples, args.n
    weights = [float(w) for w in args.tone_weight.split(",")]
    flat = [p for p in prompts for _ in range(slots)]
    print(f"{args.model}, {len(prompts)} held-out prompts x {slots}, temperature {cfg.temperature}, top-k {args.top_k}, "
          f"{cfg.max_new_tokens} new tokens, reward {args.reward}, {args.threads} thread(s); reference column: seed {args.ref_seed}")

    def nll_of(c):  # the starting model's own log-probs: it is the reference
        return [float(-np.mean(x)) if x else float("nan") for g in c.logprobs for x in g]

    ref = generate(model, tok, prompts, num_samples=slots, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                   top_k=args.top_k, seed=args.ref_seed, progress="sampling the reference", logprobs=True)
    ref_texts, ref_ids, ref_nll = ref.flat(), [x for g in ref.token_ids for x in g], nll_of(ref)
    keys = ("tone", "relevance", "distinct_2", "distinct_2_fluent")
    for seed in (int(s) for s in args.seeds.split(",")):
        drawn = best_of_n((model, tok), prompts, reward, n=n_max, num_samples=slots, temperature=cfg.temperature,
                          top_k=args.top_k, max_new_tokens=cfg.max_new_tokens, seed=seed, logprobs=True)
        cands = drawn.candidates
        scores = np.asarray(drawn.candidate_scores, dtype=np.float64)  # prompts x slots x n_max
        tones = np.asarray(judges.tone(cands.flat())).reshape(scores.shape)
        z_scores, z_tones = _standardised(scores), _standardised(tones)
        selectors = {"reward" if w == 0 else f"reward+{w:g}*tone": z_scores + w * z_tones for w in weights}
        if args.by_judge:
            pool = [p for p in prompts for _ in range(slots * n_max)]
            selectors["tone"] = tones
            selectors["relevance"] = np.asarray(judges.relevance(pool, cands.flat())).reshape(scores.shape)
            selectors["fluency"] = -np.asarray(nll_of(cands)).reshape(scores.shape)
        n = 1
        while n <= n_max:
            for name, key in selectors.items() if n > 1 else [("none", z_scores)]:
                kept = best_of_first(cands, key, n)
                kl = kl_bound(n)
                report = compare(flat, kept.flat(), ref_texts, reward, reference=(model, tok),
                                 response_ids=[x for g in kept.token_ids for x in g], reference_ids=ref_ids,
                                 kls=[kl] * len(flat), response_nll=nll_of(kept), reference_nll=ref_nll, n_show=2)
                verdict = check_targets(report)
                pol, ref_col = report["policy"], report["reference"]
                row = {"seed": seed, "n": n, "select": name, "kl_at_most": round(kl, 3),
                       **{f"{k}_change": round(pol[k] - ref_col[k], 4) for k in keys},
                       "top_3gram_share": round(pol["top_3gram_share"], 3), "top_3gram": pol["top_3gram"],
                       "fluent_share": round(pol["fluent_share"], 3), "win_rate": round(report["win_rate"], 3),
                       "passed": verdict["passed"], "failed": [c for c, v in verdict["checks"].items() if not v["ok"]]}
                print(json.dumps(row), flush=True)
                if n == n_max and name in ("reward", "tone"):
                    for s in report["samples"]:
                        print(json.dumps({"prompt": s["prompt"][:60], "reference": s["reference"], "best_of_n": s["policy"]}))
            n *= 2
    print(f"reference column: tone {np.mean(judges.tone(ref_texts)):.3f}, distinct-2 {judges.distinct_n(ref_texts, 2):.3f}")


if __name__ == "__main__":
    main()
