"""``rlhf-env eval``: judge a policy. ``--task NAME`` gives its accuracy on a verifiable task's
held-out split (greedy, sampled mean@k, pass@k); without ``--task`` it runs the RLHF judges
of :func:`rlhf_env.evaluate.evaluate` on held-out prompts."""

from __future__ import annotations

import argparse

from rlhf_env.cli._common import HelpFormatter
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy on a verifiable task (--task) or RLHF judges of a policy on held-out prompts",
        description="Evaluate a policy: a model name (smollm2-135m, tiny), a Hugging Face model directory (e.g. a demo's "
        "DIR/policy) or an agent .zip saved by rlhf-env train. With --task: accuracy on the task's held-out split, "
        "greedy and sampled (mean over K samples, pass@K). Without: reward-model score, win rate, independent judges "
        "and KL against --reference on held-out prompts. Prints a summary and writes the JSON report with --out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("policy", help="model name, model directory, or agent .zip")
    p.add_argument("--task", default=None, help="verifiable task: a curated name (chain_sum, ...) or any reasoning-gym name")
    p.add_argument("--task-config", default=None, help='generator settings as JSON, e.g. \'{"max_terms": 3}\'')
    p.add_argument("--answer-format", default=None, choices=["last_number", "answer_tag"], help="answer format (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out rows")
    p.add_argument("--samples", "-k", type=int, default=4, help="samples per row for mean@K and pass@K (0: greedy only)")
    p.add_argument("--no-greedy", action="store_true", help="skip greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion length (default: the task's; without --task the exported folder's training length, else 48)")
    p.add_argument("--reference", default=None,
                   help="without --task: the policy's starting model (default: the agent's, or the base model recorded in an "
                   "exported folder; a shipped model name is judged against itself; else smollm2-135m)")
    p.add_argument("--reward", default=None,
                   help="without --task: reward model ('default', 'sentiment', 'tiny', a directory, or a reward function as "
                   "FILE.py:NAME; default: the one an exported folder was trained with, recorded in its "
                   "rlhf_env_training.json, else 'default')")
    p.add_argument("--prompts", default=None,
                   help="without --task: the held-out prompts, a .txt (one per line) or .jsonl file (default: the default "
                   "task's 60 held-out prompts)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def load_policy(path: str, device: str = "cpu"):
    """A model name or directory as is; an agent ``.zip`` loaded with the algorithm that saved it."""
    import os
    import zipfile

    from rlhf_env.models import SHIPPED_MODELS, looks_like_hub_id

    if path.endswith(".zip") and not os.path.isfile(path):
        raise ValueError(f"no agent file {path!r} (from {os.getcwd()}): pass an agent .zip saved by rlhf-env train --save, "
                         "a model directory or a model name")
    if not path.endswith(".zip"):
        if not (os.path.isdir(os.path.expanduser(path)) or path in SHIPPED_MODELS or looks_like_hub_id(path)):
            # refused here, before the reference and reward lines and any load
            raise ValueError(f"unknown policy {path!r}: no such directory (from {os.getcwd()}) and not a shipped model "
                             f"({', '.join(SHIPPED_MODELS)}); pass a model directory (e.g. DIR/policy of a demo or --export), "
                             "an agent .zip or a hub id")
        return path
    from rlhf_env.agents import ALGOS

    with zipfile.ZipFile(path) as archive:
        header = json.loads(archive.read("header.json")) if "header.json" in archive.namelist() else {}
    by_class = {cls.__name__: cls for cls in ALGOS.values()}
    name = header.get("algorithm")
    if name not in by_class:
        raise ValueError(f"{path} is not an agent saved by rlhf-env train (its header.json names {name!r}); "
                         f"pass a model directory or one of the algorithms {', '.join(by_class)}")
    agent = by_class[name].load(path, device=device)
    if not hasattr(agent.policy, "save_pretrained"):  # an MLP policy (CartPole, ...): nothing to judge here
        raise ValueError(f"{path} holds a {name} agent whose policy is a {type(agent.policy).__name__}, not a language model: "
                         "rlhf-env eval judges text policies; evaluate a classic-control agent with "
                         "rlhf_env.agents.evaluate_policy(model, env) (rlhf-env train prints it after training)")
    return agent


def _training_info(policy: str) -> dict:
    """How a policy was trained: an exported folder's ``rlhf_env_training.json``, or for an
    agent ``.zip`` its ``header.json`` (which records the env too); {} for a model name."""
    import os
    import zipfile

    from rlhf_env.agents.export import read_training_info

    if os.path.isdir(policy):
        return read_training_info(policy) or {}
    if policy.endswith(".zip") and os.path.isfile(policy):
        with zipfile.ZipFile(policy) as archive:
            return json.loads(archive.read("header.json")) if "header.json" in archive.namelist() else {}
    return {}


def default_reference(policy: str, info: dict) -> str:
    """The starting model a policy is judged against: the base model recorded in an
    exported folder's ``rlhf_env_training.json`` (``info``, :func:`_training_info`; a policy
    trained from "tiny" against "tiny", not against SmolLM2); a shipped model name itself
    (``rlhf-env eval tiny`` judges the tiny model, KL 0); else the shipped starting model,
    smollm2-135m."""
    from rlhf_env.models import SHIPPED_MODELS

    if info.get("base_model"):
        return str(info["base_model"])
    return policy if policy in SHIPPED_MODELS else "smollm2-135m"


def default_reward(policy: str, info: dict) -> tuple[str, str]:
    """``(reward, where it comes from)``: the reward model an exported folder or agent zip
    was trained with (``info``, :func:`_training_info` of ``policy``), when it is one that
    can be loaded by name or folder, else ``"default"``."""
    import os

    from rlhf_env.agents.export import reward_file
    from rlhf_env.rewards import REWARD_NAMES

    env = info.get("env") or {}
    recorded = env.get("reward_model", info.get("reward_model"))  # an agent's env, or an offline trainer's record
    if isinstance(recorded, str) and (recorded.lower() in REWARD_NAMES or os.path.isdir(recorded)
                                      or reward_file(recorded) is not None):
        return recorded, f"recorded in {policy}"
    if recorded:
        return "default", f"the export was trained with {recorded}, which cannot be loaded by name"
    if env:
        return "default", ("the export was trained with reward functions, no reward model: --reward FILE.py:NAME judges with "
                           "one of them, --task with a verifiable task's verifier")
    return "default", "the shipped default"


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompts = None
    if args.prompts is not None:
        if args.task is not None:
            raise ValueError("--prompts is for the RLHF judges; with --task the task's held-out split is judged (--limit N for fewer rows)")
        from rlhf_env.prompts import load_prompts

        prompts = load_prompts(args.prompts)  # a missing or malformed file fails here, before any model loads
    policy = load_policy(args.policy, args.device)
    progress = not args.no_progress
    if args.task is not None:
        from rlhf_env.tasks import make_task
        from rlhf_env.tasks.evaluation import accuracy_line, evaluate_task

        from rlhf_env.cli._common import json_object

        config = json_object(args.task_config, "--task-config", '{"max_terms": 3}') if args.task_config else None
        task = make_task(args.task, config, answer_format=args.answer_format)
        report = evaluate_task(
            policy, task, limit=args.limit, greedy=not args.no_greedy, num_samples=args.samples, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, device=args.device,
            progress=progress, out=args.out,
        )
        for s in report["samples"]:
            print(f"Q: {s['question']}  (gold {s['answer']})")
            if "greedy" in s:
                print(f"  greedy: {s['greedy']!r}")
        print(accuracy_line(report))
    else:
        from rlhf_env.evaluate import evaluate, format_table

        if args.task_config or args.answer_format:
            raise ValueError("--task-config and --answer-format need --task")
        info = _training_info(args.policy)  # read once: reference, reward and length come from it
        reference = args.reference
        if reference is None and isinstance(policy, str):
            reference = default_reference(policy, info)
            print(f"reference (--reference): {reference}")
        reward = args.reward
        if reward is None:
            reward, source = default_reward(args.policy, info)
            print(f"reward (--reward): {reward} ({source})")
        kwargs = {}
        recorded_length = (info.get("env") or {}).get("max_new_tokens", info.get("max_new_tokens"))
        if args.max_new_tokens is not None or recorded_length:
            kwargs["max_new_tokens"] = args.max_new_tokens or int(recorded_length)
        report = evaluate(policy, prompts=prompts, reference=reference, reward=reward, seed=args.seed, device=args.device,
                          progress=progress, out=args.out, **kwargs)
        print(format_table(report))
    if args.out:
        print(f"wrote {args.out}")
    return 0
