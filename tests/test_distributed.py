"""Data-parallel training on torch.distributed (gloo, 2 processes on 127.0.0.1).

Each test spawns 2 ranks inside the test with torchrun's environment variables, so the
code under test joins the group exactly as under ``torchrun --nproc_per_node=2``. The
ranks record their parameters after every update and the data each update saw; the test
then checks that (a) both ranks hold identical parameters after every update and (b) one
process fed the union of both ranks' batches (the doubled batch) computes the same update.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )


def _flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


PPO_KWARGS = dict(n_steps=16, batch_size=32, n_epochs=2, normalize_advantage=False, learning_rate=3e-3, seed=3, n_envs=2)


def _ppo_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    from agents import PPO
    from agents import distributed
    from agents.callbacks import BaseCallback

    class Record(BaseCallback):
        """Parameters before each update and the rollout it trains on."""

        def __init__(self):
            super().__init__()
            self.before, self.rollouts, self.after = [], [], []

        def _on_rollout_end(self) -> None:
            buf = self.model.rollout_buffer
            self.before.append(_flat_params(self.model.policy))
            self.rollouts.append(
                {k: getattr(buf, k).clone() for k in ("observations", "actions", "values", "log_probs", "advantages", "returns", "valid")}
            )

        def _on_step(self) -> bool:
            return True

    model = PPO("MlpPolicy", "CartPole-v1", **PPO_KWARGS)
    assert distributed.world_size() == world and distributed.rank() == rank
    record = Record()
    # 3 iterations: 3 x (16 steps x 2 envs x 2 ranks)
    model.learn(3 * 16 * 2 * world, callback=record)
    after = record.before[1:] + [_flat_params(model.policy)]
    torch.save(
        {"before": record.before, "after": after, "rollouts": record.rollouts, "num_timesteps": model.num_timesteps,
         "optimizer": model.policy.optimizer.state_dict(), "helpers": _helpers_on_rank(rank)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    distributed.destroy()


def _spawn(fn, world: int, tmp_path) -> list[dict]:
    port = _free_port()
    mp.spawn(fn, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_ranks_ppo_identical_and_equal_to_doubled_batch(tmp_path):
    from agents import PPO

    ranks = _spawn(_ppo_rank, 2, tmp_path)
    r0, r1 = ranks
    # the collectives on their own: weighted gradient average, broadcast, shard, min/mean/any
    _check_helpers(r0["helpers"], r1["helpers"])
    assert r0["num_timesteps"] == r1["num_timesteps"] == 3 * 16 * 2 * 2  # global step count
    # the ranks saw different data (differently seeded envs) ...
    assert not torch.equal(r0["rollouts"][0]["observations"], r1["rollouts"][0]["observations"])
    # ... yet hold the same parameters after every update
    assert len(r0["after"]) == 3
    torch.testing.assert_close(r0["before"][0], r1["before"][0], rtol=0, atol=0)
    for a0, a1 in zip(r0["after"], r1["after"]):
        torch.testing.assert_close(a0, a1, rtol=0, atol=0)
        assert not torch.equal(a0, r0["before"][0])

    # rank r seeds its envs with seed + r * n_envs (rank 1 continues where rank 0's seeds end)
    from agents import make_vec_env

    for r, rec in enumerate(ranks):
        first_obs, _ = make_vec_env("CartPole-v1", n_envs=2).reset(seed=PPO_KWARGS["seed"] + 2 * r)
        np.testing.assert_array_equal(rec["rollouts"][0]["observations"][0].numpy(), first_obs)

    # one process with 4 envs and the doubled batch, fed both ranks' rollouts, makes the same updates
    kwargs = dict(PPO_KWARGS, n_envs=4, batch_size=2 * PPO_KWARGS["batch_size"])
    single = PPO("MlpPolicy", "CartPole-v1", **kwargs)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(r0["before"][0], single.policy.parameters())
    single._current_progress_remaining = 1.0
    for it in range(3):
        torch.testing.assert_close(_flat_params(single.policy), r0["before"][it], rtol=1e-5, atol=1e-6)
        buf = single.rollout_buffer
        for key in ("observations", "actions", "values", "log_probs", "advantages", "returns", "valid"):
            getattr(buf, key).copy_(torch.cat([r0["rollouts"][it][key], r1["rollouts"][it][key]], dim=1))
        single.train()
        torch.testing.assert_close(_flat_params(single.policy), r0["after"][it], rtol=1e-5, atol=1e-6)
    # Adam's moments match too
    s_state = single.policy.optimizer.state_dict()["state"]
    for k, v in r0["optimizer"]["state"].items():
        torch.testing.assert_close(s_state[k]["exp_avg"], v["exp_avg"], rtol=1e-4, atol=1e-7)


def _helpers_on_rank(rank: int) -> dict:
    """The collectives on their own (run inside a spawned rank)."""
    from agents import distributed

    # unequal shares: rank 0 has 3 samples, rank 1 has 1; the weighted average is the global mean gradient
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    w = torch.nn.Parameter(torch.arange(3.0))
    local = [0, 1, 2] if rank == 0 else [3]
    (x[local] @ w).pow(2).mean().backward()
    distributed.allreduce_gradients([w], weight=len(local))
    p = torch.nn.Parameter(torch.full((2,), float(rank + 1)))
    distributed.broadcast_parameters([p])
    return {
        "grad": w.grad.clone(), "p": p.detach().clone(), "shard": distributed.shard(range(5)),
        "min": distributed.allreduce_min(5 + rank), "mean": distributed.allreduce_mean(float(rank)),
        "any": (distributed.allreduce_any(rank == 1), distributed.allreduce_any(False)),
    }


def _check_helpers(r0: dict, r1: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    w = torch.nn.Parameter(torch.arange(3.0))
    (x @ w).pow(2).mean().backward()
    torch.testing.assert_close(r0["grad"], w.grad)
    torch.testing.assert_close(r1["grad"], w.grad)
    assert r0["p"].tolist() == r1["p"].tolist() == [1.0, 1.0]
    assert r0["shard"] == ([0, 2, 4], 3.0) and r1["shard"] == ([1, 3], 2.0)
    assert r0["min"] == r1["min"] == 5 and r0["mean"] == r1["mean"] == 0.5
    assert r0["any"] == r1["any"] == (True, False)


def test_single_process_helpers_are_no_ops(monkeypatch):
    from agents import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_distributed("cpu")
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    assert distributed.rank_seed(7, 4) == 7
    assert distributed.shard([4, 5, 6]) == ([4, 5, 6], 3.0)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.allreduce_gradients([p], weight=5)
    assert p.grad.tolist() == [3.0, 3.0]


def test_incomplete_torchrun_environment_is_a_clear_error(monkeypatch):
    from agents import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_distributed("cpu")


def _offline_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    from tests.test_distributed import _train_offline

    result = {kind: _flat_params(_train_offline(kind, os.path.join(out_dir, "lm"), out_dir)) for kind in ("reward_model", "sft", "dpo")}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    from agents import distributed

    distributed.destroy()


def _train_offline(kind: str, lm_dir: str, out_dir: str):
    """2 epochs over 6 pairs in global batches of 4 (the last batch of each epoch has 2)."""
    from tests.test_sft_dpo import PAIRS

    pairs = PAIRS + PAIRS[:2]
    if kind == "reward_model":
        from rlhf_env.reward_model import RewardModelConfig, train_reward_model

        cfg = RewardModelConfig(learning_rate=3e-3, batch_size=4, epochs=2, warmup_ratio=0.25)
        return train_reward_model(pairs, backbone=lm_dir, config=cfg, progress=False, output_dir=os.path.join(out_dir, "rm_out"))
    if kind == "sft":
        from rlhf_env.sft import SFTConfig, train_sft

        return train_sft(pairs, lm_dir, config=SFTConfig(learning_rate=1e-2, batch_size=4, epochs=2), progress=False)[0]
    from rlhf_env.dpo import DPOConfig, train_dpo

    return train_dpo(pairs, lm_dir, config=DPOConfig(learning_rate=1e-2, batch_size=4, epochs=2), progress=False)[0]


def test_offline_trainers_two_ranks_match_one_process(tmp_path):
    from tests.test_sft_dpo import make_tiny_lm

    torch.set_num_threads(1)
    make_tiny_lm(tmp_path / "lm")
    r0, r1 = _spawn(_offline_rank, 2, tmp_path)
    assert (tmp_path / "rm_out").is_dir()  # written once, by rank 0
    for kind in ("reward_model", "sft", "dpo"):
        torch.testing.assert_close(r0[kind], r1[kind], rtol=0, atol=0, msg=lambda m: f"{kind}: {m}")
        single = _flat_params(_train_offline(kind, str(tmp_path / "lm"), str(tmp_path / "single")))
        if kind == "reward_model":
            # the head's bias (last) cancels in s_chosen - s_rejected: its gradient is rounding
            # noise, which Adam scales to lr-sized steps; every other weight must agree
            r0[kind], single = r0[kind][:-1], single[:-1]
        torch.testing.assert_close(r0[kind], single, rtol=1e-4, atol=1e-5, msg=lambda m: f"{kind}: {m}")


def _e_fraction(prompts, responses):
    """A cheap deterministic reward: fraction of the letter 'e' in each response."""
    return torch.tensor([r.count("e") / max(1, len(r)) for r in responses])


def _text_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    from agents import PPO
    from agents import distributed
    from agents.grpo import GRPO
    from tests.conftest import PROMPTS

    result = {}
    for name in ("ppo", "grpo"):
        env = gym_make_vec(os.path.join(out_dir, "lm"), PROMPTS)
        if name == "ppo":
            model = PPO("LMPolicy", env, n_steps=4, batch_size=16, n_epochs=2, learning_rate=1e-2, gamma=1.0, seed=0)
        else:
            # the tiny LM's responses all score 0 (no signal in the advantages): an entropy bonus
            # makes the update move the weights, so that staying identical across ranks means something
            model = GRPO("LMPolicy", env, group_size=2, n_epochs=2, learning_rate=1e-2, ent_coef=0.01, seed=0)
        before = _flat_params(model.policy)
        model.learn(2 * 4 * 2 * world)  # two iterations
        result[name] = {
            "before": before, "after": _flat_params(model.policy), "num_timesteps": model.num_timesteps,
            "responses": sorted(tuple(s.context_ids.tolist()) + tuple(s.response_ids.tolist()) for s in model._segments),
        }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.destroy()


def gym_make_vec(lm_dir: str, prompts):
    import gymnasium as gym

    import rlhf_env  # noqa: F401

    return gym.make_vec("TextRLHF-v0", num_envs=2, model=lm_dir, reward_model=_e_fraction, prompts=prompts, max_new_tokens=4, shared_model=False)


def test_text_ppo_and_grpo_two_ranks_stay_identical(tmp_path):
    from tests.conftest import build_tiny_lm_dir

    build_tiny_lm_dir(tmp_path / "lm")
    r0, r1 = _spawn(_text_rank, 2, tmp_path)
    for name in ("ppo", "grpo"):
        assert r0[name]["num_timesteps"] == r1[name]["num_timesteps"] == 2 * 4 * 2 * 2
        assert r0[name]["responses"] != r1[name]["responses"]  # each rank sampled its own responses
        torch.testing.assert_close(r0[name]["before"], r1[name]["before"], rtol=0, atol=0)
        torch.testing.assert_close(r0[name]["after"], r1[name]["after"], rtol=0, atol=0)
        assert not torch.equal(r0[name]["after"], r0[name]["before"])


def test_reinforce_refuses_torchrun(monkeypatch):
    """REINFORCE's per-episode updates cannot line up across ranks: a clear error, not a hang."""
    from agents import REINFORCE

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="REINFORCE is not data-parallel"):
        REINFORCE("MlpPolicy", "CartPole-v1")


# task rows: 12 rows, two of them sharing a prompt with different answers
ROWS = [{"prompt": f"say the number {i % 11}", "answer": str(i), "id": i} for i in range(12)]


def _row_reward(prompts, completions, answer, id, **kwargs):
    """Returns each row's id / 12; fails if a row's columns did not travel together."""
    for p, a, i in zip(prompts, answer, id):
        assert p == ROWS[i]["prompt"] and a == ROWS[i]["answer"], (p, a, i)
    _ROW_CALLS.extend(id)
    return [i / 12 for i in id]


_ROW_CALLS: list[int] = []


def _rows_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    import gymnasium as gym

    import rlhf_env  # noqa: F401
    from agents import PPO
    from agents import distributed
    from agents.grpo import GRPO

    result = {}
    for name in ("ppo", "grpo"):
        _ROW_CALLS.clear()
        env = gym.make_vec("TextRLHF-v0", num_envs=4, model=os.path.join(out_dir, "lm"), dataset=ROWS,
                           reward_funcs=_row_reward, max_new_tokens=3, shared_model=False)
        if name == "ppo":
            model = PPO("LMPolicy", env, n_steps=4, batch_size=16, n_epochs=1, learning_rate=1e-2, gamma=1.0, seed=0)
        else:
            model = GRPO("LMPolicy", env, group_size=2, n_epochs=1, learning_rate=1e-2, seed=0)
        model.learn(2 * 4 * 4 * world)
        result[name] = {"rows": list(_ROW_CALLS), "after": _flat_params(model.policy)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.destroy()


def test_rows_reach_the_reward_on_two_ranks(tmp_path):
    """Each rank scores its own rows with their own columns (checked inside the reward on
    every call), the ranks draw different rows, and they stay identical."""
    from tests.conftest import build_tiny_lm_dir

    build_tiny_lm_dir(tmp_path / "lm")
    r0, r1 = _spawn(_rows_rank, 2, tmp_path)
    for name in ("ppo", "grpo"):
        assert len(r0[name]["rows"]) >= 4 and len(r1[name]["rows"]) >= 4
        assert r0[name]["rows"] != r1[name]["rows"]  # each rank its own rows
        torch.testing.assert_close(r0[name]["after"], r1[name]["after"], rtol=0, atol=0)
