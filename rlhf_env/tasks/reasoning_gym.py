"""Verifiable tasks from ``reasoning-gym``: rows with a gold answer, and the task's own verifier.

:class:`ReasoningGymTask` wraps one of reasoning-gym's procedural generators (any of its 100+
names, e.g. ``"chain_sum"``, ``"letter_counting"``, ``"basic_arithmetic"``) with:

- a **train split** and a **held-out split** on disjoint generator seeds: train item ``i``
  is generated from seed ``TRAIN_SEED + i``, held-out item ``j`` from ``TEST_SEED + j``, and
  ``TEST_SEED`` lies past every train seed. Small problem spaces repeat questions (chain_sum
  with two one-digit terms has 200), so train rows whose question text is also a held-out
  question are dropped: held-out accuracy measures problems never trained on.
- **rows** in the env's and TRL's dataset format: ``{"prompt": [system, user messages],
  "answer": gold answer, "entry": the reasoning-gym item (question, answer, metadata),
  "task": name}``; the user message is the generator's question, the system message asks
  for the answer format (:mod:`rlhf_env.tasks.answers`).
- **reward functions** in TRL's convention ``f(prompts, completions, **columns)``:
  ``correctness`` extracts the answer in the task's format and scores it with the
  generator's own ``score_answer(answer, entry)`` (in [0, 1]); ``None`` for a row without an
  ``entry``. An optional ``format_<format>`` reward (weight ``format_weight``) pays for
  following the format.

A few **curated tasks** (:data:`CURATED_TASKS`) name settings the shipped SmolLM2-135M-Instruct
starts above zero on and can learn on a CPU; their config is the default that
``task_config`` keys override. Any other reasoning-gym name starts from the generator's own
defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlhf_env.tasks.answers import ANSWER_FORMATS, check_answer_format, extract_answer, format_reward

TRAIN_SEED = 0
TEST_SEED = 2**31


@dataclass(frozen=True)
class TaskSpec:
    """A curated task: a reasoning-gym generator with settings, and how to ask for the answer.

    :param dataset: the reasoning-gym generator name.
    :param config: generator settings (its config dataclass's fields).
    :param answer_format: ``"last_number"`` or ``"answer_tag"``.
    :param max_new_tokens: completion length that fits a right answer with room to spare.
    :param system_prompt: the rows' system message with the task's own ``answer_format``
        (None: the format's instruction; ``""``: none, so the chat template's default applies).
    :param description: one line for ``--help`` and docs.
    """

    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    answer_format: str = "answer_tag"
    max_new_tokens: int = 32
    system_prompt: str | None = None
    description: str = ""


CURATED_TASKS: dict[str, TaskSpec] = {
    "chain_sum": TaskSpec(
        "chain_sum",
        dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
        answer_format="last_number",
        max_new_tokens=24,
        # SmolLM2-135M states the last number as well without the format's instruction (greedy
        # 0.45 vs 0.42 on the held-out split, docs/benchmarks.md), in fewer prompt tokens
        system_prompt="",
        description="a + b or a - b with one-digit numbers (the default task)",
    ),
    "chain_sum_2digit": TaskSpec(
        "chain_sum",
        dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
        answer_format="last_number",
        max_new_tokens=32,
        description="two or three terms of up to two digits, + and -",
    ),
    "letter_counting": TaskSpec(
        "letter_counting",
        dict(min_words=3, max_words=5),
        answer_format="last_number",
        max_new_tokens=32,
        description="how often a letter occurs in 3-5 words",
    ),
}

DEFAULT_TASK = "chain_sum"


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("verifiable tasks need reasoning-gym: pip install reasoning-gym") from err
    return reasoning_gym


def task_names() -> list[str]:
    """Every task name :class:`ReasoningGymTask` accepts: the curated ones, then reasoning-gym's."""
    from reasoning_gym.factory import DATASETS

    _reasoning_gym()
    return list(CURATED_TASKS) + sorted(n for n in DATASETS if n not in CURATED_TASKS)


class Correctness:
    """The correctness reward of a task: the generator's ``score_answer`` of the extracted answer.

    Called as ``f(prompts, completions, entry, **columns)`` (TRL's convention; ``entry`` is the
    rows' reasoning-gym item). Returns one float in [0, 1] per completion, ``None`` for a row
    whose ``entry`` is None (a row of another task in a mixed dataset).
    """

    __name__ = "correctness"

    def __init__(self, dataset: Any, answer_format: str):
        self.dataset = dataset
        self.answer_format = check_answer_format(answer_format)

    def __call__(self, prompts: list, completions: list, entry: list | None = None, **columns: Any) -> list[float | None]:
        if entry is None:
            raise TypeError("the correctness reward needs the rows' 'entry' column (the reasoning-gym item); pass rows made by ReasoningGymTask")
        return [
            None if e is None else float(self.dataset.score_answer(extract_answer(c, self.answer_format), e))
            for c, e in zip(completions, entry)
        ]


class ReasoningGymTask:
    """A reasoning-gym generator as a verifiable task: train and held-out rows, reward functions.

    :param task: a curated name (:data:`CURATED_TASKS`) or any reasoning-gym dataset name.
    :param task_config: generator settings overriding the curated ones (or the generator's
        defaults); an unknown key is a ValueError naming it and listing the valid ones.
    :param answer_format: ``"last_number"`` or ``"answer_tag"`` (default: the curated task's,
        else ``"answer_tag"``).
    :param system_prompt: the system message of every row (default: the curated task's, else
        the format's instruction, :data:`rlhf_env.tasks.answers.ANSWER_FORMATS`); ``""`` for
        none (the chat template's default system message then applies).
    :param train_size: rows in the train split (generated lazily, held-out questions removed).
    :param test_size: rows in the held-out split.
    :param format_weight: weight of the format reward (0: correctness only).
    """

    def __init__(
        self,
        task: str = DEFAULT_TASK,
        task_config: dict[str, Any] | None = None,
        answer_format: str | None = None,
        system_prompt: str | None = None,
        train_size: int = 2000,
        test_size: int = 64,
        format_weight: float = 0.0,
    ):
        rg = _reasoning_gym()
        from reasoning_gym.factory import DATASETS

        if not isinstance(task, str) or (task not in CURATED_TASKS and task not in DATASETS):
            raise ValueError(
                f"unknown task {task!r}: curated tasks are {', '.join(CURATED_TASKS)}; any reasoning-gym "
                f"dataset name also works ({len(DATASETS)} of them, e.g. {', '.join(sorted(DATASETS)[:6])}, ...)"
            )
        if train_size < 1 or test_size < 1:
            raise ValueError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
        if TRAIN_SEED + train_size > TEST_SEED:
            raise ValueError(f"train_size must be at most {TEST_SEED - TRAIN_SEED} (train seeds stay below the held-out ones)")
        spec = CURATED_TASKS.get(task) or TaskSpec(task)
        config_cls = DATASETS[spec.dataset][1]
        fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
        task_config = dict(task_config or {})
        for key in task_config:
            if key not in fields:
                raise ValueError(f"unknown task_config key {key!r} for reasoning-gym task {spec.dataset!r}: valid keys are {', '.join(fields)}")
        self.name = task
        self.dataset_name = spec.dataset
        self.config = {**spec.config, **task_config}
        self.answer_format = check_answer_format(answer_format or spec.answer_format)
        if system_prompt is None:
            own = spec.system_prompt is not None and self.answer_format == spec.answer_format
            system_prompt = spec.system_prompt if own else ANSWER_FORMATS[self.answer_format]
        self.system_prompt = system_prompt
        self.max_new_tokens = spec.max_new_tokens
        self.train_size = int(train_size)
        self.test_size = int(test_size)
        self.format_weight = float(format_weight)
        try:
            self._train = rg.create_dataset(spec.dataset, seed=TRAIN_SEED, size=self.train_size, **self.config)
            self._test = rg.create_dataset(spec.dataset, seed=TEST_SEED, size=self.test_size, **self.config)
        except (AssertionError, TypeError, ValueError) as err:
            raise ValueError(f"reasoning-gym rejected the settings {self.config} of task {spec.dataset!r}: {err}") from err
        self._rows: dict[str, list[dict]] = {}

    def __repr__(self) -> str:
        return f"ReasoningGymTask({self.name!r}, config={self.config}, answer_format={self.answer_format!r})"

    def _row(self, entry: dict) -> dict[str, Any]:
        messages = [{"role": "user", "content": entry["question"]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {"prompt": messages, "answer": str(entry["answer"]), "entry": entry, "task": self.name}

    def rows(self, split: str = "train") -> list[dict[str, Any]]:
        """The rows of ``"train"`` or ``"test"`` (the held-out split), built once and cached.

        Train rows whose question is also a held-out question are left out.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._rows:
            test = [self._row(self._test[j]) for j in range(self.test_size)]
            held_out = {r["entry"]["question"] for r in test}
            train = [self._row(e) for e in (self._train[i] for i in range(self.train_size)) if e["question"] not in held_out]
            if not train:
                raise ValueError(f"task {self.name!r}: every train question is also a held-out question; use a larger problem space or a smaller test_size")
            self._rows = {"train": train, "test": test}
        return self._rows[split]

    @property
    def reward_funcs(self) -> list:
        """``[correctness]``, plus the format reward when ``format_weight`` is not 0."""
        funcs: list = [Correctness(self._train, self.answer_format)]
        if self.format_weight:
            funcs.append(format_reward(self.answer_format))
        return funcs

    @property
    def reward_weights(self) -> list[float]:
        """Weights matching :attr:`reward_funcs`."""
        return [1.0, self.format_weight] if self.format_weight else [1.0]

    def score(self, completions: list, rows: list[dict]) -> list[float]:
        """Correctness in [0, 1] of each completion against its row."""
        return Correctness(self._train, self.answer_format)(None, completions, entry=[r["entry"] for r in rows])

    def prompt_reward(self, split: str = "train"):
        """Correctness as a ``(prompts, responses) -> scores`` callable, the reward-model
        interface, for what scores answers by their prompt alone (best-of-n, expert
        iteration): a prompt is its row's question text (a row's last user message).

        :raises ValueError: when called with a prompt that is not a question of ``split``
        """
        by_question = {r["entry"]["question"]: r for r in self.rows(split)}

        def correctness(prompts: list, responses: list) -> list[float]:
            missing = next((p for p in prompts if p not in by_question), None)
            if missing is not None:
                raise ValueError(f"{str(missing)[:80]!r} is not a question of task {self.name!r}'s {split} split")
            return self.score(list(responses), [by_question[p] for p in prompts])

        return correctness


def make_task(task: "str | ReasoningGymTask" = DEFAULT_TASK, task_config: dict | None = None, **kwargs: Any) -> ReasoningGymTask:
    """A :class:`ReasoningGymTask` from a name (a task object passes through unchanged)."""
    if isinstance(task, ReasoningGymTask):
        if task_config or kwargs:
            raise ValueError("pass task_config and other task settings when building the task, not with a task object")
        return task
    return ReasoningGymTask(task, task_config, **kwargs)
