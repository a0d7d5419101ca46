"""``rlhf-env train-rm``: train a reward model on preference pairs."""

from __future__ import annotations

import argparse

from rlhf_env.cli._common import (
    DEFAULT_PAIRS_HELP, HelpFormatter, add_eval_flags, add_training_flags, apply_threads, config_from_args, trainer_kwargs, train_and_eval_pairs,
)


def add_parser(subparsers) -> None:
    from rlhf_env.default_reward_model import default_config
    from rlhf_env.precision import AUTOCAST_CHOICES
    from rlhf_env.reward_model import DEFAULT_BACKBONE

    d = default_config()  # with no flags: the same pairs and settings as RewardModel.default()
    p = subparsers.add_parser(
        "train-rm",
        help="train a reward model on preference pairs (JSON Lines)",
        description="Train a reward model with the loss -log sigmoid(s_chosen - s_rejected) and save it "
        "as a folder that RewardModel.load and gym.make('TextRLHF-v0', reward_model=DIR) accept.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--train", default="default", help=DEFAULT_PAIRS_HELP)
    add_eval_flags(p)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="all-minilm-l6-v2, tiny, smollm2-135m, or a local Hugging Face model folder")
    p.add_argument("--pooling", default=None, choices=["first", "mean", "last"], help="hidden state the head reads (default: mean for encoders, last for causal LMs)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps with linear learning-rate warm-up")
    p.add_argument("--train-layers", type=int, default=d.train_layers, help="train only the top N blocks of an encoder backbone "
                   "(and the head) over a frozen trunk run once per input (default: all blocks)")
    p.add_argument("--no-group-by-prompt", dest="group_by_prompt", action="store_false", help="draw pairs freely instead of whole prompts "
                   "whose shared responses are scored once (same loss, more forward passes)")
    p.add_argument("--autocast", default=d.autocast, choices=list(AUTOCAST_CHOICES), help="mixed precision of training steps: off = float32; "
                   "auto = bfloat16 autocast where the device computes bf16 natively (CUDA with bf16, CPU with AMX/AVX512-BF16), "
                   "bf16 = always; weights, optimizer and loss stay float32")
    p.add_argument("--output", "-o", required=True, help="folder to write the reward model to (replaced atomically)")
    add_training_flags(p, d, "reward_model")
    p.set_defaults(func=run)


def run(args) -> int:
    from rlhf_env.reward_trainer import RewardModelConfig, train_reward_model

    apply_threads(args)
    cfg = config_from_args(RewardModelConfig, args)
    train, held_out = train_and_eval_pairs(args)
    rm = train_reward_model(train, backbone=args.backbone, eval_pairs=held_out, config=cfg, **trainer_kwargs(args))
    print(" ".join(f"{k}={v:.4f}" for k, v in rm.metrics.items()), f"saved={args.output}")
    return 0
