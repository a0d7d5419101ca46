"""``mask_truncated_completions`` (GRPO and RLOO): responses the length limit cut give no
gradient, their scores still count in their groups' baselines, and the loss's denominators
are TRL's. The gradient of one update equals a hand-written loss's on a hand-made rollout."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import rlhf_env  # noqa: F401
from agents import GRPO, RLOO
from agents.segments import TextSegment, is_truncated

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 3
SCORES = [1.0, 0.0, 0.5, 1.0]
GROUPS = [0, 0, 1, 1]


def _agent(cls, tiny_lm_dir, tiny_prompts, length_reward, **kwargs):
    env = gym.make_vec("TextRLHF-v0", num_envs=4, model=str(tiny_lm_dir), reward_model=length_reward,
                       prompts=tiny_prompts, max_new_tokens=MAX_NEW, shared_model=False)
    model = cls("LMPolicy", env, group_size=2, learning_rate=1e-3, beta=0.0, seed=0, **kwargs)
    model.learn(1)  # sets up the logger and the optimizer state
    return model


def _responses(eos: int) -> list[list[int]]:
    """Per group: one response that ends with EOS and one the length limit cuts."""
    return [[5, 6, eos], [5, 6, 7], [8, eos], [9, 9, 9]]


def _segments(model, tiny_prompts) -> list[TextSegment]:
    core = model.policy.core
    eos = min(core.eos_ids)
    segments = []
    for response, score, group in zip(_responses(eos), SCORES, GROUPS):
        context = torch.tensor(core.tokenizer(tiny_prompts[group])["input_ids"], dtype=torch.long)
        response = torch.tensor(response)
        with torch.no_grad():
            old = _log_probs(core, context, response)
        segments.append(TextSegment(context_ids=context, response_ids=response, old_logprobs=old,
                                    rewards=torch.zeros(len(response)), old_values=torch.zeros(len(response)),
                                    ref_logprobs=torch.full((len(response),), float("nan")), score=score, group=group))
    return segments


def _log_probs(core, context: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """``log pi(y_t | x, y_<t)`` of each response token, by one plain forward of the actor."""
    ids = torch.cat([context, response])[None]
    logits = core.actor(input_ids=ids).logits[0, len(context) - 1 : -1]
    return core.log_probs(logits).gather(-1, response[:, None]).squeeze(-1)


def _update_gradient(model, segments) -> list[torch.Tensor] | None:
    """The gradient ``train()`` accumulates before clipping and stepping (None: no step)."""
    got = []
    model._clip_and_step = lambda params, loss, grad_weight: got.append(
        [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    model._segments = segments
    model.train()
    return got[0] if got else None


def _hand_gradient(model, segments, kind: str, mask: bool) -> list[torch.Tensor]:
    """The gradient of the loss written out for this rollout, at ratio 1 (one epoch)."""
    core = model.policy.core
    scores = torch.tensor(SCORES, dtype=torch.float64)
    advantages = []
    for i, g in enumerate(GROUPS):
        mates = [scores[j] for j in range(4) if GROUPS[j] == g]  # both members, cut or not
        if kind == "rloo":  # score minus the mean of the OTHER response of the group
            advantages.append(float(scores[i] - (sum(mates) - scores[i]) / (len(mates) - 1)))
        else:  # GRPO: (score - mean) / (unbiased std + eps)
            m = sum(mates) / len(mates)
            std = (sum((x - m) ** 2 for x in mates) / (len(mates) - 1)) ** 0.5
            advantages.append(float((scores[i] - m) / (std + 1e-4)))
    kept = [i for i, s in enumerate(segments) if not (mask and int(s.response_ids[-1]) not in core.eos_ids)]
    n_kept_tokens = sum(len(segments[i]) for i in kept)
    params = [p for group in model.policy.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = None
    loss = torch.zeros(())
    for i in kept:
        s = segments[i]
        logp = _log_probs(core, s.context_ids, s.response_ids)
        ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of log pi
        if kind == "rloo":  # one term per response, mean over ALL responses (TRL's RLOO)
            loss = loss - advantages[i] * torch.exp(logp.sum() - logp.sum().detach()) / len(segments)
        elif kind == "dapo":  # sum over tokens / tokens that count
            loss = loss - (advantages[i] * ratio).sum() / n_kept_tokens
        else:  # "grpo": mean over the response's tokens, then over ALL responses
            loss = loss - (advantages[i] * ratio).mean() / len(segments)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_is_truncated_by_hand():
    eos = {2}
    seg = lambda ids: TextSegment(context_ids=torch.tensor([1]), response_ids=torch.tensor(ids, dtype=torch.long),  # noqa: E731
                                  old_logprobs=torch.zeros(len(ids)), rewards=torch.zeros(len(ids)),
                                  old_values=torch.zeros(len(ids)), ref_logprobs=torch.zeros(len(ids)))
    assert [is_truncated(seg(ids), eos) for ids in ([5, 2], [5, 6], [2], [5, 6, 2], [])] == [False, True, False, False, False]


@pytest.mark.parametrize("kind", ["rloo", "dapo", "grpo"])
@pytest.mark.parametrize("mask", [True, False])
def test_update_gradient_equals_hand_computation(tiny_lm_dir, tiny_prompts, length_reward, kind, mask):
    if kind == "rloo":
        model = _agent(RLOO, tiny_lm_dir, tiny_prompts, length_reward, mask_truncated_completions=mask)
    else:
        model = _agent(GRPO, tiny_lm_dir, tiny_prompts, length_reward, loss_type=kind, mask_truncated_completions=mask)
    segments = _segments(model, tiny_prompts)
    got = _update_gradient(model, segments)
    assert model.logger.name_to_value["rollout/truncated_frac"] == 0.5  # logged with or without the mask
    expected = _hand_gradient(model, segments, kind, mask)
    assert any(float(e.abs().max()) > 0 for e in expected)
    for g, e in zip(got, expected):  # equal up to float rounding (the update runs a group's prompt once)
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * float(e.abs().max()) + 1e-9)
    if mask:  # ... and far from the gradient that counts the cut responses
        unmasked = _hand_gradient(model, segments, kind, False)
        assert max(float((u - e).abs().max() / (e.abs().max() + 1e-12)) for u, e in zip(unmasked, expected)) > 0.05


def test_a_rollout_of_cut_responses_only_leaves_the_weights(tiny_lm_dir, tiny_prompts, length_reward):
    model = _agent(RLOO, tiny_lm_dir, tiny_prompts, length_reward, mask_truncated_completions=True)
    segments = [s for s in _segments(model, tiny_prompts) if int(s.response_ids[-1]) not in model.policy.core.eos_ids]
    for s in segments:
        s.group = 0
    before = [p.detach().clone() for p in model.policy.parameters()]
    model._segments = segments
    model.train()
    assert all(torch.equal(b, p) for b, p in zip(before, model.policy.parameters()))
