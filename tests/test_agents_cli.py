"""`rlhf-env train` and `rlhf-env plot` end to end, and the shipped hyperparameter files."""

import re

import pytest

from agents import ALGOS
from agents.hyperparams import load_hyperparams
from rlhf_env.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("algo", ["ppo", "a2c", "reinforce"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1", "LunarLander-v3"])
def test_shipped_hyperparameters_build_a_model(algo, env_id):
    params = load_hyperparams(algo, env_id)
    params.pop("n_timesteps")
    n_envs = min(params.pop("n_envs"), 2)
    model = ALGOS[algo](params.pop("policy"), env_id, n_envs=n_envs, **params)
    assert model.n_envs == n_envs


def test_train_save_resume_and_plot(tmp_path, capsys):
    tb, model = tmp_path / "tb", tmp_path / "m.zip"
    args = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "512", "--n-envs", "4",
            "--tensorboard-log", str(tb), "--save", str(model), "--verbose", "0", "--eval-episodes", "2"]
    assert main(args) == 0
    assert model.is_file() and (tb / "PPO_1").is_dir()
    assert main(["train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "256", "--n-envs", "4",
                 "--resume", str(model), "-tb", str(tb), "--verbose", "0", "--eval-episodes", "0"]) == 0  # rl-zoo3's -tb
    out = capsys.readouterr().out
    assert "evaluation over 2 deterministic episodes" in out and "resuming" in out
    # the steps of this run, not the resumed counter (512 rounded up to 4 envs x PPO's n_steps)
    first, resumed = re.findall(r"trained ppo on CartPole-v1: (\d+) steps in [\d.]+ s(?: \((\d+) in all\))?", out)
    assert int(resumed[1]) == int(first[0]) + int(resumed[0]) and first[1] == ""
    assert sorted(p.name for p in tb.iterdir()) == ["PPO_1"]  # resumed into the same run
    assert main(["plot", str(tb), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--algo", "ppo", "--env", "NoSuchEnv-v0", "--timesteps", "10"]) == 1
    err = capsys.readouterr().err
    assert "NoSuchEnv-v0" in err and "Traceback" not in err
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "c.png")]) == 1
    assert "nothing" in capsys.readouterr().err


def test_plot_groups_mixed_runs_by_env(tmp_path, capsys):
    """CartPole and text runs in one log dir: one figure each, the text one with the RLHF
    panels; --runs selects, --smooth smooths."""
    from rlhf_env.cli.plot import read_runs, smooth

    tb = tmp_path / "tb"
    common = ["--tensorboard-log", str(tb), "--verbose", "0", "--eval-episodes", "0"]
    assert main(["train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "512", "--n-envs", "4", *common]) == 0
    assert main(["train", "--algo", "ppo", "--env", "TextRLHF-tiny-v0", "--timesteps", "64", "--n-envs", "4", *common]) == 0
    capsys.readouterr()
    assert {r.name: r.group for r in read_runs(str(tb))} == {"PPO_1": "CartPole-v1", "PPO_2": "TextRLHF-tiny-v0"}
    assert main(["plot", str(tb), "--out", str(tmp_path / "curve.png"), "--smooth", "0.6"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "curve-CartPole-v1.png").stat().st_size > 1000
    assert (tmp_path / "curve-TextRLHF-tiny-v0.png").stat().st_size > 1000
    assert not (tmp_path / "curve.png").exists()
    assert "rollout/score_mean, rollout/kl_mean, train/kl_coef" in out and "rollout/ep_rew_mean" in out
    assert main(["plot", str(tb), "--runs", "PPO_1", "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").is_file()  # one group: the name as given
    assert smooth([0.0, 1.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3, 6 / 7])


def test_plot_gives_a_run_one_colour_in_every_panel(tmp_path, monkeypatch):
    """A run missing from a panel (GRPO logs no train/kl_coef) does not shift the others'
    colours: each run is drawn in the same colour in every panel."""
    import matplotlib.pyplot as plt

    from rlhf_env.cli.plot import Run, draw

    runs = [Run("GRPO_1", {"rollout/score_mean": ([1, 2], [0.0, 1.0]), "rollout/kl_mean": ([1, 2], [0.0, 0.5])}),
            Run("PPO_2", {"rollout/score_mean": ([1, 2], [0.0, 2.0]), "rollout/kl_mean": ([1, 2], [0.0, 1.0]),
                          "train/kl_coef": ([1, 2], [0.2, 0.2])})]
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    draw(runs, ["rollout/score_mean", "rollout/kl_mean", "train/kl_coef"], str(tmp_path / "c.png"), "t", 0.0)
    colours: dict[str, set] = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"GRPO_1", "PPO_2"} and all(len(c) == 1 for c in colours.values())
    assert colours["GRPO_1"] != colours["PPO_2"]


def test_save_only_model_applies_to_save_and_checkpoints(tmp_path):
    """--save-only-model: the final zip and the checkpoints leave the optimizer out, and
    --resume of one continues (with a fresh optimizer)."""
    import json
    import zipfile

    argv = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "512", "--n-envs", "4", "--verbose", "0",
            "--eval-episodes", "0", "--save-only-model", "--save", str(tmp_path / "m.zip"),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-freq", "64"]
    assert main(argv) == 0
    zips = [tmp_path / "m.zip", *sorted((tmp_path / "ckpt").glob("*.zip"))]
    assert len(zips) >= 3
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            assert "policy.optimizer.pth" not in archive.namelist(), path
            assert json.loads(archive.read("header.json"))["optimizer_state"] is False
    assert main(["train", "--algo", "ppo", "--env", "CartPole-v1", "--timesteps", "256", "--n-envs", "4", "--verbose", "0",
                 "--eval-episodes", "0", "--resume", str(zips[-1])]) == 0
