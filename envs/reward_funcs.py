"""Reward functions with TRL's calling convention, checked and combined into one score.

Each reward function is called once per batch of finished responses, as TRL's
``GRPOTrainer`` calls it::

    f(prompts=[...], completions=[...], completion_ids=[...], **columns)

``prompts`` are the rows' prompts (strings, or message lists for conversational rows),
``completions`` the responses (strings; ``[{"role": "assistant", "content": text}]`` for a
conversational row, as TRL passes them), ``completion_ids`` the response token ids, and
every other column of the dataset as a list in the same order (``None`` where a row lacks
the column). A function written for TRL with ``**kwargs`` therefore ports unchanged.

It returns one number per completion, or ``None`` for a completion it does not apply to.
The score of a response is TRL's ``nansum``: the weighted sum over the functions that apply
(a function returning ``None`` adds nothing), plus the reward model's score when there is
one (weight 1; it gets each prompt as text, the last user message of a message list,
unless it has ``accepts_messages = True``: then message lists whole, with the env's
``system_prompt`` string inserted where a prompt has no system message of its own, as the
policy saw it). A response no function
applies to (and no reward model) scores 0, with a warning. Each function's own (unweighted)
value, NaN where it returned ``None``, is reported as ``info["rewards/{name}"]`` with
``name`` the function's ``__name__``.

Every misuse is one :class:`RewardFunctionError` line naming the function: a signature
that cannot take the call (checked when the env is built), an exception inside the
function (with the file and line where it was raised; the original exception stays in
``__context__``), and a result that is ``None``, a scalar, the wrong length, not a number
or NaN.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from envs.prompt import TEMPLATE_DEFAULT, as_messages, is_conversational, prompt_text
from envs.rows import columns_of


class RewardFunctionError(ValueError):
    """A reward function (or the reward model) could not be called or returned something
    that is not one score per completion."""


def function_name(f: Any) -> str:
    """TRL's name of a reward function: its ``__name__`` (the wrapped function's for a
    ``functools.partial``, the class name for a callable object)."""
    name = getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__", None)
    return str(name or type(f).__name__)


def _raised_at(err: BaseException) -> str:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" (at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"


def _float(value: Any) -> float | None:
    """A number (Python, numpy or a one-element tensor) as float; None stays None; anything
    else raises TypeError."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(-1)[0])
    if isinstance(value, (numbers.Real, np.number)):
        return float(value)
    raise TypeError(type(value).__name__)


def _start(prompt: Any) -> str:
    text = prompt_text(prompt)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


class RewardFunctions:
    """The reward of a text env: TRL-style reward functions (weighted) plus an optional
    ``(prompts, responses) -> scores`` reward model.

    :param reward_funcs: None, one callable or a list of callables (TRL's convention)
    :param reward_weights: one weight per reward function (default 1 each)
    :param reward_model: None or a callable ``(prompts, responses) -> scores`` (weight 1)
    :param columns: the dataset's column names besides ``"prompt"``: every function's
        signature is checked against the call it will get
    :param system_prompt: the env's system message (:mod:`envs.prompt`): a string reaches a
        reward model with ``accepts_messages = True`` as the first message of every prompt
        without its own (TRL-style reward functions get the rows' prompts as they are)
    """

    def __init__(
        self,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_model: Callable | None = None,
        columns: Sequence[str] = (),
        system_prompt: Any = TEMPLATE_DEFAULT,
    ):
        if reward_funcs is None:
            funcs: list[Callable] = []
        elif callable(reward_funcs):
            funcs = [reward_funcs]
        elif isinstance(reward_funcs, (str, bytes)):
            raise TypeError(f"reward_funcs must be a callable or a list of callables, got the string {reward_funcs!r}")
        else:
            funcs = list(reward_funcs)
        for i, f in enumerate(funcs):
            if not callable(f):
                raise TypeError(f"reward_funcs[{i}] is a {type(f).__name__}, not a callable f(prompts, completions, **kwargs)")
        if reward_model is not None and not callable(reward_model):
            raise TypeError(f"reward_model must be callable as reward_model(prompts, responses), got {type(reward_model).__name__}")
        if not funcs and reward_model is None:
            raise ValueError("the env has no reward: pass reward_funcs=[...] (TRL-style functions) and/or reward_model=")
        if reward_weights is None:
            weights = [1.0] * len(funcs)
        else:
            if not funcs:
                raise ValueError("reward_weights was given without reward_funcs: pass one weight per reward function")
            weights = list(reward_weights) if not isinstance(reward_weights, numbers.Real) else [reward_weights]
            if len(weights) != len(funcs):
                raise ValueError(f"got {len(weights)} reward_weights for {len(funcs)} reward_funcs: pass one weight per function")
            for i, w in enumerate(weights):
                if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                    raise ValueError(f"reward_weights[{i}] must be a finite number, got {w!r}")
            weights = [float(w) for w in weights]
        self.funcs = funcs
        self.weights = np.asarray(weights, dtype=np.float64)
        self.names = _unique([function_name(f) for f in funcs])
        self.reward_model = reward_model
        self.columns = list(columns)
        self.system_prompt = system_prompt
        for f, name in zip(self.funcs, self.names):
            self._check_signature(f, name)
        if reward_model is not None:
            self._check_model_signature(reward_model)

    @property
    def info_keys(self) -> list[str]:
        """The ``info`` keys of the per-function values (``rewards/{name}``)."""
        return [f"rewards/{name}" for name in self.names]

    @staticmethod
    def _check_model_signature(model: Callable) -> None:
        if inspect.isclass(model):
            raise RewardFunctionError(f"reward_model is the class {model.__name__}: pass an instance, {model.__name__}(...), "
                                      "whose __call__(prompts, responses) returns one score per response")
        try:
            sig = inspect.signature(model)
        except (TypeError, ValueError):  # builtins without a signature: checked by the call
            return
        try:
            sig.bind([], [])
        except TypeError as err:
            name = function_name(model)
            raise RewardFunctionError(
                f"reward_model {name!r} cannot be called as {name}(prompts, responses): {err}; write it as "
                f"def {name}(prompts, responses): return [one score per response] (both lists: it is called once per "
                "batch), or pass TRL-style functions f(prompts, completions, **kwargs) as reward_funcs=[...]"
            ) from None

    def _check_signature(self, f: Callable, name: str) -> None:
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):  # builtins without a signature: checked by the call
            return
        kwargs = dict.fromkeys(["prompts", "completions", "completion_ids", *self.columns], [])
        try:
            sig.bind(**kwargs)
        except TypeError as err:
            cols = ", ".join(self.columns) or "none"
            raise RewardFunctionError(
                f"reward function {name!r} cannot be called as {name}(prompts=..., completions=..., completion_ids=..., "
                f"**columns) with this dataset's columns ({cols}): {err}; write it as "
                f"def {name}(prompts, completions, **kwargs) (TRL's convention), or pass a (prompts, responses) "
                "scorer as reward_model="
            ) from None

    def __call__(
        self, rows: Sequence[dict | None], prompts: Sequence[Any], responses: Sequence[str], response_ids: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Score finished responses.

        :param rows: the dataset row of each response (None for a prompt set by text at reset)
        :param prompts: each response's prompt (a string or a message list)
        :param responses: the response texts
        :param response_ids: the response token ids
        :return: ``(scores, values)``: the combined score of each response, and per
            function ``rewards/{name}`` its values (NaN where it returned None)
        """
        n = len(responses)
        scores = np.zeros(n, dtype=np.float64)
        values: dict[str, np.ndarray] = {}
        applied = np.zeros(n, dtype=bool)
        if self.reward_model is not None:
            # a (prompts, responses) scorer gets each prompt's text (the last user message); one
            # that declares accepts_messages (rlhf_env.RewardModel) gets message lists whole, the
            # env's system message included, so a reward model trained with system messages scores
            # what the policy answered
            if not getattr(self.reward_model, "accepts_messages", False):
                texts = [prompt_text(p) for p in prompts]
            elif isinstance(self.system_prompt, str):
                texts = [as_messages(p, self.system_prompt) for p in prompts]
            else:
                texts = list(prompts)
            model_scores = self._checked(self.reward_model, "the reward model", n, prompts, lambda: self.reward_model(texts, list(responses)), allow_none=False)
            scores += model_scores
            applied[:] = True
            if self.funcs:
                values["rewards/reward_model"] = model_scores
        if self.funcs:
            completions = [
                [{"role": "assistant", "content": r}] if is_conversational(p) else r for p, r in zip(prompts, responses)
            ]
            kwargs = dict(prompts=list(prompts), completions=completions, completion_ids=[list(ids) for ids in response_ids])
            kwargs.update(columns_of(rows, self.columns))
            for f, name, weight in zip(self.funcs, self.names, self.weights):
                out = self._checked(f, f"reward function {name!r}", n, prompts, lambda f=f: f(**kwargs), allow_none=True)
                values[f"rewards/{name}"] = out
                ok = ~np.isnan(out)
                scores[ok] += weight * out[ok]
                applied |= ok
        if not applied.all():
            warnings.warn(
                "every reward function returned None for a completion (none applies to its row): its score is 0; "
                "make sure at least one reward function returns a number for every row",
                stacklevel=3,
            )
        return scores, values

    @staticmethod
    def _checked(f: Callable, who: str, n: int, prompts: Sequence[Any], call: Callable[[], Any], allow_none: bool) -> np.ndarray:
        """Call ``f`` and turn its result into ``n`` floats (NaN for None), or raise one line."""
        try:
            out = call()
        except Exception as err:  # the user's code: name it, point at the line, drop our frames
            raise RewardFunctionError(f"{who} raised {type(err).__name__}: {err}{_raised_at(err)}") from None
        expected = f"a list of {n} scores (one per completion"
        expected += "; None inside the list marks a completion it does not apply to)" if allow_none else ")"
        if out is None:
            raise RewardFunctionError(f"{who} returned None, not {expected}")
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        if isinstance(out, np.ndarray) and out.ndim == 0 or isinstance(out, (numbers.Number, np.number, str, bytes)):
            raise RewardFunctionError(f"{who} returned a single {type(out).__name__} ({out!r}), not {expected}; "
                                      "it is called once per batch, with lists of prompts and responses")
        try:
            items = list(np.asarray(out).reshape(-1)) if isinstance(out, np.ndarray) else list(out)
        except TypeError:
            raise RewardFunctionError(f"{who} returned a {type(out).__name__}, not {expected}") from None
        if len(items) != n:
            raise RewardFunctionError(f"{who} returned {len(items)} scores for {n} completions; return {expected}")
        result = np.empty(n, dtype=np.float64)
        for i, item in enumerate(items):
            try:
                value = _float(item)
            except TypeError as err:
                raise RewardFunctionError(f"{who} returned a {err} for completion {i} (prompt {_start(prompts[i])}): scores must be numbers") from None
            if value is None and not allow_none:
                raise RewardFunctionError(f"{who} returned None for completion {i} (prompt {_start(prompts[i])}): scores must be numbers")
            if value is not None and not math.isfinite(value):
                raise RewardFunctionError(
                    f"{who} returned {value} for completion {i} (prompt {_start(prompts[i])}): scores must be finite"
                    + ("; return None for a completion the function does not apply to" if allow_none else "")
                )
            result[i] = np.nan if value is None else value
        return result


def _unique(names: list[str]) -> list[str]:
    """Names made unique by a suffix (two functions with one ``__name__`` log apart)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
