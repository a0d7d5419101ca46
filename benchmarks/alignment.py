"""The alignment comparison on the real model: PPO, GRPO, RLOO and DPO from
SmolLM2-135M-Instruct, each trained for the same CPU budget with the package's shipped
settings and judged on held-out prompts by the independent judges
(:func:`rlhf_env.compare.run_comparison`; the same as ``rlhf-env compare``).

    python -m benchmarks.alignment [--seconds 210] [--threads 1] [--out alignment_out]
    python -m benchmarks.alignment --merge RUN1:ppo,dpo RUN2 --out DIR   # methods of several runs, same settings

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
    from rlhf_env.dpo import DPOConfig

    d = CompareConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seconds", type=float, default=d.seconds, help="CPU seconds of training per method")
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    parser.add_argument("--dpo-lr", type=float, default=DPOConfig.learning_rate, help="DPO's learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="alignment_out")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RUN",
                        help="instead of training: put the methods of these output folders (same settings) side by side; "
                        "DIR:ppo,dpo takes only those methods of DIR")
    args = parser.parse_args()
    if args.merge:
        import json

        from rlhf_env.compare import check_methods, format_tables, merge_results, write_outputs

        runs = []
        for spec in args.merge:  # DIR or DIR:method,method (only those methods of that run)
            folder, _, names = spec.partition(":")
            run = json.loads(open(f"{folder}/compare.json").read())
            if names:
                run["methods"] = {k: v for k, v in run["methods"].items() if k in check_methods(names)}
            runs.append(run)
        result = merge_results(runs)
        write_outputs(result, args.out)
        print(format_tables(result))
        print("\nside-by-side samples (held-out prompts, the final policies):\n")
        print(format_samples(result))
        print(f"wrote {args.out}/compare.json, compare.md, frontier.png")
        return
    torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    print(f"commit {commit}, {torch.get_num_threads()} torch thread(s)")
    result = run_comparison(args.out, methods=args.methods, seconds=args.seconds, model=args.model, seed=args.seed,
                            eval_prompts=args.eval_prompts, threads=args.threads, progress=False,
                            dpo_settings={"learning_rate": args.dpo_lr})
    print("\nside-by-side samples (held-out prompts, the final policies):\n")
    print(format_samples(result))
    for name, m in result["methods"].items():
        extra = f", {m['pairs']} of {m['pairs_available']} pairs" if name == "dpo" else ""
        print(f"{name}: {m['cpu_seconds']:.0f} CPU s of training, stopped by {m['stop_reason']}{extra}")


if __name__ == "__main__":
    main()
