"""How much tone the starting model has in it without RL: its own friendly mode, judged as the demo judges.

The demo asks RLHF for +0.15 of VADER tone on the held-out prompts while distinct-2 stays
within 0.03. This script measures a policy that needs no training and that a reader would
call warm and varied: the starting model itself under the default task's friendly system
message (``rlhf_env.default_task.build.FRIENDLY_SYSTEM``, the message of the shipped
friendly sampling round). For each sampling seed it samples the held-out prompts twice
with and twice without that message (the demo's length and temperature), and judges the
friendly answers against the plain ones with :func:`rlhf_env.evaluate.compare`: tone,
relevance, fluency (the plain model's NLL), distinct-2, the default reward model's score,
and the KL per response of the friendly mode to the plain model (``log p(y | friendly) -
log p(y | plain)`` summed over the response, the KL an RL policy that wrote exactly these
answers would be charged). A point on the tone-for-diversity frontier that no reward
model shaped.

    python -m benchmarks.friendly_mode [--seeds 0,1,2] [--reward default] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    from benchmarks.tone_noise import starting_model_and_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated sampling seeds")
    parser.add_argument("--reward", default="default", help="the reward model of the score column")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    import torch

    from rlhf_env import judges
    from rlhf_env.default_task.build import FRIENDLY_SYSTEM
    from rlhf_env.evaluate import compare
    from rlhf_env.generation import generate
    from rlhf_env.rewards import resolve_reward

    cfg, model, tok, prompts = starting_model_and_prompts(args)
    reward = resolve_reward(args.reward)
    flat = [p for p in prompts for _ in range(cfg.eval_samples)]
    print(f"{args.model}, {len(prompts)} held-out prompts x {cfg.eval_samples}, temperature {cfg.temperature}, "
          f"{cfg.max_new_tokens} new tokens, reward {args.reward}, {args.threads} thread(s); friendly: {FRIENDLY_SYSTEM!r}")
    keys = ("reward", "tone", "negative_share", "relevance", "fluency_nll", "distinct_2", "distinct_2_fluent",
            "top_3gram_share", "kl")
    changes = []
    for seed in (int(s) for s in args.seeds.split(",")):
        sides = {}
        for name, system in (("plain", None), ("friendly", FRIENDLY_SYSTEM)):
            kw = {} if system is None else {"system_prompt": system}
            c = generate(model, tok, prompts, num_samples=cfg.eval_samples, temperature=cfg.temperature,
                         max_new_tokens=cfg.max_new_tokens, seed=seed, progress=False, logprobs=True, **kw)
            sides[name] = (c.flat(), [x for g in c.token_ids for x in g],
                           [torch.tensor(x) if x else None for g in c.logprobs for x in g])
        texts, ids, own_lp = sides["friendly"]
        plain_lp = judges.response_logprobs(model, tok, flat, ids, temperature=cfg.temperature)
        kls = [float((a - b).sum()) if a is not None else 0.0 for a, b in zip(own_lp, plain_lp)]
        nll = [float(-lp.mean()) if lp is not None else float("nan") for lp in plain_lp]
        ref_texts, ref_ids, ref_lp = sides["plain"]
        ref_nll = [float(-lp.mean()) if lp is not None else float("nan") for lp in ref_lp]
        report = compare(flat, texts, ref_texts, reward, reference=(model, tok), response_ids=ids, reference_ids=ref_ids,
                         kls=kls, response_nll=nll, reference_nll=ref_nll, n_show=3)
        change = {k: report["policy"][k] - report["reference"][k] for k in keys if k != "kl"}
        change["kl"] = report["policy"]["kl"]
        changes.append(change)
        print(json.dumps({"seed": seed, "plain": {k: report["reference"][k] for k in keys if k != "kl"},
                          "friendly": {k: report["policy"][k] for k in keys}, "win_rate": report["win_rate"]}))
        for row in report["samples"]:
            print(json.dumps({"prompt": row["prompt"][:60], "plain": row["reference"], "friendly": row["policy"]}))
    print("friendly minus plain, mean over seeds (min .. max): " + ", ".join(
        f"{k} {np.mean([c[k] for c in changes]):+.3f} ({min(c[k] for c in changes):+.3f} .. {max(c[k] for c in changes):+.3f})"
        for k in keys))


if __name__ == "__main__":
    main()
