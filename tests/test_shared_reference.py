"""The reference on the actor's frozen trunk (``reference_share="auto"``): rewards equal
independent full forwards of the reference, the reference's lower blocks are really
skipped, and the split follows ``requires_grad``, in-place weight changes and LoRA."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from agents.policies.lm import LMActorCriticPolicy, set_trainable
from envs.reference import SharedTrunk
from rlhf_env.registration import make_text_env
from tests.conftest import PROMPTS, build_tiny_lm_dir
from tests.test_text_env import full_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
N = 3


@pytest.fixture(scope="module")
def deep_lm_dir(tmp_path_factory):
    """A tiny Llama with 4 blocks, so a split leaves blocks on both sides."""
    return build_tiny_lm_dir(tmp_path_factory.mktemp("deep_lm"), layers=LAYERS)


def make_vec(model_dir, reward, **kwargs):
    kwargs = {"max_new_tokens": 5, "max_prompt_tokens": 40, "kl_coef": 0.2, "shared_model": False, **kwargs}
    return gym.make_vec("TextRLHF-v0", num_envs=N, model=str(model_dir), reward_model=reward, prompts=PROMPTS, **kwargs)


def perturb_blocks(model, blocks, scale=0.1, seed=0):
    """Move some actor blocks (and the final norm) away from the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in blocks:
            for p in model.model.layers[i].parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        model.model.norm.weight.add_(scale * torch.randn(model.model.norm.weight.shape, generator=gen))


class CallCounter:
    """Counts forward calls of each reference decoder block."""

    def __init__(self, model):
        self.calls = [0] * len(model.model.layers)
        self.handles = [
            layer.register_forward_pre_hook(lambda m, a, i=i: self._hit(i)) for i, layer in enumerate(model.model.layers)
        ]

    def _hit(self, i):
        self.calls[i] += 1

    def reset(self):
        self.calls = [0] * len(self.calls)


def check_step(info, rows, contexts, actions, actor, reference, kl_coef, rewards, scores=None):
    for row in rows:
        lp = full_log_probs(actor, contexts[row])
        ref_lp = full_log_probs(reference, contexts[row])
        a = int(actions[row])
        assert info["logprob"][row] == pytest.approx(float(lp[a]), abs=1e-4)
        assert info["ref_logprob"][row] == pytest.approx(float(ref_lp[a]), abs=1e-4)
        expected = -kl_coef * float(lp[a] - ref_lp[a]) + (scores[row] if scores is not None else 0.0)
        assert rewards[row] == pytest.approx(expected, abs=1e-4)


def test_vector_env_rewards_match_full_reference_and_skip_lower_blocks(deep_lm_dir, length_reward):
    envs = make_vec(deep_lm_dir, length_reward)
    off = make_vec(deep_lm_dir, length_reward, reference_share="off")
    # as LMActorCriticPolicy(train_layers=2) configures the actor; then it drifts in its top blocks
    for e in (envs, off):
        set_trainable(e.actor, 2)
        perturb_blocks(e.actor, [2, 3])
    counter = CallCounter(envs.reference)
    off_counter = CallCounter(off.reference)
    eos = envs.tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    obs, info = envs.reset(seed=0)
    off.reset(seed=0)
    assert envs.unwrapped.contexts.shared_blocks == 2 and off.unwrapped.contexts.shared_blocks == 0
    assert envs.unwrapped.core.shared_trunk().fused_head  # frozen, equal heads: one matmul for both
    contexts = [list(ids) for ids in info["prompt_ids"]]
    restarting = np.zeros(N, dtype=bool)
    finished = 0
    env_calls, off_calls = np.zeros(LAYERS, int), np.zeros(LAYERS, int)  # not counting check_step's forwards
    for step in range(12):
        actions = rng.integers(envs.single_action_space.n, size=N)
        if step == 2:
            actions[1] = eos  # sub-envs finish at different times, so prompts of different lengths meet
        counter.reset(), off_counter.reset()
        obs, rewards, terminated, _, info = envs.step(actions)
        _, off_rewards, _, _, _ = off.step(actions)
        env_calls += counter.calls
        off_calls += off_counter.calls
        np.testing.assert_allclose(rewards, off_rewards, atol=1e-5)
        rows = [i for i in range(N) if not restarting[i]]
        scores = {i: info["score"][i] for i in rows if terminated[i]}
        check_step(info, rows, contexts, actions, envs.actor, envs.reference, 0.2, rewards,
                   {i: scores.get(i, 0.0) for i in range(N)})
        for i in range(N):
            if restarting[i]:
                contexts[i] = list(info["prompt_ids"][i])
            else:
                contexts[i].append(int(actions[i]))
        restarting = terminated.copy()
        finished += int(terminated.sum())
    assert finished >= N + 1  # EOS and length ends, autoresets included
    # the reference ran only its top 2 blocks; the full-reference env ran all of them
    assert env_calls[:2].tolist() == [0, 0] and env_calls[2:].min() > 0
    assert off_calls.min() > 0


def test_single_env_shared_trunk_all_estimators_match(deep_lm_dir, length_reward):
    env = make_text_env(model=str(deep_lm_dir), reward_model=length_reward, prompts=PROMPTS, max_new_tokens=4,
                      max_prompt_tokens=40, kl_coef=0.3, kl_estimator="full", shared_model=False)
    set_trainable(env.actor, 1)
    perturb_blocks(env.actor, [3])
    obs, info = env.reset(seed=3)
    ids = list(info["prompt_ids"])
    rng = np.random.default_rng(1)
    done = False
    while not done:
        action = int(rng.integers(env.action_space.n))
        lp, ref_lp = full_log_probs(env.actor, ids), full_log_probs(env.reference, ids)
        _, reward, done, _, step_info = env.step(action)
        assert env.contexts.shared_blocks == LAYERS - 1
        kl = float((lp.exp() * (lp - ref_lp)).sum())
        assert step_info["ref_logprob"] == pytest.approx(float(ref_lp[action]), abs=1e-4)
        assert step_info["kl"] == pytest.approx(kl, abs=1e-4)
        assert reward == pytest.approx(-0.3 * kl + step_info.get("score", 0.0), abs=1e-4)
        ids.append(action)


def test_split_follows_requires_grad_and_in_place_changes(deep_lm_dir, length_reward):
    envs = make_vec(deep_lm_dir, length_reward, max_new_tokens=20)
    contexts_state = envs.unwrapped.contexts
    rng = np.random.default_rng(2)
    obs, info = envs.reset(seed=1)
    contexts = [list(ids) for ids in info["prompt_ids"]]

    def step_and_check():
        actions = rng.integers(envs.single_action_space.n, size=N)
        _, rewards, terminated, _, info = envs.step(actions)
        assert not terminated.any()
        check_step(info, range(N), contexts, actions, envs.actor, envs.reference, 0.2, rewards)
        for i in range(N):
            contexts[i].append(int(actions[i]))

    # a freshly loaded actor is trainable everywhere: full reference
    step_and_check()
    assert contexts_state.shared_blocks == 0
    # the policy freezes all but the top block after the env was built (as SB3 does): shared from the next step
    set_trainable(envs.actor, 1)
    step_and_check()
    assert contexts_state.shared_blocks == LAYERS - 1
    perturb_blocks(envs.actor, [3], seed=1)  # training the top block keeps the split
    step_and_check()
    assert contexts_state.shared_blocks == LAYERS - 1
    # reloading identical weights bumps every version counter: re-verified, still shared
    envs.actor.load_state_dict(envs.actor.state_dict())
    step_and_check()
    assert contexts_state.shared_blocks == LAYERS - 1
    # a head that differs from the reference's: still shared blocks, but separate head matmuls
    trunk = envs.unwrapped.core.shared_trunk()
    assert trunk.fused_head
    with torch.no_grad():
        envs.actor.lm_head.weight.mul_(1.1)
    step_and_check()
    assert contexts_state.shared_blocks == LAYERS - 1 and not trunk.fused_head
    # an in-place write to a frozen lower block: block 1 differs, so only block 0 is shared
    with torch.no_grad():
        envs.actor.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    step_and_check()
    assert contexts_state.shared_blocks == 1
    # a lower block that trains again: nothing shared
    envs.actor.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    step_and_check()
    assert contexts_state.shared_blocks == 0
    # the embeddings must be frozen too
    envs.actor.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    envs.actor.model.embed_tokens.weight.requires_grad_(True)
    step_and_check()
    assert contexts_state.shared_blocks == 0


def test_policy_train_layers_shares_and_lora_does_not(deep_lm_dir, length_reward):
    envs = make_vec(deep_lm_dir, length_reward)
    envs.reset(seed=0)
    assert envs.unwrapped.contexts.shared_blocks == 0
    LMActorCriticPolicy(envs.single_observation_space, envs.single_action_space, lambda _: 1e-4, train_layers=2)
    envs.step(np.zeros(N, dtype=np.int64))
    assert envs.unwrapped.contexts.shared_blocks == 2

    lora_envs = make_vec(deep_lm_dir, length_reward)
    LMActorCriticPolicy(lora_envs.single_observation_space, lora_envs.single_action_space, lambda _: 1e-4,
                        lora={"r": 2})
    lora_envs.reset(seed=0)
    # adapters are trainable in every block: the actor's trunk is not the reference's
    assert lora_envs.unwrapped.contexts.shared_blocks == 0


def test_off_mode_unsupported_models_and_bad_value(deep_lm_dir, length_reward):
    from transformers import GPT2Config, GPT2LMHeadModel

    envs = make_vec(deep_lm_dir, length_reward, reference_share="off")
    set_trainable(envs.actor, 1)
    envs.reset(seed=0)
    envs.step(np.zeros(N, dtype=np.int64))
    assert envs.unwrapped.contexts.shared_blocks == 0
    with pytest.raises(ValueError, match="reference_share must be one of"):
        make_vec(deep_lm_dir, length_reward, reference_share="always")

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    for p in gpt2.parameters():
        p.requires_grad_(False)
    trunk = SharedTrunk(gpt2, gpt2)
    assert not trunk.supported and "gpt2" in trunk.reason and trunk.split() == 0


@pytest.mark.slow
def test_smollm2_shared_trunk_matches_full_reference():
    """SmolLM2-135M (30 blocks, tied head) with the actor as train_layers=2 leaves it: the
    reference runs blocks 28-29 only, and its log-probs equal a full reference forward."""
    envs = gym.make_vec("TextRLHF-v0", num_envs=2, max_new_tokens=3, reward_model="sentiment", shared_model=False)
    set_trainable(envs.actor, 2)
    perturb_blocks(envs.actor, [28, 29], scale=0.002)
    obs, info = envs.reset(seed=0)
    contexts = [list(ids) for ids in info["prompt_ids"]]
    for _ in range(2):
        actions = np.array([int(torch.argmax(full_log_probs(envs.actor, c))) for c in contexts])
        _, rewards, _, _, step_info = envs.step(actions)
        assert envs.unwrapped.contexts.shared_blocks == 28
        check_step(step_info, range(2), contexts, actions, envs.actor, envs.reference, 0.05, rewards)
        for c, a in zip(contexts, actions):
            c.append(int(a))


def test_decode_head_equals_the_head_and_follows_weight_changes():
    from envs.reference import decode_head

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    x = torch.randn(4, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(decode_head(head, x), head(x), atol=1e-5, rtol=1e-5)
        head.weight.mul_(2.0)  # in place: the transposed copy must be rebuilt
        torch.testing.assert_close(decode_head(head, x), head(x), atol=1e-5, rtol=1e-5)
        head.weight = torch.nn.Parameter(torch.randn(300, 16))  # a new tensor
        torch.testing.assert_close(decode_head(head, x), head(x), atol=1e-5, rtol=1e-5)
    biased = torch.nn.Linear(16, 300)
    with torch.no_grad():
        assert torch.equal(decode_head(biased, x), biased(x))  # other heads: the module itself
