"""Making and adapting vector environments.

Algorithms talk to one interface, :class:`VecEnvAdapter`, whatever the user passed:
an env id (made with the env's native vector entry point when it has one, like
CartPole's, else ``SyncVectorEnv``/``AsyncVectorEnv``), a ``gymnasium.Env`` (wrapped), a
``gymnasium.vector.VectorEnv`` (used as is, honouring its autoreset mode) or an SB3
``VecEnv`` (adapted; stable_baselines3 is optional).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv


@dataclass
class StepResult:
    """One vector step.

    ``obs`` is what the next action is taken from. ``valid[i]`` is False when env i only
    reset in this step (NEXT_STEP autoreset): that row is no transition. ``final_obs``
    holds, for SAME_STEP-style envs, the last observation of envs whose episode ended
    (rows where ``terminated | truncated``); it is None for NEXT_STEP envs, whose ``obs``
    already is that final observation.
    """

    obs: Any
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    valid: np.ndarray
    final_obs: Any
    infos: Any


def make_vec_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    vectorization_mode: str | None = None,
    wrapper_class: Callable[[gym.Env], gym.Env] | None = None,
) -> VectorEnv:
    """A Gymnasium vector env of ``n_envs`` copies of ``env_id``.

    :param env_id: registered id, e.g. ``"CartPole-v1"``
    :param n_envs: number of sub-environments
    :param seed: accepted for SB3 compatibility; seeding happens on the first ``reset``
    :param env_kwargs: keyword arguments for the env constructor
    :param vectorization_mode: ``"vector_entry_point"``, ``"sync"`` or ``"async"``; default:
        the env's own vector entry point if registered (for classic control from 4 envs
        up), else ``"sync"``
    :param wrapper_class: a wrapper applied to each sub-env (forces sync/async mode)
    """
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as exc:
        hint = ""
        if "did you mean" not in str(exc).lower():  # gymnasium hints only at a known name with another version
            import difflib

            close = difflib.get_close_matches(str(env_id), list(gym.registry), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown environment id {env_id!r}: {exc}{hint}") from exc
    env_kwargs = dict(env_kwargs or {})
    if vectorization_mode is None:
        # a native vector env works on arrays: it wins from a few envs up, while one env
        # steps faster as a plain Env (CartPole: ~120 us vs ~10 us a step)
        native = spec.vector_entry_point and wrapper_class is None and (n_envs >= 4 or not _is_classic(spec))
        vectorization_mode = "vector_entry_point" if native else "sync"
    if vectorization_mode == "vector_entry_point":
        return gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **env_kwargs)
    # SAME_STEP: the reset observation comes in the same step, as in SB3's VecEnvs, so
    # every row of the rollout is a real transition
    vector_kwargs = {"autoreset_mode": AutoresetMode.SAME_STEP}
    wrappers = [wrapper_class] if wrapper_class is not None else None
    return gym.make_vec(
        env_id,
        num_envs=n_envs,
        vectorization_mode=vectorization_mode,
        vector_kwargs=vector_kwargs,
        wrappers=wrappers,
        **env_kwargs,
    )


def _is_classic(spec: Any) -> bool:
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    return entry.startswith("gymnasium.envs.classic_control")


def _is_sb3_vec_env(env: Any) -> bool:
    try:
        from stable_baselines3.common.vec_env import VecEnv
    except ImportError:
        return False
    return isinstance(env, VecEnv)


class VecEnvAdapter:
    """Uniform view of a vector env for the algorithms.

    :param env: a Gymnasium ``VectorEnv`` or an SB3 ``VecEnv``
    """

    def __init__(self, env: Any):
        self.env = env
        self.is_sb3 = _is_sb3_vec_env(env)
        if self.is_sb3:
            self.num_envs = env.num_envs
            self.observation_space = env.observation_space
            self.action_space = env.action_space
            self.autoreset_mode = AutoresetMode.SAME_STEP
        elif isinstance(env, VectorEnv):
            self.num_envs = env.num_envs
            self.observation_space = env.single_observation_space
            self.action_space = env.single_action_space
            self.autoreset_mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
            if isinstance(self.autoreset_mode, str):
                self.autoreset_mode = AutoresetMode(self.autoreset_mode)
            if self.autoreset_mode == AutoresetMode.DISABLED:
                raise ValueError(
                    "vector env with autoreset_mode DISABLED is not supported: "
                    "make it with autoreset_mode NEXT_STEP or SAME_STEP."
                )
        else:
            raise ValueError(f"expected a gymnasium VectorEnv or SB3 VecEnv, got {type(env).__name__}")
        self._prev_done = np.zeros(self.num_envs, dtype=bool)
        self._seed: int | None = None
        self._discrete_start = int(self.action_space.start) if isinstance(self.action_space, spaces.Discrete) else 0

    @property
    def next_step_autoreset(self) -> bool:
        return self.autoreset_mode == AutoresetMode.NEXT_STEP

    def seed(self, seed: int | None) -> None:
        """Seed for the next ``reset``."""
        self._seed = seed

    def reset(self) -> Any:
        seed, self._seed = self._seed, None
        self._prev_done[:] = False
        if self.is_sb3:
            if seed is not None:
                self.env.seed(seed)
            return self.env.reset()
        obs, _ = self.env.reset(seed=seed)
        return obs

    def step(self, actions: np.ndarray) -> StepResult:
        if self._discrete_start:
            actions = actions + self._discrete_start
        if self.is_sb3:
            return self._step_sb3(actions)
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        if self.next_step_autoreset:
            valid = ~self._prev_done
            self._prev_done = terminated | truncated
            return StepResult(obs, np.asarray(rewards, dtype=np.float32), terminated, truncated, valid, None, infos)
        final_obs = None
        done = terminated | truncated
        if done.any() and "final_obs" in infos:
            final_obs = _stack_final_obs(infos["final_obs"], done, obs)
        valid = np.ones(self.num_envs, dtype=bool)
        return StepResult(obs, np.asarray(rewards, dtype=np.float32), terminated, truncated, valid, final_obs, infos)

    def _step_sb3(self, actions: np.ndarray) -> StepResult:
        obs, rewards, dones, infos = self.env.step(actions)
        dones = np.asarray(dones, dtype=bool)
        truncated = np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos]) & dones
        terminated = dones & ~truncated
        final_obs = None
        if dones.any():
            final = np.empty(self.num_envs, dtype=object)
            for i in np.nonzero(dones)[0]:
                final[i] = infos[i].get("terminal_observation")
            final_obs = _stack_final_obs(final, dones, obs)
        valid = np.ones(self.num_envs, dtype=bool)
        return StepResult(obs, np.asarray(rewards, dtype=np.float32), terminated, truncated, valid, final_obs, infos)

    def close(self) -> None:
        self.env.close()


def _stack_final_obs(final: np.ndarray, done: np.ndarray, obs: Any) -> Any:
    """Per-env final observations (object array) -> an array shaped like ``obs``, with the
    final observation where ``done`` and the current one elsewhere."""
    if isinstance(obs, dict):
        out = {k: np.array(v, copy=True) for k, v in obs.items()}
        for i in np.nonzero(done)[0]:
            if final[i] is not None:
                for k in out:
                    out[k][i] = final[i][k]
        return out
    out = np.array(obs, copy=True)
    for i in np.nonzero(done)[0]:
        if final[i] is not None:
            out[i] = final[i]
    return out


def wrap_env(env: Any, n_envs: int = 1, env_kwargs: dict[str, Any] | None = None) -> VecEnvAdapter:
    """Turn anything an algorithm accepts as ``env`` into a :class:`VecEnvAdapter`.

    :param env: env id, ``gymnasium.Env``, ``gymnasium.vector.VectorEnv``, SB3 ``VecEnv``
        or an adapter
    :param n_envs: number of copies when ``env`` is an id
    :param env_kwargs: constructor arguments when ``env`` is an id
    """
    if isinstance(env, VecEnvAdapter):
        return env
    if isinstance(env, SB3VecEnvView):  # what model.get_env() returned
        return env._adapter
    if isinstance(env, str):
        return VecEnvAdapter(make_vec_env(env, n_envs=n_envs, env_kwargs=env_kwargs))
    if isinstance(env, VectorEnv) or _is_sb3_vec_env(env):
        return VecEnvAdapter(env)
    if isinstance(env, gym.Env):
        vec = gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=AutoresetMode.SAME_STEP)
        return VecEnvAdapter(vec)
    raise ValueError(
        f"env must be an environment id, a gymnasium.Env, a gymnasium.vector.VectorEnv or an SB3 VecEnv; "
        f"got {type(env).__name__}"
    )


class SB3VecEnvView:
    """SB3's ``VecEnv`` API over a :class:`VecEnvAdapter`, what ``model.get_env()`` returns,
    so SB3 scripts such as ``obs = env.reset(); obs, rewards, dones, infos = env.step(a)``
    run unchanged: ``reset`` returns only the observation, a finished episode is reported
    with ``infos[i]["terminal_observation"]`` and ``"TimeLimit.truncated"``.

    With a NEXT_STEP vector env (e.g. CartPole's native one) the observation returned
    at a done is the final one; the sub-env resets on the following ``step``, which
    reports the first observation of the new episode with reward 0. Anything else is
    passed to the underlying env (``.unwrapped`` is that env).
    """

    def __init__(self, adapter: VecEnvAdapter):
        self._adapter = adapter
        self.num_envs = adapter.num_envs
        self.observation_space = adapter.observation_space
        self.action_space = adapter.action_space

    @property
    def unwrapped(self) -> Any:
        return self._adapter.env

    def reset(self) -> Any:
        return self._adapter.reset()

    def seed(self, seed: int | None = None) -> None:
        self._adapter.seed(seed)

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        step = self._adapter.step(np.asarray(actions))
        dones = (step.terminated | step.truncated) & step.valid
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in np.nonzero(dones)[0]:
            if step.final_obs is not None:
                final = {k: v[i] for k, v in step.final_obs.items()} if isinstance(step.final_obs, dict) else step.final_obs[i]
            else:
                final = {k: v[i] for k, v in step.obs.items()} if isinstance(step.obs, dict) else step.obs[i]
            infos[i]["terminal_observation"] = final
            infos[i]["TimeLimit.truncated"] = bool(step.truncated[i] and not step.terminated[i])
        return step.obs, step.rewards, dones, infos

    def close(self) -> None:
        self._adapter.close()

    def render(self, *args: Any, **kwargs: Any) -> Any:
        return self._adapter.env.render(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter.env, name)
