"""``GroupRolloutAlgorithm``: the rollout of GRPO and RLOO, a group of responses per prompt.

Each iteration draws ``n_envs / group_size`` prompts, resets the batched text env with each
row repeated ``group_size`` times (``reset(options={"row": [...]})``: by row index, so each
response is scored with its own row's columns) and runs until every sub-env has finished
its response; a finished sub-env waits instead of starting a new prompt. The segments it
returns carry their group (``TextSegment.group``), from which the algorithm's ``train()``
makes its advantages. The env's KL reward and per-token reference are switched off (the
algorithms run the reference in ``train()``) and its frozen-trunk states are kept for the
update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from agents import distributed
from agents.kl_controller import set_env_kl_coef
from agents.on_policy import OnPolicyAlgorithm
from agents.text_rollout import RolloutStats, collect_text_rollout, find_text_env


def check_group_multiple(n_envs: int, group_size: int, name: str = "num_envs") -> None:
    """Refuse a number of envs that is not a whole number of groups (each env holds one
    response of a prompt's group), with the nearest count that is.

    :raises ValueError: ``n_envs`` is not a multiple of ``group_size``
    """
    if n_envs % group_size:
        raise ValueError(
            f"{name}={n_envs} is not a multiple of group_size={group_size}: "
            f"use {name} = prompts_per_step * group_size (e.g. {group_size * max(1, n_envs // group_size)})"
        )


class GroupRolloutAlgorithm(OnPolicyAlgorithm):
    """Base of the critic-free text algorithms (:class:`agents.GRPO`, :class:`agents.RLOO`):
    the env checks, the group resets and the rollout; subclasses write ``train()``.

    :param group_size: responses per prompt (``G`` >= 2)
    :param sample_every: log sample responses to TensorBoard every this many iterations
    Other parameters: see :class:`agents.on_policy.OnPolicyAlgorithm` (no critic:
    ``gamma = gae_lambda = 1``, ``vf_coef = 0``; ``n_steps`` is set from the env's
    ``max_new_tokens``).
    """

    _log_after_train = True  # rollout/kl_mean is measured in train(), where the reference runs

    def __init__(self, policy: Any, env: Any, group_size: int = 4, sample_every: int = 5, seed: int | None = None, **kwargs: Any):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        self.group_size = int(group_size)
        n_envs = kwargs.get("n_envs", 1)
        if isinstance(env, str) and isinstance(n_envs, int):
            check_group_multiple(n_envs, self.group_size, "n_envs")  # before the env (and its model) is built
        super().__init__(
            policy, env, n_steps=1, gamma=1.0, gae_lambda=1.0, vf_coef=0.0, seed=seed,
            supported_action_spaces=(spaces.Discrete,), **kwargs,
        )
        self.sample_every = int(sample_every)
        self._iteration = 0
        # each torchrun rank draws its own rows (seed + rank * n_envs, as the envs are seeded)
        self._prompt_rng = np.random.default_rng(distributed.rank_seed(seed, self.n_envs))

    # --- set-up -----------------------------------------------------------------------
    def _text_env(self) -> Any:
        text_env = find_text_env(self.env) if self.env is not None else None
        inner = getattr(self.env, "env", None)
        if text_env is None or text_env is not inner or not hasattr(text_env, "num_envs"):
            got = "a single env (gym.make)" if text_env is not None and not hasattr(text_env, "num_envs") else type(inner).__name__
            raise ValueError(
                f"{type(self).__name__} samples a group of responses per prompt, so it needs the batched text env, got {got}: "
                f"pass gym.make_vec('TextRLHF-v0', num_envs=N) or the id with n_envs=N, N a multiple of "
                f"group_size={self.group_size}"
            )
        return text_env

    def _check_env(self) -> None:
        text_env = self._text_env()
        check_group_multiple(self.n_envs, self.group_size)
        # the KL enters through train() (GRPO's loss, RLOO's reward), not through the env's reward
        set_env_kl_coef(self.env, 0.0)
        # ... so the rollout needs no reference forward: train() scores whole responses once
        text_env.reference_logprobs = False
        text_env.keep_trunk = True  # the frozen trunk's output of every token, for the update
        self.n_steps = int(text_env.max_new_tokens) + 1

    def _setup_model(self) -> None:
        super()._setup_model()
        from agents.text_ppo import is_lm_policy

        if not is_lm_policy(self.policy):
            raise ValueError(f"{type(self).__name__} trains a language-model policy: use policy='LMPolicy' on a TextRLHF env")
        if self.env is not None:
            self._check_env()

    def _on_n_envs_changed(self) -> None:
        super()._on_n_envs_changed()
        self._check_env()

    def set_env(self, env: Any, force_reset: bool = True) -> None:
        super().set_env(env, force_reset)
        self._check_env()

    # --- rollout ----------------------------------------------------------------------
    def _reset_to_groups(self) -> list[int]:
        """Reset the env: row ``k`` of the group draw in sub-envs ``k*G .. k*G+G-1`` (by row
        index, so each response is scored with its own row's columns)."""
        text_env = self._text_env()
        n_prompts = self.n_envs // self.group_size
        n_rows = len(text_env.prompts)
        chosen = self._prompt_rng.choice(n_rows, size=n_prompts, replace=n_prompts > n_rows)
        obs, _ = text_env.reset(options={"row": [int(k) for k in chosen for _ in range(self.group_size)]})
        self.env._prev_done[:] = False
        self._last_obs = obs
        self._last_episode_starts = np.ones(self.n_envs, dtype=bool)
        return [i // self.group_size for i in range(self.n_envs)]

    def collect_rollouts(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """One group of ``group_size`` complete responses per prompt (see the module docstring)."""
        groups = self._reset_to_groups()
        text_env = self._text_env()
        # finished sub-envs wait for the others instead of starting (and prefilling) new prompts
        text_env.autoreset = False
        try:
            ok, self._segments, stats = collect_text_rollout(self, env, callback, n_rollout_steps, groups=groups)
        finally:
            text_env.autoreset = True
        self._iteration += 1
        self._record_rollout(stats)
        return ok

    def _record_rollout(self, stats: RolloutStats) -> None:
        """Score, length and samples of the rollout. The KL per response is measured by
        ``train()`` (the reference runs there, not in the env) and logged with it."""
        from agents.text_ppo import RLHFConfig, TextPPOState, record_rollout_stats

        state = TextPPOState(RLHFConfig(sample_every=self.sample_every), 0.0)
        state.iteration = self._iteration
        stats.kls = []  # the env charged no KL (kl_coef 0): not this rollout's measure
        record_rollout_stats(self, stats, state, None)
