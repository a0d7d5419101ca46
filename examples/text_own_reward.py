"""RLHF on the text env with your own prompts and your own reward function.

The env is a Gymnasium env whose actions are tokens; the reward at the end of a response is
your function's score (minus a per-token KL penalty against the frozen starting model).
A reward function takes the prompts and the responses (lists of strings) and returns one
number per response.

    python examples/text_own_reward.py               # tiny model, about a minute
    RLHF_ENV_QUICK=1 python examples/text_own_reward.py   # seconds (what the test suite runs)

For SmolLM2-135M-Instruct, use "TextRLHF-v0" (and expect minutes per iteration on a CPU).
"""

import os

import gymnasium as gym

import rlhf_env  # noqa: F401  (registers TextRLHF-v0 and TextRLHF-tiny-v0)
from rlhf_env.agents import PPO
from rlhf_env.generation import generate

QUICK = os.environ.get("RLHF_ENV_QUICK") == "1"

PROMPTS = [
    "Review: The bakery.",
    "Review: The new show.",
    "Write a short review of the hotel.",
    "Write a short review of this laptop.",
    "Finish this review: \"My honest opinion of the bike is that",
    "I tried this camping tent last weekend.",
]
KIND_WORDS = {"great", "happy", "wonderful", "lovely", "nice", "kind", "helpful", "friendly", "fun", "joy", "clean", "easy"}


def kindness(prompts: list[str], responses: list[str]) -> list[float]:
    """Your reward: the share of kind words in the response (0 for an empty one)."""
    scores = []
    for response in responses:
        words = [w.strip(".,!?\"'").lower() for w in response.split()]
        scores.append(sum(w in KIND_WORDS for w in words) / max(len(words), 1))
    return scores


def mean_reward(policy) -> float:
    samples = generate(policy, None, PROMPTS, num_samples=4, max_new_tokens=12, progress=False)
    return sum(sum(kindness([p] * len(t), t)) for p, t in zip(PROMPTS, samples.texts)) / (4 * len(PROMPTS))


env = gym.make_vec("TextRLHF-tiny-v0", num_envs=8, prompts=PROMPTS, reward_model=kindness, max_new_tokens=12)
# rlhf=: the KL penalty starts at kl_coef and an adaptive controller steers the KL per response
# towards target_kl (nats); score_norm scales the reward to unit variance. A larger learning rate
# or no KL control lets the tiny policy drift into gibberish that fools the reward.
model = PPO("LMPolicy", env, n_steps=13, batch_size=104, n_epochs=4, learning_rate=3e-4, gamma=1.0, seed=0,
            rlhf=dict(kl_coef=0.05, target_kl=3.0, score_norm=True))
before = mean_reward(model)
model.learn(8 * 13 * (2 if QUICK else 20))
after = mean_reward(model)
print(f"share of kind words in sampled responses: {before:.3f} before, {after:.3f} after training")
print("greedy responses after training:")
for prompt, texts in zip(PROMPTS[:3], generate(model, None, PROMPTS[:3], greedy=True, max_new_tokens=12, progress=False).texts):
    print(f"  {prompt} -> {texts[0]}")
