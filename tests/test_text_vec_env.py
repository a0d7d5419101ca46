"""TextRLHFVectorEnv: one batched forward per step with per-env KV caches; same
log-probabilities as the single env and as independent full forwards; NEXT_STEP autoreset."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import rlhf_env  # noqa: F401
from envs.text_env import TextRLHFEnv
from envs.text_vec_env import TextRLHFVectorEnv
from rlhf_env.registration import make_text_env
from tests.test_text_env import full_log_probs, perturb

N = 3

pytestmark = pytest.mark.usefixtures("one_thread")



def make_vec(tiny_lm_dir, tiny_prompts, reward, **kwargs) -> TextRLHFVectorEnv:
    kwargs = {"max_new_tokens": 5, "max_prompt_tokens": 40, "kl_coef": 0.2, "shared_model": False, **kwargs}
    return gym.make_vec("TextRLHF-v0", num_envs=N, model=str(tiny_lm_dir), reward_model=reward,
                        prompts=tiny_prompts, **kwargs)


def scripted_actions(step: int, eos: int, rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Random tokens, with EOS from sub-env 1 at step 2 and sub-env 2 at step 7, so the
    sub-envs finish and restart at different times (and prompts of different lengths meet)."""
    actions = rng.integers(vocab, size=N)
    if step == 2:
        actions[1] = eos
    if step == 7:
        actions[2] = eos
    return actions


def test_make_vec_spaces_and_metadata(tiny_lm_dir, tiny_prompts, length_reward):
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward)
    assert isinstance(envs, TextRLHFVectorEnv) and isinstance(envs, gym.vector.VectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = envs.reset(seed=0)
    assert obs["input_ids"].shape == (N, 45) and obs["input_ids"].dtype == np.int64
    assert envs.observation_space.contains(obs)
    assert info["_prompt"].all() and [len(ids) for ids in info["prompt_ids"]] == obs["attention_mask"].sum(1).tolist()
    with pytest.raises(ValueError, match=f"vocabulary size is {envs.single_action_space.n}"):
        envs.step(np.array([0, -1, 0]))


def test_rewards_match_independent_full_forwards_and_autoreset(tiny_lm_dir, tiny_prompts, length_reward):
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward)
    perturb(envs.actor)
    eos = envs.tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    obs, info = envs.reset(seed=0)
    contexts = [list(ids) for ids in info["prompt_ids"]]
    prompts = list(info["prompt"])
    restarting = np.zeros(N, dtype=bool)
    checked = 0
    for step in range(14):
        actions = scripted_actions(step, eos, rng, envs.single_action_space.n)
        expected_lp = [full_log_probs(envs.actor, c) for c in contexts]
        expected_ref = [full_log_probs(envs.reference, c) for c in contexts]
        obs, rewards, terminated, truncated, info = envs.step(actions)
        assert not truncated.any()
        for i in range(N):
            if restarting[i]:  # NEXT_STEP autoreset: action ignored, reward 0, a new prompt
                assert rewards[i] == 0 and not terminated[i] and info["_prompt"][i] and not info["_logprob"][i]
                contexts[i] = list(info["prompt_ids"][i])
                prompts[i] = info["prompt"][i]
                continue
            a = int(actions[i])
            lp, ref = float(expected_lp[i][a]), float(expected_ref[i][a])
            assert info["logprob"][i] == pytest.approx(lp, abs=1e-4)
            assert info["ref_logprob"][i] == pytest.approx(ref, abs=1e-4)
            expected = -0.2 * (lp - ref)
            contexts[i].append(a)
            if terminated[i]:
                assert info["_score"][i] and info["prompt"][i] == prompts[i]
                # the final observation is in the step cache: the policy's forward on it is free
                assert envs.core.lookup(tuple(contexts[i]), envs.core.version()) is not None
                expected += info["score"][i]
            assert rewards[i] == pytest.approx(expected, abs=1e-4)
            checked += 1
        for i in range(N):
            assert obs["input_ids"][i, : len(contexts[i])].tolist() == contexts[i]
            assert obs["attention_mask"][i].sum() == len(contexts[i])
        restarting = terminated.copy()
    assert checked >= 30
    # the cache never holds more columns than the longest context needs (+1 dead column)
    assert envs.contexts.actor.mask.shape[1] <= max(len(c) for c in contexts) + 1


def test_batched_and_single_env_give_the_same_log_probs(tiny_lm_dir, tiny_prompts, length_reward):
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward, shared_model=True)
    perturb(envs.actor, seed=3)
    single = [make_text_env(model=str(tiny_lm_dir), reward_model=length_reward, prompts=tiny_prompts, max_new_tokens=5,
                          max_prompt_tokens=40, kl_coef=0.2) for _ in range(N)]
    assert all(env.core is envs.core for env in single)  # one actor for all of them
    eos = envs.tokenizer.eos_token_id
    rng = np.random.default_rng(1)
    obs, info = envs.reset(seed=4)
    for i, env in enumerate(single):
        env.reset(options={"prompt": info["prompt"][i]})
    restarting = np.zeros(N, dtype=bool)
    for step in range(12):
        actions = scripted_actions(step, eos, rng, envs.single_action_space.n)
        obs, rewards, terminated, _, info = envs.step(actions)
        for i, env in enumerate(single):
            if restarting[i]:
                env.reset(options={"prompt": info["prompt"][i]})
                continue
            _, reward, done, _, single_info = env.step(int(actions[i]))
            assert done == terminated[i]
            assert single_info["logprob"] == pytest.approx(info["logprob"][i], abs=1e-4)
            assert single_info["ref_logprob"] == pytest.approx(info["ref_logprob"][i], abs=1e-4)
            assert reward == pytest.approx(rewards[i], abs=1e-4)
        restarting = terminated.copy()


def test_weight_update_mid_rollout_rebuilds_the_batched_actor_cache(tiny_lm_dir, tiny_prompts, length_reward):
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=8)
    obs, info = envs.reset(seed=2)
    contexts = [list(ids) for ids in info["prompt_ids"]]
    for a in (7, 8):
        envs.step(np.full(N, a))
        for c in contexts:
            c.append(a)
    perturb(envs.actor, seed=9)
    _, _, _, _, info = envs.step(np.full(N, 9))
    for i in range(N):
        assert info["logprob"][i] == pytest.approx(float(full_log_probs(envs.actor, contexts[i])[9]), abs=1e-4)


def test_one_forward_of_each_model_per_step(tiny_lm_dir, tiny_prompts, length_reward):
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=6)
    calls = {"actor": [], "reference": []}
    # the actor's decoder (the env's incremental steps run it and then the head on the last position)
    envs.actor.model.register_forward_hook(lambda m, args, kwargs, out: calls["actor"].append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    envs.reference.register_forward_hook(lambda m, args, kwargs, out: calls["reference"].append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    envs.reset(seed=0)
    # one batched prefill of the distinct prompts (sub-envs that drew the same prompt share it)
    distinct = len({tuple(ids) for ids in envs.contexts.ids})
    assert [s[0] for s in calls["actor"]] == [distinct] and [s[0] for s in calls["reference"]] == [distinct]
    for _ in range(3):
        envs.step(np.array([5, 6, 7]))
    # one incremental forward (N rows, ONE new token) of each model per step, no re-forward
    assert calls["actor"][1:] == [torch.Size([N, 1])] * 3 and calls["reference"][1:] == [torch.Size([N, 1])] * 3


def test_cache_grows_on_the_left_for_a_longer_prompt_and_trims_after(tiny_lm_dir, tiny_prompts, length_reward):
    """Row surgery of the batched cache: a reset row with a prompt longer than every live
    context grows the cache on the left; a short one leaves all-pad columns that are trimmed."""
    from envs.contexts import Contexts

    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward)
    perturb(envs.actor, seed=11)
    core = envs.core
    ctx = Contexts(core, 2)
    short, long_ = [1, 40, 41], [1] + list(range(50, 80))
    ctx.set_prompts([0, 1], [short, short])
    ctx.advance([0, 1], [7, 8])
    ctx.set_prompts([1], [long_])  # longer than row 0's context: grow on the left
    assert ctx.actor.mask.shape[1] == len(long_)
    ctx.advance([0, 1], [9, 10])
    ctx.set_prompts([1], [short])  # now the long row is gone: leading columns are trimmed
    assert ctx.actor.mask.shape[1] <= len(short + [7, 9]) + 2
    ctx.advance([0, 1], [11, 12])
    for row, ids in enumerate([short + [7, 9, 11], short + [12]]):
        assert ctx.ids[row] == ids
        actions = torch.tensor([5, 5])
        logprob, ref_logprob, _ = ctx.log_probs([0, 1], actions, "k1")
        assert float(logprob[row]) == pytest.approx(float(full_log_probs(core.actor, ids)[5]), abs=1e-4)
        assert float(ref_logprob[row]) == pytest.approx(float(full_log_probs(core.reference, ids)[5]), abs=1e-4)


def test_same_step_autoreset_and_the_sb3_vec_env_adapter(tiny_lm_dir, tiny_prompts, length_reward):
    from envs.wrappers import SB3VecEnv

    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=3, autoreset_mode="SameStep")
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, info = envs.reset(seed=0)
    contexts = [list(ids) for ids in info["prompt_ids"]]
    for step in range(3):
        actions = np.array([5, envs.tokenizer.eos_token_id if step == 0 else 6, 7])
        obs, rewards, terminated, _, info = envs.step(actions)
        for i in range(N):
            contexts[i].append(int(actions[i]))
        if step == 0:  # sub-env 1 ended by EOS and restarted in the same step
            assert terminated.tolist() == [False, True, False]
            final_obs, final_info = info["final_obs"], info["final_info"]
            assert info["_final_obs"].tolist() == [False, True, False]
            n1 = len(contexts[1])
            assert final_obs["input_ids"][1][:n1].tolist() == contexts[1]
            assert final_info["_score"][1] and "score" not in info
            assert info["_prompt_ids"][1] and obs["attention_mask"][1].sum() == len(info["prompt_ids"][1])
            assert info["_logprob"].tolist() == [True, False, True]  # sub-env 1's moved to final_info
            contexts[1] = list(info["prompt_ids"][1])
    assert terminated.tolist() == [True, False, True]

    venv = SB3VecEnv(make_vec(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=2, autoreset_mode="SameStep"))
    obs = venv.reset()
    assert obs["input_ids"].shape == (N, 42) and venv.observation_space is venv.venv.single_observation_space
    obs, rewards, dones, infos = venv.step(np.array([5, 6, 7]))
    assert not dones.any() and all("logprob" in info for info in infos)
    first = rewards
    obs, rewards, dones, infos = venv.step(np.array([5, 6, 7]))
    assert dones.all()
    for i, info in enumerate(infos):
        assert {"score", "response", "logprob", "terminal_observation"} <= set(info)
        # VecMonitor's record, so SB3 shows ep_rew_mean without another wrapper
        assert info["episode"]["l"] == 2 and info["episode"]["r"] == pytest.approx(float(first[i]) + float(rewards[i]))
        final_ids = info["terminal_observation"]["input_ids"][: info["terminal_observation"]["attention_mask"].sum()]
        assert final_ids[-2:].tolist() == [[5, 6, 7][i]] * 2  # the prompt, then the two actions
        assert obs["attention_mask"][i].sum() == len(venv.reset_infos[i]["prompt_ids"])
    with pytest.raises(ValueError, match="SameStep"):
        SB3VecEnv(make_vec(tiny_lm_dir, tiny_prompts, length_reward))


def test_core_version_sees_weight_writes_and_parameters_added_later(tiny_lm_dir, tiny_prompts, length_reward):
    """The env's staleness check (LMCore.version) lists the actor's parameters once: an
    in-place write bumps it; a parameter added later counts after parameters_changed() (the
    LM policy calls it after injecting LoRA and after each optimizer step)."""
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward)
    core = envs.core
    version = core.version()
    with torch.no_grad():
        envs.actor.model.norm.weight.add_(1.0)
    assert core.version() == version + 1
    envs.actor.model.extra = torch.nn.Parameter(torch.zeros(1))  # setattr of a Parameter
    core.parameters_changed()
    version = core.version()
    with torch.no_grad():
        envs.actor.model.extra.add_(1.0)
    assert core.version() == version + 1


def test_without_autoreset_the_step_that_ends_every_running_row_runs_no_forward(tiny_lm_dir, tiny_prompts, length_reward):
    envs = make_vec(tiny_lm_dir, tiny_prompts, length_reward, max_new_tokens=3)
    envs.autoreset = False
    calls = []
    envs.actor.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    envs.reset(seed=0)
    eos = envs.core.tokenizer.eos_token_id
    envs.step(np.array([eos, 5, 6]))  # sub-env 0 ends; the others go on: one forward
    envs.step(np.array([7, 8, 9]))  # sub-env 0 idle: one forward
    assert len(calls) == 3
    obs, rewards, terminated, _, infos = envs.step(np.array([7, 10, 11]))  # the last two end together
    assert len(calls) == 3  # nothing would read that forward
    assert terminated.tolist() == [False, True, True] and infos["_score"].tolist() == [False, True, True]
    for row, last in ((1, 10), (2, 11)):  # the final observations hold the last tokens
        n = int(obs["attention_mask"][row].sum())
        assert obs["input_ids"][row][n - 1] == last and n == len(envs.contexts.ids[row])
