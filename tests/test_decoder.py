"""envs.decoder: one answer to "where are the blocks, the trunk, the head" for every caller."""

from __future__ import annotations

import pytest
import torch


def test_the_decoder_helpers_agree_on_a_llama_and_a_gpt2(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from envs.decoder import decoder_blocks, decoder_parts, set_trainable, trunk_and_head
    from rlhf_env.training import train_last_layers

    llama = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    parts, reason = decoder_parts(llama)
    assert reason is None and decoder_blocks(llama) is parts["layers"] is llama.model.layers
    trunk, head = trunk_and_head(llama)
    assert trunk is parts["inner"] and head is parts["head"]
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(input_ids=ids).last_hidden_state), llama(input_ids=ids).logits)

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    assert decoder_blocks(gpt2) is gpt2.transformer.h
    assert decoder_parts(gpt2)[0] is None and "gpt2" in decoder_parts(gpt2)[1]

    for model, norm in ((llama, "model.norm."), (gpt2, "transformer.ln_f.")):
        n = len(decoder_blocks(model))
        set_trainable(model, 1)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        top = "model.layers." if model is llama else "transformer.h."
        assert trainable == {name for name, _ in model.named_parameters() if name.startswith((f"{top}{n - 1}.", norm))}
        set_trainable(model, None)
        train_last_layers(model, 1)  # the offline trainers' name for the same choice
        assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match="train_layers must be in"):
        set_trainable(llama, 9)


def test_encoder_parts_find_a_bert_trunk_and_refuse_a_causal_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, BertConfig, BertModel

    from envs.decoder import decoder_blocks, encoder_parts

    bert = BertModel(BertConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50))
    parts, reason = encoder_parts(bert)
    assert reason is None and parts["layers"] is bert.encoder.layer is decoder_blocks(bert) and parts["embed"] is bert.embeddings
    llama = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    parts, reason = encoder_parts(llama)
    assert parts is None and "not a BERT-like encoder" in reason
