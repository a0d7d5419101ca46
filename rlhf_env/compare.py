"""PPO, GRPO, RLOO and DPO side by side on the default task: :func:`run_comparison`.

Every method starts from the same model and gets the same CPU budget of training
(``time.process_time`` of this process, so a loaded machine does not shorten it; the
evaluations are not counted). Each is built with the package's shipped settings:

* ``ppo``: :class:`agents.PPO` with the language-model policy, the seed's four-model flow
  (the policy, its value head, the frozen reference charging the per-token KL penalty, the
  reward model), the shipped ``ppo.yml`` entry of the env and :data:`agents.text_ppo.TEXT_PPO_DEFAULTS`
  for the rest (the adaptive KL controller's 6-nat target);
* ``grpo`` and ``rloo``: :class:`agents.GRPO` and :class:`agents.RLOO` with their shipped
  ``grpo.yml`` / ``rloo.yml`` entries (groups of responses per prompt, no critic; GRPO's KL in
  the loss, RLOO's in the reward);
* ``dpo``: :func:`rlhf_env.dpo.train_dpo` with :class:`rlhf_env.dpo.DPOConfig`'s defaults (or
  ``dpo_settings``) on the default task's training pairs (the pairs the default reward model
  was trained on), see :func:`dpo_pairs_for_budget` for how many.

The RL methods train on ``TextRLHF-v0`` (the default task's train prompts and reward model)
with the demo's response length. At ``checkpoints`` points of the budget (after 1/3, 2/3 and
all of it by default) the policy is judged by :func:`rlhf_env.evaluate.evaluate` on the same
held-out prompts with the same sampling seed, against the same reference column; the final
judgement gets the default task's pass rule (:func:`rlhf_env.evaluate.check_targets`).

Writes ``OUT/compare.json`` (every checkpoint's judges, the pass rule, the side-by-side
samples, the settings), ``OUT/compare.md`` (the tables and the samples) and
``OUT/frontier.png`` (reward-model score and tone against the KL per response, one curve
per method from the reference at the origin).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rlhf_env.agents.atomic import write_text
from rlhf_env.compare_report import format_samples, format_tables, merge_results, plot_frontier, write_outputs
from rlhf_env.demo import DemoConfig

__all__ = ["METHODS", "CompareConfig", "check_methods", "dpo_pairs_for_budget", "run_comparison", "format_tables",
           "format_samples", "plot_frontier", "write_outputs", "merge_results"]

METHODS = ("ppo", "grpo", "rloo", "dpo")
RL_METHODS = ("ppo", "grpo", "rloo")

# DPO computes the frozen trunk's output and the reference's log-probabilities of every
# sequence of its pairs before its first update, so it is given the pairs its budget can
# train on (see dpo_pairs_for_budget). CPU seconds per pair with SmolLM2-135M-Instruct and
# DPOConfig's defaults on one thread of this project's 2-core x86 machine, measured by
# benchmarks/alignment.py (791 pairs: first update after 117 CPU s, then 95 updates of one
# prompt's pairs each in 93 s, 58 updates an epoch; docs/benchmarks.md):
DPO_SECONDS_PER_PAIR = {"prepare": 0.15, "epoch": 0.075}


@dataclass
class CompareConfig:
    """Settings of :func:`run_comparison`.

    :param methods: which methods, in order (:data:`METHODS`)
    :param seconds: CPU seconds of training per method (``time.process_time``; evaluations
        not counted). An RL method stops at the first iteration boundary past it, DPO at the
        first update past it or when its epochs are done
    :param model: the starting model of every method (a shipped name or a directory); the
        tiny model (``"tiny"``) takes the ``TextRLHF-tiny-v0`` entries of the YAML files
    :param reward: the reward model (None: the env's default, the default reward model, or
        the tiny reward for the tiny model)
    :param seed: seed of every method (and, plus 12345, of the evaluation's sampling)
    :param eval_prompts: held-out prompts judged (the first N of the default task's test
        prompts; None: all 60). 32, not the demo's 60: the comparison judges every method at
        every checkpoint, and its published table was measured on 32
    :param eval_samples: responses per held-out prompt (the demo's)
    :param max_new_tokens: response length, in training and evaluation (the demo's)
    :param checkpoints: evaluations per method, evenly spaced over the budget (the last at its end)
    :param dpo_pairs: DPO's training pairs: ``"budget"`` (:func:`dpo_pairs_for_budget`),
        None (all of ``pairs_train.jsonl``) or a number
    :param dpo_settings: :class:`rlhf_env.dpo.DPOConfig` fields that replace its defaults for
        DPO (empty: its defaults, the learning rate included)
    :param n_show: side-by-side samples kept per method
    :param threads: torch CPU threads (None: torch's choice)
    :param device: torch device
    """

    methods: Sequence[str] = METHODS
    seconds: float = 210.0
    model: str = "smollm2-135m"
    reward: Any = None
    seed: int = 0
    eval_prompts: int | None = 32
    eval_samples: int = DemoConfig.eval_samples
    max_new_tokens: int = DemoConfig.max_new_tokens
    checkpoints: int = 3
    dpo_pairs: Any = "budget"
    dpo_settings: dict = field(default_factory=dict)
    n_show: int = DemoConfig.n_show
    threads: int | None = None
    device: str = "cpu"


def check_methods(methods: str | Sequence[str]) -> list[str]:
    """The method names as a list (a comma-separated string works too), each checked.

    :raises ValueError: for an unknown or repeated name, listing the valid ones
    """
    names = [m.strip().lower() for m in methods.split(",")] if isinstance(methods, str) else [str(m).lower() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; valid methods: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a method is named twice in {names}")
    return names


def env_id_for(model: str) -> str:
    """The registered env whose YAML entries fit ``model``: the tiny env for the tiny model."""
    return "TextRLHF-tiny-v0" if str(model) == "tiny" else "TextRLHF-v0"


def dpo_pairs_for_budget(seconds: float, epochs: int, available: int) -> int:
    """How many training pairs DPO gets for a budget of ``seconds``: as many as it can
    prepare (trunk pass and reference log-probabilities, once per pair) and train on for
    its ``epochs`` within the budget, at :data:`DPO_SECONDS_PER_PAIR` (at least one step's
    worth, at most ``available``). Without it DPO would spend a short budget preparing pairs
    it never reaches."""
    per_pair = DPO_SECONDS_PER_PAIR["prepare"] + epochs * DPO_SECONDS_PER_PAIR["epoch"]
    if per_pair <= 0:
        return available
    return int(max(16, min(available, seconds / per_pair)))


# ---------------------------------------------------------------------------------------
# the budget and the checkpoints


class _Budget:
    """CPU seconds of one method's training (evaluations excluded) and its checkpoints.

    ``tick(policy)`` after every update evaluates the checkpoints that fell due and says
    whether to go on; the last checkpoint (the end of the budget) is the caller's final
    evaluation."""

    def __init__(self, seconds: float, checkpoints: int, judge: Callable[[Any, float, int], None]):
        self.seconds = float(seconds)
        self.marks = [self.seconds * k / checkpoints for k in range(1, checkpoints)]
        self.judge = judge
        self.start = time.process_time()
        self.excluded = 0.0
        self.updates = 0

    def used(self) -> float:
        return time.process_time() - self.start - self.excluded

    def tick(self, policy: Any) -> bool:
        self.updates += 1
        used = self.used()
        if used >= self.seconds:
            return False  # the final evaluation is the caller's
        if self.marks and used >= self.marks[0]:
            while self.marks and used >= self.marks[0]:  # marks passed in one update: one evaluation
                self.marks.pop(0)
            t = time.process_time()
            self.judge(policy, used, self.updates)
            self.excluded += time.process_time() - t
        return True


# ---------------------------------------------------------------------------------------
# the methods


def _rl_hyperparams(method: str, env_id: str) -> dict[str, Any]:
    from rlhf_env.agents.hyperparams import load_hyperparams

    params = load_hyperparams(method, env_id)
    params.pop("n_timesteps", None)
    return params


def _train_rl(method: str, cfg: CompareConfig, reward: Callable, budget: _Budget, bar: Any) -> tuple[Any, dict]:
    """Train one of :data:`RL_METHODS` until the budget is spent; return ``(policy, info)``."""
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)
    from rlhf_env.agents import ALGOS

    env_id = env_id_for(cfg.model)
    params = _rl_hyperparams(method, env_id)
    n_envs = int(params.pop("n_envs", 16))
    policy = params.pop("policy", "LMPolicy")
    # shared_model=False: a model of its own, never the live actor of an env built earlier in
    # this process (an earlier method's trained policy, while anything still holds it)
    env = gym.make_vec(env_id, num_envs=n_envs, model=cfg.model, reward_model=reward, shared_model=False,
                       max_new_tokens=cfg.max_new_tokens, device=cfg.device)
    agent = ALGOS[method](policy, env, seed=cfg.seed, device=cfg.device, verbose=0, **params)
    core = env.unwrapped.core
    pol = (core.actor, core.tokenizer)
    first = True
    while True:
        # total_timesteps=1: one rollout and one update per call (a group rollout ends before
        # n_steps steps, so n_envs * n_steps would take GRPO and RLOO through two)
        agent.learn(1, reset_num_timesteps=first)
        first = False
        go_on = budget.tick(pol)
        bar.update(min(budget.used(), budget.seconds) - bar.n)
        bar.set_postfix_str(f"iteration {budget.updates}")
        if not go_on:
            break
    info = {"hyperparameters": {"n_envs": n_envs, "policy": policy, **{k: _jsonable(v) for k, v in params.items()}},
            "iterations": budget.updates, "stop_reason": "budget", "env": env_id}
    if method == "ppo":
        info["kl_coef_final"] = float(agent._text_state.kl_controller.value)
    info["_close"] = env.close
    return pol, info


def _train_dpo(cfg: CompareConfig, budget: _Budget, bar: Any) -> tuple[Any, dict]:
    """DPO on the default task's training pairs until the budget is spent or its epochs end."""
    import random

    from rlhf_env.default_reward_model import default_training_pairs
    from rlhf_env.dpo import DPOConfig, train_dpo

    dcfg = DPOConfig(**{"seed": cfg.seed, **cfg.dpo_settings})
    pairs = default_training_pairs()
    n_all = len(pairs)
    want = cfg.dpo_pairs
    if want == "budget":
        want = dpo_pairs_for_budget(cfg.seconds, dcfg.epochs, n_all)
    if want is not None and int(want) < n_all:
        # whole prompts, in a seeded order, until the count is reached
        prompts = list(dict.fromkeys(p.prompt for p in pairs))
        random.Random(cfg.seed).shuffle(prompts)
        keep, count = set(), 0
        by_prompt: dict[str, int] = {}
        for p in pairs:
            by_prompt[p.prompt] = by_prompt.get(p.prompt, 0) + 1
        for prompt in prompts:
            if count >= int(want):
                break
            keep.add(prompt)
            count += by_prompt[prompt]
        pairs = [p for p in pairs if p.prompt in keep]
    holder: dict[str, Any] = {}

    def on_step(step: int, metrics: dict) -> bool:
        holder["metrics"] = metrics
        go_on = budget.tick((holder["model"], holder["tokenizer"]))
        bar.update(min(budget.used(), budget.seconds) - bar.n)
        bar.set_postfix_str(f"step {step}, loss {metrics['train/loss']:.3f}")
        return go_on

    from rlhf_env.training import resolve_lm

    model, tokenizer = resolve_lm(cfg.model, None, cfg.device)
    holder["model"], holder["tokenizer"] = model, tokenizer
    model, tokenizer = train_dpo(pairs, model, tokenizer=tokenizer, config=dcfg, device=cfg.device, progress=False,
                                 callback=on_step)
    finished = budget.used() < budget.seconds
    info = {"hyperparameters": {k: _jsonable(v) for k, v in asdict(dcfg).items()}, "pairs": len(pairs),
            "pairs_available": n_all, "steps": budget.updates,
            "stop_reason": f"{dcfg.epochs} epochs done" if finished else "budget",
            "last_metrics": holder.get("metrics", {})}
    return (model, tokenizer), info


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)


# ---------------------------------------------------------------------------------------
# the report


def _point(report: dict, cpu_seconds: float, updates: int) -> dict[str, Any]:
    from rlhf_env.evaluate import check_targets

    pol = report["policy"]
    # every column evaluate() writes (a judge added there is kept here without a second list)
    return {"cpu_seconds": float(cpu_seconds), "updates": int(updates), **pol,
            "win_rate": report["win_rate"], "pass_rule": check_targets(report)}


def run_comparison(
    out: str | os.PathLike = "compare_out",
    config: CompareConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Train every method of ``config.methods`` from the same model for the same CPU budget,
    judge each at its checkpoints, and write ``OUT/compare.json``, ``OUT/compare.md`` and
    ``OUT/frontier.png`` (see the module docstring).

    :param out: output folder (created)
    :param config: the settings (:class:`CompareConfig`); ``overrides`` replace its fields
        (``run_comparison("out", methods="ppo,dpo", seconds=60, model="tiny")``)
    :param progress: a progress bar per method (CPU seconds of its budget)
    :param log: where progress lines go
    :return: what ``compare.json`` holds
    """
    from tqdm.auto import tqdm

    from rlhf_env.evaluate import Targets, evaluate, write_report
    from rlhf_env.generation import resolve_policy
    from rlhf_env.prompts import load_prompts
    from rlhf_env.rewards import resolve_reward

    cfg = config or CompareConfig()
    unknown = set(overrides) - set(CompareConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; valid: {sorted(CompareConfig.__dataclass_fields__)}")
    cfg = CompareConfig(**{**asdict(cfg), **overrides})
    cfg.methods = check_methods(cfg.methods)
    from rlhf_env.dpo import DPOConfig

    unknown = sorted(set(cfg.dpo_settings) - set(DPOConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"dpo_settings: unknown DPOConfig field(s) {unknown}; valid: {sorted(DPOConfig.__dataclass_fields__)}")
    if not cfg.seconds > 0:
        raise ValueError(f"seconds must be > 0 (CPU seconds of training per method), got {cfg.seconds!r}")
    if int(cfg.checkpoints) < 1:
        raise ValueError(f"checkpoints must be >= 1, got {cfg.checkpoints!r}")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    env_id = env_id_for(cfg.model)
    reward_spec = cfg.reward if cfg.reward is not None else ("tiny" if env_id == "TextRLHF-tiny-v0" else "default")
    reward = resolve_reward(reward_spec, device=cfg.device)
    reward_name = reward_spec if isinstance(reward_spec, str) else type(reward_spec).__name__
    if reward_spec == "default":
        from rlhf_env.default_reward_model import DEFAULT_CACHE_NAME

        reward_name = f"default ({DEFAULT_CACHE_NAME})"
    reference = resolve_policy(cfg.model, cfg.device)
    prompts = load_prompts(split="test")
    if cfg.eval_prompts is not None:
        prompts = prompts[: int(cfg.eval_prompts)]
    eval_args = dict(reward=reward, num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                     seed=cfg.seed + 12345, n_show=cfg.n_show, progress=False, device=cfg.device)
    log(f"[compare] {', '.join(cfg.methods)} from {cfg.model}, {cfg.seconds:g} CPU s of training each, reward {reward_name}; "
        f"judging the reference on {len(prompts)} held-out prompts x {cfg.eval_samples}")
    baseline = evaluate(reference, prompts, reference=reference, **eval_args)
    ref_col = baseline["reference"]
    settings = {k: v for k, v in asdict(cfg).items()}
    settings.update(methods=list(cfg.methods), eval_prompts=len(prompts), reward=reward_name, env=env_id,
                    threads=torch.get_num_threads())
    result: dict[str, Any] = {"settings": settings, "reference": dict(ref_col),
                              "targets": asdict(Targets()), "methods": {}}
    result["reference"]["kl"] = 0.0

    for method in cfg.methods:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        points: list[dict] = []

        def judge(policy: Any, used: float, updates: int) -> dict:
            report = evaluate(policy, prompts, reference=reference, baseline=baseline, **eval_args)
            points.append(_point(report, used, updates))
            p = points[-1]
            bar.write(f"[compare] {method} at {used:.0f} CPU s ({updates} updates): reward-model score {p['reward']:+.3f}, "
                      f"win rate {p['win_rate']:.2f}, KL {p['kl']:.2f}, tone {p['tone']:+.3f} ({p['negative_share']:.0%} negative), relevance {p['relevance']:.3f}, "
                      f"distinct-2 {p['distinct_2']:.3f}")
            return report

        bar = tqdm(total=float(cfg.seconds), desc=method, unit="cpu-s", disable=not progress,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} CPU s [{elapsed}] {postfix}")
        budget = _Budget(cfg.seconds, int(cfg.checkpoints), judge)
        if method == "dpo":
            policy, info = _train_dpo(cfg, budget, bar)
        else:
            policy, info = _train_rl(method, cfg, reward, budget, bar)
        used = budget.used()
        final = judge(policy, used, budget.updates)
        bar.close()
        close = info.pop("_close", None)
        write_report(final, out / method / "evaluation.json")
        result["methods"][method] = {**info, "cpu_seconds": used, "checkpoints": points, "final": points[-1],
                                     "samples": final["samples"]}
        del policy
        if close is not None:
            close()
        write_text(out / "compare.json", json.dumps(result, indent=2))  # after every method: a partial run keeps its results

    result["seconds"] = time.time() - t0
    write_outputs(result, out)
    log("[compare] judges on the held-out prompts (final checkpoint of each method):\n" + format_tables(result))
    log(f"[compare] wrote {out}/compare.json, compare.md, frontier.png and each method's evaluation.json "
        f"({result['seconds']:.0f} s)")
    return result
