"""What a text env asks and how it scores the answers: its rows, their prompt token ids, and
the reward (TRL-style reward functions and/or a reward model). Shared by the single and
the batched env, so both start and score a response the same way.

A sub-env answers one row at a time and remembers its index; the reward of a finished
response is computed with that row's columns (:mod:`envs.rows`, :mod:`envs.reward_funcs`).
A prompt set by text at reset (``options={"prompt": ...}``) has no row: its columns are None.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from envs.prompt import TEMPLATE_DEFAULT, encode_env_prompt, prompt_text
from envs.reward_funcs import RewardFunctions
from envs.rows import as_rows, column_names, prompt_rows


class Task:
    """Rows, their encoded prompts and the reward of a text env.

    :param tokenizer: the env's tokenizer
    :param max_prompt_tokens: the longest prompt in tokens (after the chat template)
    :param prompts: prompt strings (the short form of ``dataset``)
    :param dataset: rows (dicts with ``"prompt"`` and any columns) or a ``datasets.Dataset``
    :param system_prompt: see :mod:`envs.prompt` (``TEMPLATE_DEFAULT``, a string, or None)
    :param reward_model: None or a callable ``(prompts, responses) -> scores``
    :param reward_funcs: None, a callable or a list (TRL's convention)
    :param reward_weights: one weight per reward function
    """

    def __init__(
        self,
        tokenizer: Any,
        max_prompt_tokens: int,
        prompts: Sequence[str] | None = None,
        dataset: Any = None,
        system_prompt: Any = TEMPLATE_DEFAULT,
        reward_model: Callable | None = None,
        reward_funcs: Any = None,
        reward_weights: Sequence[float] | None = None,
    ):
        if dataset is not None and prompts is not None:
            raise ValueError('pass either prompts=[...] (strings) or dataset=[...] (rows with a "prompt"), not both')
        if dataset is not None:
            self.rows, where = as_rows(dataset), "dataset"
        else:
            self.rows, where = prompt_rows(prompts), "prompts"
        self.tokenizer = tokenizer
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.system_prompt = system_prompt
        self.reward = RewardFunctions(reward_funcs, reward_weights, reward_model, column_names(self.rows), system_prompt)
        # a one-string view of each prompt (the text of a message list's last user turn), for
        # infos, logs and (prompts, responses) reward models
        self.prompts = [prompt_text(row["prompt"]) for row in self.rows]
        self.prompt_ids = [
            self.encode(row["prompt"], f"{where}[{i}]") for i, row in enumerate(self.rows)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def encode(self, prompt: Any, where: str) -> list[int]:
        """Prompt token ids under the env's system prompt, checked against ``max_prompt_tokens``."""
        return encode_env_prompt(self.tokenizer, prompt, self.max_prompt_tokens, where, self.system_prompt)

    def draw(self, rng: np.random.Generator) -> int:
        """A row index drawn uniformly with ``rng``."""
        return int(rng.integers(len(self.rows)))

    def check_index(self, index: Any, where: str) -> int:
        """``index`` as a valid row index, or a ``ValueError`` naming ``where``."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < len(self.rows):
            raise ValueError(f"{where} must be a row index in [0, {len(self.rows)}), got {index!r}")
        return int(index)

    def score(
        self, rows: Sequence[int | None], prompts: Sequence[Any], responses: Sequence[str], response_ids: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores of finished responses and each reward function's values (see
        :class:`envs.reward_funcs.RewardFunctions`); ``rows`` are row indices (None for a
        prompt set by text)."""
        return self.reward([None if r is None else self.rows[r] for r in rows], prompts, responses, response_ids)
