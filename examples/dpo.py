"""DPO: train a language model directly on preference pairs, no reward model and no RL.

The loss is ``-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) -
log ref(rejected))))`` (Rafailov et al. 2023), the reference being the model before training.
The trained model is saved as a plain Hugging Face folder, which the text env and
``load_lm`` take as ``model=``. Judge it by what it writes on prompts it has not seen.

    python examples/dpo.py               # tiny model, well under a minute
    RLHF_ENV_QUICK=1 python examples/dpo.py   # seconds (what the test suite runs)

For SmolLM2-135M-Instruct pass ``"smollm2-135m"`` (its defaults train the last 2 blocks);
``rlhf-env dpo --train pairs.jsonl -o DIR`` does the same from the command line.
"""

import itertools
import os
import tempfile
from pathlib import Path

import gymnasium as gym

import rlhf_env  # noqa: F401  (registers the envs)
from rlhf_env import train_dpo
from rlhf_env.data import PreferencePair
from rlhf_env.dpo import DPOConfig
from rlhf_env.generation import generate
from rlhf_env.judges import tone

QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"
out = Path(tempfile.mkdtemp(prefix="rlhf_example_"))

things = ["the bakery", "the hotel", "this laptop", "the new show", "the bike", "a desk lamp", "the pizza place"]
kind = ["It was great and I am very happy with it.", "The staff were kind and helpful, a great time.",
        "Everything was nice, clean and easy."]
rude = ["It was terrible and I am very disappointed.", "The staff were rude and unhelpful, an ugly time.",
        "Everything was dirty, noisy and bad."]
pairs = [PreferencePair(f"Review: {t}.", c, r) for t, c, r in itertools.product(things, kind, rude)]
held_out = ["Review: the jazz concert.", "Review: the toothbrush.", "Review: the camping tent."]


def mean_tone(model) -> float:
    texts = [t for ts in generate(model, None, held_out, num_samples=8, max_new_tokens=16, progress=False).texts for t in ts]
    return sum(tone(texts)) / len(texts)


before = mean_tone("tiny")
# the tiny model is small enough to train all its weights (trainable_layers=None); a larger
# learning rate fits the pairs as well but breaks the model's grammar on new prompts
config = DPOConfig(epochs=1 if QUICK else 4, learning_rate=1e-4, trainable_layers=None)
model, tokenizer = train_dpo(pairs, "tiny", config=config, output_dir=out / "dpo", progress=False)
print(f"implicit-reward accuracy on the training pairs: {model.dpo_metrics['rewards/accuracy']:.2f}")
print(f"tone (VADER) of responses to unseen prompts: {before:.2f} before, {mean_tone((model, tokenizer)):.2f} after")
for prompt, texts in zip(held_out, generate((model, tokenizer), None, held_out, greedy=True, max_new_tokens=16, progress=False).texts):
    print(f"  {prompt} -> {texts[0]}")

env = gym.make("TextRLHF-tiny-v0", model=str(out / "dpo"))  # the saved folder is an ordinary model folder
obs, info = env.reset(seed=0)
print("the env now samples from the DPO model; first prompt:", info["prompt"])
