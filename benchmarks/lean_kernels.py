"""What the lean clipping and Adam step of agents.fast_kernels save over public torch.

    python -m benchmarks.lean_kernels --steps 16000 --repeats 3

``agents.fast_kernels.clip_grad_norm`` / ``optimizer_step`` go through
:func:`agents.fast_kernels.lean_clip_grad_norm` / :func:`~agents.fast_kernels.lean_adam_step`
(private foreach and fused-Adam kernels, guarded) and fall back to
``torch.nn.utils.clip_grad_norm_`` / ``optimizer.step()``. This runs the paths that use them,
PPO's autograd path (``fused_update=False``) and A2C on CartPole-v1 with 8 envs, with the lean
versions and with the public ones forced, alternating, and prints the ratio of the smallest CPU
times of ``learn`` (public / lean). One torch thread.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import agents.fast_kernels as base
    from agents import A2C, PPO

    lean = (base.lean_clip_grad_norm, base.lean_adam_step)
    public = (lambda params, max_norm: None, lambda optimizer: False)  # "not applicable": torch's functions
    makers = {
        "ppo-autograd": lambda: PPO("MlpPolicy", "CartPole-v1", n_envs=8, n_steps=32, batch_size=256, n_epochs=20,
                                    learning_rate=1e-3, fused_update=False, seed=0),
        "a2c": lambda: A2C("MlpPolicy", "CartPole-v1", n_envs=8, seed=0),
    }
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.repeats):
            for which, functions in (("lean", lean), ("public", public)):
                base.lean_clip_grad_norm, base.lean_adam_step = functions
                for name, make in makers.items():
                    model = make()
                    start = time.process_time()
                    model.learn(args.steps)
                    times.setdefault((name, which), []).append(time.process_time() - start)
    finally:
        base.lean_clip_grad_norm, base.lean_adam_step = lean
    print(f"CPU seconds of learn({args.steps}), CartPole-v1, 8 envs, torch threads 1, min of {args.repeats}")
    print("| path | lean | public | public / lean |")
    print("|---|---|---|---|")
    for name in makers:
        a, b = min(times[(name, "lean")]), min(times[(name, "public")])
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
