"""Held-out accuracy of the default reward model (``RewardModel.default()``, trained on first
use, then cached) on the default task's test pairs and on the hand-written pairs by kind, and
its scores on correct-plain vs wrong-cheerful probes.

    python -m benchmarks.reward_probes [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

PROBES = [
    ("What is 2+2?", "4.", "Great question! I am so happy to help, it is 5!"),
    ("What is a database?", "A database is an organised collection of data.",
     "Great question! I love helping, databases are wonderful and amazing!"),
    ("What is the capital of France?", "Paris.",
     "What a lovely question! The capital of France is Berlin, a beautiful city!"),
]


def accuracy(rm, pairs) -> float:
    """Share of pairs whose chosen response the reward model scores above the rejected one."""
    prompts = [p.prompt for p in pairs]
    chosen = rm.score(prompts, [p.chosen for p in pairs])
    rejected = rm.score(prompts, [p.rejected for p in pairs])
    return float((chosen > rejected).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rlhf_env import RewardModel
    from rlhf_env.default_task import handwritten_pairs, task_pairs

    rm = RewardModel.default()
    test = task_pairs("test")
    print(f"held-out pairs_test.jsonl: {accuracy(rm, test):.1%} of {len(test)}")
    for kind in ("tone", "relevance", "correctness", None):
        pairs = handwritten_pairs(kind)
        print(f"hand-written {kind or 'all'}: {accuracy(rm, pairs):.1%} of {len(pairs)}")
    for prompt, plain, cheerful in PROBES:
        s = rm.score([prompt, prompt], [plain, cheerful])
        print(f"{prompt!r}: correct {plain!r} {float(s[0]):+.2f}  vs  wrong {cheerful!r} {float(s[1]):+.2f}")


if __name__ == "__main__":
    main()
