"""``rlhf-env sft``: supervised fine-tuning of a causal LM on (prompt, response) examples."""

from __future__ import annotations

import argparse

from rlhf_env.cli._common import HelpFormatter, DEFAULT_TRAIN, add_training_flags, apply_threads, config_from_args, trainer_kwargs


def add_parser(subparsers) -> None:
    from rlhf_env.sft import SFTConfig

    d = SFTConfig()
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on (prompt, response) examples",
        description="Fine-tune a causal LM with the loss on response tokens only (prompts formatted as the "
        "environment does) and save a model folder that gym.make('TextRLHF-v0', model=DIR) accepts.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", default=str(DEFAULT_TRAIN), help="JSON Lines with 'prompt' and 'response' (or preference pairs: their 'chosen')")
    p.add_argument("--model", default="smollm2-135m", help="starting model: smollm2-135m, tiny, or a local Hugging Face model folder")
    p.add_argument("--no-eos", action="store_true", help="do not end responses with EOS (the model then does not learn to stop)")
    p.add_argument("--output", "-o", required=True, help="folder to write the fine-tuned model to (replaced atomically)")
    add_training_flags(p, d, "sft")
    p.set_defaults(func=run)


def run(args) -> int:
    from rlhf_env.sft import SFTConfig, train_sft

    apply_threads(args)
    cfg = config_from_args(SFTConfig, args, add_eos=not args.no_eos)
    model, _ = train_sft(args.data, args.model, config=cfg, **trainer_kwargs(args))
    print(*(f"{k}={v:.4f}" for k, v in model.sft_metrics.items()), f"saved={args.output}")
    return 0
