"""Soak test: long runs must not leak memory, file descriptors or speed.

Two phases in one process:

1. ``TextRLHF-tiny-v0`` through the batched env (``gym.make_vec``, KV caches, reference
   and reward model on every episode): 5,000 episodes of random tokens.
2. ``agents.PPO`` on CartPole-v1 for 1,000,000 steps (rl-zoo3's settings: 8 envs, n_steps 32,
   batch 256, 20 epochs), with Stable-Baselines3's PPO on the same settings for a shorter
   window in the same run, for the throughput ratio.

For each phase it prints the resident memory (RSS) after a warm-up and at the end, their
growth (target: < 5%), open file descriptors at both points, and the throughput of the
first and the last tenth of the run. Exit status 1 when a target is missed.

    python -m benchmarks.soak            # the full run (about 10 minutes on 2 busy cores)
    python -m benchmarks.soak --quick    # 500 episodes and 100k steps
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

RSS_TARGET = 0.05


def rss_mb() -> float:
    """Resident set size of this process in MiB (from /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak, a weaker check
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_fds() -> int:
    """Open file descriptors of this process (-1 where /proc is missing)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return len(os.listdir(folder))
    return -1


def settle() -> float:
    gc.collect()
    return rss_mb()


class Report:
    def __init__(self, name: str, unit: str):
        self.name, self.unit = name, unit
        self.samples: list[tuple[float, float, float]] = []  # (work done, wall time, process CPU time)

    def add(self, done: float) -> None:
        self.samples.append((done, time.perf_counter(), time.process_time()))

    def rate(self, lo: float, hi: float, cpu: bool = False) -> float:
        """Throughput between the samples nearest to fractions ``lo`` and ``hi`` of the work,
        per wall-clock second, or per second of this process's CPU time (``cpu``), which
        other processes on a busy machine disturb much less."""
        total = self.samples[-1][0]
        pick = lambda f: min(self.samples, key=lambda s: abs(s[0] - f * total))  # noqa: E731
        a, b = pick(lo), pick(hi)
        k = 2 if cpu else 1
        return (b[0] - a[0]) / max(b[k] - a[k], 1e-9)


def print_phase(name: str, rss0: float, rss1: float, fds0: int, fds1: int, report: Report, unit: str) -> bool:
    start_rate, end_rate = report.rate(0.0, 0.1), report.rate(0.9, 1.0)
    start_cpu, end_cpu = report.rate(0.0, 0.1, cpu=True), report.rate(0.9, 1.0, cpu=True)
    growth = (rss1 - rss0) / rss0
    ok = growth < RSS_TARGET and fds1 <= fds0
    print(f"[{name}] RSS after warm-up {rss0:.1f} MiB, at the end {rss1:.1f} MiB: growth {100 * growth:+.2f}% (target < {100 * RSS_TARGET:.0f}%)")
    print(f"[{name}] open file descriptors: {fds0} after warm-up, {fds1} at the end")
    print(f"[{name}] throughput: first tenth {start_rate:,.1f} {unit}, last tenth {end_rate:,.1f} {unit} (end/start {end_rate / start_rate:.2f})")
    print(f"[{name}] per CPU-second of this process: first tenth {start_cpu:,.1f}, last tenth {end_cpu:,.1f} (end/start {end_cpu / start_cpu:.2f})")
    print(f"[{name}] {'PASS' if ok else 'FAIL'}")
    return ok


def text_phase(episodes: int, num_envs: int, max_new_tokens: int, seed: int) -> bool:
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)

    env = gym.make_vec("TextRLHF-tiny-v0", num_envs=num_envs, max_new_tokens=max_new_tokens)
    rng = np.random.default_rng(seed)
    n_actions = env.single_action_space.n
    env.reset(seed=seed)
    warmup = max(num_envs * 4, episodes // 20)
    report = Report("text", "episodes/s")
    done_episodes, rss0, fds0 = 0, None, None
    scores = []
    t_start = time.perf_counter()
    while done_episodes < warmup + episodes:
        _, _, terminated, truncated, info = env.step(rng.integers(0, n_actions, size=num_envs))
        finished = terminated | truncated
        if finished.any():
            done_episodes += int(finished.sum())
            if "score" in info:
                scores.extend(np.asarray(info["score"])[finished].tolist())
            if rss0 is None and done_episodes >= warmup:
                rss0, fds0 = settle(), open_fds()
                base = done_episodes
            if rss0 is not None:
                report.add(done_episodes - base)
    rss1, fds1 = settle(), open_fds()
    env.close()
    elapsed = time.perf_counter() - t_start
    print(f"[text] {done_episodes} episodes (warm-up {warmup}) of TextRLHF-tiny-v0, {num_envs} batched envs, "
          f"{max_new_tokens} new tokens max, {elapsed:.0f} s; mean score {np.mean(scores) if scores else float('nan'):.3f}")
    return print_phase("text", rss0, rss1, fds0, fds1, report, "episodes/s")


ZOO = dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=1e-3, clip_range=0.2)


def cartpole_phase(steps: int, peer_steps: int, seed: int) -> bool:
    from agents import PPO
    from agents.callbacks import BaseCallback

    warmup = max(steps // 20, 8 * 32 * 4)

    class Sample(BaseCallback):
        def __init__(self):
            super().__init__()
            self.report = Report("cartpole", "steps/s")
            self.rss0 = self.fds0 = None

        def _on_rollout_end(self) -> None:
            n = self.model.num_timesteps
            if self.rss0 is None and n >= warmup:
                self.rss0, self.fds0, self.base = settle(), open_fds(), n
            if self.rss0 is not None:
                self.report.add(n - self.base)

        def _on_step(self) -> bool:
            return True

    sample = Sample()
    model = PPO("MlpPolicy", "CartPole-v1", n_envs=8, seed=seed, **ZOO)
    t0 = time.perf_counter()
    model.learn(warmup + steps, callback=sample)
    ours_time = time.perf_counter() - t0
    rss1, fds1 = settle(), open_fds()
    ep_rew = np.mean([ep["r"] for ep in model.ep_info_buffer]) if model.ep_info_buffer else float("nan")
    print(f"[cartpole] agents.PPO: {model.num_timesteps:,} steps in {ours_time:.0f} s, last ep_rew_mean {ep_rew:.1f}")
    ok = print_phase("cartpole", sample.rss0, rss1, sample.fds0, fds1, sample.report, "steps/s")
    if peer_steps:
        try:
            from stable_baselines3 import PPO as SB3PPO
            from stable_baselines3.common.env_util import make_vec_env
        except ImportError:
            print("[cartpole] stable-baselines3 not installed: no peer ratio")
            return ok
        ours_rate = sample.report.rate(0.9, 1.0)
        peer = SB3PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=seed), seed=seed, device="cpu", **ZOO)
        t0 = time.perf_counter()
        peer.learn(peer_steps)
        peer_rate = peer.num_timesteps / (time.perf_counter() - t0)
        print(f"[cartpole] peer stable_baselines3.PPO, same settings, {peer.num_timesteps:,} steps: {peer_rate:,.0f} steps/s; "
              f"agents.PPO at the end of the soak / SB3: {ours_rate / peer_rate:.2f}x")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 text episodes and 100k CartPole steps")
    parser.add_argument("--episodes", type=int, default=None, help="text episodes after the warm-up (default 5000; --quick 500)")
    parser.add_argument("--steps", type=int, default=None, help="CartPole PPO steps after the warm-up (default 1,000,000; --quick 100,000)")
    parser.add_argument("--num-envs", type=int, default=16, help="batched text envs")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="response length limit of the text env")
    parser.add_argument("--peer-steps", type=int, default=None, help="SB3 PPO steps for the throughput ratio (0: skip; default 100k, --quick 50k)")
    parser.add_argument("--skip-text", action="store_true", help="only the CartPole phase")
    parser.add_argument("--skip-cartpole", action="store_true", help="only the text phase")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these small models on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up when piped to a file
    import torch

    torch.set_num_threads(args.threads)
    episodes = args.episodes if args.episodes is not None else (500 if args.quick else 5000)
    steps = args.steps if args.steps is not None else (100_000 if args.quick else 1_000_000)
    peer_steps = args.peer_steps if args.peer_steps is not None else (50_000 if args.quick else 100_000)
    print(f"soak: python {sys.version.split()[0]}, pid {os.getpid()}, RSS at start {rss_mb():.1f} MiB, {open_fds()} open fds")
    ok = True
    if not args.skip_text:
        ok &= text_phase(episodes, args.num_envs, args.max_new_tokens, args.seed)
    if not args.skip_cartpole:
        ok &= cartpole_phase(steps, peer_steps, args.seed)
    print("soak:", "all targets met" if ok else "a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
