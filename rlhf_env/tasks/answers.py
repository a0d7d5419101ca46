"""Answer formats: how a completion states its final answer, and how it is read back.

Two formats, each a system prompt that asks for it and an extractor that finds it:

- ``"last_number"``: the last number in the completion (``-12``, ``3.5``, ``1,000``) is the
  answer. The system prompt asks for a short answer ending with the number. For tasks whose
  answers are numbers.
- ``"answer_tag"``: the answer is the text inside the last ``<answer>...</answer>`` tag
  (DeepSeek-R1's and reasoning-gym's own convention). For any task.

A completion without an answer in the format extracts to ``None`` (scored 0 by the task's
verifier). :func:`format_reward` is 1.0 for a completion that states its answer in the format
(one tag, or at least one number) and 0.0 otherwise: an optional shaping reward that teaches
the format itself.
"""

from __future__ import annotations

import re
from typing import Any, Callable

ANSWER_FORMATS: dict[str, str] = {
    "last_number": "Answer with a short sentence that ends with the final number.",
    "answer_tag": "Give the final answer inside <answer></answer> tags, e.g. <answer>42</answer>.",
}

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages,
    whose last ``content`` is the assistant's reply)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (commas between digits and a trailing period dropped), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").lstrip("+")


def extract_answer_tag(text: str) -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` tag, or None."""
    found = _TAG.findall(text)
    return found[-1].strip() if found else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_number": extract_last_number,
    "answer_tag": extract_answer_tag,
}


def check_answer_format(answer_format: str) -> str:
    """``answer_format`` if it is known, else a ValueError listing the formats."""
    if answer_format not in EXTRACTORS:
        raise ValueError(f"unknown answer_format {answer_format!r}: choose one of {', '.join(EXTRACTORS)}")
    return answer_format


def extract_answer(completion: Any, answer_format: str) -> str | None:
    """The answer a completion states in ``answer_format``, or None when it states none."""
    return EXTRACTORS[check_answer_format(answer_format)](completion_text(completion))


def follows_format(completion: Any, answer_format: str) -> bool:
    """Whether the completion states an answer in the format (exactly one tag for
    ``"answer_tag"``; at least one number for ``"last_number"``)."""
    text = completion_text(completion)
    if check_answer_format(answer_format) == "answer_tag":
        return len(_TAG.findall(text)) == 1
    return _NUMBER.search(text) is not None


def format_reward(answer_format: str) -> Callable[..., list[float]]:
    """A TRL-style reward function ``f(prompts, completions, **columns)``: 1.0 for each
    completion that follows ``answer_format``, else 0.0. Named ``format_<answer_format>``."""
    check_answer_format(answer_format)

    def reward(prompts: list, completions: list, **columns: Any) -> list[float]:
        return [1.0 if follows_format(c, answer_format) else 0.0 for c in completions]

    reward.__name__ = f"format_{answer_format}"
    return reward
