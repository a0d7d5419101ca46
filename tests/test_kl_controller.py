"""The KL controllers: the adaptive one moves the coefficient towards the value that
yields the target KL (Ziegler et al. 2019), the fixed one never moves."""

from __future__ import annotations

import math

import pytest

from agents.kl_controller import (
    AdaptiveKLController,
    FixedKLController,
    get_env_kl_coef,
    make_kl_controller,
    set_env_kl_coef,
)


def test_adaptive_matches_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000, hold_until_target=False)
    # KL 9 > target 6: error = clip(9/6 - 1, -0.2, 0.2) = 0.2; 512 steps
    assert ctl.update(9.0, 512) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10_000))
    # KL 5.4 < 6: error = -0.1
    before = ctl.value
    assert ctl.update(5.4, 1000) == pytest.approx(before * (1 - 0.1 * 1000 / 10_000))


def test_adaptive_moves_towards_target_in_closed_loop():
    """A toy plant whose KL is inversely proportional to the coefficient (KL = 0.6 /
    kl_coef): the controller must drive the KL to the target from both sides."""
    for start in (0.01, 1.0):
        ctl = AdaptiveKLController(start, target=6.0, horizon=1_000, hold_until_target=False)
        kls = []
        for _ in range(300):
            kl = 0.6 / ctl.value
            kls.append(kl)
            ctl.update(kl, 256)
        assert abs(kls[-1] - 6.0) < 0.1, (start, kls[-1])
        assert ctl.value == pytest.approx(0.1, rel=0.02)
        # monotone approach: every step the error does not grow
        errors = [abs(math.log(k / 6.0)) for k in kls]
        assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))


def test_adaptive_holds_the_coefficient_until_the_kl_first_reaches_the_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1_000)
    for kl in (0.0, 1.0, 4.0):  # the policy is still near the reference: no decrease
        assert ctl.update(kl, 500) == 0.1
    assert ctl.update(9.0, 500) == pytest.approx(0.1 * (1 + 0.2 * 0.5))  # above: up, always
    before = ctl.value
    assert ctl.update(4.0, 500) < before  # the target was reached once: Ziegler's rule both ways


def test_kl_controller_holds_its_target_on_the_tiny_env():
    """PPO with the LM policy and the text defaults (target 6 nats per response) except a
    learning rate large enough for the tiny model to drift: the adaptive controller keeps
    the KL per response near the target, where the same run without a KL penalty drifts to
    several times it."""
    import gymnasium as gym
    import numpy as np
    import torch

    import rlhf_env  # noqa: F401
    from agents import PPO
    from agents.text_ppo import TEXT_PPO_DEFAULTS

    def last_half_kl(rlhf):
        torch.manual_seed(0)
        env = gym.make_vec("TextRLHF-tiny-v0", num_envs=8, max_new_tokens=16, shared_model=False)
        model = PPO("LMPolicy", env, learning_rate=6e-4, seed=0, rlhf=rlhf)
        kls = []
        for i in range(20):
            model.learn(model.n_steps * 8, reset_num_timesteps=i == 0)
            kls.append(np.mean(model._last_rollout_stats.kls))
        return float(np.mean(kls[10:])), model._text_state.kl_controller.value

    target = TEXT_PPO_DEFAULTS["target_kl"]
    held, coef = last_half_kl(None)
    free, _ = last_half_kl({"target_kl": None, "kl_coef": 0.0})
    assert 0.5 * target <= held <= 1.5 * target, held
    assert coef > TEXT_PPO_DEFAULTS["kl_coef"]  # it had to push back
    assert free > 2 * target, free


def test_adaptive_stays_positive_and_fixed_does_not_move():
    ctl = AdaptiveKLController(0.05, target=1.0, horizon=10, min_coef=1e-3, hold_until_target=False)
    for _ in range(100):
        ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(1e-3)
    fixed = FixedKLController(0.2)
    assert fixed.update(100.0, 10_000) == 0.2


def test_factory_and_errors():
    assert isinstance(make_kl_controller(0.1, None), FixedKLController)
    assert isinstance(make_kl_controller(0.0, 6.0), FixedKLController)
    assert isinstance(make_kl_controller(0.1, 6.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target KL"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="FixedKLController"):
        AdaptiveKLController(0.0, target=1.0)


def test_set_env_kl_coef_on_env_and_vector():
    class Inner:
        kl_coef = 0.1

        @property
        def unwrapped(self):
            return self

    class Wrapper:
        def __init__(self):
            self.inner = Inner()

        @property
        def unwrapped(self):
            return self.inner

    class Vec:  # SB3-like VecEnv of single envs
        def __init__(self):
            self.envs = [Inner(), Inner()]

        def set_attr(self, name, value):
            for e in self.envs:
                setattr(e, name, value)

        def get_attr(self, name):
            return [getattr(e, name) for e in self.envs]

    w = Wrapper()
    set_env_kl_coef(w, 0.3)
    assert w.unwrapped.kl_coef == 0.3 and get_env_kl_coef(w) == 0.3
    v = Vec()
    set_env_kl_coef(v, 0.7)
    assert [e.kl_coef for e in v.envs] == [0.7, 0.7] and get_env_kl_coef(v) == 0.7
    with pytest.raises(AttributeError, match="kl_coef"):
        set_env_kl_coef(object(), 0.1)
