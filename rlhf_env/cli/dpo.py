"""``rlhf-env dpo``: Direct Preference Optimisation of a causal LM on preference pairs."""

from __future__ import annotations

import argparse

from rlhf_env.cli._common import (
    DEFAULT_PAIRS_HELP, HelpFormatter, add_eval_flags, add_training_flags, apply_threads, block_count, config_from_args, trainer_kwargs,
    train_and_eval_pairs,
)


def add_parser(subparsers) -> None:
    from rlhf_env.dpo import DPOConfig

    d = DPOConfig()
    p = subparsers.add_parser(
        "dpo",
        help="Direct Preference Optimisation on preference pairs",
        description="Train a causal LM with the DPO loss -log sigmoid(beta*log(pi/pi_ref)(chosen) - "
        "beta*log(pi/pi_ref)(rejected)) and save a model folder that gym.make('TextRLHF-v0', model=DIR) accepts.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--train", default="default", help=DEFAULT_PAIRS_HELP)
    add_eval_flags(p)
    p.add_argument("--model", default="smollm2-135m", help="policy to train: smollm2-135m, tiny, or a local Hugging Face model folder")
    p.add_argument("--reference", default=None, help="frozen reference model (default: the policy before training)")
    p.add_argument("--beta", type=float, default=d.beta, help="DPO beta: strength of the implicit KL constraint")
    p.add_argument("--trainable-layers", type=block_count(1), default=d.trainable_layers,
                   help="train only the last N transformer blocks and the final norm; 'all' trains every weight")
    p.add_argument("--no-keep-trunk", action="store_true",
                   help="run full forwards every step instead of keeping the frozen lower blocks' output (same result, slower)")
    p.add_argument("--no-group-by-prompt", action="store_true",
                   help="draw --batch-size pairs freely per step instead of whole prompts (all their pairs, each distinct response run once)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="train LoRA adapters of this rank instead of the weights (in the last --trainable-layers blocks, "
                   "or every block with 'all'); merged into the saved model")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scaling numerator; none means 2 x rank")
    p.add_argument("--lora-targets", default=",".join(d.lora_targets), help="comma-separated names of the linear layers that get adapters")
    p.add_argument("--output", "-o", required=True, help="folder to write the trained policy to (replaced atomically)")
    add_training_flags(p, d, "dpo")
    p.set_defaults(func=run)



def run(args) -> int:
    from rlhf_env.dpo import DPOConfig, train_dpo

    apply_threads(args)
    train, held_out = train_and_eval_pairs(args)
    cfg = config_from_args(
        DPOConfig, args, keep_trunk=not args.no_keep_trunk, group_by_prompt=not args.no_group_by_prompt,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
    )
    model, _ = train_dpo(train, args.model, reference=args.reference, config=cfg, eval_pairs=held_out, **trainer_kwargs(args))
    print(" ".join(f"{k}={v:.4f}" for k, v in model.dpo_metrics.items()), f"saved={args.output}")
    return 0
