"""The alignment comparison on the real model: PPO, GRPO, RLOO and DPO from
SmolLM2-135M-Instruct, each trained for the same CPU budget with the package's shipped
settings and judged on held-out prompts by the independent judges
(:func:`rlhf_env.compare.run_comparison`; the same as ``rlhf-env compare``).

    python -m benchmarks.alignment [--seconds 210] [--threads 1] [--out alignment_out]

Prints the judges table, the pass rule per method and the side-by-side samples; writes
``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/frontier.png``. About 25 minutes of CPU
on one thread with the defaults (4 x 210 s of training and 13 evaluations of 32 prompts x 2).
"""

from __future__ import annotations

import argparse
import subprocess

import torch


def main() -> None:
    from rlhf_env.compare import METHODS, CompareConfig, format_samples, run_comparison

    d = CompareConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seconds", type=float, default=d.seconds, help="CPU seconds of training per method")
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="alignment_out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    print(f"commit {commit}, {torch.get_num_threads()} torch thread(s)")
    result = run_comparison(args.out, methods=args.methods, seconds=args.seconds, model=args.model, seed=args.seed,
                            eval_prompts=args.eval_prompts, threads=args.threads, progress=False)
    print("\nside-by-side samples (held-out prompts, the final policies):\n")
    print(format_samples(result))
    for name, m in result["methods"].items():
        extra = f", {m['pairs']} of {m['pairs_available']} pairs" if name == "dpo" else ""
        print(f"{name}: {m['cpu_seconds']:.0f} CPU s of training, stopped by {m['stop_reason']}{extra}")


if __name__ == "__main__":
    main()
