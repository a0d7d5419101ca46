"""KL-coefficient controllers for RLHF (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", section 2.2).

The per-token reward of the text environment is
``r_t = -kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) + [t == T] * score``.
A fixed ``kl_coef`` is hard to choose: too small and the policy drifts into reward
hacking, too large and it never moves. The adaptive controller of Ziegler et al.
steers the measured KL per response towards a target::

    error   = clip(KL / target - 1, -0.2, 0.2)
    kl_coef = kl_coef * (1 + error * n_steps / horizon)

so the coefficient rises when the policy is further from the reference than the
target and falls when it is closer; ``horizon`` (in environment steps, i.e. tokens)
sets how fast. The agents call :meth:`update` once per rollout and then write
:attr:`value` into the environment with :func:`set_env_kl_coef`.
"""

from __future__ import annotations

from typing import Any


class FixedKLController:
    """A constant KL coefficient (``update`` leaves it unchanged).

    :param kl_coef: the coefficient.
    """

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return the (unchanged) coefficient.

        :param current_kl: the measured KL per response of the last rollout (ignored).
        :param n_steps: environment steps of the last rollout (ignored).
        """
        return self.value

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value:g})"


class AdaptiveKLController:
    """Proportional controller of the KL coefficient towards a target KL.

    :param init_kl_coef: starting coefficient.
    :param target: target KL per response (sum over its tokens, in nats).
    :param horizon: number of environment steps (tokens) over which an error of 20 %
        changes the coefficient by 20 %; Ziegler et al. use 10,000.
    :param min_coef: lower bound, so the coefficient can recover after a long stretch
        below target (a coefficient that reaches 0 can never grow again).
    :param hold_until_target: leave the coefficient where it is (never lower it) until the
        measured KL first reaches the target. A policy that starts as the reference has KL 0
        for its first rollouts by construction; lowering the coefficient then (by up to the
        full 20 % error every rollout) only lets the KL overshoot the target once the policy
        moves. Increases always apply. False: Ziegler et al.'s controller from the first update.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        horizon: int = 10_000,
        min_coef: float = 1e-4,
        hold_until_target: bool = True,
    ) -> None:
        if init_kl_coef <= 0:
            raise ValueError(
                f"init_kl_coef must be > 0 for an adaptive controller, got {init_kl_coef} "
                "(use FixedKLController(0.0) to switch the KL penalty off)"
            )
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.min_coef = float(min_coef)
        self.hold_until_target = bool(hold_until_target)
        self.reached_target = False

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards the value that yields the target KL.

        :param current_kl: mean KL per response measured in the last rollout.
        :param n_steps: environment steps (tokens) in that rollout.
        :return: the new coefficient.
        """
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.reached_target = self.reached_target or current_kl >= self.target
        if self.hold_until_target and not self.reached_target:
            proportional_error = max(proportional_error, 0.0)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value = max(self.value * mult, self.min_coef)
        return self.value

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(kl_coef={self.value:g}, target={self.target:g}, "
            f"horizon={self.horizon})"
        )


def make_kl_controller(
    kl_coef: float, target_kl: float | None = None, horizon: int = 10_000
) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller when ``target_kl`` is given (and ``kl_coef > 0``), else a
    fixed one.

    :param kl_coef: (initial) coefficient.
    :param target_kl: target KL per response, or None for a fixed coefficient.
    :param horizon: controller horizon in environment steps.
    """
    if target_kl is None or kl_coef == 0:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)


def _unadapt(env: Any) -> Any:
    """The vector env inside an algorithm's :class:`agents.vec_env.VecEnvAdapter`."""
    from agents.vec_env import VecEnvAdapter

    return env.env if isinstance(env, VecEnvAdapter) else env


def set_env_kl_coef(env: Any, kl_coef: float) -> None:
    """Write ``kl_coef`` into a text environment, however it is wrapped.

    Handles a Gymnasium env (``env.unwrapped.kl_coef``), a Gymnasium ``VectorEnv``
    (its own attribute when it is the batched text env, else ``set_attr``), an SB3
    ``VecEnv`` (``set_attr``) and the algorithms' ``VecEnvAdapter`` around any of them.

    :param env: the environment.
    :param kl_coef: the new coefficient.
    """
    env = _unadapt(env)
    target = getattr(env, "unwrapped", env)
    if hasattr(target, "kl_coef"):  # a single env, or the batched text env (one for all)
        target.kl_coef = float(kl_coef)
        return
    if hasattr(env, "set_attr"):  # a vector of single envs
        env.set_attr("kl_coef", float(kl_coef))
        return
    raise AttributeError(
        f"cannot set kl_coef on {type(env).__name__}: it has no 'kl_coef' attribute and "
        "no set_attr(); pass a TextRLHF environment (gym.make('TextRLHF-v0') or make_vec)"
    )


def get_env_kl_coef(env: Any) -> float | None:
    """Read the current ``kl_coef`` of a text environment (None if it has none).

    :param env: the environment (Gymnasium env, VectorEnv or SB3 VecEnv).
    """
    env = _unadapt(env)
    target = getattr(env, "unwrapped", env)
    if hasattr(target, "kl_coef"):
        return float(target.kl_coef)
    if hasattr(env, "get_attr"):
        try:
            return float(env.get_attr("kl_coef")[0])
        except (AttributeError, IndexError, TypeError):
            return None
    return None
