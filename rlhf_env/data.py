"""Preference data: ``{"prompt", "chosen", "rejected"}`` records, in TRL's formats.

Accepted, one JSON object a line (or rows of a Hugging Face ``datasets.Dataset``, or dicts):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}`` (other keys are ignored);
* conversational (TRL): ``{"prompt": [messages], "chosen": [assistant message],
  "rejected": [assistant message]}``, messages being ``{"role", "content"}`` dicts;
* implicit prompt (TRL): no ``"prompt"``; ``chosen`` and ``rejected`` are whole
  conversations ending in the assistant's reply (the prompt is the messages they share),
  or whole texts (the prompt is their common beginning, as TRL's ``extract_prompt``).

A prompt that is one user message becomes its text (the env renders a string prompt as one
user message, so both tokenize the same); any other message list (a system message,
several turns) stays a tuple of messages, which ``encode_prompt`` renders with the chat
template. Blank lines are skipped. Any other problem (a line that is not JSON, not an
object, a missing or mistyped field, an empty file) is a ``ValueError`` that names the file
and the line, so a broken data set is fixed at its source.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union
from rlhf_env.agents.atomic import write_text

PathLike = Union[str, "os.PathLike[str]"]

FIELDS = ("prompt", "chosen", "rejected")


class ChatMessage(dict):
    """A ``{"role", "content"}`` message that can be hashed, so a prompt made of messages can
    key a dict (trainers group pairs by prompt) like a string prompt."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


Prompt = Union[str, "tuple[ChatMessage, ...]"]


@dataclass(frozen=True)
class PreferencePair:
    """One preference judgement: for ``prompt``, ``chosen`` is better than ``rejected``.

    :param prompt: the user's prompt (plain text, before any chat template), or a tuple of
        chat messages (a system message, several turns)
    :param chosen: the preferred response
    :param rejected: the dispreferred response
    """

    prompt: Prompt
    chosen: str
    rejected: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_preferences(path: Union[PathLike, Iterable]) -> list[PreferencePair]:
    """Read preference pairs from a JSON Lines file (or a ``datasets.Dataset``) in any of the
    formats of the module docstring.

    :param path: a ``.jsonl`` file with one object a line, or a Hugging Face ``Dataset``
    :return: the pairs, in file order
    :raises FileNotFoundError: if ``path`` does not exist
    :raises ValueError: on a malformed line, a missing or mistyped field, or an empty file;
        the message names the file and the line number
    """
    if is_dataset(path):
        return as_pairs(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_preferences needs a path to a JSON Lines file, got {type(path).__name__} (or pass a datasets.Dataset); "
                        "for pairs in memory use as_pairs")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"preference file {str(path)!r} does not exist; pass a JSON Lines file with one "
            '{"prompt": ..., "chosen": ..., "rejected": ...} object per line'
        )
    pairs = [_pair_from_obj(obj, where) for where, obj in iter_jsonl(path)]
    if not pairs:
        raise ValueError(
            f"{path}: the file holds no preference pairs; expected one "
            '{"prompt": ..., "chosen": ..., "rejected": ...} object per line'
        )
    return pairs


def is_dataset(data: object) -> bool:
    """A Hugging Face ``datasets.Dataset`` (or ``DatasetDict``), without importing ``datasets``."""
    return type(data).__module__.startswith("datasets.")


def dataset_rows(data: object, what: str) -> Iterable:
    if type(data).__name__ == "DatasetDict":
        raise ValueError(f"got a DatasetDict with splits {list(data)}: pass one split, e.g. data['train'], as {what}")
    return data


def iter_jsonl(path: Union[str, os.PathLike]) -> Iterator[tuple[str, object]]:
    """Yield ``(where, obj)`` for every non-blank line of a JSON Lines file, ``where`` being
    ``"FILE:LINE"`` for error messages; a line that is not JSON is a ``ValueError`` naming
    the file and the line. A ``.json`` file that is one JSON array (``[{...}, {...}]``, which
    Hugging Face's ``load_dataset("json")`` reads too) yields its items, ``where`` being
    ``"FILE[i]"``. Shared by the preference, SFT, prompt and row readers."""
    if os.fspath(path).lower().endswith(".json"):  # a .jsonl file is only ever read line by line
        with open(path, encoding="utf-8") as f:
            text = f.read()
        items = None
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                pass  # not one array: read it line by line (and report the bad line)
        if isinstance(items, list):
            for i, obj in enumerate(items):
                yield f"{path}[{i}]", obj
            return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{lineno}", obj


def _messages(value: object, where: str) -> "tuple[ChatMessage, ...] | None":
    """``value`` as chat messages when it is a list of ``{"role", "content"}`` dicts, else None."""
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: message {j} must be {{"role": str, "content": str}}, got {str(m)[:80]!r}')
        out.append(ChatMessage(role=m["role"], content=m["content"]))
    if not out:
        raise ValueError(f"{where}: an empty message list")
    return tuple(out)


def as_prompt(value: object, where: str) -> Prompt:
    """A prompt field: a string, or chat messages (one user message becomes its text)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, where)
    if messages is None:
        raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages, got {type(value).__name__}")
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def as_completion(value: object, where: str, key: str) -> str:
    """A completion field: a string, or one assistant message (its text)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, where)
    if messages is None:
        raise ValueError(f"{where}: field {key!r} must be a string or a list of chat messages, got {type(value).__name__}")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{where}: {key!r} must be ONE assistant message (the response), got roles "
                         f"{[m['role'] for m in messages]}; put earlier turns in 'prompt'")
    return messages[0]["content"]


def split_conversation(value: object, where: str, key: str) -> tuple[Prompt, str]:
    """``(prompt, response)`` of a whole conversation whose last message is the assistant's reply."""
    messages = _messages(value, where)
    if messages is None or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: without 'prompt', {key!r} must be a conversation of chat messages ending in the "
                         "assistant's reply (TRL's implicit-prompt format)")
    return as_prompt(list(messages[:-1]), where), messages[-1]["content"]


def _implicit_pair(chosen: object, rejected: object, where: str) -> PreferencePair:
    if isinstance(chosen, str) and isinstance(rejected, str):
        # the prompt is the common beginning (TRL's extract_prompt for standard text)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n > 0 and chosen[n - 1] == " ":
            n -= 1
        if n == 0:
            raise ValueError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no beginning to take it from")
        return PreferencePair(chosen[:n], chosen[n:], rejected[n:])
    prompt, good = split_conversation(chosen, where, "chosen")
    prompt_r, bad = split_conversation(rejected, where, "rejected")
    if prompt != prompt_r:
        raise ValueError(f"{where}: 'chosen' and 'rejected' conversations differ before the last assistant message; "
                         "they must share the prompt")
    return PreferencePair(prompt, good, bad)


def _pair_from_obj(obj: object, where: str) -> PreferencePair:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(FIELDS)}, got {type(obj).__name__}")
    if obj.get("prompt") is None and "chosen" in obj and "rejected" in obj:
        # no prompt (a Dataset mixing both formats fills the missing column with None)
        return _implicit_pair(obj["chosen"], obj["rejected"], where)
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; each line needs {list(FIELDS)} "
                         "(or, TRL's implicit prompt, 'chosen' and 'rejected' alone)")
    return PreferencePair(as_prompt(obj["prompt"], where), as_completion(obj["chosen"], where, "chosen"),
                          as_completion(obj["rejected"], where, "rejected"))


def as_pairs(data: Union[PathLike, Iterable]) -> list[PreferencePair]:
    """Accept a path, a ``datasets.Dataset``, or an iterable of ``PreferencePair``/dicts (any
    format of the module docstring)/3-tuples, as preference pairs.

    :param data: a JSON Lines path, a ``Dataset`` or an iterable of pairs
    :return: a list of ``PreferencePair``
    """
    if isinstance(data, (str, os.PathLike)):
        return load_preferences(data)
    pairs = []
    for i, item in enumerate(dataset_rows(data, "preference data")):
        if isinstance(item, PreferencePair):
            pairs.append(item)
        elif isinstance(item, dict):
            pairs.append(_pair_from_obj(item, f"pair {i}"))
        elif isinstance(item, (tuple, list)) and len(item) == 3:
            pairs.append(_pair_from_obj(dict(zip(FIELDS, item)), f"pair {i}"))
        else:
            raise ValueError(
                f"pair {i}: expected a PreferencePair, a dict with keys {list(FIELDS)} "
                f"or a (prompt, chosen, rejected) tuple, got {type(item).__name__}"
            )
    if not pairs:
        raise ValueError("no preference pairs given; pass at least one (prompt, chosen, rejected)")
    return pairs


def split_pairs(pairs: Iterable[PreferencePair], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out about ``eval_fraction`` of the prompts, with all their pairs: ``(train, eval)``.

    Whole prompts go to one side, so evaluation measures pairs of prompts the model never
    trained on. The prompts are shuffled with ``seed``; at least one prompt lands on each
    side when there are two or more (with one prompt, ``eval`` is empty).
    """
    import random

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    pairs = list(pairs)
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    if len(prompts) < 2:
        return pairs, []
    random.Random(seed).shuffle(prompts)
    n_eval = min(len(prompts) - 1, max(1, round(eval_fraction * len(prompts))))
    held_out = set(prompts[:n_eval])
    return [p for p in pairs if p.prompt not in held_out], [p for p in pairs if p.prompt in held_out]


def save_preferences(pairs: Iterable[PreferencePair], path: PathLike) -> None:
    """Write pairs as JSON Lines, atomically (temporary file, then rename).

    :param pairs: the pairs to write
    :param path: the destination file
    """
    write_text(path, "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs))


def example_path() -> Path:
    """The shipped example file (it includes the design card's database example)."""
    return Path(__file__).resolve().parent / "assets" / "preferences_example.jsonl"
