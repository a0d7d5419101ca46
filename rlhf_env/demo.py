"""The end-to-end demo: RLHF of SmolLM2-135M-Instruct with RLOO (or PPO / GRPO), offline, on a CPU.

``rlhf-env demo --out DIR`` (or :func:`run_demo`) does, in order:

1. builds ``TextRLHF-v0`` (batched, ``num_envs`` prompts at a time) with the package's
   default reward model (``RewardModel.default()``), falling back to the VADER sentiment
   reward when the default reward model cannot be built, and says which it uses;
2. samples responses to the held-out prompts (``load_prompts(split="test")``, two per
   prompt) and judges them (:func:`rlhf_env.evaluate.evaluate`): the reward model's score
   and the independent judges (tone, relevance, fluency, distinct-n, repeated 3-grams);
3. trains ``agents.RLOO`` with the language-model policy (``method="rloo"``, the default:
   groups of responses per prompt, each scored against the mean of the others, no critic, the
   KL to the reference in the reward), or ``agents.PPO`` with the per-token KL penalty and the
   adaptive KL controller (``method="ppo"``, the seed's four-model flow), or ``agents.GRPO``
   (``method="grpo"``, the KL in the loss), within a time budget, logging to TensorBoard
   (``DIR/tb``);
4. samples the held-out prompts again with the same seed and prints the judges table,
   starting model against trained policy, with the KL per response and side-by-side
   samples;
5. writes ``DIR/policy`` (a Hugging Face model directory: LoRA adapters, if any, merged),
   ``DIR/curve.png`` (score and KL per iteration), ``DIR/evaluation.json`` (the full
   report) and ``DIR/summary.json``.

``passed`` is the pass rule of :class:`rlhf_env.evaluate.Targets` on the independent
judges (tone up, relevance and diversity kept, no phrase taking over, KL within
``kl_budget``) and a rise of the reward model's score: the reward model alone, which the
policy was trained to please, does not decide.

``--quick`` runs the same path on the tiny model in well under a minute.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from rlhf_env.agents.atomic import atomic_file, write_text


@dataclass
class DemoConfig:
    """Settings of the demo (defaults: the full SmolLM2 run; :func:`quick_config` the tiny one).

    KL discipline (Ziegler et al., 2019; TRL's sentiment example targets 6 nats): the env
    charges ``kl_coef`` per nat of KL to the reference, the adaptive controller moves
    ``kl_coef`` towards ``target_kl`` per response (by at most ``1 +- 0.2 * 400 /
    kl_horizon`` an iteration of 400 tokens), and training stops once a rollout's KL reaches
    ``kl_stop``, because the final policy is one update past its last rollout. The pass
    rule holds the held-out KL to ``kl_budget``. A run is 10-15 iterations, too short for
    the controller to settle: the starting coefficient is set high enough that the penalty
    matters from the first iteration (with normalised scores, 6 nats cost about one score
    standard deviation). Measurements: ``docs/benchmarks.md``.

    :param method: ``"rloo"`` (the default) or ``"grpo"`` (``group_size`` responses per
        prompt, ``num_envs / group_size`` prompts an iteration, the KL to the reference
        weighted by ``beta``), or ``"ppo"`` (the seed's four-model flow: policy, value head,
        frozen reference charging the per-token KL penalty, reward model; ``n_steps``,
        ``n_epochs``, ``batch_size``, ``gae_lambda``, ``kl_coef``, ``target_kl``,
        ``kl_horizon`` and ``score_norm`` are PPO's). The judges and the pass rule are the
        same for every method. RLOO: on the default reward model ``default-v6``, three seeds
        judged on all 60 held-out prompts, tone +0.09 to +0.13 at 0.6-0.7 nats, relevance up,
        no phrase over 10%, the answers the starting model's with the garble taken out;
        PPO's policies drifted 3-4 nats and left tone where it was (docs/benchmarks.md).
    :param model: the policy's starting model (a shipped name or a directory).
    :param reward: ``"default"`` (the trained default reward model, VADER if it cannot be
        built), ``"sentiment"``, ``"tiny"``, a reward-model directory.
    :param num_envs: prompts generated at once (the batched env's width).
    :param n_steps: env steps per PPO rollout (per env).
    :param max_new_tokens: response length limit.
    :param temperature: sampling temperature (the policy's distribution).
    :param learning_rate: Adam learning rate (None: the method's, :data:`DEMO_LEARNING_RATES`).
    :param n_epochs: PPO epochs per rollout.
    :param batch_size: tokens per PPO minibatch.
    :param gae_lambda: GAE's lambda (``gamma`` is 1: the score comes at the end).
    :param train_layers: train the last ``k`` transformer blocks (None: all weights).
    :param lora: LoRA arguments instead of ``train_layers`` (e.g. ``{"r": 8}``).
    :param group_size: GRPO / RLOO: responses per prompt (``num_envs`` must be a multiple).
    :param beta: GRPO / RLOO: weight of the KL to the reference (GRPO's k3 loss term, RLOO's
        per-response reward penalty).
    :param method_kwargs: further keyword arguments of the agent (e.g. ``{"n_epochs": 2}``).
    :param kl_coef: initial KL coefficient of the env's reward.
    :param target_kl: target KL per response of the adaptive controller.
    :param kl_horizon: horizon of the controller, in tokens.
    :param kl_budget: the KL per response (held-out) the pass rule allows (``Targets.max_kl``).
    :param kl_stop: training stops after the first iteration whose rollout KL per response
        (the controller's measurement) reaches this (None: no such stop). The final policy
        is one update past that rollout, so its held-out KL lands about one iteration's
        growth above it (3.5-5.2 nats measured): ``kl_stop`` sits below ``kl_budget`` by
        twice that.
    :param score_norm: normalise scores (running mean and std).
    :param train_seconds: training stops at the first iteration boundary past this.
    :param total_seconds: the whole demo's budget: training also stops early enough that
        the final evaluation and the saving fit in it (first runs build the cached model
        and the default reward model, which eats into the training time). 500 s: a fresh
        machine's ``make demo`` is the install (65-100 s) plus about this, within 10 minutes
        (measured: 560 s gave 10 min 28 s; 500 s gave 8 min 35 s and 9 min 29 s, docs/benchmarks.md).
    :param max_iterations: hard cap on training iterations (rollout + update). 60 is about what
        RLOO reaches on a busy 2-core CPU within ``train_seconds`` (51-56 in the runs the docs
        report on three seeds): a faster machine (a GPU) trains those updates and stops sooner
        instead of walking the policy further from the starting model (at 80-82 iterations the
        demo's RLOO gained tone +0.003 / +0.050 and lost distinct-2 0.017 / 0.010 more, fluent-only
        0.013 / 0.007, at 1.1 nats instead of 0.6-0.7; docs/benchmarks.md).
    :param eval_prompts: held-out prompts judged before and after (None: all 60; N: the first
        N). All 60: the untrained model's tone varies over sampling seeds by a standard
        deviation of 0.033 on 60 prompts x 2 against 0.057 on the first 32, which is what
        decides a +0.15 target; the extra ~30 s per evaluation come out of the training time,
        not the total budget (``docs/benchmarks.md``).
    :param eval_samples: responses sampled per held-out prompt.
    :param n_show: samples printed before and after.
    :param seed: seed of everything.
    :param device: torch device.
    :param threads: torch CPU threads (None: torch's default, one per core).
    """

    method: str = "rloo"
    model: str = "smollm2-135m"
    reward: str = "default"
    num_envs: int = 16
    n_steps: int = 25
    max_new_tokens: int = 24
    temperature: float = 1.0
    learning_rate: float | None = None
    n_epochs: int = 4
    batch_size: int = 96
    gae_lambda: float = 0.95
    train_layers: int | None = 4
    lora: dict | None = None
    group_size: int = 8
    beta: float = 0.04
    method_kwargs: dict | None = None
    kl_coef: float = 0.2
    target_kl: float | None = 6.0
    kl_horizon: int = 800
    kl_budget: float = 8.0
    kl_stop: float | None = 6.0
    score_norm: bool = True
    train_seconds: float = 420.0
    total_seconds: float = 500.0
    max_iterations: int = 60
    eval_prompts: int | None = None
    eval_samples: int = 2
    n_show: int = 4
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    prompts: list[str] | None = field(default=None, repr=False)


def quick_config() -> DemoConfig:
    """The ``--quick`` settings: the tiny model and its reward, about half a minute."""
    return DemoConfig(
        model="tiny",
        reward="tiny",
        num_envs=16,
        n_steps=17,
        max_new_tokens=16,
        learning_rate=1e-3,
        n_epochs=4,
        batch_size=128,
        train_layers=None,
        kl_coef=0.02,
        target_kl=12.0,
        kl_horizon=2000,
        kl_budget=30.0,
        kl_stop=None,
        score_norm=True,
        train_seconds=40.0,
        total_seconds=55.0,
        max_iterations=10,
        eval_prompts=48,
        threads=1,  # a model this small runs faster on one thread (no spin-waits between tiny ops)
    )


# ---------------------------------------------------------------------------------------
# outputs


def _write_json(path: pathlib.Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


def plot_curve(history: list[dict[str, float]], path: pathlib.Path, title: str) -> None:
    """Score and KL per iteration, two panels, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(it, [h["score"] for h in history], marker="o")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("mean score of the rollout")
    ax1.grid(alpha=0.3)
    ax2.plot(it, [h["kl"] for h in history], marker="o", color="tab:red", label="KL per response")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("KL to the reference (nats)")
    ax2.grid(alpha=0.3)
    ax2b = ax2.twinx()
    ax2b.plot(it, [h["kl_coef"] for h in history], color="tab:gray", linestyle="--", label="kl_coef")
    ax2b.set_ylabel("kl_coef", color="tab:gray")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------
# the agent

DEMO_METHODS = ("ppo", "grpo", "rloo")
# the demo's learning rate of each method when DemoConfig.learning_rate is None: PPO's measured
# demo rate; GRPO's and RLOO's are their grpo.yml / rloo.yml TextRLHF-v0 rates (RLOO at 1e-4 on
# the demo lost 0.055 of distinct-2 and gained less tone than at 5e-5: docs/benchmarks.md)
DEMO_LEARNING_RATES = {"ppo": 1e-4, "grpo": 1e-4, "rloo": 5e-5}


def make_demo_agent(cfg: DemoConfig, env: Any, tensorboard_log: str | os.PathLike | None = None) -> Any:
    """The agent of ``cfg.method`` on the batched text env ``env``, with the demo's settings.

    :raises ValueError: for an unknown method, or ``num_envs`` not a multiple of ``group_size``
    """
    from rlhf_env.agents import GRPO, PPO, RLOO
    from rlhf_env.agents.text_ppo import RLHFConfig

    method = check_demo_method(cfg.method)
    policy_kwargs: dict[str, Any] = {}
    if cfg.lora is not None:
        policy_kwargs["lora"] = dict(cfg.lora)
    elif cfg.train_layers is not None:
        policy_kwargs["train_layers"] = cfg.train_layers
    lr = DEMO_LEARNING_RATES[method] if cfg.learning_rate is None else cfg.learning_rate
    kw: dict[str, Any] = dict(learning_rate=lr, seed=cfg.seed, device=cfg.device,
                              policy_kwargs=policy_kwargs, sample_every=2,
                              tensorboard_log=None if tensorboard_log is None else str(tensorboard_log))
    if method == "ppo":
        kw.pop("sample_every")  # PPO's is RLHFConfig's
        kw.update(n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, gamma=1.0,
                  gae_lambda=cfg.gae_lambda, clip_range=0.2, vf_coef=0.5, ent_coef=0.0, max_grad_norm=1.0,
                  rlhf=RLHFConfig(kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, kl_horizon=cfg.kl_horizon,
                                  score_norm=cfg.score_norm, sample_every=2))
        return PPO("LMPolicy", env, **{**kw, **(cfg.method_kwargs or {})})
    kw.update(group_size=cfg.group_size, beta=cfg.beta)
    return (GRPO if method == "grpo" else RLOO)("LMPolicy", env, **{**kw, **(cfg.method_kwargs or {})})


def check_demo_method(method: str) -> str:
    """``method`` if it is one of :data:`DEMO_METHODS`, else a ``ValueError`` naming them."""
    if method not in DEMO_METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {', '.join(DEMO_METHODS)}")
    return method


def demo_iteration(agent: Any, cfg: DemoConfig, first: bool) -> dict[str, float] | None:
    """One rollout and one update of the demo's agent; the rollout's mean score, KL per
    response (PPO: the env's per-token KL summed; GRPO / RLOO: measured in the update against
    the reference, k3 summed), KL coefficient and response length (None if no response ended)."""
    if cfg.method == "ppo":
        agent.learn(cfg.num_envs * cfg.n_steps, tb_log_name="demo_ppo", reset_num_timesteps=first)
        stats = agent._last_rollout_stats
        if not stats.scores:
            return None
        return {"score": float(np.mean(stats.scores)), "kl": float(np.mean(stats.kls)),
                "kl_coef": float(agent._text_state.kl_controller.value), "response_len": float(np.mean(stats.lengths))}
    # one group rollout and one update per call (a group rollout ends before n_steps steps)
    agent.learn(1, tb_log_name=f"demo_{cfg.method}", reset_num_timesteps=first)
    segments = [s for s in agent._segments if len(s) > 0 and s.score is not None]
    if not segments:
        return None
    return {"score": float(np.mean([s.score for s in segments])),
            "kl": float(np.mean([agent._kl_of_response(s) for s in segments])),
            "kl_coef": float(agent.beta), "response_len": float(np.mean([len(s) for s in segments]))}


# ---------------------------------------------------------------------------------------


def _resolve_demo_reward(spec: str, device: str, log: Callable[[str], None]) -> tuple[Callable, str]:
    from rlhf_env.rewards import SentimentReward, resolve_reward

    if spec != "default":
        reward = resolve_reward(spec, device=device)
        return reward, str(spec)
    try:
        return resolve_reward("default", device=device), "default reward model (RewardModel.default())"
    except Exception as exc:  # the demo must run offline whatever happens to the reward model
        log(f"default reward model unavailable ({type(exc).__name__}: {exc}); using VADER sentiment instead")
        return SentimentReward(), "VADER sentiment (SentimentReward)"


def run_demo(
    out: str | os.PathLike = "demo_out",
    quick: bool = False,
    config: DemoConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return the summary it writes.

    :param out: output directory (created).
    :param quick: the tiny model (:func:`quick_config`) instead of SmolLM2.
    :param config: explicit settings (overrides ``quick``).
    :param log: where progress lines go.
    """
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)
    from rlhf_env.evaluate import Targets, check_targets, evaluate, format_table, write_report
    from rlhf_env.prompts import load_prompts

    t0 = time.time()
    cpu0 = time.process_time()
    cfg = config or (quick_config() if quick else DemoConfig())
    check_demo_method(cfg.method)
    if cfg.learning_rate is None:  # the method's (recorded in summary.json's config)
        cfg = replace(cfg, learning_rate=DEMO_LEARNING_RATES[cfg.method])
    if cfg.method != "ppo":  # before any model is loaded
        from rlhf_env.agents.group_rollout import check_group_multiple

        check_group_multiple(cfg.num_envs, cfg.group_size)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    from rlhf_env.envs.device import check_device

    check_device(cfg.device)  # else the default reward model's fallback to VADER would hide it
    reward, reward_name = _resolve_demo_reward(cfg.reward, cfg.device, log)
    log(f"[demo] model {cfg.model}, reward: {reward_name}")
    env = gym.make_vec(
        "TextRLHF-v0", num_envs=cfg.num_envs, model=cfg.model, reward_model=reward,
        prompts=cfg.prompts, max_new_tokens=cfg.max_new_tokens, kl_coef=cfg.kl_coef,
        temperature=cfg.temperature, device=cfg.device,
    )
    core = env.unwrapped.core
    test_prompts = load_prompts(split="test")
    if cfg.eval_prompts is not None:
        test_prompts = test_prompts[: cfg.eval_prompts]
    log(f"[demo] loaded in {time.time() - t0:.1f}s; scoring {len(test_prompts)} held-out prompts before training")

    t_eval = time.time()
    tok = core.tokenizer
    eval_args = dict(reward=reward, num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, seed=cfg.seed + 12345, n_show=cfg.n_show, progress=False)
    # before training the actor is the reference: its responses are the reference column
    before = evaluate((core.reference, tok), test_prompts, reference=(core.reference, tok), **eval_args)
    eval_seconds = time.time() - t_eval
    ref = before["reference"]
    log(f"[demo] before: reward-model score {ref['reward']:.3f} +- {ref['reward_std']:.3f}; tone {ref['tone']:.3f}, "
        f"relevance {ref['relevance']:.3f}, fluency NLL {ref['fluency_nll']:.2f}, distinct-2 {ref['distinct_2']:.3f}, "
        f"top 3-gram {ref['top_3gram']!r} in {ref['top_3gram_share']:.0%} of responses")
    for row in before["samples"]:
        log(f"  prompt: {row['prompt']}\n  response: {row['reference']!r}  (score {row['reference_score']:.3f})")

    model = make_demo_agent(cfg, env, out / "tb")
    history: list[dict[str, float]] = []
    t_train = time.time()
    # leave room for the final evaluation and the saving: the final evaluation also runs the reference over
    # the policy's responses for the KL, about 1.5x the first (SmolLM2, 60 prompts x 2, one thread: 52 s vs 35 s)
    budget = min(cfg.train_seconds, cfg.total_seconds - (t_train - t0) - 1.6 * eval_seconds - 10.0)
    per_iteration = (f"{cfg.num_envs} prompts" if cfg.method == "ppo"
                     else f"{cfg.num_envs // cfg.group_size} prompts x {cfg.group_size} responses")
    log(f"[demo] training {cfg.method.upper()} for up to {max(budget, 0):.0f}s / {cfg.max_iterations} iterations "
        f"({per_iteration} x {cfg.max_new_tokens} tokens per iteration)")
    if budget < cfg.train_seconds:  # a first run builds the reward model and the model cache inside the budget
        log(f"[demo] note: the {cfg.total_seconds:.0f}s total budget leaves {max(budget, 0):.0f}s of the {cfg.train_seconds:.0f}s "
            f"of training ({t_train - t0:.0f}s went to loading or building the models and judging the start); a second run "
            f"finds the cache ready, and --seconds {cfg.train_seconds:.0f} trains the full {cfg.train_seconds:.0f}s")
    stop_reason = "max_iterations"
    for iteration in range(1, cfg.max_iterations + 1):
        record = demo_iteration(model, cfg, first=iteration == 1)
        if record is not None:
            history.append({"iteration": iteration, **record, "seconds": time.time() - t_train,
                            "cpu_seconds": time.process_time() - cpu0})
            h = history[-1]
            log(f"[demo] iteration {iteration:3d}  score {h['score']:+.3f}  KL {h['kl']:6.2f}  kl_coef {h['kl_coef']:.4f}  "
                f"len {h['response_len']:.1f}  {h['seconds']:.0f}s")
        if time.time() - t_train > budget:
            stop_reason = "time budget"
            break
        if cfg.kl_stop is not None and history and history[-1]["iteration"] == iteration \
                and history[-1]["kl"] >= cfg.kl_stop:
            stop_reason = f"rollout KL {history[-1]['kl']:.2f} >= kl_stop {cfg.kl_stop:g}"
            break
    train_seconds = time.time() - t_train
    log(f"[demo] training stopped after {len(history)} iterations: {stop_reason}")
    if model.logger is not None:
        model.logger.close()

    after = evaluate((core.actor, tok), test_prompts, reference=(core.reference, tok), baseline=before, **eval_args)
    verdict = check_targets(after, Targets(max_kl=cfg.kl_budget))
    log("[demo] judges on the held-out prompts, starting model (reference) vs trained policy:\n" + format_table(after, verdict))
    for row in after["samples"]:
        log(f"  prompt: {row['prompt']}\n  before: {row['reference']!r}  (score {row['reference_score']:.3f})\n"
            f"  after:  {row['policy']!r}  (score {row['policy_score']:.3f})")

    model.save_pretrained(out / "policy")  # LoRA merged: a plain Hugging Face folder
    if history:
        plot_curve(history, out / "curve.png", f"{cfg.method.upper()} on TextRLHF-v0 ({cfg.model}, {reward_name})")
    pol = after["policy"]
    rise = (pol["reward"] - ref["reward"]) / ref["reward_std"] if ref["reward_std"] > 0 else math.inf
    write_report(after, out / "evaluation.json")
    summary = {
        "model": cfg.model,
        "reward": reward_name,
        "score_before": ref["reward"],
        "score_after": pol["reward"],
        "score_std_before": ref["reward_std"],
        "score_std_after": pol["reward_std"],
        "score_rise_in_std": rise,
        "win_rate": after["win_rate"],
        "kl": pol["kl"],
        "kl_before": 0.0,
        "kl_budget": cfg.kl_budget,
        "response_len_before": ref["length"],
        "response_len_after": pol["length"],
        "judges": {"before": after["reference"], "after": pol},  # (its fluent-only distinct-2 at the policy's count)
        "pass_rule": verdict,
        # the independent judges decide; the reward model's score must rise too
        "passed": bool(verdict["passed"] and pol["reward"] > ref["reward"]),
        "iterations": len(history),
        "stop_reason": stop_reason,
        "train_seconds": train_seconds,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "held_out_prompts": len(test_prompts),
        "samples": after["samples"],
        "history": history,
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"},
        "policy_dir": str(out / "policy"),
        "tensorboard_dir": str(out / "tb"),
    }
    summary["seconds"] = time.time() - t0
    _write_json(out / "summary.json", summary)
    env.close()
    missed = {name for name, c in verdict["checks"].items() if not c["ok"]}
    word = "PASS" if summary["passed"] else "FAIL (see the judges table)"
    if missed and missed <= {"tone_gain", "distinct_2_change"} and reward_name.startswith("default"):
        # the known limit of the default task, measured, not a broken run
        word += ("; on the default reward model even its own best-of-n misses these bounds together "
                 "(docs/alignment.md, 'What the reward model gives at little KL')")
    log(f"[demo] reward-model score {ref['reward']:.3f} -> {pol['reward']:.3f} ({rise:+.2f} std, win rate "
        f"{after['win_rate']:.2f}), KL {pol['kl']:.2f} (budget {cfg.kl_budget}), {summary['seconds']:.0f}s: {word}. "
        f"Wrote {out}/summary.json, evaluation.json, policy/, curve.png, tb/")
    return summary
