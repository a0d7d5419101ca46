"""``rlhf_env.agents`` / ``rlhf_env.envs``: the documented import names, which a user's own
``agents.py`` or ``envs.py`` next to their script cannot shadow; the short names keep working."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_long_names_are_the_short_packages():
    import agents
    import agents.policies.lm
    import envs
    import envs.text_env
    import rlhf_env.agents
    import rlhf_env.envs
    from rlhf_env.agents import PPO
    from rlhf_env.agents.policies.lm import LMActorCriticPolicy
    from rlhf_env.envs.text_env import TextRLHFEnv

    assert rlhf_env.agents is agents and rlhf_env.envs is envs  # one copy: classes, registries, pickles shared
    assert PPO is agents.PPO and LMActorCriticPolicy is agents.policies.lm.LMActorCriticPolicy
    assert TextRLHFEnv is envs.text_env.TextRLHFEnv


def test_users_own_agents_and_envs_modules_do_not_shadow_the_package(tmp_path):
    (tmp_path / "agents.py").write_text('WHO = "the user\'s agents.py"\n')
    (tmp_path / "envs.py").write_text('WHO = "the user\'s envs.py"\n')
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import agents, envs  # the user's own modules keep their names
        import gymnasium as gym
        import rlhf_env
        from rlhf_env.agents import PPO

        model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0)
        model.learn(64)
        text = PPO("LMPolicy", gym.make_vec("TextRLHF-tiny-v0", num_envs=2, max_new_tokens=4), seed=0)
        text.learn(10)
        import agents as again
        print(agents.WHO, "|", envs.WHO, "|", again.WHO, "|", model.num_timesteps, text.num_timesteps)
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "the user's agents.py | the user's envs.py | the user's agents.py | 64 10"
    # the private names never reach the bytecode cache a plain `import agents` reads
    assert not any(b"rlhf_env.envs" in pyc.read_bytes() for pyc in ROOT.glob("agents/__pycache__/base.*.pyc"))


def test_rlhf_env_imports_only_the_long_names():
    """Any `from agents ...` inside rlhf_env would break `import rlhf_env` beside a user's agents.py."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+(agents|envs)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "rlhf_env").rglob("*.py")
                 if p.name != "_packages.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"use rlhf_env.agents / rlhf_env.envs in {offenders}"


def test_one_shadowed_name_and_a_save_load_round_trip(tmp_path):
    """Only ``agents`` shadowed: the shipped agents load privately and import the real ``envs``
    (one copy, shared with ``rlhf_env.envs``); a model saves and loads under the private names."""
    (tmp_path / "agents.py").write_text('WHO = "mine"\n')
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys
        import agents, envs
        import rlhf_env.agents, rlhf_env.envs
        from rlhf_env.agents import PPO
        from rlhf_env.agents.policies import get_policy_class

        assert agents.WHO == "mine" and rlhf_env.agents is not agents and rlhf_env.envs is envs
        assert rlhf_env.agents.base.__file__.endswith("agents/base.py") and "agents.base" not in sys.modules
        assert get_policy_class("MlpPolicy").__module__ == "rlhf_env.agents.policies.mlp"
        model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0)
        model.learn(32)
        model.save("m.zip")
        loaded = PPO.load("m.zip")
        print(type(loaded).__module__, loaded.num_timesteps, agents.WHO)
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "rlhf_env.agents.ppo 32 mine"
