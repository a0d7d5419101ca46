"""Reinforcement learning from verifiable rewards: our default method against TRL's GRPOTrainer.

Both train SmolLM2-135M-Instruct on the same verifiable task (default ``chain_sum``, the
demo's task) with the same work per step and the same budget, in one process, one after
the other, and both are scored by the same held-out evaluation
(:func:`rlhf_env.tasks.evaluate_task`: greedy accuracy, sampled mean@4):

* **ours**: :func:`rlhf_env.tasks.train.make_task_agent` with the demo's settings
  (:class:`rlhf_env.tasks.train.TaskTrainConfig`: ``ReasoningGym-v0``, the default
  method, its group size, rows per step, learning rate, beta, trainable blocks, completion
  length, sampling temperature);
* **TRL**: ``trl.GRPOTrainer`` on the same rows (a ``datasets.Dataset`` of the task's train
  split, conversational prompts) with the task's own reward function passed unchanged
  (``f(prompts, completions, **columns)`` reading the ``entry`` column), the same model
  directory, the same trainable weights (the top ``train_layers`` blocks and the final
  norm: every other parameter has ``requires_grad=False`` before the trainer is built),
  ``num_generations`` = group size, ``per_device_train_batch_size`` = rows x group (one
  generation and one optimizer step per step, as ours), the same ``max_completion_length``,
  learning rate, ``beta``, ``loss_type``, ``scale_rewards`` and ``mask_truncated_completions``
  (completions cut by the length limit out of the loss), sampling ``temperature``, fused AdamW
  (TRL's default) and ``gradient_checkpointing=False`` (TRL 1.16 turns it on by default; on
  a CPU with memory to spare it only recomputes forwards, so it is off to TRL's benefit).

One step is the same work for both: one generation of ``rows x group`` completions, their
rewards and one optimizer step (ours: one group rollout and one update of
:func:`rlhf_env.tasks.train.train_task`; TRL: one ``global_step``). Each trainer runs until
``--budget`` CPU seconds of this process have passed (checked after every step:
``time.process_time``, so a shared machine does not shorten either). Printed: steps done,
CPU seconds per step split into generation (ours: the rollout, reward included; TRL:
``_generate_and_score_completions``) and update (the rest: forward, backward, optimizer,
and for ours the reference's log-probs that log the KL), steps per CPU second and their
ratio (ours / TRL), held-out accuracy at the budget, the thread count (``--threads``,
default 1) and the machine's load average before and after.

    python -m benchmarks.rlvr --budget 240 --threads 1
    python -m benchmarks.rlvr --quick   # the tiny model, seconds (checks the wiring only)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _evaluate(policy, task, cfg, label: str) -> dict:
    from rlhf_env.tasks import accuracy_line, evaluate_task

    report = evaluate_task(policy, task, limit=cfg.eval_limit, num_samples=cfg.eval_samples,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1, progress=False)
    print(f"[{label}] {accuracy_line(report)}", flush=True)
    return report


class _CpuTimer:
    """CPU seconds spent inside one method of a class, while installed (``with``)."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0

    def __enter__(self) -> "_CpuTimer":
        original = self.original = self.owner.__dict__[self.name]

        def timed(*args, **kwargs):
            c0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - c0
                self.calls += 1

        setattr(self.owner, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self.original)


def _split_line(steps: int, cpu: float, generation: float) -> str:
    return (f"{steps} steps in {cpu:.1f} CPU s = {cpu / steps:.2f} s/step: generation {generation / steps:.2f} "
            f"+ update {(cpu - generation) / steps:.2f}")


def run_ours(cfg, task) -> dict:
    from agents.group_rollout import GroupRolloutAlgorithm
    from rlhf_env.tasks.train import make_task_agent, train_task

    agent, _ = make_task_agent(cfg, task=task)
    with _CpuTimer(GroupRolloutAlgorithm, "collect_rollouts") as rollout:
        history = train_task(agent, cfg)
    steps, cpu = len(history), history[-1]["cpu_seconds"]
    assert rollout.calls == steps, (rollout.calls, steps)  # one rollout and one update a step
    print(f"[ours] {cfg.algo} {cfg.algo_kwargs}: " + _split_line(steps, cpu, rollout.seconds), flush=True)
    report = _evaluate(agent, task, cfg, "ours")
    return {"steps": steps, "cpu_seconds": cpu, "seconds_per_step": cpu / steps,
            "generation_seconds_per_step": rollout.seconds / steps, "report": report}


def run_trl(cfg, task, model_dir: str, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from agents.policies.lm import set_trainable

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    set_trainable(model, cfg.train_layers)  # the same weights train as in ours
    rows = [{k: r[k] for k in ("prompt", "answer", "entry")} for r in task.rows("train")]
    if not getattr(tokenizer, "chat_template", None):  # the tiny model (--quick): plain-text prompts, as ours encodes them
        rows = [{**r, "prompt": "\n".join(m["content"] for m in r["prompt"])} for r in rows]
    dataset = Dataset.from_list([{**r, "entry": json.dumps(r["entry"])} for r in rows])
    correctness = task.reward_funcs[0]

    def reward(prompts, completions, entry, **columns):
        # the task's reward function, unchanged; the entry column travels as JSON text
        # because Arrow wants one schema for the nested metadata
        return correctness(prompts, completions, entry=[json.loads(e) for e in entry], **columns)

    reward.__name__ = "correctness"
    n = cfg.group_size * cfg.prompts_per_step
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=cfg.device == "cpu", num_generations=cfg.group_size, per_device_train_batch_size=n,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=cfg.max_new_tokens or task.max_new_tokens,
        learning_rate=cfg.learning_rate, beta=cfg.beta, loss_type=cfg.algo_kwargs.get("loss_type", "dapo"),
        scale_rewards=cfg.algo_kwargs.get("scale_rewards", "group"), mask_truncated_completions=cfg.mask_truncated_completions,
        temperature=cfg.temperature, gradient_checkpointing=False,
        max_steps=cfg.max_iterations, logging_strategy="no", report_to="none", save_strategy="no", seed=cfg.seed,
        disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    )
    state = {"c0": None, "steps": 0}

    class Budget(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["c0"] = time.process_time()

        def on_step_end(self, args, st, control, **kw):
            state["steps"] = st.global_step
            if time.process_time() - state["c0"] >= cfg.train_seconds:
                control.should_training_stop = True

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[Budget()])
    with _CpuTimer(GRPOTrainer, "_generate_and_score_completions") as generation:
        trainer.train()
    cpu = time.process_time() - state["c0"]
    steps = max(state["steps"], 1)
    print("[trl] GRPOTrainer: " + _split_line(steps, cpu, generation.seconds), flush=True)
    model.eval()
    report = _evaluate((model, tokenizer), task, cfg, "trl")
    return {"steps": steps, "cpu_seconds": cpu, "seconds_per_step": cpu / steps,
            "generation_seconds_per_step": generation.seconds / steps, "report": report}


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    from rlhf_env.models import load_lm
    from rlhf_env.tasks import accuracy_line, make_task
    from rlhf_env.tasks.train import TaskTrainConfig, quick_task_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="chain_sum")
    p.add_argument("--budget", type=float, default=240.0, help="CPU seconds of training for each trainer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=64, help="held-out rows scored")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out row (sampled accuracy = mean over them)")
    p.add_argument("--skip", nargs="*", default=[], choices=["before", "ours", "trl"])
    p.add_argument("--quick", action="store_true", help="the tiny model and a few seconds (wiring check)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg = quick_task_config() if args.quick else TaskTrainConfig()
    cfg.task, cfg.seed, cfg.eval_limit, cfg.eval_samples = args.task, args.seed, args.eval_limit, args.eval_samples
    cfg.train_seconds = 10.0 if args.quick else args.budget
    task = make_task(cfg.task, cfg.task_config, answer_format=cfg.answer_format)
    model, tokenizer = load_lm(cfg.model)
    print(f"task {task!r}, model {cfg.model}, {torch.get_num_threads()} torch thread(s), budget {cfg.train_seconds:.0f} CPU s each; "
          f"{cfg.prompts_per_step} rows x {cfg.group_size} completions per step, lr {cfg.learning_rate}, "
          f"train_layers {cfg.train_layers}, mask_truncated_completions {cfg.mask_truncated_completions}", flush=True)
    before = None if "before" in args.skip else _evaluate((model, tokenizer), task, cfg, "before")
    results: dict = {"settings": {**vars(args), "method": cfg.algo, "algo_kwargs": cfg.algo_kwargs}, "before": before}
    if "ours" not in args.skip:
        results["ours"] = run_ours(cfg, task)
    if "trl" not in args.skip:
        model_dir = model.name_or_path if not args.quick else model.name_or_path
        with tempfile.TemporaryDirectory() as out_dir:
            results["trl"] = run_trl(cfg, task, model_dir, out_dir)
    if "ours" in results and "trl" in results:
        o, t = results["ours"], results["trl"]
        speed = t["seconds_per_step"] / o["seconds_per_step"]
        print(f"steps per CPU second: ours {1 / o['seconds_per_step']:.4f}, TRL {1 / t['seconds_per_step']:.4f}; "
              f"ours / TRL {speed:.2f}x ({o['seconds_per_step']:.2f} vs {t['seconds_per_step']:.2f} CPU s a step; "
              f"generation {o['generation_seconds_per_step']:.2f} vs {t['generation_seconds_per_step']:.2f}, update "
              f"{o['seconds_per_step'] - o['generation_seconds_per_step']:.2f} vs "
              f"{t['seconds_per_step'] - t['generation_seconds_per_step']:.2f})")
        for key in ("greedy", "sampled"):
            a, b = o["report"][key]["accuracy"], t["report"][key]["accuracy"]
            start = f" (before {before[key]['accuracy']:.3f})" if before else ""
            print(f"held-out {key} accuracy at the budget: ours {a:.3f}, TRL {b:.3f}{start}; ours - TRL {a - b:+.3f}")
        results["ratios"] = {"steps_per_second": speed}
    load = (load_before, os.getloadavg())
    results["load_average"] = load
    print(f"load average (1, 5, 15 min) at the start {', '.join(f'{x:.2f}' for x in load[0])}, at the end "
          f"{', '.join(f'{x:.2f}' for x in load[1])} ({os.cpu_count()} CPUs)")
    for name in ("ours", "trl"):
        if name in results:
            results[name]["report"] = {k: v for k, v in results[name]["report"].items() if k != "samples"} | {
                "samples": results[name]["report"]["samples"][:2]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
