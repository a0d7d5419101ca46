"""Checkpoints that survive faults: atomic saves, load-then-continue, interrupts, NaN guards."""

from __future__ import annotations

import os
import signal
import zipfile

import gymnasium as gym
import pytest
import torch

from agents import A2C, PPO, REINFORCE, CheckpointCallback
from agents.callbacks import BaseCallback
from agents.guards import NonFiniteError, TrainingInterrupted, check_finite

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_PPO = dict(n_steps=32, batch_size=32, n_epochs=2, seed=0, n_envs=2, learning_rate=1e-3)


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _optimizer_tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, state in model.policy.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{k}.{name}"] = torch.as_tensor(value).clone()
    return out


# --- atomic saves ----------------------------------------------------------------------
def test_save_that_fails_inside_the_writer_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    model.learn(64)
    path = tmp_path / "model.zip"
    model.save(path)
    before = path.read_bytes()
    model.learn(64, reset_num_timesteps=False)  # the next save would hold other weights

    real_writestr = zipfile.ZipFile.writestr
    calls = {"n": 0}

    def failing_writestr(self, name, data, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # header and data written, then the disk "fails" mid-archive
            raise OSError(28, "No space left on device")
        return real_writestr(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the previous checkpoint is intact ...
    assert _files(tmp_path) == ["model.zip"]  # ... and no partial or temporary file is left
    restored = PPO.load(path)
    assert restored.num_timesteps == 64


def test_save_interrupted_by_keyboardinterrupt_leaves_nothing(tmp_path, monkeypatch):
    model = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    import agents.base as base

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "fresh")
    assert _files(tmp_path) == []


def test_truncated_checkpoint_is_refused_with_the_file_named(tmp_path):
    model = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    path = tmp_path / "model.zip"
    model.save(path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.zip"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.zip"):
        PPO.load(bad)


# --- load, then continue ---------------------------------------------------------------
@pytest.mark.parametrize("algo,kwargs", [(PPO, SMALL_PPO), (A2C, dict(n_steps=8, seed=0, n_envs=2))])
def test_load_restores_counters_optimizer_rng_and_continues(tmp_path, algo, kwargs):
    model = algo("MlpPolicy", "CartPole-v1", **kwargs)
    model.learn(256)
    model.save(tmp_path / "ckpt")
    saved_rng = torch.rand(3)  # drawn right after the save: the load must restore the state before it
    counters = (model.num_timesteps, model._n_updates, model._episode_num, model._current_progress_remaining)
    opt = _optimizer_tensors(model)
    params = {k: v.clone() for k, v in model.policy.state_dict().items()}

    torch.manual_seed(1234)  # scramble the global RNG
    loaded = algo.load(tmp_path / "ckpt.zip", env="CartPole-v1")
    assert torch.equal(torch.rand(3), saved_rng)
    assert (loaded.num_timesteps, loaded._n_updates, loaded._episode_num, loaded._current_progress_remaining) == counters
    assert opt and _optimizer_tensors(loaded).keys() == opt.keys()
    for k, v in _optimizer_tensors(loaded).items():
        assert torch.equal(v, opt[k]), k
    for k, v in loaded.policy.state_dict().items():
        assert torch.equal(v, params[k]), k
    # the optimizer really drives the loaded parameters (not a stale copy)
    ids = {id(p) for g in loaded.policy.optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for p in loaded.policy.parameters()}

    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == counters[0] + 128
    assert loaded._n_updates > counters[1]
    step_counts = [float(s["step"]) for s in loaded.policy.optimizer.state_dict()["state"].values()]
    assert min(step_counts) > float(opt["0.step"])  # Adam's step count continued, not restarted


def test_load_then_continue_equals_an_uninterrupted_run(tmp_path):
    """Same weights, optimizer state and RNG: after load, an update on the same batch is identical."""
    model = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    model.learn(128)
    model.save(tmp_path / "ckpt")
    loaded = PPO.load(tmp_path / "ckpt.zip", env="CartPole-v1")
    # the same rollout in both, then one train() each
    buf = {k: getattr(model.rollout_buffer, k).clone() for k in ("observations", "actions", "values", "log_probs", "advantages", "returns", "valid")}
    for k, v in buf.items():
        getattr(loaded.rollout_buffer, k).copy_(v)
    torch.manual_seed(5)
    model.train()
    torch.manual_seed(5)
    loaded.train()
    for (k, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k


# --- interrupts -------------------------------------------------------------------------
class _SignalAt(BaseCallback):
    def __init__(self, at: int, action):
        super().__init__()
        self.at, self.action, self.steps_after = at, action, 0

    def _on_step(self) -> bool:
        if self.n_calls == self.at:
            self.action()
        elif self.n_calls > self.at:
            self.steps_after += 1
        return True


@pytest.mark.parametrize("how", ["sigterm", "sigint", "keyboardinterrupt"])
def test_interrupt_writes_a_final_checkpoint_and_stops_cleanly(tmp_path, how):
    def fire():
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    model = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    checkpoints = CheckpointCallback(save_freq=16, save_path=str(tmp_path), name_prefix="run")
    stopper = _SignalAt(40, fire)
    with pytest.raises(TrainingInterrupted) as info:
        model.learn(10_000, callback=[checkpoints, stopper])
    # stopped at once (signals: at the next step), well before the end
    assert model.num_timesteps <= 2 * 41
    final = info.value.checkpoint
    assert final == os.path.join(str(tmp_path), f"run_{model.num_timesteps}_steps.zip")
    assert final in str(info.value)
    assert isinstance(info.value, KeyboardInterrupt)
    loaded = PPO.load(final)
    assert loaded.num_timesteps == model.num_timesteps
    for a, b in zip(loaded.policy.state_dict().values(), model.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert not [f for f in _files(tmp_path) if f.startswith(".tmp")]
    # the handlers of the caller are back
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


def test_keyboardinterrupt_without_checkpointing_is_left_alone():
    model = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)

    def fire():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        model.learn(1000, callback=_SignalAt(5, fire))
    assert not isinstance(info.value, TrainingInterrupted)


# --- non-finite losses and gradients ----------------------------------------------------
class _NanRewardAfter(gym.Wrapper):
    """Rewards become NaN after ``after`` steps (a broken reward model, say)."""

    def __init__(self, env, after: int):
        super().__init__(env)
        self.after, self.t = after, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        return obs, (float("nan") if self.t > self.after else reward), terminated, truncated, info


def test_nonfinite_loss_raises_naming_the_update_and_last_checkpoint(tmp_path):
    env = _NanRewardAfter(gym.make("CartPole-v1"), after=100)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0)
    with pytest.raises(NonFiniteError) as info:
        model.learn(1000, callback=CheckpointCallback(save_freq=64, save_path=str(tmp_path), name_prefix="good"))
    err = info.value
    # the NaN rewards start at step 101; the save at step 128 comes before that rollout's update
    assert err.checkpoint == os.path.join(str(tmp_path), "good_128_steps.zip")
    assert err.checkpoint in str(err) and f"update {err.step}" in str(err)
    # the last good checkpoint and the live weights are finite: the bad batch was not applied
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert all(torch.isfinite(p).all() for p in PPO.load(err.checkpoint).policy.parameters())


@pytest.mark.parametrize("algo,kwargs", [(PPO, dict(n_steps=64, batch_size=32, n_epochs=2)), (A2C, dict(n_steps=8)), (REINFORCE, {})])
def test_skip_mode_drops_nonfinite_batches(algo, kwargs):
    env = _NanRewardAfter(gym.make("CartPole-v1"), after=60)
    model = algo("MlpPolicy", env, seed=0, **kwargs)
    model.on_nonfinite = "skip"
    model.learn(600)
    assert model.num_timesteps >= 600
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())


def test_check_finite_contract():
    assert check_finite(torch.tensor(1.0), torch.tensor(2.0), step=3)
    assert not check_finite(torch.tensor(1.0), torch.tensor(float("inf")), step=3, on_nonfinite="skip")
    with pytest.raises(NonFiniteError, match="update 7.*no checkpoint was written yet"):
        check_finite(float("nan"), None, step=7)
    with pytest.raises(ValueError, match="on_nonfinite"):
        check_finite(1.0, 1.0, step=0, on_nonfinite="ignore")


# --- offline trainers: reward model, SFT, DPO ------------------------------------------
from tests.test_sft_dpo import PAIRS as TINY_PAIRS  # noqa: E402
from tests.test_sft_dpo import make_tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("ckpt_lm"))


def _run_trainer(kind: str, lm_path, **kwargs):
    """Train ``kind`` for 2 epochs of 4 batches of 2 pairs; return the trained module."""
    pairs = TINY_PAIRS * 2
    if kind == "sft":
        from rlhf_env.sft import SFTConfig, train_sft

        return train_sft(pairs, str(lm_path), config=SFTConfig(learning_rate=1e-2, batch_size=2, epochs=2), progress=False, **kwargs)[0]
    if kind == "dpo":
        from rlhf_env.dpo import DPOConfig, train_dpo

        return train_dpo(pairs, str(lm_path), config=DPOConfig(learning_rate=1e-2, batch_size=2, epochs=2), progress=False, **kwargs)[0]
    from rlhf_env.reward_model import RewardModelConfig, train_reward_model

    cfg = RewardModelConfig(learning_rate=3e-3, batch_size=2, epochs=2, warmup_ratio=0.3)  # the schedule's position matters
    return train_reward_model(pairs, backbone=str(lm_path), config=cfg, progress=False, **kwargs)


def _signal_after_update(monkeypatch, at: int, sig=signal.SIGTERM):
    from rlhf_env.loop import TrainLoop

    real_step = TrainLoop.step

    def step(self, *args, **kwargs):
        ok = real_step(self, *args, **kwargs)
        if self.step_count == at:
            os.kill(os.getpid(), sig)
        return ok

    monkeypatch.setattr(TrainLoop, "step", step)


@pytest.mark.parametrize("kind", ["reward_model", "sft", "dpo"])
def test_offline_trainer_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_lm_path, monkeypatch, kind):
    reference = {k: v.clone() for k, v in _run_trainer(kind, tiny_lm_path).state_dict().items()}

    previous = signal.getsignal(signal.SIGTERM)
    _signal_after_update(monkeypatch, at=5)  # in the second epoch
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted) as info:
        _run_trainer(kind, tiny_lm_path, checkpoint_dir=ckpt_dir, output_dir=tmp_path / "out")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == previous
    assert info.value.checkpoint == str(ckpt_dir / "checkpoint_5.pt") and info.value.checkpoint in str(info.value)
    assert not (tmp_path / "out").exists()  # the final model is only written by a finished run
    assert [p.name for p in ckpt_dir.iterdir()] == ["checkpoint_5.pt"]

    resumed = _run_trainer(kind, tiny_lm_path, resume_from=ckpt_dir, checkpoint_dir=ckpt_dir)
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_5.pt", "checkpoint_8.pt"]


def test_trainer_checkpoint_write_failure_keeps_the_previous_one(tmp_path, tiny_lm_path, monkeypatch):
    import rlhf_env.loop as loop

    ckpt_dir = tmp_path / "ckpt"
    _run_trainer("sft", tiny_lm_path, checkpoint_dir=ckpt_dir, checkpoint_every=4)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_4.pt", "checkpoint_8.pt"]
    before = (ckpt_dir / "checkpoint_8.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, fh, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, fh)  # some bytes reach the disk, then it fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        _run_trainer("sft", tiny_lm_path, checkpoint_dir=ckpt_dir, resume_from=ckpt_dir / "checkpoint_4.pt", checkpoint_every=4)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_4.pt", "checkpoint_8.pt"]
    assert (ckpt_dir / "checkpoint_8.pt").read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny_lm_path):
    ckpt_dir = tmp_path / "ckpt"
    _run_trainer("sft", tiny_lm_path, checkpoint_dir=ckpt_dir)
    with pytest.raises(ValueError, match=r"checkpoint_8.pt is a sft checkpoint, not dpo"):
        _run_trainer("dpo", tiny_lm_path, resume_from=ckpt_dir)
    (tmp_path / "broken.pt").write_bytes((ckpt_dir / "checkpoint_8.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken.pt is not a readable trainer checkpoint"):
        _run_trainer("sft", tiny_lm_path, resume_from=tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run_trainer("sft", tiny_lm_path, resume_from=tmp_path)


def test_offline_nonfinite_loss_names_the_step_and_checkpoint(tmp_path, tiny_lm_path, monkeypatch):
    import rlhf_env.sft as sft

    real_loss = sft.sft_loss
    calls = {"n": 0}

    def nan_on_third(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(sft, "sft_loss", nan_on_third)
    with pytest.raises(NonFiniteError, match=r"sft step 3 .*checkpoint_2.pt") as info:
        _run_trainer("sft", tiny_lm_path, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    assert info.value.step == 3
    calls["n"] = 0
    model = _run_trainer("sft", tiny_lm_path, on_nonfinite="skip")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reward_model_save_failure_leaves_the_old_folder(tmp_path, tiny_lm_path, monkeypatch):
    import safetensors.torch

    rm = _run_trainer("reward_model", tiny_lm_path)
    rm.save(tmp_path / "rm")
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "rm").rglob("*") if p.is_file()}

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError):
        rm.save(tmp_path / "rm")
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "rm").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no temporary folder left


def test_cli_sigterm_writes_a_final_checkpoint_and_says_where(tmp_path):
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "rlhf_env", "train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "100000000",
           "--checkpoint-dir", str(ckpt), "--checkpoint-freq", "64", "--verbose", "0", "--eval-episodes", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt.is_dir() and any(ckpt.glob("*.zip"))):
            assert proc.poll() is None and time.monotonic() < deadline, "training never wrote a checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = [line for line in err.strip().splitlines() if line.startswith("rlhf-env train:")]
    assert len(last) == 1 and "Traceback" not in err, err
    final = last[0].split("final checkpoint written to ")[1].split(";")[0]
    assert f"--resume {final}" in last[0]
    loaded = PPO.load(final)
    assert loaded.num_timesteps == max(int(p.stem.split("_")[1]) for p in ckpt.glob("ppo_*_steps.zip"))
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]
