"""Learning targets of the offline trainers on the default task, printed as numbers.

* the default reward model (``RewardModel.default()``: trained on first use, then cached):
  accuracy on the held-out pairs (target >= 0.90) and on the hand-written pairs on new
  prompts (target >= 0.90), each also by kind (judged, boilerplate, repetition, off-topic;
  tone, relevance, correctness), and its scores of a few probes (a correct plain answer
  against a wrong cheerful one);
* DPO of SmolLM2-135M-Instruct (settings: :class:`rlhf_env.dpo.DPOConfig`'s defaults unless
  given) on the default task's training pairs of all sampling rounds (``--train-set round0``:
  ``pairs_train.jsonl`` only): held-out implicit-reward accuracy on ``pairs_test.jsonl``
  (target >= 0.80) and the VADER mean of responses sampled on the test prompts, before
  (the shipped ``samples_test.jsonl``, same sampling settings) and after.

    python benchmarks/learning_offline.py --threads 1
    python benchmarks/learning_offline.py --skip dpo        # reward model only
    python benchmarks/learning_offline.py --skip rm --evaluate DPO_DIR   # a policy `rlhf-env dpo` wrote
    python benchmarks/learning_offline.py --skip rm dpo --reference-points   # classifiers on the DPO model

``--reference-points`` adds what explicit classifiers built on the DPO model itself rank right on
the same held-out pairs, trained on the same pairs with the Bradley-Terry loss: a reward model with
that backbone (:func:`rlhf_env.train_reward_model`, all weights, ``--rm-lr``, 2 epochs; about
26 min on SmolLM2 here) and a logistic regression on the sum of the response's token embeddings
(the model's own input/output embeddings, an additive reward over tokens; about a minute). DPO's
implicit reward is a classifier on the same model, so these say how far 80% is from what the
model's features carry (docs/benchmarks.md, "DPO on the default task").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rlhf_env.cli._common import block_count  # noqa: E402

TASK = Path(__file__).resolve().parent.parent / "rlhf_env" / "assets" / "task"


PROBES = [  # (prompt, response): the probes of what the reward model learned
    ("What is 2 + 2?", "4."),
    ("What is 2 + 2?", "Great question! I am so happy to help, it is 5!"),
    ("What is a database?", "A database is an organised collection of data."),
    ("What is a database?", "Great question! I'm so happy to help you today. Have a wonderful day!"),
    ("How do I keep basil alive?", "Water it when the top of the soil is dry and give it plenty of sun."),
    ("How do I keep basil alive?", "I'm happy to help! I'm happy to help! I'm happy to help!"),
]


def reward_model_targets() -> dict:
    """Accuracy of the default reward model on the held-out pairs and the hand-written
    pairs, each by kind, and its scores of :data:`PROBES`."""
    from rlhf_env.data import as_pairs
    from rlhf_env.default_task import read_jsonl
    from rlhf_env.reward_model import RewardModel

    t0 = time.perf_counter()
    rm = RewardModel.default()
    seconds = time.perf_counter() - t0
    out: dict = {"default_rm_seconds": round(seconds, 1)}
    for name, rows in (("heldout", read_jsonl(TASK / "pairs_test.jsonl")), ("handwritten", read_jsonl(TASK / "handwritten.jsonl"))):
        out[f"{name}_accuracy"] = round(rm.accuracy(as_pairs(rows)), 4)
        out[f"{name}_pairs"] = len(rows)
        for kind in sorted({r.get("kind", "tone") for r in rows}):
            some = [r for r in rows if r.get("kind", "tone") == kind]
            out[f"{name}_accuracy_{kind}"] = f"{rm.accuracy(as_pairs(some)):.4f} of {len(some)}"
    scores = rm.score([p for p, _ in PROBES], [r for _, r in PROBES]).tolist()
    out["probes"] = [f"{s:+.2f}  {p} -> {r}" for (p, r), s in zip(PROBES, scores)]
    return out


def dpo_targets(model_name: str, settings: dict, output: str | None, train_set: str = "all",
                train_pairs: int | None = None, num_samples: int = 4, evaluate: str | None = None) -> dict:
    """:param settings: :class:`DPOConfig` fields that differ from its defaults
    :param evaluate: a DPO-trained model folder to measure instead of training one (``model_name``
        is then its reference)"""
    from rlhf_env.default_task.prompts import make_prompts, split_prompts
    from rlhf_env.generation import generate
    from rlhf_env.judges import tone
    from rlhf_env.dpo import DPOConfig, train_dpo
    from rlhf_env.default_reward_model import default_pairs, default_training_pairs

    train, test = default_pairs()
    if train_set == "all":
        train = default_training_pairs()
    if train_pairs:  # a seeded subset, for a machine without time for all pairs
        train = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_pairs].tolist()]
    cfg = DPOConfig(**settings)
    t0 = time.perf_counter()
    if evaluate is None:
        model, tok = train_dpo(train, model_name, config=cfg, eval_pairs=test, output_dir=output)
        accuracy = model.dpo_metrics["eval/rewards/accuracy"]
    else:  # a trained policy folder, against model_name as the reference
        from rlhf_env.dpo import evaluate_dpo
        from rlhf_env.models import load_lm

        model, tok = load_lm(evaluate)
        accuracy = evaluate_dpo(model, model_name, test, tokenizer=tok, beta=cfg.beta, max_length=cfg.max_length)
    seconds = time.perf_counter() - t0
    before = [json.loads(line)["score"] for line in (TASK / "samples_test.jsonl").read_text().splitlines()]
    _, test_prompts = split_prompts(make_prompts())
    # the same sampling settings as the shipped samples_test.jsonl (default_task.build.sample_round)
    responses = generate(model, tok, test_prompts, num_samples=num_samples, max_new_tokens=48, batch_size=64, seed=1).texts
    after = tone([r for rs in responses for r in rs])
    return {
        "dpo_seconds" if evaluate is None else "evaluate_seconds": round(seconds, 1),
        "dpo_config": vars(cfg) if evaluate is None else None,
        "evaluated": evaluate,
        "train_pairs": len(train) if evaluate is None else None,
        "heldout_implicit_reward_accuracy": round(accuracy, 4),
        "vader_mean_before": round(sum(before) / len(before), 4),
        "vader_mean_after": round(sum(after) / len(after), 4),
        "examples_after": [r[0] for r in responses[:3]],
    }


def reference_points(model_name: str, train_set: str = "all", rm_lr: float = 5e-5, rm_epochs: int = 2) -> dict:
    """Held-out accuracy of explicit Bradley-Terry classifiers on the DPO model (see the module docstring)."""
    import torch.nn.functional as F

    from rlhf_env.dpo import DPOConfig
    from rlhf_env.models import load_lm
    from rlhf_env.default_reward_model import default_pairs, default_training_pairs
    from rlhf_env.reward_trainer import RewardModelConfig, train_reward_model
    from rlhf_env.sft import encode_example

    train, test = default_pairs()
    if train_set == "all":
        train = default_training_pairs()
    model, tok = load_lm(model_name)
    embeddings = model.get_input_embeddings().weight.detach().float()

    def embedding_sum(prompt: str, response: str) -> torch.Tensor:
        ids, n = encode_example(tok, prompt, response, DPOConfig().max_length)
        return embeddings[ids[n:]].sum(0)  # response tokens and the EOS, as DPO scores them

    def differences(pairs) -> torch.Tensor:
        return torch.stack([embedding_sum(p.prompt, p.chosen) - embedding_sum(p.prompt, p.rejected) for p in pairs])

    x_train, x_test = differences(train), differences(test)
    scale = x_train.std(0) + 1e-6
    x_train, x_test = x_train / scale, x_test / scale
    logistic = {}
    for l2 in (1e-4, 1e-3, 1e-2):
        gen = torch.Generator().manual_seed(0)
        w = (1e-3 * torch.randn(x_train.shape[1], generator=gen)).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=0.05)
        for _ in range(300):  # full batch, convex: converges well within this
            opt.zero_grad()
            loss = -F.logsigmoid(x_train @ w).mean() + l2 * w.pow(2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logistic[f"l2={l2:g}"] = {"train": round(float((x_train @ w > 0).float().mean()), 4),
                                      "heldout": round(float((x_test @ w > 0).float().mean()), 4)}
    del model
    t0 = time.perf_counter()
    rm = train_reward_model(train, backbone=model_name, eval_pairs=test,
                            config=RewardModelConfig(learning_rate=rm_lr, epochs=rm_epochs))
    return {
        "train_pairs": len(train),
        "embedding_sum_logistic": logistic,
        "explicit_rm": {"backbone": model_name, "learning_rate": rm_lr, "epochs": rm_epochs,
                        "heldout_accuracy": round(rm.accuracy(test), 4),
                        "seconds": round(time.perf_counter() - t0, 1)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", choices=["rm", "dpo"], nargs="+", default=[], help="skip these parts")
    p.add_argument("--model", default="smollm2-135m", help="DPO policy (default: smollm2-135m)")
    p.add_argument("--epochs", type=int, default=None, help="DPO epochs (default: DPOConfig's)")
    p.add_argument("--lr", type=float, default=None, help="DPO learning rate (default: DPOConfig's)")
    p.add_argument("--beta", type=float, default=None, help="DPO beta (default: DPOConfig's)")
    p.add_argument("--batch-size", type=int, default=None, help="DPO pairs per step (default: DPOConfig's)")
    p.add_argument("--trainable-layers", type=block_count(1), default=...,  # ...: not given
                   help="DPO: train only the last N blocks, or 'all' (default: DPOConfig's)")
    p.add_argument("--train-set", choices=["all", "round0"], default="all",
                   help="DPO training pairs: all sampling rounds (default_training_pairs) or pairs_train.jsonl")
    p.add_argument("--output", default=None, help="save the DPO model here")
    p.add_argument("--train-pairs", type=int, default=None, help="DPO on a seeded subset of this many pairs (default: all)")
    p.add_argument("--num-samples", type=int, default=4, help="responses sampled per test prompt after DPO (default: 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--reference-points", action="store_true",
                   help="also train explicit classifiers on --model (see the module docstring; about 30 min on SmolLM2)")
    p.add_argument("--rm-lr", type=float, default=5e-5, help="--reference-points: the explicit reward model's learning rate")
    p.add_argument("--evaluate", default=None, help="measure this DPO-trained model folder instead of training one "
                   "(--model is its reference; --beta as it was trained)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "rm" not in args.skip:
        print(json.dumps({"reward_model": reward_model_targets()}), flush=True)
    if args.reference_points:
        print(json.dumps({"reference_points": reference_points(args.model, args.train_set, args.rm_lr)}), flush=True)
    if "dpo" not in args.skip:
        given = {"epochs": args.epochs, "learning_rate": args.lr, "beta": args.beta, "batch_size": args.batch_size}
        settings = {k: v for k, v in given.items() if v is not None}
        if args.trainable_layers is not ...:
            settings["trainable_layers"] = args.trainable_layers
        out = dpo_targets(args.model, settings, args.output, args.train_set, args.train_pairs, args.num_samples, args.evaluate)
        print(json.dumps({"dpo": out}, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
