"""``ReasoningGym-v0``: a text env whose rows are a verifiable task's train split.

``gym.make_vec("ReasoningGym-v0", num_envs=N, task="chain_sum", task_config={...})`` (or
``gym.make``) builds the text env of :mod:`rlhf_env.registration` with ``dataset=`` the
task's train rows, ``reward_funcs=`` its correctness (and format) rewards and
``max_new_tokens`` the task's; every other keyword (``model``, ``device``, ``kl_coef``, ...)
goes to the text env unchanged. ``task`` may also be a :class:`ReasoningGymTask` object.
"""

from __future__ import annotations

from typing import Any

TASK_ENV_ID = "ReasoningGym-v0"


def task_env_kwargs(task: Any = "chain_sum", task_config: dict | None = None, answer_format: str | None = None,
                    format_weight: float = 0.0, split: str = "train", **kwargs: Any) -> dict[str, Any]:
    """The text env's keyword arguments for a task (see the module docstring)."""
    from rlhf_env.tasks.reasoning_gym import ReasoningGymTask, make_task

    if isinstance(task, ReasoningGymTask):
        if task_config or answer_format or format_weight:
            raise ValueError("task_config, answer_format and format_weight go into the task when it is an object; "
                             "pass task='name' to have the env build it")
    else:
        task = make_task(task, task_config, answer_format=answer_format, format_weight=format_weight)
    for key in ("dataset", "prompts", "reward_funcs", "reward_weights"):
        if key in kwargs:
            raise ValueError(f"ReasoningGym-v0 takes its {key} from the task; use TextRLHF-v0 with {key}= for your own rows")
    kwargs.setdefault("max_new_tokens", task.max_new_tokens)
    kwargs.setdefault("reward_model", None)
    return dict(dataset=task.rows(split), reward_funcs=task.reward_funcs, reward_weights=task.reward_weights, **kwargs)


def make_task_env(**kwargs: Any):
    """Entry point of ``gym.make("ReasoningGym-v0", task=..., ...)``."""
    from rlhf_env.registration import make_text_env

    return make_text_env(**task_env_kwargs(**kwargs))


def make_task_vec_env(num_envs: int = 1, **kwargs: Any):
    """Vector entry point of ``gym.make_vec("ReasoningGym-v0", num_envs=N, task=..., ...)``."""
    from rlhf_env.registration import make_text_vec_env

    return make_text_vec_env(num_envs=num_envs, **task_env_kwargs(**kwargs))
