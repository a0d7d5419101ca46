"""Training log-probs equal rollout log-probs under the env's sampling transform
(temperature and top-k): ``agents.lm_forward.evaluate_segments`` re-evaluates a sampled
response exactly as the env charged it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401
from agents.lm_forward import HeadOptions, evaluate_segments
from agents.segments import TextSegment
from rlhf_env.registration import make_text_vec_env
from tests.conftest import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_segments_uses_the_env_sampling_distribution(tiny_lm_dir, length_reward):
    temperature, top_k, n = 0.7, 5, 3
    envs = make_text_vec_env(num_envs=n, model=str(tiny_lm_dir), reward_model=length_reward, prompts=PROMPTS,
                             max_new_tokens=6, max_prompt_tokens=40, temperature=temperature, top_k=top_k,
                             shared_model=False)
    core = envs.core
    obs, info = envs.reset(seed=0)
    prompts = [list(ids) for ids in info["prompt_ids"]]
    responses, logprobs = [[] for _ in range(n)], [[] for _ in range(n)]
    gen = torch.Generator().manual_seed(0)
    done = np.zeros(n, dtype=bool)
    while not done.all():
        with torch.no_grad():  # act as LMActorCriticPolicy does: sample from the env's distribution
            _, logits = core.actor_features(torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"]))
            actions = torch.multinomial(core.log_probs(logits).exp(), 1, generator=gen)[:, 0].numpy()
        obs, _, terminated, _, step_info = envs.step(actions)
        for i in np.flatnonzero(~done):
            responses[i].append(int(actions[i]))
            logprobs[i].append(step_info["logprob"][i])
        done |= terminated
    segments = [
        TextSegment(torch.tensor(p), torch.tensor(r), torch.tensor(lp), *(torch.zeros(len(r)),) * 3)
        for p, r, lp in zip(prompts, responses, logprobs)
    ]
    pad = core.pad_id
    with torch.no_grad():
        evaluated = evaluate_segments(core.actor, segments, pad, HeadOptions(temperature=temperature, top_k=top_k))
        without_top_k = evaluate_segments(core.actor, segments, pad, HeadOptions(temperature=temperature))
    for seg, new in zip(segments, evaluated.logprobs):
        np.testing.assert_allclose(new.numpy(), seg.old_logprobs.numpy(), atol=1e-5)
    # the top-k renormalisation matters: leaving it out changes every log-prob
    gaps = [float((seg.old_logprobs - new).abs().min()) for seg, new in zip(segments, without_top_k.logprobs)]
    assert min(gaps) > 1e-3
    # entropies are finite although the masked logits are the most negative float
    assert all(torch.isfinite(e).all() and (e >= 0).all() and (e <= np.log(top_k) + 1e-5).all() for e in evaluated.entropies)
