"""GAE and reward-to-go against hand computations."""

import numpy as np
import pytest
import torch

from agents.buffers import compute_gae
from agents.reinforce import discounted_reward_to_go


def hand_gae(rewards, values, terminated, truncated, last_values, final_values, gamma, lam):
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for e in range(N):
        gae = 0.0
        for t in reversed(range(T)):
            if terminated[t, e]:
                next_v = 0.0
            elif truncated[t, e]:
                next_v = final_values[t, e]
            else:
                next_v = values[t + 1, e] if t + 1 < T else last_values[e]
            delta = rewards[t, e] + gamma * next_v - values[t, e]
            done = terminated[t, e] or truncated[t, e]
            gae = delta + (0.0 if done else gamma * lam * gae)
            adv[t, e] = gae
    return adv


def test_gae_matches_hand_computation_with_termination_and_truncation():
    gamma, lam = 0.9, 0.8
    rewards = np.array([[1.0, 0.5], [2.0, 1.0], [0.0, -1.0], [1.0, 2.0]])
    values = np.array([[0.5, 1.0], [1.5, 0.2], [0.3, 0.7], [0.8, -0.4]])
    terminated = np.array([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=bool)  # env 0 ends at t=1
    truncated = np.array([[0, 0], [0, 0], [0, 1], [0, 0]], dtype=bool)  # env 1 cut at t=2
    final_values = np.zeros((4, 2))
    final_values[2, 1] = 3.0  # value of env 1's final observation at the cut
    last_values = np.array([0.25, -0.5])

    adv, ret = compute_gae(
        torch.tensor(rewards), torch.tensor(values), torch.tensor(terminated), torch.tensor(truncated),
        torch.tensor(last_values), torch.tensor(final_values), gamma=gamma, gae_lambda=lam,
    )
    expected = hand_gae(rewards, values, terminated, truncated, last_values, final_values, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-6)
    # spelled out for two entries: the terminal step has no bootstrap ...
    assert adv[1, 0].item() == pytest.approx(2.0 - 1.5)
    # ... the truncated one bootstraps with V(final obs) and does not see t=3
    assert adv[2, 1].item() == pytest.approx(-1.0 + 0.9 * 3.0 - 0.7)


def test_gae_truncation_uses_next_row_in_next_step_layout():
    # NEXT_STEP autoreset: the row after a truncation holds the final observation,
    # so final_values=None bootstraps from values[t+1]
    rewards = torch.tensor([[1.0], [0.0], [1.0]])
    values = torch.tensor([[0.2], [5.0], [0.1]])
    truncated = torch.tensor([[True], [False], [False]])
    terminated = torch.zeros_like(truncated)
    adv, _ = compute_gae(rewards, values, terminated, truncated, torch.tensor([0.0]), None, gamma=0.5, gae_lambda=1.0)
    assert adv[0, 0].item() == pytest.approx(1.0 + 0.5 * 5.0 - 0.2)


def test_gae_lambda_one_gives_discounted_returns():
    rewards = torch.ones(5, 1)
    values = torch.zeros(5, 1)
    terminated = torch.tensor([[0], [0], [0], [0], [1]], dtype=torch.bool)
    _, ret = compute_gae(rewards, values, terminated, torch.zeros_like(terminated), torch.zeros(1), None, 0.5, 1.0)
    np.testing.assert_allclose(ret[:, 0].numpy(), [1.9375, 1.875, 1.75, 1.5, 1.0])


def test_reward_to_go_restarts_after_done():
    rewards = np.array([[1.0], [1.0], [1.0], [2.0]])
    dones = np.array([[0.0], [1.0], [0.0], [1.0]])
    np.testing.assert_allclose(discounted_reward_to_go(rewards, dones, 0.5)[:, 0], [1.5, 1.0, 2.0, 2.0])
