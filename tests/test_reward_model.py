"""Reward model: Bradley-Terry loss, learning, save/load, padding and batch invariance, errors."""

import math

import pytest
import torch

from rlhf_env.data import PreferencePair
from rlhf_env.precision import cpu_has_native_bf16, resolve_autocast
from rlhf_env.reward_model import RewardModel, default_backbone_dir, load_backbone
from rlhf_env.reward_trainer import RewardModelConfig, bradley_terry_loss, train_reward_model
from tests.test_sft_dpo import PAIRS as TINY_PAIRS
from tests.test_sft_dpo import make_tiny_lm

# small models on a busy 2-core machine run several times faster single-threaded
pytestmark = pytest.mark.usefixtures("one_thread")

SEPARABLE = [
    PreferencePair("How was the film?", "I loved it, a wonderful and joyful story.", "It was boring and awful."),
    PreferencePair("How do I water a cactus?", "Great question! Water it lightly every two weeks, it will thrive.", "Who cares, it will die anyway."),
    PreferencePair("Reply to: I got the job!", "Congratulations, that is fantastic news!", "So what."),
    PreferencePair("Review the cafe:", "Friendly staff and delicious coffee, I'm happy I went.", "Rude staff and terrible coffee."),
    PreferencePair("Any advice for my exam?", "You will do great! Sleep well and review your notes calmly.", "You will probably fail."),
    PreferencePair("Describe your weekend.", "It was lovely, I enjoyed a sunny walk with friends.", "Miserable, everything went wrong."),
    PreferencePair("Reply to: my cat is sick", "I'm so sorry, I hope she feels better soon. Let me know if I can help.", "Cats get sick. Not my problem."),
    PreferencePair("What do you think of the book?", "A beautiful, inspiring read that I recommend warmly.", "Dull and a waste of time."),
]
PROMPTS = ["How was the film?", "Tell me a short story about a happy dog in a sunny park with friends.", "Hi"]
RESPONSES = ["Great!", "Once upon a time a dog played happily all day long and everyone smiled.", "Bad."]


@pytest.fixture(scope="module")
def trained_rm():
    threads = torch.get_num_threads()  # module fixtures run before the function-scoped one_thread
    torch.set_num_threads(1)
    try:
        return train_reward_model(SEPARABLE, config=RewardModelConfig(learning_rate=1e-4, batch_size=4, epochs=4, warmup_ratio=0.0), progress=False)
    finally:
        torch.set_num_threads(threads)


def test_bradley_terry_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0)) + math.log(2.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(hand, rel=1e-6)


def test_default_backbone_is_the_shipped_minilm():
    folder = default_backbone_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model, tokenizer, kind = load_backbone()
    assert kind == "encoder" and model.config.hidden_size == 384


def test_learns_a_separable_set_to_100_percent(trained_rm):
    # the untrained head (same backbone and seed) ranks only some pairs right (2 of 8 here)
    untrained = RewardModel.from_backbone(seed=RewardModelConfig().seed)
    assert untrained.accuracy(SEPARABLE) <= 0.5
    assert trained_rm.accuracy(SEPARABLE) == 1.0
    assert trained_rm.metrics["train/accuracy"] == 1.0


def _matmul_dtypes(rm):
    """Record the output dtype of the first block's query projection on every forward."""
    seen = []
    rm.backbone.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


@pytest.mark.parametrize("setting,expected", [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_autocast_training_runs_in_that_precision_and_learns(setting, expected):
    rm = RewardModel.from_backbone()
    seen = _matmul_dtypes(rm)
    cfg = RewardModelConfig(learning_rate=1e-4, batch_size=4, epochs=4, warmup_ratio=0.0, autocast=setting)
    train_reward_model(SEPARABLE, backbone=rm, config=cfg, progress=False)
    assert seen and set(seen) == {expected}  # every training forward ran in that precision
    assert all(p.dtype == torch.float32 for p in rm.parameters())  # master weights stay float32
    assert rm.metrics["train/accuracy"] == 1.0
    seen.clear()
    scores = rm.score([p.prompt for p in SEPARABLE], [p.chosen for p in SEPARABLE])
    assert set(seen) == {torch.float32} and scores.dtype == torch.float32  # scoring is float32 either way
    assert rm.accuracy(SEPARABLE) == 1.0


def test_autocast_auto_resolves_by_device_support(monkeypatch):
    import rlhf_env.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_autocast("auto", "cpu") is None  # emulated bf16 would be slower: float32
    assert resolve_autocast("bf16", "cpu") is torch.bfloat16  # forced
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_autocast("auto", "cpu") is torch.bfloat16
    assert resolve_autocast("off", "cpu") is None and resolve_autocast(None, "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_autocast("auto", "cuda") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_autocast("auto", "cuda:0") is torch.bfloat16
    with pytest.raises(ValueError, match="autocast must be one of"):
        resolve_autocast("fp16", "cpu")
    with pytest.raises(ValueError, match="autocast must be one of"):
        train_reward_model(SEPARABLE, config=RewardModelConfig(autocast="float16"), progress=False)


def test_cpu_bf16_check_reads_the_cpu_features(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_has_native_bf16() is True


def test_save_load_gives_identical_scores(trained_rm, tmp_path):
    before = trained_rm.score(PROMPTS, RESPONSES)
    trained_rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.kind == "encoder" and loaded.pooling == "mean"
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), before)
    assert torch.equal(loaded(PROMPTS, RESPONSES), before)  # calling the model scores too
    assert not list(tmp_path.glob(".rm.tmp-*"))  # nothing half-written left behind


def _assert_padding_and_batch_invariant(rm):
    alone = torch.stack([rm.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)])
    together = rm.score(PROMPTS, RESPONSES)
    assert torch.allclose(alone, together, atol=1e-5), (alone, together)
    rm.tokenizer.padding_side = "left"
    try:
        assert torch.allclose(rm.score(PROMPTS, RESPONSES), together, atol=1e-5)
        # a different batch: the same input among other, longer inputs
        mixed = rm.score([PROMPTS[2]] + PROMPTS * 3, [RESPONSES[2]] + RESPONSES * 3, batch_size=5)
        assert torch.allclose(mixed[0], together[2], atol=1e-5)
    finally:
        rm.tokenizer.padding_side = "right"


def test_encoder_scores_do_not_depend_on_padding_or_batch(trained_rm):
    _assert_padding_and_batch_invariant(trained_rm)


def test_causal_backbone_last_token_head(tmp_path):
    lm_dir = make_tiny_lm(tmp_path / "lm")
    rm = train_reward_model(TINY_PAIRS, backbone=lm_dir, config=RewardModelConfig(learning_rate=3e-3, batch_size=4, epochs=30, warmup_ratio=0.0), progress=False)
    assert rm.kind == "causal" and rm.pooling == "last"
    assert rm.accuracy(TINY_PAIRS) == 1.0
    prompts = [p.prompt for p in TINY_PAIRS]
    chosen = [p.chosen for p in TINY_PAIRS]
    alone = torch.stack([rm.score([p], [r])[0] for p, r in zip(prompts, chosen)])
    assert torch.allclose(alone, rm.score(prompts, chosen), atol=1e-5)
    rm.tokenizer.padding_side = "left"
    assert torch.allclose(alone, rm.score(prompts, chosen), atol=1e-5)
    rm.save(tmp_path / "rm")
    assert torch.equal(RewardModel.load(tmp_path / "rm").score(prompts, chosen), rm.score(prompts, chosen))


def test_training_logs_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_reward_model(SEPARABLE[:4], eval_pairs=SEPARABLE[4:], config=RewardModelConfig(batch_size=4, epochs=1), log_dir=tmp_path, progress=False)
    train_reward_model(SEPARABLE[:4], config=RewardModelConfig(batch_size=4, epochs=1), log_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward_model_1", "reward_model_2"]
    events = EventAccumulator(str(tmp_path / "reward_model_1"))
    events.Reload()
    assert {"train/loss", "train/accuracy", "train/margin", "eval/accuracy"} <= set(events.Tags()["scalars"])


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_backbone"):
        RewardModel.from_backbone(str(tmp_path / "no_such_backbone"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir.*no config.json"):
        RewardModel.from_backbone(str(tmp_path / "empty_dir"))
    with pytest.raises(FileNotFoundError, match="not a reward-model folder"):
        RewardModel.load(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="2 prompts and 1 responses"):
        RewardModel.from_backbone().score(["a", "b"], ["c"])


def test_cli_train_rm(tmp_path, capsys):
    from rlhf_env.cli import main
    from rlhf_env.data import save_preferences

    save_preferences(SEPARABLE, tmp_path / "pairs.jsonl")
    code = main(["train-rm", "--train", str(tmp_path / "pairs.jsonl"), "--eval", "none", "--output", str(tmp_path / "rm"),
                 "--epochs", "1", "--batch-size", "8", "--train-layers", "2", "--autocast", "bf16", "--no-progress"])
    assert code == 0 and "saved=" in capsys.readouterr().out
    assert RewardModel.load(tmp_path / "rm").kind == "encoder"
    code = main(["train-rm", "--train", str(tmp_path / "pairs.jsonl"), "--eval", "none", "--backbone", str(tmp_path / "missing_backbone"), "--output", str(tmp_path / "rm2")])
    assert code == 1 and "missing_backbone" in capsys.readouterr().err


def test_eval_each_epoch_off_evaluates_after_the_last_epoch_only(monkeypatch):
    """The same training either way (evaluation draws no random numbers): the same final
    held-out accuracy and weights, one evaluation pass instead of one per epoch."""
    from rlhf_env.reward_trainer import PairInputs

    calls = []
    real = PairInputs.accuracy
    monkeypatch.setattr(PairInputs, "accuracy", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    models = {}
    for each in (True, False):
        calls.clear()
        cfg = RewardModelConfig(batch_size=4, epochs=2, eval_each_epoch=each)
        models[each] = train_reward_model(SEPARABLE[:4], eval_pairs=SEPARABLE[4:], config=cfg, progress=False)
        assert len(calls) == (2 if each else 1)
    assert models[True].metrics == models[False].metrics
    assert torch.equal(models[True].head.weight, models[False].head.weight)


def test_default_reward_model_is_evaluated_once_on_first_use(tmp_path, monkeypatch):
    import rlhf_env.reward_trainer as trainer
    from rlhf_env.default_reward_model import default_config, default_reward_model_dir

    seen = {}

    def fake_train(pairs, eval_pairs, config, **kwargs):
        seen["config"] = config

        class Trained:
            def save(self, folder):
                seen["saved"] = folder

        return Trained()

    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path))
    monkeypatch.setattr(trainer, "train_reward_model", fake_train)
    default_reward_model_dir(progress=False)
    from dataclasses import replace

    assert seen["config"] == replace(default_config(), eval_each_epoch=False) and str(tmp_path) in str(seen["saved"])


def test_cli_train_rm_defaults_are_the_default_reward_model(tmp_path, monkeypatch):
    """With no flags but -o, `rlhf-env train-rm` trains what RewardModel.default() trains:
    the same pairs, the same settings, the same held-out file."""
    import rlhf_env.reward_trainer as trainer
    from rlhf_env.cli import main
    from rlhf_env.cli._common import DEFAULT_EVAL
    from rlhf_env.default_reward_model import default_config, default_training_pairs
    from rlhf_env.reward_model import DEFAULT_BACKBONE

    seen = {}

    def fake_train(pairs, backbone, eval_pairs, config, **kwargs):
        seen.update(pairs=pairs, backbone=backbone, eval_pairs=eval_pairs, config=config)

        class Trained:
            metrics = {"eval/accuracy": 1.0}

        return Trained()

    monkeypatch.setattr(trainer, "train_reward_model", fake_train)
    assert main(["train-rm", "-o", str(tmp_path / "rm")]) == 0
    assert seen["pairs"] == default_training_pairs() and len(seen["pairs"]) > 3000
    assert seen["config"] == default_config()
    assert seen["backbone"] == DEFAULT_BACKBONE and seen["eval_pairs"] == str(DEFAULT_EVAL)


# several responses per prompt, every pair of them: responses are shared between pairs
SHARED = [
    PreferencePair(p, a, b)
    for p, rs in [
        ("How was the film?", ["I loved it, a wonderful story!", "It was fine.", "Boring and awful.", "Meh, too long."]),
        ("Reply to: I got the job!", ["Congratulations, fantastic news!", "Nice.", "So what."]),
    ]
    for k, a in enumerate(rs)
    for b in rs[k + 1 :]
]


def test_unique_inputs_scores_each_response_once_with_the_pairwise_loss():
    from rlhf_env.reward_trainer import PairInputs, unique_inputs
    from rlhf_env.training import pad_right

    keys, c, r = unique_inputs(SHARED)
    assert len(SHARED) == 9 and len(keys) == 7  # 6 + 3 pairs from 4 + 3 responses
    assert [keys[i] for i in c.tolist()] == [(p.prompt, p.chosen) for p in SHARED]
    assert [keys[i] for i in r.tolist()] == [(p.prompt, p.rejected) for p in SHARED]
    rm = RewardModel.from_backbone(seed=1).eval()
    inputs = PairInputs(rm, SHARED)
    dedup_c, dedup_r = inputs.scores(range(len(SHARED)))
    # pairwise: chosen and rejected of every pair in one padded batch of 2n inputs
    seqs = rm.encode_batch([p.prompt for p in SHARED] * 2, [p.chosen for p in SHARED] + [p.rejected for p in SHARED])
    ids, mask = pad_right(seqs, rm.tokenizer.pad_token_id)
    pairwise = rm.forward_ids(ids, mask)
    assert torch.allclose(dedup_c, pairwise[:9], atol=1e-5) and torch.allclose(dedup_r, pairwise[9:], atol=1e-5)
    assert bradley_terry_loss(dedup_c, dedup_r).item() == pytest.approx(bradley_terry_loss(pairwise[:9], pairwise[9:]).item(), abs=1e-6)
    # a subset of pairs: the same scores as in the whole set
    sub_c, sub_r = inputs.scores([8, 0, 3])
    assert torch.allclose(sub_c, dedup_c[[8, 0, 3]], atol=1e-5) and torch.allclose(sub_r, dedup_r[[8, 0, 3]], atol=1e-5)
    assert inputs.groups() == [list(range(6)), [6, 7, 8]]
    # pairwise (group_by_prompt=False): both inputs of every pair, the same scores
    seen = []
    forward = inputs.input_scores
    inputs.input_scores = lambda idx: seen.append(len(idx)) or forward(idx)
    pw_c, pw_r = inputs.scores(range(len(SHARED)), dedup=False)
    inputs.scores(range(len(SHARED)))
    assert seen == [18, 7]
    assert torch.allclose(pw_c, dedup_c, atol=1e-5) and torch.allclose(pw_r, dedup_r, atol=1e-5)


@pytest.mark.parametrize("frozen", [1, 4, 6])
def test_cached_lower_blocks_give_the_full_forward_scores(frozen):
    from rlhf_env.reward_trainer import PairInputs, unique_inputs

    rm = RewardModel.from_backbone(seed=2).eval()
    full = PairInputs(rm, SHARED)
    cached = PairInputs(rm, SHARED, frozen_layers=frozen, batch_size=3)  # other batches, other padding
    assert cached.features is not None and len(cached.features) == 7
    everything = list(range(7))
    assert torch.allclose(cached.input_scores(everything), full.input_scores(everything), atol=1e-5)
    responses = [k[1] for k in unique_inputs(SHARED)[0]]
    assert torch.allclose(cached.input_scores(everything), rm.score(cached.prompts, responses), atol=1e-5)
    assert cached.accuracy() == full.accuracy()


def test_train_layers_trains_only_the_top_blocks_and_head():
    rm = RewardModel.from_backbone(seed=3)
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    cfg = RewardModelConfig(learning_rate=1e-3, batch_size=4, epochs=3, warmup_ratio=0.0, train_layers=1)
    trained = train_reward_model(SHARED, backbone=rm, eval_pairs=SHARED[:3], config=cfg, progress=False)
    after = trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("head.", "backbone.encoder.layer.5.")) for k in changed), sorted(changed)
    assert any(k.startswith("backbone.encoder.layer.5.") for k in changed) and "head.weight" in changed
    assert all(p.requires_grad for p in trained.parameters())  # whole again after training
    assert trained.accuracy(SHARED) == 1.0 and trained.metrics["eval/accuracy"] == 1.0
    with pytest.raises(ValueError, match="train_layers must be an integer in 0..6"):
        train_reward_model(SHARED, backbone=rm, config=RewardModelConfig(train_layers=7), progress=False)


def test_train_layers_needs_an_encoder(tmp_path):
    rm = RewardModel.from_backbone(make_tiny_lm(tmp_path / "lm"))
    with pytest.raises(ValueError, match="BERT-like encoder"):
        train_reward_model(TINY_PAIRS, backbone=rm, config=RewardModelConfig(train_layers=1), progress=False)


def test_default_training_pairs_are_the_judged_pairs_of_all_sampling_rounds():
    from rlhf_env.default_task import shipped_samples
    from rlhf_env.default_reward_model import default_pairs, default_training_pairs

    pairs = default_training_pairs()
    train, test = default_pairs()
    assert pairs == train and len(pairs) >= 1000
    samples = shipped_samples("train")
    assert len(samples) == 282 and all(len(v) == 12 for v in samples.values())  # rounds 0-2 (10) and the policy round r3 (2)
    assert {p.prompt for p in pairs} <= set(samples) and not {p.prompt for p in pairs} & {p.prompt for p in test}
    # every sample carries its judges' scores
    assert all({"score", "relevance", "nll"} <= set(r) for rs in samples.values() for r in rs)


def test_moved_names_stay_importable_from_reward_model():
    """Training, precision and the default model moved to their own modules; the names
    users imported from rlhf_env.reward_model still resolve to the same objects."""
    import rlhf_env
    import rlhf_env.default_reward_model as default_rm
    import rlhf_env.precision as precision
    import rlhf_env.reward_model as rm_module
    import rlhf_env.reward_trainer as trainer

    for module in (trainer, precision, default_rm):
        for name in [n for n, m in rm_module._MOVED.items() if m == module.__name__]:
            assert getattr(rm_module, name) is getattr(module, name)
    assert rlhf_env.train_reward_model is trainer.train_reward_model and rlhf_env.RewardModel is RewardModel
    with pytest.raises(AttributeError):
        rm_module.no_such_name


@pytest.mark.parametrize("command", ["train-rm", "dpo"])
def test_cli_evaluates_on_held_out_prompts_of_the_users_own_file(tmp_path, monkeypatch, command):
    """--train mine.jsonl without --eval: the reported accuracy is on prompts of mine.jsonl
    that were held out of training, not on the default task's pairs."""
    import json

    import rlhf_env.dpo as dpo
    import rlhf_env.reward_trainer as trainer
    from rlhf_env.cli import main
    from rlhf_env.data import load_preferences

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"prompt": f"prompt {i}", "chosen": f"good {j}", "rejected": f"bad {j}"}) + "\n"
                            for i in range(20) for j in range(2)))
    seen = {}

    class Trained:
        metrics = dpo_metrics = {"eval/accuracy": 1.0}

    def fake(pairs, *args, eval_pairs=None, **kwargs):
        seen.update(pairs=list(pairs), eval_pairs=eval_pairs)
        return (Trained(), None) if command == "dpo" else Trained()

    monkeypatch.setattr(trainer, "train_reward_model", fake)
    monkeypatch.setattr(dpo, "train_dpo", fake)
    assert main([command, "--train", str(mine), "-o", str(tmp_path / "out")]) == 0
    train, held_out = seen["pairs"], seen["eval_pairs"]
    assert len(held_out) == 4 and sorted(train + held_out, key=str) == sorted(load_preferences(mine), key=str)
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}  # whole prompts held out
    assert main([command, "--train", str(mine), "--eval", "none", "-o", str(tmp_path / "out")]) == 0
    assert seen["eval_pairs"] is None and "".join(seen["pairs"]) == str(mine)  # the whole file, for the trainer to read


def test_help_says_each_default_once():
    import re

    from rlhf_env.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        text = command.format_help()
        for entry in re.split(r"\n  (?=-)", text):
            assert entry.count("(default") <= 1, (name, entry)
