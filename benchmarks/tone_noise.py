"""The noise floor of the demo's tone judge: the starting model against itself.

Samples the demo's starting model on the held-out prompts with several sampling seeds, at
the demo's settings (``DemoConfig``: two responses per prompt, temperature 1,
``max_new_tokens``), and prints per seed the VADER mean and the share of VADER-negative
responses, on the comparison's first ``CompareConfig.eval_prompts`` prompts (32) and on all of
them (what the demo judges), with the spread over seeds. A policy that learned nothing "gains"
as much tone as two seeds differ by: a tone target smaller than that spread is decided by the
sampling seed.

    python -m benchmarks.tone_noise [--seeds 12345,1,2,3,4,5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def tone_by_seed(model, tokenizer, prompts: list[str], seeds: list[int], first: int, num_samples: int = 2,
                 max_new_tokens: int = 24, temperature: float = 1.0) -> list[dict]:
    """One row per seed: VADER mean and negative share on the first ``first`` prompts and on all."""
    from rlhf_env import judges
    from rlhf_env.generation import generate

    rows = []
    for seed in seeds:
        texts = generate(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                         max_new_tokens=max_new_tokens, seed=seed, progress=False).flat()
        tones = judges.tone(texts)  # once per text; the first prompts' responses are its head
        head = tones[: first * num_samples]
        rows.append({"seed": seed, "tone_first": float(np.mean(head)), "negative_first": judges.negative_fraction(head),
                     "tone_all": float(np.mean(tones)), "negative_all": judges.negative_fraction(tones)})
    return rows


def starting_model_and_prompts(args: argparse.Namespace):
    """``(DemoConfig(), model, tokenizer, held-out prompts)`` on ``args.threads`` threads."""
    from rlhf_env.demo import DemoConfig
    from rlhf_env.models import load_lm
    from rlhf_env.prompts import load_prompts

    torch.set_num_threads(args.threads)
    model, tok = load_lm(args.model)
    return DemoConfig(), model, tok, load_prompts(split="test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="12345,1,2,3,4,5", help="comma-separated sampling seeds")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    from rlhf_env.compare import CompareConfig

    cfg, model, tok, prompts = starting_model_and_prompts(args)
    # the comparison's subset (the demo judges them all since eval_prompts became None)
    first = CompareConfig.eval_prompts or len(prompts)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.model}, {len(prompts)} held-out prompts x {cfg.eval_samples}, temperature {cfg.temperature}, "
          f"{cfg.max_new_tokens} new tokens, {args.threads} thread(s)")
    rows = tone_by_seed(model, tok, prompts, seeds, first, cfg.eval_samples, cfg.max_new_tokens, cfg.temperature)
    for row in rows:
        print(json.dumps(row))
    for key in ("tone_first", "negative_first", "tone_all", "negative_all"):
        x = np.array([r[key] for r in rows])
        spread = x.std(ddof=1) if len(x) > 1 else float("nan")
        print(f"{key:15s} mean {x.mean():.3f}  std over seeds {spread:.3f}  range {x.min():.3f} .. {x.max():.3f}")


if __name__ == "__main__":
    main()
