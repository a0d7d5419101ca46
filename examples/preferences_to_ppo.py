"""The offline half, then RL: your preference pairs -> a reward model -> PPO against it.

1. Write preference pairs as JSON Lines, one ``{"prompt", "chosen", "rejected"}`` object a line.
2. Train a Bradley-Terry reward model on them (loss ``-log sigmoid(s_chosen - s_rejected)``)
   and save it as a folder.
3. Hand that folder to the text env as its reward and train the policy with PPO.

Here everything runs on the tiny model; for real use, train the reward model on the default
backbone (all-MiniLM-L6-v2, ``backbone="all-minilm-l6-v2"``) and use ``TextRLHF-v0``.

    python examples/preferences_to_ppo.py               # about a minute
    RLHF_ENV_QUICK=1 python examples/preferences_to_ppo.py   # seconds (what the test suite runs)
"""

import itertools
import os
import tempfile
from pathlib import Path

import gymnasium as gym

import rlhf_env  # noqa: F401  (registers the envs)
from rlhf_env.agents import PPO
from rlhf_env import RewardModel, load_preferences, train_reward_model
from rlhf_env.data import PreferencePair, save_preferences
from rlhf_env.generation import generate
from rlhf_env.reward_trainer import RewardModelConfig

QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"
out = Path(tempfile.mkdtemp(prefix="rlhf_example_"))

# 1. your preferences: here, for reviews, a kind reply is preferred to a rude one
things = ["the bakery", "the hotel", "this laptop", "the new show", "the bike", "a desk lamp"]
kind = ["It was great and I am very happy with it.", "The staff were kind and helpful, a great time.",
        "Everything was nice, clean and easy.", "It was a lovely surprise and a joy to use."]
rude = ["It was terrible and I am very disappointed.", "The staff were rude and unhelpful, an ugly time.",
        "Everything was dirty, noisy and bad.", "The worst one I have tried, a waste of money.",
        "It was a sad mess and a pain to use."]
pairs = [PreferencePair(f"Review: {t}.", c, r) for t, c, r in itertools.product(things, kind, rude)]
save_preferences([p for p in pairs if p.prompt != "Review: a desk lamp."], out / "train.jsonl")
save_preferences([p for p in pairs if p.prompt == "Review: a desk lamp."], out / "test.jsonl")  # a held-out prompt

# 2. a reward model on them (backbone: the tiny model's trunk, so this takes seconds)
rm = train_reward_model(load_preferences(out / "train.jsonl"), backbone="tiny", eval_pairs=out / "test.jsonl",
                        config=RewardModelConfig(epochs=2 if QUICK else 10, learning_rate=1e-3, batch_size=20),
                        output_dir=out / "rm", progress=False)
print(f"reward model: held-out accuracy {rm.metrics['eval/accuracy']:.2f}, saved to {out / 'rm'}")
print("scores of a kind and a rude reply:", RewardModel.load(out / "rm").score(["Review: the park."] * 2, [kind[0], rude[0]]).tolist())

# 3. PPO against it: the env calls the reward model on every finished response
prompts = [f"Review: {t}." for t in things]
env = gym.make_vec("TextRLHF-tiny-v0", num_envs=8, prompts=prompts, reward_model=str(out / "rm"), max_new_tokens=12)
# rlhf=: the KL penalty starts at kl_coef and an adaptive controller steers the KL per response
# towards target_kl (nats); score_norm scales the reward to unit variance. A larger learning rate
# or no KL control lets the tiny policy drift into gibberish that fools the reward.
model = PPO("LMPolicy", env, n_steps=13, batch_size=104, n_epochs=4, learning_rate=3e-4, gamma=1.0, seed=0,
            rlhf=dict(kl_coef=0.05, target_kl=3.0, score_norm=True))


def mean_score() -> float:
    texts = [t[0] for t in generate(model, None, prompts, max_new_tokens=12, progress=False).texts]
    return float(rm.score(prompts, texts).mean())


before = mean_score()
model.learn(8 * 13 * (2 if QUICK else 15))
print(f"reward-model score of sampled responses: {before:.2f} before PPO, {mean_score():.2f} after")
print("greedy responses after training:")
for prompt, texts in zip(prompts[:3], generate(model, None, prompts[:3], greedy=True, max_new_tokens=12, progress=False).texts):
    print(f"  {prompt} -> {texts[0]}")
