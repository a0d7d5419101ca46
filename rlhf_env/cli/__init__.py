"""The ``rlhf-env`` console script.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the subcommand and sets ``func`` on it.
Errors are printed as one line (``--debug`` shows the traceback) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand modules, in the order --help lists them
COMMAND_MODULES = ["train", "plot", "train_rm", "sft", "dpo", "expert_iteration", "demo", "eval", "compare", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-env",
        description="RLHF of language models as a Gymnasium problem: train agents, "
        "reward models, SFT and DPO; run the demo and the benchmarks.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"rlhf_env.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built in this checkout
            if exc.name == f"rlhf_env.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [o for action in sub._actions for o in action.option_strings if len(o) > 2]  # -tb, --save; not -h
    hints = []
    for flag in (e.split("=", 1)[0] for e in extra if e.startswith("-")):
        match = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        if match:
            hints.append(f"{flag} -> {match[0]}")
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {', '.join(hints)}?)" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, before or after the subcommand
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser (its usage, not the top-level one), with a hint
        _unrecognized(parser, args.command, extra)
    args.debug = debug
    if os.environ.get("RANK", "0") not in ("", "0"):
        # under torchrun only rank 0 reports; the other ranks still print errors (stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        if getattr(args, "device", None) is not None:  # a GPU this machine lacks: one line before any work
            from rlhf_env.envs.device import check_device

            check_device(args.device)
        if getattr(args, "reward", None) is not None:  # a misspelled --reward: one line before any model loads
            from rlhf_env.rewards import check_reward

            check_reward(args.reward, "--reward")
        result = args.func(args)
    except KeyboardInterrupt as exc:
        # agents.guards.TrainingInterrupted carries the final checkpoint it wrote
        checkpoint = getattr(exc, "checkpoint", None)
        if checkpoint:
            print(f"rlhf-env {args.command}: {exc}; continue with --resume {checkpoint}", file=sys.stderr)
        else:
            print("rlhf-env: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"rlhf-env {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
