"""Shared language-model machinery of the text environments and the LM policy.

:class:`LMCore` owns the trainable actor, the frozen reference, the tokenizer and the
sampling configuration (temperature, top-k) that defines the policy's distribution.
:class:`Contexts` holds ``N`` token contexts with one batched KV cache per model and
advances all of them with ONE incremental forward of the actor and ONE of the
reference; the single env uses it with ``N = 1`` and the vector env with ``N = num_envs``,
so both charge bit-for-bit the same computation.

Layout of the batched KV cache: rows are right-aligned (left padding). ``mask[i, j]`` is 1
where column ``j`` of row ``i`` holds a real token; positions are passed explicitly
(``position_ids`` = number of real tokens before the token), so a row's keys keep their
rotary positions wherever its columns sit. A reset writes the prefilled KV of the new
prompt into its row (the cache grows on the left when the prompt is longer than the
others) and all-pad leading columns are trimmed.

Sharing the actor forward with the policy: after every forward the env stores the
actor's last hidden state and next-token logits of each new context in
:attr:`LMCore.step_cache`, keyed by the exact token ids and stamped with the actor's
weight version (:meth:`LMCore.version`: optimizer steps counted by the LM policy's
optimizer hook, plus the parameters' in-place ``_version`` counters, which
``load_state_dict`` and any in-place write bump). The policy reaches the core through the
explicit handle its observation space carries (:class:`LMHandle`); its no-grad forward on
the env's observation is then a lookup; a miss (training minibatches, a foreign
observation, or a stale version) is a full forward without cache, and never changes the
env. When the env sees that the actor's version changed since it built its actor KV
cache (an update mid-episode), it re-prefills its contexts at its next step (or when
its owner calls :meth:`Contexts.refresh`), so the log-probabilities it charges stay
exact for the current actor.

The reference on the actor's trunk: when the actor's embeddings and lower blocks are
frozen and identical to the reference's (the LM policy's ``train_layers=k``), the env runs
only the reference's top blocks on the actor's hidden state (``reference_share="auto"``,
the default; exact, see :mod:`envs.reference`).

Sharing: text envs built in one process on the same actor module, reference and sampling
configuration share one core (``shared_model=True``), so the N envs of a ``DummyVecEnv`` /
``SyncVectorEnv`` act with the one actor the policy trains. Envs in other processes
(``SubprocVecEnv``, ``AsyncVectorEnv``) hold their own copies, which the policy cannot
train: use ``DummyVecEnv``, ``gym.make_vec`` (the batched env) or
:class:`envs.wrappers.SB3VecEnv`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from envs.kl import kl_estimate
from envs.trunk_states import capture_block_input

KL_ESTIMATORS = ("k1", "k3", "full")

# Masked (top-k) logits use the most negative finite float instead of -inf, so that
# probabilities are exactly 0 while entropies and KL sums stay finite (0 * -inf is nan).
_MASKED = torch.finfo(torch.float32).min

# actor module -> (id of the reference module, temperature, top_k) -> the core built on them,
# so that the envs of one process built on one module share one core (shared_model=True);
# weak on both sides: a core dies with its last env / policy
_CORES_OF: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakValueDictionary[tuple, LMCore]]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------
# sampling distribution


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Logits of the policy's sampling distribution: float32, divided by ``temperature``,
    and, when ``top_k > 0``, every token outside the ``top_k`` largest set to the most
    negative float (probability exactly 0).

    :param logits: raw next-token logits, shape (..., vocab)
    :param temperature: softmax temperature (> 0)
    :param top_k: keep only the ``top_k`` most likely tokens; 0 keeps all
    """
    scaled = logits.float() / temperature
    if top_k and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, _MASKED)
    return scaled


def sampling_log_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """``log_softmax`` of :func:`sampling_logits` (the log-probabilities the env charges)."""
    return torch.log_softmax(sampling_logits(logits, temperature, top_k), dim=-1)


def kl_terms(
    actor_logp: torch.Tensor, ref_logp: torch.Tensor, actions: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(logprob, ref_logprob, kl)`` of ``actions`` given full log-prob rows.

    ``k1 = log pi(a) - log ref(a)``; ``k3 = (exp(r) - 1) - r`` with ``r = log ref(a) - log pi(a)``;
    ``full = sum_v pi(v) (log pi(v) - log ref(v))`` (exact KL of the next-token distributions).
    """
    logprob = actor_logp.gather(-1, actions[:, None]).squeeze(-1)
    ref_logprob = ref_logp.gather(-1, actions[:, None]).squeeze(-1)
    if estimator in ("k1", "k3"):
        kl = kl_estimate(ref_logprob - logprob, estimator)
    elif estimator == "full":
        probs = actor_logp.exp()
        # tokens outside the actor's top-k have probability 0 and contribute nothing
        kl = torch.where(probs > 0, probs * (actor_logp - ref_logp), torch.zeros_like(probs)).sum(-1)
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return logprob, ref_logprob, kl


def params_version(parameters: Sequence[torch.Tensor]) -> int:
    """Sum of the in-place version counters of ``parameters``: changes whenever an optimizer
    step, ``load_state_dict`` or any in-place write touches one of them."""
    return sum(p._version for p in parameters)


# ---------------------------------------------------------------------------------------
# forwards


def _padded_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of integer sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def prefill(
    model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, use_cache: bool = True, hidden: bool = True
) -> dict[str, Any]:
    """One full forward of ``model`` over left-padded ``seqs`` (explicit positions).

    :return: dict with ``logits`` (raw next-token logits of the last token, (n, vocab)),
        ``hidden`` (last-layer hidden state of the last token, (n, H), if ``hidden``),
        ``mask`` ((n, P) long) and, with ``use_cache``, ``kv``: per layer ``(keys, values)``
        of shape (n, heads, P, head_dim) with the padding columns zeroed (a fully masked
        query can produce non-finite states, which must not leak into the cache).
    """
    device = next(model.parameters()).device
    ids, mask = _padded_batch(seqs, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=use_cache,
        output_hidden_states=hidden,
        logits_to_keep=1,
    )
    result: dict[str, Any] = {"logits": out.logits[:, -1], "mask": mask}
    if hidden:
        result["hidden"] = out.hidden_states[-1][:, -1]
    if use_cache:
        cache = output_cache(out)
        keep = mask[:, None, :, None].bool()
        result["kv"] = [
            (torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0)) for layer in _cache_layers(cache)
        ]
    return result


def output_cache(out: Any):
    """The KV cache a Hugging Face forward returned (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the model returned no KV cache; the text env needs a causal LM with use_cache support")
    return cache


def _cache_layers(cache: Any) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError(f"unsupported KV cache type {type(cache).__name__}: the text env needs a transformers DynamicCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                f"KV cache layer {type(layer).__name__} (sliding window or recurrent) is not supported by the batched "
                "text env; use a model with full attention in every layer"
            )
    return layers


def _expand(out: dict[str, Any], inverse: list[int]) -> dict[str, Any]:
    """A :func:`prefill` result for the unique sequences, repeated to one row per
    sequence (``inverse[j]`` is the unique row of sequence ``j``)."""
    if inverse == list(range(len(inverse))):
        return out
    idx = torch.as_tensor(inverse, device=out["mask"].device)
    expanded = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    if "kv" in out:
        expanded["kv"] = [(k[idx], v[idx]) for k, v in out["kv"]]
    return expanded


# ---------------------------------------------------------------------------------------
# core


class LMCore:
    """Actor, frozen reference, tokenizer and sampling configuration, shared by the text
    envs of one process and the LM policy built on them.

    :param actor: the trainable causal LM (a ``PreTrainedModel``)
    :param reference: the frozen reference model (``requires_grad`` is switched off)
    :param tokenizer: the tokenizer of both models (must define a pad token)
    :param temperature: sampling temperature of the policy (applied to the reference too)
    :param top_k: top-k of the policy's distribution (0 = off; not applied to the reference)
    :param spec: serializable description of how to rebuild the actor (model name or
        path, dtype), stored in the observation space for policies loaded from disk
    """

    def __init__(
        self,
        actor: nn.Module,
        reference: nn.Module,
        tokenizer: Any,
        temperature: float = 1.0,
        top_k: int = 0,
        spec: dict[str, Any] | None = None,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        self.actor = actor
        self.reference = reference
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.reference.eval()
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.spec = dict(spec or {})
        self.vocab_size = int(actor.get_output_embeddings().weight.shape[0])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(getattr(actor, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids = frozenset(int(e) for e in eos)
        self.step_cache: OrderedDict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_capacity = 16
        self.hits = 0
        self.misses = 0
        self._trunk = None
        # the actor's parameters, listed once (a module walk costs about 1 ms on SmolLM2 and
        # the version is read at every step); listed again after parameters_changed()
        self._parameters: tuple[torch.Tensor, ...] | None = None
        self._changes = 0

    @property
    def device(self) -> torch.device:
        return next(self.actor.parameters()).device

    def shared_trunk(self):
        """The :class:`envs.reference.SharedTrunk` of this actor/reference pair (built once,
        shared by the envs of this core)."""
        if self._trunk is None:
            from envs.reference import SharedTrunk

            self._trunk = SharedTrunk(self.actor, self.reference)
        return self._trunk

    def version(self) -> int:
        """Current parameter version of the actor: the number of :meth:`parameters_changed`
        calls (the LM policy's optimizer calls it after every step: fused optimizers such as
        ``Adam(fused=True)`` write the weights without bumping their version counters) plus
        the sum of its parameters' in-place version counters (:func:`params_version`:
        ``load_state_dict`` and any other in-place write bump them)."""
        if self._parameters is None:
            self._parameters = tuple(self.actor.parameters())
        return self._changes + params_version(self._parameters)

    def parameters_changed(self, *args: Any) -> None:
        """Say that the actor's set of parameters may have changed (adapters injected, a
        parameter replaced): :meth:`version` lists them again. The LM policy calls it after
        injecting LoRA and, as a step hook of its optimizer, after every step (extra
        arguments are ignored so it can be registered as one). Bumps :meth:`version`."""
        self._parameters = None
        self._changes += 1

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy's next-token log-probabilities from raw actor logits."""
        return sampling_log_probs(logits, self.temperature, self.top_k)

    def ref_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The reference's next-token log-probabilities: same temperature, no top-k (a
        top-k on the reference would make ``log ref`` infinite for legal actions)."""
        return sampling_log_probs(logits, self.temperature, 0)

    def reserve(self, rows: int) -> None:
        """Make room in :attr:`step_cache` for ``rows`` more live contexts."""
        self.cache_capacity += 2 * rows

    def store(self, keys: Sequence[tuple], version: int, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Remember the actor's last hidden state and raw logits of contexts ``keys``."""
        for row, key in enumerate(keys):
            self.step_cache[key] = (version, hidden[row].detach(), logits[row].detach())
            self.step_cache.move_to_end(key)
        while len(self.step_cache) > self.cache_capacity:
            self.step_cache.popitem(last=False)

    def lookup(self, key: tuple, version: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(hidden, logits)`` of context ``key`` if computed by the current actor, else None."""
        entry = self.step_cache.get(key)
        if entry is None or entry[0] != version:
            return None
        return entry[1], entry[2]

    def actor_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden state and raw next-token logits of each observation row.

        Rows are the env's observations: tokens left-aligned, then padding (mask 0). Without
        gradients each row is first looked up in :attr:`step_cache`; misses (a context the env
        computed before the last weight update, a foreign observation) and every row when
        gradients are on get one batched forward without cache. A read: the env's contexts
        are left as they are (the env brings them up to date at its next step, or when its
        owner calls ``contexts.refresh()``).

        :return: ``(hidden (B, H), logits (B, vocab))``
        """
        ids = input_ids.long()
        lengths = attention_mask.long().sum(-1).tolist()
        ids_cpu = ids.cpu().numpy()
        seqs = [tuple(ids_cpu[row, :n].tolist()) for row, n in enumerate(lengths)]
        hidden: list[torch.Tensor | None] = [None] * len(seqs)
        logits: list[torch.Tensor | None] = [None] * len(seqs)
        missing = list(range(len(seqs)))
        if not torch.is_grad_enabled():
            version = self.version()
            missing = []
            for row, key in enumerate(seqs):
                found = self.lookup(key, version)
                if found is None:
                    missing.append(row)
                else:
                    hidden[row], logits[row] = found
            self.hits += len(seqs) - len(missing)
        self.misses += len(missing)
        if missing:
            if any(lengths[row] == 0 for row in missing):
                raise ValueError("an observation row has an all-zero attention_mask: it holds no tokens")
            out = prefill(self.actor, [seqs[row] for row in missing], self.pad_id, use_cache=False)
            for j, row in enumerate(missing):
                hidden[row], logits[row] = out["hidden"][j], out["logits"][j]
        return torch.stack(hidden), torch.stack(logits)  # type: ignore[arg-type]


def build_core(
    model: nn.Module,
    tokenizer: Any,
    reference: nn.Module | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    dtype: Any = None,
    shared: bool = True,
    spec: dict[str, Any] | None = None,
) -> LMCore:
    """The actor/reference pair of a text env, from the modules.

    :param model: the actor, a causal LM module
    :param tokenizer: its tokenizer
    :param reference: None (a frozen deep copy of the starting actor) or a module
    :param dtype: the dtype name recorded in the spec
    :param shared: reuse the live core of an earlier env of this process built on the same
        ``model`` and ``reference`` modules with the same sampling configuration, so that
        the N envs of a ``DummyVecEnv`` act with ONE actor (the one the policy trains)
    :param spec: how to rebuild the actor in another process (see :func:`core_from_spec`);
        None records the model's ``name_or_path``
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a causal LM module (with tokenizer=), got {type(model).__name__} {model!r}: to load a "
            "model by name or path, make the env by id (import rlhf_env; gym.make('TextRLHF-v0', model=...))"
        )
    if tokenizer is None:
        raise ValueError("model= is a module: pass its tokenizer too (tokenizer=...)")
    if reference is not None and not isinstance(reference, nn.Module):
        raise TypeError(
            f"reference must be None or a causal LM module, got {type(reference).__name__}: to load it by name, "
            "make the env by id (import rlhf_env; gym.make('TextRLHF-v0', reference=...))"
        )
    share_key = (id(reference), float(temperature), int(top_k))
    if shared:
        core = _CORES_OF.get(model, {}).get(share_key)
        if core is not None:
            return core
    if reference is None:
        reference = copy.deepcopy(model)
    spec = dict(spec) if spec else {"model": getattr(getattr(model, "config", None), "_name_or_path", None)}
    spec.setdefault("dtype", _dtype_name(dtype))
    spec.update(temperature=float(temperature), top_k=int(top_k), device=str(next(model.parameters()).device))
    core = LMCore(model, reference, tokenizer, temperature, top_k, spec=spec)
    if shared:
        _CORES_OF.setdefault(model, weakref.WeakValueDictionary())[share_key] = core
    return core


def core_from_spec(spec: dict[str, Any], device: str | torch.device = "cpu") -> LMCore:
    """Rebuild a core from the serializable description an observation space carries
    (used when a saved policy is loaded in a process without the env that made it).

    ``spec["loader"]`` names a function ``"module:function"`` (``rlhf_env``'s registration
    sets it) called as ``loader(spec, device)`` that returns ``(model, tokenizer)``;
    without one the model is read with ``transformers.AutoModelForCausalLM.from_pretrained``
    from ``spec["model"]`` (a Hugging Face directory or hub id)."""
    if not spec.get("model"):
        raise ValueError("the observation space does not say which model the policy acts with (spec has no 'model')")
    loader = spec.get("loader")
    if loader:
        module_name, _, attr = str(loader).partition(":")
        model, tokenizer = getattr(importlib.import_module(module_name), attr)(spec, device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=spec.get("dtype") or torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return build_core(model, tokenizer, temperature=spec.get("temperature", 1.0), top_k=spec.get("top_k", 0),
                      dtype=spec.get("dtype"), shared=True, spec=spec)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------
# observation space


class LMHandle:
    """The explicit handle from a text env's observation space to the env's :class:`LMCore`,
    so an LM policy built from the space alone (as SB3's PPO builds it) acts with the env's
    own actor.

    Pickled (``model.save``, a space sent to another process) it keeps only the core's
    serializable description :attr:`spec`; :meth:`core` of an unpickled handle rebuilds
    the core from it (:func:`core_from_spec`). Copies (``copy.deepcopy`` of the space) share
    the handle, hence the core.
    """

    def __init__(self, core: LMCore | None = None, spec: dict[str, Any] | None = None):
        self._core = core
        self.spec = dict(spec if spec is not None else core.spec if core is not None else {})

    def core(self) -> LMCore:
        """The env's core; rebuilt from :attr:`spec` (once) when the handle was unpickled."""
        if self._core is None:
            self._core = core_from_spec(self.spec, device=self.spec.get("device", "cpu"))
        return self._core

    def __reduce__(self):
        return (LMHandle, (None, self.spec))

    def __copy__(self) -> "LMHandle":
        return self

    def __deepcopy__(self, memo: dict) -> "LMHandle":
        return self


class TextObservationSpace(spaces.Dict):
    """``Dict(input_ids=Box(0, vocab-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))``
    that also carries :attr:`lm`, the :class:`LMHandle` of the env's models (pickled as
    their serializable description, so the space pickles small)."""

    def __init__(self, length: int, vocab_size: int, lm: LMHandle | None = None):
        super().__init__(
            {
                "input_ids": spaces.Box(0, vocab_size - 1, (length,), np.int64),
                "attention_mask": spaces.Box(0, 1, (length,), np.int64),
            }
        )
        self.lm = lm if lm is not None else LMHandle()

    @property
    def lm_spec(self) -> dict[str, Any]:
        """The serializable description of the env's model (:attr:`LMHandle.spec`)."""
        return self.lm.spec

    def __reduce__(self):
        return (TextObservationSpace, (self["input_ids"].shape[0], int(self["input_ids"].high[0]) + 1, self.lm))


# ---------------------------------------------------------------------------------------
# batched contexts


class _ModelState:
    """Batched KV cache of one model: per-layer (keys, values), mask, next-token logits."""

    def __init__(self):
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.version: int | None = None
        # first model layer the cache holds (> 0: the reference's top blocks on a shared trunk)
        self.offset = 0

    def clear(self) -> None:
        self.cache = self.mask = self.logits = self.hidden = self.version = None


class Contexts:
    """``n`` token contexts (prompt + response so far) with a batched KV cache of the actor
    and of the reference.

    With ``reference_share="auto"`` the reference runs only the blocks above the actor's
    frozen, identical lower blocks, on the actor's hidden state (see :mod:`envs.reference`);
    :attr:`shared_blocks` says how many lower blocks it currently takes from the actor
    (0 = a full reference forward). The split is re-checked before every forward; when it
    changes the reference's cache is rebuilt. On a shared trunk both caches keep the same
    column layout (they are prefilled, stepped and trimmed together), so the reference's
    blocks reuse the causal mask and position embeddings of the actor's forward.

    :param core: the models
    :param n: number of contexts (rows)
    :param reference_share: ``"auto"`` (share the frozen trunk when exact) or ``"off"``

    :attr:`with_reference` False (see :meth:`set_reference`) runs no reference forward at
    all: only the actor's cache is kept and :meth:`log_probs` returns NaN for
    ``ref_logprob`` and ``kl`` (for trainers that compute reference log-probs themselves,
    once per response, e.g. GRPO).

    :attr:`keep_trunk` True (set by the text trainers) also keeps, per context, the actor's
    hidden state entering its first trainable block ``s`` (:attr:`keep_split`, the number of
    leading frozen blocks) for every token the actor has run; :meth:`kept_states` hands
    them to the update, which then runs only the top blocks (see :mod:`envs.trunk_states`).

    Contexts with equal token ids in one prefill (GRPO's group of ``G`` copies of a prompt)
    are run once and their KV caches copied.
    """

    def __init__(self, core: LMCore, n: int, reference_share: str = "auto"):
        from envs.reference import check_reference_share

        self.core = core
        self.n = n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.prompt_len = [0] * n
        self.actor = _ModelState()
        self.ref = _ModelState()
        self.reference_share = check_reference_share(reference_share)
        self.trunk = core.shared_trunk() if self.reference_share == "auto" else None
        self.shared_blocks = 0
        self.with_reference = True
        # the actor's frozen-trunk states per context (see keep_trunk / kept_states)
        from envs.reference import decoder_parts

        self._actor_parts = decoder_parts(core.actor)[0]
        self.keep_trunk = False
        self.keep_split = 0
        self._keep_sig: tuple | None = None
        self._kept: list[list[torch.Tensor] | None] = [None] * n
        self._kept_len = [0] * n
        core.reserve(n)

    def set_reference(self, enabled: bool) -> None:
        """Switch the per-token reference forward on or off. Switching it back on rebuilds
        both caches of every live context (so the reference's covers every token)."""
        enabled = bool(enabled)
        if enabled == self.with_reference:
            return
        self.with_reference = enabled
        self.actor.clear()
        self.ref.clear()
        rows = [row for row in range(self.n) if self.ids[row]]
        self.shared_blocks = self.ref.offset = self.trunk.split() if (enabled and self.trunk is not None) else 0
        self._prefill_rows(rows, actor=True, ref=enabled)

    # -- cache surgery ---------------------------------------------------------------
    @staticmethod
    def _write_rows(state: _ModelState, model: nn.Module, rows: list[int], n: int, out: dict[str, Any]) -> None:
        """Write prefilled KV of ``rows`` into the batched cache (right-aligned)."""
        from envs.reference import new_cache

        new_mask, kv = out["mask"], out["kv"]
        width = new_mask.shape[1]
        device = new_mask.device
        idx = torch.as_tensor(rows, device=device)
        if state.cache is None or sorted(rows) == list(range(n)):
            # every row restarts (or first fill): the prefill becomes the cache, no copy
            if list(rows) == list(range(n)):
                state.cache = new_cache(kv, state.offset)
                state.mask = new_mask
                Contexts._trim(state)
                return
            mask = torch.zeros((n, width), dtype=torch.long, device=device)
            mask[idx] = new_mask
            full = []
            for k, v in kv:
                fk = k.new_zeros((n, *k.shape[1:]))
                fv = v.new_zeros((n, *v.shape[1:]))
                fk[idx], fv[idx] = k, v
                full.append((fk, fv))
            state.cache = new_cache(full, state.offset)
            state.mask = mask
        else:
            layers = _cache_layers(state.cache)
            cur = state.mask.shape[1]
            if width > cur:  # grow on the left
                grow = width - cur
                state.mask = torch.cat([state.mask.new_zeros((n, grow)), state.mask], dim=1)
                for layer in layers:
                    pad = layer.keys.new_zeros((n, layer.keys.shape[1], grow, layer.keys.shape[3]))
                    layer.keys = torch.cat([pad, layer.keys], dim=2)
                    layer.values = torch.cat([pad, layer.values], dim=2)
            total = state.mask.shape[1]
            state.mask[idx] = 0
            state.mask[idx, total - width :] = new_mask
            for layer, (k, v) in zip(layers, kv):
                layer.keys[idx] = 0
                layer.values[idx] = 0
                layer.keys[idx, :, total - width :] = k
                layer.values[idx, :, total - width :] = v
        Contexts._trim(state)

    @staticmethod
    def _trim(state: _ModelState) -> None:
        used = state.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else state.mask.shape[1]
        if first > 0:
            state.mask = state.mask[:, first:]
            for layer in _cache_layers(state.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    # -- operations ------------------------------------------------------------------
    @torch.no_grad()
    def set_prompts(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Start contexts ``rows`` at the given prompt token ids (prefill of both models)."""
        for row, ids in zip(rows, prompts):
            self.ids[row] = list(ids)
            self.prompt_len[row] = len(ids)
        actor_done, ref_done = self._refresh()  # a rebuild already covers the new prompts
        self._prefill_rows(rows, actor=not actor_done, ref=not ref_done)

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring the caches up to date with the current actor (what the next forward does
        first); the next-token logits of every context land in the core's step cache."""
        self._refresh(check_split=False)

    def _refresh(self, check_split: bool = True) -> tuple[bool, bool]:
        """Before a forward: re-check the reference's shared trunk and the actor's weights,
        and re-prefill every context of the model(s) whose cache is stale.

        :param check_split: re-check the trunk split even when the actor is not stale (a
            step that runs no forward can skip it: logits already computed stay exact)
        :return: ``(actor rebuilt, reference rebuilt)``; rebuilt caches already hold every
            token of :attr:`ids`
        """
        share = self.trunk is not None and self.with_reference
        if self.actor.cache is None:  # nothing built yet
            self.shared_blocks = self.ref.offset = self.trunk.split() if share else 0
            return False, False
        stale = self.actor.version != self.core.version()
        if not (stale or check_split):
            return False, False
        split = self.trunk.split() if share else 0
        changed = split != self.shared_blocks
        if not (stale or changed):
            return False, False
        if stale and not changed and self._refresh_top():
            # only the actor's top blocks changed: their KV recomputed in place from the kept
            # trunk states, same layout (the reference's cache stays valid); nothing advanced
            return False, False
        self.shared_blocks = self.ref.offset = split
        # on a shared trunk both caches are rebuilt together so their layouts stay equal
        rebuild_actor = stale or split > 0
        rebuild_ref = (changed or split > 0) and self.with_reference
        rows = [row for row in range(self.n) if self.ids[row]]
        if rebuild_actor:
            self.actor.clear()
        if rebuild_ref:
            self.ref.clear()
        self._prefill_rows(rows, actor=rebuild_actor, ref=rebuild_ref)
        return rebuild_actor, rebuild_ref

    def _prefill_rows(self, rows: list[int], actor: bool, ref: bool) -> None:
        if not rows or not (actor or ref):
            return
        core = self.core
        seqs = [self.ids[row] for row in rows]
        # equal contexts (a GRPO group) are run once: their rows get copies of one prefill
        first: dict[tuple, int] = {}
        inverse = [first.setdefault(tuple(s), len(first)) for s in seqs]
        unique = [list(key) for key in first]
        split = self.shared_blocks
        if split and actor != ref:
            raise RuntimeError("internal error: on a shared trunk the actor and reference caches are prefilled together")
        ref_out = None
        if actor:
            version = core.version()
            keep = self._keep_begin(rows)
            with contextlib.ExitStack() as stack:
                captured = stack.enter_context(self.trunk.capture(split)) if split else None
                kept = stack.enter_context(capture_block_input(self._actor_parts["layers"][keep])) if keep else None
                out = prefill(core.actor, unique, core.pad_id)
            if split and ref and self.with_reference:
                ref_out = _expand(self._reference_top_prefill(captured, out["mask"]), inverse)
            if keep:
                states = kept["hidden"].detach()
                for j, row in enumerate(rows):
                    u = inverse[j]
                    self._kept[row] = [states[u, out["mask"][u].bool()]]
                    self._kept_len[row] = len(seqs[j])
            out = _expand(out, inverse)
            self._write_rows(self.actor, core.actor, rows, self.n, out)
            self._set_next(self.actor, rows, out["logits"], out["hidden"])
            self.actor.version = version
            core.store([tuple(s) for s in seqs], version, out["hidden"], out["logits"])
        if ref and self.with_reference:
            if ref_out is None:
                ref_out = _expand(prefill(core.reference, unique, core.pad_id, hidden=False), inverse)
            self._write_rows(self.ref, core.reference, rows, self.n, ref_out)
            self._set_next(self.ref, rows, ref_out["logits"], None)

    # -- the actor's frozen-trunk states (keep_trunk) -----------------------------------
    def _keep_begin(self, rows: list[int]) -> int:
        """Before a prefill of ``rows``: the block whose input to keep (0 = none). A change
        of the frozen prefix drops the states of every other row."""
        from envs.trunk_states import frozen_blocks, frozen_signature

        if not self.keep_trunk or self._actor_parts is None:
            split, sig = 0, None
        else:
            split = frozen_blocks(self._actor_parts)
            sig = frozen_signature(self._actor_parts, split)
        if split != self.keep_split or sig != self._keep_sig:
            self._kept = [None] * self.n
            self._kept_len = [0] * self.n
        self.keep_split, self._keep_sig = split, sig
        return split

    @torch.no_grad()
    def _refresh_top(self) -> bool:
        """After an update of the actor's top blocks only (its lower blocks still make the
        kept states, same :func:`envs.trunk_states.frozen_signature`), recompute the KV of
        blocks :attr:`keep_split` .. of every cached token and the next-token logits from
        the kept trunk states, in the cache's own column layout, instead of re-prefilling
        every context through the whole model. False (nothing done) unless every cached
        token's state was kept."""
        from envs.reference import new_cache
        from envs.trunk_states import frozen_signature, top_hidden

        split, state, core = self.keep_split, self.actor, self.core
        if not split or state.cache is None or state.mask is None or self.actor.offset != 0:
            return False
        if frozen_signature(self._actor_parts, split) != self._keep_sig:
            return False
        counts = state.mask.sum(-1).tolist()
        rows = [row for row in range(self.n) if counts[row]]
        if not rows or any(self._kept[row] is None or self._kept_len[row] != counts[row] for row in rows):
            return False
        mask = state.mask
        keep = mask.bool()
        parts = self._actor_parts
        states = torch.cat([chunk for row in rows for chunk in self._kept[row]])
        hidden = states.new_zeros((*mask.shape, states.shape[-1]))
        hidden[keep] = states.reshape(-1, states.shape[-1])
        cache = new_cache(None, split)
        out = top_hidden(parts, split, hidden, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
        layers = _cache_layers(state.cache)
        kv_keep = keep[:, None, :, None]
        for layer, new in zip(layers[split:], _cache_layers(cache)):
            layer.keys = torch.where(kv_keep, new.keys, 0.0)
            layer.values = torch.where(kv_keep, new.values, 0.0)
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # each row's last real column
        idx = torch.as_tensor(rows, device=mask.device)
        h_last = out[idx, last[idx]]
        logits = parts["head"](h_last[:, None])[:, -1]
        self._set_next(state, rows, logits, h_last)
        state.version = core.version()
        core.store([tuple(self.ids[row][: counts[row]]) for row in rows], state.version, h_last, logits)
        return True

    def kept_states(self, row: int, ids: Sequence[int]) -> tuple[torch.Tensor, tuple] | None:
        """``(states, signature)``: the actor's input of block :attr:`keep_split` for the
        tokens ``ids`` of context ``row`` (``(len(ids), H)``, no gradient) and the
        :func:`envs.trunk_states.frozen_signature` of the weights that made them; None when
        the context does not start with ``ids`` or its states were not kept."""
        chunks = self._kept[row]
        n = len(ids)
        if chunks is None or self._kept_len[row] < n or n == 0 or self.ids[row][:n] != list(ids):
            return None
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks)]
        return chunks[0][:n], self._keep_sig

    def _keep_step(self, rows: list[int], box: dict[str, Any] | None) -> None:
        if box is None:
            return
        hidden = box["hidden"].detach()
        for row in rows:
            if self._kept[row] is not None:
                self._kept[row].append(hidden[row])
                self._kept_len[row] += 1

    def _keep_capture(self, stack: contextlib.ExitStack) -> dict[str, Any] | None:
        if not self.keep_split:
            return None
        return stack.enter_context(capture_block_input(self._actor_parts["layers"][self.keep_split]))

    def _reference_top_prefill(self, captured: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
        """:func:`prefill`'s result for the reference, from the actor's captured trunk state."""
        from envs.reference import new_cache

        cache = new_cache(None, self.shared_blocks)
        logits = self.trunk.reference_top(self.shared_blocks, captured, cache)
        keep = mask[:, None, :, None].bool()
        kv = [(torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0)) for layer in _cache_layers(cache)]
        return {"logits": logits, "mask": mask, "kv": kv}

    def _set_next(self, state: _ModelState, rows: list[int], logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        idx = torch.as_tensor(rows, device=logits.device)
        if state.logits is None:
            state.logits = logits.new_zeros((self.n, logits.shape[-1]))
        state.logits[idx] = logits
        if hidden is not None:
            if state.hidden is None:
                state.hidden = hidden.new_zeros((self.n, hidden.shape[-1]))
            state.hidden[idx] = hidden

    @torch.no_grad()
    def log_probs(self, rows: list[int], actions: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logprob, ref_logprob, kl)`` of ``actions`` (one per row in ``rows``) at the
        current contexts, under the current actor (re-prefilled if its weights changed)."""
        self._refresh(check_split=False)
        idx = torch.as_tensor(rows, device=self.actor.logits.device)
        actor_logp = self.core.log_probs(self.actor.logits[idx])
        if not self.with_reference:
            logprob = actor_logp.gather(-1, actions.to(actor_logp.device)[:, None]).squeeze(-1)
            nan = torch.full_like(logprob, float("nan"))
            return logprob, nan, nan.clone()
        ref_logp = self.core.ref_log_probs(self.ref.logits[idx].to(actor_logp.device))
        return kl_terms(actor_logp, ref_logp, actions.to(actor_logp.device), estimator)

    @torch.no_grad()
    def advance(self, rows: list[int], tokens: list[int]) -> None:
        """Append ``tokens`` to contexts ``rows`` with one incremental forward of each model
        over all ``n`` rows (the other rows are fed a masked pad token)."""
        if not rows:
            return
        for row, tok in zip(rows, tokens):
            self.ids[row].append(int(tok))
        core = self.core
        # a model whose cache was rebuilt (weights changed, trunk split changed) already holds the tokens
        actor_done, ref_done = self._refresh()
        split = self.shared_blocks
        if split and not actor_done:
            self._step_shared(rows, tokens)
        else:
            if not actor_done:
                self._step(self.actor, core.actor, rows, tokens, hidden=True)
            if not ref_done and self.with_reference:
                self._step(self.ref, core.reference, rows, tokens, hidden=False)
        if not actor_done:
            core.store([tuple(self.ids[row]) for row in rows], self.actor.version, self.actor.hidden[rows], self.actor.logits[rows])

    def _feed(self, state: _ModelState, rows: list[int], tokens: list[int]) -> tuple[torch.Tensor, ...]:
        """``(input_ids, attention_mask, position_ids, row index)`` of one incremental step."""
        device = state.mask.device
        live = torch.zeros((self.n, 1), dtype=torch.long, device=device)
        idx = torch.as_tensor(rows, device=device)
        live[idx, 0] = 1
        feed = torch.full((self.n, 1), self.core.pad_id, dtype=torch.long, device=device)
        feed[idx, 0] = torch.as_tensor([int(t) for t in tokens], device=device)
        return feed, torch.cat([state.mask, live], dim=1), state.mask.sum(-1, keepdim=True), idx

    def _step(self, state: _ModelState, model: nn.Module, rows: list[int], tokens: list[int], hidden: bool) -> None:
        """One incremental forward of ``model`` over all rows."""
        from envs.reference import decode_head

        feed, mask, position_ids, idx = self._feed(state, rows, tokens)
        parts = self._actor_parts if state is self.actor else None
        with contextlib.ExitStack() as stack:
            box = self._keep_capture(stack) if state is self.actor else None
            if parts is not None:
                # decoder, then the head on the last position (logits = head(norm(h)) for the
                # supported models; see decode_head)
                out = parts["inner"](input_ids=feed, attention_mask=mask, position_ids=position_ids,
                                     cache=state.cache, use_cache=True)
                last = out.last_hidden_state[:, -1:]
                logits, last_hidden = decode_head(parts["head"], last, state.version)[:, -1], last[:, -1]
            else:
                out = model(
                    input_ids=feed,
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=state.cache,
                    use_cache=True,
                    output_hidden_states=hidden,
                )
                logits = out.logits[:, -1]
                last_hidden = out.hidden_states[-1][:, -1] if hidden else None
        self._keep_step(rows, box)
        state.cache = output_cache(out)
        state.mask = mask
        state.logits[idx] = logits[idx].to(state.logits.dtype)
        if hidden:
            state.hidden[idx] = last_hidden[idx].to(state.hidden.dtype)
        # rows fed a masked pad keep a dead column; columns dead in every row are dropped
        self._trim(state)

    def _step_shared(self, rows: list[int], tokens: list[int]) -> None:
        """One incremental step of the actor and of the reference's top blocks on the
        actor's trunk state (same causal mask and position embeddings), with both heads
        in one matmul when they are the same weights."""
        actor, ref, split = self.actor, self.ref, self.shared_blocks
        if ref.mask.shape != actor.mask.shape:
            raise RuntimeError("internal error: the actor and reference caches lost their common layout")
        feed, mask, position_ids, idx = self._feed(actor, rows, tokens)
        with self.trunk.capture(split) as captured, contextlib.ExitStack() as stack:
            box = self._keep_capture(stack)
            out = self.trunk.actor_trunk(
                input_ids=feed,
                attention_mask=mask,
                position_ids=position_ids,
                cache=actor.cache,
                use_cache=True,
                output_hidden_states=True,
            )
        self._keep_step(rows, box)
        ref_hidden = self.trunk.reference_top(split, captured, ref.cache, head=False)
        actor_logits, ref_logits = self.trunk.heads(out.last_hidden_state[:, -1:], ref_hidden, actor.version)
        actor.cache = output_cache(out)
        actor.mask, ref.mask = mask, mask.clone()
        actor.logits[idx] = actor_logits[idx].to(actor.logits.dtype)
        actor.hidden[idx] = out.hidden_states[-1][idx, -1].to(actor.hidden.dtype)
        ref.logits[idx] = ref_logits[idx].to(ref.logits.dtype)
        self._trim(actor)
        self._trim(ref)


def _rebuild_space(length: int, vocab_size: int, core_key: str | None, lm_spec: dict) -> TextObservationSpace:
    """Unpickle a space saved before the space carried an :class:`LMHandle` (its live-core
    key means nothing in another process)."""
    return TextObservationSpace(length, vocab_size, LMHandle(None, lm_spec))
