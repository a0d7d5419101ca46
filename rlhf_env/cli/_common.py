"""Flags shared by the offline-training subcommands (train-rm, sft, dpo)."""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent.parent / "assets" / "task"
DEFAULT_TRAIN = TASK_DIR / "pairs_train.jsonl"
DEFAULT_EVAL = TASK_DIR / "pairs_test.jsonl"
DEFAULT_PAIRS_HELP = ("training pairs: JSON Lines of {prompt, chosen, rejected}, or 'default': the default task's "
                      "pairs_train.jsonl (pairs the independent judges agree on plus failure modes; "
                      "rlhf_env.default_reward_model.default_training_pairs)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default said once: appended as ``(default: X)`` unless the
    help text already says it, and left out for switches and unset (None) defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def json_object(text: str, flag: str, example: str) -> dict:
    """The JSON object a flag holds (``--env-kwargs``, ``--task-config``), or one line that
    says what is wrong and shows the form (``key=value`` or Python's quotes are common slips).

    :raises ValueError: the text is not JSON, or not a JSON object
    """
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object, e.g. {flag} '{example}' (double quotes, in single "
                         f"quotes for the shell); got {text!r} ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. {flag} '{example}'; got {text!r}")
    return value


def training_pairs(value: str):
    """The ``--train`` value of train-rm and dpo: ``'default'`` gives the default task's
    training pairs (what :meth:`rlhf_env.RewardModel.default` trains on), anything else is a
    JSON Lines path, returned as is for the trainer to load."""
    if value == "default":
        from rlhf_env.default_reward_model import default_training_pairs

        return default_training_pairs()
    return value


EVAL_HELP = ("held-out pairs evaluated after each epoch: a JSON Lines file, 'none', or 'auto': with --train default the "
             "default task's pairs_test.jsonl, else --eval-fraction of the prompts of --train, held out (never trained on)")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """--eval and --eval-fraction of train-rm and dpo (see :func:`train_and_eval_pairs`)."""
    p.add_argument("--eval", default="auto", help=EVAL_HELP + " (default: auto)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --train's prompts held out by --eval auto")


def train_and_eval_pairs(args):
    """``(train, eval)`` of train-rm and dpo: ``--train default`` with ``--eval auto`` pairs the
    default task's train and test files; a user's ``--train`` file with ``--eval auto`` is split
    by prompt (:func:`rlhf_env.data.split_pairs`, seeded by ``--seed``), so the reported
    accuracy is on that user's own held-out prompts; ``--eval none`` gives None."""
    from rlhf_env.data import load_preferences, split_pairs

    choice = str(args.eval)
    if choice.lower() == "none":
        return training_pairs(args.train), None
    if choice.lower() != "auto":
        return training_pairs(args.train), choice
    if args.train == "default":
        return training_pairs(args.train), str(DEFAULT_EVAL)
    train, held_out = split_pairs(load_preferences(args.train), args.eval_fraction, seed=args.seed)
    if not held_out:
        print(f"{args.train} has a single prompt: no held-out split, no evaluation (pass --eval FILE)")
        return train, None
    print(f"evaluating on {len(held_out)} pairs of {len({p.prompt for p in held_out})} held-out prompts of "
          f"{args.train} (--eval-fraction {args.eval_fraction}); training on the other {len(train)} pairs")
    return train, held_out


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


def add_training_flags(p: argparse.ArgumentParser, defaults, run_name: str, resumable: bool = True) -> None:
    """--learning-rate, --batch-size, --epochs, --max-length, --seed, --device, --dtype,
    --log-dir, --run-name, --threads, --no-progress, with the config dataclass's defaults;
    with ``resumable``, the checkpoint flags and --on-nonfinite too."""
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
    if not resumable:
        return
    p.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints (model, optimizer, data position, RNG) here; "
                   "Ctrl-C or SIGTERM then writes a final one and exits cleanly")
    p.add_argument("--checkpoint-every", type=int, default=None, help="optimiser steps between checkpoints (default: at the end and on interrupt)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint file or folder written with --checkpoint-dir (same data and batch size)")
    p.add_argument("--on-nonfinite", default="raise", choices=["raise", "skip"], help="a NaN/inf loss or gradient stops training (raise) or drops the batch (skip)")


def config_from_args(config_class, args, **overrides):
    """A trainer's config dataclass from the parsed flags: each field whose flag has the same
    name (``--learning-rate`` -> ``learning_rate``), then ``overrides`` for the rest."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    return config_class(**{**values, **overrides})


def trainer_kwargs(args) -> dict:
    """The offline trainers' common arguments from :func:`add_training_flags`' flags: output,
    logging, device, dtype, progress bar, checkpoints, resume and the non-finite guard."""
    return dict(output_dir=args.output, log_dir=args.log_dir, run_name=args.run_name, device=args.device,
                dtype=resolve_dtype(args.dtype), progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, resume_from=args.resume, on_nonfinite=args.on_nonfinite)


def apply_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def resolve_dtype(name):
    if name is None:
        return None
    import torch

    return getattr(torch, name)
