"""Expert iteration: the policy learns its own best-of-n answers, round after round.

Each round draws ``n`` answers per training prompt from the current policy, keeps the one
the reward scores highest (:func:`rlhf_env.best_of_n.best_of_n`), and fine-tunes the policy
on the kept answers with the SFT loss (prompt tokens masked), on exactly the tokens it drew:
EOS where it stopped, none where ``max_new_tokens`` cut it. Known as best-of-n distillation,
RAFT (Dong et al., 2023), the Grow/Improve loop of ReST (Gulcehre et al., 2023) and, for
reasoning, expert iteration (Anthony et al., 2017; Havrilla et al., 2024).

Why it is here: best-of-n is about as reward-efficient at a given KL as the KL-regularised
RL optimum, and one round moves the policy toward best-of-n's answers without RL's
failure mode of one stock phrase for every prompt, because every target is an answer the
policy itself wrote for that prompt. There is no critic and no reference model in the loss;
the KL stays small because the targets are a best-of-n selection of the policy's own
samples (at most ``log n - (n - 1) / n`` nats from the policy that drew them) and each round
is a short fine-tune. What it cannot do is go past what the reward model prefers among
those samples: docs/alignment.md has the measurements on the default task.

    from rlhf_env.expert_iteration import ExpertIterationConfig, train_expert_iteration
    model, tok = train_expert_iteration(prompts, "smollm2-135m", reward="default",
                                        config=ExpertIterationConfig(n=8, rounds=1), output_dir="ei_out")

or ``rlhf-env expert-iteration --output ei_out`` (then ``rlhf-env eval ei_out``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from rlhf_env.best_of_n import best_of_n, kl_bound
from rlhf_env.envs.prompt import TEMPLATE_DEFAULT
from rlhf_env.generation import prompt_ids
from rlhf_env.loop import TrainLoop, check_config
from rlhf_env.sft import SFTConfig, train_sft_tokens, trim_tokens
from rlhf_env.training import base_model_name, resolve_lm, save_lm, summary_writer

__all__ = ["ExpertIterationConfig", "train_expert_iteration", "kept_sequences"]


@dataclass
class ExpertIterationConfig:
    """Settings of :func:`train_expert_iteration`.

    :param n: answers drawn per kept answer; the reward's best of them is learned
    :param rounds: sample-select-fine-tune rounds, each from the policy the last one left
    :param samples_per_prompt: kept answers per prompt per round (each the best of its own ``n``)
    :param max_new_tokens: length limit of a drawn answer
    :param temperature: sampling temperature of the draws
    :param top_k: top-k of the draws (0: off)
    :param learning_rate: AdamW learning rate of each round's fine-tune. Small: the targets
        are the policy's own answers, and one round at 3e-5 on SmolLM2-135M moved it about
        1.6 nats per 24-token answer (docs/benchmarks.md)
    :param batch_size: kept answers per optimiser step
    :param epochs: passes over a round's kept answers
    :param max_length: longest training sequence in tokens (the prompt's start is cut first)
    :param weight_decay: AdamW weight decay
    :param seed: seed of the draws (round ``r`` samples with ``seed + r``) and of the data order
    :param sample_batch_size: sequences per ``generate`` call while drawing
    :param min_reward: keep a best answer only if it scores at least this (None: keep every
        one). With a verifier as the reward, 1.0 keeps the correct answers only
        (rejection-sampling fine-tuning); a prompt none of whose ``n`` answers is good
        enough then teaches nothing that round
    :param finished_only: keep a best answer only if the policy ended it (EOS), not one
        ``max_new_tokens`` cut (DAPO's overlong filtering; the env's
        ``mask_truncated_completions``): a verifier reads a cut answer's last number, which
        is right now and then by luck, and learning those teaches rambling
    """

    n: int = 8
    rounds: int = 1
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    learning_rate: float = 3e-5
    batch_size: int = 8
    epochs: int = 1
    max_length: int = 256
    weight_decay: float = 0.0
    seed: int = 0
    sample_batch_size: int = 32
    min_reward: Optional[float] = None
    finished_only: bool = False

    def check(self) -> None:
        """Refuse a setting that cannot run, before any model is loaded."""
        check_config(self, counts=("n", "rounds", "samples_per_prompt", "max_new_tokens", "sample_batch_size"))
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r} (in ExpertIterationConfig)")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a response token), got {self.max_length!r}")

    def sft(self) -> SFTConfig:
        """The fine-tune of each round."""
        return SFTConfig(learning_rate=self.learning_rate, batch_size=self.batch_size, epochs=self.epochs,
                         max_length=self.max_length, weight_decay=self.weight_decay, seed=self.seed)


def kept_sequences(tokenizer: Any, prompts: Sequence[Any], kept_ids: Sequence[Sequence[Sequence[int]]], max_length: int,
                   system_prompt: Any = TEMPLATE_DEFAULT) -> list[tuple[list[int], int]]:
    """The SFT sequences of kept answers: each prompt's ids as the env encodes them, then the
    answer's sampled token ids (EOS included where it was drawn), cut to ``max_length``
    (:func:`rlhf_env.sft.trim_tokens`). An answer with no token at all has nothing to learn
    and is skipped (one that is only EOS is kept: the policy drew it)."""
    out = []
    for prompt, answers in zip(prompts, kept_ids):
        ids = prompt_ids(tokenizer, prompt, system_prompt)
        out.extend(trim_tokens(ids, answer, max_length) for answer in answers if len(answer))
    return out


def train_expert_iteration(
    prompts: Union[Sequence[Any], str, os.PathLike],
    model: Any = "smollm2-135m",
    reward: Any = "default",
    tokenizer: Any = None,
    config: Optional[ExpertIterationConfig] = None,
    output_dir: Union[str, os.PathLike, None] = None,
    log_dir: Union[str, os.PathLike, None] = None,
    run_name: str = "expert_iteration",
    device: str = "cpu",
    dtype: Any = None,
    system_prompt: Any = TEMPLATE_DEFAULT,
    progress: bool = True,
    log: Callable[[str], None] = print,
    record: Optional[dict] = None,
):
    """Train ``model`` by expert iteration on ``prompts`` (see the module docstring).

    :param prompts: the training prompts: strings or chat-message lists, or a ``.txt`` /
        ``.jsonl`` file (:func:`rlhf_env.prompts.load_prompts`)
    :param model: a shipped name (``"smollm2-135m"``, ``"tiny"``), a model folder, or a loaded
        ``PreTrainedModel`` (with ``tokenizer=``)
    :param reward: what scores the answers (:func:`rlhf_env.rewards.resolve_reward`:
        ``"default"``, a reward-model folder, a ``(prompts, responses) -> scores`` callable, ...)
    :param config: :class:`ExpertIterationConfig`
    :param output_dir: if given, the final policy is saved there (atomically), a folder that
        ``load_lm(dir)``, ``rlhf-env eval dir`` and ``gym.make("TextRLHF-v0", model=dir)`` accept
    :param log_dir: TensorBoard root; the run goes to ``{log_dir}/{run_name}_{k}``: ``train/loss``
        per step, and per round ``rollout/reward_mean`` (every draw: the policy's own mean
        reward), ``rollout/best_of_n_reward_mean`` (the kept answers') and ``rollout/finished_share``
    :param system_prompt: as :func:`rlhf_env.generation.generate`'s
    :param progress: progress bars (sampling and fine-tuning)
    :param log: where the one line per round goes (``None``: nowhere)
    :param record: more fields for the output folder's ``rlhf_env_training.json`` (the CLI
        records ``--task`` there)
    :return: ``(model, tokenizer)`` in eval mode; ``model.expert_iteration_metrics`` holds one
        dict per round (the rewards above, the KL bound of the kept answers, ``train/loss``)
    """
    from rlhf_env.prompts import load_prompts
    from rlhf_env.rewards import resolve_reward

    cfg = config or ExpertIterationConfig()
    cfg.check()
    prompts = list(prompts) if isinstance(prompts, (list, tuple)) else load_prompts(prompts)
    if not prompts:
        raise ValueError("no training prompts given")
    base_model = base_model_name(model)
    model, tokenizer = resolve_lm(model, tokenizer, device, dtype)
    reward_fn = resolve_reward(reward, device=device)
    writer = summary_writer(log_dir, run_name)
    history: list[dict[str, float]] = []
    step = 0
    try:
        for r in range(cfg.rounds):
            model.eval()
            drawn = best_of_n(model, prompts, reward_fn, n=cfg.n, num_samples=cfg.samples_per_prompt,
                              tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k, system_prompt=system_prompt, seed=cfg.seed + r,
                              batch_size=cfg.sample_batch_size, device=model.device, progress=progress)
            kept = [[ids for ids, score, done in zip(*slot) if (cfg.min_reward is None or score >= cfg.min_reward)
                     and (done or not cfg.finished_only)]
                    for slot in zip(drawn.chosen.token_ids, drawn.scores, drawn.chosen.finished)]
            sequences = kept_sequences(tokenizer, prompts, kept, cfg.max_length, system_prompt)
            if not sequences:
                rules = [f"scored at least min_reward={cfg.min_reward}"] if cfg.min_reward is not None else []
                rules += ["ended before max_new_tokens (finished_only)"] if cfg.finished_only else []
                why = (f"no best-of-{cfg.n} answer {' and '.join(rules)}; relax that or raise n" if rules
                       else "every kept answer is empty; raise max_new_tokens")
                raise RuntimeError(f"round {r + 1}: nothing to fine-tune on: {why}")
            model, tokenizer = train_sft_tokens(sequences, model, tokenizer, cfg.sft(), writer=writer, first_step=step,
                                                progress=progress, desc=f"round {r + 1}/{cfg.rounds}: sft")
            step += TrainLoop.count_steps(len(sequences), cfg.batch_size, cfg.epochs)  # the next round's first TensorBoard step
            every = np.asarray(drawn.candidate_scores, dtype=float)
            metrics = {"round": r + 1, "rollout/reward_mean": float(every.mean()),
                       "rollout/best_of_n_reward_mean": float(np.mean(drawn.scores)),
                       "rollout/finished_share": float(np.mean(drawn.chosen.finished)),
                       "kl_bound": kl_bound(cfg.n), "train/loss": model.sft_metrics.get("train/loss", float("nan")),
                       "sequences": len(sequences), "kept_share": len(sequences) / (len(prompts) * cfg.samples_per_prompt)}
            history.append(metrics)
            if writer is not None:
                for key in ("rollout/reward_mean", "rollout/best_of_n_reward_mean", "rollout/finished_share"):
                    writer.add_scalar(key, metrics[key], r + 1)
            if log is not None:
                log(f"[expert iteration] round {r + 1}/{cfg.rounds}: reward of the draws {metrics['rollout/reward_mean']:+.3f}, "
                    f"of the best of {cfg.n} {metrics['rollout/best_of_n_reward_mean']:+.3f}; "
                    f"fine-tuned on {len(sequences)} answers ({metrics['kept_share']:.0%} of the prompts' slots), "
                    f"loss {metrics['train/loss']:.3f}")
    finally:
        if writer is not None:
            writer.close()
    model.eval()
    model.expert_iteration_metrics = history
    if output_dir is not None:
        from rlhf_env.agents.export import describe_reward

        # reward_model and max_new_tokens: what `rlhf-env eval DIR` judges with by default
        save_lm(model, tokenizer, output_dir, {
            "algorithm": "expert iteration (best-of-n SFT)", "base_model": base_model,
            "reward_model": describe_reward(reward if isinstance(reward, (str, os.PathLike)) else None, reward_fn),
            "max_new_tokens": cfg.max_new_tokens, "hyperparameters": asdict(cfg), "rounds": history, **(record or {})})
    return model, tokenizer
