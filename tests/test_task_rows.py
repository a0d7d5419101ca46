"""Task rows through the text envs: each finished response is scored with the columns of
its own row (never looked up by prompt text) through reset, autoreset (both modes), GRPO
groups and the agents' logs; reward functions follow TRL's convention."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env  # noqa: F401  (registers the envs)

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2  # "</s>" of the tiny test tokenizer

# two rows share a prompt with different answers; one prompt is a message list with its own system message
ROWS = [
    {"prompt": "tell me a story", "answer": "a", "id": 0},
    {"prompt": "tell me a story", "answer": "b", "id": 1},
    {"prompt": "hello", "answer": "c", "id": 2},
    {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}], "answer": "d", "id": 3},
    {"prompt": "what is the weather like", "answer": "e", "id": 4},
]


class Recorder:
    """A TRL-style reward function that returns each row's id and records every call."""

    __name__ = "row_id"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, answer, id, **kwargs):
        for p, a, i in zip(prompts, answer, id):
            assert p == ROWS[i]["prompt"] and a == ROWS[i]["answer"]  # the columns belong together
        self.calls.append({"ids": list(id), "completion_ids": [list(c) for c in completion_ids], "completions": completions})
        return [float(i) for i in id]


def _vec(tiny_lm_dir, n, **kwargs):
    kwargs.setdefault("max_new_tokens", 3)
    return gym.make_vec("TextRLHF-v0", num_envs=n, model=str(tiny_lm_dir), dataset=ROWS, shared_model=False, **kwargs)


def _drive(env, steps, seed=0):
    """Random actions (EOS often); returns [(row, actions sent)] of every finished response in
    the order the env finished them, and the infos of every step."""
    n = env.num_envs
    rng = np.random.default_rng(seed)
    _, infos = env.reset(seed=seed)
    row_of = [int(r) for r in infos["row"]]
    sent = [[] for _ in range(n)]
    restart = np.zeros(n, dtype=bool)
    finished = []
    same_step = env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    for _ in range(steps):
        actions = rng.choice([EOS, 5, 6, 7], size=n)
        _, rewards, terminated, _, infos = env.step(actions)
        final = infos.get("final_info", infos) if same_step else infos
        for i in range(n):
            if restart[i]:  # NEXT_STEP: this step reset sub-env i; its action was ignored
                row_of[i], sent[i], restart[i] = int(infos["row"][i]), [], False
                continue
            sent[i].append(int(actions[i]))
            if terminated[i]:
                assert final["row"][i] == row_of[i] and final["score"][i] == row_of[i]
                assert final["rewards/row_id"][i] == row_of[i]
                finished.append((row_of[i], sent[i]))
                if same_step:
                    row_of[i], sent[i] = int(infos["row"][i]), []
                else:
                    restart[i] = True
    return finished


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_columns_reach_the_reward_for_the_rows_that_finished_in_order(tiny_lm_dir, mode):
    reward = Recorder()
    env = _vec(tiny_lm_dir, 3, reward_funcs=reward, autoreset_mode=mode)
    finished = _drive(env, 25)
    assert len(finished) > 10 and {row for row, _ in finished} == set(range(len(ROWS)))
    called = [(i, ids) for call in reward.calls for i, ids in zip(call["ids"], call["completion_ids"])]
    assert called == finished  # same rows, same responses, same order
    for call in reward.calls:  # conversational rows get TRL's completion shape
        for i, c in zip(call["ids"], call["completions"]):
            assert isinstance(c, list) and c[0]["role"] == "assistant" if i == 3 else isinstance(c, str)


def test_duplicate_prompts_are_scored_by_their_own_rows(tiny_lm_dir):
    env = _vec(tiny_lm_dir, 2, reward_funcs=Recorder())
    _, infos = env.reset(options={"row": [1, 0]})
    assert list(infos["prompt"]) == ["tell me a story"] * 2 and list(infos["row"]) == [1, 0]
    _, rewards, terminated, _, infos = env.step(np.array([EOS, EOS]))
    assert terminated.all() and infos["score"].tolist() == [1.0, 0.0]


def test_single_env_rows_reset_and_system_prompt(tiny_lm_dir):
    reward = Recorder()
    env = gym.make("TextRLHF-v0", model=str(tiny_lm_dir), dataset=ROWS, reward_funcs=reward, max_new_tokens=2)
    seen = set()
    for seed in range(12):
        _, info = env.reset(seed=seed)
        seen.add(info["row"])
        _, _, terminated, _, info = env.step(EOS)
        assert terminated and info["score"] == info["row"] == reward.calls[-1]["ids"][0]
    assert len(seen) > 2
    _, info = env.reset(options={"row": 3})
    tok = env.unwrapped.tokenizer
    assert info["prompt"] == "hello" and tok.decode(info["prompt_ids"][1:]) == "be kind\nhello"
    # a prompt given by text has no row: its columns are None (this function then does not apply)
    only = lambda prompts, completions, answer, **kw: [None if a is None else 1.0 for a in answer]  # noqa: E731
    env2 = gym.make("TextRLHF-v0", model=str(tiny_lm_dir), dataset=[{"prompt": "hello", "answer": "x"}], reward_funcs=only, reward_model=lambda p, r: [0.5] * len(p),
                    max_new_tokens=2, system_prompt="the sea")
    _, info = env2.reset(options={"prompt": "tell me a story"})
    assert info["row"] is None and env2.unwrapped.tokenizer.decode(info["prompt_ids"][1:]) == "the sea\ntell me a story"
    _, _, _, _, info = env2.step(EOS)
    assert info["score"] == 0.5 and np.isnan(info["rewards/<lambda>"]) and info["rewards/reward_model"] == 0.5


def test_prompt_too_long_reports_the_budget(tiny_lm_dir):
    with pytest.raises(ValueError, match=r"dataset\[1\] is \d+ tokens long .*: \d+ of prompt text and \d+ of chat template/system message; "):
        gym.make("TextRLHF-v0", model=str(tiny_lm_dir), dataset=[{"prompt": "hi"}, {"prompt": "hello " * 40}],
                 reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                 max_prompt_tokens=16)


def test_grpo_groups_share_one_row_and_logs_equal_hand_computations(tiny_lm_dir):
    from agents.callbacks import BaseCallback
    from agents.grpo import GRPO

    reward = Recorder()

    def length(prompts, completions, completion_ids, **kwargs):
        """Applies to odd rows only (None elsewhere)."""
        return [float(len(c)) if i % 2 else None for c, i in zip(completion_ids, kwargs["id"])]

    env = _vec(tiny_lm_dir, 4, reward_funcs=[reward, length], reward_weights=[2.0, 0.5])
    model = GRPO("LMPolicy", env, group_size=2, learning_rate=1e-3, seed=0)
    logged = {}

    class LastRollout(BaseCallback):
        def _on_training_start(self) -> None:
            record = self.model.logger.record

            def spy(key, value, *args, **kwargs):
                logged[key] = value
                return record(key, value, *args, **kwargs)

            self.model.logger.record = spy

        def _on_rollout_start(self) -> None:
            reward.calls.clear()  # keep the calls of the last rollout only

        def _on_step(self) -> bool:
            return True

    model.learn(4 * 4, callback=LastRollout())  # rollouts of 2 groups of 2 sub-envs
    rows = env.unwrapped.row_indices  # the row each sub-env answered in that rollout
    assert rows[0] == rows[1] and rows[2] == rows[3]  # a group is one row
    assert len(model._segments) == 4
    for s in model._segments:
        row = rows[2 * s.group]
        # the score is the weighted sum, a function's None adds nothing
        assert s.score == pytest.approx(2.0 * row + (0.5 * len(s) if row % 2 else 0.0))
    row_ids = np.array([i for call in reward.calls for i in call["ids"]], dtype=float)
    lens = np.array([len(c) for call in reward.calls for c in call["completion_ids"]], dtype=float)
    assert sorted(row_ids.tolist()) == sorted(float(rows[2 * s.group]) for s in model._segments)
    # per-function logs: mean and (population) std over the responses each function applies to
    assert logged["rewards/row_id/mean"] == pytest.approx(row_ids.mean())
    assert logged["rewards/row_id/std"] == pytest.approx(row_ids.std())
    odd = lens[row_ids % 2 == 1]
    if odd.size:
        assert logged["rewards/length/mean"] == pytest.approx(odd.mean())
        assert logged["rewards/length/std"] == pytest.approx(odd.std())
    else:
        assert "rewards/length/mean" not in logged


def test_trl_reward_functions_run_unchanged(tiny_lm_dir):
    """TRL's own reward functions, imported from trl.rewards and passed as they are."""
    rewards = pytest.importorskip("trl.rewards")
    overlong = rewards.get_soft_overlong_punishment(max_completion_len=3, soft_punish_cache=1)
    rows = [{"prompt": [{"role": "user", "content": "hello"}], "solution": "x"}]
    env = gym.make_vec("TextRLHF-v0", num_envs=2, model=str(tiny_lm_dir), dataset=rows, max_new_tokens=3,
                       reward_funcs=[rewards.think_format_reward, overlong], reward_weights=[1.0, 2.0], shared_model=False)
    env.reset(seed=0)
    _, _, terminated, _, infos = env.step(np.array([EOS, 5]))  # sub-env 0 ends after 1 token
    assert terminated.tolist() == [True, False]
    assert infos["rewards/think_format_reward"][0] == 0.0 and infos["rewards/soft_overlong_punishment_reward"][0] == 0.0
    for _ in range(2):
        _, _, terminated, _, infos = env.step(np.array([5, 5]))
    assert terminated[1]  # 3 tokens: (3 - 1) - 3 = -1 over the cache of 1
    assert infos["rewards/soft_overlong_punishment_reward"][1] == -1.0 and infos["score"][1] == 2.0 * -1.0
