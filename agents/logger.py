"""SB3-style logger: ``record`` key/values, ``dump`` them to stdout (SB3's ``verbose=1``
table) and to TensorBoard with SB3's tag names, one run directory per ``learn``."""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from typing import Any, TextIO

import numpy as np


def get_latest_run_id(log_path: str, log_name: str) -> int:
    """Highest ``k`` among ``{log_path}/{log_name}_{k}`` directories (0 if none)."""
    max_run_id = 0
    if not os.path.isdir(log_path):
        return 0
    pattern = re.compile(rf"^{re.escape(log_name)}_(\d+)$")
    for name in os.listdir(log_path):
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(log_path, name)):
            max_run_id = max(max_run_id, int(match.group(1)))
    return max_run_id


class HumanOutputFormat:
    """The boxed key/value table SB3 prints with ``verbose=1``."""

    def __init__(self, stream: TextIO = sys.stdout, max_length: int = 36):
        self.stream = stream
        self.max_length = max_length

    def _truncate(self, s: str) -> str:
        return s[: self.max_length - 3] + "..." if len(s) > self.max_length else s

    def write(self, values: dict[str, Any], excluded: dict[str, tuple[str, ...]], step: int) -> None:
        rows: list[tuple[str, str]] = []
        tag = None
        for key in sorted(values):
            if "stdout" in excluded.get(key, ()):
                continue
            value = values[key]
            text = f"{value:<8.3g}" if isinstance(value, (float, np.floating)) else str(value)
            if "/" in key:
                prefix, name = key.split("/", 1)
                if prefix != tag:
                    rows.append((self._truncate(prefix + "/"), ""))
                    tag = prefix
                key = "   " + name
            rows.append((self._truncate(key), self._truncate(text)))
        if not rows:
            return
        key_width = max(len(k) for k, _ in rows)
        val_width = max(len(v) for _, v in rows)
        dashes = "-" * (key_width + val_width + 7)
        lines = [dashes] + [f"| {k:<{key_width}} | {v:<{val_width}} |" for k, v in rows] + [dashes]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class TensorBoardOutputFormat:
    """Scalars (and text) to a TensorBoard event file in ``folder``."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def write(self, values: dict[str, Any], excluded: dict[str, tuple[str, ...]], step: int) -> None:
        for key, value in values.items():
            if "tensorboard" in excluded.get(key, ()):
                continue
            if isinstance(value, str):
                self.writer.add_text(key, value, step)
            elif isinstance(value, (int, float, np.integer, np.floating)) or (
                hasattr(value, "ndim") and value.ndim == 0
            ):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Logger:
    """Collects values between dumps; means for ``record_mean``.

    :param folder: run directory (None: no files)
    :param output_formats: where ``dump`` writes
    """

    def __init__(self, folder: str | None, output_formats: list[Any]):
        self.dir = folder
        self.output_formats = output_formats
        self.name_to_value: dict[str, Any] = {}
        self.name_to_count: dict[str, int] = defaultdict(int)
        self.name_to_excluded: dict[str, tuple[str, ...]] = {}

    def record(self, key: str, value: Any, exclude: str | tuple[str, ...] | None = None) -> None:
        """Log ``value`` under ``key`` at the next dump; ``exclude`` names formats to skip
        (``"stdout"``, ``"tensorboard"``)."""
        self.name_to_value[key] = value
        self.name_to_excluded[key] = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())

    def record_mean(self, key: str, value: Any, exclude: str | tuple[str, ...] | None = None) -> None:
        """Log the running mean of the values recorded under ``key`` since the last dump."""
        old, n = self.name_to_value.get(key, 0.0), self.name_to_count[key]
        self.name_to_value[key] = old * n / (n + 1) + float(value) / (n + 1)
        self.name_to_count[key] = n + 1
        self.name_to_excluded[key] = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())

    def dump(self, step: int = 0) -> None:
        for fmt in self.output_formats:
            fmt.write(self.name_to_value, self.name_to_excluded, step)
        self.name_to_value.clear()
        self.name_to_count.clear()
        self.name_to_excluded.clear()

    def get_dir(self) -> str | None:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


def configure_logger(
    verbose: int = 0,
    tensorboard_log: str | None = None,
    tb_log_name: str = "",
    reset_num_timesteps: bool = True,
) -> Logger:
    """SB3's scheme: a new ``{tensorboard_log}/{tb_log_name}_{k+1}`` per fresh ``learn``,
    the latest ``_{k}`` again when continuing (``reset_num_timesteps=False``)."""
    formats: list[Any] = []
    folder = None
    if verbose >= 1:
        formats.append(HumanOutputFormat(sys.stdout))
    if tensorboard_log is not None:
        latest = get_latest_run_id(tensorboard_log, tb_log_name)
        if not reset_num_timesteps and latest > 0:
            latest -= 1  # continue in the same directory
        folder = os.path.join(tensorboard_log, f"{tb_log_name}_{latest + 1}")
        os.makedirs(folder, exist_ok=True)
        formats.append(TensorBoardOutputFormat(folder))
    return Logger(folder, formats)
