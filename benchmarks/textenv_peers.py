"""The peers of :mod:`benchmarks.textenv`: the same per-token rewards (``-kl_coef * (log pi -
log pi_ref)`` plus the response's score at the last token) from Hugging Face ``generate`` plus
one reference forward (``run_generate_ref``, the least a hand-written pipeline does), and from a
loop without KV cache (``run_naive``)."""

from __future__ import annotations

import torch

KL_COEF = 0.05


def left_padded(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as the env encodes them (``encode_prompt``), left-padded for batched decoding."""
    from rlhf_env.models import encode_prompt

    seqs = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: count of real tokens before each one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _SampledLogprobs:
    """Logits processor that keeps log pi(a_t | s_t) of each sampled token during generate.

    At step t it sees the token sampled at step t-1 (the last column of ``input_ids``) and the
    log-softmax it stored then; only one ``(B, vocab)`` row is kept, not every step's logits.
    """

    def __init__(self):
        self.prev: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.logprobs.append(self.prev.gather(-1, input_ids[:, -1:])[:, 0])
        self.prev = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.logprobs.append(self.prev.gather(-1, last_tokens[:, None])[:, 0])
        return torch.stack(self.logprobs, 1)


def rewards_from(logprob, ref_logprob, live, scores) -> torch.Tensor:
    """Per-token rewards: -kl_coef * k1 on every live token plus the score on the last one."""
    rewards = -KL_COEF * (logprob - ref_logprob) * live
    last = live.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(len(last)), last] += scores.to(rewards.device)
    return rewards


def _response_mask(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    is_eos = response == eos_id
    before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including EOS
    return before_eos


def run_generate_ref(actor, reference, tokenizer, reward, prompts, new_tokens, allow_eos, device) -> int:
    """``generate`` on the actor, then one full forward of the reference; returns tokens."""
    from transformers import LogitsProcessorList

    ids, mask = left_padded(tokenizer, prompts, device)
    keep = _SampledLogprobs()
    with torch.no_grad():
        out = actor.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=1 if allow_eos else new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([keep]),
        )
        response = out[:, ids.shape[1] :]
        logprob = keep.finish(response[:, -1])
        live = _response_mask(response, tokenizer.eos_token_id, tokenizer.pad_token_id)
        full_mask = torch.cat([mask, live.long()], 1)
        ref_logits = reference(
            input_ids=out, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False
        ).logits[:, ids.shape[1] - 1 : -1]
        ref_logprob = torch.log_softmax(ref_logits.float(), -1).gather(-1, response[..., None])[..., 0]
        texts = tokenizer.batch_decode(response * live + tokenizer.pad_token_id * ~live, skip_special_tokens=True)
        scores = torch.as_tensor(reward(list(prompts), texts), dtype=torch.float32)
        rewards_from(logprob, ref_logprob, live.float(), scores)
    return int(live.sum())


def run_naive(actor, reference, tokenizer, reward, prompts, new_tokens, allow_eos, device, generator) -> int:
    """Token by token, each a full forward of actor and reference without KV cache."""
    ids, mask = left_padded(tokenizer, prompts, device)
    batch = ids.shape[0]
    eos = tokenizer.eos_token_id
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    logprobs, ref_logprobs, lives, tokens = [], [], [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            pos = positions(mask)
            logits = actor(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
            ref_logits = reference(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            sample_from = logp.clone()
            if not allow_eos:
                sample_from[:, eos] = -float("inf")
            action = torch.multinomial(sample_from.softmax(-1), 1, generator=generator)[:, 0]
            action = torch.where(done, torch.full_like(action, tokenizer.pad_token_id), action)
            lives.append(~done)
            logprobs.append(logp.gather(-1, action[:, None])[:, 0])
            ref_logprobs.append(torch.log_softmax(ref_logits, -1).gather(-1, action[:, None])[:, 0])
            tokens.append(action)
            done = done | (action == eos)
            ids = torch.cat([ids, action[:, None]], 1)
            mask = torch.cat([mask, (~done | (action == eos)).long()[:, None]], 1)
            if done.all():
                break
        live = torch.stack(lives, 1)
        response = torch.stack(tokens, 1)
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        scores = torch.as_tensor(reward(list(prompts), texts), dtype=torch.float32)
        rewards_from(torch.stack(logprobs, 1), torch.stack(ref_logprobs, 1), live.float(), scores)
    return int(live.sum())
