"""``stable_baselines3.common.evaluation`` path: see :mod:`agents.evaluation`."""

from agents.evaluation import evaluate_policy

__all__ = ["evaluate_policy"]
