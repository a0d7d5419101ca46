"""Reinforcement learning from verifiable rewards on a task, and its demo.

:func:`train_task` trains a language model on a task's train split with a group method
(``agents.GRPO`` or ``agents.RLOO``) on ``ReasoningGym-v0``, within a CPU-time budget,
one iteration (a group of ``group_size`` completions for each of ``prompts_per_step``
rows, then one update) at a time. :func:`run_task_demo` (``rlhf-env demo --task NAME``)
wraps it: held-out accuracy before, training, held-out accuracy after, and writes
``DIR/summary.json``, ``DIR/policy`` (a Hugging Face model directory) and ``DIR/curve.png``.

The defaults (:class:`TaskTrainConfig`): RLOO, which raised held-out sampled accuracy on the
default task a little more than GRPO per CPU second at the same settings, learning rate 1e-4,
the top 4 blocks of SmolLM2, no KL term, and 8 rows x 4 completions a step (the same 32
completions and cost as 4 x 8, spread over twice as many problems), with completions that the
length limit cut left out of the loss (``mask_truncated_completions``: the score of a cut
completion is whatever number the cut left, and reinforcing it taught seed 0 to repeat the
sum until the limit), rollouts sampled at temperature 0.7 (TRL's ``temperature``: at 1 the
untrained model rambles, half its completions are cut and so give no gradient, and groups
with no correct answer give none either; at 0.7 fewer are cut and more groups hold a correct
answer), and 400 CPU seconds of training (the whole demo then takes about 550 CPU seconds,
inside the 10 minutes it is meant to take). Evaluation samples at temperature 1 whatever the
training temperature. docs/benchmarks.md ("Verifiable tasks", "the chain_sum demo across
seeds", "cut completions out of the loss", "sampling temperature and budget") has the runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from rlhf_env.agents.atomic import atomic_file, write_text


@dataclass
class TaskTrainConfig:
    """Settings of :func:`train_task` and the task demo.

    :param task: task name (curated or any reasoning-gym name).
    :param task_config: generator settings overriding the task's.
    :param answer_format: ``None`` (the task's), ``"last_number"`` or ``"answer_tag"``.
    :param model: starting model (a shipped name or a model directory).
    :param algo: ``"rloo"`` (default) or ``"grpo"``.
    :param algo_kwargs: further arguments of the agent (GRPO's ``loss_type``,
        ``scale_rewards``, ``epsilon_high``, ``importance_sampling_level``, ...).
    :param group_size: completions per row (``G``).
    :param prompts_per_step: rows per iteration.
    :param learning_rate: Adam learning rate.
    :param beta: KL-to-reference coefficient (GRPO: loss term; RLOO: in the reward).
    :param mask_truncated_completions: leave completions the length limit cut (no EOS) out
        of the loss (TRL's option, DAPO's overlong filtering; see :class:`agents.GRPO`).
    :param train_layers: train only the last ``k`` transformer blocks (None: all weights).
    :param max_new_tokens: completion length (None: the task's).
    :param temperature: sampling temperature of the training rollouts (the env's
        ``temperature=``; the policy's log-probs are those of ``softmax(logits / temperature)``,
        TRL's ``GRPOConfig.temperature``). Evaluation always samples at temperature 1.
    :param format_weight: weight of the format reward (0: correctness only).
    :param train_seconds: training stops at the first iteration past this much CPU time of
        this process (CPU seconds, so a shared machine does not shorten the training).
    :param max_iterations: hard cap on iterations.
    :param eval_samples: samples per held-out row for the sampled accuracy (``k``).
    :param eval_limit: held-out rows scored (None: all of the task's held-out split).
    :param n_show: held-out rows printed before and after.
    :param seed: seed of the agent (rows drawn, sampling) and of the evaluation.
    :param device: torch device.
    :param threads: torch CPU threads (None: torch's choice).
    """

    task: str = "chain_sum"
    task_config: dict | None = None
    answer_format: str | None = None
    model: str = "smollm2-135m"
    algo: str = "rloo"
    algo_kwargs: dict = field(default_factory=dict)
    group_size: int = 4
    prompts_per_step: int = 8
    learning_rate: float = 1e-4
    beta: float = 0.0
    mask_truncated_completions: bool = True
    train_layers: int | None = 4
    max_new_tokens: int | None = None
    temperature: float = 0.7
    format_weight: float = 0.0
    train_seconds: float = 400.0
    max_iterations: int = 1000
    eval_samples: int = 4
    eval_limit: int | None = None
    n_show: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None


def quick_task_config() -> TaskTrainConfig:
    """Settings for the tiny model: seconds, for tests and ``--quick``."""
    return TaskTrainConfig(model="tiny", group_size=4, prompts_per_step=4, learning_rate=1e-3, train_layers=None,
                           train_seconds=20.0, max_iterations=8, eval_samples=2, eval_limit=16, threads=1)


def make_task_agent(cfg: TaskTrainConfig, task: Any = None, tensorboard_log: str | None = None):
    """The env (``ReasoningGym-v0``) and the agent of ``cfg``: ``(agent, task)``."""
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)
    from rlhf_env.agents import ALGOS
    from rlhf_env.tasks import make_task

    if cfg.algo not in ("grpo", "rloo"):
        raise ValueError(f"algo must be 'grpo' or 'rloo' for a verifiable task, got {cfg.algo!r}")
    task = task if task is not None else make_task(cfg.task, cfg.task_config, answer_format=cfg.answer_format,
                                                   format_weight=cfg.format_weight)
    env = gym.make_vec("ReasoningGym-v0", num_envs=cfg.group_size * cfg.prompts_per_step, task=task, model=cfg.model,
                       max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, temperature=cfg.temperature,
                       device=cfg.device)
    policy_kwargs = {} if cfg.train_layers is None else {"train_layers": cfg.train_layers}
    agent = ALGOS[cfg.algo]("LMPolicy", env, group_size=cfg.group_size, learning_rate=cfg.learning_rate, beta=cfg.beta,
                            mask_truncated_completions=cfg.mask_truncated_completions, seed=cfg.seed, device=cfg.device,
                            policy_kwargs=policy_kwargs, tensorboard_log=tensorboard_log, **cfg.algo_kwargs)
    return agent, task


def train_task(agent: Any, cfg: TaskTrainConfig, on_iteration: Callable[[dict], None] | None = None,
               tb_log_name: str = "task") -> list[dict[str, float]]:
    """Train ``agent`` one iteration (one group rollout, one update) at a time until
    ``cfg.train_seconds`` of process CPU time or ``cfg.max_iterations``; returns one record
    per iteration (``iteration``, ``reward`` = mean training reward of the rollout,
    ``cpu_seconds``, ``seconds``)."""
    history: list[dict[str, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for it in range(1, cfg.max_iterations + 1):
        # total_timesteps=1: learn stops after its first rollout and update (a group rollout
        # ends when every response has, before n_steps steps, so n_envs * n_steps timesteps
        # would take a second rollout and update in the same call)
        agent.learn(1, reset_num_timesteps=it == 1, tb_log_name=tb_log_name)
        episodes = list(agent.ep_info_buffer)[-agent.n_envs:]
        record = {
            "iteration": it,
            "reward": float(np.mean([e["r"] for e in episodes])) if episodes else float("nan"),
            "cpu_seconds": round(time.process_time() - c0, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(record)
        if on_iteration is not None:
            on_iteration(record)
        if record["cpu_seconds"] >= cfg.train_seconds:
            break
    return history


def _accuracy(agent_or_model: Any, task: Any, cfg: TaskTrainConfig, progress: bool) -> dict[str, Any]:
    from rlhf_env.tasks import evaluate_task

    return evaluate_task(agent_or_model, task, limit=cfg.eval_limit, num_samples=cfg.eval_samples,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1, progress=progress, n_show=cfg.n_show)


def _show(report: dict, log: Callable[[str], None]) -> None:
    for s in report["samples"]:
        log(f"  Q: {s['question']}  (gold {s['answer']})")
        log(f"     greedy: {s['greedy']!r}")
        log(f"     sample: {s['sampled'][0]!r}")


def save_policy(agent: Any, directory: pathlib.Path) -> pathlib.Path:
    """The trained actor as a Hugging Face model directory (LoRA merged), atomically."""
    if hasattr(agent, "save_pretrained"):
        agent.save_pretrained(directory)
        return pathlib.Path(directory)
    from rlhf_env.demo import save_policy as save_actor

    core = agent.policy.core
    return save_actor(core.actor, core.tokenizer, directory)


def plot_curve(history: list[dict], before: dict, after: dict, path: pathlib.Path, title: str) -> None:
    """Training reward per iteration, with held-out accuracy before and after, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    cpu = [h["cpu_seconds"] for h in history]
    ax.plot(cpu, [h["reward"] for h in history], marker=".", label="training reward (rollout mean)")
    end = cpu[-1] if cpu else 1.0
    for key, style in (("greedy", "tab:green"), ("sampled", "tab:orange")):
        ax.plot([0, end], [before[key]["accuracy"], after[key]["accuracy"]], marker="o", color=style, linestyle="--",
                label=f"held-out {key} accuracy")
    ax.set_xlabel("training CPU seconds")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def run_task_demo(out: str | os.PathLike = "task_demo", config: TaskTrainConfig | None = None,
                  log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """The verifiable-reward demo (see the module docstring); returns the summary it writes.

    ``summary.json`` holds ``accuracy_before`` and ``accuracy_after`` (each ``greedy``,
    ``sampled`` mean@k and ``pass@k``), ``gain``, ``seconds`` (wall, whole demo),
    ``cpu_seconds`` (CPU time of the whole demo's process: its wall time on an idle machine
    with one thread), ``train_cpu_seconds``, ``iterations``, the settings and before/after
    samples.
    """
    cfg = config or TaskTrainConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agent, task = make_task_agent(cfg, tensorboard_log=str(out / "tb"))
    log(f"[demo] {task!r}; {cfg.algo} {cfg.algo_kwargs or ''} on {cfg.model}, {cfg.prompts_per_step} rows x "
        f"{cfg.group_size} completions per iteration, lr {cfg.learning_rate}, train_layers {cfg.train_layers}")
    before = _accuracy(agent, task, cfg, progress)
    from rlhf_env.tasks import accuracy_line

    log(f"[demo] before: {accuracy_line(before)}")
    _show(before, log)
    log(f"[demo] training for {cfg.train_seconds:.0f} CPU seconds (at most {cfg.max_iterations} iterations)")

    def report(rec: dict) -> None:
        log(f"[demo] iteration {rec['iteration']:3d}  reward {rec['reward']:.3f}  cpu {rec['cpu_seconds']:.0f}s")

    history = train_task(agent, cfg, on_iteration=report)
    after = _accuracy(agent, task, cfg, progress)
    log(f"[demo] after:  {accuracy_line(after)}")
    _show(after, log)
    save_policy(agent, out / "policy")
    plot_curve(history, before, after, out / "curve.png", f"{cfg.algo} on {task.name} ({cfg.model})")

    def acc(r: dict) -> dict[str, float]:
        k = r["sampled"]["k"]
        return {"greedy": r["greedy"]["accuracy"], "sampled": r["sampled"]["accuracy"], f"pass@{k}": r["sampled"][f"pass@{k}"]}

    summary = {
        "task": task.name,
        "task_config": task.config,
        "answer_format": task.answer_format,
        "model": cfg.model,
        "accuracy_before": acc(before),
        "accuracy_after": acc(after),
        "gain": {k: round(acc(after)[k] - acc(before)[k], 4) for k in acc(before)},
        "held_out_rows": after["n"],
        "iterations": len(history),
        "train_cpu_seconds": history[-1]["cpu_seconds"] if history else 0.0,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "config": asdict(cfg),
        "history": history,
        "samples_before": before["samples"],
        "samples_after": after["samples"],
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    g = summary["gain"]
    log(f"[demo] gain: greedy {g['greedy']:+.3f}, sampled {g['sampled']:+.3f} in {summary['seconds']:.0f}s "
        f"({summary['cpu_seconds']:.0f} CPU s); wrote "
        f"{out / 'summary.json'}, {out / 'policy'}, {out / 'curve.png'}")
    return summary
