"""The default task's reward model (``TextRLHF-v0``'s default reward): its training data,
its settings, and training it on first use into the cache."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from rlhf_env.data import PreferencePair

# v6: v5's settings on pairs that also value tone among equally good answers (a friendly sampling
# round; warm / cold / praise pairs; judged pairs capped per prompt). v5: v4's pairs under bf16 autocast
DEFAULT_CACHE_NAME = "default-v6"


def default_training_pairs() -> list[PreferencePair]:
    """The default reward model's training pairs: the default task's ``pairs_train.jsonl``
    (pairs of the starting model's samples that tone, relevance and fluency agree on; pairs
    that tone alone decides among equally good answers; boilerplate, repetition, off-topic
    cheer, rudeness and canned praise as rejected responses:
    :mod:`rlhf_env.default_task.relabel`)."""
    return default_pairs()[0]


def default_config() -> "RewardModelConfig":
    """The settings :meth:`RewardModel.default` trains with."""
    from rlhf_env.reward_trainer import RewardModelConfig

    # bf16 autocast where the CPU (AMX / AVX512-BF16) or GPU computes it natively, float32 elsewhere:
    # on these pairs it ranks as many hand-written pairs right as float32 in less CPU time
    # (docs/benchmarks.md, "Precision on the current pairs")
    return RewardModelConfig(learning_rate=1e-4, epochs=2, autocast="auto")


def default_pairs() -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The shipped preference pairs of the default task: ``(train, test)``."""
    from rlhf_env.default_task import task_pairs

    return task_pairs("train"), task_pairs("test")


def default_reward_model_dir(device="cpu", progress: bool = True) -> Path:
    """The cached default reward model's folder, trained there first if it is missing.

    Trained on :func:`default_training_pairs` with :func:`default_config`, evaluated on
    ``pairs_test.jsonl``, with a progress bar and a fixed seed, then saved under
    ``cache_dir()/reward_models/default-v6``. What it measures and how well:
    docs/alignment.md.
    """
    from rlhf_env.models import cache_dir
    from rlhf_env.reward_model import _CONFIG_FILE
    from rlhf_env.reward_trainer import train_reward_model

    folder = Path(cache_dir()) / "reward_models" / DEFAULT_CACHE_NAME
    if not (folder / _CONFIG_FILE).is_file():
        if progress:  # a bar labelled "reward model" alone does not say why the first run waits minutes
            print(f"training the default reward model once, on the shipped preference pairs (about 4 minutes on one CPU "
                  f"thread); cached in {folder}", file=sys.stderr, flush=True)
        # held-out accuracy after the last epoch only: the same model, one evaluation pass less
        config = replace(default_config(), eval_each_epoch=False)
        rm = train_reward_model(default_training_pairs(), eval_pairs=default_pairs()[1], config=config,
                                device=device, progress=progress)
        rm.save(folder)
    return folder
