"""Prompt sets: the shipped default task prompts, a Python list, or a text / JSON Lines file."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence, Union

from rlhf_env.data import iter_jsonl
from rlhf_env.envs.rows import check_row

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
SPLITS = ("train", "test")


def default_prompts_path(split: str = "train") -> pathlib.Path:
    """Path of the shipped prompt file of the default task for ``split`` (``"train"``/``"test"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}: use one of {', '.join(SPLITS)}")
    return ASSETS / f"prompts_{split}.txt"


def _read_txt(path: pathlib.Path) -> list[str]:
    # one prompt per line; surrounding whitespace is not part of a prompt
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_jsonl(path: pathlib.Path) -> list[str]:
    prompts = []
    for where, record in iter_jsonl(path):
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f'{where}: expected an object with a "prompt" key, got {json.dumps(record)[:80]}')
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise ValueError(f'{where}: "prompt" must be a non-empty string, got {record["prompt"]!r}')
        prompts.append(record["prompt"])
    return prompts


def load_prompts(source: Union[None, str, os.PathLike, Sequence[str]] = None, split: str = "train") -> list[str]:
    """Load a list of prompts.

    :param source: ``None`` for the shipped prompts of the default task
        (``rlhf_env/assets/prompts_{split}.txt``); a list or tuple of strings; or the path of
        a ``.txt`` file (one prompt per line, blank lines skipped) or a ``.jsonl`` file (one
        JSON object per line with a ``"prompt"`` key; other keys, such as ``"chosen"``, are
        ignored, so a preference file works too).
    :param split: ``"train"`` or ``"test"``; used only when ``source`` is ``None``.
    :return: the prompts, a non-empty list of strings.
    :raises ValueError: for an empty set, an empty or non-string prompt, a missing file, an
        unknown file type, or a malformed JSON Lines line (naming the file and line).
    """
    if source is None:
        path = default_prompts_path(split)
        if not path.is_file():
            raise ValueError(f"the shipped prompt file {path} is missing; reinstall rlhf-env")
        prompts = _read_txt(path)
        where = str(path)
    elif isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise ValueError(_not_a_file(source, "prompt file", "a .txt file (one prompt per line), a .jsonl file "
                                         "(objects with a \"prompt\" key) or a list of strings"))
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            prompts = _read_jsonl(path)
        elif suffix in (".txt", ""):
            prompts = _read_txt(path)
        else:
            raise ValueError(f"prompt file {path}: unknown type {suffix!r}; use .txt (one prompt per line) or .jsonl")
        where = str(path)
    elif isinstance(source, (list, tuple)):
        for i, prompt in enumerate(source):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not a string: {prompt!r}")
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs some text")
        prompts = list(source)
        where = "the prompt list"
    else:
        raise ValueError(
            f"prompts must be None (the shipped set), a list of strings or a file path, got {type(source).__name__}"
        )
    if not prompts:
        raise ValueError(f"{where} holds no prompts: give at least one non-empty prompt")
    return prompts


def _not_a_file(source: Union[str, os.PathLike], what: str, expected: str) -> str:
    """The message for a path that is not a file; a string that does not look like a path
    (no folder, no file suffix: ``"What is 2+2?"``) is taken for a prompt meant as a list."""
    text = os.fspath(source)
    looks_like_path = os.sep in text or "/" in text or pathlib.Path(text).suffix.lower() in (".txt", ".jsonl", ".json")
    if isinstance(source, str) and not looks_like_path:
        return (f"{text!r} is a string that is not a file: a string is read as a file path; to use it as the prompt "
                f"pass a list, [{text!r}]; or pass {expected}")
    return f"{what} {text!r} does not exist; pass {expected}"


def load_rows(source: Any) -> Any:
    """Task rows (``dataset=`` of the text envs): a JSON Lines file becomes a list of dicts,
    every key of each line kept as a column; a list of dicts or a ``datasets.Dataset`` is
    returned as it is (the env checks the rows).

    :param source: a ``.jsonl`` path, a list of dicts or a ``datasets.Dataset``
    :raises ValueError: for a missing file, a file of another type, or a line that is not a
        JSON object (naming the file and line)
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise ValueError(_not_a_file(source, "dataset file", 'a .jsonl file (one JSON object per line with a "prompt" '
                                     "key and any other columns), a list of dicts or a datasets.Dataset"))
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"dataset file {path}: unknown type {path.suffix!r}; use .jsonl (one JSON object per line with a "
                         f"\"prompt\"); a list of prompts, one per line, goes in prompts= instead (rlhf-env train: "
                         f"--prompts {os.fspath(source)})")
    rows = []
    for where, record in iter_jsonl(path):
        check_row(record, f"{where}: the row")
        rows.append(record)
    if not rows:
        raise ValueError(f"dataset file {path} holds no rows: give at least one line with a \"prompt\"")
    return rows
