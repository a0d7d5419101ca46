"""Preference data: JSON Lines triples ``{"prompt", "chosen", "rejected"}``.

One object per line; blank lines are skipped. Any other problem (a line that is not
JSON, not an object, a missing or non-string field, an empty file) is a ``ValueError``
that names the file and the line, so a broken data set is fixed at its source.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One preference judgement: for ``prompt``, ``chosen`` is better than ``rejected``.

    :param prompt: the user's prompt (plain text, before any chat template)
    :param chosen: the preferred response
    :param rejected: the dispreferred response
    """

    prompt: str
    chosen: str
    rejected: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_preferences(path: PathLike) -> list[PreferencePair]:
    """Read preference pairs from a JSON Lines file.

    :param path: a ``.jsonl`` file with one ``{"prompt", "chosen", "rejected"}`` object a line
        (other keys are allowed and ignored)
    :return: the pairs, in file order
    :raises FileNotFoundError: if ``path`` does not exist
    :raises ValueError: on a malformed line, a missing or non-string field, or an empty file;
        the message names the file and the line number
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_preferences needs a path to a JSON Lines file, got {type(path).__name__}; for pairs in memory use as_pairs")
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


def iter_jsonl(path: Union[str, os.PathLike]) -> Iterator[tuple[str, object]]:
    """Yield ``(where, obj)`` for every non-blank line of a JSON Lines file, ``where`` being
    ``"FILE:LINE"`` for error messages; a line that is not JSON is a ``ValueError`` naming
    the file and the line. Shared by the preference, SFT and prompt readers."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{lineno}", obj


def _pair_from_obj(obj: object, where: str) -> PreferencePair:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(FIELDS)}, got {type(obj).__name__}")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; each line needs {list(FIELDS)}")
    for k in FIELDS:
        if not isinstance(obj[k], str):
            raise ValueError(f"{where}: field {k!r} must be a string, got {type(obj[k]).__name__}")
    return PreferencePair(obj["prompt"], obj["chosen"], obj["rejected"])


def as_pairs(data: Union[PathLike, Iterable]) -> list[PreferencePair]:
    """Accept a path, or an iterable of ``PreferencePair``/dicts/3-tuples, as preference pairs.

    :param data: a JSON Lines path or an iterable of pairs
    :return: a list of ``PreferencePair``
    """
    if isinstance(data, (str, os.PathLike)):
        return load_preferences(data)
    pairs = []
    for i, item in enumerate(data):
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


def save_preferences(pairs: Iterable[PreferencePair], path: PathLike) -> None:
    """Write pairs as JSON Lines, atomically (temporary file, then rename).

    :param pairs: the pairs to write
    :param path: the destination file
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def example_path() -> Path:
    """The shipped example file (it includes the design card's database example)."""
    return Path(__file__).resolve().parent / "assets" / "preferences_example.jsonl"
