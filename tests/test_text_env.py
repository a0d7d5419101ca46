"""TextRLHFEnv: Gymnasium/SB3 conformance, the reward formula against independent full
forwards, the KV-cache rebuild after a weight update, and clear errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from envs.text_env import TextRLHFEnv
from rlhf_env.registration import make_text_env

pytestmark = pytest.mark.usefixtures("one_thread")



def make_env(tiny_lm_dir, tiny_prompts, reward, **kwargs) -> TextRLHFEnv:
    kwargs = {"max_new_tokens": 5, "max_prompt_tokens": 40, "shared_model": False, **kwargs}
    return make_text_env(model=str(tiny_lm_dir), reward_model=reward, prompts=tiny_prompts, **kwargs)


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move the actor away from the reference so the KL terms are not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def full_log_probs(model, ids: list[int], temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Next-token log-probs after ``ids`` from one plain forward without cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1)


def test_gymnasium_and_sb3_check_env(tiny_lm_dir, tiny_prompts, length_reward):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(
        "rlhf_env:TextRLHF-v0", model=str(tiny_lm_dir), reward_model=length_reward, prompts=tiny_prompts,
        max_new_tokens=3, max_prompt_tokens=40,
    )
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env)
    space = env.observation_space
    assert space["input_ids"].dtype == np.int64 and space["input_ids"].shape == (43,)
    assert env.action_space.n == env.unwrapped.actor.config.vocab_size


@pytest.mark.parametrize("estimator", ["k1", "k3", "full"])
def test_reward_matches_independent_full_forward(tiny_lm_dir, tiny_prompts, length_reward, estimator):
    env = make_env(tiny_lm_dir, tiny_prompts, length_reward, kl_coef=0.3, kl_estimator=estimator, max_new_tokens=6)
    perturb(env.actor)
    rng = np.random.default_rng(0)
    eos = env.tokenizer.eos_token_id
    steps = 0
    for episode in range(4):
        obs, info = env.reset(seed=episode)
        ids = list(info["prompt_ids"])
        assert obs["input_ids"][: len(ids)].tolist() == ids and obs["attention_mask"].sum() == len(ids)
        done = False
        while not done:
            # the third episode ends by EOS at its third token
            action = eos if (episode == 2 and len(ids) - len(info["prompt_ids"]) == 2) else int(rng.integers(env.action_space.n))
            lp = full_log_probs(env.actor, ids)
            ref_lp = full_log_probs(env.reference, ids)
            obs, reward, done, truncated, step_info = env.step(action)
            steps += 1
            if estimator == "k1":
                kl = lp[action] - ref_lp[action]
            elif estimator == "k3":
                log_ratio = ref_lp[action] - lp[action]
                kl = torch.exp(log_ratio) - 1 - log_ratio
            else:
                kl = (lp.exp() * (lp - ref_lp)).sum()
            expected = -0.3 * float(kl)
            assert step_info["logprob"] == pytest.approx(float(lp[action]), abs=1e-4)
            assert step_info["ref_logprob"] == pytest.approx(float(ref_lp[action]), abs=1e-4)
            assert step_info["kl"] == pytest.approx(float(kl), abs=1e-4)
            ids.append(action)
            if done:
                response = env.tokenizer.decode(ids[len(info["prompt_ids"]) :], skip_special_tokens=True)
                assert step_info["response"] == response and step_info["prompt"] == info["prompt"]
                assert step_info["score"] == pytest.approx(float(length_reward([info["prompt"]], [response])[0]))
                expected += step_info["score"]
            else:
                assert "score" not in step_info
            assert reward == pytest.approx(expected, abs=1e-4)
            assert not truncated
        assert len(ids) - len(info["prompt_ids"]) == (3 if episode == 2 else 6)
    assert steps == 3 * 6 + 3


def test_temperature_and_top_k_define_the_charged_distribution(tiny_lm_dir, tiny_prompts, length_reward):
    env = make_env(tiny_lm_dir, tiny_prompts, length_reward, temperature=0.7, top_k=20)
    perturb(env.actor)
    obs, info = env.reset(seed=3)
    ids = list(info["prompt_ids"])
    lp = full_log_probs(env.actor, ids, temperature=0.7, top_k=20)
    ref_lp = full_log_probs(env.reference, ids, temperature=0.7)  # reference: same temperature, no top-k
    action = int(torch.argmax(lp))
    _, reward, _, _, step_info = env.step(action)
    assert step_info["logprob"] == pytest.approx(float(lp[action]), abs=1e-4)
    assert step_info["ref_logprob"] == pytest.approx(float(ref_lp[action]), abs=1e-4)
    outside = int(torch.argmin(full_log_probs(env.actor, ids + [action], temperature=0.7)))
    with pytest.raises(ValueError, match="top_k=20"):
        env.step(outside)


def test_weight_update_mid_episode_rebuilds_the_actor_cache(tiny_lm_dir, tiny_prompts, length_reward):
    env = make_env(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=6)
    obs, info = env.reset(seed=1)
    ids = list(info["prompt_ids"])
    for action in (10, 11):
        env.step(action)
        ids.append(action)
    perturb(env.actor, seed=5)  # as an optimizer step between two rollout steps would
    lp = full_log_probs(env.actor, ids)
    _, _, _, _, step_info = env.step(12)
    assert step_info["logprob"] == pytest.approx(float(lp[12]), abs=1e-4)
    assert step_info["kl"] != pytest.approx(0.0, abs=1e-3)


def test_reset_seed_options_render_and_attributes(tiny_lm_dir, tiny_prompts, length_reward):
    env = make_env(tiny_lm_dir, tiny_prompts, length_reward, render_mode="ansi")
    drawn = [env.reset(seed=s)[1]["prompt"] for s in range(6)]
    assert drawn == [env.reset(seed=s)[1]["prompt"] for s in range(6)]
    assert len(set(drawn)) > 1
    obs, info = env.reset(options={"prompt": "hello there"})
    assert info["prompt"] == "hello there"
    env.step(20)
    text = env.render()
    assert "hello there" in text and env.tokenizer.decode([20]) in text
    assert all(not p.requires_grad for p in env.reference.parameters())
    assert env.reference is not env.actor
    env.kl_coef = 0.5  # settable between rollouts, as an adaptive controller does
    assert env.unwrapped.kl_coef == 0.5


def test_model_directory_written_by_save_pretrained(tiny_lm_dir, tiny_prompts, length_reward, tmp_path):
    env = make_env(tiny_lm_dir, tiny_prompts, length_reward)
    perturb(env.actor, seed=7)
    env.actor.save_pretrained(tmp_path / "saved")
    env.tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = make_env(tmp_path / "saved", tiny_prompts, length_reward)
    for a, b in zip(env.actor.parameters(), reloaded.actor.parameters()):
        assert torch.equal(a, b)
    _, info = reloaded.reset(seed=0)
    lp = full_log_probs(env.actor, info["prompt_ids"])
    assert reloaded.step(3)[4]["logprob"] == pytest.approx(float(lp[3]), abs=1e-4)


def test_bad_input_is_a_clear_error(tiny_lm_dir, tiny_prompts, length_reward, tmp_path):
    env = make_env(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=2)
    vocab = env.action_space.n
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)  # before the first reset
    env.reset(seed=0)
    for bad in (vocab, -1, 10**9):
        with pytest.raises(ValueError, match=f"vocabulary size is {vocab}"):
            env.step(bad)
    env.step(5)
    env.step(6)  # max_new_tokens=2: the episode ended
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(7)
    with pytest.raises(ValueError, match="no-such-model"):
        make_env("no-such-model", tiny_prompts, length_reward)
    with pytest.raises(ValueError, match="tiny"):  # the error lists the shipped names
        make_env(tmp_path / "missing-dir", tiny_prompts, length_reward)
    with pytest.raises(ValueError, match="prompt list is empty"):
        make_env(tiny_lm_dir, [], length_reward)
    with pytest.raises(ValueError, match=r"prompts\[1\] is \d+ tokens long.*max_prompt_tokens=8"):
        make_env(tiny_lm_dir, ["hi", "a much longer prompt about the weather and the sea"], length_reward,
                 max_prompt_tokens=8)
    with pytest.raises(ValueError, match="max_prompt_tokens=40"):
        env.reset(options={"prompt": "tell me a story " * 20})
    with pytest.raises(ValueError, match="kl_estimator"):
        make_env(tiny_lm_dir, tiny_prompts, length_reward, kl_estimator="k2")


@pytest.mark.slow
def test_smollm2_default_variant(tmp_path):
    """The default TextRLHF-v0 on SmolLM2-135M (slow: loads the 135M model, ~10 s)."""
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    # shipped prompts; the VADER reward keeps this test from training the default reward model
    env = gym.make("TextRLHF-v0", max_new_tokens=2, reward_model="sentiment")
    assert env.action_space.n == 49152
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env)
    perturb(env.unwrapped.actor, scale=0.002)
    obs, info = env.reset(seed=0)
    lp = full_log_probs(env.unwrapped.actor, info["prompt_ids"])
    ref_lp = full_log_probs(env.unwrapped.reference, info["prompt_ids"])
    action = int(torch.argmax(lp))
    _, reward, _, _, step_info = env.step(action)
    assert reward == pytest.approx(-0.05 * float(lp[action] - ref_lp[action]), abs=1e-4)
    assert step_info["logprob"] == pytest.approx(float(lp[action]), abs=1e-4)
