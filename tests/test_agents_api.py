"""The SB3 interface of agents: spaces, env kinds, predict, save/load, parameters,
seeding, TensorBoard tags, callbacks and the errors on bad input."""

import os
import re
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import A2C, PPO, REINFORCE, BaseCallback, CheckpointCallback, EvalCallback, StopTrainingOnRewardThreshold
from agents.vec_env import VecEnvAdapter, make_vec_env

pytestmark = pytest.mark.usefixtures("one_thread")


class SpaceEnv(gym.Env):
    """A cheap env with any observation/action space: reward 1 when the first action
    entry is 0, episodes of 5 steps (terminated) or a time limit."""

    def __init__(self, observation_space, action_space, length=5):
        self.observation_space, self.action_space, self.length = observation_space, action_space, length
        self.t = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        first = np.asarray(action).ravel()[0]
        return self.observation_space.sample(), float(first == 0), self.t >= self.length, False, {}


SPACES = {
    "box-discrete": (spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(3)),
    "discrete-box": (spaces.Discrete(4), spaces.Box(-2, 2, (2,), np.float32)),
    "multidiscrete-multidiscrete": (spaces.MultiDiscrete([2, 3]), spaces.MultiDiscrete([3, 2])),
    "multibinary-multibinary": (spaces.MultiBinary(4), spaces.MultiBinary(3)),
    "dict-discrete": (
        spaces.Dict({"ids": spaces.Box(0, 50, (6,), np.int64), "pos": spaces.Box(-1, 1, (2,), np.float32)}),
        spaces.Discrete(2),
    ),
}


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("algo", [PPO, A2C, REINFORCE])
def test_all_spaces_train_and_predict(name, algo):
    obs_space, act_space = SPACES[name]
    env = SpaceEnv(obs_space, act_space)
    policy = "MultiInputPolicy" if isinstance(obs_space, spaces.Dict) else "MlpPolicy"
    kwargs = dict(n_steps=8) if algo is not REINFORCE else {}
    if algo is PPO:
        kwargs["batch_size"] = 4
    model = algo(policy, env, seed=0, **kwargs).learn(64)
    assert model.num_timesteps >= 64
    obs, _ = env.reset(seed=1)
    action, state = model.predict(obs, deterministic=True)
    assert state is None and act_space.contains(np.asarray(action, dtype=act_space.dtype))
    batch = {k: np.stack([v, v]) for k, v in obs.items()} if isinstance(obs, dict) else np.stack([obs, obs])
    actions, _ = model.predict(batch, deterministic=True)
    assert actions.shape == (2, *act_space.shape)


def test_rollout_buffer_keeps_integer_observations():
    obs_space, act_space = SPACES["dict-discrete"]
    model = PPO("MultiInputPolicy", SpaceEnv(obs_space, act_space), n_steps=8, batch_size=4, seed=0)
    model.learn(8)
    assert model.rollout_buffer.observations["ids"].dtype == torch.int64
    assert model.rollout_buffer.observations["pos"].dtype == torch.float32


def test_box_actions_are_clipped_to_bounds():
    env = SpaceEnv(spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-0.1, 0.1, (2,), np.float32))
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, policy_kwargs=dict(log_std_init=2.0))
    actions, _ = model.predict(np.zeros((50, 3), np.float32))
    assert np.all(np.abs(actions) <= 0.1 + 1e-7)


def test_unsupported_spaces_are_named():
    env = SpaceEnv(spaces.Box(-1, 1, (3,), np.float32), spaces.Tuple([spaces.Discrete(2), spaces.Discrete(2)]))
    with pytest.raises(ValueError, match="action space Tuple"):
        PPO("MlpPolicy", env)
    env = SpaceEnv(spaces.Tuple([spaces.Discrete(2)]), spaces.Discrete(2))
    with pytest.raises(ValueError, match="observation space Tuple"):
        PPO("MlpPolicy", env)


def test_predict_rejects_wrong_observation_shape():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16)
    with pytest.raises(ValueError, match=r"unexpected observation shape \(3,\).*\(4,\)"):
        model.predict(np.zeros(3, np.float32))
    obs, info = gym.make("CartPole-v1").reset(seed=0)
    with pytest.raises(ValueError, match="obs, info"):
        model.predict((obs, info))


@pytest.mark.parametrize(
    "make_env",
    [
        lambda: "CartPole-v1",
        lambda: gym.make("CartPole-v1"),
        lambda: gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync"),  # NEXT_STEP
        lambda: make_vec_env("CartPole-v1", n_envs=2, vectorization_mode="sync"),  # SAME_STEP
        lambda: pytest.importorskip("stable_baselines3.common.env_util").make_vec_env("CartPole-v1", n_envs=2),
    ],
    ids=["id", "env", "vector-next-step", "vector-same-step", "sb3-vecenv"],
)
def test_env_kinds_give_the_same_episode_statistics(make_env):
    # CartPole pays 1 per valid step: the recorded episode return must equal its length,
    # so the NEXT_STEP reset rows are neither counted nor stored as transitions
    model = PPO("MlpPolicy", make_env(), n_steps=64, batch_size=64, n_epochs=1, seed=0)
    model.learn(512)
    assert len(model.ep_info_buffer) > 5
    assert all(ep["r"] == ep["l"] for ep in model.ep_info_buffer)
    buf = model.rollout_buffer
    rewards_of_valid = buf.rewards[buf.valid]
    assert torch.all(rewards_of_valid == 1.0)


def test_same_step_truncation_bootstraps_with_final_observation_value():
    # Pendulum is only ever truncated (200 steps): with SAME_STEP autoreset the
    # buffer must hold the value of the final observation at the cut
    model = PPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2), n_steps=200, batch_size=100, n_epochs=1, seed=0)
    model.learn(400)
    buf = model.rollout_buffer
    assert buf.truncated[-1].all() and buf.final_values_given
    with torch.no_grad():
        assert torch.all(buf.final_values[-1] != 0)


def test_save_load_round_trip_and_continue(tmp_path):
    model = PPO("MlpPolicy", "CartPole-v1", n_envs=2, n_steps=32, batch_size=32, n_epochs=2, seed=3)
    model.learn(256)
    path = tmp_path / "ppo_cartpole"
    model.save(path)
    assert (tmp_path / "ppo_cartpole.zip").is_file()
    loaded = PPO.load(path, env="CartPole-v1", device="cpu")
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b)
    opt_a, opt_b = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])
        assert torch.equal(opt_a["state"][k]["step"], opt_b["state"][k]["step"])
    assert loaded.num_timesteps == model.num_timesteps == 256
    assert loaded._n_updates == model._n_updates
    assert loaded.n_steps == 32 and loaded.batch_size == 32 and loaded.gamma == model.gamma
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 384
    assert loaded._n_updates == model._n_updates + 2 * 2


def test_failed_save_leaves_no_file(tmp_path):
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16)
    model.unpicklable = (x for x in range(3))  # a generator cannot be pickled
    with pytest.raises(TypeError):
        model.save(tmp_path / "broken.zip")
    assert os.listdir(tmp_path) == []


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        PPO.load(tmp_path / "missing.zip")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="corrupt.zip"):
        PPO.load(corrupt)
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("data", "{}")
        zf.writestr("policy.pth", b"")
    with pytest.raises(ValueError, match="foreign.zip.*Stable-Baselines3"):
        PPO.load(foreign)
    model = A2C("MlpPolicy", "CartPole-v1")
    model.save(tmp_path / "a2c.zip")
    with pytest.raises(ValueError, match="a2c.zip holds a A2C model"):
        PPO.load(tmp_path / "a2c.zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes((tmp_path / "a2c.zip").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.zip"):
        A2C.load(truncated)


def test_set_env_checks_spaces():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16)
    with pytest.raises(ValueError, match="observation space mismatch"):
        model.set_env(gym.make("Acrobot-v1"))
    env = SpaceEnv(gym.make("CartPole-v1").observation_space, spaces.Discrete(3))
    with pytest.raises(ValueError, match="action space mismatch"):
        model.set_env(env)
    model.set_env(gym.make_vec("CartPole-v1", num_envs=3, vectorization_mode="vector_entry_point"))
    assert model.get_env().num_envs == 3 and model.n_envs == 3
    model.learn(96)
    assert model.rollout_buffer.n_envs == 3


def test_get_set_parameters_round_trip():
    a = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, seed=0)
    b = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, seed=1)
    obs = np.zeros((4, 4), np.float32)
    assert not torch.equal(a.policy.value_net.weight, b.policy.value_net.weight)
    b.set_parameters(a.get_parameters())
    np.testing.assert_array_equal(a.predict(obs, deterministic=True)[0], b.predict(obs, deterministic=True)[0])
    assert torch.equal(a.policy.value_net.weight, b.policy.value_net.weight)


def test_same_seed_same_training_curve():
    def curve(seed):
        model = PPO("MlpPolicy", "CartPole-v1", n_envs=4, n_steps=32, batch_size=64, n_epochs=2, seed=seed)
        model.learn(1024)
        return [ep["r"] for ep in model.ep_info_buffer], model.policy.value_net.weight.detach().clone()

    r1, w1 = curve(7)
    r2, w2 = curve(7)
    r3, _ = curve(8)
    assert r1 == r2 and torch.equal(w1, w2)
    assert r1 != r3


def test_tensorboard_has_sb3_tags_and_run_dirs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, tensorboard_log=str(tmp_path))
    model.learn(128, tb_log_name="cart")
    model.learn(64, tb_log_name="cart", reset_num_timesteps=False)
    model.learn(64, tb_log_name="cart")
    assert sorted(os.listdir(tmp_path)) == ["cart_1", "cart_2"]
    acc = EventAccumulator(str(tmp_path / "cart_1"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "rollout/ep_rew_mean", "rollout/ep_len_mean", "time/fps", "train/approx_kl", "train/clip_fraction",
        "train/entropy_loss", "train/explained_variance", "train/learning_rate", "train/loss",
        "train/policy_gradient_loss", "train/value_loss", "train/clip_range",
    }
    assert expected <= tags, expected - tags
    steps = [e.step for e in acc.Scalars("time/fps")]
    assert steps[-1] == 192  # the continued run wrote into the same directory


def test_verbose_prints_sb3_table(capsys):
    PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, verbose=1).learn(128)
    out = capsys.readouterr().out
    assert "| rollout/" in out and "|    ep_rew_mean" in out and "| time/" in out and "total_timesteps" in out


def test_callbacks_hooks_checkpoint_and_stop(tmp_path):
    calls = []

    class Recorder(BaseCallback):
        def _on_training_start(self):
            calls.append("start")

        def _on_rollout_start(self):
            calls.append("rollout_start")

        def _on_step(self):
            return self.num_timesteps < 96

        def _on_rollout_end(self):
            calls.append("rollout_end")

        def _on_training_end(self):
            calls.append("end")

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1)
    model.learn(1000, callback=[Recorder(), CheckpointCallback(save_freq=32, save_path=str(tmp_path), name_prefix="ck")])
    assert model.num_timesteps == 96
    assert calls[0] == "start" and calls[-1] == "end" and calls.count("rollout_start") == 3
    assert sorted(os.listdir(tmp_path)) == ["ck_32_steps.zip", "ck_64_steps.zip", "ck_96_steps.zip"]
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1.0)
    eval_cb = EvalCallback(gym.make("CartPole-v1"), callback_on_new_best=stop, eval_freq=16, n_eval_episodes=2, verbose=0)
    model.learn(1000, callback=eval_cb)
    assert model.num_timesteps == 16 and eval_cb.best_mean_reward > 0


def test_progress_bar_runs(capsys):
    PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1).learn(64, progress_bar=True)
    # a last rollout past total_timesteps (whole rollouts of 32) grows the bar's total, which it keeps
    PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1).learn(40, progress_bar=True)
    err = capsys.readouterr().err
    # a bar without a total would print "64steps"; a rate such as "5898.64steps/s" must not count
    assert "64/64" in err and re.search(r"(?<![\d.])64steps", err) is None


def test_kl_penalty_objective_adapts_beta():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=4, loss_type="kl_penalty",
                kl_beta=1.0, kl_target=1e-6, seed=0)
    model.learn(128)
    assert model.kl_beta == 4.0  # KL far above target: doubled after each of the 2 updates


def test_target_kl_stops_epochs_early():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=16, n_epochs=10, target_kl=1e-9,
                learning_rate=1e-2, seed=0)
    model.learn(64)
    assert model._n_updates < 10


def test_stats_window_size_sizes_the_episode_buffers():
    from agents import PPO

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, stats_window_size=5)
    assert model.ep_info_buffer.maxlen == 5 and model.ep_success_buffer.maxlen == 5
