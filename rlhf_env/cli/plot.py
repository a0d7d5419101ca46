"""``rlhf-env plot``: learning curves from TensorBoard logs.

Every directory under LOGDIR (any depth) with event files is a run. Runs are grouped by the
env they trained on (the ``run/env`` text agents log at the start of ``learn``; older runs:
text runs, classic-control runs and offline trainers apart), one figure per group. The x
axis says what the logged step is: env steps (timesteps) for agents, optimizer steps for
the offline trainers (reward model, SFT, DPO). Text runs get the RLHF figure by default:
score, KL per response, and ``kl_coef``, one panel each.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field

from rlhf_env.cli._common import HelpFormatter

TEXT_TAGS = ("rollout/score_mean", "rollout/kl_mean", "train/kl_coef")
CLASSIC_TAGS = ("rollout/ep_rew_mean",)
OFFLINE_TAGS = ("train/loss",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw learning curves from TensorBoard logs",
        description="Draw learning curves of the runs under LOGDIR (any depth): one figure per env "
        "(OUT, or OUT-ENV.png when there are several), one curve per run, one panel per tag.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("logdir", help="TensorBoard root (e.g. the --tensorboard-log of rlhf-env train)")
    p.add_argument("--out", default="curve.png", help="image to write (.png, .pdf, .svg); several envs: OUT-ENV.SUFFIX each")
    p.add_argument("--tag", nargs="+", default=None,
                   help="scalar tag(s) to plot, one panel each (default: rollout/score_mean, rollout/kl_mean and "
                   "train/kl_coef for text runs, rollout/ep_rew_mean for other agents, train/loss for offline trainers)")
    p.add_argument("--runs", nargs="+", default=None, metavar="GLOB",
                   help="only runs whose path under LOGDIR matches one of these globs, e.g. 'PPO_*' 'grpo/*' (default: all)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="exponential moving average weight in [0, 1), as TensorBoard's slider (0: raw values)")
    p.add_argument("--title", default=None, help="figure title (default: the env)")
    p.set_defaults(func=run)


@dataclass
class Run:
    """One run directory: its scalars and what it is."""

    name: str
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    env: str | None = None

    @property
    def is_agent(self) -> bool:  # agents log rollout/ and time/ with env steps as the step
        return any(t.startswith(("rollout/", "time/")) for t in self.scalars)

    @property
    def is_text(self) -> bool:
        return "rollout/score_mean" in self.scalars

    @property
    def group(self) -> str:
        if self.env:
            return self.env
        return "text env" if self.is_text else "agents" if self.is_agent else "offline trainers"


def _text(acc, tag: str) -> str | None:
    try:
        events = acc.Tensors(tag)
    except KeyError:
        return None
    if not events:
        return None
    values = events[0].tensor_proto.string_val
    return values[0].decode("utf-8") if values else None


def read_runs(logdir: str, runs: list[str] | None = None) -> list[Run]:
    """Every run directory under ``logdir`` (optionally only those matching a glob of ``runs``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise FileNotFoundError(f"no log directory {logdir!r}")
    found = []
    for root, _, files in sorted(os.walk(logdir)):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        name = os.path.relpath(root, logdir)
        if runs and not any(fnmatch.fnmatch(name, pattern) for pattern in runs):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        run = Run(name, env=_text(acc, "run/env/text_summary") or _text(acc, "run/env"))
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            run.scalars[tag] = ([e.step for e in events], [e.value for e in events])
        found.append(run)
    if not found:
        where = f" matching {runs}" if runs else ""
        raise ValueError(f"no TensorBoard run{where} under {logdir!r}")
    return found


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"--smooth must be in [0, 1), got {weight}")
    if weight == 0.0:
        return list(values)
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out.append(last / norm)
    return out


def _out_path(out: str, group: str, several: bool) -> str:
    if not several:
        return out
    stem, suffix = os.path.splitext(out)
    return f"{stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', group).strip('_')}{suffix or '.png'}"


def draw(runs: list[Run], tags: list[str], path: str, title: str, weight: float) -> None:
    """One figure of ``runs``, a panel per tag, written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf_env.agents.atomic import atomic_file

    xlabel = "timesteps (env steps)" if all(r.is_agent for r in runs) else (
        "optimizer steps" if not any(r.is_agent for r in runs) else "step")
    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4.2), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {run.name: cycle[i % len(cycle)] for i, run in enumerate(runs)}  # a run keeps its colour in every panel
    for ax, tag in zip(axes[0], tags):
        for run in runs:
            if tag in run.scalars:
                steps, values = run.scalars[tag]
                ax.plot(steps, smooth(values, weight), label=run.name, color=colors[run.name],
                        marker="o" if len(steps) <= 30 else None, markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_file(os.path.abspath(path)) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def run(args) -> int:
    runs = read_runs(args.logdir, args.runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    plans = []
    for group, members in groups.items():
        if args.tag:
            tags = list(args.tag)
        else:
            default = TEXT_TAGS if any(r.is_text for r in members) else CLASSIC_TAGS if members[0].is_agent else OFFLINE_TAGS
            tags = [t for t in default if any(t in r.scalars for r in members)]
        tags = [t for t in tags if any(t in r.scalars for r in members)]
        if tags:
            plans.append((group, members, tags))
    if not plans:
        raise ValueError(f"no run under {args.logdir!r} has the scalar(s) {args.tag or 'to plot'}; "
                         f"they log {sorted({t for r in runs for t in r.scalars})[:12]}")
    for group, members, tags in plans:
        path = _out_path(args.out, group, len(plans) > 1)
        draw(members, tags, path, args.title or group, args.smooth)
        print(f"wrote {path}: {group}, {len(members)} run(s), {', '.join(tags)}")
    return 0
