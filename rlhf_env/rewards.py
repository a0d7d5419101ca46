"""Programmatic rewards with the reward-model interface, and the resolver for ``reward_model=``.

A reward is any callable ``reward(prompts, responses) -> torch.Tensor`` (float32, one score
per pair). Trained reward models (:class:`rlhf_env.RewardModel`) have the same interface, so
the environment treats both alike.

* :class:`SentimentReward` scores the *response* with VADER's compound sentiment in [-1, 1].
  The default task of ``TextRLHF-v0`` is "answer helpfully in a positive, friendly tone";
  VADER is the programmatic reward of that task until the trained default reward model
  (``reward_model="default"``) is used, and it is the independent scorer that labelled the
  default task's preference pairs.
* :class:`TinyReward` is the cheap reward of ``TextRLHF-tiny-v0``: the same VADER score, but an
  empty response scores -1. The tiny model's corpus holds friendly and unfriendly replies in
  equal measure, so its samples already score across the whole range (docs/benchmarks.md,
  "The tiny model's reward"): a strong, learnable signal. Without the empty-response penalty,
  ending at once (score 0) would beat every unfriendly reply and be a shortcut.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Sequence

import torch

from rlhf_env.envs.device import check_device

REWARD_NAMES = ("sentiment", "vader", "tiny", "default")


def _check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(responses, str):
        responses = [responses]
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise TypeError(f"response {i} is a {type(text).__name__}, not a string")
    return prompts, responses


class SentimentReward:
    """VADER compound sentiment of each response, in [-1, 1] (the prompt is not scored).

    :param empty_score: the score of an empty (or whitespace-only) response; VADER itself
        gives 0.
    """

    reward_name = "sentiment"  # the name resolve_reward builds it from (an export records it)

    def __init__(self, empty_score: float = 0.0) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.empty_score = float(empty_score)
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Score (prompt, response) pairs.

        :param prompts: the prompts (one per response; unused by the score itself)
        :param responses: the response texts
        :return: float32 tensor of shape ``(len(responses),)``
        """
        prompts, responses = _check_pairs(prompts, responses)
        scores = [
            self._analyzer.polarity_scores(text)["compound"] if text.strip() else self.empty_score
            for text in responses
        ]
        return torch.tensor(scores, dtype=torch.float32)

    score = __call__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(empty_score={self.empty_score})"


class TinyReward(SentimentReward):
    """``TextRLHF-tiny-v0``'s reward: VADER compound of the response, -1 for an empty one.

    Cheap (well under a millisecond per response) and easy to raise from the tiny model in a
    few hundred PPO steps: its corpus mixes friendly and unfriendly replies, so sampled
    responses already span the whole range and the policy only has to prefer the friendly ones.
    """

    reward_name = "tiny"

    def __init__(self) -> None:
        super().__init__(empty_score=-1.0)

    def __repr__(self) -> str:
        return "TinyReward()"


def resolve_reward(spec: Any, device: str | torch.device = "cpu") -> Callable:
    """A reward callable from a specification.

    :param spec: a callable ``(prompts, responses) -> scores`` (returned as is);
        ``"sentiment"`` or ``"vader"`` (:class:`SentimentReward`); ``"tiny"``
        (:class:`TinyReward`); ``"default"`` (``RewardModel.default()``, trained once and
        cached); a directory written by ``RewardModel.save`` (``RewardModel.load``); or
        ``"FILE.py:NAME"`` / ``"MODULE:NAME"``, a ``(prompts, responses)`` function (:func:`load_function`).
    :param device: where a trained reward model is placed.
    :return: the reward callable.
    :raises ValueError: for anything else, naming it and listing the valid names.
    """
    if callable(spec):
        return spec
    check_reward(spec)
    if isinstance(spec, str) and spec.lower() in REWARD_NAMES:
        name = spec.lower()
        if name in ("sentiment", "vader"):
            return SentimentReward()
        if name == "tiny":
            return TinyReward()
        from rlhf_env.reward_model import RewardModel

        check_device(device)  # a missing GPU is one line, not a failure inside the first-use training
        return RewardModel.default(device=device)
    if isinstance(spec, (str, os.PathLike)) and pathlib.Path(spec).expanduser().is_dir():
        from rlhf_env.reward_model import RewardModel

        check_device(device)
        return RewardModel.load(pathlib.Path(spec).expanduser(), device=device)
    return load_function(spec, "reward_model")  # FILE.py:NAME or MODULE:NAME (--env-kwargs, YAML)


def check_reward(spec: Any, what: str = "reward_model") -> None:
    """Refuse, before anything loads, a reward specification :func:`resolve_reward` cannot
    take: one line naming ``what`` (the env's ``reward_model`` or a command's ``--reward``),
    with the closest name when it looks misspelled. A ``FILE.py:NAME`` is left to
    :func:`load_function`, whose errors name the file and its functions.

    :raises ValueError: for anything that is not a callable, a reward name, an existing
        directory or a ``FILE.py:NAME`` / ``MODULE:NAME`` string.
    """
    import difflib

    if callable(spec) or (isinstance(spec, str) and (spec.lower() in REWARD_NAMES or ":" in spec)):
        return
    if isinstance(spec, (str, os.PathLike)) and pathlib.Path(spec).expanduser().is_dir():
        return
    close = difflib.get_close_matches(str(spec).lower(), REWARD_NAMES, n=1) if isinstance(spec, str) else []
    raise ValueError(
        f"unknown {what} {spec!r}{f' (did you mean {close[0]!r}?)' if close else ''}: use one of "
        f"{', '.join(repr(n) for n in REWARD_NAMES)}, a directory written by RewardModel.save, a callable "
        "(prompts, responses) -> scores, or where one lives: 'FILE.py:NAME'"
    )


def load_function(spec: str, what: str = "reward function") -> Callable:
    """A function named by where it lives, for the command line and YAML: ``FILE.py:NAME``
    (a path, relative to the current folder), ``MODULE:NAME`` or ``MODULE.NAME`` (an
    importable module; the current folder is searched too), the way TRL's scripts take
    ``--reward_funcs my_lib.rewards.accuracy``.

    :param what: what the function is for, in the error messages
    :raises ValueError: a spec of neither form, a missing file or module, a missing name
        (listing the module's functions), an import that fails (its error kept)
    :raises TypeError: the name is not callable
    """
    import importlib
    import importlib.util
    import inspect
    import sys

    text = os.fspath(spec)
    if ":" in text:
        where, name = text.rsplit(":", 1)
    elif "." in text and not text.endswith(".py"):
        where, name = text.rsplit(".", 1)
    else:
        raise ValueError(f"{what} {text!r}: name it as FILE.py:NAME (e.g. my_rewards.py:correct) or MODULE.NAME (an importable module)")
    if not where or not name.isidentifier():
        raise ValueError(f"{what} {text!r}: name it as FILE.py:NAME (e.g. my_rewards.py:correct) or MODULE.NAME")
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = pathlib.Path(where).expanduser()
            if not path.is_file():
                raise ValueError(f"{what} {text!r}: no file {os.fspath(path)!r} (from {os.getcwd()})")
            module_spec = importlib.util.spec_from_file_location(f"_rlhf_env_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # the console script's path lacks the current folder
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except ValueError:
        raise
    except ModuleNotFoundError as exc:
        raise ValueError(f"{what} {text!r}: cannot import module {where!r} ({exc}); a file in this folder is FILE.py:NAME") from exc
    except Exception as exc:  # the user's module itself fails to import
        raise ValueError(f"{what} {text!r}: importing {where!r} raised {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, name):
        functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ValueError(f"{what} {text!r}: {where!r} has no {name!r} (its functions: {', '.join(functions) or 'none'})")
    function = getattr(module, name)
    if not callable(function):
        raise TypeError(f"{what} {text!r} is a {type(function).__name__}, not a function")
    return function
