"""Task rows: the prompts of a text env, each with the columns its reward functions read.

A row is a dict with a ``"prompt"`` (a string, or a list of chat messages, see
:mod:`envs.prompt`) and any other columns (``"answer"``, ``"tests"``, ``"difficulty"``, ...).
The env keeps the rows in order and every sub-env remembers the index of the row it is
answering, so a reward sees the columns of that very row (never looked up by prompt text:
two rows with the same prompt and different answers stay apart).

:func:`as_rows` accepts a list (or any sequence) of dicts, or a Hugging Face
``datasets.Dataset`` (duck-typed: anything with ``column_names`` whose items are dicts).
Reading JSON Lines files and resolving dataset names is the job of the package that builds
the env (``rlhf_env``); the env takes rows.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from envs.prompt import check_messages

# names a reward function receives besides the columns (TRL's call)
RESERVED = ("prompts", "completions", "completion_ids")


def check_row(row: Any, where: str) -> None:
    """Raise a ``ValueError`` that names ``where`` unless ``row`` is a dict with a ``"prompt"``."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} is a {type(row).__name__}, not a dict with a \"prompt\" key: {str(row)[:80]!r}")
    if "prompt" not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise ValueError(f"{where} has no \"prompt\" key (its keys: {keys}); every row needs a \"prompt\"")


def as_rows(dataset: Any, where: str = "dataset") -> list[dict[str, Any]]:
    """The rows of ``dataset`` as a list of dicts, each checked to hold a usable ``"prompt"``.

    :param dataset: a sequence of dicts, or a ``datasets.Dataset`` (or anything with
        ``column_names`` that iterates over dicts)
    :param where: how errors name the dataset
    :raises ValueError: for an empty dataset, a row that is not a dict, a row without
        ``"prompt"``, a prompt that is neither a non-empty string nor a list of chat
        messages, or a column named like an argument of the reward call
    """
    if isinstance(dataset, (str, bytes)) or isinstance(dataset, Mapping):
        raise TypeError(
            f"{where} must be a list of dicts (rows with a \"prompt\" key) or a datasets.Dataset, got "
            f"{type(dataset).__name__}; a JSON Lines file is read by rlhf_env (gym.make(..., dataset=path))"
        )
    try:
        rows = list(dataset)
    except TypeError:
        raise TypeError(
            f"{where} must be a list of dicts (rows with a \"prompt\" key) or a datasets.Dataset, got {type(dataset).__name__}"
        ) from None
    if not rows:
        raise ValueError(f"{where} is empty: give at least one row with a \"prompt\"")
    out = []
    for i, row in enumerate(rows):
        check_row(row, f"{where}[{i}]")
        check_messages(row["prompt"], f'{where}[{i}]["prompt"]')
        clash = [k for k in row if k in RESERVED]
        if clash:
            raise ValueError(
                f"{where}[{i}] has a column named {clash[0]!r}, which is an argument of the reward call "
                f"f(prompts, completions, completion_ids, **columns): rename the column"
            )
        row = dict(row)
        if not isinstance(row["prompt"], str):
            row["prompt"] = [dict(m) for m in row["prompt"]]
        out.append(row)
    return out


def prompt_rows(prompts: Any) -> list[dict[str, Any]]:
    """Rows of a plain prompt list (``prompts=``, the short form of ``dataset=``): a non-empty
    sequence of strings (files and the shipped set are read by ``rlhf_env``'s registration,
    which passes the list)."""
    if prompts is None or isinstance(prompts, (str, bytes, os.PathLike)):
        raise TypeError(
            f"prompts must be a list of strings, got {type(prompts).__name__} {prompts!r}: to read a file or "
            "the shipped set, make the env by id (import rlhf_env; gym.make('TextRLHF-v0', prompts=PATH))"
        )
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings (rows with chat messages or columns go in dataset=)")
    if len(prompts) == 0:
        raise ValueError("the prompt list is empty: pass prompts=[...] with at least one prompt (or a non-empty file)")
    return [{"prompt": p} for p in prompts]


def column_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every column other than ``"prompt"`` that any row has, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key != "prompt":
                names.setdefault(key, None)
    return list(names)


def columns_of(rows: Sequence[Mapping[str, Any] | None], names: Sequence[str]) -> dict[str, list[Any]]:
    """The columns ``names`` of ``rows`` as lists in row order (TRL's reward kwargs); a row
    without a column (or ``None``: a prompt given by text at reset) contributes ``None``."""
    return {name: [None if row is None else row.get(name) for row in rows] for name in names}
