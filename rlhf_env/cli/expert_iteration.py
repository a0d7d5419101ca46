"""``rlhf-env expert-iteration``: the policy learns its own best-of-n answers (best-of-n SFT)."""

from __future__ import annotations

import argparse

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
    p.add_argument("--reward", default=None,
                   help="what scores the answers: 'default', 'sentiment', 'tiny', a reward-model directory, or FILE.py:NAME (default: 'default')")
    p.add_argument("--task", default=None,
                   help="a verifiable task instead of --prompts and --reward: its train rows' questions, scored by its verifier "
                   "(chain_sum, ... or any reasoning-gym name); --min-reward then defaults to 1 (correct answers only)")
    p.add_argument("--task-config", default=None, help='with --task: generator settings as JSON, e.g. \'{"max_terms": 3}\'')
    p.add_argument("--limit", type=int, default=None, help="with --task: train on the first N train rows (default: all of them)")
    p.add_argument("--min-reward", type=float, default=None,
                   help="keep a best answer only if it scores at least this (default: every one; with --task, 1 = correct only)")
    p.add_argument("--n", type=int, default=d.n, help="answers drawn per kept answer; the reward's best is learned")
    p.add_argument("--rounds", type=int, default=d.rounds, help="sample-select-fine-tune rounds")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="kept answers per prompt per round")
    p.add_argument("--finished-only", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only best answers the model ended itself, not ones --max-new-tokens cut (default: on with --task, else off)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"length limit of a drawn answer (default: the task's with --task, else {d.max_new_tokens})")
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
    record = {}
    if args.task is None:
        if args.task_config or args.limit is not None:
            raise ValueError("--task-config and --limit need --task")
        reward = args.reward or "default"
        length = args.max_new_tokens or ExpertIterationConfig.max_new_tokens
        min_reward, finished_only = args.min_reward, bool(args.finished_only)
    else:
        if args.prompts is not None or args.reward is not None:
            raise ValueError("--task brings its own prompts and verifier: drop --prompts and --reward, or drop --task")
        from rlhf_env.cli._common import json_object
        from rlhf_env.tasks import make_task

        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        task = make_task(args.task, json_object(args.task_config, "--task-config", '{"max_terms": 3}') if args.task_config else None)
        reward, record = task.prompt_reward("train"), {"task": task.name, "task_config": task.config}
        length = args.max_new_tokens or task.max_new_tokens
        min_reward = 1.0 if args.min_reward is None else args.min_reward
        finished_only = args.finished_only is not False
    cfg = config_from_args(ExpertIterationConfig, args, max_new_tokens=length, min_reward=min_reward, finished_only=finished_only)
    cfg.check()  # before any model loads
    if args.task is None:
        prompts = load_prompts(args.prompts)  # a missing or malformed file fails here too
    else:
        prompts = [row["prompt"] for row in task.rows("train")][: args.limit]
    model, _ = train_expert_iteration(prompts, args.model, reward=reward, config=cfg, output_dir=args.output,
                                      log_dir=args.log_dir, run_name=args.run_name, device=args.device,
                                      dtype=resolve_dtype(args.dtype), progress=not args.no_progress, record=record)
    last = model.expert_iteration_metrics[-1]
    print(f"reward_mean={last['rollout/reward_mean']:.4f} best_of_n_reward_mean={last['rollout/best_of_n_reward_mean']:.4f} "
          f"train/loss={last['train/loss']:.4f} saved={args.output}")
    task_flags = f" --task {args.task}" + (f" --task-config '{args.task_config}'" if args.task_config else "") if args.task else ""
    print(f"judge it on held-out prompts: rlhf-env eval {args.output}{task_flags}")
    return 0
