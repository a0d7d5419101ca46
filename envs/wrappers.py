"""Adapters of the text environments.

:class:`SB3VecEnv` presents the batched :class:`envs.text_vec_env.TextRLHFVectorEnv` as a
Stable-Baselines3 ``VecEnv``, so SB3's algorithms (and ours) collect rollouts with ONE
batched actor and reference forward per step instead of ``DummyVecEnv``'s N batch-1
forwards. With the LM policy of the ``agents`` package (``agents.policies.lm.LMActorCriticPolicy``)
and the ids that ``import rlhf_env`` registers::

    >>> venv = SB3VecEnv(gym.make_vec("TextRLHF-tiny-v0", num_envs=8, autoreset_mode="SameStep"))
    >>> stable_baselines3.PPO(LMActorCriticPolicy, venv).learn(10_000)

SB3 resets a finished sub-env in the step it ends and puts the final observation in
``info["terminal_observation"]``; the wrapped env must therefore use Gymnasium's
``SAME_STEP`` autoreset (the wrapper builds one when given keyword arguments instead).

The wrapper also does what SB3's ``VecMonitor`` does: the info of a finished response holds
``info["episode"] = {"r": return, "l": tokens, "t": seconds}``, so SB3's table and
TensorBoard show ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` without any other
wrapper (wrapping it in ``VecMonitor`` as well gives the same numbers).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from envs.text_vec_env import TextRLHFVectorEnv


def _row_info(infos: dict[str, Any], row: int) -> dict[str, Any]:
    """Info of sub-env ``row`` from a Gymnasium vector info (masked arrays, nested dicts)."""
    out: dict[str, Any] = {}
    for key, values in infos.items():
        if key.startswith("_") or not infos.get("_" + key, np.zeros(row + 1, bool))[row]:
            continue
        out[key] = _row_info(values, row) if isinstance(values, dict) else values[row]
    return out


class SB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` view of a :class:`TextRLHFVectorEnv` (``SAME_STEP`` autoreset).

    :param venv: a ``TextRLHFVectorEnv`` built with ``autoreset_mode="SameStep"``, or None to
        build one from ``kwargs`` (``env_id`` defaults to ``"TextRLHF-v0"``)
    :param kwargs: ``env_id``, ``num_envs`` and the text env's arguments, when ``venv`` is None
    """

    def __init__(self, venv: TextRLHFVectorEnv | None = None, **kwargs: Any):
        if venv is None:
            env_id = kwargs.pop("env_id", "TextRLHF-v0")
            kwargs.setdefault("autoreset_mode", AutoresetMode.SAME_STEP)
            venv = gym.make_vec(env_id, **kwargs)
        venv = getattr(venv, "unwrapped", venv)
        if not isinstance(venv, TextRLHFVectorEnv):
            raise TypeError(f"SB3VecEnv wraps a TextRLHFVectorEnv, got {type(venv).__name__}")
        if venv.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
            raise ValueError(
                "SB3VecEnv needs the text vector env built with autoreset_mode='SameStep' (SB3 resets finished "
                "sub-envs in the step they end): gym.make_vec(..., autoreset_mode='SameStep')"
            )
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None
        self._seed: int | None = None
        self._ep_returns = np.zeros(self.num_envs)
        self._ep_lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._t_start = time.time()

    # the text env's attributes that agents and users reach for
    @property
    def core(self):
        return self.venv.core

    @property
    def actor(self):
        return self.venv.actor

    @property
    def reference(self):
        return self.venv.reference

    def reset(self):
        obs, infos = self.venv.reset(seed=self._seed)
        self._seed = None
        self.reset_infos = [_row_info(infos, i) for i in range(self.num_envs)]
        self._ep_returns[:] = 0.0
        self._ep_lengths[:] = 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        dones = terminated | truncated
        self._ep_returns += rewards
        self._ep_lengths += 1
        row_infos = []
        for i in range(self.num_envs):
            info = _row_info(infos, i)
            if dones[i]:
                final = info.pop("final_info", {})
                final_obs = info.pop("final_obs")
                reset_info = {k: info[k] for k in ("prompt", "prompt_ids") if k in info}
                info = {**final, "terminal_observation": final_obs, "TimeLimit.truncated": bool(truncated[i] and not terminated[i])}
                # VecMonitor's record of the finished episode (SB3 fills ep_rew_mean / ep_len_mean from it)
                info["episode"] = {"r": float(self._ep_returns[i]), "l": int(self._ep_lengths[i]),
                                   "t": round(time.time() - self._t_start, 6)}
                self._ep_returns[i] = 0.0
                self._ep_lengths[i] = 0
                self.reset_infos[i] = reset_info
            row_infos.append(info)
        return obs, rewards.astype(np.float32), dones, row_infos

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        self._seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        # one batched env: the attribute (e.g. kl_coef) is shared by all sub-envs
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self):
        raise NotImplementedError("the text env renders text: use render_mode='ansi' and venv.render()")
