"""``LMCore``: the models of the text environments and the LM policy, and their step cache.

:class:`LMCore` owns the trainable actor, the frozen reference, the tokenizer and the
sampling configuration (temperature, top-k) that defines the policy's distribution
(:mod:`envs.sampling`); the envs' token contexts (:mod:`envs.contexts`) run its models.

Sharing the actor forward with the policy: after every forward the env stores the
actor's last hidden state and next-token logits of each new context in
:attr:`LMCore.step_cache`, keyed by the exact token ids and stamped with the actor's
weight version (:meth:`LMCore.version`: optimizer steps counted by the LM policy's
optimizer hook, plus the parameters' in-place ``_version`` counters, which
``load_state_dict`` and any in-place write bump). The policy reaches the core through the
explicit handle its observation space carries (:class:`envs.spaces.LMHandle`); its
no-grad forward on the env's observation is then a lookup; a miss (training minibatches,
a foreign observation, or a stale version) is a full forward without cache, and never
changes the env. When the env sees that the actor's version changed since it built its
actor KV cache (an update mid-episode), it re-prefills its contexts at its next step (or
when its owner calls :meth:`envs.contexts.Contexts.refresh`), so the log-probabilities it
charges stay exact for the current actor.

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

import copy
import importlib
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from envs.kv_cache import prefill
from envs.sampling import sampling_log_probs

# actor module -> (id of the reference module, temperature, top_k) -> the core built on them,
# so that the envs of one process built on one module share one core (shared_model=True);
# weak on both sides: a core dies with its last env / policy
_CORES_OF: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakValueDictionary[tuple, LMCore]]" = weakref.WeakKeyDictionary()



def params_version(parameters: Sequence[torch.Tensor]) -> int:
    """Sum of the in-place version counters of ``parameters``: changes whenever an optimizer
    step, ``load_state_dict`` or any in-place write touches one of them."""
    return sum(p._version for p in parameters)


def actor_changes(actor: nn.Module) -> int:
    """How often ``actor`` changed since it was loaded, as far as this process can tell:
    the changes the LM policies reported to its cores (optimizer steps, adapters
    injected; see :meth:`LMCore.parameters_changed`) plus its parameters' in-place
    version counters (compare with the value taken when it was loaded)."""
    cores = _CORES_OF.get(actor)
    reported = sum(core._changes for core in cores.values()) if cores is not None else 0
    return reported + params_version(list(actor.parameters()))


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
    spec.setdefault("dtype", dtype_name(dtype))
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


def dtype_name(dtype: Any) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16`` or ``"bfloat16"`` (how a model description and a
    cache key name a dtype); None stays None."""
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def _rebuild_space(length: int, vocab_size: int, core_key: str | None, lm_spec: dict) -> Any:
    """Unpickle a space saved before the space carried an :class:`LMHandle` (its live-core
    key means nothing in another process)."""
    from envs.spaces import LMHandle, TextObservationSpace

    return TextObservationSpace(length, vocab_size, LMHandle(None, lm_spec))
