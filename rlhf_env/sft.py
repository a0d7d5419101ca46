"""Supervised fine-tuning (SFT) of a causal LM on (prompt, response) examples.

Inputs are formatted exactly as the environment does: ``encode_prompt(prompt)`` then the
response's tokens and EOS. The loss is the mean negative log-likelihood of the response
tokens (EOS included); prompt tokens condition the model but are not trained on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from rlhf_env.agents import distributed
from rlhf_env.data import Prompt, as_completion, as_prompt, dataset_rows, is_dataset, iter_jsonl, split_conversation
from rlhf_env.loop import TrainLoop, check_config, setup_distributed
from rlhf_env.training import adamw, base_model_name, pad_right, resolve_lm, save_lm, seed_everything, summary_writer


@dataclass
class SFTConfig:
    """Hyperparameters of :func:`train_sft`.

    :param learning_rate: AdamW learning rate
    :param batch_size: examples per step
    :param epochs: passes over the examples
    :param max_length: longest input in tokens (the prompt's start is cut first)
    :param weight_decay: AdamW weight decay
    :param add_eos: end each response with EOS, so the model learns to stop
    :param seed: seed for the data order
    """

    learning_rate: float = 2e-5
    batch_size: int = 8
    epochs: int = 1
    max_length: int = 256
    weight_decay: float = 0.0
    add_eos: bool = True
    seed: int = 0


def load_sft_examples(path: Union[str, os.PathLike]) -> list[tuple[Prompt, str]]:
    """Read SFT examples from JSON Lines (or a ``datasets.Dataset``), one object a line in any of:
    ``{"prompt", "response"}``; TRL's ``{"prompt", "completion"}`` (strings, or chat messages
    with one assistant message as the completion); TRL's conversational ``{"messages": [...]}``
    (the last message is the assistant's response, the ones before it the prompt); a
    preference record (its ``chosen`` is the response).

    :raises ValueError: naming the file and line of a malformed line or a missing key
    """
    if is_dataset(path):
        return _as_examples(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {str(path)!r} does not exist; pass JSON Lines with 'prompt' and 'response' keys")
    out = [_example_from_obj(obj, where) for where, obj in iter_jsonl(path)]
    if not out:
        raise ValueError(f"{path}: the file holds no examples")
    return out


def _example_from_obj(obj: object, where: str) -> tuple[Prompt, str]:
    if isinstance(obj, dict) and "messages" in obj and "prompt" not in obj:
        return split_conversation(obj["messages"], where, "messages")
    key = next((k for k in ("response", "completion", "chosen") if isinstance(obj, dict) and k in obj), None)
    if not isinstance(obj, dict) or "prompt" not in obj or key is None:
        raise ValueError(f"{where}: need 'prompt' and 'response' (or TRL's 'completion', or 'chosen'), or 'messages'")
    return as_prompt(obj["prompt"], where), as_completion(obj[key], where, key)


def _as_examples(examples) -> list[tuple[Prompt, str]]:
    if isinstance(examples, (str, os.PathLike)):
        return load_sft_examples(examples)
    out = []
    for i, ex in enumerate(dataset_rows(examples, "SFT examples")):
        if isinstance(ex, dict):
            out.append(_example_from_obj(ex, f"example {i}"))
            continue
        if hasattr(ex, "prompt") and hasattr(ex, "chosen"):  # a PreferencePair
            prompt, response = ex.prompt, ex.chosen
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            prompt, response = ex
        else:
            raise ValueError(f"example {i}: expected (prompt, response), a dict with 'prompt'/'response' or a PreferencePair")
        out.append((as_prompt(prompt, f"example {i}"), as_completion(response, f"example {i}", "response")))
    if not out:
        raise ValueError("no SFT examples given")
    return out


def encode_example(tokenizer, prompt: str, response: str, max_length: int, add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ EOS) and the number of leading prompt tokens.

    Longer inputs keep the response and lose the prompt's beginning (at least one prompt
    token stays, so the first response token has a context).
    """
    from rlhf_env.models import encode_prompt, encode_response

    p = encode_prompt(tokenizer, prompt)
    r = encode_response(tokenizer, response) + ([tokenizer.eos_token_id] if add_eos else [])
    return trim_tokens(p, r, max_length)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the positions where ``loss_mask`` is 1 (response tokens).

    :param logits: ``(batch, time, vocab)``
    :param input_ids: ``(batch, time)``
    :param loss_mask: ``(batch, time)``, 1 on tokens whose probability is trained
    """
    mask = loss_mask[:, 1:].bool()
    picked = logits[:, :-1][mask].float()
    return torch.nn.functional.cross_entropy(picked, input_ids[:, 1:][mask])


def train_sft(
    examples,
    model,
    tokenizer=None,
    config: Optional[SFTConfig] = None,
    output_dir: Union[str, os.PathLike, None] = None,
    log_dir: Union[str, os.PathLike, None] = None,
    run_name: str = "sft",
    device="cpu",
    dtype=None,
    progress: bool = True,
    checkpoint_dir: Union[str, os.PathLike, None] = None,
    checkpoint_every: Optional[int] = None,
    resume_from: Union[str, os.PathLike, None] = None,
    on_nonfinite: str = "raise",
):
    """Fine-tune a causal LM on (prompt, response) examples; loss on response tokens only.

    Under ``torchrun --nproc_per_node=N`` each rank trains on its share of every batch and
    the gradients are averaged, weighted by response tokens (see :mod:`rlhf_env.loop`);
    rank 0 logs and saves.

    :param examples: a JSON Lines path, or an iterable of ``(prompt, response)`` tuples,
        ``{"prompt", "response"}`` dicts or ``PreferencePair`` (their ``chosen``)
    :param model: a shipped name (``"smollm2-135m"``, ``"tiny"``), a model folder, or a loaded ``PreTrainedModel``
    :param tokenizer: the tokenizer when ``model`` is a loaded model
    :param config: hyperparameters (:class:`SFTConfig`)
    :param output_dir: if given, the model and tokenizer are saved there (atomically), a folder
        that ``load_lm(dir)`` and ``gym.make("TextRLHF-v0", model=dir)`` accept
    :param log_dir: TensorBoard root (``train/loss``); run in ``{log_dir}/{run_name}_{k}``
    :param device: torch device
    :param dtype: weights dtype when loading by name
    :param progress: show a progress bar
    :param checkpoint_dir: folder for resumable checkpoints (model, optimizer, data position, RNG)
    :param checkpoint_every: updates between checkpoints (None: at the end and on Ctrl-C/SIGTERM only)
    :param resume_from: a checkpoint file or folder to continue from (same data and batch size)
    :param on_nonfinite: ``"raise"`` (stop, naming the step and the last checkpoint) or ``"skip"`` the batch
    :return: ``(model, tokenizer)``, the model in eval mode; ``model.sft_metrics`` holds the
        mean loss of the last epoch (``train/loss``)
    """
    cfg = config or SFTConfig()
    check_config(cfg)
    examples = _as_examples(examples)
    gen = seed_everything(cfg.seed)
    device = setup_distributed(device)
    base_model = base_model_name(model)
    model, tokenizer = resolve_lm(model, tokenizer, device, dtype)
    encoded = [encode_example(tokenizer, p, r, cfg.max_length, cfg.add_eos) for p, r in examples]
    return _fit(encoded, model, tokenizer, cfg, gen, progress=progress, base_model=base_model, output_dir=output_dir,
                log_to=(log_dir, run_name), checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                resume_from=resume_from, on_nonfinite=on_nonfinite)


def trim_tokens(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """``prompt_ids + response_ids`` cut to ``max_length`` tokens as :func:`encode_example`
    cuts (the response kept, the prompt's beginning dropped first, at least one prompt token
    left), and the number of prompt tokens kept."""
    r = list(response_ids)[: max_length - 1]
    p = list(prompt_ids)[-(max_length - len(r)) :]
    return p + r, len(p)


def train_sft_tokens(
    sequences: list[tuple[list[int], int]],
    model,
    tokenizer,
    config: Optional[SFTConfig] = None,
    *,
    writer=None,
    first_step: int = 0,
    progress: bool = True,
    desc: str = "sft",
):
    """SFT of a loaded model on sequences already tokenised: ``(ids, prompt_length)`` pairs,
    the loss on ``ids[prompt_length:]``. For answers the model itself sampled (expert
    iteration), so it learns exactly the tokens drawn, EOS only where one was drawn, with
    no decode-and-retokenise round trip. ``config.add_eos`` and ``max_length`` do not apply
    (the sequences are final; :func:`trim_tokens` cuts them).

    :param writer: a TensorBoard ``SummaryWriter`` that gets ``train/loss`` (left open)
    :param first_step: the step of this call's first update in ``writer`` (rounds of one run
        continue one curve)
    :return: ``(model, tokenizer)`` in eval mode, ``model.sft_metrics`` as :func:`train_sft`'s
    """
    cfg = config or SFTConfig()
    check_config(cfg)
    if not sequences:
        raise ValueError("no sequences to train on")
    for ids, n_prompt in sequences:
        if not 1 <= n_prompt < len(ids):
            raise ValueError(f"a sequence needs at least one prompt token and one response token, got "
                             f"prompt length {n_prompt} of {len(ids)} tokens")
    return _fit(list(sequences), model, tokenizer, cfg, seed_everything(cfg.seed), progress=progress, writer=writer,
                first_step=first_step, desc=desc)


def _fit(encoded, model, tokenizer, cfg, gen, *, progress, base_model=None, output_dir=None, writer=None, log_to=None,
         first_step=0, checkpoint_dir=None, checkpoint_every=None, resume_from=None, on_nonfinite="raise", desc="sft"):
    """The SFT loop over ``(ids, prompt_length)`` sequences (see :func:`train_sft`): logs to
    ``writer`` (left open), or to a writer of its own in ``log_to = (log_dir, run_name)``."""
    from tqdm.auto import tqdm

    optimizer = adamw(model.parameters(), cfg.learning_rate, cfg.weight_decay)
    loop = TrainLoop("sft", model, optimizer, [len(e[0]) for e in encoded], cfg.batch_size, cfg.epochs, gen, None,
                     checkpoint_dir, checkpoint_every, resume_from, on_nonfinite)
    total = loop.total_steps
    main = distributed.is_main_process()  # rank 0 logs and saves
    own_writer = writer is None and log_to is not None and main
    if own_writer:
        writer = summary_writer(*log_to)
    pad_id = tokenizer.pad_token_id
    step = loop.step_count
    model.train()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress or not main)
    epoch_losses: list[float] = []
    for epoch in loop.epochs():
        epoch_losses = []
        for idx in loop.batches(epoch):
            idx, _ = loop.shard(idx)  # this rank's share of the global batch
            optimizer.zero_grad(set_to_none=True)
            if not idx:
                loop.step(None, 0)
                continue
            ids, mask = pad_right([encoded[i][0] for i in idx], pad_id, model.device)
            loss_mask = mask.clone()
            for row, i in enumerate(idx):
                loss_mask[row, : encoded[i][1]] = 0  # prompt tokens: context only
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = sft_loss(logits, ids, loss_mask)
            loss.backward()
            # the loss is a mean over response tokens: ranks weigh in by their token counts
            loop.step(loss, float(loss_mask[:, 1:].sum()))
            step = loop.step_count
            if writer is not None:
                writer.add_scalar("train/loss", loss.item(), first_step + step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_losses.append(loss.item())
    bar.close()
    if own_writer and writer is not None:
        writer.close()
    model.eval()
    model.sft_metrics = {"train/loss": sum(epoch_losses) / len(epoch_losses)} if epoch_losses else {}
    if output_dir is not None and main:
        save_lm(model, tokenizer, output_dir, {"algorithm": "SFT", "base_model": base_model, "hyperparameters": asdict(cfg)})
    return model, tokenizer
