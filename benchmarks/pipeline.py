"""Offline-training throughput: our reward-model and DPO trainers against TRL's, in one run.

Same backbone, same pairs, batch size, max length, learning rate and one epoch on both
sides; each side is timed from the start of training (model already loaded) to the
end, our tokenisation and reference log-probabilities included, TRL's tokenisation (done in
its constructor) excluded. Prints pairs/s and the ratio ours / TRL (>1 means we are faster).

    python benchmarks/pipeline.py                      # reward model (MiniLM) + DPO (tiny)
    python benchmarks/pipeline.py --dpo-model smollm2-135m --threads 1
    python benchmarks/pipeline.py --skip rm --dpo-model smollm2-135m --dpo-trainable-layers 4 --threads 1

Noise: on a shared machine run both in the same invocation (as here) and compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rlhf_env.data import load_preferences  # noqa: E402

TASK = Path(__file__).resolve().parent.parent / "rlhf_env" / "assets" / "task"


def bench_reward_model(pairs, batch_size: int, max_length: int, lr: float) -> list[dict]:
    """Two rows against one TRL run: ours as it trains by default (steps of whole prompts,
    each distinct response scored once: fewer forward passes for the same loss) and ours
    pairwise (two inputs per pair, the computation TRL does). All weights trained on both sides.

    Precision: ours trains with its default ``RewardModelConfig.autocast`` (float32; with
    ``"auto"``, bf16 autocast where the device computes bf16 natively); TRL gets the same
    (``bf16=True``, its autocast, exactly when ours resolves to bf16), named in the rows."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rlhf_env.precision import resolve_autocast
    from rlhf_env.reward_model import RewardModel, default_backbone_dir
    from rlhf_env.reward_trainer import RewardModelConfig, train_reward_model

    backbone = default_backbone_dir()
    bf16 = resolve_autocast(RewardModelConfig().autocast, "cpu") is torch.bfloat16  # same precision on both sides
    precision = "bf16 autocast" if bf16 else "float32"
    ours_s = {}
    for grouped in (True, False):
        rm = RewardModel.from_backbone(backbone, max_length=max_length)
        cfg = RewardModelConfig(learning_rate=lr, batch_size=batch_size, epochs=1, max_length=max_length, warmup_ratio=0.0,
                                weight_decay=0.0, group_by_prompt=grouped)
        t0 = time.perf_counter()
        train_reward_model(pairs, backbone=rm, config=cfg, progress=False)
        ours_s[grouped] = time.perf_counter() - t0

    # TRL: sequence-classification head on the same backbone
    tok = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    data = Dataset.from_list([{"prompt": p.prompt + " ", "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, max_length=max_length,
            learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, report_to="none", save_strategy="no",
            logging_steps=10**6, eos_token="[SEP]", use_cpu=True, disable_tqdm=True, seed=0,
            # the same precision as ours, and no activation checkpointing, as ours (TRL defaults to bf16 and checkpointing)
            bf16=bf16, gradient_checkpointing=False,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        n_trl = len(trainer.train_dataset)
        t0 = time.perf_counter()
        trainer.train()
        trl_s = time.perf_counter() - t0
    return [
        _row(f"reward model (all-MiniLM-L6-v2, {precision} both), ours: by prompt, each response once", len(pairs), ours_s[True], n_trl, trl_s),
        _row(f"reward model (all-MiniLM-L6-v2, {precision} both), ours: pairwise, as TRL", len(pairs), ours_s[False], n_trl, trl_s),
    ]


def bench_dpo(pairs, model_name: str, batch_size: int, max_length: int, lr: float, beta: float,
              trainable_layers=None, trl_precompute_ref: bool = False) -> dict:
    """DPO pairs/s, ours vs TRL's ``DPOTrainer``: same model, pairs, batch, max length, float32,
    lr, beta, one epoch, and the same trainable parameters (``trainable_layers``: the last N
    blocks and the final norm on both sides, frozen with the same function).

    Ours is timed from the call (tokenisation, kept trunk and reference log-probs included).
    TRL: ``precompute_ref_log_probs=False`` (its default: a reference forward every step) times
    ``train()`` only; ``True`` also times the constructor, where TRL precomputes them.
    """
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from rlhf_env.dpo import DPOConfig, train_dpo
    from rlhf_env.models import load_lm
    from rlhf_env.training import train_last_layers

    model, tok = load_lm(model_name)
    model_dir = model.name_or_path  # the local folder load_lm read
    cfg = DPOConfig(beta=beta, learning_rate=lr, batch_size=batch_size, epochs=1, max_length=max_length, trainable_layers=trainable_layers)
    t0 = time.perf_counter()
    train_dpo(pairs, model, tokenizer=tok, config=cfg, progress=False)
    ours_s = time.perf_counter() - t0

    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    train_last_layers(policy, trainable_layers)  # the same trainable parameters as ours
    if getattr(tok, "chat_template", None):  # conversational format: TRL applies the same chat template
        rows = [
            {"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]}
            for p in pairs
        ]
    else:
        rows = [{"prompt": p.prompt + " ", "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    with tempfile.TemporaryDirectory() as out:
        args = TRLDPOConfig(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, max_length=max_length,
            learning_rate=lr, lr_scheduler_type="constant", beta=beta, report_to="none", save_strategy="no",
            logging_steps=10**6, use_cpu=True, disable_tqdm=True, seed=0, bf16=False, gradient_checkpointing=False,
            precompute_ref_log_probs=trl_precompute_ref, precompute_ref_batch_size=16,
        )
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        t_init = time.perf_counter()
        n_trl = len(trainer.train_dataset)
        trainer.train()
        trl_s = time.perf_counter() - (t0 if trl_precompute_ref else t_init)
    layers = "all weights" if trainable_layers is None else f"last {trainable_layers} blocks"
    ref = "TRL ref precomputed" if trl_precompute_ref else "TRL ref every step"
    return _row(f"DPO ({model_name}, {layers}, {ref})", len(pairs), ours_s, n_trl, trl_s)


def _warm_up() -> None:
    """One untimed forward/backward, so one-time costs (allocator, kernels) hit neither side."""
    from rlhf_env.reward_model import RewardModel

    rm = RewardModel.from_backbone()
    x = torch.randint(1000, 2000, (16, 48))
    rm.forward_ids(x, torch.ones_like(x)).sum().backward()


def _row(name: str, n_ours: int, ours_s: float, n_trl: int, trl_s: float) -> dict:
    ours, trl = n_ours / ours_s, n_trl / trl_s
    return {"name": name, "ours_pairs_per_s": round(ours, 2), "trl_pairs_per_s": round(trl, 2), "ratio": round(ours / trl, 2),
            "ours_s": round(ours_s, 1), "trl_s": round(trl_s, 1), "pairs": n_ours, "trl_pairs": n_trl}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(TASK / "pairs_train.jsonl"), help="preference pairs (default: the shipped default-task pairs)")
    p.add_argument("--pairs", type=int, default=96, help="training pairs from the shipped default task (default: 96)")
    p.add_argument("--rm-batch-size", type=int, default=16, help="reward-model pairs per step (default: 16)")
    p.add_argument("--dpo-batch-size", type=int, default=8, help="DPO pairs per step (default: 8)")
    p.add_argument("--max-length", type=int, default=256, help="longest sequence in tokens, both sides (default: 256)")
    p.add_argument("--dpo-model", default="tiny", help="DPO model: tiny, smollm2-135m or a folder (default: tiny)")
    p.add_argument("--dpo-trainable-layers", type=int, default=None,
                   help="DPO: train only the last N blocks and the final norm, on both sides (default: all weights)")
    p.add_argument("--trl-precompute-ref", action="store_true",
                   help="TRL computes the reference log-probs once before training (timed) instead of every step (its default)")
    p.add_argument("--skip", choices=["rm", "dpo"], default=None, help="skip one benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = load_preferences(args.data)[: args.pairs]
    _warm_up()
    results = []
    if args.skip != "rm":
        for row in bench_reward_model(pairs, args.rm_batch_size, args.max_length, 5e-5):
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.skip != "dpo":
        results.append(bench_dpo(pairs, args.dpo_model, args.dpo_batch_size, args.max_length, 5e-6, 0.1,
                                 args.dpo_trainable_layers, args.trl_precompute_ref))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'benchmark':70s} {'ours pairs/s':>13s} {'TRL pairs/s':>12s} {'ratio':>6s}")
    for r in results:
        print(f"{r['name']:70s} {r['ours_pairs_per_s']:13.2f} {r['trl_pairs_per_s']:12.2f} {r['ratio']:5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
