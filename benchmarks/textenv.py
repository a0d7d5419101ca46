"""Speed of a TextRLHF rollout against the least work a hand-written pipeline needs.

Three ways to produce the same per-token rewards (``-kl_coef * (log pi - log pi_ref)`` plus
the response's score at the last token), run in the same process, on the same prompts, with
the same thread count, and printed as ratios:

* ``env``: ``gym.make_vec("TextRLHF-v0", num_envs=B)``; every step the acting policy reads
  the actor's next-token logits the way ``LMActorCriticPolicy`` does (``core.actor_features``,
  a lookup in the env's step cache), samples a token, and the env pays one incremental actor
  forward, one incremental reference forward (KV caches) and the KL. The actor is set up
  as the LM policy sets it up for training: ``--train-layers K`` (default 2) leaves
  ``requires_grad`` only on its top K blocks and final norm
  (``LMActorCriticPolicy(train_layers=K)``), so with ``reference_share="auto"`` (the env's
  default) the reference runs only its top K blocks, norm and head on the actor's hidden
  state (exact, see ``envs/reference.py``). ``env-full`` is the same env with
  ``reference_share="off"`` (a full reference forward each step); ``--reference-share``
  picks which of the two run (default both).
* ``generate+ref``: Hugging Face ``generate`` on the actor (sampling, KV cache; a logits
  processor keeps the log-probability of each sampled token) plus ONE full forward of the
  reference over prompt + response, the KL and the score: the least a hand-written pipeline
  does for the same rewards.
* ``naive``: a loop without KV cache: each token a full forward of the actor and of the
  reference over the whole context.

By default EOS is suppressed in all three (``generate``'s ``min_new_tokens``; the env's
sampler masks EOS), so every contender writes exactly ``B x T`` tokens and tokens/s compare
like for like; ``--allow-eos`` lets responses end early (then the env autoresets rows).

Peak memory: process peak RSS while each contender runs (Linux ``VmHWM``, reset before each
run; the process holds every contender's models, so it is an upper bound), and, unless
``--no-rss``, the peak RSS of a FRESH process that builds ``TextRLHF-v0`` with 8 envs (or each
``--models`` entry) and rolls out 64 tokens: the memory a user sees.

Examples::

    python -m benchmarks.textenv --quick
    python -m benchmarks.textenv --models tiny --batch 8 --new-tokens 32
    python -m benchmarks.textenv --models smollm2-135m --batch 8 32 --new-tokens 32 64 --threads 1
    python -m benchmarks.textenv --models tiny smollm2-135m --batch 8 32 --train-layers all --reference-share off
    python -m benchmarks.textenv --models smollm2-135m --batch 8 --new-tokens 32 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from agents.atomic import write_text
from benchmarks.textenv_peers import KL_COEF, run_generate_ref, run_naive
from rlhf_env.cli._common import block_count


@dataclass
class Result:
    model: str
    batch: int
    new_tokens: int
    contender: str
    tokens: int
    seconds: float
    peak_rss_mb: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------------------------- memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- inputs


def pick_prompts(batch: int, seed: int = 0) -> list[str]:
    """``batch`` prompts of the shipped default task, drawn reproducibly."""
    from rlhf_env.prompts import load_prompts

    prompts = load_prompts()
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.choice(len(prompts), size=batch, replace=len(prompts) < batch)]


# ---------------------------------------------------------------------------------- contenders


def run_env(env, prompts: list[str], new_tokens: int, allow_eos: bool, generator: torch.Generator) -> int:
    """Roll the vector env for ``new_tokens`` steps from ``prompts``; returns tokens written."""
    core = env.unwrapped.core
    eos = sorted(core.eos_ids)
    obs, _ = env.reset(options={"prompt": list(prompts)})
    tokens = 0
    for _ in range(new_tokens):
        with torch.no_grad():
            input_ids = torch.as_tensor(obs["input_ids"], device=core.device)
            mask = torch.as_tensor(obs["attention_mask"], device=core.device)
            _, logits = core.actor_features(input_ids, mask)  # what LMActorCriticPolicy does
            logits = core.log_probs(logits)
            if not allow_eos:
                logits[:, eos] = -float("inf")
            actions = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        obs, _, terminated, _, info = env.step(actions.cpu().numpy())
        tokens += int(info["_logprob"].sum()) if "_logprob" in info else 0
    if not allow_eos and new_tokens == env.unwrapped.max_new_tokens:
        assert terminated.all(), "every row should have written exactly new_tokens tokens"
    return tokens


def timed(fn: Callable[[], int], device: torch.device) -> tuple[int, float, float]:
    _reset_peak_rss()
    _sync(device)
    start = time.perf_counter()
    tokens = fn()
    _sync(device)
    return tokens, time.perf_counter() - start, peak_rss_mb()


# ---------------------------------------------------------------------------------- driver


def bench_model(name: str, args, results: list[Result]) -> None:
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)
    from rlhf_env.models import load_lm
    from rlhf_env.rewards import resolve_reward

    from envs.decoder import decoder_blocks, set_trainable

    device = torch.device(args.device)
    actor, tokenizer = load_lm(name, device=args.device, dtype=args.dtype)
    reference, _ = load_lm(name, device=args.device, dtype=args.dtype)
    reward = resolve_reward(args.reward)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for batch in args.batch:
        prompts = pick_prompts(batch, args.seed)
        for new_tokens in args.new_tokens:
            # the envs share their actor/reference with every env of the same spec in this process
            envs = {
                label: gym.make_vec(
                    "TextRLHF-v0",
                    num_envs=batch,
                    model=name,
                    reward_model=reward,
                    max_new_tokens=new_tokens,
                    max_prompt_tokens=96,
                    kl_coef=KL_COEF,
                    device=args.device,
                    dtype=args.dtype,
                    reference_share=share,
                )
                for label, share in (("env", "auto"), ("env-full", "off"))
                if args.reference_share in ("both", share)
            }
            # the actor as LMActorCriticPolicy(train_layers=K) leaves it
            core = next(iter(envs.values())).unwrapped.core
            set_trainable(core.actor, args.train_layers)
            contenders: dict[str, Callable[[], int]] = {
                label: (lambda e=e: run_env(e, prompts, new_tokens, args.allow_eos, generator)) for label, e in envs.items()
            }
            contenders["generate+ref"] = lambda: run_generate_ref(
                actor, reference, tokenizer, reward, prompts, new_tokens, args.allow_eos, device
            )
            if batch <= args.naive_max_batch.get(name, 32):
                contenders["naive"] = lambda: run_naive(
                    actor, reference, tokenizer, reward, prompts, new_tokens, args.allow_eos, device, generator
                )
            # warm-up (2 tokens each): first calls pay allocator growth and lazy initialisation
            for e in envs.values():
                run_env(e, prompts, 2, True, generator)
            run_generate_ref(actor, reference, tokenizer, reward, prompts, 2, True, device)
            if "naive" in contenders:
                run_naive(actor, reference, tokenizer, reward, prompts, 2, True, device, generator)
            best: dict[str, Result] = {}
            for _ in range(args.repeats):  # interleaved, so load changes hit every contender alike
                for label, fn in contenders.items():
                    gc.collect()  # outside the timed region
                    if args.profile and label in envs:
                        profiler = cProfile.Profile()
                        profiler.enable()
                    tokens, seconds, rss = timed(fn, device)
                    if args.profile and label in envs:
                        profiler.disable()
                        _print_profile(profiler, f"{label}, {name} batch={batch} T={new_tokens}")
                    res = Result(name, batch, new_tokens, label, tokens, seconds, rss)
                    if label not in best or res.tokens_per_s > best[label].tokens_per_s:
                        best[label] = res
            for res in best.values():
                results.append(res)
                shared = ""
                if res.contender in envs:
                    blocks = len(decoder_blocks(core.actor))
                    shared = f" reference shares {envs[res.contender].unwrapped.contexts.shared_blocks}/{blocks} blocks"
                print(
                    f"  {name:13s} B={batch:<3d} T={new_tokens:<3d} {res.contender:13s} "
                    f"{res.tokens:6d} tok {res.seconds:8.2f} s {res.tokens_per_s:9.1f} tok/s "
                    f"peak RSS {res.peak_rss_mb:7.0f} MiB{shared}",
                    flush=True,
                )
            del envs
            gc.collect()


def _print_profile(profiler: cProfile.Profile, title: str) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(20)
    print(f"\n--- profile of the env rollout, {title} (sorted by own time) ---")
    print("\n".join(stream.getvalue().splitlines()[:45]))
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(25)
    print(f"--- same, by cumulative time ---")
    print("\n".join(stream.getvalue().splitlines()[:50]))


def print_tables(results: list[Result]) -> None:
    print(
        "\n| model | batch | new tokens | env tok/s | env-full tok/s | generate+ref tok/s | naive tok/s "
        "| env / (generate+ref) | env-full / (generate+ref) | env / naive | peak RSS env / gen / naive (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r.model, r.batch, r.new_tokens) for r in results}, key=lambda k: (k[0] != "tiny", k[0], k[1], k[2]))
    for key in keys:
        row = {r.contender: r for r in results if (r.model, r.batch, r.new_tokens) == key}
        env, full, gen, naive = row.get("env"), row.get("env-full"), row.get("generate+ref"), row.get("naive")

        def tps(r):
            return f"{r.tokens_per_s:.1f}" if r else "-"

        def ratio(a, b):
            return f"{a.tokens_per_s / b.tokens_per_s:.2f}x" if a and b else "-"

        rss = " / ".join(f"{r.peak_rss_mb:.0f}" if r else "-" for r in (env or full, gen, naive))
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {tps(env)} | {tps(full)} | {tps(gen)} | {tps(naive)} "
            f"| {ratio(env, gen)} | {ratio(full, gen)} | {ratio(env or full, naive)} | {rss} |"
        )


# ---------------------------------------------------------------------------------- fresh-process RSS


def rss_child(model: str, num_envs: int, new_tokens: int, threads: int | None, train_layers: int | None = None) -> None:
    """Build ``TextRLHF-v0`` with ``num_envs`` envs in this (fresh) process, roll it out, print RSS."""
    if threads:
        torch.set_num_threads(threads)
    import gymnasium as gym

    import rlhf_env  # noqa: F401
    from agents.policies.lm import set_trainable

    env = gym.make_vec("TextRLHF-v0", num_envs=num_envs, model=model, max_new_tokens=new_tokens, max_prompt_tokens=96)
    set_trainable(env.unwrapped.core.actor, train_layers)
    generator = torch.Generator().manual_seed(0)
    run_env(env, pick_prompts(num_envs), new_tokens, allow_eos=False, generator=generator)
    print(json.dumps({"model": model, "num_envs": num_envs, "new_tokens": new_tokens, "peak_rss_mb": peak_rss_mb()}))


def fresh_process_rss(
    model: str, num_envs: int, new_tokens: int, threads: int | None, train_layers: int | None = None
) -> float | None:
    cmd = [sys.executable, "-m", "benchmarks.textenv", "--rss-child", model, str(num_envs), str(new_tokens)]
    cmd += ["--train-layers", "all" if train_layers is None else str(train_layers)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_rss_mb"]
    print(f"  fresh-process RSS run failed for {model}:\n{out.stderr[-2000:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.textenv",
        description="Tokens/s of the batched TextRLHF env vs generate + reference forward vs a no-cache loop.",
    )
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], help="shipped model names or local model directories")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32], help="batch sizes (number of envs)")
    p.add_argument("--new-tokens", nargs="+", type=int, default=[32, 64], help="response lengths")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per contender (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--reward", default="sentiment", help="reward spec for all contenders (default: VADER)")
    p.add_argument(
        "--train-layers",
        type=block_count(0),
        default=2,
        help="configure the env's actor as LMActorCriticPolicy(train_layers=K) does: requires_grad only on its top K "
        "blocks and final norm (default 2); 'all' leaves every weight trainable (no shared reference trunk)",
    )
    p.add_argument(
        "--reference-share",
        choices=["auto", "off", "both"],
        default="both",
        help="which env runs: 'auto' (contender 'env': the reference runs only the blocks above the actor's frozen "
        "trunk), 'off' (contender 'env-full': full reference forward each step) or both (default)",
    )
    p.add_argument("--allow-eos", action="store_true", help="let responses end at EOS (default: exactly T tokens each)")
    p.add_argument(
        "--naive-max-batch",
        default="tiny=32,smollm2-135m=8",
        help="largest batch at which the (slow) no-cache loop runs, per model, e.g. 'tiny=32,smollm2-135m=8'",
    )
    p.add_argument("--quick", action="store_true", help="small grid: batch 8, 32 new tokens, no fresh-process RSS")
    p.add_argument("--profile", action="store_true", help="cProfile the env rollout and print where its time goes")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS check of TextRLHF-v0 with 8 envs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--rss-child", nargs=3, metavar=("MODEL", "ENVS", "TOKENS"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]), args.threads, args.train_layers)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.new_tokens, args.no_rss = [8], [32], True
    naive = {}
    for item in str(args.naive_max_batch).split(","):
        if item.strip():
            key, _, value = item.partition("=")
            naive[key.strip()] = int(value)
    args.naive_max_batch = naive
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {args.dtype or 'float32'}, "
        f"{'EOS allowed' if args.allow_eos else 'fixed length (EOS suppressed)'}, reward {args.reward}, kl_coef {KL_COEF}"
    )
    trainable = "every actor weight trainable" if args.train_layers is None else (
        f"actor trainable in its top {args.train_layers} blocks + final norm only (LMActorCriticPolicy(train_layers={args.train_layers}))"
    )
    print(f"configuration: {trainable}; env runs: reference_share={args.reference_share} "
          "('env' = auto: reference on the actor's frozen trunk when exact; 'env-full' = off: full reference)")
    results: list[Result] = []
    for name in args.models:
        bench_model(name, args, results)
    print_tables(results)
    rss = {}
    if not args.no_rss:
        for name in args.models:
            rss[name] = fresh_process_rss(name, 8, 64, args.threads, args.train_layers)
            if rss[name] is not None:
                print(f"fresh process, TextRLHF-v0 model={name}, 8 envs, 64 new tokens, train_layers={args.train_layers}: "
                      f"peak RSS {rss[name]:.0f} MiB")
    if args.json:
        payload = {
            "config": {"train_layers": args.train_layers, "reference_share": args.reference_share, "threads": torch.get_num_threads()},
            "results": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
            "fresh_rss_mb": rss,
        }
        write_text(args.json, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
