"""The actor's frozen-trunk states kept from the rollout (envs/trunk_states.py): the update's
log-probs, entropies and values from them equal a full teacher-forced forward, stale states
are never used, and GRPO groups are prefilled once per prompt with the same numbers."""

from __future__ import annotations

import dataclasses
import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401
from agents import GRPO, PPO
from agents.lm_forward import HeadOptions, evaluate_kept, evaluate_tokens, kept_trunk_batch
from agents.segments import pack_segments
from agents.policies.lm import set_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(policy, segments, values: bool) -> None:
    core = policy.core
    kept = kept_trunk_batch(policy.actor, segments)
    assert kept is not None
    ids, attn, positions, targets = pack_segments(segments, core.pad_id)
    assert kept[0].shape[1] == ids.shape[1] - 1  # every token but the last
    options = HeadOptions(temperature=core.temperature, top_k=core.top_k, value_head=policy._values if values else None)
    with torch.no_grad():
        full = evaluate_tokens(policy.actor, ids, attn, positions, targets, options)
        fast = evaluate_kept(policy.actor, *kept, positions, targets, options)
    mask = torch.zeros_like(full[0], dtype=torch.bool)
    for i, s in enumerate(segments):
        mask[i, : len(s)] = True
    for a, b in zip(full, fast):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b[mask], a[mask], atol=1e-4, rtol=1e-4)


def test_grpo_kept_states_equal_the_full_forward_and_go_stale(tiny_lm_dir, tiny_prompts, length_reward):
    env = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=6, temperature=0.7, shared_model=False)
    model = GRPO("LMPolicy", env, group_size=2, learning_rate=1e-2, beta=0.1, seed=0, policy_kwargs={"train_layers": 1})
    model.learn(4 * 7 * 2)  # two iterations: the top block has moved since the states were kept
    segments = model._segments
    assert env.unwrapped.contexts.keep_split == 1
    for s in segments:
        assert s.trunk_states is not None and s.trunk_states.shape[0] == len(s.context_ids) + len(s) - 1
    _compare(model.policy, segments, values=False)

    # the update uses the kept states; after a change of a lower weight it runs the full forward
    import agents.grpo as grpo

    calls = {"kept": 0, "full": 0}
    kept_fn, full_fn, shared_fn = grpo.evaluate_kept, grpo.evaluate_tokens, grpo.evaluate_shared_context
    kept_shared_fn = grpo.evaluate_kept_shared

    def count(name, fn):
        def wrapped(model_, *a, **k):
            if model_ is model.policy.actor:  # the actor's forwards (not the reference's)
                calls[name] += 1
            return fn(model_, *a, **k)
        return wrapped

    grpo.evaluate_kept, grpo.evaluate_tokens = count("kept", kept_fn), count("full", full_fn)
    grpo.evaluate_shared_context = count("full", shared_fn)  # a full forward too (prompt once)
    grpo.evaluate_kept_shared = count("kept", kept_shared_fn)  # kept states, the group's prompt once
    try:
        model.train()
        assert calls["kept"] == 2 and calls["full"] == 0  # one micro-batch per prompt group
        lower = model.policy.actor.model.layers[0].mlp.down_proj.weight
        with torch.no_grad():
            lower.mul_(1.5)  # in place: the states kept by the rollout no longer match the weights
        assert kept_trunk_batch(model.policy.actor, segments) is None
        model.train()
        assert calls == {"kept": 2, "full": 2}
        # the next rollout keeps states made by the new weights: used again
        model.learn(4 * 7, reset_num_timesteps=False)
        assert kept_trunk_batch(model.policy.actor, model._segments) is not None
    finally:
        grpo.evaluate_kept, grpo.evaluate_tokens, grpo.evaluate_shared_context = kept_fn, full_fn, shared_fn
        grpo.evaluate_kept_shared = kept_shared_fn
    # a lower block turned trainable: its gradient would be missing, so no kept states
    set_trainable(model.policy.actor, None)
    assert kept_trunk_batch(model.policy.actor, model._segments) is None


def test_ppo_kept_states_across_rollouts_with_values(tiny_lm_dir, tiny_prompts, length_reward):
    # n_steps shorter than a response: segments continue a response begun in an earlier rollout
    env = gym.make_vec("TextRLHF-v0", num_envs=3, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=7, kl_coef=0.1, shared_model=False)
    model = PPO("LMPolicy", env, n_steps=3, batch_size=9, n_epochs=2, learning_rate=1e-2, seed=0,
                policy_kwargs={"train_layers": 1})
    model.learn(3 * 3 * 4)
    segments = [s for s in model._segments if len(s)]
    continued = [s for s in segments if s.trunk_states is not None and len(s.context_ids) > 8]
    assert all(s.trunk_states is not None for s in segments)
    assert continued, [len(s.context_ids) for s in segments]
    _compare(model.policy, segments, values=True)


def test_no_kept_states_when_lower_blocks_train(tiny_lm_dir, tiny_prompts, length_reward):
    for kwargs in ({}, {"lora": {"r": 2, "targets": ["q_proj", "v_proj"]}}):
        env = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(tiny_lm_dir), reward_model=length_reward,
                           prompts=tiny_prompts, max_new_tokens=4, shared_model=False)
        model = GRPO("LMPolicy", env, group_size=2, learning_rate=1e-3, seed=0, policy_kwargs=kwargs)
        model.learn(2 * 5)
        assert env.unwrapped.contexts.keep_split == 0
        assert all(s.trunk_states is None for s in model._segments)


def test_equal_prompts_are_prefilled_once_with_the_same_numbers(tiny_lm_dir, tiny_prompts, length_reward):
    prompts = [tiny_prompts[0], tiny_prompts[0], tiny_prompts[2], tiny_prompts[0]]
    kwargs = dict(model=str(tiny_lm_dir), reward_model=length_reward, prompts=tiny_prompts, max_new_tokens=4,
                  shared_model=False)
    batched = gym.make_vec("TextRLHF-v0", num_envs=4, **kwargs)
    batched.reset(options={"prompt": prompts})
    actions = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    infos = [batched.step(a)[4] for a in actions]
    contexts = batched.unwrapped.contexts
    for layer in contexts.actor.cache.layers:  # the copies of one prompt hold equal caches
        assert torch.equal(layer.keys[0, :, :-2], layer.keys[1, :, :-2])  # the prompt's columns
    for row, prompt in enumerate(prompts):
        single = gym.make_vec("TextRLHF-v0", num_envs=1, **kwargs)
        single.reset(options={"prompt": prompt})
        for step, a in enumerate(actions):
            info = single.step(np.array([a[row]]))[4]
            for key in ("logprob", "ref_logprob"):
                assert info[key][0] == pytest.approx(infos[step][key][row], abs=1e-5)


def test_update_of_the_top_blocks_refreshes_only_their_cache(tiny_lm_dir, tiny_prompts, length_reward):
    """After an update that changed only the top block, the env recomputes that block's KV
    from the kept trunk states (no full re-prefill); the log-probs it then charges equal a
    full forward of the updated actor, and the reference's stay exact."""
    from envs.contexts import Contexts
    from envs.sampling import sampling_log_probs

    env = gym.make_vec("TextRLHF-v0", num_envs=3, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=8, kl_coef=0.1, temperature=0.8, shared_model=False)
    text_env = env.unwrapped
    set_trainable(text_env.actor, 1)
    text_env.keep_trunk = True
    text_env.reset(seed=0)
    for actions in ([5, 6, 7], [8, 9, 10]):
        env.step(np.array(actions))
    with torch.no_grad():
        text_env.actor.model.layers[1].mlp.down_proj.weight.mul_(1.3)  # the trainable top block
    results = []
    original = Contexts._refresh_top

    def spy(self):
        results.append(original(self))
        return results[-1]

    Contexts._refresh_top = spy
    try:
        contexts_before = [list(ids) for ids in text_env.contexts.ids]
        info = env.step(np.array([11, 12, 13]))[4]
    finally:
        Contexts._refresh_top = original
    assert results == [True]
    for row, ids in enumerate(contexts_before):
        with torch.no_grad():
            actor = sampling_log_probs(text_env.actor(input_ids=torch.tensor([ids])).logits[0, -1], 0.8)
            ref = sampling_log_probs(text_env.reference(input_ids=torch.tensor([ids])).logits[0, -1], 0.8)
        assert info["logprob"][row] == pytest.approx(float(actor[11 + row]), abs=1e-5)
        assert info["ref_logprob"][row] == pytest.approx(float(ref[11 + row]), abs=1e-5)
    # and the next step continues from the refreshed cache
    info = env.step(np.array([14, 15, 16]))[4]
    for row in range(3):
        ids = text_env.contexts.ids[row][:-1]
        with torch.no_grad():
            actor = sampling_log_probs(text_env.actor(input_ids=torch.tensor([ids])).logits[0, -1], 0.8)
        assert info["logprob"][row] == pytest.approx(float(actor[14 + row]), abs=1e-5)


def test_group_prompt_once_on_kept_states_equals_the_full_forward_with_gradients(tiny_lm_dir, tiny_prompts, length_reward):
    """A GRPO group's responses on their kept trunk states with the prompt's top blocks run
    once (and the head on the real tokens only) give the log-probs and entropies of the full
    teacher-forced forward and the gradients of the padded batch on the same kept states
    (which differ from the full forward's by the kept states' float rounding, ~0.2% here),
    and the reference's log-probs of its own forward."""
    from agents.lm_forward import evaluate_kept_shared
    from agents.reference_logprobs import reference_logprobs, reference_top_logprobs_shared, shared_trunk
    from agents.segments import group_by_context, shared_context

    env = gym.make_vec("TextRLHF-v0", num_envs=8, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=6, temperature=0.7, shared_model=False)
    model = GRPO("LMPolicy", env, group_size=4, learning_rate=1e-2, beta=0.1, seed=0, policy_kwargs={"train_layers": 1})
    model.learn(1)
    policy, core = model.policy, model.policy.core
    groups = group_by_context(model._segments)
    assert len(groups) == 2 and all(shared_context(g) for g in groups)

    def prefix(seg, k):  # the first k tokens of a response (its kept states cut to match)
        c = len(seg.context_ids)
        return dataclasses.replace(seg, response_ids=seg.response_ids[:k], old_logprobs=seg.old_logprobs[:k],
                                   rewards=seg.rewards[:k], old_values=seg.old_values[:k],
                                   ref_logprobs=seg.ref_logprobs[:k], trunk_states=seg.trunk_states[: c + k - 1])

    # responses of different lengths (one of a single token), so the padding is exercised
    groups = [[prefix(s, max(1, len(s) - 2 * i)) for i, s in enumerate(g)] for g in groups]
    assert all(min(len(s) for s in g) == 1 < max(len(s) for s in g) for g in groups)
    params = [p for p in policy.actor.parameters() if p.requires_grad]
    for group in groups:
        ids, attn, positions, targets = pack_segments(group, core.pad_id)
        mask = torch.zeros(targets.shape, dtype=torch.bool)
        for i, s in enumerate(group):
            mask[i, : len(s)] = True
        kept = kept_trunk_batch(policy.actor, group)
        options = HeadOptions(temperature=core.temperature, top_k=core.top_k)
        outputs, grads = {}, {}
        for name in ("full", "kept", "shared"):
            if name == "shared":
                out = evaluate_kept_shared(policy.actor, group, kept[2], targets, options)
                assert float(out[0].detach()[~mask].abs().sum()) == 0.0  # padding entries are 0
            elif name == "kept":
                out = evaluate_kept(policy.actor, *kept, positions, targets, options)
            else:
                out = evaluate_tokens(policy.actor, ids, attn, positions, targets, options)
            (out[0][mask].sum() + out[1][mask].sum()).backward()
            outputs[name] = [x.detach()[mask] for x in out[:2]]
            grads[name] = [p.grad.clone() for p in params]
            policy.actor.zero_grad()
        for a, b in zip(outputs["full"], outputs["shared"]):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        for a, b in zip(grads["kept"], grads["shared"]):
            torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()) + 1e-7, rtol=1e-4)
        for a, b in zip(grads["full"], grads["shared"]):
            assert float((b - a).norm()) <= 0.02 * float(a.norm())
        trunk, split = shared_trunk(core, "auto")
        assert split == kept_trunk_batch(policy.actor, group)[2]
        reference_top_logprobs_shared(core, trunk, split, group)
        fast_ref = [s.ref_logprobs for s in group]
        reference_logprobs(core, group, "cpu")
        for a, b in zip(fast_ref, [s.ref_logprobs for s in group]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_group_reset_after_an_update_does_not_refresh_the_old_contexts(tiny_lm_dir, tiny_prompts, length_reward):
    # every context restarts at a group reset: the caches of the finished responses are
    # dropped, not first recomputed for the updated top blocks
    env = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=4, shared_model=False)
    model = GRPO("LMPolicy", env, group_size=2, learning_rate=1e-2, beta=0.0, seed=0, policy_kwargs={"train_layers": 1})
    model.learn(1)
    contexts = env.unwrapped.contexts
    calls = []
    refresh_top = contexts._refresh_top
    contexts._refresh_top = lambda: calls.append(1) or refresh_top()
    model.learn(1, reset_num_timesteps=False)
    assert calls == []
    assert kept_trunk_batch(model.policy.actor, model._segments) is not None
