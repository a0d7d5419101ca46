"""PPO on the text environment: per-token GAE by hand, the one-forward-per-response
evaluation against independent full forwards, segments rebuilt from a real rollout, the
adaptive KL coefficient written into the env, learning on TextRLHF-tiny-v0, LoRA, and the
saved policy reloading and generating."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from agents import PPO
from agents.lm_forward import HeadOptions, evaluate_segments
from agents.losses import token_gae
from agents.segments import TextSegment, micro_batches
from agents.text_ppo import RunningMeanStd, compute_advantages, shape_scores, TextPPOState, RLHFConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_gae_matches_hand_computation():
    rewards = torch.tensor([-0.1, -0.2, 1.0])
    values = torch.tensor([0.5, 0.4, 0.3])
    lam = 0.95
    # finished response: no value after the last token, gamma = 1
    d2 = 1.0 - 0.3
    d1 = -0.2 + 0.3 - 0.4
    d0 = -0.1 + 0.4 - 0.5
    a2 = d2
    a1 = d1 + lam * a2
    a0 = d0 + lam * a1
    adv, ret = token_gae(rewards, values, terminated=True, gamma=1.0, gae_lambda=lam)
    assert adv.tolist() == pytest.approx([a0, a1, a2], abs=1e-6)
    assert ret.tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3], abs=1e-6)
    # unfinished response (end of a rollout): bootstrap from V(s_T) = 2, with gamma = 0.9
    g = 0.9
    d2 = 1.0 + g * 2.0 - 0.3
    d1 = -0.2 + g * 0.3 - 0.4
    d0 = -0.1 + g * 0.4 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, _ = token_gae(rewards, values, last_value=2.0, terminated=False, gamma=g, gae_lambda=lam)
    assert adv.tolist() == pytest.approx([a0, a1, a2], abs=1e-6)
    # lambda = 1, gamma = 1, terminal: advantage = return-to-go - V
    adv, ret = token_gae(rewards, values, terminated=True, gamma=1.0, gae_lambda=1.0)
    assert ret.tolist() == pytest.approx([0.7, 0.8, 1.0], abs=1e-6)


def test_score_normalisation_replaces_the_score_in_the_last_reward():
    state = TextPPOState(RLHFConfig(score_norm=True, score_clip=1.0), 0.1)
    segs = []
    for score in (0.0, 1.0, 3.0):
        z = torch.zeros(2)
        segs.append(TextSegment(torch.tensor([1]), torch.tensor([2, 3]), z, torch.tensor([-0.1, -0.1 + score]), z, z, score=score))
    shape_scores(segs, state)
    mean, std = np.mean([0, 1, 3]), np.std([0, 1, 3])
    for seg, score in zip(segs, (0.0, 1.0, 3.0)):
        expected = float(np.clip((score - mean) / std, -1, 1))
        assert seg.rewards.tolist() == pytest.approx([-0.1, -0.1 + expected], abs=1e-3)
    rms = RunningMeanStd()
    rms.update(np.array([1.0, 2.0]))
    rms.update(np.array([3.0, 4.0, 5.0]))
    assert rms.mean == pytest.approx(3.0, abs=1e-3) and rms.std == pytest.approx(np.std([1, 2, 3, 4, 5]), abs=1e-3)
    compute_advantages(segs, 1.0, 0.95, normalize=True)
    flat = torch.cat([s.advantages for s in segs])
    assert float(flat.mean()) == pytest.approx(0.0, abs=1e-5) and float(flat.std()) == pytest.approx(1.0, abs=1e-4)


def test_one_forward_per_response_equals_independent_forwards(tiny_lm_dir):
    from rlhf_env.models import encode_prompt, load_lm

    model, tok = load_lm(tiny_lm_dir)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.manual_seed(0)
    segs = []
    for prompt, n in (("hello", 5), ("tell me a story about the sea", 9), ("what", 1)):
        ctx = torch.tensor(encode_prompt(tok, prompt))
        resp = torch.randint(3, len(tok), (n,))
        z = torch.zeros(n)
        segs.append(TextSegment(ctx, resp, z, z, z, z))
    out = evaluate_segments(model, segs, tok.pad_token_id, HeadOptions(temperature=0.7, value_head=head))
    for seg, lp, ent, v in zip(segs, out.logprobs, out.entropies, out.values):
        ids = torch.cat([seg.context_ids, seg.response_ids])[None]
        full = model(ids, output_hidden_states=True)
        c = len(seg.context_ids)
        logp = torch.log_softmax(full.logits[0, c - 1 : -1].float() / 0.7, -1)
        assert torch.allclose(lp, logp.gather(-1, seg.response_ids[:, None]).squeeze(-1), atol=1e-4)
        assert torch.allclose(ent, -(logp.exp() * logp).sum(-1), atol=1e-4)
        assert torch.allclose(v, head(full.hidden_states[-1][0, c - 1 : -1]).squeeze(-1), atol=1e-4)
    # micro-batches bound the padded size and keep the order
    lengths = [30, 20, 20, 10, 5]
    batches = micro_batches(lengths, 45, lambda n: n)
    assert [x for b in batches for x in b] == lengths
    assert all(max(b) * len(b) <= 45 or len(b) == 1 for b in batches)


def test_rollout_segments_match_the_env(tiny_lm_dir, tiny_prompts, length_reward):
    """Segments rebuilt from a rollout hold what the env charged: the policy's log-probs,
    the env's rewards (KL penalty per token, score on the last), contexts = prompts."""
    env = gym.make_vec("TextRLHF-v0", num_envs=3, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=6, kl_coef=0.3, shared_model=False)
    # the env's own rewards: no score normalisation, kl_coef fixed
    model = PPO("LMPolicy", env, n_steps=10, batch_size=16, n_epochs=1, learning_rate=1e-3, gamma=1.0, seed=0,
                rlhf=dict(score_norm=False, target_kl=None))
    model.learn(30)
    segments = model._segments
    finished = [s for s in segments if s.terminated]
    assert finished and all(len(s) <= 6 for s in segments)
    core = env.unwrapped.core
    prompt_ids = {tuple(ids) for ids in env.unwrapped.prompt_ids}
    for seg in finished:
        if seg.score is None:
            continue
        # a response that started in this rollout has the bare prompt as its context
        if tuple(seg.context_ids.tolist()) in prompt_ids:
            kl = seg.old_logprobs - seg.ref_logprobs  # k1
            expected = -0.3 * kl
            expected[-1] += seg.score
            assert torch.allclose(seg.rewards, expected, atol=1e-4)
            text = core.tokenizer.decode(seg.response_ids.tolist(), skip_special_tokens=True)
            assert text == seg.response
    # the old log-probs are those of the acting policy: an independent forward agrees
    out = evaluate_segments(core.reference, finished, core.pad_id)
    for seg, ref in zip(finished, out.logprobs):
        assert torch.allclose(seg.ref_logprobs, ref, atol=1e-4)


def _mean_score(env, prompts, n_tokens, seed=1):
    from rlhf_env.generation import generate

    core = env.unwrapped.core
    texts = generate(core.actor, core.tokenizer, prompts, max_new_tokens=n_tokens, seed=seed, progress=False).flat()
    return float(env.unwrapped.reward_model(prompts, texts).mean())


def test_ppo_raises_the_reward_of_tiny_v0_with_adaptive_kl(tmp_path):
    from rlhf_env.prompts import load_prompts

    torch.manual_seed(0)
    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=16, max_new_tokens=12, shared_model=False)
    prompts = load_prompts(split="test")[:32]
    before = _mean_score(env, prompts, 12)
    model = PPO("LMPolicy", env, n_steps=13, batch_size=128, n_epochs=4, learning_rate=1e-3, gamma=1.0, seed=0,
                tensorboard_log=str(tmp_path / "tb"),
                rlhf=dict(kl_coef=0.02, target_kl=2.0, kl_horizon=1000, score_norm=True, sample_every=1))
    model.learn(16 * 13 * 7)
    after = _mean_score(env, prompts, 12)
    assert after > before + 0.25, (before, after)
    # the controller saw KL above its small target and raised the env's coefficient
    assert env.unwrapped.kl_coef > 0.02
    assert env.unwrapped.kl_coef == pytest.approx(model._text_state.kl_controller.value)
    # text metrics and samples reached TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next((tmp_path / "tb").iterdir())
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("rollout/score_mean", "rollout/kl_mean", "rollout/response_len_mean", "rollout/ep_rew_mean",
                "train/kl_coef", "train/approx_kl", "train/clip_fraction", "train/entropy_loss",
                "train/explained_variance", "train/learning_rate", "train/loss", "train/policy_gradient_loss",
                "train/value_loss"):
        assert tag in tags, tag
    assert any("samples" in t for t in acc.Tags()["tensors"])


def test_lora_trains_adapters_only_and_saves_a_merged_model(tmp_path, tiny_prompts, length_reward, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agents.export import save_pretrained

    env = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=6, shared_model=False)
    core = env.unwrapped.core
    ref0 = [p.detach().clone() for p in core.reference.parameters()]
    model = PPO("LMPolicy", env, n_steps=7, batch_size=16, n_epochs=2, learning_rate=1e-2, gamma=1.0, seed=0,
                policy_kwargs={"lora": {"r": 4}})
    base0 = {n: p.detach().clone() for n, p in core.actor.named_parameters()}
    trainable = {n for n, p in core.actor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model.learn(28)
    moved = {n for n, p in core.actor.named_parameters() if not torch.equal(p, base0[n])}
    assert any("lora_B" in n for n in moved) and all("lora_" in n for n in moved)  # base weights frozen, adapters trained
    assert all(torch.equal(a, b) for a, b in zip(ref0, core.reference.parameters()))  # reference = start
    # the merged export reloads without peft and computes what the adapted actor computes
    out = save_pretrained(core.actor, core.tokenizer, tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("tell me a story", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, core.actor(ids).logits, atol=1e-4)
    gen = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    # and the env takes it as its model
    env2 = gym.make("TextRLHF-v0", model=str(out), reward_model=length_reward, prompts=tiny_prompts,
                    max_new_tokens=4, shared_model=False)
    obs, _ = env2.reset(seed=0)
    _, _, _, _, info = env2.step(int(obs["input_ids"][0]))
    assert "logprob" in info


def test_ppo_text_path_saves_and_loads(tmp_path, tiny_prompts, length_reward, tiny_lm_dir):
    env = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=4, shared_model=False)
    model = PPO("LMPolicy", env, n_steps=5, batch_size=8, n_epochs=1, gamma=1.0, seed=0,
                rlhf={"kl_coef": 0.1, "target_kl": 1.0})
    model.learn(10)
    model.save(tmp_path / "ppo_text")
    loaded = PPO.load(tmp_path / "ppo_text", env=env)
    assert loaded._text_state.kl_controller.value == pytest.approx(model._text_state.kl_controller.value)
    loaded.learn(10)  # the text path continues after loading
    with pytest.raises(ValueError, match="unknown RLHFConfig keys"):
        PPO("LMPolicy", env, rlhf={"kl_coeff": 0.1})


def test_single_env_same_step_autoreset(tiny_prompts, length_reward, tiny_lm_dir):
    """gym.make (one env, wrapped in a SAME_STEP SyncVectorEnv): the finished step's info
    comes from ``final_info``, and the controller writes kl_coef into the env."""
    env = gym.make("TextRLHF-v0", model=str(tiny_lm_dir), reward_model=length_reward, prompts=tiny_prompts,
                   max_new_tokens=4, kl_coef=0.1, shared_model=False)
    model = PPO("LMPolicy", env, n_steps=16, batch_size=16, n_epochs=1, gamma=1.0, seed=0,
                rlhf={"kl_coef": 0.1, "target_kl": 1e3, "kl_horizon": 100})
    model._text_state.kl_controller.hold_until_target = False  # Ziegler's rule from the first rollout
    model.learn(32)
    finished = [s for s in model._segments if s.terminated]
    assert finished and all(s.score is not None and s.response is not None for s in finished)
    assert all(not torch.isnan(s.ref_logprobs).any() for s in model._segments)
    assert env.unwrapped.kl_coef == pytest.approx(0.1 * (1 - 0.2 * 16 / 100) ** 2)  # fell 3.2 % per rollout
    assert env.unwrapped.kl_coef == pytest.approx(model._text_state.kl_controller.value)


@pytest.mark.parametrize("vector", [True, False], ids=["batched-env", "single-env"])
@pytest.mark.parametrize("max_new_tokens", [3, 6])
def test_lm_defaults_finish_responses_in_every_rollout(tiny_lm_dir, tiny_prompts, length_reward, vector, max_new_tokens):
    """``PPO("LMPolicy", text_env)`` with no hyperparameters takes the text defaults
    (TEXT_PPO_DEFAULTS): n_steps = max_new_tokens + 1, so every env finishes a response in
    every rollout and the text metrics are in every log; the adaptive KL controller is on."""
    from agents.text_ppo import TEXT_PPO_DEFAULTS

    kwargs = dict(model=str(tiny_lm_dir), reward_model=length_reward, prompts=tiny_prompts,
                  max_new_tokens=max_new_tokens, shared_model=False)
    env = gym.make_vec("TextRLHF-v0", num_envs=3, **kwargs) if vector else gym.make("TextRLHF-v0", **kwargs)
    model = PPO("LMPolicy", env, seed=0)
    assert model.n_steps == max_new_tokens + 1
    for key in ("learning_rate", "batch_size", "n_epochs", "gamma", "gae_lambda", "max_grad_norm"):
        assert getattr(model, key) == TEXT_PPO_DEFAULTS[key], key
    assert model._text_state.config.target_kl == TEXT_PPO_DEFAULTS["target_kl"]
    for i in range(max_new_tokens + 3):  # every phase of a response against the rollout
        model.logger.name_to_value.clear()
        model.learn(model.n_steps * model.n_envs, reset_num_timesteps=i == 0, log_interval=10**6)
        assert len(model._last_rollout_stats.scores) >= model.n_envs, i  # one finished response per env at least
        for key in ("rollout/score_mean", "rollout/kl_mean", "rollout/response_len_mean", "train/kl_coef"):
            assert np.isfinite(model.logger.name_to_value[key]), (i, key)
    # explicit values win; SB3's defaults without the LM policy
    assert PPO("LMPolicy", env, n_steps=5, learning_rate=1e-3, gamma=0.9).n_steps == 5
    with pytest.warns(UserWarning, match=r"n_steps=2 is shorter than max_new_tokens \+ 1"):
        PPO("LMPolicy", env, n_steps=2)
    cartpole = PPO("MlpPolicy", "CartPole-v1")
    assert (cartpole.learning_rate, cartpole.n_steps, cartpole.gamma, cartpole.batch_size) == (3e-4, 2048, 0.99, 64)


def test_shipped_text_settings_finish_responses_in_every_rollout():
    """Every text setting the package ships (the rl-zoo3-style YAML entries that
    ``rlhf-env train`` reads, the demo's full and ``--quick`` configs, A2C's default with the
    LM policy) gives rollouts of at least ``max_new_tokens + 1`` steps; the tiny env's YAML entry, built as the CLI builds
    it, finishes a response per env in every rollout and logs the text metrics each time."""
    import inspect

    import yaml

    from agents.hyperparams import load_hyperparams, shipped_file
    from envs.text_vec_env import TextRLHFVectorEnv
    from rlhf_env.demo import DemoConfig, quick_config

    env_default = inspect.signature(TextRLHFVectorEnv).parameters["max_new_tokens"].default
    for algo in ("ppo", "a2c"):
        with open(shipped_file(algo), encoding="utf-8") as fh:
            table = yaml.safe_load(fh)
        for env_id, entry in table.items():
            if entry.get("policy") == "LMPolicy" and "n_steps" in entry:
                assert entry["n_steps"] >= env_default + 1, (algo, env_id)
    for cfg in (DemoConfig(), quick_config()):
        assert cfg.n_steps >= cfg.max_new_tokens + 1, cfg

    from agents import A2C, REINFORCE

    a2c = A2C("LMPolicy", "TextRLHF-tiny-v0", n_envs=2, seed=0)  # A2C's own default with the LM policy (the API, no YAML entry)
    assert a2c.n_steps == env_default + 1
    for i in range(2):  # the per-token loops (A2C, REINFORCE) log the text metrics too
        a2c.learn(a2c.n_steps * a2c.n_envs, reset_num_timesteps=i == 0, log_interval=10**6)
        for key in ("rollout/score_mean", "rollout/kl_mean", "rollout/response_len_mean"):
            assert np.isfinite(a2c.logger.name_to_value[key]), (i, key)
        a2c.logger.name_to_value.clear()
    assert len(a2c.ep_info_buffer) >= 2 * a2c.n_envs  # a finished response per env and rollout
    reinforce = REINFORCE("LMPolicy", "TextRLHF-tiny-v0", n_envs=2, seed=0)
    reinforce.learn(8, log_interval=10**6)
    assert 1 <= reinforce.logger.name_to_value["rollout/response_len_mean"] <= env_default
    with pytest.warns(UserWarning, match=r"n_steps=5 is shorter than max_new_tokens \+ 1"):
        A2C("LMPolicy", a2c.env, n_steps=5)
    assert A2C("MlpPolicy", "CartPole-v1").n_steps == 5  # SB3's default without the LM policy

    params = load_hyperparams("ppo", "TextRLHF-tiny-v0")
    for key in ("n_timesteps", "n_envs"):
        params.pop(key)
    model = PPO(params.pop("policy"), "TextRLHF-tiny-v0", n_envs=2, seed=0, **params)
    assert model.n_steps == env_default + 1
    for i in range(3):
        model.logger.name_to_value.clear()
        model.learn(model.n_steps * model.n_envs, reset_num_timesteps=i == 0, log_interval=10**6)
        assert len(model._last_rollout_stats.scores) >= model.n_envs, i
        for key in ("rollout/score_mean", "rollout/kl_mean", "rollout/response_len_mean"):
            assert np.isfinite(model.logger.name_to_value[key]), (i, key)
