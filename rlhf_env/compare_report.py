"""The report of :func:`rlhf_env.compare.run_comparison`: the Markdown tables and samples,
the reward/tone-vs-KL frontier plot, writing them to a folder, and merging runs of
different methods made with the same settings."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Sequence

from rlhf_env.agents.atomic import atomic_file, write_text


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def format_tables(result: dict) -> str:
    """The comparison as Markdown: the judges per method (final checkpoint) against the
    reference, then the default task's pass rule, bound by bound. A judge a result was
    written without (``negative_share`` before it was kept) shows as "—"."""
    ref = result["reference"]
    lines = [
        "| method | training CPU s | updates | reward-model score | win rate vs ref | KL/response (nats) | tone (VADER) | "
        "VADER-negative share | relevance | fluency NLL | distinct-2 | top 3-gram share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| reference ({result['settings']['model']}) | - | - | {_fmt(ref['reward'])} | 0.500 | 0.00 | {_fmt(ref['tone'])} | "
        f"{_fmt(ref.get('negative_share'), 2)} | {_fmt(ref['relevance'])} | {_fmt(ref['fluency_nll'], 2)} | {_fmt(ref['distinct_2'])} | "
        f"{_fmt(ref['top_3gram_share'], 2)} |",
    ]
    for name, m in result["methods"].items():
        f = m["final"]
        lines.append(
            f"| {name} | {f['cpu_seconds']:.0f} | {f['updates']} | {_fmt(f['reward'])} | {_fmt(f['win_rate'])} | {_fmt(f['kl'], 2)} | "
            f"{_fmt(f['tone'])} | {_fmt(f.get('negative_share'), 2)} | {_fmt(f['relevance'])} | {_fmt(f['fluency_nll'], 2)} | "
            f"{_fmt(f['distinct_2'])} | {_fmt(f['top_3gram_share'], 2)} |")
    names = {"tone_gain": "tone gain", "relevance_change": "relevance change", "distinct_2_change": "distinct-2 change",
             "top_3gram_share": "top 3-gram share", "kl": "KL"}
    first = next(iter(result["methods"].values()))["final"]["pass_rule"]["checks"]
    lines += ["", "| method | " + " | ".join(f"{names[k]} ({c['target']})" for k, c in first.items()) + " | all |",
              "|---|" + "---|" * (len(first) + 1)]
    for name, m in result["methods"].items():
        rule = m["final"]["pass_rule"]
        cells = [f"{c['value']:+.3f} {'PASS' if c['ok'] else 'FAIL'}" for c in rule["checks"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'PASS' if rule['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def format_samples(result: dict) -> str:
    """The side-by-side samples: each held-out prompt, the reference's response and each method's."""
    methods = result["methods"]
    first = next(iter(methods.values()))
    out = []
    for i, row in enumerate(first["samples"]):
        out.append(f"**prompt:** {row['prompt']}\n")
        out.append(f"- reference ({row['reference_score']:+.2f}): {row['reference']!r}")
        for name, m in methods.items():
            if i < len(m["samples"]) and m["samples"][i]["prompt"] == row["prompt"]:
                s = m["samples"][i]
                out.append(f"- {name} ({s['policy_score']:+.2f}): {s['policy']!r}")
        out.append("")
    return "\n".join(out)


def plot_frontier(result: dict, path: str | os.PathLike) -> pathlib.Path:
    """Reward-model score and tone against the KL per response, one curve per method from the
    reference (KL 0) through its checkpoints; the pass rule's KL bound dashed. PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = result["reference"]
    max_kl = result["targets"]["max_kl"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "reward", "reward-model score (held-out mean)"), (axes[1], "tone", "tone (VADER mean)")):
        ax.scatter([0.0], [ref[key]], color="black", zorder=3, label="reference")
        for name, m in result["methods"].items():
            xs = [0.0] + [p["kl"] for p in m["checkpoints"]]
            ys = [ref[key]] + [p[key] for p in m["checkpoints"]]
            ax.plot(xs, ys, marker="o", label=name)
        ax.axvline(max_kl, color="gray", linestyle="--", linewidth=1, label=f"KL bound ({max_kl:g} nats)")
        ax.set_xlabel("KL to the reference per response (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(ref["tone"] + result["targets"]["min_tone_gain"], color="gray", linestyle=":", linewidth=1,
                    label=f"tone target (+{result['targets']['min_tone_gain']:g})")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{s['model']}, {s['seconds']:.0f} CPU s of training per method, {s['eval_prompts']} held-out prompts x "
                 f"{s['eval_samples']}", fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return path


def write_outputs(result: dict, out: str | os.PathLike) -> None:
    """Write ``compare.json``, ``compare.md`` (tables and samples) and ``frontier.png`` of a result."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare.json", json.dumps(result, indent=2))
    write_text(out / "compare.md", f"# {', '.join(result['methods'])} on the default task\n\n{format_tables(result)}\n\n"
                                   f"## Samples\n\n{format_samples(result)}\n")
    plot_frontier(result, out / "frontier.png")


def merge_results(results: Sequence[dict]) -> dict[str, Any]:
    """One comparison from runs of different methods made with the same settings (model,
    reward, budget, seed, held-out prompts and sampling): their methods side by side.

    :raises ValueError: when the settings or the reference columns differ (the runs would
        not be judged against the same reference responses), or a method appears twice
    """
    if not results:
        raise ValueError("nothing to merge")
    same = ("model", "reward", "seconds", "seed", "eval_prompts", "eval_samples", "max_new_tokens", "checkpoints")
    first = results[0]
    merged = json.loads(json.dumps(first))
    merged["methods"], merged["runs"] = {}, []
    for r in results:
        diff = {k: (first["settings"].get(k), r["settings"].get(k)) for k in same if first["settings"].get(k) != r["settings"].get(k)}
        if diff:
            raise ValueError(f"runs made with different settings cannot be merged: {diff}")
        if r["reference"] != first["reference"]:
            raise ValueError("the runs judged different reference responses (same settings, another model or reward version?)")
        for name, m in r["methods"].items():
            if name in merged["methods"]:
                raise ValueError(f"method {name!r} is in more than one run")
            merged["methods"][name] = m
        merged["runs"].append({"methods": list(r["methods"]), "settings": r["settings"]})
    from rlhf_env.compare import METHODS

    order = {name: i for i, name in enumerate(METHODS)}
    merged["methods"] = dict(sorted(merged["methods"].items(), key=lambda kv: order.get(kv[0], len(order))))
    merged["settings"]["methods"] = list(merged["methods"])
    return merged
