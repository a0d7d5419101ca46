"""Training a reward model on preference pairs: :class:`RewardModelConfig`, the
Bradley-Terry loss and :func:`train_reward_model`.

Loss: ``-log sigmoid(s_chosen - s_rejected)`` (Bradley-Terry), averaged over a step's pairs.
Each distinct (prompt, response) input of a step is scored once (:class:`PairInputs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_env.agents import distributed
from rlhf_env.data import PreferencePair, as_pairs
from rlhf_env.loop import TrainLoop, check_config, setup_distributed
from rlhf_env.precision import autocast_context, resolve_autocast
from rlhf_env.reward_model import DEFAULT_BACKBONE, RewardModel
from rlhf_env.training import adamw, length_batches, pad_right, prompt_groups, seed_everything, step_examples, summary_writer


@dataclass
class RewardModelConfig:
    """Hyperparameters of :func:`train_reward_model`.

    :param learning_rate: AdamW learning rate (backbone and head)
    :param batch_size: preference pairs per step (each step runs 2 x batch_size inputs)
    :param epochs: passes over the training pairs
    :param max_length: longest input in tokens
    :param weight_decay: AdamW weight decay
    :param warmup_ratio: fraction of steps with a linear learning-rate warm-up (then linear decay)
    :param pooling: ``None`` (per kind), ``"first"``, ``"mean"`` or ``"last"``
    :param seed: seed for the head's initialisation and the data order
    :param eval_batch_size: inputs per forward pass in evaluation
    :param disable_dropout: turn the backbone's dropout off (as TRL does): the scores of
        chosen and rejected then come from the same network, and steps are cheaper
    :param group_by_prompt: a step takes whole prompts, all their pairs (about
        ``batch_size`` pairs a step on average), and scores each distinct response once
        (InstructGPT's "all comparisons of a prompt as one batch element"). The loss is the
        same mean over the step's pairs; ``False``: ``batch_size`` pairs drawn freely, both
        inputs of every pair scored (the pairwise computation, as TRL's ``RewardTrainer``)
    :param train_layers: train only the top ``train_layers`` blocks of an encoder backbone
        (and the head); the embeddings and the blocks below stay frozen and their output
        is computed once for every distinct input before training. ``None``: train all
    :param autocast: mixed precision of the training steps (:func:`resolve_autocast`):
        ``"off"`` (or ``None``, the default) is float32 throughout; ``"auto"`` runs the
        backbone's forward and backward under bfloat16 ``torch.autocast`` where the device
        computes bfloat16 natively (a CUDA GPU that supports it; a CPU with AMX or
        AVX512-BF16), float32 elsewhere; ``"bf16"`` forces it. The weights, the optimizer
        state, the pooling, the head and the loss stay float32; evaluation and
        :meth:`RewardModel.score` run in float32 either way. Float32 is this config's
        default because bf16, though faster, ranked the first default task's held-out pairs
        worse; the default task's reward model (``default_config()``) trains under
        ``"auto"``: on its current pairs bf16 ranked as many hand-written pairs right as
        float32 in less CPU time (docs/benchmarks.md, "Precision on the current pairs").
    :param eval_each_epoch: evaluate ``eval_pairs`` after every epoch (``eval/accuracy`` per
        epoch in TensorBoard); ``False``: after the last epoch only (the final number is the
        same; the default reward model's first use skips the earlier passes)
    """

    learning_rate: float = 5e-5
    batch_size: int = 16
    epochs: int = 2
    max_length: int = 256
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    pooling: Optional[str] = None
    seed: int = 0
    eval_batch_size: int = 64
    disable_dropout: bool = True
    group_by_prompt: bool = True
    train_layers: Optional[int] = None
    autocast: Optional[str] = "off"
    eval_each_epoch: bool = True


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """``mean(-log sigmoid(s_chosen - s_rejected))``."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def unique_inputs(pairs: Sequence[PreferencePair]) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """The distinct (prompt, response) inputs of a pair set and, for each pair, the index of
    its chosen and of its rejected input among them.

    Several responses sampled for one prompt make up to ``k(k-1)/2`` pairs from ``k``
    inputs: scoring each input once gives every pair's score at a fraction of the cost.

    :return: ``(inputs, chosen_index, rejected_index)`` (long tensors of shape ``(len(pairs),)``)
    """
    index: dict[tuple[str, str], int] = {}
    c = [index.setdefault((p.prompt, p.chosen), len(index)) for p in pairs]
    r = [index.setdefault((p.prompt, p.rejected), len(index)) for p in pairs]
    return list(index), torch.tensor(c, dtype=torch.long), torch.tensor(r, dtype=torch.long)


class PairInputs:
    """A pair set's distinct inputs, tokenised once, scored once per use.

    :param rm: the reward model (its tokenizer and ``max_length``)
    :param pairs: the preference pairs
    :param frozen_layers: when > 0, the hidden states after the embeddings and the first
        ``frozen_layers`` blocks (frozen in training) are computed once here, without
        gradient, and every later :meth:`scores` runs only the blocks above them
    :param batch_size: inputs per forward pass when computing those states
    """

    def __init__(self, rm: "RewardModel", pairs: Sequence[PreferencePair], frozen_layers: int = 0, batch_size: int = 64):
        self.rm, self.frozen_layers = rm, int(frozen_layers)
        keys, self.chosen, self.rejected = unique_inputs(pairs)
        self.prompts = [k[0] for k in keys]
        self.seqs = rm.encode_batch(self.prompts, [k[1] for k in keys])
        self.features: Optional[list[torch.Tensor]] = None
        if self.frozen_layers > 0:
            self.features = [None] * len(self.seqs)
            was_training = rm.training
            rm.eval()  # the frozen trunk runs without dropout
            with torch.no_grad():
                for idx in length_batches([len(s) for s in self.seqs], batch_size, shuffle=False):
                    ids, mask = pad_right([self.seqs[i] for i in idx], rm.tokenizer.pad_token_id, rm.device)
                    hidden = rm.hidden_after(ids, mask, self.frozen_layers)
                    for row, i in enumerate(idx):
                        self.features[i] = hidden[row, : len(self.seqs[i])].clone()
            rm.train(was_training)

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> list[int]:
        """Each pair's longer input, in tokens."""
        n = [len(s) for s in self.seqs]
        return [max(n[c], n[r]) for c, r in zip(self.chosen.tolist(), self.rejected.tolist())]

    def groups(self) -> list[list[int]]:
        """Pair indices grouped by prompt, in order of first appearance."""
        return prompt_groups([self.prompts[c] for c in self.chosen.tolist()])

    def input_scores(self, inputs: Sequence[int]) -> torch.Tensor:
        """Differentiable scores of the given distinct inputs, in one padded forward."""
        rm = self.rm
        if self.features is None:
            ids, mask = pad_right([self.seqs[i] for i in inputs], rm.tokenizer.pad_token_id, rm.device)
            return rm.forward_ids(ids, mask)
        feats = [self.features[i] for i in inputs]
        width = max(f.shape[0] for f in feats)
        hidden = feats[0].new_zeros(len(feats), width, feats[0].shape[-1])
        mask = torch.zeros(len(feats), width, dtype=torch.long, device=hidden.device)
        for row, f in enumerate(feats):
            hidden[row, : f.shape[0]] = f
            mask[row, : f.shape[0]] = 1
        return rm.score_hidden(hidden, mask, self.frozen_layers)

    def scores(self, pair_idx: Sequence[int], dedup: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen_scores, rejected_scores)`` of the given pairs.

        :param dedup: score each distinct input once; ``False``: both inputs of every pair,
            ``2 * len(pair_idx)`` in all (the pairwise computation)
        """
        pair_idx = torch.as_tensor(list(pair_idx), dtype=torch.long)
        c, r = self.chosen[pair_idx], self.rejected[pair_idx]
        if not dedup:
            scores = self.input_scores(torch.cat([c, r]).tolist())
            return scores[: len(pair_idx)], scores[len(pair_idx) :]
        needed, inverse = torch.unique(torch.cat([c, r]), return_inverse=True)
        scores = self.input_scores(needed.tolist())
        return scores[inverse[: len(pair_idx)]], scores[inverse[len(pair_idx) :]]

    @torch.no_grad()
    def accuracy(self, batch_size: int = 64) -> float:
        """Fraction of the pairs whose chosen input scores higher (model in eval mode)."""
        was_training = self.rm.training
        self.rm.eval()
        try:
            order = length_batches([len(s) for s in self.seqs], batch_size, shuffle=False)
            scores = torch.empty(len(self.seqs))
            for idx in order:
                scores[idx] = self.input_scores(idx).float().cpu()
        finally:
            self.rm.train(was_training)
        return float((scores[self.chosen] > scores[self.rejected]).float().mean())


def train_reward_model(
    pairs: Union[str, os.PathLike, Iterable],
    backbone: Union[str, os.PathLike, RewardModel, None] = DEFAULT_BACKBONE,
    eval_pairs: Union[str, os.PathLike, Iterable, None] = None,
    config: Optional[RewardModelConfig] = None,
    output_dir: Union[str, os.PathLike, None] = None,
    log_dir: Union[str, os.PathLike, None] = None,
    run_name: str = "reward_model",
    device="cpu",
    dtype=None,
    progress: bool = True,
    checkpoint_dir: Union[str, os.PathLike, None] = None,
    checkpoint_every: Optional[int] = None,
    resume_from: Union[str, os.PathLike, None] = None,
    on_nonfinite: str = "raise",
) -> RewardModel:
    """Train a reward model on preference pairs with the Bradley-Terry loss.

    Under ``torchrun --nproc_per_node=N`` each rank trains on its share of every batch and
    the gradients are averaged (see :mod:`rlhf_env.loop`); rank 0 logs and saves.

    Each step scores the distinct inputs of its pairs in one forward pass (a response
    shared by several pairs once) and minimises the mean of ``-log sigmoid(s_chosen -
    s_rejected)`` over the step's pairs. See :class:`RewardModelConfig` for grouping pairs
    by prompt and for training only the top blocks over a frozen, precomputed trunk.

    :param pairs: a JSON Lines path or an iterable of pairs (``PreferencePair``, dicts, tuples)
    :param backbone: a backbone name or folder (see :func:`load_backbone`) or a ``RewardModel`` to fine-tune
    :param eval_pairs: held-out pairs, evaluated after every epoch (``eval/accuracy``)
    :param config: hyperparameters (:class:`RewardModelConfig`)
    :param output_dir: if given, the trained model is saved there (atomically)
    :param log_dir: TensorBoard root; the run goes to ``{log_dir}/{run_name}_{k}``
    :param run_name: TensorBoard run name
    :param device: torch device
    :param dtype: backbone dtype (``None``: float32)
    :param progress: show a progress bar
    :param checkpoint_dir: folder for resumable checkpoints (model, optimizer, schedule, data position, RNG)
    :param checkpoint_every: updates between checkpoints (None: at the end and on Ctrl-C/SIGTERM only)
    :param resume_from: a checkpoint file or folder to continue from (same data and batch size)
    :param on_nonfinite: ``"raise"`` (stop, naming the step and the last checkpoint) or ``"skip"`` the batch
    :return: the trained model (in eval mode); ``model.metrics`` holds the final train/eval numbers
    """
    from tqdm.auto import tqdm

    cfg = config or RewardModelConfig()
    check_config(cfg)
    resolve_autocast(cfg.autocast, "cpu")  # refuse a bad setting before loading anything
    pairs = as_pairs(pairs)
    eval_pairs = as_pairs(eval_pairs) if eval_pairs is not None else None
    gen = seed_everything(cfg.seed)
    device = setup_distributed(device)
    if isinstance(backbone, RewardModel):
        rm = backbone.to(device)
    else:
        rm = RewardModel.from_backbone(backbone, cfg.pooling, cfg.max_length, device, dtype, cfg.seed)
    amp_dtype = resolve_autocast(cfg.autocast, rm.device)
    if amp_dtype is not None and rm.head.weight.dtype == amp_dtype:
        amp_dtype = None  # weights already in that dtype: nothing to autocast
    if cfg.disable_dropout:
        for module in rm.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    frozen = 0
    if cfg.train_layers is not None:
        n_layers = len(rm.encoder_layers())
        if isinstance(cfg.train_layers, bool) or not isinstance(cfg.train_layers, int) or not 0 <= cfg.train_layers <= n_layers:
            raise ValueError(f"train_layers must be an integer in 0..{n_layers} (this backbone's blocks) or None, got {cfg.train_layers!r}")
        frozen = n_layers - cfg.train_layers
    frozen_params = []
    if frozen:
        parts = rm.encoder_parts()
        frozen_params = [p for p in parts["embed"].parameters()] + [p for layer in parts["layers"][:frozen] for p in layer.parameters()]
        frozen_params = [p for p in frozen_params if p.requires_grad]
        for p in frozen_params:
            p.requires_grad_(False)
    train_inputs = PairInputs(rm, pairs, frozen, cfg.eval_batch_size)  # tokenised (and lower blocks run) once
    eval_inputs = PairInputs(rm, eval_pairs, frozen, cfg.eval_batch_size) if eval_pairs is not None else None
    # an example is a prompt with all its pairs (group_by_prompt), else one pair
    examples, per_step, lengths = step_examples(train_inputs.groups() if cfg.group_by_prompt else None,
                                                train_inputs.lengths(), cfg.batch_size)
    total = -(-len(examples) // per_step) * cfg.epochs
    optimizer = adamw([p for p in rm.parameters() if p.requires_grad], cfg.learning_rate, cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    loop = TrainLoop("reward_model", rm, optimizer, lengths, per_step, cfg.epochs, gen, scheduler,
                     checkpoint_dir, checkpoint_every, resume_from, on_nonfinite)
    main = distributed.is_main_process()  # rank 0 logs and saves
    writer = summary_writer(log_dir, run_name) if main else None
    metrics: dict = {}
    step = loop.step_count
    bar = tqdm(total=total, initial=step, desc="reward model", disable=not progress or not main)
    rm.train()
    try:
        for epoch in loop.epochs():
            for idx in loop.batches(epoch):
                idx, _ = loop.shard(idx)  # this rank's share of the global batch
                pair_idx = [i for ex in idx for i in examples[ex]]
                optimizer.zero_grad(set_to_none=True)
                if not pair_idx:
                    loop.step(None, 0.0)
                    continue
                with autocast_context(rm.device, amp_dtype):
                    chosen_scores, rejected_scores = train_inputs.scores(pair_idx, dedup=cfg.group_by_prompt)
                loss = bradley_terry_loss(chosen_scores, rejected_scores)  # float32 scores, float32 loss
                loss.backward()
                loop.step(loss, float(len(pair_idx)))  # all-reduce (weighted by pairs), NaN guard, optimizer and schedule step, checkpoint
                step = loop.step_count
                margin = (chosen_scores - rejected_scores).detach()
                acc = float((margin > 0).float().mean())
                if writer is not None:
                    writer.add_scalar("train/loss", loss.item(), step)
                    writer.add_scalar("train/accuracy", acc, step)
                    writer.add_scalar("train/margin", margin.mean().item(), step)
                    writer.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], step)
                metrics.update({"train/loss": loss.item(), "train/accuracy": acc})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if eval_inputs is not None and (cfg.eval_each_epoch or epoch == cfg.epochs - 1):
                eval_acc = eval_inputs.accuracy(cfg.eval_batch_size)
                metrics["eval/accuracy"] = eval_acc
                if writer is not None:
                    writer.add_scalar("eval/accuracy", eval_acc, step)
                bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.3f}", eval_acc=f"{eval_acc:.3f}")
    finally:
        for p in frozen_params:  # the returned model is whole again
            p.requires_grad_(True)
    bar.close()
    if writer is not None:
        writer.close()
    rm.eval()
    rm.metrics = metrics
    if output_dir is not None and main:
        rm.save(output_dir)
    return rm
