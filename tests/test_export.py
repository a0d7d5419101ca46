"""Exporting a trained text policy to Hugging Face, small checkpoints of text agents, and
``load_lm`` refusing unmerged adapters."""

from __future__ import annotations

import json
import zipfile

import gymnasium as gym
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from agents import GRPO, PPO

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [[1, 5, 9, 17, 33, 41, 7]]


def _env(tiny_lm_dir, tiny_prompts, length_reward, n=4):
    return gym.make_vec("TextRLHF-v0", num_envs=n, model=str(tiny_lm_dir), reward_model=length_reward,
                        prompts=tiny_prompts, max_new_tokens=6, shared_model=False)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.mark.parametrize("policy_kwargs", [{"train_layers": 1}, {"lora": {"r": 4}}], ids=["top-block", "lora"])
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, tiny_lm_dir, tiny_prompts, length_reward, policy_kwargs):
    from transformers import AutoModelForCausalLM

    env = _env(tiny_lm_dir, tiny_prompts, length_reward)
    model = PPO("LMPolicy", env, n_steps=7, batch_size=16, n_epochs=2, learning_rate=1e-2, seed=0, policy_kwargs=policy_kwargs)
    actor = model.policy.actor
    start = _logits(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))
    model.learn(28)
    trained = _logits(actor)
    assert not torch.allclose(trained, start, atol=1e-4)  # training moved the actor: the test can fail

    out = tmp_path / "export"
    assert model.save_pretrained(out) == str(out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "rlhf_env_training.json"} <= files
    assert "adapter_config.json" not in files
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("lora_" in k or "base_layer" in k for k in f.keys())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    # bit for bit without LoRA; with it, W + BA in one matrix rounds differently from Wx + B(Ax)
    exact = "lora" not in policy_kwargs
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    assert same(_logits(loaded), trained)
    if "lora" in policy_kwargs:  # exporting merged a copy: the live actor keeps training its adapters
        assert any("lora_" in n and p.requires_grad for n, p in actor.named_parameters())
    info = json.loads((out / "rlhf_env_training.json").read_text())
    assert info["algorithm"] == "PPO" and info["num_timesteps"] == model.num_timesteps
    assert info["base_model"] == str(tiny_lm_dir)
    assert info["hyperparameters"]["n_steps"] == 7
    # the env takes the folder as its model, with the trained weights
    env2 = gym.make("TextRLHF-v0", model=str(out), reward_model=length_reward, prompts=tiny_prompts, max_new_tokens=4,
                    shared_model=False)
    assert same(_logits(env2.unwrapped.actor), trained)


def test_save_pretrained_of_a_non_lm_policy_says_use_save():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16)
    with pytest.raises(TypeError, match=r"model\.save\(path\)"):
        model.save_pretrained("unused")


def test_text_checkpoint_leaves_out_frozen_weights_and_continues_identically(tmp_path, tiny_lm_dir, tiny_prompts, length_reward):
    kwargs = dict(n_steps=7, batch_size=16, n_epochs=2, learning_rate=1e-2, policy_kwargs={"train_layers": 1})
    model = PPO("LMPolicy", _env(tiny_lm_dir, tiny_prompts, length_reward), seed=0, **kwargs)
    model.learn(28)
    path = tmp_path / "ckpt.zip"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        saved = torch.load(archive.open("policy.pth"), weights_only=False)
    frozen = set(model.policy.frozen_keys())
    assert "actor.model.embed_tokens.weight" in frozen and "actor.lm_head.weight" in frozen
    assert not frozen & set(saved)  # frozen actor weights are not in the file ...
    assert "value_head.weight" in saved and "actor.model.layers.1.mlp.up_proj.weight" in saved  # ... what trains is
    assert not any(k.startswith("actor.model.layers.0.") for k in saved)

    # a fresh env rebuilds the frozen weights from the base model; the checkpoint fills in the rest
    loaded = PPO.load(path, env=_env(tiny_lm_dir, tiny_prompts, length_reward))
    assert loaded.policy.actor is not model.policy.actor
    for (k, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k
    # both continue from the same seed on equal envs: the same updates
    for m in (model, loaded):
        m.set_random_seed(3)
        m.learn(14)
    changed = False
    for (k, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in model.policy.state_dict().items():
        changed |= not torch.equal(v, saved.get(k, v))
    assert changed


@pytest.mark.parametrize("policy_kwargs", [{"train_layers": 1}, {"lora": {"r": 4}}], ids=["top-block", "lora"])
def test_text_checkpoint_holds_only_trainable_weights_and_their_adam_moments(tmp_path, tiny_lm_dir, tiny_prompts, length_reward, policy_kwargs):
    """The floor of an exact resume and nothing above it: each trainable tensor once at its
    own size (no frozen tensor, no shared or oversized storage), Adam's two moments of each,
    and a few kB of the rest."""
    model = PPO("LMPolicy", _env(tiny_lm_dir, tiny_prompts, length_reward), n_steps=7, batch_size=16, n_epochs=1,
                seed=0, policy_kwargs=policy_kwargs)
    model.learn(28)
    path = tmp_path / "ckpt.zip"
    model.save(path)
    trainable = {k: p for k, p in model.policy.named_parameters() if p.requires_grad}
    weight_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    with zipfile.ZipFile(path) as archive:
        sizes = {i.filename: i.compress_size for i in archive.infolist()}
        saved = torch.load(archive.open("policy.pth"), weights_only=False)
        optimizer = torch.load(archive.open("policy.optimizer.pth"), weights_only=False)
    assert set(saved) == set(trainable)
    for k, v in saved.items():
        assert v.dtype == trainable[k].dtype and v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in optimizer["state"].values()]
    assert len(moments) == len(trainable)
    assert sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in moments) == 2 * weight_bytes
    overhead = 100_000  # pickle framing, RNG states, hyperparameters, the frozen-weight fingerprint
    assert sizes["policy.pth"] < weight_bytes + overhead and sizes["policy.optimizer.pth"] < 2 * weight_bytes + overhead
    assert path.stat().st_size < 3 * weight_bytes + overhead


@pytest.mark.parametrize("how", ["save_only_model", "exclude"])
def test_text_checkpoint_without_the_optimizer_loads_and_continues_with_a_fresh_one(tmp_path, tiny_lm_dir, tiny_prompts, length_reward, how):
    """``save(path, save_only_model=True)`` (or SB3's spelling ``exclude=["policy.optimizer"]``)
    leaves Adam's moments out: a third of the exact checkpoint; ``load`` gives the same weights
    and counters, and continues exactly as the saved agent does after its optimizer is reset."""
    kwargs = dict(n_steps=7, batch_size=16, n_epochs=2, learning_rate=1e-2, policy_kwargs={"train_layers": 1})
    model = PPO("LMPolicy", _env(tiny_lm_dir, tiny_prompts, length_reward), seed=0, **kwargs)
    model.learn(28)
    full, small = tmp_path / "full.zip", tmp_path / "small.zip"
    model.save(full)
    model.save(small, **({"save_only_model": True} if how == "save_only_model" else {"exclude": ["policy.optimizer"]}))
    with zipfile.ZipFile(small) as archive:
        assert "policy.optimizer.pth" not in archive.namelist()
        assert json.loads(archive.read("header.json"))["optimizer_state"] is False
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.policy.parameters() if p.requires_grad)
    assert 2 * trainable_bytes <= full.stat().st_size - small.stat().st_size < 2 * trainable_bytes + 20_000  # Adam's moments

    loaded = PPO.load(small, env=_env(tiny_lm_dir, tiny_prompts, length_reward))
    assert loaded.num_timesteps == model.num_timesteps and loaded._n_updates == model._n_updates
    assert not loaded.policy.optimizer.state  # fresh: no moments yet
    for (k, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k
    model.policy.optimizer.state.clear()  # what the small checkpoint's resume starts from
    for m in (model, loaded):
        m.set_random_seed(3)
        m.learn(14)
    for (k, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.policy.optimizer.state  # it trained
    # set_parameters of the small zip into a live agent keeps that agent's optimizer
    loaded.set_parameters(str(small))


def test_text_checkpoint_of_a_relative_model_folder_loads_from_another_folder(tmp_path, tiny_lm_dir, tiny_prompts, length_reward, monkeypatch):
    """model="my_model" (a folder next to the script) is recorded by its absolute path, so
    PPO.load(zip) without env= rebuilds the base model from any working folder."""
    import shutil

    shutil.copytree(tiny_lm_dir, tmp_path / "my_model")
    monkeypatch.chdir(tmp_path)
    env = gym.make_vec("TextRLHF-v0", num_envs=2, model="my_model", reward_model=length_reward, prompts=tiny_prompts,
                       max_new_tokens=4, shared_model=False)
    model = PPO("LMPolicy", env, n_steps=5, batch_size=10, policy_kwargs={"train_layers": 1})
    model.learn(10)
    model.save("agent.zip")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = PPO.load(tmp_path / "agent.zip")
    for (k, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), k


def test_text_checkpoint_refuses_another_base_model(tmp_path, tiny_lm_dir, tiny_prompts, length_reward):
    from tests.conftest import build_tiny_lm_dir

    model = GRPO("LMPolicy", _env(tiny_lm_dir, tiny_prompts, length_reward), group_size=2, seed=0,
                 policy_kwargs={"train_layers": 1})
    model.save(tmp_path / "ckpt.zip")
    other = build_tiny_lm_dir(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="frozen weights of the actor differ"):
        GRPO.load(tmp_path / "ckpt.zip", env=_env(other, tiny_prompts, length_reward))


def test_load_lm_refuses_unmerged_adapters(tmp_path, tiny_lm_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_env.models import load_lm

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")  # adapter_config.json + adapter_model.safetensors
    with pytest.raises(ValueError, match="merge_and_unload"):
        load_lm(tmp_path / "adapter")
    # a full model whose weights still hold LoRA layers (actor.save_pretrained after LoRA training)
    from agents.lora import apply_lora

    actor = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), r=2)
    actor.save_pretrained(tmp_path / "injected")
    with pytest.raises(ValueError, match="save_pretrained"):
        load_lm(tmp_path / "injected")


def test_cli_train_export_writes_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_env.cli import main

    yml = tmp_path / "ppo.yml"
    yml.write_text("TextRLHF-tiny-v0:\n  policy: LMPolicy\n  n_steps: 4\n  batch_size: 8\n  n_epochs: 1\n"
                   "  policy_kwargs: \"dict(train_layers=1)\"\n")
    out = tmp_path / "policy"
    assert main(["train", "--algo", "ppo", "--env", "TextRLHF-tiny-v0", "--hyperparams", str(yml), "--timesteps", "8",
                 "--eval-episodes", "0", "--verbose", "0", "--export", str(out), "--save", str(tmp_path / "agent.zip"),
                 "--env-kwargs", '{"reward_model": "sentiment", "max_new_tokens": 3, "system_prompt": "Be kind.", "max_prompt_tokens": 96}']) == 0
    info = json.loads((out / "rlhf_env_training.json").read_text())
    assert info["algorithm"] == "PPO" and info["train_layers"] == 1 and info["num_timesteps"] >= 8
    assert info["env"] == {"id": "TextRLHF-tiny-v0", "reward_model": "sentiment", "max_new_tokens": 3, "max_prompt_tokens": 96,
                           "system_prompt": "Be kind.", "kl_coef": info["env"]["kl_coef"]}
    with zipfile.ZipFile(tmp_path / "agent.zip") as archive:  # the agent's zip records the same
        assert json.loads(archive.read("header.json"))["env"] == info["env"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_cli_eval_judges_an_export_with_the_reward_it_was_trained_on(tmp_path, monkeypatch, capsys):
    """`rlhf-env eval DIR` without --reward uses the reward model and response length recorded
    in the export (a policy trained on "sentiment" was judged by the default reward model
    before); --reward wins; a callable reward cannot be loaded back: the default, said so."""
    import rlhf_env.evaluate
    from agents.export import TRAINING_FILE
    from rlhf_env.cli import main

    seen = []
    monkeypatch.setattr(rlhf_env.evaluate, "evaluate", lambda policy, reference, reward, **kw: seen.append((reward, kw.get("max_new_tokens"))) or {})
    monkeypatch.setattr(rlhf_env.evaluate, "format_table", lambda report: "")
    (tmp_path / "my_rewards.py").write_text("def kind(prompts, responses):\n    return [0.0 for _ in responses]\n")
    function = f"{tmp_path / 'my_rewards.py'}:kind"
    cases = (("named", "sentiment"), ("folder", str(tmp_path)), ("callable", "callable my_reward"), ("funcs", None), ("old", None),
             ("function", function), ("gone", f"{tmp_path / 'gone.py'}:kind"))
    for name, reward in cases:
        (tmp_path / name).mkdir()
        env = {"env": {"reward_model": reward, "max_new_tokens": 12}} if name != "old" else {}
        (tmp_path / name / TRAINING_FILE).write_text(json.dumps({"base_model": "tiny", **env}))
    for name, _ in cases:
        assert main(["eval", str(tmp_path / name)]) == 0
    assert main(["eval", str(tmp_path / "named"), "--reward", "tiny", "--max-new-tokens", "5"]) == 0
    assert seen == [("sentiment", 12), (str(tmp_path), 12), ("default", 12), ("default", 12), ("default", None),
                    (function, 12), ("default", 12), ("tiny", 5)]
    import agents.export

    reads = []
    real_read = agents.export.read_training_info
    monkeypatch.setattr(agents.export, "read_training_info", lambda d: reads.append(d) or real_read(d))
    assert main(["eval", str(tmp_path / "named")]) == 0
    assert reads == [str(tmp_path / "named")]  # the record is read once, for the reference, the reward and the length
    out = capsys.readouterr().out
    assert "trained with reward functions, no reward model" in out
    assert f"reward (--reward): sentiment (recorded in {tmp_path / 'named'})" in out
    assert "trained with callable my_reward, which cannot be loaded by name" in out


def test_cli_eval_of_an_exported_folder_judges_it_against_its_base_model(tmp_path, monkeypatch, capsys):
    """`rlhf-env eval DIR` of a policy trained from "tiny" takes "tiny" as the reference (the
    KL and win rate against SmolLM2 meant nothing); --reference still wins."""
    import rlhf_env.evaluate
    from agents.export import TRAINING_FILE
    from rlhf_env.cli import main

    seen = []
    monkeypatch.setattr(rlhf_env.evaluate, "evaluate", lambda policy, reference, **kw: seen.append(reference) or {})
    monkeypatch.setattr(rlhf_env.evaluate, "format_table", lambda report: "")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / TRAINING_FILE).write_text(json.dumps({"base_model": "tiny", "algorithm": "PPO"}))
    (tmp_path / "plain").mkdir()
    assert main(["eval", str(tmp_path / "policy")]) == 0
    assert main(["eval", str(tmp_path / "policy"), "--reference", "smollm2-135m"]) == 0
    assert main(["eval", str(tmp_path / "plain")]) == 0  # a folder without a record: the shipped starting model
    assert main(["eval", "tiny"]) == 0  # a shipped model by name: judged against itself, not against SmolLM2
    assert seen == ["tiny", "smollm2-135m", "smollm2-135m", "tiny"]
    assert "reference (--reference): tiny" in capsys.readouterr().out


def test_cli_eval_judges_on_the_users_prompts(tmp_path, monkeypatch, capsys):
    """`rlhf-env eval DIR --prompts FILE` judges on those prompts (a .txt, one a line, or
    .jsonl), not on the default task's held-out set; a missing file fails before any load."""
    import rlhf_env.evaluate
    from rlhf_env.cli import main

    seen = []
    monkeypatch.setattr(rlhf_env.evaluate, "evaluate", lambda policy, prompts=None, **kw: seen.append(prompts) or {})
    monkeypatch.setattr(rlhf_env.evaluate, "format_table", lambda report: "")
    (tmp_path / "mine.txt").write_text("Describe your favourite season.\n\nGive one tip for a job interview.\n")
    assert main(["eval", "tiny", "--prompts", str(tmp_path / "mine.txt")]) == 0
    assert main(["eval", "tiny"]) == 0
    assert seen == [["Describe your favourite season.", "Give one tip for a job interview."], None]
    assert main(["eval", "tiny", "--prompts", str(tmp_path / "missing.txt")]) == 1
    assert "prompt file" in capsys.readouterr().err and len(seen) == 2


def test_the_export_records_the_reward_so_that_it_loads_again(tmp_path):
    """An env's reward in the export's record: as named, or as a reward object names itself
    (a RewardModel folder by its absolute path, the VADER rewards by name), a plain callable by
    its name (not loadable), None with reward functions alone."""
    from agents.export import env_description
    from rlhf_env.reward_model import RewardModel
    from rlhf_env.rewards import TinyReward, resolve_reward

    RewardModel.from_backbone("tiny", seed=0).save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")

    def mine(prompts, responses):
        return [0.0] * len(responses)

    cases = [(dict(reward_model="sentiment"), "sentiment"), (dict(reward_model=TinyReward()), "tiny"),
             (dict(reward_model=loaded), str((tmp_path / "rm").resolve())), (dict(reward_model=mine), "callable mine"),
             (dict(reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions)), None)]
    for kwargs, expected in cases:
        env = gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=2, **kwargs)
        record = env_description(env)
        assert record["reward_model"] == expected, kwargs
        assert record["id"] == "TextRLHF-tiny-v0" and record["max_new_tokens"] == 2
        if expected is not None and not expected.startswith("callable"):
            assert callable(resolve_reward(expected))  # what rlhf-env eval does with it


def test_describe_reward_makes_a_reward_file_absolute(tmp_path, monkeypatch):
    """A FILE.py:NAME reward named relative to the training folder is recorded by absolute
    path (so `rlhf-env eval DIR` finds it from anywhere); a missing file stays as named."""
    from agents.export import describe_reward

    (tmp_path / "mine.py").write_text("def kind(prompts, responses):\n    return [0.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    assert describe_reward("mine.py:kind", None) == f"{tmp_path / 'mine.py'}:kind"
    assert describe_reward("gone.py:kind", None) == "gone.py:kind"
    assert describe_reward(".", None) == str(tmp_path)
    assert describe_reward(None, len) == "callable len"
