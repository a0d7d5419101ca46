"""The commands the documentation shows name flags that exist: every ``rlhf-env COMMAND ...
--flag`` and ``python -m benchmarks.NAME ... --flag`` in README.md, docs/*.md and the
docstrings is checked against the command's own parser (an abbreviation that argparse
happens to accept, such as ``--out`` for ``--output``, counts as stale). The Python snippets
are run by tests/test_readme.py."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rlhf_env.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted(p for d in ("agents", "envs", "rlhf_env", "benchmarks", "examples") for p in (ROOT / d).rglob("*.py"))]
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def _texts():
    for path in DOCS:
        # a shell line continued with a backslash is one command
        yield path.relative_to(ROOT), re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))


def _options(parser: argparse.ArgumentParser) -> set[str]:
    out = {"-h", "--help"}
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_documented_cli_flags_exist():
    commands = _commands(build_parser())
    stale = []
    for path, text in _texts():
        # in Python source a command ends with its string literal
        end = '`\n|;)&"' if path.suffix == ".py" else "`\n|;)&"
        for m in re.finditer(rf"rlhf-env ([a-z][a-z-]*)([^{end}]*)", text):
            name, rest = m.groups()
            if name not in commands:
                continue  # prose ("rlhf-env is ...")
            known = _options(commands[name])
            stale += [f"{path}: rlhf-env {name} {flag}" for flag in FLAG.findall(rest) if flag not in known]
    assert not stale, stale


def test_documented_benchmark_flags_exist():
    flags = {p.stem: set(re.findall(r"add_argument\(\s*\"(--?[\w-]+)\"(?:,\s*\"(--?[\w-]+)\")?", p.read_text()))
             for p in (ROOT / "benchmarks").glob("*.py")}
    flags = {name: {f for pair in found for f in pair if f} | {"-h", "--help"} for name, found in flags.items()}
    stale, seen = [], 0
    for path, text in _texts():
        for m in re.finditer(r"python -m benchmarks\.(\w+)([^`\n|;)]*)", text):
            name, rest = m.groups()
            seen += 1
            if name not in flags:
                stale.append(f"{path}: no benchmarks/{name}.py")
                continue
            stale += [f"{path}: benchmarks.{name} {flag}" for flag in FLAG.findall(rest) if flag not in flags[name]]
    assert seen > 20 and not stale, stale


def test_rlhf_env_bench_reaches_every_benchmark_script(monkeypatch):
    """Every benchmarks/*.py with a main() is a name of `rlhf-env bench` (README's table cites
    rlvr and alignment, which the command used to refuse), and a script whose main() reads
    sys.argv gets the arguments after the name."""
    import sys

    from rlhf_env.cli import bench

    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if re.search(r"^def main\(", p.read_text(), re.M)}
    assert scripts == {module.split(".")[1] for module, _ in bench.BENCHMARKS.values()}

    seen = {}

    class Script:
        @staticmethod
        def main():
            seen["argv"] = list(sys.argv)

    monkeypatch.setattr(bench.importlib, "import_module", lambda name: Script)
    args = bench.argparse.Namespace(name="alignment", args=["--threads", "1"])
    assert bench.run(args) == 0 and seen["argv"] == ["benchmarks.alignment", "--threads", "1"]
