"""Flags shared by the offline-training subcommands (train-rm, sft, dpo)."""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent.parent / "assets" / "task"
DEFAULT_TRAIN = TASK_DIR / "pairs_train.jsonl"
DEFAULT_EVAL = TASK_DIR / "pairs_test.jsonl"
DEFAULT_PAIRS_HELP = ("training pairs: JSON Lines of {prompt, chosen, rejected}, or 'default': the default task's "
                      "pairs_train.jsonl (pairs the independent judges agree on plus failure modes, 3,259 pairs; "
                      "rlhf_env.default_reward_model.default_training_pairs)")


def training_pairs(value: str):
    """The ``--train`` value of train-rm and dpo: ``'default'`` gives the default task's
    training pairs (what :meth:`rlhf_env.RewardModel.default` trains on), anything else is a
    JSON Lines path, returned as is for the trainer to load."""
    if value == "default":
        from rlhf_env.default_reward_model import default_training_pairs

        return default_training_pairs()
    return value


def block_count(minimum: int = 1):
    """An argparse ``type`` for "the last N transformer blocks, or all weights": ``'all'``
    (or ``'none'``) gives None, a number ``>= minimum`` gives that int; anything else is a
    one-line usage error naming the value."""

    def parse(text: str) -> int | None:
        if str(text).lower() in ("all", "none"):
            return None
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of blocks >= {minimum} or 'all', got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected a number of blocks >= {minimum} or 'all', got {n}")
        return n

    return parse


def add_training_flags(p: argparse.ArgumentParser, defaults, run_name: str) -> None:
    """--learning-rate, --batch-size, --epochs, --max-length, --seed, --device, --dtype,
    --log-dir, --run-name, --threads, --no-progress, with the config dataclass's defaults."""
    p.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate, help=f"AdamW learning rate (default: {defaults.learning_rate})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"examples (pairs) per optimiser step (default: {defaults.batch_size})")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help=f"passes over the training data (default: {defaults.epochs})")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help=f"longest input in tokens; the prompt's start is cut first (default: {defaults.max_length})")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help=f"AdamW weight decay (default: {defaults.weight_decay})")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed for initialisation and data order (default: {defaults.seed})")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (default: float32)")
    p.add_argument("--log-dir", default=None, help="TensorBoard root; the run goes to LOG_DIR/RUN_NAME_k (default: no logging)")
    p.add_argument("--run-name", default=run_name, help=f"TensorBoard run name (default: {run_name})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints (model, optimizer, data position, RNG) here; "
                   "Ctrl-C or SIGTERM then writes a final one and exits cleanly")
    p.add_argument("--checkpoint-every", type=int, default=None, help="optimiser steps between checkpoints (default: at the end and on interrupt)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint file or folder written with --checkpoint-dir (same data and batch size)")
    p.add_argument("--on-nonfinite", default="raise", choices=["raise", "skip"], help="a NaN/inf loss or gradient stops training (raise) or drops the batch (skip)")


def checkpoint_kwargs(args) -> dict:
    """The trainers' checkpoint/resume/guard arguments from the flags above."""
    return dict(checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume_from=args.resume, on_nonfinite=args.on_nonfinite)


def apply_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def resolve_dtype(name):
    if name is None:
        return None
    import torch

    return getattr(torch, name)
