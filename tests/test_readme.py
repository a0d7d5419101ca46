"""Every Python snippet of README.md and docs/*.md runs as written, from a folder other than
the repository root (a user's own folder), on the tiny model and a small budget: the only edits are
``SmolLM2 -> tiny`` (``"TextRLHF-v0"``, ``"smollm2-135m"``, the MiniLM reward-model backbone)
and the number of training steps. A snippet that goes stale (a renamed argument, a moved
import, a file found only from the repository root) fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
# docs snippets that are templates, not programs: a placeholder (BASE, runs/my_policy) or a call signature
FRAGMENTS = {("export.md", 2), ("tasks.md", 1), ("alignment.md", 0)}
DOC_BLOCKS = {f"{path.name}[{i}]": code for path in sorted((ROOT / "docs").glob("*.md"))
              for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S))
              if (path.name, i) not in FRAGMENTS}
SMALL = [
    (r"\.learn\([^()]*(\([^()]*\))?[^()]*\)", ".learn(64)"),  # any budget, one call's worth
    (r'"TextRLHF-v0"', '"TextRLHF-tiny-v0"'),
    (r'"smollm2-135m"', '"tiny"'),
    (r'backbone="all-minilm-l6-v2"', 'backbone="tiny"'),
    (r'gym\.make_vec\("ReasoningGym-v0", num_envs=\d+, ', 'gym.make_vec("ReasoningGym-v0", model="tiny", num_envs=8, '),
    (r'"train_layers": 4', '"train_layers": 1'),
    (r"evaluate_task\(agent, task\)", "evaluate_task(agent, task, limit=8, num_samples=2)"),
]


def small(code: str) -> str:
    for pattern, repl in SMALL:
        code = re.sub(pattern, repl, code)
    return code


def test_the_readme_has_snippets():
    assert len(BLOCKS) >= 5


def _run(code: str, tmp_path: Path) -> None:
    code = small(code)
    # the snippet runs on the tiny model: a README edit the substitutions miss fails here, not by a slow run
    assert '"smollm2-135m"' not in code and '"TextRLHF-v0"' not in code, code
    assert "ReasoningGym-v0" not in code or 'model="tiny"' in code, code
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"snippet failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs_from_another_folder(index, tmp_path):
    _run(BLOCKS[index], tmp_path)


@pytest.mark.parametrize("name", list(DOC_BLOCKS))
def test_docs_snippet_runs_from_another_folder(name, tmp_path):
    _run(DOC_BLOCKS[name], tmp_path)
