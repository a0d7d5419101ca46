"""GRPO: group-normalised advantages by hand, groups made of one prompt each, the env's KL
reward switched off, clear errors, and learning on TextRLHF-tiny-v0."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401
from tests.conftest import tiny_v0_scorer
from agents import ALGOS, GRPO
from agents.losses import group_advantages

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_match_hand_computation():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(scores, groups, eps=1e-4)
    g0 = np.array([1.0, 2.0, 3.0, 6.0])
    expected = (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-4)
    assert adv[:4].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # no spread: no signal, no division by zero
    unscaled = group_advantages(scores, groups, scale=False)
    assert unscaled[:4].tolist() == pytest.approx((g0 - g0.mean()).tolist(), abs=1e-6)


def test_grpo_groups_kl_off_and_errors(tiny_lm_dir, tiny_prompts, length_reward):
    env = gym.make_vec("TextRLHF-v0", num_envs=6, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=5, kl_coef=0.3, shared_model=False)
    model = GRPO("LMPolicy", env, group_size=3, learning_rate=1e-3, seed=0)
    assert env.unwrapped.kl_coef == 0.0  # the KL enters the loss, not the reward
    model.learn(10, log_interval=10**6)  # (no table: the logged values stay readable)
    segs = model._segments
    assert len(segs) == 6 and all(s.terminated and s.score is not None for s in segs)
    # every group answers one prompt; the env's reward is the score alone (kl_coef = 0)
    for g in (0, 1):
        members = [s for s in segs if s.group == g]
        assert len(members) == 3 and len({s.prompt for s in members}) == 1
    for s in segs:
        assert s.rewards[:-1].abs().max() == 0 if len(s) > 1 else True
        assert float(s.rewards[-1]) == pytest.approx(s.score, abs=1e-6)
    assert env.unwrapped.autoreset  # restored after the rollout
    # the KL it optimises (beta * k3 to the reference), measured where the reference runs
    assert np.isfinite(model.logger.name_to_value["rollout/kl_mean"])
    assert ALGOS["grpo"] is GRPO
    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPO("LMPolicy", env, group_size=4)
    single = gym.make("TextRLHF-v0", model=str(tiny_lm_dir), reward_model=length_reward, prompts=tiny_prompts,
                      max_new_tokens=5, shared_model=False)
    with pytest.raises(ValueError, match="batched text env"):
        GRPO("LMPolicy", single, group_size=2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPO("LMPolicy", env, group_size=1)


TRL_OPTIONS = {
    "defaults": {},
    "grpo-batch": {"loss_type": "grpo", "scale_rewards": "batch"},
    "dr_grpo-gspo-clip_higher": {"loss_type": "dr_grpo", "scale_rewards": "none", "epsilon_high": 0.28,
                                 "importance_sampling_level": "sequence"},
}


@pytest.mark.parametrize("options", sorted(TRL_OPTIONS))
def test_grpo_raises_the_reward_of_tiny_v0(options):
    torch.manual_seed(0)
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=16, max_new_tokens=12, shared_model=False)
    core = env.unwrapped.core
    mean_score = tiny_v0_scorer(env)

    before = mean_score()
    reference0 = [p.detach().clone() for p in core.reference.parameters()]
    model = GRPO("LMPolicy", env, group_size=4, learning_rate=1e-3, n_epochs=2, beta=0.02, seed=0, **TRL_OPTIONS[options])
    model.learn(16 * 13 * 7)
    after = mean_score()
    assert after > before + 0.25, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(reference0, core.reference.parameters()))


@pytest.mark.parametrize("train_layers", [None, 1])
def test_grpo_reference_logprobs_equal_the_envs_per_token_ones(tiny_lm_dir, tiny_prompts, length_reward, train_layers):
    """GRPO turns the env's per-token reference off and scores whole responses in one
    teacher-forced reference forward: the same numbers as the env's ``ref_logprob`` info
    (with the env's reference on the actor's frozen trunk too, train_layers=1)."""
    env = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=6, temperature=0.7, shared_model=False)
    kwargs = {} if train_layers is None else {"train_layers": train_layers}
    model = GRPO("LMPolicy", env, group_size=2, learning_rate=1e-3, beta=0.1, seed=0, policy_kwargs=kwargs)
    text_env = env.unwrapped
    assert text_env.reference_logprobs is False  # GRPO switched the per-token reference off
    model.learn(4 * 7)  # a rollout without the env's reference; train() filled in log ref
    assert all(torch.isfinite(s.ref_logprobs).all() and len(s.ref_logprobs) == len(s) for s in model._segments)
    text_env.reference_logprobs = True  # back on: the env's per-token ref_logprob for comparison
    seen = []
    train = model.train

    def compare():
        env_ref = [s.ref_logprobs.clone() for s in model._segments]
        train()  # recomputes log ref (on the shared trunk when train_layers=1) for its k3 term
        seen.append(len(env_ref))
        for s, expected in zip(model._segments, env_ref):
            assert not torch.isnan(expected).any()
            torch.testing.assert_close(s.ref_logprobs, expected, atol=2e-5, rtol=1e-5)

    model.train = compare
    model.learn(4 * 7 * 2, reset_num_timesteps=False)  # the actor has moved: ref != actor
    assert len(seen) >= 2 and set(seen) == {4}
    assert model._shared_trunk()[1] == (1 if train_layers else 0)
    if train_layers:
        assert text_env.contexts.shared_blocks == 1


def test_env_without_reference_logprobs(tiny_lm_dir, tiny_prompts, length_reward):
    env = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=3, kl_coef=0.0, reference_logprobs=False, shared_model=False)
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step(np.array([5, 6]))
    assert "ref_logprob" not in infos and "kl" not in infos and infos["_logprob"].all()
    assert rewards.tolist() == [0.0, 0.0]
    env.unwrapped.kl_coef = 0.1
    with pytest.raises(ValueError, match="reference_logprobs=False"):
        env.step(np.array([5, 6]))


def test_shared_context_forward_equals_the_full_forward_with_gradients(tiny_lm_dir):
    """A group's responses to one prompt: the prompt run once (KV cache repeated) gives the
    log-probs, entropies and gradients of one full teacher-forced forward per response."""
    from agents.lm_forward import HeadOptions, evaluate_shared_context, evaluate_tokens
    from agents.segments import TextSegment, group_by_context, pack_segments, shared_context
    from rlhf_env.models import load_lm

    model, tok = load_lm(str(tiny_lm_dir))
    torch.manual_seed(0)
    context = torch.randint(3, 200, (9,))
    segs = [TextSegment(context, torch.randint(3, 200, (T,)), *(torch.zeros(T) for _ in range(4))) for T in (5, 1, 7, 3)]
    other = TextSegment(torch.randint(3, 200, (4,)), torch.randint(3, 200, (2,)), *(torch.zeros(2) for _ in range(4)))
    assert shared_context(segs) and not shared_context(segs + [other])
    assert group_by_context([segs[0], other, segs[1]]) == [[segs[0], segs[1]], [other]]
    mask = torch.zeros((4, 7), dtype=torch.bool)
    for i, s in enumerate(segs):
        mask[i, : len(s)] = True
    outputs, grads = [], []
    for shared in (False, True):
        if shared:
            out = evaluate_shared_context(model, segs, tok.pad_token_id, HeadOptions(temperature=0.7))
        else:
            ids, attn, positions, targets = pack_segments(segs, tok.pad_token_id)
            out = evaluate_tokens(model, ids, attn, positions, targets, HeadOptions(temperature=0.7))
        (out[0][mask].sum() + out[1][mask].sum()).backward()
        outputs.append([x.detach() for x in out[:2]])
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for a, b in zip(*outputs):
        torch.testing.assert_close(b[mask], a[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):  # float rounding relative to each weight's largest gradient (the head is x20)
        torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()) + 1e-7, rtol=1e-4)
