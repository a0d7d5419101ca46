"""Size and time of a text agent's checkpoint and of its Hugging Face export.

Trains PPO with the language-model policy on ``TextRLHF-v0`` for one short iteration (so
the optimizer holds real state), then, in the same process and on the same thread count:

* ``save``: ``model.save(path)``, the checkpoint to resume training (its bytes split into
  trainable weights, optimizer state and the rest), which leaves out the
  frozen actor weights (the recorded base model gives them back at load), against
  ``full``: the same zip with the whole policy ``state_dict`` (what ``save`` wrote before:
  every actor weight), printed as a size ratio;
* ``load``: ``PPO.load(path, env=fresh env)``, and whether its parameters equal the saved ones;
* ``save_only_model``: ``model.save(path, save_only_model=True)`` (no optimizer state: a
  resume restarts Adam's moments) and its ``PPO.load``, size and times;
* ``export``: ``model.save_pretrained(dir)`` (LoRA merged, tokenizer, training record),
  against ``peer``: ``actor.save_pretrained`` + ``tokenizer.save_pretrained`` of transformers
  alone; then ``AutoModelForCausalLM.from_pretrained(dir)`` and the maximum absolute
  difference of its logits from the trained actor's.

Examples::

    python -m benchmarks.export --model tiny --train-layers 1
    python -m benchmarks.export --model smollm2-135m --train-layers 1 2 4 --lora-rank 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile

import torch


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def breakdown(path: str) -> str:
    """The checkpoint's bytes by what they hold: trainable weights (``policy.pth``: the
    trained actor blocks and the value head), optimizer state (``policy.optimizer.pth``:
    Adam's two moments), and the rest (hyperparameters, RNG states, frozen-weight fingerprint)."""
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename: info.compress_size for info in archive.infolist()}
    weights, optimizer = sizes.pop("policy.pth", 0), sizes.pop("policy.optimizer.pth", 0)
    rest = ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in sizes.items())
    return f"weights {weights / 1e6:.2f} MB, optimizer {optimizer / 1e6:.2f} MB, other {sum(sizes.values()) / 1e6:.3f} MB ({rest})"


def run(model_name: str, policy_kwargs: dict, label: str) -> None:
    import gymnasium as gym
    from transformers import AutoModelForCausalLM

    import rlhf_env  # noqa: F401  (registers the envs)
    from agents import PPO

    def reward(prompts, responses):
        return torch.tensor([len(r) / 40.0 for r in responses])

    def make_env():
        return gym.make_vec("TextRLHF-v0", num_envs=2, model=model_name, reward_model=reward, max_new_tokens=8,
                            shared_model=False)

    model = PPO("LMPolicy", make_env(), n_steps=9, batch_size=16, n_epochs=1, learning_rate=1e-4, seed=0,
                policy_kwargs=policy_kwargs)
    model.learn(18)
    n_train = sum(p.numel() for p in model.policy.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.zip")
        t0 = time.perf_counter()
        model.save(path)
        t_save = time.perf_counter() - t0
        small = os.path.getsize(path)
        parts = breakdown(path)
        full_path = os.path.join(tmp, "full.zip")
        t0 = time.perf_counter()
        with zipfile.ZipFile(full_path, "w") as archive:
            for name, state in model.get_parameters().items():  # the whole state_dict, as before
                with archive.open(f"{name}.pth", "w", force_zip64=True) as fh:
                    torch.save(state, fh)
        t_full = time.perf_counter() - t0
        full = os.path.getsize(full_path)
        os.unlink(full_path)
        t0 = time.perf_counter()
        loaded = PPO.load(path, env=make_env())
        t_load = time.perf_counter() - t0
        equal = all(torch.equal(a, b) for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()))
        del loaded
        only_path = os.path.join(tmp, "model_only.zip")
        t0 = time.perf_counter()
        model.save(only_path, save_only_model=True)
        t_only = time.perf_counter() - t0
        only = os.path.getsize(only_path)
        t0 = time.perf_counter()
        loaded = PPO.load(only_path, env=make_env())
        t_only_load = time.perf_counter() - t0
        only_equal = all(torch.equal(a, b) for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()))
        del loaded

        out = os.path.join(tmp, "export")
        t0 = time.perf_counter()
        model.save_pretrained(out)
        t_export = time.perf_counter() - t0
        peer = os.path.join(tmp, "peer")
        t0 = time.perf_counter()
        model.policy.actor.save_pretrained(peer)
        model.policy.core.tokenizer.save_pretrained(peer)
        t_peer = time.perf_counter() - t0
        hf = AutoModelForCausalLM.from_pretrained(out)
        ids = torch.tensor([model.policy.core.tokenizer("Write a short poem about the sea.")["input_ids"]])
        with torch.no_grad():
            diff = float((hf(ids).logits - model.policy.actor(ids).logits).abs().max())
        print(f"{model_name} {label}: save {small / 1e6:.1f} MB in {t_save:.2f} s vs full state_dict "
              f"{full / 1e6:.1f} MB in {t_full:.2f} s (ratio {small / full:.3f}); load {t_load:.2f} s, params equal {equal}; "
              f"export {t_export:.2f} s ({_dir_size(out) / 1e6:.1f} MB) vs transformers save_pretrained {t_peer:.2f} s "
              f"(ratio {t_export / t_peer:.2f}); reloaded logits max |diff| {diff:.2e}")
        print(f"  save() holds: {parts}; trainable parameters {n_train:,} ({4 * n_train / 1e6:.2f} MB in float32)")
        print(f"  save(save_only_model=True): {only / 1e6:.1f} MB in {t_only:.2f} s (ratio to full {only / full:.3f}); "
              f"load {t_only_load:.2f} s (fresh optimizer), params equal {only_equal}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="shipped model name or folder")
    p.add_argument("--train-layers", type=int, nargs="*", default=[1, 2], help="top blocks that train (one run each)")
    p.add_argument("--lora-rank", type=int, default=None, help="also one run with LoRA of this rank on every block")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    for k in args.train_layers:
        run(args.model, {"train_layers": k}, f"train_layers={k}")
    if args.lora_rank:
        run(args.model, {"lora": {"r": args.lora_rank}}, f"lora r={args.lora_rank}")


if __name__ == "__main__":
    main()
