"""The default task's reward model (``TextRLHF-v0``'s default reward): its training data,
its settings, and training it on first use into the cache."""

from __future__ import annotations

from pathlib import Path

from rlhf_env.data import PreferencePair, as_pairs

DEFAULT_CACHE_NAME = "default-v2"  # v2: trained on both sampling rounds, steps of whole prompts


def default_training_pairs() -> list[PreferencePair]:
    """The default reward model's training pairs: every two responses of a train prompt, over
    all shipped sampling rounds (8 per prompt), whose VADER scores differ by >= 0.3
    (:func:`rlhf_env.default_task.all_round_pairs`); a superset of ``pairs_train.jsonl``."""
    from rlhf_env.default_task import all_round_pairs

    return as_pairs(all_round_pairs("train"))


def default_config() -> "RewardModelConfig":
    """The settings :meth:`RewardModel.default` trains with."""
    from rlhf_env.reward_trainer import RewardModelConfig

    return RewardModelConfig(learning_rate=1e-4, epochs=2, autocast="off")  # float32: bf16 ranks held-out pairs worse


def default_pairs() -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The shipped preference pairs of the default task: ``(train, test)``."""
    from rlhf_env.data import load_preferences

    task = Path(__file__).resolve().parent / "assets" / "task"
    return load_preferences(task / "pairs_train.jsonl"), load_preferences(task / "pairs_test.jsonl")


def default_reward_model_dir(device="cpu", progress: bool = True) -> Path:
    """The cached default reward model's folder, trained there first if it is missing.

    Trained on :func:`default_training_pairs` (all pairs of the shipped samples, 8 responses
    per train prompt) with :func:`default_config`, evaluated on ``pairs_test.jsonl``, with a
    progress bar and a fixed seed, then saved under ``cache_dir()/reward_models/default-v2``.
    Trained in float32 (bf16 autocast is faster but ranked held-out pairs worse; see
    docs/benchmarks.md).
    """
    from rlhf_env.models import cache_dir
    from rlhf_env.reward_model import _CONFIG_FILE
    from rlhf_env.reward_trainer import train_reward_model

    folder = Path(cache_dir()) / "reward_models" / DEFAULT_CACHE_NAME
    if not (folder / _CONFIG_FILE).is_file():
        rm = train_reward_model(default_training_pairs(), eval_pairs=default_pairs()[1], config=default_config(),
                                device=device, progress=progress)
        rm.save(folder)
    return folder
