"""The default task of ``TextRLHF-v0``: "answer the prompt helpfully, in a positive,
friendly tone". This module reads the shipped files; ``python -m rlhf_env.default_task``
(:mod:`rlhf_env.default_task.build`) rebuilds them offline.

Files under ``rlhf_env/assets``:

* ``prompts_train.txt`` / ``prompts_test.txt``: the prompts (:mod:`.prompts`).
* ``task/samples_{split}.jsonl``, ``task/samples_{split}_r1.jsonl``, ``_r2``, ``_r3``:
  responses sampled from the starting model (SmolLM2-135M-Instruct, 4 per prompt in rounds
  0 and 1 in the env's context; 2 per prompt in round 2 under a friendly system message,
  recorded in each row's ``system``) and, in round 3, from two policies that RLOO trained
  against ``default-v6`` (1 per prompt each, in the env's context, each row recording its
  ``policy``: an online round; the shipped pairs leave it out, the ``default-v7``
  candidate's pairs use it), each with its independent judges' scores: ``score`` (tone,
  VADER), ``relevance`` (MiniLM prompt-response cosine) and ``nll`` (the starting model's
  NLL per token, in the env's context).
* ``task/pairs_{split}.jsonl``: the preference pairs (:mod:`.relabel`): pairs of samples
  that the judges agree on, pairs that tone alone decides among equally good answers, and
  the failure modes (boilerplate, repeated phrases, off-topic cheer, rudeness, canned
  praise) as rejected responses; with ``--policy-samples`` (the ``default-v7`` candidate's
  pairs, not the shipped ones) also the phrases a trained policy over-uses. The default
  reward model trains on ``pairs_train.jsonl`` and is evaluated on ``pairs_test.jsonl``.
* ``task/handwritten.jsonl``: hand-written pairs on new prompts, each tagged with what it
  tests (``tone``, ``relevance``, ``correctness``): a check no builder rule produced.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TASK_DIR = ASSETS / "task"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file (lines split on ``\\n`` only: a response may hold U+2028)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def sample_files(split: str, task_dir: Path = TASK_DIR) -> list[Path]:
    """The samples files of a split: ``samples_{split}.jsonl`` then ``_r1``, ``_r2``, ... ."""
    files = [task_dir / f"samples_{split}.jsonl"]
    k = 1
    while (task_dir / f"samples_{split}_r{k}.jsonl").is_file():
        files.append(task_dir / f"samples_{split}_r{k}.jsonl")
        k += 1
    return files


def shipped_samples(split: str, task_dir: Path = TASK_DIR) -> dict[str, list[dict]]:
    """Every shipped sample of a split, by prompt, over all rounds (:func:`sample_files`).

    :return: ``{prompt: [row, ...]}`` in the files' prompt order; a row holds
        ``response``, ``score`` (VADER) and, once judged, ``relevance`` and ``nll``
    """
    by_prompt: dict[str, list[dict]] = {}
    for path in sample_files(split, task_dir):
        for row in read_jsonl(path):
            by_prompt.setdefault(row["prompt"], []).append(row)
    return by_prompt


def task_pairs(split: str, task_dir: Path = TASK_DIR):
    """The default task's preference pairs of a split (``pairs_{split}.jsonl``)."""
    from rlhf_env.data import load_preferences

    return load_preferences(task_dir / f"pairs_{split}.jsonl")


def handwritten_pairs(kind: str | None = None, task_dir: Path = TASK_DIR):
    """The hand-written pairs (``handwritten.jsonl``), all or those testing ``kind``
    (``"tone"``, ``"relevance"``, ``"correctness"``)."""
    from rlhf_env.data import as_pairs

    rows = read_jsonl(task_dir / "handwritten.jsonl")
    return as_pairs([r for r in rows if kind is None or r.get("kind", "tone") == kind])
