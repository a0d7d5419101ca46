"""Atomic writes: write to a temporary sibling, then rename into place.

A crash, an exception or Ctrl-C while writing leaves the destination as it was (the old
file or folder, or nothing) and never a half-written one under its name. Every file and
folder the package writes (checkpoints, saved models, exported policies, data files,
figures) goes through :func:`atomic_file` or :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _tmp_sibling(final: Path, tag: str) -> Path:
    # same folder as the destination (a rename across filesystems is not atomic), hidden,
    # unique per writer so two processes writing the same name never share a temporary
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{final.suffix}")


@contextlib.contextmanager
def atomic_file(final: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same suffix, so writers that look at it, like
    matplotlib's ``savefig``, pick the right format); on success it replaces ``final``.

    :param final: the destination file (its folder is created)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final, "tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(final: os.PathLike | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(final)


@contextlib.contextmanager
def atomic_dir(final: os.PathLike | str, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` (an existing folder
    of that name is moved aside first and deleted after the rename).

    :param final: the destination folder (its parent is created)
    :param replace: False for a cache that several processes may build at once: the first
        finished folder stays (readers may be using it) and later ones are discarded
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if not replace:
            try:
                os.rename(tmp, final)  # fails when another process's folder is already there
            except OSError:
                if not final.is_dir():
                    raise
            return
        if final.exists():
            old = _tmp_sibling(final, "old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
