"""rlhf_env.generation: the batched sampler (left padding exact, seeding, shapes, errors)."""

from __future__ import annotations

import pytest
import torch

from rlhf_env.generation import Completions, generate, prompt_ids, resolve_policy
from rlhf_env.models import encode_prompt, load_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_lm(tiny_lm_dir)


def _greedy_unbatched(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Argmax decoding of one prompt with full forwards (no padding, no cache)."""
    ids = encode_prompt(tokenizer, prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok == tokenizer.eos_token_id:
            break
    return out


def test_greedy_equals_unbatched_argmax(lm, tiny_prompts):
    model, tokenizer = lm
    got = generate(model, tokenizer, tiny_prompts, greedy=True, max_new_tokens=8, batch_size=3, progress=False)
    assert isinstance(got, Completions) and len(got.texts) == len(tiny_prompts)
    for i, prompt in enumerate(tiny_prompts):
        want = _greedy_unbatched(model, tokenizer, prompt, 8)
        assert got.texts[i] == [tokenizer.decode(want, skip_special_tokens=True).strip()]
        assert got.num_tokens[i] == [len(want)]
        assert got.finished[i] == [want[-1] == tokenizer.eos_token_id]


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(lm, tiny_prompts):
    model, tokenizer = lm
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(model, tokenizer, tiny_prompts, num_samples=3, max_new_tokens=6, seed=7, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate(model, tokenizer, tiny_prompts, num_samples=3, max_new_tokens=6, seed=7, progress=False)
    c = generate(model, tokenizer, tiny_prompts, num_samples=3, max_new_tokens=6, seed=8, progress=False)
    assert a == b and a != c
    assert all(len(t) == 3 for t in a.texts) and len(a.flat()) == 3 * len(tiny_prompts)
    assert all(1 <= n <= 6 for row in a.num_tokens for n in row)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_logprobs_are_the_teacher_forced_log_probs_of_the_sampled_tokens(lm, tiny_prompts, temperature, top_k):
    model, tokenizer = lm
    kw = dict(num_samples=2, max_new_tokens=6, seed=5, temperature=temperature, top_k=top_k, batch_size=3, progress=False)
    plain = generate(model, tokenizer, tiny_prompts, **kw)
    got = generate(model, tokenizer, tiny_prompts, logprobs=True, **kw)
    assert plain.logprobs is None
    assert got.token_ids == plain.token_ids and got.texts == plain.texts  # recording them changes no sample
    with torch.no_grad():
        for i, prompt in enumerate(tiny_prompts):
            ctx = encode_prompt(tokenizer, prompt)
            for ids, lps in zip(got.token_ids[i], got.logprobs[i]):
                logits = model(input_ids=torch.tensor([ctx + ids])).logits[0, len(ctx) - 1 : len(ctx) - 1 + len(ids)] / temperature
                if top_k:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                want = torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)]
                assert len(lps) == len(ids) and lps == pytest.approx(want.tolist(), abs=1e-5)


def test_chat_messages_and_system_prompt(lm):
    model, tokenizer = lm  # no chat template: contents joined by newlines after BOS
    assert prompt_ids(tokenizer, "hello") == encode_prompt(tokenizer, "hello")
    assert prompt_ids(tokenizer, "hello", system_prompt="be kind") == encode_prompt(tokenizer, "be kind\nhello")
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
    assert prompt_ids(tokenizer, messages, system_prompt="ignored") == encode_prompt(tokenizer, "be kind\nhello")
    a = generate(model, tokenizer, [messages], greedy=True, max_new_tokens=5, progress=False)
    b = generate(model, tokenizer, ["hello"], system_prompt="be kind", greedy=True, max_new_tokens=5, progress=False)
    assert a == b


def test_system_prompt_none_means_no_system_message_as_in_the_env():
    """generate(system_prompt=None) renders no system message, as the env's system_prompt=None
    does (it gave the template's default one); the default stays the template's."""
    from rlhf_env.models import load_lm

    model, tokenizer = load_lm("tiny")
    tokenizer.chat_template = (  # a template that adds a default system message, as SmolLM2's does
        "{% if messages[0]['role'] != 'system' %}<|system|>You are a default helper.\n{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    bare, default = prompt_ids(tokenizer, "hello", system_prompt=None), prompt_ids(tokenizer, "hello")
    assert bare == encode_prompt(tokenizer, "hello", None) and tokenizer.decode(bare) == "<|user|>hello\n<|assistant|>"
    assert default == encode_prompt(tokenizer, "hello") and "You are a default helper." in tokenizer.decode(default)
    out = generate(model, tokenizer, ["hello"], system_prompt=None, greedy=True, max_new_tokens=3, progress=False)
    assert len(out.texts) == 1


def test_resolve_policy_takes_a_directory_a_pair_and_an_agent(lm, tiny_lm_dir):
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)
    from agents import GRPO

    model, tokenizer = lm
    assert resolve_policy((model, tokenizer)) == (model, tokenizer)
    m, t = resolve_policy(str(tiny_lm_dir))
    assert m.config.vocab_size == model.config.vocab_size and t.eos_token == tokenizer.eos_token
    env = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(tiny_lm_dir), reward_model=lambda p, r: [0.0] * len(r), prompts=["hello"], max_new_tokens=4)
    agent = GRPO("LMPolicy", env, group_size=2)
    m, t = resolve_policy(agent)
    assert m is env.unwrapped.core.actor
    with pytest.raises(TypeError, match="model name or directory"):
        resolve_policy(3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(greedy=True, num_samples=2), "greedy decoding gives one"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(num_samples=0), "num_samples"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_bad_settings_are_clear_errors(lm, kwargs, match):
    model, tokenizer = lm
    with pytest.raises(ValueError, match=match):
        generate(model, tokenizer, ["hello"], progress=False, **kwargs)


def test_a_prompt_of_the_wrong_type_is_a_clear_error(lm):
    model, tokenizer = lm
    with pytest.raises(TypeError, match="must be a string or a list of chat messages"):
        generate(model, tokenizer, [3], progress=False)


@pytest.mark.parametrize("logprobs", [False, True])
def test_sharing_the_prompt_cache_draws_what_prefilling_every_copy_draws(lm, tiny_prompts, logprobs):
    """Prefilling each prompt once and repeating its cache for its samples (the default) gives
    the completions that Hugging Face's num_return_sequences gives with every copy prefilled:
    same seed, same tokens, log-probabilities equal up to float rounding."""
    model, tokenizer = lm
    prompts = tiny_prompts + ["a much longer prompt than the others, so that the batch is left-padded"]
    kw = dict(num_samples=3, max_new_tokens=7, seed=3, temperature=0.9, batch_size=6, logprobs=logprobs, progress=False)
    shared = generate(model, tokenizer, prompts, **kw)
    each = generate(model, tokenizer, prompts, share_prompt_cache=False, **kw)
    assert shared.token_ids == each.token_ids and shared.texts == each.texts and shared.finished == each.finished
    if logprobs:
        for a, b in zip(shared.logprobs, each.logprobs):
            for x, y in zip(a, b):
                assert x == pytest.approx(y, abs=1e-5)


def test_prompt_cache_holds_the_prompts_without_their_last_token_repeated(lm):
    from rlhf_env.generation import prompt_cache

    model, tokenizer = lm
    seqs = [encode_prompt(tokenizer, p) for p in ("hi", "a longer prompt here")]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    cache = prompt_cache(model, ids, mask, 2)
    assert cache.get_seq_length() == width - 1
    keys = cache.layers[0].keys
    assert keys.shape[0] == 4 and torch.equal(keys[0], keys[1]) and torch.equal(keys[2], keys[3])


def test_a_cache_that_cannot_be_repeated_falls_back_to_prefilling_every_copy(lm, tiny_prompts, monkeypatch):
    import envs.kv_cache

    from rlhf_env.generation import prompt_cache

    model, tokenizer = lm
    kw = dict(num_samples=2, max_new_tokens=5, seed=1, progress=False)
    want = generate(model, tokenizer, tiny_prompts, share_prompt_cache=False, **kw)
    monkeypatch.setattr(envs.kv_cache, "output_cache", lambda out: object())  # no batch_repeat_interleave
    ids = torch.tensor([encode_prompt(tokenizer, "hello")])
    assert prompt_cache(model, ids, torch.ones_like(ids), 2) is None
    assert generate(model, tokenizer, tiny_prompts, **kw) == want
