"""``rlhf-env plot``: learning curves from TensorBoard logs."""

from __future__ import annotations

import argparse
import os
import tempfile


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw learning curves from TensorBoard logs",
        description="Draw one curve per run directory found under LOGDIR (any depth) for a scalar tag.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("logdir", help="TensorBoard root (e.g. the --tensorboard-log of rlhf-env train)")
    p.add_argument("--out", default="curve.png", help="image to write (.png, .pdf, .svg)")
    p.add_argument("--tag", default="rollout/ep_rew_mean", help="scalar tag to plot")
    p.add_argument("--title", default=None, help="figure title (default: the tag)")
    p.set_defaults(func=run)


def read_curves(logdir: str, tag: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{run name: (steps, values)}`` for every directory under ``logdir`` with event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise FileNotFoundError(f"no log directory {logdir!r}")
    curves = {}
    for root, _, files in sorted(os.walk(logdir)):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            curves[os.path.relpath(root, logdir)] = ([e.step for e in events], [e.value for e in events])
    if not curves:
        raise ValueError(f"no TensorBoard run under {logdir!r} has the scalar {tag!r}")
    return curves


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(args.logdir, args.tag)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("timesteps")
    ax.set_ylabel(args.tag)
    ax.set_title(args.title or args.tag)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    suffix = os.path.splitext(out)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(out))
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    print(f"wrote {args.out} ({len(curves)} run(s))")
    return 0
