"""Layers point one way: ``envs`` (the MDP) imports neither ``agents`` nor ``rlhf_env``, and
the text envs build from parts (a module, its tokenizer, a reward callable, prompts)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_import_statement_under_envs_names_agents_or_rlhf_env():
    pattern = re.compile(r"^\s*(from|import) (rlhf_env|agents)\b", re.MULTILINE)
    offenders = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in sorted((ROOT / "envs").rglob("*.py"))
        for text in [path.read_text()]
        for m in pattern.finditer(text)
    ]
    assert offenders == []


def test_envs_builds_the_tiny_env_from_parts_without_agents_or_rlhf_env(tiny_lm_dir):
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import envs
        from envs.text_env import TextRLHFEnv
        from envs.text_vec_env import TextRLHFVectorEnv
        from envs.wrappers import SB3VecEnv

        model = AutoModelForCausalLM.from_pretrained({str(tiny_lm_dir)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(tiny_lm_dir)!r})
        def reward(prompts, responses):
            return [float(len(r)) for r in responses]
        prompts = ["tell me a story", "hello"]

        env = TextRLHFEnv(model=model, tokenizer=tokenizer, reward_model=reward, prompts=prompts,
                          max_new_tokens=3, max_prompt_tokens=16)
        obs, info = env.reset(seed=0)
        assert info["prompt"] in prompts
        total, done = 0.0, False
        while not done:
            obs, r, done, truncated, info = env.step(5)
            total += r
        assert "score" in info and info["score"] == float(len(info["response"]))
        assert abs(info["kl"]) < 1e-5  # actor == reference at the start

        venv = TextRLHFVectorEnv(num_envs=2, model=model, tokenizer=tokenizer, reward_model=reward, prompts=prompts,
                                 max_new_tokens=2, max_prompt_tokens=16)
        assert venv.core is env.core  # one module, one core
        venv.reset(seed=1)
        for _ in range(3):
            venv.step(np.array([5, 6]))
        sb3 = SB3VecEnv(TextRLHFVectorEnv(num_envs=2, model=model, tokenizer=tokenizer, reward_model=reward,
                                          prompts=prompts, max_new_tokens=2, max_prompt_tokens=16,
                                          autoreset_mode="SameStep"))
        sb3.reset()
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("agents", "rlhf_env"))
        assert not leaked, leaked
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "tiny"}, "make the env by id"),
        ({"reward_model": "sentiment"}, "reward_model must be a callable"),
        ({"prompts": "prompts.txt"}, "prompts must be a list of strings"),
    ],
)
def test_env_from_parts_refuses_names_with_a_pointer_to_the_registered_ids(tiny_lm_dir, kwargs, message):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.text_env import TextRLHFEnv

    parts = {
        "model": AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)),
        "tokenizer": AutoTokenizer.from_pretrained(str(tiny_lm_dir)),
        "reward_model": lambda prompts, responses: [0.0] * len(responses),
        "prompts": ["hello"],
    }
    with pytest.raises((TypeError, ValueError), match=message):
        TextRLHFEnv(**{**parts, **kwargs})


def test_the_space_carries_an_explicit_handle_to_the_env_models(tiny_lm_dir):
    """The policy reaches the env's core through the observation space's handle: copies
    share it, a pickle holds only the model's description and rebuilds from it."""
    import copy
    import pickle

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.text_env import TextRLHFEnv

    env = TextRLHFEnv(model=AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)),
                      tokenizer=AutoTokenizer.from_pretrained(str(tiny_lm_dir)),
                      reward_model=lambda prompts, responses: [0.0] * len(responses), prompts=["hello"])
    space = env.observation_space
    assert space.lm.core() is env.core and copy.deepcopy(space).lm.core() is env.core
    blob = pickle.dumps(space)
    assert len(blob) < 4096  # a description, not a model
    restored = pickle.loads(blob)
    assert restored == space and restored.lm.spec["model"] == str(tiny_lm_dir)
    rebuilt = restored.lm.core()  # no loader named: read from the directory with transformers
    assert rebuilt is not env.core and rebuilt.vocab_size == env.core.vocab_size
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.actor(input_ids=ids).logits, env.actor(input_ids=ids).logits)
