"""Schedules: functions of the remaining progress (1 at the start of ``learn``, 0 at the end)."""

from __future__ import annotations

from typing import Callable

Schedule = Callable[[float], float]


class ConstantSchedule:
    """``value`` whatever the progress."""

    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, progress_remaining: float) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"ConstantSchedule({self.value})"


class LinearSchedule:
    """Linear from ``initial`` (progress 1) to ``final`` (progress 0), as rl-zoo3's ``lin_X``."""

    def __init__(self, initial: float, final: float = 0.0):
        self.initial, self.final = float(initial), float(final)

    def __call__(self, progress_remaining: float) -> float:
        return self.final + progress_remaining * (self.initial - self.final)

    def __repr__(self) -> str:
        return f"LinearSchedule({self.initial}, {self.final})"


def linear_schedule(initial: float, final: float = 0.0) -> LinearSchedule:
    """:param initial: value at the start; :param final: value at the end."""
    return LinearSchedule(initial, final)


def get_schedule_fn(value: float | str | Schedule) -> Schedule:
    """A schedule from a number, a callable, or rl-zoo3's ``"lin_0.001"`` string."""
    if isinstance(value, str):
        if value.startswith("lin_"):
            return LinearSchedule(float(value[4:]))
        try:
            return ConstantSchedule(float(value))
        except ValueError:
            raise ValueError(f"cannot read schedule {value!r}: use a number, 'lin_<number>' or a callable") from None
    if isinstance(value, (int, float)):
        return ConstantSchedule(value)
    if callable(value):
        return value
    raise ValueError(f"cannot read schedule {value!r}: use a number, 'lin_<number>' or a callable")
