"""Envs made by name share one loaded actor (``shared_model=True``); a new env on an actor that a
policy has since trained says so instead of silently handing a new agent trained weights."""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest

import rlhf_env  # noqa: F401
from agents import PPO


def _make(**kwargs):
    return gym.make("TextRLHF-tiny-v0", max_new_tokens=4, **kwargs)


def test_untrained_actor_is_shared_quietly(monkeypatch):
    import rlhf_env.registration

    # an empty registry: a trained tiny actor that an earlier test left alive (a reference
    # cycle not yet collected) would otherwise be "first", and sharing it rightly warns
    monkeypatch.setattr(rlhf_env.registration, "_LOADED", {})
    first = _make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _make()
    assert second.unwrapped.actor is first.unwrapped.actor


def test_trained_actor_reuse_warns_and_shared_model_false_loads_fresh():
    env = _make()
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    model.learn(8)
    with pytest.warns(UserWarning, match="shared_model=False"):
        again = _make()
    assert again.unwrapped.actor is env.unwrapped.actor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = _make(shared_model=False)
    assert fresh.unwrapped.actor is not env.unwrapped.actor
