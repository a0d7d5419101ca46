"""Shared plumbing of the offline trainers (reward model, SFT, DPO).

Batching with little padding, TensorBoard run folders named like SB3's
(``{log_dir}/{name}_{k}``), seeding, and atomic writes of output folders. The trainers
themselves (``reward_trainer.py``, ``sft.py``, ``dpo.py``) hold only their losses.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from rlhf_env.agents.export import save_pretrained


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for data order.

    :param seed: the seed
    :return: a ``torch.Generator`` seeded with ``seed`` (batch order draws from it)
    """
    random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def length_batches(
    lengths: Sequence[int], batch_size: int, shuffle: bool = True, generator: Optional[torch.Generator] = None
) -> list[list[int]]:
    """Batches of indices whose members have similar lengths, so padding stays small.

    With ``shuffle``, the indices are shuffled, cut into pools of 50 batches, sorted by
    length inside each pool and cut into batches, and the batch order is shuffled: every
    epoch sees a different order while batches stay nearly padding-free.

    :param lengths: the length of each example
    :param batch_size: examples per batch
    :param shuffle: shuffle (training) or keep a deterministic length-sorted order (evaluation)
    :param generator: source of randomness for the shuffle
    :return: a list of index lists
    """
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    order = torch.randperm(n, generator=generator).tolist()
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, n, pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def prompt_groups(prompts: Sequence[str]) -> list[list[int]]:
    """Indices of equal prompts grouped together, groups in order of first appearance."""
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(i)
    return list(by_prompt.values())


def step_examples(
    groups: Optional[list[list[int]]], pair_lengths: Sequence[int], batch_size: int
) -> tuple[list[list[int]], int, list[int]]:
    """What the steps of a pairwise trainer (reward model, DPO) draw from.

    :param groups: pair indices by prompt (:func:`prompt_groups`): an example is a prompt
        with all its pairs, and a step takes whole prompts, about ``batch_size`` pairs on
        average and at least one prompt; ``None``: an example is one pair, ``batch_size`` a step
    :param pair_lengths: each pair's longer sequence, in tokens
    :param batch_size: pairs per step
    :return: ``(examples, examples per step, each example's longest pair)``, the last for
        :func:`length_batches`
    """
    if groups is not None:
        examples = groups
        per_step = max(1, round(batch_size * len(examples) / len(pair_lengths)))
    else:
        examples, per_step = [[i] for i in range(len(pair_lengths))], batch_size
    return examples, per_step, [max(pair_lengths[i] for i in ex) for ex in examples]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one (:func:`envs.kv_cache.pad_token_ids`).

    :param seqs: token id lists
    :param pad_id: the pad token id
    :param device: where the tensors go
    :return: ``(input_ids, attention_mask)``, both ``long`` of shape ``(len(seqs), max_len)``
    """
    from rlhf_env.envs.kv_cache import pad_token_ids

    return pad_token_ids(seqs, pad_id, device, side="right")


def summary_writer(log_dir: Optional[os.PathLike | str], name: str):
    """A TensorBoard writer in ``{log_dir}/{name}_{k}``, ``k`` one more than the latest run (SB3's rule).

    :param log_dir: the TensorBoard root; ``None`` disables logging
    :param name: the run name
    :return: a ``SummaryWriter``, or ``None`` when ``log_dir`` is ``None``
    """
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    root = Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    latest = 0
    for p in root.glob(f"{name}_*"):
        suffix = p.name[len(name) + 1 :]
        if p.is_dir() and suffix.isdigit():
            latest = max(latest, int(suffix))
    return SummaryWriter(str(root / f"{name}_{latest + 1}"))


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``log p(token | prefix)`` over the tokens where ``loss_mask`` is 1.

    Right-padded inputs; ``loss_mask[:, t]`` marks token ``t`` as one whose probability
    counts (the response tokens). Computes log-softmax only at those positions, so the
    vocabulary-sized tensor stays small.

    :return: one log-probability per row, float32
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].bool()
    picked = logits[mask].float()  # (n_tokens, vocab): only response positions
    token_logp = torch.log_softmax(picked, dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    row = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
    return torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32).index_add(0, row, token_logp)


def save_lm(model, tokenizer, output_dir: os.PathLike | str, training: dict | None = None) -> Path:
    """Save a causal LM (LoRA merged) and its tokenizer as a Hugging Face folder, atomically,
    with ``training`` as its ``rlhf_env_training.json`` (as an agent's export records it).

    :return: the folder, which ``load_lm(dir)`` and ``gym.make("TextRLHF-v0", model=dir)`` accept
    """
    return save_pretrained(model, tokenizer, output_dir, training)


def base_model_name(model) -> str | None:
    """How a trainer's ``model=`` argument names its starting model in the training record: a
    shipped name or hub id as given, a folder by its absolute path, None for a loaded model
    (``rlhf-env eval`` of the output then judges it against that starting model)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def resolve_lm(model, tokenizer=None, device="cpu", dtype=None):
    """``(model, tokenizer)`` from a name/folder (``load_lm``) or an already loaded model.

    :param model: a shipped name, a model folder, or a ``PreTrainedModel``
    :param tokenizer: required with a loaded model unless ``model`` carries none
    :return: ``(model, tokenizer)`` on ``device``
    """
    if isinstance(model, (str, os.PathLike)):
        from rlhf_env.models import load_lm

        return load_lm(model, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: pass tokenizer=..., or pass the model's name or folder")
    return model.to(device), tokenizer


def train_last_layers(model, n: Optional[int]) -> None:
    """Freeze everything but the last ``n`` transformer blocks and the final norm (``None``:
    leave every weight as it is, all trainable for a fresh model); :func:`envs.decoder.set_trainable`.

    :raises ValueError: when no block list is found or ``n`` exceeds the number of blocks
    """
    if n is None:
        return
    from rlhf_env.envs.decoder import set_trainable

    try:
        set_trainable(model, n)
    except TypeError as err:
        raise ValueError(f"{err}; pass trainable_layers=None") from None


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, fused where torch supports it (CPU and CUDA float tensors)."""
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
