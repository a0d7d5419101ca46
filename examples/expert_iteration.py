"""Expert iteration: fine-tune a model on its own best-of-n answers under your reward, no RL.

Each round draws ``n`` answers per prompt, keeps the one the reward scores highest, and
fine-tunes on the kept answers (the SFT loss on exactly the tokens drawn). The reward here is
a function of your own, ``(prompts, responses) -> scores``; a reward-model folder, ``"default"``
or a verifiable task's verifier (``task.prompt_reward()``) work the same way. Judge the result
on prompts it did not train on.

    python examples/expert_iteration.py                # tiny model, seconds
    RLHF_ENV_QUICK=1 python examples/expert_iteration.py   # what the test suite runs

For SmolLM2-135M-Instruct pass ``"smollm2-135m"`` (one round on 282 prompts: about 17 minutes
on one CPU thread); ``rlhf-env expert-iteration -o DIR`` does it from the command line, and
``rlhf-env expert-iteration --task chain_sum`` is rejection-sampling fine-tuning on a task.
"""

import os
import tempfile
from pathlib import Path

import numpy as np

from rlhf_env import train_expert_iteration
from rlhf_env.expert_iteration import ExpertIterationConfig
from rlhf_env.generation import generate
from rlhf_env.prompts import load_prompts

QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"
out = Path(tempfile.mkdtemp(prefix="rlhf_example_"))


def vowels(prompts, responses):
    """The reward: the share of vowels in the answer (something the random tiny model varies on)."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


train, held_out = load_prompts(split="train")[:16], load_prompts(split="test")[:8]


def mean_reward(policy) -> float:  # fresh draws on unseen prompts
    texts = generate(policy, None, held_out, num_samples=8, max_new_tokens=12, seed=123, progress=False).flat()
    return float(np.mean(vowels(held_out, texts)))


before = mean_reward("tiny")
config = ExpertIterationConfig(n=8, rounds=2 if QUICK else 3, max_new_tokens=12, learning_rate=3e-3, epochs=2, batch_size=8)
model, tokenizer = train_expert_iteration(train, "tiny", reward=vowels, config=config, output_dir=out / "ei", progress=False)
print(f"reward on unseen prompts: {before:.3f} before, {mean_reward((model, tokenizer)):.3f} after "
      f"({config.rounds} rounds of best-of-{config.n}; the model is saved in {out / 'ei'})")
