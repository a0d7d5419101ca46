"""Sampling several answers per prompt: the package's sampler against Hugging Face ``generate``.

Best-of-n, expert iteration and evaluation draw ``n`` answers for each prompt.
``rlhf_env.generation.generate`` prefills each prompt once and repeats its KV cache for the
``n`` answers (``share_prompt_cache=True``, the default); Hugging Face's
``generate(num_return_sequences=n)`` (``share_prompt_cache=False``, the same batching and
seed otherwise) prefills each copy. Both run here on the same held-out prompts, in
alternation, and the script prints CPU seconds of each and their ratio, and whether they drew
the same tokens (they should, up to float rounding).

    python -m benchmarks.sampling [--model smollm2-135m] [--prompts 16] [--n 2 8] [--new-tokens 24 48] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    from rlhf_env.generation import generate
    from rlhf_env.models import load_lm
    from rlhf_env.prompts import load_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts (the default task's test split)")
    p.add_argument("--n", type=int, nargs="+", default=[2, 8], help="answers per prompt")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[24, 48])
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(args.model)
    prompts = load_prompts(split="test")[: args.prompts]
    generate(model, tokenizer, prompts[:2], num_samples=2, max_new_tokens=4, progress=False)  # warm-up
    print(f"{args.model}, {len(prompts)} prompts, batch {args.batch_size}, {args.threads} thread(s); CPU s, best of {args.repeats}")
    print(f"{'n':>3} {'tokens':>6} {'HF generate':>12} {'shared cache':>13} {'ratio':>6}  same tokens")
    for n in args.n:
        for new_tokens in args.new_tokens:
            times = {True: [], False: []}
            outs = {}
            for _ in range(args.repeats):
                for share in (False, True):
                    t = time.process_time()
                    outs[share] = generate(model, tokenizer, prompts, num_samples=n, max_new_tokens=new_tokens, batch_size=args.batch_size,
                                           seed=0, progress=False, share_prompt_cache=share)
                    times[share].append(time.process_time() - t)
            peer, ours = min(times[False]), min(times[True])
            same = sum(a == b for x, y in zip(outs[True].token_ids, outs[False].token_ids) for a, b in zip(x, y))
            print(f"{n:>3} {new_tokens:>6} {peer:>12.1f} {ours:>13.1f} {peer / ours:>6.2f}  {same}/{len(prompts) * n}", flush=True)


if __name__ == "__main__":
    main()
