"""Direct Preference Optimisation (DPO, Rafailov et al. 2023).

For a pair (prompt x, chosen y_w, rejected y_l), with ``log pi(y|x)`` the summed
log-probability of the response tokens (EOS included) and ``pi_ref`` the frozen reference:

    chosen_rewards   = beta * (log pi(y_w|x) - log pi_ref(y_w|x))
    rejected_rewards = beta * (log pi(y_l|x) - log pi_ref(y_l|x))
    loss             = -log sigmoid(chosen_rewards - rejected_rewards)

The reference never changes, so its log-probabilities are computed once, before training,
under ``no_grad`` (with ``reference=None`` the reference is the policy's starting point,
so no second model is kept in memory), once per distinct sequence (a response that appears
in several pairs is scored once). Each step runs chosen and rejected in one right-padded
forward pass.

With ``trainable_layers=k`` the lower blocks never change, so (``keep_trunk=True``, the
default, for Llama-like models) the hidden state entering the top ``k`` blocks is computed
once per distinct sequence and kept (:mod:`envs.trunk_states`); every step, the
reference log-probabilities (``reference=None``) and the held-out evaluation run only the
top blocks, the norm and the head (the head only at response tokens). Exact: the same
log-probabilities as full forwards up to float rounding. Memory: about
``distinct sequences x length x hidden`` floats (SmolLM2-135M, default task: ~0.3 GB).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from rlhf_env.agents import distributed
from rlhf_env.agents.lora import ALL_LINEAR_TARGETS, apply_lora, merge_lora
from rlhf_env.data import as_pairs
from rlhf_env.envs.decoder import decoder_blocks
from rlhf_env.envs.trunk_states import FrozenTrunk
from rlhf_env.loop import TrainLoop, check_config, setup_distributed
from rlhf_env.sft import encode_example
from rlhf_env.training import (
    adamw,
    base_model_name,
    length_batches,
    pad_right,
    prompt_groups,
    resolve_lm,
    save_lm,
    seed_everything,
    sequence_logprobs,
    step_examples,
    summary_writer,
    train_last_layers,
)


@dataclass
class DPOConfig:
    """Hyperparameters of :func:`train_dpo`.

    The defaults (the last 2 blocks and the norm, lr 5e-5, beta 0.1, 2 epochs, whole prompts
    per step) are for SmolLM2-135M-Instruct on the default task on a CPU. The learning rate is
    judged by what the policy writes on held-out prompts (:func:`rlhf_env.evaluate.evaluate`),
    not by implicit-reward accuracy, which rewards separating the pairs and does not see the
    policy drift: at 1e-4 the policy reached a KL of 4.8-8.3 nats per response within 100
    updates and lost relevance and tone; at 5e-5 a full run (2 epochs, 564 updates) ends at
    6.8 nats with relevance up and distinct-2 down 0.04 (0.01 after the first epoch), on the
    ``default-v5`` pairs.
    docs/benchmarks.md ("DPO on the default task", "DPO's default learning rate") has the
    settings tried.

    :param beta: strength of the implicit KL constraint to the reference
    :param learning_rate: AdamW learning rate
    :param batch_size: preference pairs per step (with ``group_by_prompt``: on average, in whole
        prompts; without: exactly, each step running 2 x batch_size sequences)
    :param epochs: passes over the pairs
    :param max_length: longest sequence in tokens (the prompt's start is cut first)
    :param weight_decay: AdamW weight decay
    :param seed: seed for the data order
    :param eval_batch_size: pairs per forward pass when computing log-probabilities without gradients
    :param trainable_layers: train only the last N transformer blocks and the final norm
        (``None``: all weights, embeddings and head included); much cheaper on CPU
    :param keep_trunk: with ``trainable_layers``, compute the frozen lower blocks once per
        sequence and run only the top blocks afterwards (exact; ignored for models
        :mod:`envs.trunk_states` does not support)
    :param group_by_prompt: a step takes whole prompts, all their pairs (about
        ``batch_size`` pairs a step on average, at least one prompt), and runs each distinct
        response of the step once (the loss is the same mean over the step's pairs); with
        several pairs per prompt this costs far fewer forwards per epoch. ``False``:
        ``batch_size`` pairs drawn freely, chosen and rejected of every pair run
    :param lora_rank: train LoRA adapters of this rank (``peft``) on ``lora_targets`` instead of
        the weights themselves: in every block, or in the last ``trainable_layers`` blocks when
        that is set (the kept trunk then applies as usual). The adapters are merged into the
        weights at the end, so the returned and saved model is a plain Hugging Face model.
        ``None``: no adapters
    :param lora_alpha: LoRA scaling numerator (``None``: ``2 * lora_rank``)
    :param lora_targets: names of the linear layers that get adapters (default: every linear
        layer of a Llama-like block)
    """

    beta: float = 0.1
    learning_rate: float = 5e-5
    batch_size: int = 8
    epochs: int = 2
    max_length: int = 256
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 16
    trainable_layers: Optional[int] = 2
    keep_trunk: bool = True
    group_by_prompt: bool = True
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_targets: tuple[str, ...] = ALL_LINEAR_TARGETS


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss as in the paper.

    :return: ``(loss, chosen_rewards, rejected_rewards)``; the rewards are the implicit
        rewards ``beta * log(pi/pi_ref)``, detached
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class _EncodedPairs:
    """Chosen and rejected sequences of each pair, with response masks.

    ``chosen[i]``/``rejected[i]`` are ``(token ids, prompt length)``; ``slots`` maps every
    sequence (chosen rows, then rejected rows) to its index among the distinct sequences
    ``distinct``. After :meth:`keep_trunk`, the trunk's model is scored from the kept hidden states.
    """

    def __init__(self, pairs, tokenizer, max_length: int):
        self.chosen = [encode_example(tokenizer, p.prompt, p.chosen, max_length) for p in pairs]
        self.rejected = [encode_example(tokenizer, p.prompt, p.rejected, max_length) for p in pairs]
        self.lengths = [max(len(c[0]), len(r[0])) for c, r in zip(self.chosen, self.rejected)]
        self.prompts = [p.prompt for p in pairs]
        self.pad_id = tokenizer.pad_token_id
        unique: dict = {}
        self.slots = [unique.setdefault((tuple(ids), n), len(unique)) for ids, n in self.chosen + self.rejected]
        self.distinct = [(list(ids), n) for ids, n in unique]
        self.trunk: Optional[FrozenTrunk] = None
        self.kept: Optional[list[torch.Tensor]] = None  # per distinct sequence

    def __len__(self) -> int:
        return len(self.chosen)

    def keep_trunk(self, trunk: FrozenTrunk, batch_size: int, desc: Optional[str] = None) -> None:
        """Compute and keep the frozen trunk's output of every distinct sequence."""
        self.kept = trunk.keep([ids for ids, _ in self.distinct], self.pad_id, batch_size, desc)
        self.trunk = trunk

    @staticmethod
    def _tensors(seqs, pad_id, device):
        ids, mask = pad_right([s[0] for s in seqs], pad_id, device)
        loss_mask = mask.clone()
        for row, (_, prompt_len) in enumerate(seqs):
            loss_mask[row, :prompt_len] = 0
        return ids, mask, loss_mask

    def batch(self, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, loss_mask)`` of chosen rows then rejected rows."""
        return self._tensors([self.chosen[i] for i in idx] + [self.rejected[i] for i in idx], self.pad_id, device)

    def groups(self) -> list[list[int]]:
        """Pair indices grouped by prompt, in order of first appearance."""
        return prompt_groups(self.prompts)

    def logprobs(self, model, idx: list[int], device, dedup: bool = False) -> torch.Tensor:
        """Summed response log-probabilities of the chosen rows then the rejected rows of
        pairs ``idx`` (with gradients when enabled); with ``dedup`` a sequence that occurs in
        several of the pairs runs once."""
        slots = [self.slots[i] for i in idx] + [self.slots[len(self) + i] for i in idx]
        if not dedup:
            return self._sequence_logprobs(model, slots, device)
        distinct = sorted(set(slots))
        where = {j: row for row, j in enumerate(distinct)}
        return self._sequence_logprobs(model, distinct, device)[torch.tensor([where[j] for j in slots])]

    def _sequence_logprobs(self, model, slots: list[int], device) -> torch.Tensor:
        ids, mask, loss_mask = self._tensors([self.distinct[j] for j in slots], self.pad_id, device)
        if self.kept is None or model is not self.trunk.model:  # another model (a reference): full forward
            return sequence_logprobs(model, ids, mask, loss_mask)
        hidden = FrozenTrunk.pad([self.kept[j] for j in slots], ids.shape[1])
        return self.trunk.logprobs(hidden, mask, ids, loss_mask)


@torch.no_grad()
def _all_logprobs(model, data: _EncodedPairs, batch_size: int, device, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities of every chosen and rejected sequence (no grad), each
    distinct sequence once: from the kept trunk when ``model`` is its model, else full forwards.

    :param desc: progress-bar label (``None``: no bar)
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    scores = torch.empty(len(data.distinct))
    batches = length_batches([len(ids) for ids, _ in data.distinct], batch_size, shuffle=False)
    try:
        for slots in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            scores[slots] = data._sequence_logprobs(model, slots, device).float().cpu()
    finally:
        model.train(was_training)
    per_row = scores[torch.tensor(data.slots)]
    return per_row[: len(data)], per_row[len(data) :]


def train_dpo(
    pairs,
    model,
    reference=None,
    beta: Optional[float] = None,
    tokenizer=None,
    config: Optional[DPOConfig] = None,
    eval_pairs=None,
    output_dir: Union[str, os.PathLike, None] = None,
    log_dir: Union[str, os.PathLike, None] = None,
    run_name: str = "dpo",
    device="cpu",
    dtype=None,
    progress: bool = True,
    checkpoint_dir: Union[str, os.PathLike, None] = None,
    checkpoint_every: Optional[int] = None,
    resume_from: Union[str, os.PathLike, None] = None,
    on_nonfinite: str = "raise",
    callback: Optional[Callable[[int, dict], Optional[bool]]] = None,
):
    """Train a causal LM with DPO on preference pairs.

    Under ``torchrun --nproc_per_node=N`` each rank trains on its share of every batch and
    the gradients are averaged (see :mod:`rlhf_env.loop`); rank 0 logs and saves.

    :param pairs: a JSON Lines path or an iterable of pairs (``PreferencePair``, dicts, tuples)
    :param model: the policy: a shipped name, a model folder, or a loaded ``PreTrainedModel``
    :param reference: the frozen reference (name, folder or loaded model; same tokenizer);
        ``None`` means the policy as it is before training
    :param beta: overrides ``config.beta`` (default 0.1)
    :param tokenizer: the tokenizer when ``model`` is a loaded model
    :param config: hyperparameters (:class:`DPOConfig`)
    :param eval_pairs: held-out pairs; their implicit-reward accuracy is logged after each
        epoch (``eval/rewards/accuracy``, also ``eval/accuracy``)
    :param output_dir: if given, the policy and tokenizer are saved there (atomically), a folder
        that ``load_lm(dir)`` and ``gym.make("TextRLHF-v0", model=dir)`` accept
    :param log_dir: TensorBoard root; run in ``{log_dir}/{run_name}_{k}``; tags ``train/loss``,
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin`` (the last two
        also as ``train/accuracy`` and ``train/margin``, the reward model's names)
    :param device: torch device
    :param dtype: weights dtype when loading by name
    :param progress: show a progress bar
    :param checkpoint_dir: folder for resumable checkpoints (model, optimizer, data position, RNG)
    :param checkpoint_every: updates between checkpoints (None: at the end and on Ctrl-C/SIGTERM only)
    :param resume_from: a checkpoint file or folder to continue from (same data and batch size)
    :param on_nonfinite: ``"raise"`` (stop, naming the step and the last checkpoint) or ``"skip"`` the batch
    :param callback: called after every update as ``callback(step, metrics)`` (this rank's metrics of
        that step); returning ``False`` stops training there, as an SB3 callback's ``_on_step`` does (a time
        budget, early stopping, an evaluation every so often: the model is ``train_dpo``'s own, in
        training mode, and may be evaluated in between)
    :return: ``(model, tokenizer)``, the model in eval mode; ``model.dpo_metrics`` holds the last metrics
    """
    from tqdm.auto import tqdm

    cfg = config or DPOConfig()
    check_config(cfg)
    beta = cfg.beta if beta is None else beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a number > 0 (the DPO temperature), got {beta!r}")
    beta = float(beta)
    pairs = as_pairs(pairs)
    eval_pairs = as_pairs(eval_pairs) if eval_pairs is not None else None
    gen = seed_everything(cfg.seed)
    device = setup_distributed(device)
    base_model = base_model_name(model)
    model, tokenizer = resolve_lm(model, tokenizer, device, dtype)
    data = _EncodedPairs(pairs, tokenizer, cfg.max_length)
    eval_data = _EncodedPairs(eval_pairs, tokenizer, cfg.max_length) if eval_pairs else None

    if cfg.lora_rank is not None:  # adapters only; in the last trainable_layers blocks when set
        n_blocks = len(decoder_blocks(model))
        top = None if cfg.trainable_layers is None else range(n_blocks - cfg.trainable_layers, n_blocks)
        apply_lora(model, r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, layers=top)
    else:
        train_last_layers(model, cfg.trainable_layers)
    # the frozen lower blocks: once per distinct sequence (exact; see envs.trunk_states)
    trunk = FrozenTrunk.build(model, cfg.trainable_layers) if cfg.keep_trunk else None
    if trunk is not None:
        for d, label in ((data, "frozen trunk"), (eval_data, "frozen trunk (eval)")):
            if d is not None:
                d.keep_trunk(trunk, cfg.eval_batch_size, label if progress else None)

    # reference log-probs: once, before any update (the reference is frozen)
    ref_model = model if reference is None else resolve_lm(reference, tokenizer, device, dtype)[0]
    ref_chosen, ref_rejected = _all_logprobs(ref_model, data, cfg.eval_batch_size, device, "reference log-probs" if progress else None)
    if eval_data is not None:
        eval_ref = _all_logprobs(ref_model, eval_data, cfg.eval_batch_size, device, "reference log-probs (eval)" if progress else None)
    if ref_model is not model:
        del ref_model

    # an example is a prompt with all its pairs (group_by_prompt), else one pair
    examples, per_step, lengths = step_examples(data.groups() if cfg.group_by_prompt else None, data.lengths, cfg.batch_size)
    optimizer = adamw(model.parameters(), cfg.learning_rate, cfg.weight_decay)
    loop = TrainLoop("dpo", model, optimizer, lengths, per_step, cfg.epochs, gen, None,
                     checkpoint_dir, checkpoint_every, resume_from, on_nonfinite)
    main = distributed.is_main_process()  # rank 0 logs and saves
    writer = summary_writer(log_dir, run_name) if main else None
    total = loop.total_steps
    metrics: dict = {}
    step = loop.step_count
    model.train()
    bar = tqdm(total=total, initial=step, desc="dpo", disable=not progress or not main)
    stopped = False
    for epoch in loop.epochs():
        for idx in loop.batches(epoch):
            idx, _ = loop.shard(idx)  # this rank's share of the global batch
            idx = [i for ex in idx for i in examples[ex]]
            weight = float(len(idx))
            optimizer.zero_grad(set_to_none=True)
            if not idx:
                loop.step(None, weight)
                continue
            logps = data.logprobs(model, idx, model.device, dedup=cfg.group_by_prompt)
            policy_chosen, policy_rejected = logps[: len(idx)], logps[len(idx) :]
            loss, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, ref_chosen[idx].to(logps.device), ref_rejected[idx].to(logps.device), beta
            )
            loss.backward()
            loop.step(loss, weight)  # all-reduce, NaN guard, optimizer step, checkpoint
            step = loop.step_count
            margins = chosen_rewards - rejected_rewards
            metrics = {
                "train/loss": loss.item(),
                "rewards/chosen": chosen_rewards.mean().item(),
                "rewards/rejected": rejected_rewards.mean().item(),
                "rewards/accuracy": (margins > 0).float().mean().item(),
                "rewards/margin": margins.mean().item(),
            }
            if writer is not None:
                for tag, value in metrics.items():
                    writer.add_scalar(tag, value, step)
                # the design card's names for the same two numbers (the reward model logs these)
                writer.add_scalar("train/accuracy", metrics["rewards/accuracy"], step)
                writer.add_scalar("train/margin", metrics["rewards/margin"], step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{metrics['rewards/accuracy']:.2f}")
            if callback is not None and callback(step, dict(metrics)) is False:
                stopped = True
                break
        if stopped:
            loop.save()  # the checkpoint the end of training writes (with checkpoint_dir)
            break
        if eval_data is not None:
            eval_acc = implicit_reward_accuracy(model, eval_data, eval_ref, beta, cfg.eval_batch_size, device)
            metrics["eval/rewards/accuracy"] = eval_acc
            if writer is not None:
                writer.add_scalar("eval/rewards/accuracy", eval_acc, step)
                writer.add_scalar("eval/accuracy", eval_acc, step)
            bar.set_postfix(loss=f"{loss.item():.3f}", eval_acc=f"{eval_acc:.3f}")
    bar.close()
    if writer is not None:
        writer.close()
    if cfg.lora_rank is not None:
        merge_lora(model)  # a plain model again: what save_lm writes and load_lm reads back
    model.eval()
    model.dpo_metrics = metrics
    if output_dir is not None and main:
        save_lm(model, tokenizer, output_dir, {"algorithm": "DPO", "base_model": base_model,
                                               "reference": base_model_name(reference) if reference is not None else base_model,
                                               "hyperparameters": {**asdict(cfg), "beta": beta}})
    return model, tokenizer


def implicit_reward_accuracy(model, data: _EncodedPairs, reference_logps, beta: float, batch_size: int, device) -> float:
    """Fraction of pairs whose implicit reward ``beta*log(pi/pi_ref)`` ranks chosen above rejected."""
    chosen, rejected = _all_logprobs(model, data, batch_size, device)
    margins = beta * ((chosen - reference_logps[0]) - (rejected - reference_logps[1]))
    return float((margins > 0).float().mean())


def evaluate_dpo(model, reference, pairs, tokenizer=None, beta: float = 0.1, max_length: int = 256, batch_size: int = 16, device="cpu") -> float:
    """Held-out implicit-reward accuracy of a DPO-trained ``model`` against ``reference``.

    :param model: policy (name, folder or loaded model)
    :param reference: reference (name, folder or loaded model)
    :param pairs: preference pairs (path or iterable)
    :return: the fraction of pairs ranked right
    """
    model, tokenizer = resolve_lm(model, tokenizer, device)
    reference, _ = resolve_lm(reference, tokenizer, device)
    data = _EncodedPairs(as_pairs(pairs), tokenizer, max_length)
    ref = _all_logprobs(reference, data, batch_size, device)
    return implicit_reward_accuracy(model, data, ref, beta, batch_size, device)
