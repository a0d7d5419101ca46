"""``rlhf-env expert-iteration``: the policy learns its own best-of-n answers (best-of-n SFT)."""

from __future__ import annotations

from rlhf_env.cli._common import HelpFormatter, add_training_flags, apply_threads, config_from_args, resolve_dtype


def add_parser(subparsers) -> None:
    from rlhf_env.expert_iteration import ExpertIterationConfig

    d = ExpertIterationConfig()
    p = subparsers.add_parser(
        "expert-iteration",
        help="expert iteration: fine-tune on the policy's own best-of-n answers under a reward",
        description="Each round: draw N answers per prompt from the policy, keep the one the reward scores highest, "
        "and fine-tune the policy on the kept answers (SFT loss on their own tokens). Saves a model folder that "
        "rlhf-env eval and gym.make('TextRLHF-v0', model=DIR) accept.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--prompts", default=None, help="training prompts, a .txt (one per line) or .jsonl file (default: the default task's train prompts)")
    p.add_argument("--model", default="smollm2-135m", help="starting model: smollm2-135m, tiny, or a local Hugging Face model folder")
    p.add_argument("--reward", default="default",
                   help="what scores the answers: 'default', 'sentiment', 'tiny', a reward-model directory, or FILE.py:NAME")
    p.add_argument("--n", type=int, default=d.n, help="answers drawn per kept answer; the reward's best is learned")
    p.add_argument("--rounds", type=int, default=d.rounds, help="sample-select-fine-tune rounds")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="kept answers per prompt per round")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length limit of a drawn answer")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature of the draws")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k of the draws (0: off)")
    p.add_argument("--sample-batch-size", type=int, default=d.sample_batch_size, help="sequences per generate call while drawing")
    p.add_argument("--output", "-o", required=True, help="folder to write the trained policy to (replaced atomically)")
    add_training_flags(p, d, "expert_iteration", resumable=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from rlhf_env.expert_iteration import ExpertIterationConfig, train_expert_iteration
    from rlhf_env.prompts import load_prompts

    apply_threads(args)
    cfg = config_from_args(ExpertIterationConfig, args)
    cfg.check()  # before any model loads
    prompts = load_prompts(args.prompts)  # a missing or malformed file fails here too
    model, _ = train_expert_iteration(prompts, args.model, reward=args.reward, config=cfg, output_dir=args.output,
                                      log_dir=args.log_dir, run_name=args.run_name, device=args.device,
                                      dtype=resolve_dtype(args.dtype), progress=not args.no_progress)
    last = model.expert_iteration_metrics[-1]
    print(f"reward_mean={last['rollout/reward_mean']:.4f} best_of_n_reward_mean={last['rollout/best_of_n_reward_mean']:.4f} "
          f"train/loss={last['train/loss']:.4f} saved={args.output}")
    print(f"judge it on held-out prompts: rlhf-env eval {args.output}")
    return 0
