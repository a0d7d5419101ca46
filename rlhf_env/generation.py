"""The package's one batched sampler: completions of a causal LM for many prompts.

:func:`generate` turns prompts (strings or chat-message lists, with an optional system
prompt) into completions, greedy or sampled (``temperature``, ``top_k``), ``num_samples``
per prompt, in left-padded batches through Hugging Face ``generate`` with its KV cache,
with a tqdm progress bar. Evaluation, the demos and the benchmarks all sample through it,
so "what the model writes" means the same thing everywhere. With several samples per prompt
each prompt is prefilled once and its KV cache repeated for its samples (Hugging Face's
``num_return_sequences`` prefills every copy): the saving grows with the number of samples
and the prompt's length, and shrinks as the answers grow longer. A model whose cache cannot
be repeated takes Hugging Face's path.

:func:`resolve_policy` turns what a user holds (a model name or directory, a
``(model, tokenizer)`` pair, or a trained agent whose policy is a language model) into the
``(model, tokenizer)`` pair :func:`generate` takes.

Prompts are tokenized as the text env tokenizes them (:func:`rlhf_env.models.encode_prompt`
for a string: the chat template's user turn plus the assistant header, or plain text after
BOS for a model without a template), so a completion sampled here is one the env could
have sampled.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhf_env.envs.prompt import TEMPLATE_DEFAULT
from rlhf_env.envs.sampling import sampling_log_probs

Prompt = str | Sequence[dict]


@dataclass
class Completions:
    """What :func:`generate` returns, one entry per prompt, in the prompts' order.

    :ivar texts: ``texts[i][j]``: the ``j``-th completion of prompt ``i`` (special tokens
        removed, surrounding whitespace stripped).
    :ivar num_tokens: ``num_tokens[i][j]``: its length in tokens (EOS included when emitted).
    :ivar finished: ``finished[i][j]``: whether it ended with EOS (False: cut at ``max_new_tokens``).
    :ivar token_ids: ``token_ids[i][j]``: its token ids as sampled (EOS included when
        emitted), for scoring the very tokens drawn (a KL estimate, a reference NLL).
    :ivar logprobs: with ``generate(..., logprobs=True)``, ``logprobs[i][j]``: each sampled
        token's log-probability under the model's ``softmax(logits / temperature)`` (top-k
        applied when set; temperature 1 when greedy), read from the logits of the decoding
        pass itself; None otherwise.
    """

    texts: list[list[str]] = field(default_factory=list)
    num_tokens: list[list[int]] = field(default_factory=list)
    finished: list[list[bool]] = field(default_factory=list)
    token_ids: list[list[list[int]]] = field(default_factory=list)
    logprobs: list[list[list[float]]] | None = None

    def flat(self) -> list[str]:
        """All completions in one list, prompt-major (TRL's layout for ``num_generations``)."""
        return [t for group in self.texts for t in group]


def prompt_ids(tokenizer: Any, prompt: Prompt, system_prompt: Any = TEMPLATE_DEFAULT) -> list[int]:
    """Token ids of one prompt, ready for the model to write its completion after them,
    exactly as the text env encodes it (:func:`envs.prompt.encode_prompt`).

    :param prompt: a string (one user message) or a list of chat messages
        ``[{"role": ..., "content": ...}, ...]``.
    :param system_prompt: as the env's: ``TEMPLATE_DEFAULT`` (the default) leaves it to the
        chat template (SmolLM2's own system message), a string is put in front (unless the
        messages hold one), ``None`` renders no system message.
    :return: the ids: the chat template with the assistant header when the tokenizer has
        one, else the messages' contents joined by newlines after BOS.
    """
    from rlhf_env.envs.prompt import encode_prompt

    return encode_prompt(tokenizer, prompt, system_prompt)


def resolve_policy(policy: Any, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of what a user holds.

    :param policy: a shipped model name (``"smollm2-135m"``, ``"tiny"``) or a Hugging Face
        model directory (loaded with :func:`rlhf_env.models.load_lm`); a ``(model,
        tokenizer)`` pair; or a trained agent (``agents.GRPO``, ``agents.RLOO``, ``agents.PPO``,
        SB3's PPO) whose policy is the language-model policy of a text env.
    :param device: where a loaded model goes (``None``: CPU for a name, unchanged otherwise).
    :raises TypeError: for anything else, saying what is accepted.
    """
    if isinstance(policy, (str, os.PathLike)):
        from rlhf_env.models import load_lm

        return load_lm(policy, device=device or "cpu")
    if isinstance(policy, tuple) and len(policy) == 2:
        model, tokenizer = policy
        return (model.to(device) if device is not None else model), tokenizer
    core = getattr(getattr(policy, "policy", None), "core", None)
    if core is not None and hasattr(core, "actor") and hasattr(core, "tokenizer"):
        return (core.actor.to(device) if device is not None else core.actor), core.tokenizer
    raise TypeError(
        "policy must be a model name or directory, a (model, tokenizer) pair, or an agent "
        f"trained on a text env (its .policy has the language model), got {type(policy).__name__}"
    )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's generators for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def prompt_cache(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of left-padded prompts without their last token, each row repeated
    ``copies`` times (rows ``i * copies ... (i + 1) * copies - 1`` are prompt ``i``'s), for
    ``model.generate`` to continue from: the prompts' shared prefix is computed once instead
    of once per sample.

    Positions follow the attention mask as ``generate``'s own are (real tokens count from 0
    after the padding), so the cached keys are the ones ``generate``'s prefill would write.
    :return: the cache, or None when the model's cache has no ``batch_repeat_interleave``
        (not a transformers ``DynamicCache``): the caller then lets ``generate`` prefill.
    """
    from rlhf_env.envs.kv_cache import output_cache

    head, head_mask = input_ids[:, :-1], mask[:, :-1]
    out = model(input_ids=head, attention_mask=head_mask, position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(copies)
    return cache


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    num_samples: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    system_prompt: Any = TEMPLATE_DEFAULT,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool | str = True,
    logprobs: bool = False,
    share_prompt_cache: bool = True,
) -> Completions:
    """Completions of ``model`` for every prompt, batched, with a KV cache.

    :param model: a Hugging Face causal LM (``generate`` is called on it; LoRA-wrapped
        layers are fine), or anything :func:`resolve_policy` accepts with ``tokenizer=None``.
    :param tokenizer: its tokenizer (``None`` when ``model`` is resolved by :func:`resolve_policy`).
    :param prompts: strings or chat-message lists.
    :param num_samples: completions per prompt (sampling only; greedy gives one).
    :param greedy: argmax decoding instead of sampling.
    :param temperature: sampling temperature (> 0), the softmax of ``logits / temperature``.
    :param top_k: keep only the ``k`` most likely tokens when sampling (0: all, the env's
        default distribution).
    :param max_new_tokens: length limit of a completion.
    :param system_prompt: the system message of every prompt, as the env's ``system_prompt=``:
        ``TEMPLATE_DEFAULT`` (the chat template's), a string, or ``None`` (none).
    :param seed: the same seed, prompts and batch size give the same completions on CPU;
        the caller's torch random state is left as it was.
    :param batch_size: sequences per ``generate`` call (``num_samples`` of a prompt count
        as ``num_samples`` sequences).
    :param device: where inputs go (default: the model's device).
    :param progress: show a tqdm bar (a string: the bar's label).
    :param logprobs: also return each sampled token's log-probability
        (:attr:`Completions.logprobs`), computed from the logits ``generate`` already
        produced (Hugging Face's ``output_logits``): the same numbers as a teacher-forced
        forward over the sampled tokens (:func:`rlhf_env.judges.response_logprobs`) up to
        float rounding (the KV-cached, left-padded decoding pass against one full forward),
        without that forward. Keeps ``batch_size x max_new_tokens`` vocabulary-sized logit
        rows per batch while it runs.
    :param share_prompt_cache: with ``num_samples > 1``, prefill each prompt once and repeat
        its KV cache for its samples (:func:`prompt_cache`); ``False``, or a model whose cache
        cannot be repeated, prefills every copy (``num_return_sequences``). Both draw the same
        completions up to float rounding.
    :return: :class:`Completions`, one list of ``num_samples`` entries per prompt.
    """
    from tqdm.auto import tqdm

    if tokenizer is None:
        model, tokenizer = resolve_policy(model, device)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if greedy and num_samples != 1:
        raise ValueError(f"greedy decoding gives one completion per prompt; got num_samples={num_samples} (sample instead)")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling (use greedy=True for argmax), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    eos_ids.discard(None)

    encoded = [prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    # longest first within a run, so a batch holds prompts of similar length (less padding)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, batch_size // num_samples)
    out_texts: list[list[str]] = [[] for _ in prompts]
    out_lens: list[list[int]] = [[] for _ in prompts]
    out_done: list[list[bool]] = [[] for _ in prompts]
    out_ids: list[list[list[int]]] = [[] for _ in prompts]
    out_lp: list[list[list[float]]] | None = [[] for _ in prompts] if logprobs else None
    options: dict[str, Any] = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=float(temperature), top_k=int(top_k), top_p=1.0)
    was_training = model.training
    model.eval()
    label = progress if isinstance(progress, str) else ("greedy decoding" if greedy else "sampling")
    bar = tqdm(total=len(prompts), desc=label, unit="prompt", disable=progress is False or not prompts)
    try:
        for b, start in enumerate(range(0, len(order), per_batch)):
            rows = order[start : start + per_batch]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device)
            copies: dict[str, Any] = dict(num_return_sequences=num_samples)
            if share_prompt_cache and num_samples > 1 and width > 1:
                cache = prompt_cache(model, input_ids, mask, num_samples)
                if cache is not None:  # generate runs only the last prompt token, on the repeated cache
                    input_ids, mask = input_ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
                    copies = dict(cache=cache)
            with _seeded(seed * 1_000_003 + b, device):
                gen = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=int(max_new_tokens),
                    **copies,
                    pad_token_id=pad_id,
                    eos_token_id=sorted(eos_ids),
                    **options,
                    **(dict(output_logits=True, return_dict_in_generate=True) if logprobs else {}),
                )
            token_lp = None
            if logprobs:
                gen, steps = gen.sequences, gen.logits
                new_ids = gen[:, width:]
                # log pi(a_t) of each sampled token, step by step (never a (batch, steps, vocab) tensor)
                token_lp = torch.stack([
                    sampling_log_probs(step.float(), 1.0 if greedy else float(temperature), 0 if greedy else int(top_k))
                    .gather(-1, new_ids[:, t : t + 1]).squeeze(-1)
                    for t, step in enumerate(steps)], dim=1).cpu().tolist()
            new = gen[:, width:].cpu()
            for r, seq in enumerate(new.tolist()):
                i = rows[r // num_samples]
                n, done = len(seq), False
                for t, tok in enumerate(seq):
                    if tok in eos_ids:
                        n, done = t + 1, True
                        break
                out_texts[i].append(tokenizer.decode(seq[:n], skip_special_tokens=True).strip())
                out_lens[i].append(n)
                out_done[i].append(done)
                out_ids[i].append(seq[:n])
                if out_lp is not None:
                    out_lp[i].append(token_lp[r][:n])
            bar.update(len(rows))
    finally:
        bar.close()
        if was_training:
            model.train()
    return Completions(out_texts, out_lens, out_done, out_ids, out_lp)
