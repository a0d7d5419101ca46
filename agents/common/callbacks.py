"""``stable_baselines3.common.callbacks`` path: see :mod:`agents.callbacks`."""

from agents.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    EventCallback,
    ProgressBarCallback,
    StopTrainingOnRewardThreshold,
)

__all__ = [
    "BaseCallback",
    "CallbackList",
    "CheckpointCallback",
    "EvalCallback",
    "EventCallback",
    "ProgressBarCallback",
    "StopTrainingOnRewardThreshold",
]
