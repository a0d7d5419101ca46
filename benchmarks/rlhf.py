"""RLHF training speed: our GRPO against TRL's ``GRPOTrainer``, and where a PPO iteration's
time goes.

1. **GRPO step time.** The same work on both sides: the same model (``load_lm(model)``
   saved to a temporary local directory, which TRL loads), the same prompts (the shipped
   training prompts, chat template applied on both sides), the same reward function
   (VADER sentiment, :class:`rlhf_env.rewards.SentimentReward`), group size, number of
   prompts per step, response length, temperature, KL coefficient ``beta``, clip range,
   learning rate, one optimizer step per batch, and the same trainable weights (the last
   ``--train-layers`` blocks + final norm on both sides, or all weights). A step is:
   sample ``prompts x group`` responses, score them, group-normalise, one forward/backward,
   one optimizer step. Seconds per step are medians over ``--steps`` steps after a warm-up
   step; ours runs before and after TRL so that a change of load on the machine shows.
2. **PPO phases.** One ``agents.PPO`` iteration on ``TextRLHF-v0`` split into: rollout
   (token-by-token generation with the actor's and the reference's KV caches, which
   yields the old and reference log-probabilities), scoring (the reward model), the
   teacher-forced log-probability/value forwards of the update (only the top blocks on the
   kept trunk states when ``--train-layers k``), and the rest of the update (backward and
   optimizer steps).

3. **Demo PPO iterations** (``--demo-iterations N``): CPU seconds per PPO iteration with
   the settings of ``rlhf-env demo`` (:class:`rlhf_env.demo.DemoConfig`).

Run: ``python -m benchmarks.rlhf`` (SmolLM2-135M, several minutes on 2 CPU cores) or
``--quick`` (the tiny model, seconds). ``rlhf-env bench rlhf`` runs the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from rlhf_env.cli._common import block_count


class TimedReward:
    """A reward callable that adds up the CPU time spent in it."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, prompts, responses):
        t = time.process_time()
        out = self.fn(prompts, responses)
        self.seconds += time.process_time() - t
        self.calls += 1
        return out


def _trainable(model: torch.nn.Module, train_layers: int | None) -> int:
    from agents.policies.lm import set_trainable

    set_trainable(model, train_layers)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_local_model(name: str, directory: str) -> str:
    """``load_lm(name)`` written as a plain Hugging Face directory (what TRL loads)."""
    from rlhf_env.models import load_lm

    model, tok = load_lm(name)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------
# ours


def run_ours(model_dir: str, prompts: list[str], args: argparse.Namespace, n_steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each GRPO iteration (rollout + update, one optimizer step)."""
    import gymnasium as gym

    import rlhf_env  # noqa: F401
    from agents import GRPO
    from rlhf_env.rewards import SentimentReward

    env = gym.make_vec(
        "TextRLHF-v0", num_envs=args.prompts_per_step * args.group, model=model_dir, reward_model=SentimentReward(),
        prompts=prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, shared_model=False,
    )
    policy_kwargs = {} if args.train_layers is None else {"train_layers": args.train_layers}
    model = GRPO(
        "LMPolicy", env, group_size=args.group, learning_rate=args.lr, beta=args.beta, clip_range=0.2,
        n_epochs=1, batch_size=10**9, max_grad_norm=1.0, seed=0, policy_kwargs=policy_kwargs,
    )
    trainable = sum(p.numel() for p in model.policy.actor.parameters() if p.requires_grad)
    times, cpu = [], []
    for i in range(n_steps):
        t, c = time.perf_counter(), time.process_time()
        before = model._iteration
        # exactly one iteration (one rollout, one optimizer step), as one TRL step: a budget of
        # n_envs * (max_new_tokens + 1) timesteps would run a second iteration whenever every
        # response of the first ended early (the rollout stops then, with fewer timesteps)
        model.learn(1, reset_num_timesteps=i == 0)
        if model._iteration != before + 1:
            raise RuntimeError(f"internal error: a benchmark step ran {model._iteration - before} GRPO iterations, not 1")
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    env.close()
    print(f"  ours: trainable actor weights {trainable / 1e6:.2f}M, steps wall {['%.2f' % x for x in times]} "
          f"cpu {['%.2f' % x for x in cpu]}", flush=True)
    return times, cpu


# ---------------------------------------------------------------------------------------
# TRL


def run_trl(model_dir: str, prompts: list[str], args: argparse.Namespace, n_steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each ``GRPOTrainer`` step (generation, reward, loss, optimizer step)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_env.rewards import SentimentReward

    vader = SentimentReward()

    def vader_reward(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return vader([""] * len(texts), texts).tolist()

    times: list[float] = []
    cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    batch = args.prompts_per_step * args.group
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.chat_template:  # the chat template on both sides (our env's encode_prompt applies it)
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    else:
        data = Dataset.from_list([{"prompt": p} for p in prompts])
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=batch, num_generations=args.group,
            gradient_accumulation_steps=1, num_iterations=1, max_completion_length=args.max_new_tokens,
            learning_rate=args.lr, beta=args.beta, epsilon=0.2, temperature=args.temperature, top_k=0, top_p=1.0,
            max_grad_norm=1.0, max_steps=n_steps, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=args.device == "cpu", bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
            disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            # ours keeps activations: recomputing them would make TRL slower for no memory need here
            gradient_checkpointing=False,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainable = _trainable(model, args.train_layers)
        trainer = GRPOTrainer(model=model, reward_funcs=vader_reward, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[StepTimer()])
        trainer.train()
    print(f"  TRL:  trainable weights {trainable / 1e6:.2f}M, steps wall {['%.2f' % x for x in times]} "
          f"cpu {['%.2f' % x for x in cpu]}", flush=True)
    return times, cpu


# ---------------------------------------------------------------------------------------
# PPO phases


def time_phases(model) -> dict[str, float]:
    """Wrap ``model.collect_rollouts`` and ``model.train`` so that each call records its CPU
    seconds in the returned dict (keys ``collect`` and ``train``: the latest call's)."""
    collect, train = model.collect_rollouts, model.train
    phase: dict[str, float] = {}

    def timed_collect(*a, **k):
        t = time.process_time()
        out = collect(*a, **k)
        phase["collect"] = time.process_time() - t
        return out

    def timed_train():
        t = time.process_time()
        train()
        phase["train"] = time.process_time() - t

    model.collect_rollouts, model.train = timed_collect, timed_train
    return phase


def ppo_phases(model_dir: str, prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    """CPU seconds of each phase of one PPO iteration (after a warm-up iteration; CPU time,
    as the GRPO comparison, so that other load on a shared machine does not count)."""
    import gymnasium as gym

    import agents.text_ppo as text_ppo
    import rlhf_env  # noqa: F401
    from agents import PPO
    from rlhf_env.rewards import SentimentReward

    reward = TimedReward(SentimentReward())
    n_envs = args.prompts_per_step * args.group
    env = gym.make_vec("TextRLHF-v0", num_envs=n_envs, model=model_dir, reward_model=reward, prompts=prompts,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, kl_coef=0.05, shared_model=False)
    policy_kwargs = {} if args.train_layers is None else {"train_layers": args.train_layers}
    model = PPO("LMPolicy", env, n_steps=args.max_new_tokens + 1, batch_size=n_envs * args.max_new_tokens // 2,
                n_epochs=2, learning_rate=args.lr, gamma=1.0, seed=0, policy_kwargs=policy_kwargs,
                rlhf={"kl_coef": 0.05, "target_kl": 6.0})
    timings = {"forward": 0.0}
    originals = {name: getattr(text_ppo, name) for name in ("evaluate_tokens", "evaluate_kept")}

    def timed(fn):
        def timed_evaluate(*a, **k):
            t = time.process_time()
            out = fn(*a, **k)
            timings["forward"] += time.process_time() - t
            return out
        return timed_evaluate

    phase = time_phases(model)
    for name, fn in originals.items():  # the full teacher-forced forward or the top blocks on kept states
        setattr(text_ppo, name, timed(fn))
    try:
        steps = n_envs * (args.max_new_tokens + 1)
        model.learn(steps)  # warm-up
        reward.seconds, timings["forward"] = 0.0, 0.0
        model.learn(steps, reset_num_timesteps=False)
    finally:
        for name, fn in originals.items():
            setattr(text_ppo, name, fn)
    env.close()
    tokens = sum(len(s) for s in model._segments)
    return {
        "rollout (generation + reference log-probs)": phase["collect"] - reward.seconds,
        "scoring (reward model)": reward.seconds,
        "log-probabilities + values (teacher-forced forwards)": timings["forward"],
        "update (backward + optimizer)": phase["train"] - timings["forward"],
        "tokens": tokens,
    }


def demo_ppo_iterations(n_iterations: int) -> dict[str, float]:
    """CPU seconds per PPO iteration with the demo's settings (:class:`rlhf_env.demo.DemoConfig`:
    SmolLM2, its reward, 16 envs, ``n_steps`` 25, 24 new tokens, the top 4 blocks, minibatches
    of 96 tokens, 4 epochs), medians over ``n_iterations`` after a warm-up iteration."""
    import gymnasium as gym

    import rlhf_env  # noqa: F401
    from agents import PPO
    from agents.text_ppo import RLHFConfig
    from rlhf_env.demo import DemoConfig, _resolve_demo_reward

    cfg = DemoConfig()
    reward, _ = _resolve_demo_reward(cfg.reward, cfg.device, lambda *a: None)
    env = gym.make_vec("TextRLHF-v0", num_envs=cfg.num_envs, model=cfg.model, reward_model=reward, prompts=cfg.prompts,
                       max_new_tokens=cfg.max_new_tokens, kl_coef=cfg.kl_coef, temperature=cfg.temperature)
    policy_kwargs = {"train_layers": cfg.train_layers} if cfg.lora is None else {"lora": dict(cfg.lora)}
    model = PPO("LMPolicy", env, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                n_epochs=cfg.n_epochs, gamma=1.0, gae_lambda=0.95, clip_range=0.2, vf_coef=0.5, ent_coef=0.0,
                max_grad_norm=1.0, seed=cfg.seed, policy_kwargs=policy_kwargs,
                rlhf=RLHFConfig(kl_coef=cfg.kl_coef, target_kl=cfg.target_kl, kl_horizon=cfg.kl_horizon,
                                score_norm=cfg.score_norm))
    phase = time_phases(model)
    rows = []
    for i in range(n_iterations + 1):
        c = time.process_time()
        model.learn(cfg.num_envs * cfg.n_steps, reset_num_timesteps=i == 0)
        rows.append((time.process_time() - c, phase["collect"], phase["train"]))
        print(f"  demo PPO iteration {i}{' (warm-up)' if i == 0 else ''}: {rows[-1][0]:.2f} CPU s "
              f"(rollout {rows[-1][1]:.2f}, update {rows[-1][2]:.2f})", flush=True)
    env.close()
    median = lambda j: statistics.median(r[j] for r in rows[1:])  # noqa: E731
    return {"iteration_s": median(0), "rollout_s": median(1), "update_s": median(2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model (seconds instead of minutes)")
    parser.add_argument("--model", default=None, help="model name or directory (default smollm2-135m; quick: tiny)")
    parser.add_argument("--group", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=1, help="prompts per step (batch = prompts x group)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04, help="KL-to-reference coefficient (both sides)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--train-layers", default="all", type=block_count(0),
                        help="trainable weights on both sides: 'all' or k (last k blocks + final norm)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per side (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--demo-iterations", type=int, default=0,
                        help="also time this many PPO iterations with the demo's settings (SmolLM2, after a warm-up)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = args.model or ("tiny" if args.quick else "smollm2-135m")
    if args.quick and args.max_new_tokens == 32:
        args.max_new_tokens = 16

    from rlhf_env.prompts import load_prompts

    prompts = load_prompts(split="train")
    results: dict[str, Any] = {"model": model_name, "config": {k: v for k, v in vars(args).items()}}
    print(f"RLHF benchmark: {model_name}, group {args.group} x {args.prompts_per_step} prompt(s), "
          f"{args.max_new_tokens} new tokens, beta {args.beta}, trainable: "
          f"{'all' if args.train_layers is None else f'last {args.train_layers} blocks'}, threads {torch.get_num_threads()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_local_model(model_name, os.path.join(tmp, "model"))
        n = args.steps + 1
        if not args.skip_trl:
            # ours, TRL, ours: a change of load on a shared machine shows as a spread in ours
            ours_wall, ours_cpu = (x[1:] for x in run_ours(model_dir, prompts, args, n))
            trl_wall, trl_cpu = (x[1:] for x in run_trl(model_dir, prompts, args, n))
            w, c = run_ours(model_dir, prompts, args, n)
            ours_wall, ours_cpu = ours_wall + w[1:], ours_cpu + c[1:]
            ow, tw = statistics.median(ours_wall), statistics.median(trl_wall)
            oc, tc = statistics.median(ours_cpu), statistics.median(trl_cpu)
            results.update(ours_step_s=ow, trl_step_s=tw, speedup=tw / ow, ours_step_cpu_s=oc, trl_step_cpu_s=tc,
                           speedup_cpu=tc / oc, ours_steps=ours_wall, trl_steps=trl_wall)
            print(f"GRPO seconds per step (median): ours {ow:.2f}, TRL GRPOTrainer {tw:.2f}  ->  ours is {tw / ow:.2f}x "
                  f"faster (target >= 1.5x)", flush=True)
            print(f"GRPO CPU seconds per step (median, the fair measure on a loaded machine): ours {oc:.2f}, TRL {tc:.2f}"
                  f"  ->  {tc / oc:.2f}x", flush=True)
        if not args.skip_ppo:
            phases = ppo_phases(model_dir, prompts, args)
            results["ppo_phases"] = phases
            tokens = phases.pop("tokens")
            total = sum(phases.values())
            print(f"PPO iteration ({tokens} response tokens, {args.prompts_per_step * args.group} envs): {total:.2f} CPU s")
            for name, sec in phases.items():
                print(f"  {name:55s} {sec:7.2f}s  {100 * sec / total:5.1f}%")
    if args.demo_iterations:
        demo = demo_ppo_iterations(args.demo_iterations)
        results["demo_ppo"] = demo
        print(f"PPO iteration with the demo's settings (median CPU s): {demo['iteration_s']:.2f} "
              f"(rollout {demo['rollout_s']:.2f}, update {demo['update_s']:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
