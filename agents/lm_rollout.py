"""Sequence-level machinery shared by the text agents (PPO and GRPO on ``TextRLHF``).

In the token MDP every state is a prefix of the next one, so the generic on-policy path
(one policy forward per stored state, as SB3 does) repeats the same work once per
token. Here a rollout is regrouped into *segments*: the tokens one environment produced
in a row from the same context (normally a whole response). All tokens of a segment are
evaluated by ONE forward over ``context + response`` (teacher forcing), which yields, for
every response token ``a_t``, the new ``log pi(a_t | s_t)``, the entropy of
``pi(. | s_t)`` and the value ``V(s_t)`` (the value head reads the trunk's hidden state
at the last token of ``s_t``, the same position whose logits predict ``a_t``).

The functions here are pure (tensors in, tensors out) so that they can be tested alone:

* :class:`TextSegment`: one response (or part of one) with its per-token rollout data.
* :func:`token_gae`: GAE over the tokens of a segment.
* :func:`evaluate_segments`: the teacher-forced forward.
* :func:`kept_trunk_batch` / :func:`evaluate_kept`: the same forward from the frozen lower
  blocks' output that the rollout kept (only the trainable top blocks run).
* :func:`evaluate_shared_context`: the same forward for responses to one prompt, the
  prompt run once.
* :func:`group_advantages`: GRPO's group-normalised score advantages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import torch

from agents import distributed
from envs.lm_core import sampling_log_probs


@dataclass
class TextSegment:
    """The tokens one environment produced in a row from one context.

    :param context_ids: token ids of the state before the first action (the prompt, plus
        any part of the response generated in an earlier rollout).
    :param response_ids: the actions, one token id each, shape ``(T,)``.
    :param old_logprobs: ``log pi_old(a_t | s_t)`` under the policy that acted, ``(T,)``.
    :param rewards: per-token rewards from the env (KL penalty + score at the last), ``(T,)``.
    :param old_values: ``V_old(s_t)``, ``(T,)`` (zeros for critic-free agents).
    :param ref_logprobs: ``log pi_ref(a_t | s_t)`` from the env's info, ``(T,)``.
    :param terminated: whether the response ended inside this segment (EOS or length
        limit): then there is no value to bootstrap after the last token.
    :param last_value: ``V(s_T)`` to bootstrap from when not terminated.
    :param score: the reward-model score of the finished response (None if unfinished).
    :param prompt: the prompt text, for logging.
    :param response: the decoded response, for logging.
    :param group: index of the prompt group (GRPO), or -1.
    :param trunk_states: the actor's hidden states entering its first trainable block for
        the first ``len(context_ids) + T - 1`` tokens, kept by the env during the rollout
        (None when not kept); see :func:`kept_trunk_batch`.
    :param trunk_sig: the :func:`envs.trunk_states.frozen_signature` they were made under.
    """

    context_ids: torch.Tensor
    response_ids: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    terminated: bool = True
    last_value: float = 0.0
    score: float | None = None
    prompt: str = ""
    response: str = ""
    group: int = -1
    advantages: torch.Tensor | None = field(default=None, repr=False)
    returns: torch.Tensor | None = field(default=None, repr=False)
    trunk_states: torch.Tensor | None = field(default=None, repr=False)
    trunk_sig: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])


def token_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    last_value: float = 0.0,
    terminated: bool = True,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the tokens of one segment.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` with ``V(s_T) = 0`` after a finished
    response (else ``last_value``), ``A_t = delta_t + gamma * lambda * A_{t+1}``,
    ``returns = A + V``.

    :param rewards: per-token rewards, shape ``(T,)``.
    :param values: ``V(s_t)`` for each token, ``(T,)``.
    :param last_value: value of the state after the last token, used when not terminated.
    :param terminated: the response ended with the last token (nothing to bootstrap).
    :param gamma: discount (1 for text: the score arrives at the end of a short episode).
    :param gae_lambda: GAE lambda.
    :return: ``(advantages, returns)``, each ``(T,)``.
    """
    from agents.buffers import compute_gae  # the (T, n_envs) GAE of the generic path

    T = rewards.shape[0]
    terminal = torch.zeros((T, 1))
    terminal[-1, 0] = float(terminated)
    advantages, returns = compute_gae(
        rewards.float().reshape(T, 1),
        values.float().reshape(T, 1),
        terminated=terminal,
        truncated=torch.zeros((T, 1)),
        last_values=torch.tensor([0.0 if terminated else float(last_value)]),
        gamma=gamma,
        gae_lambda=gae_lambda,
    )
    return advantages.reshape(T), returns.reshape(T)


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4, scale: bool = True
) -> torch.Tensor:
    """GRPO's advantage of each response: ``(score - group mean) / (group std + eps)``.

    :param scores: one score per response, ``(N,)``.
    :param group_ids: the prompt group of each response, ``(N,)`` (integers).
    :param eps: added to the standard deviation, so a group whose responses all scored
        the same gets advantage 0 instead of a division by zero.
    :param scale: divide by the group standard deviation (Dr. GRPO sets this False).
    :return: advantages, ``(N,)``.
    """
    scores = scores.double()
    advantages = torch.zeros_like(scores)
    for g in torch.unique(group_ids):
        members = group_ids == g
        s = scores[members]
        centred = s - s.mean()
        if scale:
            # unbiased std as in the paper and TRL; a singleton group has no spread
            std = s.std() if s.numel() > 1 else torch.zeros((), dtype=s.dtype)
            centred = centred / (std + eps)
        advantages[members] = centred
    return advantages.float()


@dataclass
class SegmentEval:
    """Outputs of :func:`evaluate_segments`, each a list with one ``(T_i,)`` tensor per
    segment (``values`` is None without a value head)."""

    logprobs: list[torch.Tensor]
    entropies: list[torch.Tensor]
    values: list[torch.Tensor] | None


def _trunk_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer trunk and the LM head of a Hugging Face causal LM (PEFT-wrapped
    or not). LoRA layers are injected in place, so the trunk of the base model still
    runs them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if head is None or trunk is None:
        raise TypeError(
            f"{type(base).__name__} is not a Hugging Face causal LM with a decoder and an "
            "output embedding; the text agents need one (e.g. AutoModelForCausalLM)"
        )
    return trunk, head


def pack_segments(
    segments: Sequence[TextSegment], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``context + response`` of each segment into one batch.

    Right padding keeps every real token at its natural position (0, 1, ...), so no
    position ids are needed.

    :return: ``(input_ids, attention_mask, positions, targets)``: ``(B, L)`` ids and mask;
        ``positions`` ``(B, Tmax)`` the index of the token whose output predicts each
        response token (padded with 0) and ``targets`` ``(B, Tmax)`` the response tokens
        (padded with 0). A ``(B, Tmax)`` mask of real response tokens is
        ``positions > 0`` or better ``response_mask(segments)``.
    """
    lengths = [len(s.context_ids) + len(s) for s in segments]
    L = max(lengths)
    Tmax = max(len(s) for s in segments)
    B = len(segments)
    input_ids = torch.full((B, L), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, Tmax), dtype=torch.long)
    targets = torch.zeros((B, Tmax), dtype=torch.long)
    for i, s in enumerate(segments):
        c, T = len(s.context_ids), len(s)
        if c == 0:
            raise ValueError("a text segment needs a non-empty context (at least the prompt)")
        input_ids[i, :c] = s.context_ids
        input_ids[i, c : c + T] = s.response_ids
        attention_mask[i, : c + T] = 1
        positions[i, :T] = torch.arange(c - 1, c - 1 + T)
        targets[i, :T] = s.response_ids
    return input_ids.to(device), attention_mask.to(device), positions.to(device), targets.to(device)


def response_mask(segments: Sequence[TextSegment], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, Tmax)`` float mask of the real response tokens of :func:`pack_segments`."""
    Tmax = max(len(s) for s in segments)
    mask = torch.zeros((len(segments), Tmax))
    for i, s in enumerate(segments):
        mask[i, : len(s)] = 1.0
    return mask.to(device)


def pad_field(segments: Sequence[TextSegment], name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack the per-token field ``name`` of each segment into ``(B, Tmax)``, zero-padded."""
    Tmax = max(len(s) for s in segments)
    out = torch.zeros((len(segments), Tmax))
    for i, s in enumerate(segments):
        out[i, : len(s)] = getattr(s, name).float()
    return out.to(device)


def evaluate_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One teacher-forced forward: log-probs (and entropies, values) of the target tokens.

    Only the hidden states at ``positions`` go through the LM head, so the prompt tokens
    cost no vocabulary-sized matrix product.

    :param model: Hugging Face causal LM (possibly PEFT-wrapped).
    :param input_ids: ``(B, L)``.
    :param attention_mask: ``(B, L)``.
    :param positions: ``(B, T)`` index of the hidden state that predicts each target.
    :param targets: ``(B, T)`` target token ids.
    :param value_head: maps hidden states ``(..., H)`` to values ``(..., 1)`` or ``(...)``;
        None for no values.
    :param temperature: the sampling temperature of the env; log-probs are those of
        ``softmax(logits / temperature)``, the distribution the actions were drawn from.
    :param with_entropy: also return the entropy of each predicted distribution.
    :param top_k: the env's top-k (0 = off), part of the sampling distribution.
    :param entropy_grad: False computes the entropies without gradient (for logging only:
        a loss with ``ent_coef = 0`` then skips their vocabulary-sized backward).
    :return: ``(logprobs, entropies, values)``, each ``(B, T)`` (the last two may be None).
    """
    trunk, head = _trunk_and_head(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
    return _token_outputs(hidden, head, positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad)


def _token_outputs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    positions: torch.Tensor,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None,
    temperature: float,
    with_entropy: bool,
    top_k: int,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs, entropies and values at ``positions`` of the decoder's normed last
    hidden state ``(B, L, H)`` (the tail of :func:`evaluate_tokens`)."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    h = torch.gather(hidden, 1, index)  # (B, T, H)
    logp_all = sampling_log_probs(head(h), temperature, top_k)
    logprobs = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
    entropies = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropies = -(logp_all.exp() * logp_all).sum(-1)
    values = None
    if value_head is not None:
        values = value_head(h)
        if values.dim() == 3:
            values = values.squeeze(-1)
        values = values.float()
    return logprobs, entropies, values


def group_by_context(segments: Sequence[TextSegment]) -> list[list[TextSegment]]:
    """The segments split into runs with equal contexts (first-seen order, order kept
    inside each run), so each run's micro-batches can use :func:`evaluate_shared_context`."""
    runs: dict[tuple, list[TextSegment]] = {}
    for seg in segments:
        runs.setdefault(tuple(seg.context_ids.tolist()), []).append(seg)
    return list(runs.values())


def shared_context(segments: Sequence[TextSegment]) -> bool:
    """Whether two or more segments all continue the same context (a GRPO group's responses
    to one prompt), so :func:`evaluate_shared_context` applies."""
    if len(segments) < 2 or any(len(s) == 0 for s in segments):
        return False
    first = segments[0].context_ids
    return all(s.context_ids.shape == first.shape and torch.equal(s.context_ids, first) for s in segments[1:])


def evaluate_shared_context(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    pad_token_id: int,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`evaluate_tokens` for segments with one common context (:func:`shared_context`):
    the context runs ONCE (its KV cache, with gradients, repeated to every segment) and
    then the responses, so a group of ``G`` responses to a prompt of ``c`` tokens costs
    ``c + G * T`` token-forwards instead of ``G * (c + T)``. Same outputs, in the layout of
    :func:`pack_segments` (``(B, Tmax)``), up to float rounding; gradients flow through
    the shared context into every weight.
    """
    from envs.lm_core import _output_cache

    trunk, head = _trunk_and_head(model)
    device = next(model.parameters()).device
    context = segments[0].context_ids.to(device)
    c, B, T = len(context), len(segments), max(len(s) for s in segments)
    first = trunk(input_ids=context[None], use_cache=True)
    hidden = first.last_hidden_state[:, -1:].expand(B, 1, -1)
    targets = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(segments):
        targets[i, : len(s)] = s.response_ids
    targets = targets.to(device)
    if T > 1:
        cache = _output_cache(first)
        cache.batch_repeat_interleave(B)
        # the responses' tokens but the last (which predicts nothing), right-padded
        response_mask = torch.zeros((B, T - 1), dtype=torch.long)
        for i, s in enumerate(segments):
            response_mask[i, : len(s) - 1] = 1
        feed = targets[:, : T - 1].masked_fill(~response_mask.bool().to(device), int(pad_token_id))
        attention_mask = torch.cat([torch.ones((B, c), dtype=torch.long), response_mask], 1).to(device)
        position_ids = (c + torch.arange(T - 1, device=device))[None].expand(B, T - 1)
        rest = trunk(input_ids=feed, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        hidden = torch.cat([hidden, rest.last_hidden_state], 1)
    positions = torch.arange(T, device=device)[None].expand(B, T)
    return _token_outputs(hidden, head, positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad)


def kept_trunk_batch(model: torch.nn.Module, segments: Sequence[TextSegment]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(hidden (B, L, H), attention_mask (B, L), split)``: the kept frozen-trunk states of
    ``segments`` right-padded, when every segment has them and they were made by the
    model's current frozen weights (same :func:`envs.trunk_states.frozen_signature`, so
    the lower blocks are still frozen and unchanged); else None (run the full forward).
    ``L`` is one less than :func:`pack_segments`'s width: the last token predicts nothing."""
    from envs.reference import decoder_parts
    from envs.trunk_states import frozen_signature, pad_states

    sig = segments[0].trunk_sig if segments else None
    if sig is None or any(s.trunk_states is None or s.trunk_sig != sig for s in segments):
        return None
    parts = decoder_parts(_base_model(model))[0]
    if parts is None or frozen_signature(parts, sig[0]) != sig:
        return None
    device = next(model.parameters()).device
    hidden, mask = pad_states([s.trunk_states.to(device) for s in segments])
    return hidden, mask, sig[0]


def evaluate_kept(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    split: int,
    positions: torch.Tensor,
    targets: torch.Tensor,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`evaluate_tokens` from kept frozen-trunk states (:func:`kept_trunk_batch`):
    only blocks ``split ..``, the final norm and the head run (with gradients), on the
    model's own decoder code (:func:`envs.trunk_states.top_hidden`); equal to the full
    forward up to float rounding."""
    from envs.reference import decoder_parts
    from envs.trunk_states import top_hidden

    parts = decoder_parts(_base_model(model))[0]
    h = top_hidden(parts, split, hidden, attention_mask)
    return _token_outputs(h, parts["head"], positions, targets, value_head, temperature, with_entropy, top_k, entropy_grad)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def evaluate_segments(
    model: torch.nn.Module,
    segments: Sequence[TextSegment],
    pad_token_id: int,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    top_k: int = 0,
) -> SegmentEval:
    """:func:`evaluate_tokens` on whole segments: one forward for all their tokens.

    :param model: Hugging Face causal LM.
    :param segments: the segments to evaluate (one forward for all of them: split them
        into micro-batches upstream to bound memory).
    :param pad_token_id: id used to right-pad.
    :param value_head: see :func:`evaluate_tokens`.
    :param temperature: see :func:`evaluate_tokens`.
    :param with_entropy: see :func:`evaluate_tokens`.
    :param top_k: see :func:`evaluate_tokens`.
    :return: per-segment log-probs, entropies and values.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, positions, targets = pack_segments(segments, pad_token_id, device)
    logprobs, entropies, values = evaluate_tokens(
        model, input_ids, attention_mask, positions, targets, value_head, temperature, with_entropy, top_k
    )
    lengths = [len(s) for s in segments]
    return SegmentEval(
        logprobs=[logprobs[i, :T] for i, T in enumerate(lengths)],
        entropies=[entropies[i, :T] for i, T in enumerate(lengths)] if entropies is not None else [],
        values=[values[i, :T] for i, T in enumerate(lengths)] if values is not None else None,
    )


def micro_batches(items: Sequence, max_tokens: int, length: Callable[[object], int]) -> list[list]:
    """Split ``items`` into consecutive micro-batches whose padded size (count x longest)
    stays under ``max_tokens`` (at least one item each): gradient accumulation over
    these bounds the activation memory of a minibatch.

    :param items: the items (segments).
    :param max_tokens: budget of padded tokens per micro-batch.
    :param length: the padded length of an item (context + response).
    """
    batches: list[list] = []
    current: list = []
    longest = 0
    for item in items:
        n = length(item)
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------
# rollout collection


def _info_value(infos: Any, key: str, i: int) -> Any:
    """``infos[key]`` of sub-env ``i`` for Gymnasium vector infos (dict of arrays with a
    ``_key`` mask) and SB3 infos (list of dicts); None when it is not set for ``i``."""
    if isinstance(infos, dict):
        # SAME_STEP autoreset (SyncVectorEnv of single envs): the finished step's info sits
        # under "final_info", the reset's info in the main dict
        final = infos.get("final_info")
        if isinstance(final, dict) and infos.get("_final_info") is not None and infos["_final_info"][i]:
            value = _info_value(final, key, i)
            if value is not None:
                return value
        if key not in infos:
            return None
        mask = infos.get("_" + key)
        if mask is not None and not mask[i]:
            return None
        return infos[key][i]
    if isinstance(infos, (list, tuple)) and i < len(infos):
        return infos[i].get(key)
    return None


def find_text_env(env: Any) -> Any:
    """The unwrapped text env (batched vector env or single env) behind ``env`` (an
    adapter, a vector env, an SB3 VecEnv or a Gymnasium env), or None."""
    inner = getattr(env, "env", env)  # VecEnvAdapter -> its env
    for candidate in (inner, getattr(inner, "unwrapped", None)):
        if candidate is not None and hasattr(candidate, "kl_coef") and hasattr(candidate, "core"):
            return candidate
    envs = getattr(inner, "envs", None)  # SyncVectorEnv / DummyVecEnv of single envs
    if envs:
        first = getattr(envs[0], "unwrapped", envs[0])
        if hasattr(first, "kl_coef") and hasattr(first, "core"):
            return first
    return None


@dataclass
class RolloutStats:
    """What a text rollout produced besides its segments (for logging)."""

    scores: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)  # KL per finished response (sum of per-token kl)
    lengths: list[int] = field(default_factory=list)
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # (prompt, response, score)
    n_steps: int = 0


class _OpenSegment:
    __slots__ = ("context", "tokens", "logprobs", "rewards", "values", "ref_logprobs", "group")

    def kept(self, contexts: Any, row: int) -> tuple[torch.Tensor, tuple] | None:
        """The env's kept trunk states of this segment's tokens (all but the last), if any."""
        if contexts is None or not self.tokens:
            return None
        return contexts.kept_states(row, self.context.tolist() + self.tokens[:-1])

    def __init__(self, context: torch.Tensor, group: int):
        self.context = context
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.rewards: list[float] = []
        self.values: list[float] = []
        self.ref_logprobs: list[float] = []
        self.group = group

    def close(self, terminated: bool, last_value: float, score: float | None, prompt: str, response: str,
              kept: tuple[torch.Tensor, tuple] | None = None) -> TextSegment:
        t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
        return TextSegment(
            context_ids=self.context,
            response_ids=torch.tensor(self.tokens, dtype=torch.long),
            old_logprobs=t(self.logprobs),
            rewards=t(self.rewards),
            old_values=t(self.values),
            ref_logprobs=t(self.ref_logprobs),
            terminated=terminated,
            last_value=last_value,
            score=score,
            prompt=prompt or "",
            response=response or "",
            group=self.group,
            trunk_states=None if kept is None else kept[0],
            trunk_sig=None if kept is None else kept[1],
        )


def collect_text_rollout(
    algo: Any,
    env: Any,
    callback: Any,
    n_rollout_steps: int,
    groups: list[int] | None = None,
) -> tuple[bool, list[TextSegment], RolloutStats]:
    """Run the env with the algorithm's LM policy and regroup what happened into segments.

    Two modes:

    * ``groups is None`` (PPO): ``n_rollout_steps`` steps of every env, as SB3 does; a
      response still open at the end becomes a segment with ``terminated=False`` that
      bootstraps from ``V(s_T)``, and the next rollout continues it from its current context.
    * ``groups`` given (GRPO): the caller has just reset env ``i`` to a prompt of group
      ``groups[i]``; the rollout runs until every env has finished that one response
      (at most ``n_rollout_steps`` steps) and returns exactly one segment per env.

    Per step the policy acts from the env's observation (its forward is a lookup in the
    env's step cache), and the log-probability, value, reward and the env's info
    (``ref_logprob``, ``kl``, ``score``, ``prompt``, ``response``) are recorded per token.

    With the batched env, its ``keep_trunk`` is switched on and each segment takes the
    actor's frozen-trunk states of its tokens (``TextSegment.trunk_states``) for the
    update (see :func:`kept_trunk_batch`).

    :param algo: the algorithm (its ``policy``, ``_last_obs``, counters, episode stats).
    :param env: its :class:`agents.vec_env.VecEnvAdapter`.
    :param callback: the callback of ``learn`` (``on_step`` is called every step).
    :param n_rollout_steps: steps per env.
    :param groups: group index of each env (GRPO mode), or None.
    :return: ``(continue_training, segments, stats)``.
    """
    from agents.preprocessing import as_tensor

    policy = algo.policy
    policy.set_training_mode(False)
    device = algo.device
    n_envs = env.num_envs
    open_segs: list[_OpenSegment | None] = [None] * n_envs
    segments: list[TextSegment] = []
    stats = RolloutStats()
    finished_once = np.zeros(n_envs, dtype=bool)
    # KL and length of each env's current response, kept across rollouts (a PPO response
    # can start in one rollout and end in the next)
    if getattr(algo, "_response_kl", None) is None or len(algo._response_kl) != n_envs or groups is not None:
        algo._response_kl = np.zeros(n_envs)
        algo._response_len = np.zeros(n_envs, dtype=np.int64)
    text_env = find_text_env(env)
    contexts = getattr(text_env, "contexts", None) if hasattr(text_env, "num_envs") else None
    if contexts is not None and not contexts.keep_trunk:
        contexts.keep_trunk = True  # contexts prefilled from now on keep their trunk states
    callback.on_rollout_start()
    n_steps = 0
    last_obs = algo._last_obs
    while n_steps < n_rollout_steps:
        obs_tensor = as_tensor(last_obs, algo.observation_space, device)
        with torch.no_grad():
            actions, values, log_probs = policy(obs_tensor)
        step = env.step(actions.cpu().numpy())
        algo.num_timesteps += n_envs * distributed.world_size()  # counted over ranks: all run as many iterations
        callback.update_locals(locals())
        if not callback.on_step():
            algo._last_obs = step.obs
            return False, segments, stats
        done = step.terminated | step.truncated
        algo._update_episode_stats(step.rewards, done, step.valid)
        actions_l = actions.reshape(-1).tolist()
        values_l = values.reshape(-1).tolist()
        logp_l = log_probs.reshape(-1).tolist()
        for i in range(n_envs):
            if not step.valid[i] or (groups is not None and finished_once[i]):
                continue
            seg = open_segs[i]
            if seg is None:
                n = int(last_obs["attention_mask"][i].sum())
                context = torch.as_tensor(np.asarray(last_obs["input_ids"][i][:n]), dtype=torch.long)
                seg = open_segs[i] = _OpenSegment(context, -1 if groups is None else groups[i])
            seg.tokens.append(int(actions_l[i]))
            seg.logprobs.append(float(logp_l[i]))
            seg.values.append(float(values_l[i]))
            seg.rewards.append(float(step.rewards[i]))
            ref = _info_value(step.infos, "ref_logprob", i)
            kl = _info_value(step.infos, "kl", i)
            seg.ref_logprobs.append(float(ref) if ref is not None else float("nan"))
            algo._response_kl[i] += float(kl) if kl is not None else 0.0
            algo._response_len[i] += 1
            if done[i]:
                score = _info_value(step.infos, "score", i)
                prompt = _info_value(step.infos, "prompt", i)
                response = _info_value(step.infos, "response", i)
                # a time-limit truncation (outer wrapper) still has a future: bootstrap it
                last_value = 0.0
                if step.truncated[i] and not step.terminated[i]:
                    last_value = _truncation_value(algo, step, i, device)
                segments.append(seg.close(bool(step.terminated[i]), last_value,
                                          None if score is None else float(score), prompt, response,
                                          kept=seg.kept(contexts, i)))
                if score is not None:
                    stats.scores.append(float(score))
                    stats.kls.append(float(algo._response_kl[i]))
                    stats.lengths.append(int(algo._response_len[i]))
                    stats.samples.append((str(prompt or ""), str(response or ""), float(score)))
                open_segs[i] = None
                finished_once[i] = True
                algo._response_kl[i] = 0.0
                algo._response_len[i] = 0
        last_obs = step.obs
        algo._last_obs = step.obs
        algo._last_episode_starts = ~step.valid if env.next_step_autoreset else done
        n_steps += 1
        if groups is not None and finished_once.all():
            break
    stats.n_steps = n_steps
    # responses still open: bootstrap from the value of their current state
    still_open = [i for i in range(n_envs) if open_segs[i] is not None]
    if still_open:
        with torch.no_grad():
            last_values = policy.predict_values(as_tensor(last_obs, algo.observation_space, device)).reshape(-1)
        for i in still_open:
            segments.append(open_segs[i].close(False, float(last_values[i]), None, "", "", kept=open_segs[i].kept(contexts, i)))
    callback.update_locals(locals())
    callback.on_rollout_end()
    return True, segments, stats


def _truncation_value(algo: Any, step: Any, i: int, device: Any) -> float:
    from agents.preprocessing import as_tensor

    obs = step.final_obs if step.final_obs is not None else step.obs
    row = {k: v[i : i + 1] for k, v in obs.items()}
    with torch.no_grad():
        return float(algo.policy.predict_values(as_tensor(row, algo.observation_space, device)).reshape(-1)[0])
