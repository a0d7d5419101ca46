"""Reward model: Bradley-Terry loss, learning, save/load, padding and batch invariance, errors."""

import math

import pytest
import torch

from rlhf_env.data import PreferencePair
from rlhf_env.reward_model import (
    RewardModel,
    RewardModelConfig,
    bradley_terry_loss,
    default_backbone_dir,
    load_backbone,
    train_reward_model,
)
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
    assert trained_rm.accuracy(SEPARABLE) == 1.0
    assert trained_rm.metrics["train/accuracy"] == 1.0


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
                 "--epochs", "1", "--batch-size", "8", "--no-progress"])
    assert code == 0 and "saved=" in capsys.readouterr().out
    assert RewardModel.load(tmp_path / "rm").kind == "encoder"
    code = main(["train-rm", "--train", str(tmp_path / "pairs.jsonl"), "--eval", "none", "--backbone", str(tmp_path / "missing_backbone"), "--output", str(tmp_path / "rm2")])
    assert code == 1 and "missing_backbone" in capsys.readouterr().err
