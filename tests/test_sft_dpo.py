"""SFT and DPO: losses against hand computations, prompt masking, learning, saved folders."""

import math
from pathlib import Path

import pytest
import torch

from rlhf_env.data import PreferencePair
from rlhf_env.dpo import DPOConfig, dpo_loss, evaluate_dpo, train_dpo
from rlhf_env.sft import SFTConfig, encode_example, sft_loss, train_sft
from rlhf_env.training import length_batches, pad_right, sequence_logprobs

# small models on a busy 2-core machine run several times faster single-threaded
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = (
    "how do i keep basil alive tell me about dogs cats the weather today great wonderful lovely "
    "happy glad awful terrible bad sad no yes thanks is are it was very so you your a an and of to"
).split()


def make_tiny_lm(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Llama causal LM and a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS) | set("!?.,")))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


PAIRS = [
    PreferencePair("how do i keep basil alive", "great ! it is lovely and wonderful", "no . it is awful"),
    PreferencePair("tell me about dogs", "dogs are wonderful and happy", "dogs are bad and sad"),
    PreferencePair("tell me about cats", "cats are lovely , thanks !", "cats are terrible"),
    PreferencePair("the weather today", "the weather is very lovely today", "the weather is awful today"),
]


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: 0.5*((-3+3.5) - (-4+3)) = 0.75; pair 2: 0.5*((-5+4) - (-2+3)) = -1.0
    expected = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(chosen_rewards, torch.tensor([0.25, -0.5]))
    assert torch.allclose(rejected_rewards, torch.tensor([-0.5, 0.5]))


def test_sft_loss_ignores_prompt_tokens():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 0]])  # prompt 5 6 7, response 8 9, then padding
    logits = torch.randn(1, 6, 12)
    loss = sft_loss(logits, ids, loss_mask)
    # hand: positions 2 and 3 predict tokens 8 and 9
    logp = torch.log_softmax(logits[0], -1)
    assert loss.item() == pytest.approx(-(logp[2, 8] + logp[3, 9]).item() / 2, rel=1e-6)
    changed = logits.clone()
    changed[0, :2] = torch.randn(2, 12) * 10  # predictions of prompt tokens
    changed[0, 4:] = torch.randn(2, 12) * 10  # predictions after the response
    assert sft_loss(changed, ids, loss_mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[0, 3] += torch.randn(12)
    assert sft_loss(changed, ids, loss_mask).item() != pytest.approx(loss.item(), rel=1e-6)


def test_encode_example_formats_like_the_env(tiny_lm):
    from rlhf_env.models import encode_prompt, encode_response, load_lm

    _, tok = load_lm(tiny_lm)
    ids, n_prompt = encode_example(tok, "tell me about dogs", "dogs are happy", max_length=64)
    assert ids == encode_prompt(tok, "tell me about dogs") + encode_response(tok, "dogs are happy") + [tok.eos_token_id]
    assert n_prompt == len(encode_prompt(tok, "tell me about dogs"))
    ids, n_prompt = encode_example(tok, "tell me about dogs", "dogs are happy", max_length=5)
    assert len(ids) == 5 and ids[n_prompt:] == encode_response(tok, "dogs are happy") + [tok.eos_token_id]


def test_sequence_logprobs_do_not_depend_on_padding(tiny_lm):
    from rlhf_env.models import load_lm

    model, tok = load_lm(tiny_lm)
    seqs = [encode_example(tok, p.prompt, p.chosen, 64) for p in PAIRS]
    batch_ids, batch_mask = pad_right([s[0] for s in seqs], tok.pad_token_id)
    loss_mask = batch_mask.clone()
    for row, (_, n) in enumerate(seqs):
        loss_mask[row, :n] = 0
    with torch.no_grad():
        together = sequence_logprobs(model, batch_ids, batch_mask, loss_mask)
        for row, (ids, n) in enumerate(seqs):
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1], -1)
            hand = sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))
            assert together[row].item() == pytest.approx(hand, abs=1e-4)


def test_length_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 6, 4, 10]
    gen = torch.Generator().manual_seed(0)
    batches = length_batches(lengths, 3, shuffle=True, generator=gen)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in length_batches(lengths, 3, shuffle=False)] == [3, 3, 3, 2]


def test_sft_learns_the_response_and_saves_a_model_folder(tiny_lm, tmp_path):
    from rlhf_env.models import load_lm

    examples = [(p.prompt, p.chosen) for p in PAIRS]
    out = tmp_path / "sft_out"
    model, tok = train_sft(
        examples, str(tiny_lm), config=SFTConfig(learning_rate=3e-3, batch_size=4, epochs=60),
        output_dir=out, log_dir=tmp_path / "tb", progress=False,
    )
    reloaded, tok2 = load_lm(out)
    ids, n = encode_example(tok2, PAIRS[1].prompt, "", 64, add_eos=False)
    gen = reloaded.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert tok2.decode(gen[0, len(ids):], skip_special_tokens=True).split() == PAIRS[1].chosen.split()
    assert (tmp_path / "tb" / "sft_1").is_dir()


def test_dpo_learns_preferences_and_logs(tiny_lm, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_env.models import load_lm

    out = tmp_path / "dpo_out"
    model, tok = train_dpo(
        PAIRS, str(tiny_lm), beta=0.5, config=DPOConfig(learning_rate=3e-3, batch_size=2, epochs=15, trainable_layers=None),
        eval_pairs=PAIRS, output_dir=out, log_dir=tmp_path / "tb", progress=False,
    )
    assert model.dpo_metrics["eval/rewards/accuracy"] == 1.0
    assert evaluate_dpo(out, str(tiny_lm), PAIRS, beta=0.5) == 1.0
    load_lm(out)  # the output is a model folder load_lm accepts
    events = EventAccumulator(str(tmp_path / "tb" / "dpo_1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "eval/rewards/accuracy",
            "train/accuracy", "train/margin"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < 0.3


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_dpo_with_explicit_reference_equals_default_reference(tiny_lm, trainable_layers):
    # with trainable_layers=1 the default reference is scored from the kept trunk, the explicit one by full forwards
    cfg = DPOConfig(learning_rate=1e-3, batch_size=4, epochs=2, trainable_layers=trainable_layers)
    a, _ = train_dpo(PAIRS, str(tiny_lm), config=cfg, progress=False)
    b, _ = train_dpo(PAIRS, str(tiny_lm), reference=str(tiny_lm), config=cfg, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no_such_model"):
        train_sft([("a", "b")], str(tmp_path / "no_such_model"), progress=False)


def test_trainable_layers_trains_only_the_last_block(tiny_lm):
    from rlhf_env.models import load_lm

    before, _ = load_lm(tiny_lm)
    after, _ = train_dpo(PAIRS, str(tiny_lm), config=DPOConfig(learning_rate=1e-2, batch_size=4, epochs=1, trainable_layers=1), progress=False)
    changed = {n for (n, a), (_, b) in zip(after.named_parameters(), before.named_parameters()) if not torch.equal(a, b)}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm.")) for n in changed), changed


def test_cli_sft_and_dpo(tiny_lm, tmp_path, capsys):
    import json
    import re

    from rlhf_env.cli import main
    from rlhf_env.data import save_preferences
    from rlhf_env.models import load_lm

    data = tmp_path / "pairs.jsonl"
    save_preferences(PAIRS, data)
    assert main(["sft", "--data", str(data), "--model", str(tiny_lm), "--output", str(tmp_path / "sft"), "--epochs", "3",
                 "--lr", "1e-2", "--batch-size", "2", "--no-progress"]) == 0
    # the last epoch's mean loss is printed, as train-rm and dpo print theirs; the untrained
    # model's is a uniform guess over the vocabulary (3.848 against log V = 3.850), so the
    # trained one must be well below it (3.14 here)
    loss = float(re.search(r"train/loss=([\d.]+) saved=", capsys.readouterr().out).group(1))
    assert 0 < loss < math.log(len(WORDS) + 8) - 0.5
    assert main(["dpo", "--train", str(data), "--eval", str(data), "--model", str(tmp_path / "sft"), "--output", str(tmp_path / "dpo"),
                 "--beta", "0.5", "--lr", "3e-3", "--batch-size", "2", "--epochs", "10", "--trainable-layers", "all",
                 "--log-dir", str(tmp_path / "tb"), "--no-progress"]) == 0
    load_lm(tmp_path / "dpo")
    assert (tmp_path / "tb" / "dpo_1").is_dir()
    assert main(["dpo", "--train", str(data), "--eval", "none", "--model", str(tiny_lm), "--output", str(tmp_path / "dpo_lora"),
                 "--epochs", "1", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--trainable-layers", "1", "--no-progress"]) == 0
    lora_model, _ = load_lm(tmp_path / "dpo_lora")
    base, _ = load_lm(tiny_lm)
    changed = {n for (n, a), (_, b) in zip(lora_model.named_parameters(), base.named_parameters()) if not torch.equal(a, b)}
    assert changed and changed <= {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}, changed
    # a broken data file: one line, naming the file and the line
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert main(["dpo", "--train", str(tmp_path / "bad.jsonl"), "--model", str(tiny_lm), "--output", str(tmp_path / "x"), "--no-progress"]) == 1
    assert not (tmp_path / "x").exists()


# --- the kept frozen trunk (envs.trunk_states) -------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm3(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm3"), layers=3, seed=1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kept_trunk_logprobs_and_gradients_equal_the_full_forward(tiny_lm3, k):
    from envs.trunk_states import FrozenTrunk
    from rlhf_env.models import load_lm
    from rlhf_env.training import train_last_layers

    model, tok = load_lm(tiny_lm3)
    train_last_layers(model, k)
    trunk = FrozenTrunk.build(model, k)
    assert trunk is not None and trunk.split == 3 - k
    seqs = [encode_example(tok, p.prompt, r, 64) for p in PAIRS for r in (p.chosen, p.rejected)]
    kept = trunk.keep([s[0] for s in seqs], tok.pad_token_id, batch_size=3)  # other batches than below
    ids, mask = pad_right([s[0] for s in seqs], tok.pad_token_id)
    loss_mask = mask.clone()
    for row, (_, n) in enumerate(seqs):
        loss_mask[row, :n] = 0
    model.train()
    full = sequence_logprobs(model, ids, mask, loss_mask)
    full.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    top = trunk.logprobs(FrozenTrunk.pad(kept, ids.shape[1]), mask, ids, loss_mask)
    top.sum().backward()
    assert torch.allclose(top, full, atol=1e-4), (top, full)
    assert full_grads and all(torch.allclose(p.grad, full_grads[n], atol=1e-5) for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert len(model.model.layers) == 3  # the block list is restored after the top forward


def test_kept_trunk_runs_each_distinct_sequence_once(tiny_lm3):
    from envs.trunk_states import FrozenTrunk
    from rlhf_env.models import load_lm
    from rlhf_env.training import train_last_layers

    model, tok = load_lm(tiny_lm3)
    train_last_layers(model, 1)
    trunk = FrozenTrunk(model, 1)
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    a, b = [1, 5, 6, 7], [1, 8, 9]
    kept = trunk.keep([a, b, a, a], tok.pad_token_id, batch_size=8)
    handle.remove()
    assert sum(calls) == 2 and kept[0] is kept[2] is kept[3] and kept[1].shape[0] == 3
    assert [h.shape[0] for h in kept] == [4, 3, 4, 4]


def test_kept_trunk_refuses_what_it_cannot_keep(tiny_lm3):
    from transformers import GPT2Config, GPT2LMHeadModel

    from envs.trunk_states import FrozenTrunk, unsupported_reason
    from rlhf_env.models import load_lm
    from rlhf_env.training import train_last_layers

    model, _ = load_lm(tiny_lm3)
    assert FrozenTrunk.build(model, None) is None  # every weight trains
    assert "trainable" in unsupported_reason(model, 1)  # train_last_layers not applied: lower blocks train
    train_last_layers(model, 1)
    assert FrozenTrunk.build(model, 1) is not None and FrozenTrunk.build(model, 4) is None
    with pytest.raises(ValueError, match="1..3"):
        FrozenTrunk(model, 0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    train_last_layers(gpt2, 1)
    assert "gpt2" in unsupported_reason(gpt2, 1)


def test_dpo_with_kept_trunk_trains_like_full_forwards(tiny_lm3):
    common = dict(learning_rate=3e-3, batch_size=2, epochs=3, trainable_layers=2)
    a, _ = train_dpo(PAIRS + PAIRS[:2], str(tiny_lm3), config=DPOConfig(keep_trunk=True, **common), eval_pairs=PAIRS, progress=False)
    b, _ = train_dpo(PAIRS + PAIRS[:2], str(tiny_lm3), config=DPOConfig(keep_trunk=False, **common), eval_pairs=PAIRS, progress=False)
    assert a.dpo_metrics["eval/rewards/accuracy"] == b.dpo_metrics["eval/rewards/accuracy"]
    assert a.dpo_metrics["train/loss"] == pytest.approx(b.dpo_metrics["train/loss"], abs=1e-4)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-4), name
    assert any(not torch.equal(pa, pb0) for pa, pb0 in zip(a.parameters(), _fresh_params(tiny_lm3)))


@pytest.mark.parametrize("trainable_layers", [None, 2])
def test_dpo_with_lora_learns_and_saves_a_plain_model(tiny_lm3, tmp_path, trainable_layers):
    from rlhf_env.models import load_lm

    out = tmp_path / "dpo_lora"
    cfg = DPOConfig(learning_rate=1e-2, batch_size=2, epochs=10, lora_rank=4, trainable_layers=trainable_layers)
    model, _ = train_dpo(PAIRS, str(tiny_lm3), beta=0.5, config=cfg, eval_pairs=PAIRS, output_dir=out, progress=False)
    assert model.dpo_metrics["eval/rewards/accuracy"] == 1.0
    assert not any("lora_" in name for name, _ in model.named_parameters())  # adapters merged
    saved, base = load_lm(out)[0], _fresh_model(tiny_lm3)
    assert set(saved.state_dict()) == set(base.state_dict())  # no peft keys, loads without peft
    assert evaluate_dpo(out, str(tiny_lm3), PAIRS, beta=0.5) == 1.0
    # only the adapted linear layers (of the last 2 of 3 blocks when trainable_layers=2) changed
    changed = {n for (n, a), (_, b) in zip(saved.named_parameters(), base.named_parameters()) if not torch.equal(a, b)}
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(n.rsplit(".", 2)[-2] in adapted for n in changed), changed
    assert trainable_layers is None or not any(n.startswith("model.layers.0.") for n in changed), changed


def test_dpo_lora_on_the_top_blocks_keeps_the_trunk_and_equals_full_forwards(tiny_lm3, monkeypatch):
    from envs.trunk_states import FrozenTrunk

    kept = []
    keep = FrozenTrunk.keep
    monkeypatch.setattr(FrozenTrunk, "keep", lambda self, *args, **kw: kept.append(1) or keep(self, *args, **kw))
    common = dict(learning_rate=1e-2, batch_size=2, epochs=3, trainable_layers=1, lora_rank=2)
    a, _ = train_dpo(PAIRS + PAIRS[:2], str(tiny_lm3), config=DPOConfig(keep_trunk=True, **common), progress=False)
    assert kept  # the adapters sit in the top block only, so the lower blocks' output was kept
    b, _ = train_dpo(PAIRS + PAIRS[:2], str(tiny_lm3), config=DPOConfig(keep_trunk=False, **common), progress=False)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_dpo_refuses_a_bad_lora_rank(tiny_lm):
    with pytest.raises(ValueError, match="lora_rank"):
        train_dpo(PAIRS, str(tiny_lm), config=DPOConfig(lora_rank=0), progress=False)


def _fresh_model(path):
    from rlhf_env.models import load_lm

    return load_lm(path)[0]


def _fresh_params(path):
    return list(_fresh_model(path).parameters())


# --- whole prompts per step (DPOConfig.group_by_prompt) --------------------------------------

GROUPED = [  # all 3 pairs of 3 responses for each of 2 prompts: 6 pairs, 6 distinct sequences
    PreferencePair(prompt, a, b)
    for prompt, (good, mid, bad) in [
        ("tell me about dogs", ("dogs are wonderful and happy", "dogs are dogs", "dogs are bad and sad")),
        ("the weather today", ("the weather is very lovely today", "it is the weather", "the weather is awful today")),
    ]
    for a, b in [(good, mid), (good, bad), (mid, bad)]
]


def test_dedup_logprobs_and_gradients_equal_the_pairwise_ones(tiny_lm3):
    from rlhf_env.dpo import _EncodedPairs
    from rlhf_env.models import load_lm

    model, tok = load_lm(tiny_lm3)
    data = _EncodedPairs(GROUPED, tok, 64)
    assert data.groups() == [[0, 1, 2], [3, 4, 5]] and len(data.distinct) == 6
    out = {}
    for dedup in (False, True):
        model.zero_grad(set_to_none=True)
        logps = data.logprobs(model, [0, 1, 2, 4], "cpu", dedup=dedup)
        (logps * torch.arange(1.0, 9.0)).sum().backward()  # distinct weights: each row's gradient counts
        out[dedup] = logps.detach(), [p.grad.clone() for p in model.parameters()]
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[True][1], out[False][1]))


@pytest.mark.parametrize("grouped", [True, False])
def test_group_by_prompt_runs_each_distinct_response_once_per_step(tiny_lm3, grouped):
    from rlhf_env.models import load_lm

    model, tok = load_lm(tiny_lm3)
    rows = []  # rows through the trained top block with gradients (training steps only)
    model.model.layers[2].register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
    cfg = DPOConfig(learning_rate=3e-3, batch_size=3, epochs=8, trainable_layers=1, group_by_prompt=grouped)
    model, _ = train_dpo(GROUPED, model, tokenizer=tok, beta=0.5, config=cfg, eval_pairs=GROUPED, progress=False)
    # grouped: one prompt (3 pairs, 3 distinct responses) a step; else 3 pairs a step, 6 rows each
    assert rows == ([3] * 16 if grouped else [6] * 16)
    assert model.dpo_metrics["eval/rewards/accuracy"] == 1.0


def test_cli_dpo_trains_on_the_default_pairs_by_default(tiny_lm, tmp_path, monkeypatch):
    import rlhf_env.default_reward_model
    from rlhf_env.cli import main

    given = []
    monkeypatch.setattr(rlhf_env.default_reward_model, "default_training_pairs", lambda: given.append(1) or list(GROUPED))
    assert main(["dpo", "--model", str(tiny_lm), "--eval", "none", "--output", str(tmp_path / "dpo"), "--epochs", "1",
                 "--no-progress"]) == 0
    assert given == [1] and (tmp_path / "dpo").is_dir()
    assert main(["dpo", "--model", str(tiny_lm), "--eval", "none", "--output", str(tmp_path / "dpo2"), "--epochs", "1",
                 "--no-group-by-prompt", "--no-progress"]) == 0
    assert given == [1, 1]


def test_trainers_take_trl_conversational_datasets(tiny_lm):
    """A datasets.Dataset of TRL conversational records trains as the flat pairs do."""
    from datasets import Dataset

    records = [{"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}]} for p in PAIRS]
    config = DPOConfig(learning_rate=3e-3, batch_size=2, epochs=1, trainable_layers=None)
    flat, _ = train_dpo(PAIRS, str(tiny_lm), beta=0.5, config=config, eval_pairs=PAIRS, progress=False)
    conv, _ = train_dpo(Dataset.from_list(records), str(tiny_lm), beta=0.5, config=config, eval_pairs=records, progress=False)
    assert conv.dpo_metrics == pytest.approx(flat.dpo_metrics)
    sft_config = SFTConfig(learning_rate=3e-3, batch_size=2, epochs=1)
    messages = Dataset.from_list([{"messages": [*r["prompt"], *r["chosen"]]} for r in records])
    a, _ = train_sft([(p.prompt, p.chosen) for p in PAIRS], str(tiny_lm), config=sft_config, progress=False)
    b, _ = train_sft(messages, str(tiny_lm), config=sft_config, progress=False)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_dpo_callback_sees_every_step_and_stops_training(tiny_lm, tmp_path):
    seen = []

    def stop_after_three(step, metrics):
        seen.append((step, metrics["train/loss"]))
        return step < 3

    model, _ = train_dpo(PAIRS, str(tiny_lm), config=DPOConfig(batch_size=1, epochs=5, trainable_layers=None,
                                                               group_by_prompt=False),
                         progress=False, callback=stop_after_three, checkpoint_dir=tmp_path / "ckpt")
    assert [s for s, _ in seen] == [1, 2, 3]  # 5 epochs of len(PAIRS) steps were asked for
    assert model.dpo_metrics["train/loss"] == seen[-1][1]
    assert (tmp_path / "ckpt" / "checkpoint_3.pt").is_file()  # stopping writes the end-of-training checkpoint


def test_sft_and_dpo_outputs_record_their_starting_model_for_eval(tiny_lm, tmp_path, monkeypatch, capsys):
    """An SFT or DPO folder records how it was trained (as an agent's export does), so
    `rlhf-env eval DIR` judges it against its starting model: without the record a policy
    trained from the tiny model was judged against SmolLM2 (and now refused: other tokenizer)."""
    import rlhf_env.evaluate
    from agents.export import read_training_info
    from rlhf_env.cli import main

    train_dpo(PAIRS, str(tiny_lm), config=DPOConfig(learning_rate=1e-3, batch_size=4, epochs=1), output_dir=tmp_path / "dpo",
              progress=False)
    info = read_training_info(tmp_path / "dpo")
    assert info["algorithm"] == "DPO" and info["base_model"] == info["reference"] == str(tiny_lm.resolve())
    assert info["hyperparameters"]["learning_rate"] == 1e-3 and info["hyperparameters"]["beta"] == DPOConfig.beta
    train_sft([(p.prompt, p.chosen) for p in PAIRS], "tiny", config=SFTConfig(epochs=1), output_dir=tmp_path / "sft", progress=False)
    assert read_training_info(tmp_path / "sft")["base_model"] == "tiny"

    seen = []
    monkeypatch.setattr(rlhf_env.evaluate, "evaluate", lambda policy, reference=None, **kw: seen.append(reference) or {})
    monkeypatch.setattr(rlhf_env.evaluate, "format_table", lambda report: "")
    assert main(["eval", str(tmp_path / "dpo")]) == 0 and main(["eval", str(tmp_path / "sft")]) == 0
    assert seen == [str(tiny_lm.resolve()), "tiny"]
