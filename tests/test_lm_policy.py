"""LMActorCriticPolicy: its actor is the env's actor, its log-probabilities are the ones the
env charges (shared step cache: no second actor forward during rollouts), and SB3's PPO
(and agents.PPO) train it: the actor's weights change, the reference's do not, and the
rewarded tokens become more likely."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401
from agents.policies.lm import LMActorCriticPolicy
from tests.test_text_env import perturb

pytestmark = pytest.mark.usefixtures("one_thread")



def e_reward(prompts, responses):
    """1 for a response that contains the letter 'e', else 0."""
    return torch.tensor([float("e" in r) for r in responses])


def make_env(tiny_lm_dir, tiny_prompts, **kwargs):
    kwargs = {"max_new_tokens": 2, "max_prompt_tokens": 40, "kl_coef": 0.01, "shared_model": False, **kwargs}
    return gym.make("TextRLHF-v0", model=str(tiny_lm_dir), reward_model=e_reward, prompts=tiny_prompts, **kwargs)


def rewarded_mass(env, policy) -> float:
    """Mean probability, over the prompts, that the first token contains an 'e'."""
    tokenizer = env.unwrapped.tokenizer
    has_e = torch.tensor(["e" in tokenizer.decode([i]) for i in range(env.action_space.n)])
    masses = []
    for prompt in env.unwrapped.prompts:
        obs, _ = env.reset(options={"prompt": prompt})
        obs_t, _ = policy.obs_to_tensor(obs)
        with torch.no_grad():
            probs = policy.get_distribution(obs_t).logits.exp()[0]
        masses.append(float(probs[has_e].sum()))
    return float(np.mean(masses))


def test_policy_acts_with_the_env_actor_and_charges_its_own_log_probs(tiny_lm_dir, tiny_prompts):
    env = make_env(tiny_lm_dir, tiny_prompts, max_new_tokens=6, temperature=0.8, top_k=50)
    core = env.unwrapped.core
    policy = LMActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-3)
    assert policy.actor is env.unwrapped.actor
    ref_ids = {id(p) for p in env.unwrapped.reference.parameters()}
    assert not ref_ids & {id(p) for p in policy.parameters()}
    perturb(policy.actor)  # as a PPO update would: the env must follow
    torch.manual_seed(0)
    obs, _ = env.reset(seed=0)
    for _ in range(12):
        obs_t, _ = policy.obs_to_tensor(obs)
        misses = core.misses
        with torch.no_grad():
            action, value, log_prob = policy(obs_t)
        assert core.misses == misses, "the policy's rollout forward must reuse the env's actor forward"
        obs, reward, terminated, _, info = env.step(int(action[0]))
        assert info["logprob"] == pytest.approx(float(log_prob[0]), abs=1e-5)
        if terminated:
            obs, _ = env.reset()
    # the cache-free path (training minibatches: gradients on) gives the same numbers
    obs_t, _ = policy.obs_to_tensor(obs)
    with torch.no_grad():
        dist_cached = policy.get_distribution(obs_t).logits
        value_cached = policy.predict_values(obs_t)
    values, log_prob, entropy = policy.evaluate_actions(obs_t, torch.tensor([3]))
    assert log_prob.requires_grad and values.requires_grad
    assert float(log_prob[0].detach()) == pytest.approx(float(dist_cached[0, 3]), abs=1e-4)
    assert float(values[0, 0].detach()) == pytest.approx(float(value_cached[0, 0]), abs=1e-5)
    assert torch.isfinite(entropy).all()


def test_the_env_follows_a_fused_optimizer_step_of_the_policy(tiny_lm_dir, tiny_prompts):
    """Adam(fused=True), the policy's default, writes the weights without bumping their
    in-place version counters: the optimizer's step hook tells the env's core, so the env's
    next log-probability (KV cache and head) is the updated actor's, mid-episode."""
    from envs.sampling import sampling_log_probs

    env = make_env(tiny_lm_dir, tiny_prompts, max_new_tokens=6)
    policy = LMActorCriticPolicy(env.observation_space, env.action_space, lambda _: 3e-2)
    assert policy.optimizer.defaults.get("fused")
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(3)
    _, log_prob, _ = policy.evaluate_actions(policy.obs_to_tensor(obs)[0], torch.tensor([4]))
    policy.optimizer.zero_grad()
    (-log_prob.sum()).backward()
    policy.optimizer.step()
    ids = obs["input_ids"][: int(obs["attention_mask"].sum())].tolist()
    _, _, _, _, info = env.step(4)
    with torch.no_grad():
        full = sampling_log_probs(env.unwrapped.actor(input_ids=torch.tensor([ids])).logits[0, -1])
    assert info["logprob"] == pytest.approx(float(full[4]), abs=1e-5)
    assert info["logprob"] > float(log_prob[0].detach()) + 1e-3  # the step made token 4 more likely


def test_train_layers_freezes_all_but_the_last_blocks(tiny_lm_dir, tiny_prompts):
    env = make_env(tiny_lm_dir, tiny_prompts)
    policy = LMActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-3, train_layers=1)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("actor.model.layers.1.", "actor.model.norm", "value_head")) for n in trainable)
    assert any(n.startswith("value_head") for n in trainable)
    with pytest.raises(ValueError, match="train_layers"):
        LMActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-3, train_layers=5)


def _check_training(algo_cls, policy, tiny_lm_dir, tiny_prompts, tmp_path):
    env = make_env(tiny_lm_dir, tiny_prompts)
    actor, reference = env.unwrapped.actor, env.unwrapped.reference
    model = algo_cls(policy, env, n_steps=64, batch_size=32, n_epochs=4, learning_rate=3e-3, seed=0, verbose=0)
    assert model.policy.actor is actor
    before = rewarded_mass(env, model.policy)
    actor0 = [p.detach().clone() for p in actor.parameters()]
    reference0 = [p.detach().clone() for p in reference.parameters()]
    model.learn(384)
    after = rewarded_mass(env, model.policy)
    assert any(not torch.equal(a, b) for a, b in zip(actor0, actor.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(reference0, reference.parameters()))
    assert after > before + 0.1, (before, after)
    # save / load in the same process: the loaded policy acts with the env's actor again (the
    # saved space rebuilds its model from its description; SB3's load takes the env's live
    # space through custom_objects, agents' load(env=) takes it from the env)
    model.save(tmp_path / "lm_ppo.zip")
    custom = {"observation_space": env.observation_space} if algo_cls.__module__.startswith("stable_baselines3") else None
    loaded = algo_cls.load(tmp_path / "lm_ppo.zip", env=env, custom_objects=custom)
    assert loaded.policy.actor is actor
    assert rewarded_mass(env, loaded.policy) == pytest.approx(after, abs=1e-5)
    return before, after


def _check_tiny_v0(algo_cls, policy):
    """A few hundred steps on the registered TextRLHF-tiny-v0 (shipped tiny model, its reward)."""
    env = gym.make("TextRLHF-tiny-v0", max_new_tokens=8, shared_model=False)
    actor, reference = env.unwrapped.actor, env.unwrapped.reference
    actor0 = [p.detach().clone() for p in actor.parameters()]
    reference0 = [p.detach().clone() for p in reference.parameters()]
    model = algo_cls(policy, env, n_steps=128, batch_size=64, n_epochs=2, learning_rate=1e-3, seed=0, verbose=0)
    model.learn(256)
    assert any(not torch.equal(a, b) for a, b in zip(actor0, actor.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(reference0, reference.parameters()))
    obs, _ = env.reset(seed=0)
    _, _, _, _, info = env.step(model.predict(obs)[0])
    assert info["kl"] != 0.0  # the trained actor has moved away from the reference


def test_sb3_ppo_trains_the_env_actor(tiny_lm_dir, tiny_prompts, tmp_path):
    from stable_baselines3 import PPO

    _check_training(PPO, LMActorCriticPolicy, tiny_lm_dir, tiny_prompts, tmp_path)
    _check_tiny_v0(PPO, LMActorCriticPolicy)


def test_agents_ppo_trains_the_env_actor(tiny_lm_dir, tiny_prompts, tmp_path):
    from agents import PPO

    _check_training(PPO, "LMPolicy", tiny_lm_dir, tiny_prompts, tmp_path)
    _check_tiny_v0(PPO, "LMPolicy")


def test_saved_model_loads_in_a_fresh_process(tiny_lm_dir, tiny_prompts, tmp_path):
    """Without its env the loaded policy rebuilds the actor from the space's description
    (the model directory) and the saved weights: same distribution as before saving."""
    import subprocess
    import sys

    from stable_baselines3 import PPO

    env = make_env(tiny_lm_dir, tiny_prompts)
    model = PPO(LMActorCriticPolicy, env, n_steps=32, batch_size=32, n_epochs=1, learning_rate=3e-3, seed=0)
    model.learn(32)
    model.save(tmp_path / "model.zip")
    obs, _ = env.reset(seed=0)
    np.savez(tmp_path / "obs.npz", **obs)
    with torch.no_grad():
        expected = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0]).logits[0]
    script = (
        "import sys, numpy as np, torch\n"
        "from stable_baselines3 import PPO\n"
        "model = PPO.load(sys.argv[1] + '/model.zip')\n"
        "obs = dict(np.load(sys.argv[1] + '/obs.npz'))\n"
        "with torch.no_grad():\n"
        "    logp = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0]).logits[0]\n"
        "torch.save(logp, sys.argv[1] + '/logp.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True, timeout=300,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert torch.allclose(torch.load(tmp_path / "logp.pt"), expected, atol=1e-5)


def test_sb3_ppo_on_the_batched_env_shares_every_rollout_forward(tiny_lm_dir, tiny_prompts):
    """SB3's PPO on the batched env (through SB3VecEnv): rollouts cost no policy forward
    (every one is a step-cache hit), and the policy learns."""
    from stable_baselines3 import PPO
    from envs.wrappers import SB3VecEnv

    # no VecMonitor: the adapter records episodes itself (ep_info_buffer below)
    venv = SB3VecEnv(num_envs=4, model=str(tiny_lm_dir), reward_model=e_reward, prompts=tiny_prompts,
                     max_new_tokens=2, max_prompt_tokens=40, kl_coef=0.01, autoreset_mode="SameStep")
    single = make_env(tiny_lm_dir, tiny_prompts, shared_model=True)
    core = venv.core
    assert single.unwrapped.core is core
    model = PPO(LMActorCriticPolicy, venv, n_steps=32, batch_size=32, n_epochs=4, learning_rate=3e-3, seed=0)
    before = rewarded_mass(single, model.policy)
    misses = core.misses
    model.learn(384)
    after = rewarded_mass(single, model.policy)
    # misses: the training minibatches (n_epochs x samples) and, in each of the 2 rollouts
    # after an update, the first observation of the 4 envs (the env computed it before the
    # weights changed; a policy forward is a read, it does not refresh the env): every other
    # rollout forward is a hit
    assert core.misses - misses == 4 * 384 + 2 * 4
    assert after > before + 0.1, (before, after)
    assert len(model.ep_info_buffer) > 0
