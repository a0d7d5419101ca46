"""Every formula of agents.losses (and envs.kl) equals a hand computation in plain Python,
and GRPO's / RLOO's options build their loss from them as TRL does."""

from __future__ import annotations

import math

import pytest
import torch

from agents import GRPO, RLOO
from agents.losses import (
    aggregate_token_loss,
    approx_kl,
    clip_fraction,
    clipped_surrogate,
    group_advantages,
    kl_penalty_surrogate,
    kl_to_reference,
    normalize_advantages,
    policy_gradient_loss,
    rloo_advantages,
    sequence_log_ratio,
    value_loss,
)
from envs.kl import kl_estimate

RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]
ADVS = [1.0, -2.0, 0.5, -1.0, 3.0]


def test_clipped_surrogate_by_hand():
    got = clipped_surrogate(torch.tensor(RATIOS), torch.tensor(ADVS), 0.2)
    expected = [-min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(RATIOS, ADVS)]
    assert got.tolist() == pytest.approx(expected)
    # clip-higher: the upper bound moves to 1 + 0.28, the lower stays 1 - 0.2
    got = clipped_surrogate(torch.tensor(RATIOS), torch.tensor(ADVS), 0.2, clip_range_high=0.28)
    expected = [-min(r * a, min(max(r, 0.8), 1.28) * a) for r, a in zip(RATIOS, ADVS)]
    assert got.tolist() == pytest.approx(expected)
    assert expected[-1] == pytest.approx(-1.28 * 3.0)  # ratio 1.5, A > 0: clipped at the higher bound
    fractions = clip_fraction(torch.tensor(RATIOS), 0.2, 0.28).tolist()
    assert fractions == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_vanilla_and_kl_penalty_surrogates_by_hand():
    logp = torch.tensor([-1.0, -0.5, -2.0])
    adv = torch.tensor([1.0, -1.0, 2.0])
    assert policy_gradient_loss(logp, adv).tolist() == pytest.approx([1.0, -0.5, 4.0])
    log_ratio = torch.tensor([0.1, -0.2, 0.0])
    got = kl_penalty_surrogate(log_ratio.exp(), log_ratio, adv, beta=0.5)
    expected = [-math.exp(x) * a + 0.5 * ((math.exp(x) - 1) - x) for x, a in zip(log_ratio.tolist(), adv.tolist())]
    assert got.tolist() == pytest.approx(expected)


def test_value_loss_by_hand():
    v, r, old = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 2.5, 1.0]), torch.tensor([0.5, 2.0, 0.0])
    assert value_loss(v, r).tolist() == pytest.approx([1.0, 0.25, 4.0])
    # clipped around the old value by 0.2: predictions 0.7, 2.0, -0.2
    assert value_loss(v, r, old, 0.2).tolist() == pytest.approx([0.49, 0.25, 1.44])


def test_kl_estimators_by_hand():
    x = [-0.7, 0.0, 0.3]  # log q - log p
    lr = torch.tensor(x)
    assert kl_estimate(lr, "k1").tolist() == pytest.approx([-v for v in x])
    assert kl_estimate(lr, "k2").tolist() == pytest.approx([v * v / 2 for v in x])
    assert kl_estimate(lr, "k3").tolist() == pytest.approx([math.exp(v) - 1 - v for v in x])
    assert approx_kl(lr).tolist() == pytest.approx([math.exp(v) - 1 - v for v in x])
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_to_reference(logp, ref).tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(lr, "k4")
    # all three estimate the same KL: exact KL of two Bernoullis vs the sample mean of each
    torch.manual_seed(0)
    p, q = 0.3, 0.6
    x = (torch.rand(200_000) < p).double()
    log_ratio = torch.where(x > 0, torch.tensor(math.log(q / p)), torch.tensor(math.log((1 - q) / (1 - p)))).double()
    exact = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert float(kl_estimate(log_ratio, "k1").mean()) == pytest.approx(exact, rel=0.05)
    assert float(kl_estimate(log_ratio, "k3").mean()) == pytest.approx(exact, rel=0.05)


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_group_advantages_scale_options_by_hand():
    scores = [1.0, 3.0, 2.0, 2.0, 0.0, 4.0]
    groups = [0, 0, 1, 1, 2, 2]
    s, g = torch.tensor(scores), torch.tensor(groups)
    means = {k: sum(x for x, j in zip(scores, groups) if j == k) / 2 for k in range(3)}
    stds = {k: _std([x for x, j in zip(scores, groups) if j == k]) for k in range(3)}
    centred = [x - means[j] for x, j in zip(scores, groups)]
    group = [c / (stds[j] + 1e-4) for c, j in zip(centred, groups)]
    batch = [c / (_std(scores) + 1e-4) for c in centred]
    assert group_advantages(s, g, scale="group").tolist() == pytest.approx(group, rel=1e-5)
    assert group_advantages(s, g, scale="batch").tolist() == pytest.approx(batch, rel=1e-5)
    assert group_advantages(s, g, scale="none").tolist() == pytest.approx(centred)
    assert group_advantages(s, g, scale=True).tolist() == group_advantages(s, g, scale="group").tolist()
    assert group_advantages(s, g, scale=False).tolist() == group_advantages(s, g, scale="none").tolist()
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(s, g, scale="rows")


def test_rloo_advantages_by_hand():
    scores = [1.0, 2.0, 6.0, 5.0, -1.0, 0.0, 1.0]
    groups = [0, 0, 0, 1, 1, 2, 3]  # group 2 and 3 have one response: no baseline
    got = rloo_advantages(torch.tensor(scores), torch.tensor(groups)).tolist()
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 5 - (-1), -1 - 5, 0.0, 0.0]
    assert got == pytest.approx(expected)
    # k / (k - 1) * (s - mean): the same numbers
    assert got[:3] == pytest.approx([1.5 * (x - 3.0) for x in (1.0, 2.0, 6.0)])



def test_normalize_advantages_by_hand():
    # mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3)
    std = math.sqrt(14 / 3)
    got = normalize_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), eps=0.5).tolist()
    assert got == pytest.approx([x / (std + 0.5) for x in (-2.0, -1.0, 0.0, 3.0)])
    assert normalize_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0])).tolist() == pytest.approx([x / std for x in (-2, -1, 0, 3)])


TOKEN_LOSS = [[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
LENGTHS = [3, 1, 2]


def _mask():
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in LENGTHS])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_aggregation_by_hand_and_over_micro_batches(loss_type):
    rows = [row[:n] for row, n in zip(TOKEN_LOSS, LENGTHS)]
    expected = {
        "grpo": sum(sum(r) / len(r) for r in rows) / 3,  # (2 + 4 + 1) / 3
        "dr_grpo": sum(map(sum, rows)) / (3 * 8),  # max_completion_length 8
        "dapo": sum(map(sum, rows)) / 6,
    }[loss_type]
    token_loss, mask = torch.tensor(TOKEN_LOSS), _mask()
    whole = aggregate_token_loss(token_loss, mask, loss_type, n_sequences=3, n_tokens=6, max_completion_length=8)
    assert float(whole) == pytest.approx(expected)
    # a minibatch split in micro-batches: the parts add up to the whole
    parts = [aggregate_token_loss(token_loss[i : i + 1], mask[i : i + 1], loss_type, 3, 6, 8) for i in range(3)]
    assert float(sum(parts)) == pytest.approx(expected)


def test_sequence_log_ratio_by_hand():
    log_ratio = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 9.0, 9.0], [-0.2, 0.0, 9.0, 9.0]])
    mask = _mask()
    assert sequence_log_ratio(log_ratio, mask, "mean").view(-1).tolist() == pytest.approx([0.2, 0.4, -0.1])
    assert sequence_log_ratio(log_ratio, mask, "sum").view(-1).tolist() == pytest.approx([0.6, 0.4, -0.2])


def _bare(cls, **attrs):
    algo = cls.__new__(cls)  # no env: only the loss methods are used
    algo.__dict__.update(attrs)
    return algo


# a tiny batch: three responses, new and old log-probs per token, one advantage each
NEW = [[-1.0, -0.5, -2.0, 0.0], [-0.3, 0.0, 0.0, 0.0], [-1.2, -0.9, 0.0, 0.0]]
OLD = [[-1.1, -0.7, -1.6, 0.0], [-0.6, 0.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]
ADV = [1.5, -0.5, -1.0]


def _hand_grpo_loss(level, loss_type, eps_low, eps_high, max_len=8):
    """TRL's GRPOTrainer._compute_loss (beta = 0) in plain Python loops."""
    per_token = []
    for new, old, a, n in zip(NEW, OLD, ADV, LENGTHS):
        lr = [x - y for x, y in zip(new[:n], old[:n])]
        if level == "sequence":
            lr = [sum(lr) / n] * n
        row = []
        for x in lr:
            r = math.exp(x)
            row.append(-min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a))
        per_token.append(row)
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in per_token) / len(per_token)
    if loss_type == "dr_grpo":
        return sum(map(sum, per_token)) / (len(per_token) * max_len)
    return sum(map(sum, per_token)) / sum(LENGTHS)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_options_loss_equals_hand_computation(level, loss_type, epsilon_high):
    algo = _bare(GRPO, importance_sampling_level=level, epsilon_high=epsilon_high, loss_type=loss_type)
    mask = _mask()
    advantages = torch.tensor(ADV)[:, None].expand(3, 4) * mask
    pg, ratio = algo._policy_loss(torch.tensor(NEW), torch.tensor(OLD), advantages, mask, 0.2)
    assert ratio.shape == ((3, 1) if level == "sequence" else (3, 4))
    loss = aggregate_token_loss(pg, mask, loss_type, 3, int(mask.sum()), 8)
    expected = _hand_grpo_loss(level, loss_type, 0.2, 0.2 if epsilon_high is None else epsilon_high)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_rloo_loss_and_advantages_equal_hand_computation():
    algo = _bare(RLOO, epsilon_high=None, beta=0.1, log_kl=True, normalize_advantages=False)
    mask = _mask()
    advantages = torch.tensor(ADV)[:, None].expand(3, 4) * mask
    pg, ratio = algo._policy_loss(torch.tensor(NEW), torch.tensor(OLD), advantages, mask, 0.2)
    loss = aggregate_token_loss(pg, mask, "grpo", 3, int(mask.sum()), 8)
    expected = 0.0
    for new, old, a, n in zip(NEW, OLD, ADV, LENGTHS):
        r = math.exp(sum(new[:n]) - sum(old[:n]))  # the response's probability ratio
        expected += -min(r * a, min(max(r, 0.8), 1.2) * a) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)

    # the KL penalty enters the reward: R = score - beta * sum_t (log pi_old - log ref)
    from agents.segments import TextSegment

    scores, groups = [1.0, 0.0, 2.0, 2.0], [0, 0, 0, 1]
    old = [[-1.0, -2.0], [-0.5], [-1.0, -1.0, -1.0], [-0.2]]
    ref = [[-1.5, -1.0], [-0.5], [-2.0, -1.0, -0.5], [-0.2]]
    segments = [
        TextSegment(context_ids=torch.tensor([1]), response_ids=torch.zeros(len(o), dtype=torch.long),
                    old_logprobs=torch.tensor(o), rewards=torch.zeros(len(o)), old_values=torch.zeros(len(o)),
                    ref_logprobs=torch.tensor(r), score=s, group=g)
        for o, r, s, g in zip(old, ref, scores, groups)
    ]
    algo._fill_reference_logprobs = lambda segs: None  # the reference's log-probs are given above
    got = algo._response_advantages(segments).tolist()
    rewards = [s - 0.1 * sum(a - b for a, b in zip(o, r)) for s, o, r in zip(scores, old, ref)]
    expected = [rewards[i] - sum(rewards[j] for j in range(3) if j != i) / 2 for i in range(3)] + [0.0]
    assert got == pytest.approx(expected, rel=1e-6)


def test_option_errors():
    for kwargs, match in (({"loss_type": "bnpo2"}, "loss_type"), ({"scale_rewards": "rows"}, "scale_rewards"),
                          ({"importance_sampling_level": "word"}, "importance_sampling_level"),
                          ({"epsilon_high": -0.1}, "epsilon_high")):
        with pytest.raises(ValueError, match=match):
            GRPO("LMPolicy", None, **kwargs)
    with pytest.raises(TypeError, match="loss_type"):
        RLOO("LMPolicy", None, loss_type="dapo")
