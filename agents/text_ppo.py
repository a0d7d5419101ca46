"""The text path of :class:`agents.PPO`: PPO on ``TextRLHF`` through the language-model policy.

``agents.PPO("LMPolicy", env)`` switches to this path by itself (the policy is an
:class:`agents.policies.lm.LMActorCriticPolicy`); ``"MlpPolicy"`` on CartPole never sees it,
and SB3's own PPO keeps its generic per-token path on the same env.

One iteration, in the order of the RLHF recipe:

1. **Rollout** (:func:`agents.text_rollout.collect_text_rollout`): the env writes responses
   token by token; per token it charges ``r_t = -kl_coef * kl_t`` and adds the reward-model
   score on the last token; the policy's forward at each step is a lookup in the env's
   step cache, which gives ``log pi_old(a_t|s_t)`` and ``V_old(s_t)``.
2. Optional **score normalisation** (running mean / std of the scores) and clipping:
   the score part of the last token's reward is replaced by the normalised score.
3. **GAE per token** (:func:`agents.losses.token_gae`, ``gamma=1``, ``lambda=0.95``
   are the usual text settings), ``returns = advantages + values``.
4. **Update**: ``n_epochs`` passes over minibatches of whole responses; each minibatch is
   evaluated by ONE teacher-forced forward per micro-batch over ``prompt + response``
   (:func:`agents.lm_forward.evaluate_tokens`), giving the new log-probs, entropies and
   values of every token (when only the top ``k`` blocks train, the rollout kept the
   frozen lower blocks' output and only the top blocks run:
   :func:`agents.lm_forward.evaluate_kept`); the loss per token is the clipped surrogate
   ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)`` plus ``vf_coef * (V - R)^2``
   (optionally clipped around the old value) minus ``ent_coef * H``, averaged over the
   minibatch's tokens; micro-batches accumulate gradients so memory stays bounded.
5. **KL control**: the adaptive controller (Ziegler et al.) moves the env's ``kl_coef``
   towards the value that keeps the KL per response at ``target_kl``.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents import distributed
from agents.kl_controller import get_env_kl_coef, make_kl_controller, set_env_kl_coef
from agents.lm_forward import HeadOptions, evaluate_kept, evaluate_tokens, kept_trunk_batch
from agents.losses import approx_kl, clip_fraction, clipped_surrogate, normalize_advantages, token_gae, value_loss
from agents.segments import (
    TextSegment,
    add_masked_sums,
    micro_batches,
    pack_segments,
    pad_field,
    response_mask,
    split_minibatches,
)
from agents.text_rollout import RolloutStats, collect_text_rollout, find_text_env


# What PPO uses for the hyperparameters a user leaves out when the policy is the language-model
# policy ("LMPolicy"): one table, read by PPO.__init__ and by RLHFConfig's defaults.
TEXT_PPO_DEFAULTS: dict[str, Any] = {
    # --- PPO's own arguments (SB3's defaults are for small MLPs: lr 3e-4, gamma 0.99, n_steps 2048) ---
    "learning_rate": 1.41e-5,  # TRL's PPO sentiment example; full fine-tuning of a small LM
    "n_steps": None,  # None: max_new_tokens + 1, the longest a response and its reset take, so every
    #                   env finishes at least one response in every rollout (see text_rollout_steps)
    "batch_size": 128,  # tokens per minibatch (made of whole responses)
    "n_epochs": 4,  # TRL's ppo_epochs
    "gamma": 1.0,  # the score arrives at the end of a short episode: no discount
    "gae_lambda": 0.95,
    "max_grad_norm": 1.0,
    # --- RLHFConfig: the KL discipline (Ziegler et al. 2019; TRL's sentiment example: target 6) ---
    "target_kl": 6.0,  # nats per response (summed over its tokens) the adaptive controller holds
    "kl_horizon": None,  # tokens over which a 20 % error moves kl_coef by 20 %; None: two rollouts
    #                      (at most +-10 % per rollout, whatever the rollout's size)
    "kl_coef": 0.2,  # initial coefficient (TRL's init_kl_coef); None: the env's own
    "score_norm": True,  # running mean/std of the scores, so kl_coef means the same for any reward scale
    # --- the policy (policy_kwargs) ---
    "detach_value": True,  # the value loss does not train the LM's trunk: through a shared trunk its
    #                        gradient moves the policy too, and the larger the KL penalties in the
    #                        returns, the further (measured: the KL penalty then raised the KL)
}


def text_rollout_steps(env: Any) -> int | None:
    """``max_new_tokens + 1`` of the text env behind ``env`` (None if there is none): a
    rollout of that many steps per env holds at least one finished response per env, since
    a response takes at most ``max_new_tokens`` steps plus one for its reset."""
    text_env = find_text_env(env) if env is not None else None
    max_new = getattr(text_env, "max_new_tokens", None)
    return None if max_new is None else int(max_new) + 1


def resolve_lm_n_steps(n_steps: int | None, env: Any, fallback: int) -> int:
    """``n_steps`` of an agent with the language-model policy: ``None`` gives
    :func:`text_rollout_steps` (``fallback`` without a text env); a shorter value than that
    warns, since such a rollout can hold no finished response."""
    needed = text_rollout_steps(env)
    if n_steps is None:
        return needed or fallback
    if needed and n_steps < needed:
        warnings.warn(
            f"n_steps={n_steps} is shorter than max_new_tokens + 1 = {needed}: a rollout may hold no finished "
            "response (then no score_mean, kl_mean or KL-controller update that iteration); leave n_steps out "
            "to get max_new_tokens + 1",
            stacklevel=3,
        )
    return int(n_steps)


def names_lm_policy(policy: Any) -> bool:
    """Whether a ``policy`` argument (alias or class) names the language-model policy."""
    if isinstance(policy, str):
        return policy == "LMPolicy"
    module = sys.modules.get(f"{__package__}.policies.lm")
    return module is not None and isinstance(policy, type) and issubclass(policy, module.LMActorCriticPolicy)


@dataclass
class RLHFConfig:
    """Text-specific settings of PPO on a ``TextRLHF`` env (defaults: :data:`TEXT_PPO_DEFAULTS`).

    :param kl_coef: initial ``kl_coef`` written into the env (None keeps the env's own).
    :param target_kl: target KL per response (nats, summed over its tokens) of the
        adaptive KL controller; None keeps ``kl_coef`` fixed. Not to be confused with
        PPO's ``target_kl``, which stops the epochs early on the old-vs-new policy KL.
    :param kl_horizon: horizon of the adaptive controller, in env steps (tokens); None: the
        tokens of two rollouts (``2 * n_steps * n_envs``), so ``kl_coef`` moves by at most
        10 % per rollout.
    :param score_norm: normalise scores by a running mean and std before they enter the
        reward.
    :param score_clip: clip the (normalised) score to ``[-score_clip, score_clip]``.
    :param micro_batch_tokens: padded tokens per forward of the update; a minibatch
        larger than this is split and its gradients accumulated.
    :param sample_every: log sample (prompt, response, score) triples as TensorBoard text
        every this many iterations (0: never).
    :param n_samples: how many samples to log.
    """

    kl_coef: float | None = TEXT_PPO_DEFAULTS["kl_coef"]
    target_kl: float | None = TEXT_PPO_DEFAULTS["target_kl"]
    kl_horizon: int | None = TEXT_PPO_DEFAULTS["kl_horizon"]
    score_norm: bool = TEXT_PPO_DEFAULTS["score_norm"]
    score_clip: float | None = None
    micro_batch_tokens: int = 4096
    sample_every: int = 5
    n_samples: int = 3

    @classmethod
    def from_any(cls, value: "RLHFConfig | dict | None") -> "RLHFConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"unknown RLHFConfig keys {sorted(unknown)}; valid keys: {sorted(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise TypeError(f"rlhf must be an RLHFConfig, a dict or None, got {type(value).__name__}")


class RunningMeanStd:
    """Running mean and variance (Chan et al. parallel update), for score normalisation."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            return
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), x.size
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


def is_lm_policy(policy: Any) -> bool:
    """Whether ``policy`` is the language-model actor-critic (then the text path applies)."""
    module = sys.modules.get(f"{__package__}.policies.lm")  # not imported: it cannot be one
    return module is not None and isinstance(policy, module.LMActorCriticPolicy)


class TextPPOState:
    """What the text path keeps between iterations (pickled with the model)."""

    def __init__(self, config: RLHFConfig, env_kl_coef: float | None, rollout_tokens: int = 5_000):
        self.config = config
        init = config.kl_coef if config.kl_coef is not None else (env_kl_coef if env_kl_coef is not None else 0.0)
        horizon = config.kl_horizon if config.kl_horizon is not None else 2 * rollout_tokens
        self.kl_controller = make_kl_controller(init, config.target_kl, horizon)
        self.score_stats = RunningMeanStd()
        self.iteration = 0


def shape_scores(segments: list[TextSegment], state: TextPPOState) -> None:
    """Score normalisation / clipping: replace the score in the last token's reward."""
    cfg = state.config
    if not cfg.score_norm and cfg.score_clip is None:
        return
    finished = [s for s in segments if s.score is not None]
    if cfg.score_norm:
        state.score_stats.update(np.array([s.score for s in finished]))
    for seg in finished:
        new = seg.score
        if cfg.score_norm:
            new = (new - state.score_stats.mean) / state.score_stats.std
        if cfg.score_clip is not None:
            new = float(np.clip(new, -cfg.score_clip, cfg.score_clip))
        seg.rewards = seg.rewards.clone()
        seg.rewards[-1] += new - seg.score


def compute_advantages(segments: list[TextSegment], gamma: float, gae_lambda: float, normalize: bool) -> None:
    """Per-token GAE of every segment; with ``normalize`` the advantages are whitened over
    all tokens of the rollout (mean 0, std 1), which keeps the scale steady across
    minibatches of a few responses."""
    for seg in segments:
        seg.advantages, seg.returns = token_gae(seg.rewards, seg.old_values, seg.last_value, seg.terminated, gamma, gae_lambda)
    if normalize:
        flat = torch.cat([s.advantages for s in segments])
        if flat.numel() > 1:
            for seg, advantages in zip(segments, normalize_advantages(flat).split([len(s.advantages) for s in segments])):
                seg.advantages = advantages


def record_rollout_stats(algo: Any, stats: RolloutStats, state: TextPPOState, kl_coef: float | None) -> None:
    """Text metrics of a rollout, and sample responses every ``sample_every`` iterations."""
    logger = algo.logger
    if stats.scores:
        logger.record("rollout/score_mean", float(np.mean(stats.scores)))
        logger.record("rollout/response_len_mean", float(np.mean(stats.lengths)))
    if stats.kls:  # (GRPO and RLOO measure it in train(), where the reference runs)
        logger.record("rollout/kl_mean", float(np.mean(stats.kls)))
    for key, values in stats.rewards.items():
        # each reward function over the responses it applies to (TRL's rewards/{name}/mean, /std)
        applied = np.asarray(values, dtype=np.float64)
        applied = applied[~np.isnan(applied)]
        if applied.size:
            logger.record(f"{key}/mean", float(applied.mean()))
            logger.record(f"{key}/std", float(applied.std()))
    if kl_coef is not None:
        logger.record("train/kl_coef", float(kl_coef))
    cfg = state.config
    if cfg.sample_every and stats.samples and state.iteration % cfg.sample_every == 1 % cfg.sample_every:
        lines = []
        for prompt, response, score in stats.samples[: cfg.n_samples]:
            lines.append(f"**prompt:** {prompt}  \n**response:** {response}  \n**score:** {score:.3f}")
        logger.record("samples/responses", "\n\n---\n\n".join(lines), exclude="stdout")


# per-token statistics of a text update (means over minibatches) -> their logged names
TRAIN_STAT_TAGS = {
    "pg": "train/policy_gradient_loss",
    "v": "train/value_loss",
    "kl_ref": "train/kl_ref",
    "ent": "train/entropy_loss",
    "clip": "train/clip_fraction",
    "kl": "train/approx_kl",
}


def record_train_stats(algo: Any, stats: dict[str, list[float]]) -> None:
    """The mean over minibatches of each per-token statistic of ``stats``
    (:data:`TRAIN_STAT_TAGS`), the last minibatch's loss and the update count."""
    logger = algo.logger
    for key, tag in TRAIN_STAT_TAGS.items():
        if key in stats:
            logger.record(tag, float(np.mean(stats[key])))
    logger.record("train/loss", float(stats["loss"][-1]))
    logger.record("train/n_updates", algo._n_updates, exclude="tensorboard")


def keep_trunk_states(env: Any) -> None:
    """Have the batched text env behind ``env`` keep the actor's frozen-trunk states from
    its next prefill on (for :func:`agents.lm_forward.evaluate_kept`); other envs: nothing."""
    text_env = find_text_env(env) if env is not None else None
    if text_env is not None and hasattr(text_env, "num_envs") and hasattr(text_env, "keep_trunk"):
        text_env.keep_trunk = True


class TextPPOMixin:
    """PPO's text path as methods of :class:`agents.PPO` (see the module docstring).

    The state between iterations is explicit: ``self._text_state`` (a
    :class:`TextPPOState`: the KL controller, the score statistics, the iteration) and
    ``self._segments`` (the last rollout, not saved); the hyperparameters are PPO's own
    (``n_epochs``, ``batch_size`` in tokens, ``clip_range``, ``clip_range_vf``,
    ``vf_coef``, ``ent_coef``, ``max_grad_norm``, ``target_kl``, ``gamma``, ``gae_lambda``,
    ``normalize_advantage``) plus :class:`RLHFConfig`.
    """

    def _setup_text_state(self, config: RLHFConfig) -> None:
        """Create the text state and write the initial ``kl_coef`` into the env."""
        self._text_state = TextPPOState(
            config, get_env_kl_coef(self.env) if self.env is not None else None, self.n_steps * self.n_envs
        )
        self._segments: list[TextSegment] = []
        self._attach_text_env()

    def _attach_text_env(self) -> None:
        """Make ``self.env`` (new, or a fresh one after ``load``) charge the KL coefficient in
        force (the controller's, unless the env's own is kept) and keep the frozen-trunk states."""
        config = self._text_state.config
        if self.env is not None and (config.kl_coef is not None or config.target_kl is not None):
            set_env_kl_coef(self.env, self._text_state.kl_controller.value)
        keep_trunk_states(self.env)

    def _collect_text_rollout(self, env: Any, callback: Any, n_rollout_steps: int) -> bool:
        """``n_rollout_steps`` steps per env regrouped into segments (``self._segments``),
        then the KL controller's update and the text metrics."""
        state: TextPPOState = self._text_state
        ok, self._segments, stats = collect_text_rollout(self, env, callback, n_rollout_steps)
        state.iteration += 1
        kl_coef = self._update_kl_coef(stats)
        record_rollout_stats(self, stats, state, kl_coef)
        self._last_rollout_stats = stats
        return ok

    def _update_kl_coef(self, stats: RolloutStats) -> float | None:
        """Adaptive KL control after a rollout; returns the coefficient now in the env."""
        state: TextPPOState = self._text_state
        if state.config.target_kl is None:
            return get_env_kl_coef(self.env)
        if stats.kls:
            value = state.kl_controller.update(float(np.mean(stats.kls)), stats.n_steps * self.env.num_envs)
            set_env_kl_coef(self.env, value)
        return state.kl_controller.value

    def _train_text(self) -> None:
        """PPO's update on the last text rollout (see the module docstring)."""
        state: TextPPOState = self._text_state
        policy = self.policy
        cfg = state.config
        policy.set_training_mode(True)
        self._update_learning_rate(policy.optimizer)
        progress = self._current_progress_remaining
        clip_range = self.clip_range_schedule(progress)
        clip_range_vf = None if self.clip_range_vf_schedule is None else self.clip_range_vf_schedule(progress)
        segments = [s for s in self._segments if len(s) > 0]
        if not segments:
            return
        shape_scores(segments, state)
        compute_advantages(segments, self.gamma, self.gae_lambda, self.normalize_advantage)
        params = [p for group in policy.optimizer.param_groups for p in group["params"]]
        stats = {k: [] for k in ("pg", "v", "ent", "clip", "kl", "loss")}
        continue_training = True
        for epoch in range(self.n_epochs):
            for batch in split_minibatches(segments, self.batch_size):
                n_tokens = sum(len(s) for s in batch)
                sums = self._text_minibatch_step(batch, n_tokens, clip_range, clip_range_vf, cfg.micro_batch_tokens)
                for key in stats:
                    stats[key].append(sums[key] / n_tokens)
                mean_kl = sums["kl"] / n_tokens
                if self.target_kl is not None and distributed.allreduce_mean(mean_kl) > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {mean_kl:.2f}")
                    break
                self._clip_and_step(params, sums["loss"], grad_weight=n_tokens)  # data-parallel: token mean over all ranks
            self._n_updates += 1
            if not continue_training:
                break
        self._record_text_train(stats, segments, clip_range, clip_range_vf)

    def _text_minibatch_step(
        self, batch: list[TextSegment], n_tokens: int, clip_range: float, clip_range_vf: float | None, micro_batch_tokens: int
    ) -> dict[str, float]:
        """Accumulate the gradients of one minibatch's loss (micro-batch by micro-batch);
        return its per-token sums for logging."""
        policy, core, device = self.policy, self.policy.core, self.device
        sums = dict.fromkeys(("pg", "v", "ent", "clip", "kl", "loss"), 0.0)
        policy.optimizer.zero_grad(set_to_none=True)
        # longest first, so micro-batches hold responses of similar length
        batch = sorted(batch, key=lambda s: len(s.context_ids) + len(s), reverse=True)
        options = HeadOptions(temperature=core.temperature, top_k=core.top_k, entropy_grad=self.ent_coef != 0,
                              value_head=policy._values)
        for micro in micro_batches(batch, micro_batch_tokens, lambda s: len(s.context_ids) + len(s)):
            ids, attn, positions, targets = pack_segments(micro, core.pad_id, device)
            mask = response_mask(micro, device)
            kept = kept_trunk_batch(policy.actor, micro)
            if kept is not None:  # the rollout kept the frozen trunk's output: only the top blocks run
                log_prob, entropy, values = evaluate_kept(policy.actor, *kept, positions, targets, options)
            else:
                log_prob, entropy, values = evaluate_tokens(policy.actor, ids, attn, positions, targets, options)
            log_ratio = log_prob - pad_field(micro, "old_logprobs", device)
            ratio = torch.exp(log_ratio)
            pg_losses = clipped_surrogate(ratio, pad_field(micro, "advantages", device), clip_range)
            v_losses = value_loss(values, pad_field(micro, "returns", device), pad_field(micro, "old_values", device), clip_range_vf)
            entropy_losses = -entropy
            token_loss = pg_losses + self.vf_coef * v_losses + self.ent_coef * entropy_losses
            loss = (token_loss * mask).sum() / n_tokens
            loss.backward()
            with torch.no_grad():
                add_masked_sums(sums, mask, pg=pg_losses, v=v_losses, ent=entropy_losses, clip=clip_fraction(ratio, clip_range),
                                kl=approx_kl(log_ratio))  # approx_kl: as SB3 logs it
                sums["loss"] += float(loss) * n_tokens
        return sums

    def _record_text_train(
        self, stats: dict[str, list[float]], segments: list[TextSegment], clip_range: float, clip_range_vf: float | None
    ) -> None:
        from agents.utils import explained_variance

        values_all = torch.cat([s.old_values for s in segments])
        returns_all = torch.cat([s.returns for s in segments])
        logger = self.logger
        record_train_stats(self, stats)
        logger.record("train/explained_variance", explained_variance(values_all, returns_all))
        logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            logger.record("train/clip_range_vf", clip_range_vf)
