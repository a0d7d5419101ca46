"""Offline builder of the default task's files: ``python -m rlhf_env.default_task``.

Four steps, each reproducible (fixed seeds, no network):

1. **sample** (``--round R``): 4 responses per prompt (``--round-size``) from the
   starting model (SmolLM2-135M-Instruct, temperature 1, 48 new tokens) into
   ``samples_{split}.jsonl`` (round 0) or ``samples_{split}_r{R}.jsonl``; slow (the
   shipped rounds need not be resampled). ``--system TEXT`` samples under that system
   message instead of the chat template's own (the env's context) and records it in each
   row's ``system``: the shipped round 2 is the model's friendly mode
   (:data:`FRIENDLY_SYSTEM`, 2 per prompt), answers the policy can reach with little KL
   because the same model writes them. ``--policy DIR`` (repeatable) samples the round from
   trained policies instead, recording each one's provenance in the row's ``policy``: the
   shipped round 3 is an online round, 1 answer per prompt from each of two RLOO policies
   trained against ``default-v6`` (``rlhf_env.demo.run_demo(DemoConfig(method="rloo",
   learning_rate=1e-4, seed=S, threads=1))``, S = 0, 1), whose stock openers the
   ``overused`` and ``stock_swap`` pairs of :mod:`.relabel` reject (with
   ``--policy-samples``; the shipped pairs leave the policy round out)::

       python -m rlhf_env.default_task --round 3 --round-size 1 --policy RUN0/policy \
           --policy RUN1/policy --policy-note "..." --batch-size 32 --threads 1
2. **judge** (``--judge``, and by default any sample not yet judged): each sample gets
   its independent judges' scores (:mod:`rlhf_env.judges`): ``score`` (tone, VADER),
   ``relevance`` (MiniLM prompt-response cosine) and ``nll`` (the starting model's
   negative log-likelihood per token, always in the env's context: the chat template's
   system message, whatever message the sample was drawn under). About 13 minutes on one
   CPU thread for the shipped 3,420 samples, written into the samples files so that step 4 is instant.
3. **rank** (with ``--ranked``): each starting-model sample not yet scored gets ``rm``, the
   score of the reward model trained on every pair kind but ``ranked`` (``default-v6``, the
   default reward model: :func:`ranking_model`), for the ``ranked`` pairs (a minute with it
   cached; about 4 more to train it). The shipped samples carry it.
4. **relabel** (the default): ``pairs_{split}.jsonl`` from the judged samples
   (:func:`rlhf_env.default_task.relabel.build_pairs`), without the policy rounds' samples
   unless ``--policy-samples``, and with the ``ranked`` pairs only with ``--ranked``.

``--prompts-only`` rewrites only the prompt files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhf_env.default_task import TASK_DIR, read_jsonl, sample_files
from rlhf_env.default_task.prompts import atomic_write_text, make_prompts, split_prompts, write_prompts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON Lines (UTF-8, one object a line), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def vader_scores(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (:func:`rlhf_env.judges.tone`)."""
    from rlhf_env.judges import tone

    return tone(texts)


# the system message of the shipped friendly round (round 2)
FRIENDLY_SYSTEM = "You are a warm, friendly assistant. Answer the user helpfully, in a kind and positive tone."


def policy_provenance(path: str | Path) -> str:
    """How a trained policy directory was made, in one line, from the ``rlhf_env_training.json``
    that a text agent's ``save()`` writes beside the weights (algorithm, learning rate, seed,
    updates, starting model, env and its reward model); the folder name when there is none."""
    info_file = Path(path) / "rlhf_env_training.json"
    if not info_file.is_file():
        return Path(path).name
    info = json.loads(info_file.read_text(encoding="utf-8"))
    hp = info.get("hyperparameters", {})
    env = info.get("env", {})
    return (f"{info.get('algorithm', '?')} lr {hp.get('learning_rate', '?')} seed {hp.get('seed', '?')}, "
            f"{info.get('n_updates', '?')} updates of {info.get('base_model', '?')} (train_layers {info.get('train_layers', '?')}) "
            f"on {env.get('id', '?')} (reward model: {env.get('reward_model', '?')}, {env.get('max_new_tokens', '?')} new tokens)")


def sample_round(
    r: int, model_name: str = "smollm2-135m", max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0,
    device: str = "cpu", out_dir: Path = TASK_DIR, round_size: int = 4, system: str | None = None,
    policies: list[str] | None = None, policy_note: str | None = None,
) -> dict:
    """Sample round ``r`` for both splits into ``samples_{split}.jsonl`` (``r = 0``) or
    ``samples_{split}_r{r}.jsonl``: ``round_size`` responses per prompt at temperature 1
    (the env's distribution) through :func:`rlhf_env.generation.generate`, seeded train
    ``seed + 2r``, test ``seed + 1 + 2r``. (The shipped rounds 0 and 1 were sampled so by
    the earlier sampler of this module, with the same settings; a resampled round is the
    same distribution, not the same text.)

    :param system: a system message to sample under (recorded in each row's ``system``);
        ``None``: the chat template's own, the env's context
    :param policies: trained policies (Hugging Face directories) to sample from instead of
        ``model_name``: ``round_size`` responses per prompt from each, in turn (policy ``i``
        seeded ``+ 100 i``), each row recording its policy's provenance in ``policy``
        (:func:`policy_provenance`, then ``policy_note``): an online round, answers the
        policy writes once it is trained against a reward model
    :param policy_note: appended to each row's ``policy`` (e.g. the reward model's version
        and the command that trained the policy)
    :return: a summary (counts, mean tone, seconds)
    """
    from rlhf_env.envs.prompt import TEMPLATE_DEFAULT
    from rlhf_env.generation import generate
    from rlhf_env.models import load_lm

    if r < 0:
        raise ValueError(f"round must be >= 0, got {r}")
    train, test = split_prompts(make_prompts())
    samplers = [(model_name, None)] if not policies else [
        (path, policy_provenance(path) + (f"; {policy_note}" if policy_note else "")) for path in policies]
    models = [(load_lm(name, device=device), provenance) for name, provenance in samplers]
    summary: dict = {"round": r}
    for split, prompts, split_seed in (("train", train, seed), ("test", test, seed + 1)):
        t0 = time.time()
        rows = []
        for i, ((model, tokenizer), provenance) in enumerate(models):
            responses = generate(model, tokenizer, prompts, num_samples=round_size, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size * round_size, seed=split_seed + 2 * r + 100 * i,
                                 progress=f"sampling {split}" + (f" from policy {i}" if provenance else ""),
                                 system_prompt=TEMPLATE_DEFAULT if system is None else system).texts
            extra = {} if system is None else {"system": system}
            if provenance:
                extra["policy"] = provenance
            rows += [{"prompt": p, "response": x, **extra} for p, rs in zip(prompts, responses) for x in rs]
        scores = vader_scores([row["response"] for row in rows])
        for row, sc in zip(rows, scores):
            row["score"] = round(sc, 4)
        write_jsonl(out_dir / (f"samples_{split}.jsonl" if r == 0 else f"samples_{split}_r{r}.jsonl"), rows)
        summary[split] = {"samples": len(rows), "mean_score": round(sum(scores) / len(scores), 4), "seconds": round(time.time() - t0, 1)}
        print(f"{split}: {summary[split]}", flush=True)
    return summary


def judge_samples(task_dir: Path = TASK_DIR, model_name: str = "smollm2-135m", device: str = "cpu",
                  batch_size: int = 16, force: bool = False, progress: bool = True) -> dict:
    """Add ``relevance`` and ``nll`` (:mod:`rlhf_env.judges`) to every row of every samples
    file under ``task_dir`` that lacks them (all rows with ``force``), rounded to 4 places.

    :return: ``{file name: rows judged}``
    """
    from tqdm.auto import tqdm

    from rlhf_env.judges import fluency, relevance
    from rlhf_env.models import load_lm

    files = [f for split in ("train", "test") for f in sample_files(split, task_dir)]
    todo = {f: read_jsonl(f) for f in files}
    todo = {f: rows for f, rows in todo.items() if force or any("nll" not in r or "relevance" not in r for r in rows)}
    if not todo:
        return {}
    model, tokenizer = load_lm(model_name, device=device)
    model.eval()
    done = {}
    for path, rows in todo.items():
        prompts = [r["prompt"] for r in rows]
        responses = [r["response"] for r in rows]
        rel = relevance(prompts, responses)
        nll = []
        step = 64
        for start in tqdm(range(0, len(rows), step), desc=f"judging {path.name}", disable=not progress):
            nll.extend(fluency(model, tokenizer, prompts[start : start + step], responses[start : start + step], batch_size))
        for row, r, n in zip(rows, rel, nll):
            row["relevance"] = round(r, 4)
            row["nll"] = round(n, 4) if n == n else None
        write_jsonl(path, rows)
        done[path.name] = len(rows)
    return done


# the reward model whose scores rank the samples for the ranked pairs: the one trained on every other kind
RANKING_MODEL = "default-v6"


def ranking_model(device: str = "cpu"):
    """The reward model that scores the samples for the ``ranked`` pairs: the one trained on
    the pairs of every other kind, which are the shipped pairs (``RelabelConfig(ranked=False)``):
    ``RewardModel.default()``, ``default-v6``, trained on first use and cached."""
    from rlhf_env.default_reward_model import DEFAULT_CACHE_NAME
    from rlhf_env.reward_model import RewardModel

    if DEFAULT_CACHE_NAME != RANKING_MODEL:
        raise RuntimeError(f"the default reward model is {DEFAULT_CACHE_NAME}, not {RANKING_MODEL}: the ranked pairs rank "
                           f"by {RANKING_MODEL}, the model of the pairs without them; train it from RelabelConfig(ranked=False)'s pairs")
    return RewardModel.default(device=device)


def rank_samples(task_dir: Path = TASK_DIR, device: str = "cpu", force: bool = False) -> dict:
    """Add ``rm``, the :func:`ranking_model`'s score in the env's context, to every
    starting-model row (not a policy round's) of every samples file under ``task_dir`` that
    lacks it (every row with ``force``), for the ``ranked`` pairs of :mod:`.relabel`.

    :return: ``{file name: rows scored}``
    """
    files = [f for split in ("train", "test") for f in sample_files(split, task_dir)]
    rows_of = {f: read_jsonl(f) for f in files}
    todo = {f: [r for r in rows if not r.get("policy") and (force or "rm" not in r)] for f, rows in rows_of.items()}
    todo = {f: mine for f, mine in todo.items() if mine}
    if not todo:
        return {}
    model = ranking_model(device)
    done = {}
    for path, mine in todo.items():  # the rows to score are the file's own dicts: writing the file keeps the rest
        scores = model.score([r["prompt"] for r in mine], [r["response"] for r in mine]).tolist()
        for row, score in zip(mine, scores):
            row["rm"] = round(float(score), 6)
        write_jsonl(path, rows_of[path])
        done[path.name] = len(mine)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_env.default_task",
        description="Rebuild the default task's prompts, judged samples and preference pairs under rlhf_env/assets "
                    "(default: judge unjudged samples, then relabel the pairs).",
    )
    parser.add_argument("--prompts-only", action="store_true", help="only rewrite prompts_train.txt / prompts_test.txt")
    parser.add_argument("--round", type=int, default=None, help="sample round R (0: samples_{split}.jsonl, R >= 1: "
                        "samples_{split}_rR.jsonl) from --model, then judge it (slow; the shipped rounds 0 and 1 exist)")
    parser.add_argument("--round-size", type=int, default=4, help="responses per prompt in a sampled round (default: 4)")
    parser.add_argument("--system", default=None, help="sample the round under this system message (recorded in each row; "
                        "default: the chat template's own, the env's context); 'friendly': the shipped round 2's")
    parser.add_argument("--policy", action="append", default=None, metavar="DIR",
                        help="sample the round from this trained policy (a Hugging Face directory, e.g. a text agent's "
                             "save_pretrained or the demo's policy/) instead of --model; repeat for several, --round-size "
                             "answers from each; each row records the policy's provenance (rlhf_env_training.json) in 'policy'. "
                             "The judges stay those of --model, the starting model")
    parser.add_argument("--policy-note", default=None, help="appended to each row's 'policy' (e.g. how the policy was trained)")
    parser.add_argument("--policy-samples", action="store_true",
                        help="relabel with the policy rounds' samples too (the over-used-phrase pair kinds; the default-v7 "
                             "candidate's pairs, docs/benchmarks.md); default: without them, the pairs default-v6 trains on")
    parser.add_argument("--judge", action="store_true", help="re-judge every sample (relevance, nll), even those judged")
    parser.add_argument("--ranked", action="store_true",
                        help=f"relabel with the ranked pairs too (RelabelConfig(ranked=True)), after scoring the "
                             f"starting-model samples not yet scored with {RANKING_MODEL} (rm); default: without them, "
                             "the pairs default-v6 trains on")
    parser.add_argument("--model", default="smollm2-135m", help="starting model: sampler (unless --policy) and fluency judge "
                        "(default: smollm2-135m)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per sampled response at most (default: 48)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate / judge call (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and relabelling seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is fastest on a shared machine)")
    parser.add_argument("--out-dir", type=Path, default=TASK_DIR, help=f"the task folder (default: {TASK_DIR})")
    args = parser.parse_args(argv)
    if args.policy and args.round is None:
        parser.error("--policy samples a round from the policy: give --round R too")
    for path in args.policy or []:
        if not Path(path).is_dir():
            parser.error(f"--policy {path}: no such directory (a trained policy's Hugging Face folder, e.g. the demo's DIR/policy)")
    write_prompts()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.prompts_only:
        return 0
    if args.round is not None:
        system = FRIENDLY_SYSTEM if args.system == "friendly" else args.system
        print(json.dumps(sample_round(args.round, args.model, args.max_new_tokens, args.batch_size, args.seed, args.device,
                                      args.out_dir, args.round_size, system, args.policy, args.policy_note)))
    t0 = time.time()
    judged = judge_samples(args.out_dir, args.model, args.device, args.batch_size, force=args.judge)
    if judged:
        print(f"judged {judged} in {time.time() - t0:.0f}s", flush=True)
    if args.ranked:
        t0 = time.time()
        scored = rank_samples(args.out_dir, args.device)
        if scored:
            print(f"scored {scored} with {RANKING_MODEL} in {time.time() - t0:.0f}s", flush=True)
    from rlhf_env.default_task.relabel import RelabelConfig, build_pairs

    for split in ("train", "test"):
        pairs, stats = build_pairs(split, args.out_dir, seed=args.seed,
                                   cfg=RelabelConfig(policy_samples=args.policy_samples, ranked=args.ranked))
        write_jsonl(args.out_dir / f"pairs_{split}.jsonl", pairs)
        print(f"{split}: {json.dumps(stats)}", flush=True)
    return 0
