"""``rlhf-env compare``: PPO, GRPO, RLOO and DPO from the same model at the same CPU budget,
judged side by side (:func:`rlhf_env.compare.run_comparison`)."""

from __future__ import annotations

import argparse

from rlhf_env.cli._common import HelpFormatter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from rlhf_env.compare import METHODS, CompareConfig
    from rlhf_env.dpo import DPOConfig

    d = CompareConfig()
    p = subparsers.add_parser(
        "compare",
        help="PPO vs GRPO vs RLOO vs DPO on the default task at the same CPU budget, judged by the independent judges",
        description="Train each method from the same starting model with the package's shipped settings for the same "
        "CPU budget, judge each policy on held-out prompts at a few checkpoints (reward-model score, win rate, KL, "
        "tone, relevance, fluency, diversity), print one table and write DIR/compare.json, DIR/compare.md and "
        "DIR/frontier.png (reward-model score and tone against KL, one curve per method).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seconds", type=float, default=d.seconds,
                   help="CPU seconds of training per method (process time, evaluations not counted)")
    p.add_argument("--out", default="compare_out", help="output directory")
    p.add_argument("--model", default=d.model, help="starting model of every method: smollm2-135m, tiny or a directory")
    p.add_argument("--reward", default=None,
                   help="reward model: 'default', 'sentiment', 'tiny' or a directory (default: the env's, 'tiny' for the tiny model)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed of every method")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="held-out prompts judged (the first N of 60)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="responses per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="response length in training and evaluation")
    p.add_argument("--checkpoints", type=int, default=d.checkpoints, help="evaluations per method, evenly spaced over its budget")
    p.add_argument("--dpo-pairs", default="budget",
                   help="DPO's training pairs: 'budget' (as many as it can prepare and train on within --seconds), 'all', or a number")
    p.add_argument("--dpo-lr", type=float, default=DPOConfig.learning_rate,
                   help="DPO's learning rate (its other settings are rlhf_env.dpo.DPOConfig's defaults)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=d.device, help="torch device")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlhf_env.compare import check_methods, run_comparison

    methods = check_methods(args.methods)  # a clear error before any model loads
    dpo_pairs = args.dpo_pairs.lower()
    if dpo_pairs == "all":
        dpo_pairs = None
    elif dpo_pairs != "budget":
        if not dpo_pairs.isdigit() or int(dpo_pairs) < 1:
            raise ValueError(f"--dpo-pairs must be 'budget', 'all' or a positive number, got {args.dpo_pairs!r}")
        dpo_pairs = int(dpo_pairs)
    run_comparison(
        args.out, methods=methods, seconds=args.seconds, model=args.model, reward=args.reward, seed=args.seed,
        eval_prompts=args.eval_prompts, eval_samples=args.eval_samples, max_new_tokens=args.max_new_tokens,
        checkpoints=args.checkpoints, dpo_pairs=dpo_pairs,
        dpo_settings={"learning_rate": args.dpo_lr}, threads=args.threads, device=args.device,
        progress=not args.no_progress,
    )
    return 0
