"""Shared pytest fixtures (generic: any helper's tests may use them).

- ``tiny_lm_dir`` (session): a Hugging Face model directory written by ``save_pretrained``
  in the test session: a randomly initialised 2-layer ``LlamaForCausalLM`` (hidden 32) and a
  byte-level BPE tokenizer trained in-test with ``tokenizers`` (vocab about 300, with
  ``<pad>``, ``<s>``, ``</s>``). Loads in milliseconds through ``rlhf_env.load_lm(dir)``.
- ``tiny_prompts``: a handful of short English prompts of different lengths.
- ``one_thread``: runs the test with ``torch.set_num_threads(1)`` (restored after). Tiny
  models on this busy 2-core machine run several times faster single-threaded (thread
  spin-waits dominate their small ops). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
- ``_fresh_model_registry`` (autouse): no test reuses a model another test loaded by name.
- ``length_reward``: a cheap deterministic reward callable ``(prompts, responses) -> tensor``
  (fraction of the letter "e" in each response).

Stable-Baselines3's own algorithms (the peer, and SB3 PPO driving our LM policy) make a
logger folder even when they log nothing: ``$SB3_LOGDIR``, else a new ``/tmp/SB3-<time>``
per model. The session points ``SB3_LOGDIR`` into pytest's temporary folder, so the suite
leaves nothing in ``/tmp``.

Tests marked ``@pytest.mark.slow`` (real models such as SmolLM2-135M) are skipped unless
pytest runs with ``--runslow`` or ``RLHF_ENV_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _sb3_logdir(tmp_path_factory):
    """SB3's logger folder (see the module docstring) inside pytest's temporary folder."""
    old = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3_logs"))
    yield
    if old is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = old

CORPUS = [
    "the cat sat on the mat and looked at the sun",
    "a good day starts with a warm cup of tea",
    "we like to read books about the sea and the stars",
    "please tell me a short happy story about a dog",
    "thank you, that was a very nice answer",
    "what is the best way to learn to play the piano",
    "the weather is lovely and bright today",
    "i feel great because my friends came to visit",
]

PROMPTS = [
    "tell me a story",
    "what is the weather like",
    "say something nice about cats and dogs and the sea",
    "hello",
    "how do i learn the piano quickly and well",
]


def build_tiny_lm_dir(path: pathlib.Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> pathlib.Path:
    """Write a random tiny Llama causal LM and an in-test BPE tokenizer to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # larger logits than the default init, so the policy is far from uniform and KL terms are not tiny
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_model_registry(monkeypatch):
    """Each test starts as a new process does: ``gym.make`` by model name shares the live actor
    of an earlier env of the process (``rlhf_env.registration._LOADED``, weak references), so
    without this an earlier test's trained tiny actor, if not yet collected, would be a later
    test's starting point, and a test's outcome would depend on the order and on the garbage
    collector. Sharing within one test is unchanged."""
    from rlhf_env import registration

    monkeypatch.setattr(registration, "_LOADED", {})


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> pathlib.Path:
    """Directory of a random 2-layer Llama + in-test tokenizer, written by save_pretrained."""
    return build_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def one_thread():
    """Run the test single-threaded (restores torch's thread count afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_prompts() -> list[str]:
    """Short prompts of different token lengths."""
    return list(PROMPTS)


def _length_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.tensor([r.count("e") / max(len(r), 1) for r in responses], dtype=torch.float32)


@pytest.fixture
def length_reward():
    """Deterministic reward callable: fraction of the letter 'e' in the response."""
    return _length_reward


def tiny_v0_scorer(env, n_prompts: int = 32, max_new_tokens: int = 12):
    """A function returning the mean reward-model score of the env's actor on the first
    ``n_prompts`` held-out prompts (seeded sampling): the learning tests' before/after."""
    from rlhf_env.generation import generate
    from rlhf_env.prompts import load_prompts

    core = env.unwrapped.core
    prompts = load_prompts(split="test")[:n_prompts]

    def mean_score() -> float:
        texts = generate(core.actor, core.tokenizer, prompts, max_new_tokens=max_new_tokens, seed=1, progress=False).flat()
        return float(env.unwrapped.reward_model(prompts, texts).mean())

    return mean_score


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: loads a real model (SmolLM2-135M); runs with --runslow or RLHF_ENV_SLOW_TESTS=1"
    )


def pytest_collection_modifyitems(config, items):
    import os

    if config.getoption("--runslow") or os.environ.get("RLHF_ENV_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow (real model): run with --runslow or RLHF_ENV_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
