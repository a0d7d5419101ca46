"""What the demo's distinct-2 bound measures: the starting model against itself.

Samples the demo's starting model on all held-out prompts (two responses per prompt, the
demo's response length) at several sampling seeds and temperatures, scores each response's
fluency (the model's own NLL per token), and prints per column: distinct-2 (the demo's
judge), the share of fluent responses (NLL <= ``judges.FLUENT_NLL``), and, against the first
temperature-1 column, the change of distinct-2 and of the fluent-only distinct-2
(``judges.fluent_distinct_n`` at equal count). Then, for every pair of temperature-1 seeds, a
"policy" that is no policy at all: for each prompt the two most fluent of the model's own
four responses, judged against the first seed's column. If plain distinct-2 fails that
selection, the bound punishes a policy for no longer writing the starting model's garbled
tail, not for converging on one phrasing.

    python -m benchmarks.diversity_noise [--seeds 12345,12346,12347,1,2] [--low 0.8:12345,0.8:12346,0.7:12345] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def column(texts: list[str], nll: list[float]) -> dict:
    """distinct-2, mean NLL and the fluent share of one column of responses."""
    from rlhf_env import judges

    return {"distinct_2": judges.distinct_n(texts, 2), "nll": float(np.nanmean(nll)),
            "fluent_share": float(np.mean([x <= judges.FLUENT_NLL for x in nll]))}


def change(ref: tuple[list[str], list[float]], other: tuple[list[str], list[float]]) -> dict:
    """Plain and fluent-only distinct-2 of ``other`` minus ``ref``'s (fluent-only at the
    smaller count of fluent responses, as :func:`rlhf_env.evaluate.compare` does)."""
    from rlhf_env import judges

    k = min(sum(x <= judges.FLUENT_NLL for x in ref[1]), sum(x <= judges.FLUENT_NLL for x in other[1]))
    return {"distinct_2": judges.distinct_n(other[0], 2) - judges.distinct_n(ref[0], 2),
            "fluent_distinct_2": judges.fluent_distinct_n(other[0], other[1], 2, k) - judges.fluent_distinct_n(ref[0], ref[1], 2, k)}


def most_fluent(a: tuple[list[str], list[float]], b: tuple[list[str], list[float]], per_prompt: int = 2) -> tuple[list[str], list[float]]:
    """For each prompt, the ``per_prompt`` most fluent of its responses in two columns
    (``per_prompt`` responses per prompt each, in prompt order)."""
    texts, nll = [], []
    for i in range(0, len(a[0]), per_prompt):
        cand = sorted(zip(a[1][i:i + per_prompt] + b[1][i:i + per_prompt], a[0][i:i + per_prompt] + b[0][i:i + per_prompt]))
        texts += [t for _, t in cand[:per_prompt]]
        nll += [x for x, _ in cand[:per_prompt]]
    return texts, nll


def main() -> None:
    from benchmarks.tone_noise import starting_model_and_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="12345,12346,12347,1,2", help="temperature-1 sampling seeds (the first is the reference column)")
    parser.add_argument("--low", default="0.8:12345,0.8:12346,0.7:12345", help="TEMPERATURE:SEED columns below temperature 1")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    from rlhf_env import judges
    from rlhf_env.generation import generate

    cfg, model, tok, prompts = starting_model_and_prompts(args)
    flat = [p for p in prompts for _ in range(cfg.eval_samples)]
    runs = [(1.0, int(s)) for s in args.seeds.split(",")]
    runs += [(float(x.split(":")[0]), int(x.split(":")[1])) for x in args.low.split(",") if x]
    print(f"{args.model}, {len(prompts)} held-out prompts x {cfg.eval_samples}, {cfg.max_new_tokens} new tokens, "
          f"fluent: NLL <= {judges.FLUENT_NLL} nats/token, {args.threads} thread(s)")
    cols = {}
    for temp, seed in runs:
        c = generate(model, tok, prompts, num_samples=cfg.eval_samples, temperature=temp, max_new_tokens=cfg.max_new_tokens,
                     seed=seed, progress=False)
        ids = [x for g in c.token_ids for x in g]
        cols[(temp, seed)] = (c.flat(), judges.fluency(model, tok, flat, ids))
    first = cols[runs[0]]
    for key in runs:
        row = {"temperature": key[0], "seed": key[1], **column(*cols[key])}
        if key != runs[0]:
            row["vs_first"] = change(first, cols[key])
        print(json.dumps(row))
    t1 = [k for k in runs if k[0] == 1.0]
    plain, fluent = [], []
    for a, b in itertools.combinations(t1, 2):
        c = change(cols[a], most_fluent(cols[a], cols[b], cfg.eval_samples))
        plain.append(c["distinct_2"])
        fluent.append(c["fluent_distinct_2"])
        print(json.dumps({"most_fluent_of": [a[1], b[1]], "against": a[1], **c}))
    if plain:
        print(f"the model's own most fluent half, against its column: distinct-2 {np.mean(plain):+.3f} "
              f"({min(plain):+.3f} .. {max(plain):+.3f}), fluent-only distinct-2 {np.mean(fluent):+.3f} "
              f"({min(fluent):+.3f} .. {max(fluent):+.3f})")


if __name__ == "__main__":
    main()
