"""Accuracy of a policy on a verifiable task's held-out split: greedy, sampled mean@k, pass@k.

:func:`evaluate_task` is what ``rlhf-env eval --task``, the verifiable-reward demo and
``benchmarks/rlvr.py`` report: every held-out row is answered greedily once and sampled ``k``
times (batched, through :func:`rlhf_env.generation.generate`), each completion scored by the
task's verifier.

- ``greedy.accuracy``: mean score of the greedy completions.
- ``sampled.accuracy``: mean score over all ``k`` samples of every row (mean@k, what the
  policy's own distribution gets right: the quantity RL raises).
- ``sampled.pass@k``: share of rows with at least one fully correct sample among ``k``.
- ``*.format_rate``: share of completions that state an answer in the task's format.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from rlhf_env.agents.atomic import write_text
from rlhf_env.tasks.answers import extract_answer, follows_format
from rlhf_env.tasks.reasoning_gym import ReasoningGymTask, make_task


def evaluate_task(
    policy: Any,
    task: "str | ReasoningGymTask" = "chain_sum",
    task_config: dict | None = None,
    *,
    split: str = "test",
    limit: int | None = None,
    greedy: bool = True,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    n_show: int = 3,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Accuracy of ``policy`` on ``task``'s held-out split.

    :param policy: a model name or directory, a ``(model, tokenizer)`` pair, or a trained
        agent (see :func:`rlhf_env.generation.resolve_policy`).
    :param task: a task name (curated or any reasoning-gym name) or a :class:`ReasoningGymTask`.
    :param task_config: generator settings when ``task`` is a name.
    :param split: ``"test"`` (held-out, default) or ``"train"``.
    :param limit: score only the first ``limit`` rows.
    :param greedy: also decode greedily.
    :param num_samples: samples per row (``k``; 0 skips sampling).
    :param temperature: sampling temperature.
    :param top_k: sampling top-k (0: off).
    :param max_new_tokens: completion length (default: the task's).
    :param batch_size: sequences per generate call.
    :param seed: sampling seed.
    :param device: where a loaded model goes.
    :param progress: tqdm bars.
    :param n_show: rows whose completions go into the report's ``samples``.
    :param out: also write the report there as JSON.
    :return: the report: task settings, ``n``, ``greedy`` and ``sampled`` results, ``samples``,
        ``seconds``.
    """
    from rlhf_env.generation import generate, resolve_policy

    task = make_task(task, task_config)
    if not greedy and num_samples < 1:
        raise ValueError("nothing to evaluate: pass greedy=True or num_samples >= 1")
    rows = task.rows(split)[: limit if limit is not None else None]
    if not rows:
        raise ValueError(f"no rows to evaluate (split {split!r}, limit {limit})")
    max_new_tokens = int(max_new_tokens or task.max_new_tokens)
    start = time.perf_counter()
    model, tokenizer = resolve_policy(policy, device)
    prompts = [r["prompt"] for r in rows]
    report: dict[str, Any] = {
        "task": task.name,
        "dataset": task.dataset_name,
        "config": task.config,
        "answer_format": task.answer_format,
        "split": split,
        "n": len(rows),
        "max_new_tokens": max_new_tokens,
    }
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress)
    greedy_texts: list[str] = []
    if greedy:
        out_g = generate(model, tokenizer, prompts, greedy=True, **{**common, "progress": progress and "greedy decoding"})
        greedy_texts = [t[0] for t in out_g.texts]
        scores = np.asarray(task.score(greedy_texts, rows), dtype=np.float64)
        report["greedy"] = {
            "accuracy": float(scores.mean()),
            "format_rate": float(np.mean([follows_format(t, task.answer_format) for t in greedy_texts])),
            "mean_tokens": float(np.mean([n[0] for n in out_g.num_tokens])),
        }
    sampled_texts: list[list[str]] = []
    if num_samples >= 1:
        out_s = generate(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, top_k=top_k,
                         **{**common, "progress": progress and f"sampling {num_samples} per row"})
        sampled_texts = out_s.texts
        flat_rows = [r for r in rows for _ in range(num_samples)]
        scores = np.asarray(task.score(out_s.flat(), flat_rows), dtype=np.float64).reshape(len(rows), num_samples)
        report["sampled"] = {
            "accuracy": float(scores.mean()),
            f"pass@{num_samples}": float((scores >= 1.0).any(axis=1).mean()),
            "k": num_samples,
            "temperature": temperature,
            "top_k": top_k,
            "format_rate": float(np.mean([follows_format(t, task.answer_format) for t in out_s.flat()])),
            "mean_tokens": float(np.mean(out_s.num_tokens)),
        }
    report["samples"] = [
        {
            "question": rows[i]["entry"]["question"],
            "answer": rows[i]["answer"],
            **({"greedy": greedy_texts[i], "greedy_extracted": extract_answer(greedy_texts[i], task.answer_format)} if greedy else {}),
            **({"sampled": sampled_texts[i]} if sampled_texts else {}),
        }
        for i in range(min(n_show, len(rows)))
    ]
    report["seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        write_text(out, json.dumps(report, indent=2))
    return report


def accuracy_line(report: dict[str, Any]) -> str:
    """One line: ``greedy 0.39 | sampled mean@4 0.11, pass@4 0.33 (64 held-out rows)``."""
    parts = []
    if "greedy" in report:
        parts.append(f"greedy {report['greedy']['accuracy']:.3f}")
    if "sampled" in report:
        s = report["sampled"]
        k = s["k"]
        parts.append(f"sampled mean@{k} {s['accuracy']:.3f}, pass@{k} {s[f'pass@{k}']:.3f}")
    return " | ".join(parts) + f" ({report['n']} {report['split']} rows of {report['task']})"
