"""``rlhf-env demo [--out DIR] [--quick]``: the offline end-to-end RLHF demo."""

from __future__ import annotations

import argparse

_CONFIG = object()  # an option left out: the config's value stays


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="RLHF of SmolLM2-135M-Instruct with RLOO (--algo ppo/grpo: PPO/GRPO), offline, end to end, judged by "
        "independent judges (under 10 minutes on 2 CPU cores); --task NAME: RLOO on a verifiable task",
        description="Samples held-out responses, trains RLOO (or --algo ppo / grpo) with the KL penalty against the default "
        "reward model, samples again, and writes DIR/summary.json, DIR/curve.png, DIR/policy "
        "(a Hugging Face model directory) and TensorBoard logs under DIR/tb.",
    )
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--quick", action="store_true", help="the tiny model instead of SmolLM2 (under a minute)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="training time budget in seconds (default: 420 within a 500 s total budget; quick: 40 "
                        "within 55; with --task: 400 CPU seconds of training, quick 20); given explicitly, the total "
                        "budget no longer applies")
    parser.add_argument("--reward", default=None,
                        help="reward: 'default' (trained default reward model, VADER if unavailable), 'sentiment', "
                        "'tiny' or a reward-model directory")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    parser.add_argument("--iterations", type=int, default=None, help="stop after this many training iterations (default: 60 for the RLHF demo, so a fast machine trains what a 2-core CPU does in the budget; 1000 for --task, whose budget is CPU seconds)")
    parser.add_argument("--task", default=None,
                        help="the verifiable-reward demo instead: train the default method (RLOO) on this task (chain_sum, "
                        "chain_sum_2digit, letter_counting or any reasoning-gym name) and print held-out accuracy before "
                        "and after; writes DIR/summary.json, DIR/policy and DIR/curve.png")
    parser.add_argument("--task-config", default=None, help='with --task: generator settings as JSON, e.g. \'{"max_terms": 3}\'')
    parser.add_argument("--algo", default=None, choices=["ppo", "grpo", "rloo"],
                        help="the method: rloo (used when left out), ppo (the seed's four-model flow) or grpo; with --task: grpo or "
                        "rloo (default: rloo; see docs/benchmarks.md)")
    parser.add_argument("--kl-stop", type=_kl_stop, default=_CONFIG, metavar="KL",
                        help="stop training after the iteration whose rollout KL per response reaches KL; 'none' "
                        "switches the rule off (default: 6 within the 8 nat KL budget of the pass rule; quick: none)")
    parser.set_defaults(func=run)


def _kl_stop(text: str) -> float | None:
    """--kl-stop's value: a number of nats, or 'none' (argparse names the flag in its error)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of nats nor 'none'") from None


def run_task(args: argparse.Namespace) -> int:
    from rlhf_env.cli._common import json_object
    from rlhf_env.tasks.train import TaskTrainConfig, quick_task_config, run_task_demo

    cfg = quick_task_config() if args.quick else TaskTrainConfig()
    cfg.task = args.task
    cfg.task_config = json_object(args.task_config, "--task-config", '{"max_terms": 3}') if args.task_config else None
    if args.algo is not None:
        cfg.algo = args.algo
    if args.seconds is not None:
        cfg.train_seconds = float(args.seconds)
    if args.iterations is not None:
        cfg.max_iterations = args.iterations
    cfg.device, cfg.seed = args.device, args.seed
    if args.threads is not None:
        cfg.threads = args.threads
    run_task_demo(args.out, config=cfg)
    return 0


def run(args: argparse.Namespace) -> int:
    from rlhf_env.demo import DemoConfig, quick_config, run_demo

    if args.task is not None:
        if args.reward is not None or args.kl_stop is not _CONFIG:
            raise ValueError("--reward and --kl-stop belong to the RLHF demo; the task demo's reward is the task's verifier")
        if args.algo == "ppo":
            raise ValueError("--algo ppo belongs to the RLHF demo; a verifiable task trains with --algo grpo or rloo")
        return run_task(args)
    if args.task_config is not None:
        raise ValueError("--task-config needs --task")

    cfg = quick_config() if args.quick else DemoConfig()
    if args.seconds is not None:
        cfg.train_seconds = float(args.seconds)
        cfg.total_seconds = float("inf")
    if args.reward is not None:
        cfg.reward = args.reward
    if args.algo is not None:
        cfg.method = args.algo
    cfg.device = args.device
    cfg.seed = args.seed
    cfg.threads = args.threads
    if args.iterations is not None:
        cfg.max_iterations = args.iterations
    if args.kl_stop is not _CONFIG:
        cfg.kl_stop = args.kl_stop
    run_demo(args.out, config=cfg)
    return 0
