"""``rlhf-env bench NAME [ARGS...]``: run one of the benchmark scripts of ``benchmarks/``.

Each benchmark runs our code and its peer in the same process and prints ratios;
everything after NAME is passed to the script (``rlhf-env bench rlhf --help``).
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, what it measures)
BENCHMARKS = {
    "classic": ("benchmarks.classic", "agents vs Stable-Baselines3 on classic control (speed and learning)"),
    "textenv": ("benchmarks.textenv", "batched text env vs Hugging Face generate + reference forward"),
    "pipeline": ("benchmarks.pipeline", "reward model / SFT / DPO trainers vs TRL"),
    "rlhf": ("benchmarks.rlhf", "our GRPO vs TRL GRPOTrainer; per-phase time of a PPO iteration"),
    "soak": ("benchmarks.soak", "long runs: memory and speed stay flat"),
    "learning_offline": ("benchmarks.learning_offline", "offline learning (reward model, SFT, DPO) quality"),
    "rlvr": ("benchmarks.rlvr", "our default verifiable-task method vs TRL GRPOTrainer: held-out accuracy and steps per CPU second"),
    "alignment": ("benchmarks.alignment", "PPO vs GRPO vs RLOO vs DPO on SmolLM2 at the same CPU budget, judged (rlhf-env compare)"),
    "export": ("benchmarks.export", "size and time of a text agent's checkpoint and of its Hugging Face export"),
    "reward_probes": ("benchmarks.reward_probes", "the default reward model's held-out and hand-written accuracy, correctness probes"),
    "lean_kernels": ("benchmarks.lean_kernels", "the lean grad clipping and Adam step vs public torch"),
    "tone_noise": ("benchmarks.tone_noise", "the demo's tone judge on the starting model over sampling seeds: its noise floor"),
    "diversity_noise": ("benchmarks.diversity_noise", "the demo's distinct-2 judge on the starting model: seeds, temperatures, "
                        "its own most fluent responses (plain vs fluent-only distinct-2)"),
    "friendly_mode": ("benchmarks.friendly_mode", "the starting model under a friendly system message, judged against "
                      "itself as the demo judges: tone without RL"),
    "best_of_n": ("benchmarks.best_of_n", "best-of-n of the starting model under a reward model, judged as the demo judges: "
                  "what that reward model gives at little KL"),
    "sampling": ("benchmarks.sampling", "n answers per prompt: our sampler (one prefill per prompt) vs Hugging Face "
                 "generate(num_return_sequences=n)"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    listing = "; ".join(f"{name}: {desc}" for name, (_, desc) in BENCHMARKS.items())
    parser = subparsers.add_parser(
        "bench",
        help=f"run a benchmark script ({', '.join(BENCHMARKS)})",
        description=f"Run a benchmark of benchmarks/ and print its ratios. {listing}.",
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    parser.set_defaults(func=run)


def _add_source_tree() -> None:
    """benchmarks/ sits next to the packages in the source tree (not installed): make it
    importable from the current directory or from the tree of an editable install."""
    import os
    import pathlib
    import sys

    import rlhf_env

    for root in (pathlib.Path.cwd(), pathlib.Path(rlhf_env.__file__).resolve().parents[1]):
        if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, os.fspath(root))
            return


def run(args: argparse.Namespace) -> int:
    module_name, _ = BENCHMARKS[args.name]
    _add_source_tree()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (module_name, "benchmarks"):
            raise ValueError(
                f"benchmark {args.name!r} ({module_name}) is not in this checkout; run rlhf-env bench from the "
                "repository root of a source checkout (benchmarks/ is not installed with the package)"
            ) from exc
        raise
    import inspect
    import sys

    if inspect.signature(module.main).parameters:
        return int(module.main(list(args.args)) or 0)
    saved = sys.argv  # a script whose main() reads sys.argv itself
    sys.argv = [module_name, *args.args]
    try:
        return int(module.main() or 0)
    finally:
        sys.argv = saved
