"""Tasks with verifiable rewards: rows with gold answers, the task's verifier, evaluation.

- :class:`ReasoningGymTask` / :func:`make_task`: any reasoning-gym generator as train and
  held-out rows plus TRL-style reward functions (:mod:`rlhf_env.tasks.reasoning_gym`).
- :mod:`rlhf_env.tasks.answers`: answer formats, extractors and the format reward.
- :func:`evaluate_task`: held-out accuracy, greedy and sampled (:mod:`rlhf_env.tasks.evaluation`).
"""

from rlhf_env.tasks.answers import ANSWER_FORMATS, extract_answer, follows_format, format_reward
from rlhf_env.tasks.evaluation import accuracy_line, evaluate_task
from rlhf_env.tasks.reasoning_gym import CURATED_TASKS, DEFAULT_TASK, ReasoningGymTask, TaskSpec, make_task, task_names

__all__ = [
    "ANSWER_FORMATS",
    "CURATED_TASKS",
    "DEFAULT_TASK",
    "ReasoningGymTask",
    "TaskSpec",
    "accuracy_line",
    "evaluate_task",
    "extract_answer",
    "follows_format",
    "format_reward",
    "make_task",
    "task_names",
]
