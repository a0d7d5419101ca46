"""``TextRLHFVectorEnv``: N text environments advanced by one batched forward per model.

``gym.make_vec("TextRLHF-v0", num_envs=N)`` builds it (the registered
``vector_entry_point``). Each step runs ONE incremental forward of the actor and ONE of the
reference (only its blocks above the actor's frozen trunk when ``reference_share="auto"``
finds one, see :mod:`envs.reference`) over all N contexts, each with its own rows in a batched KV cache (see
:mod:`envs.contexts`); prompts of different lengths are handled by right-aligning the rows
and passing explicit positions. Finished sub-envs are reset by Gymnasium 1.x's default
``NEXT_STEP`` autoreset: the step after a sub-env terminates, its action is ignored, it
returns the first observation of a new prompt with reward 0, and its info carries
``prompt`` and ``prompt_ids``. With ``autoreset_mode="SameStep"`` a finished sub-env
restarts in the step it ends instead: its observation and info are the new prompt's, and
the final ones are in ``infos["final_obs"]`` and ``infos["final_info"]`` (Gymnasium's
SAME_STEP layout; :class:`envs.wrappers.SB3VecEnv` relies on it).

Setting :attr:`TextRLHFVectorEnv.autoreset` to False (GRPO does, during its rollout)
keeps a finished sub-env idle instead: its actions are ignored, it is not re-prefilled
with a new prompt, and it returns reward 0 and its final observation until ``reset()``.
A step in which every sub-env still running finishes then runs no forward at all.

``reference_logprobs=False`` (or setting the attribute of that name between rollouts) runs
no reference forward at all during the rollout: the info then has no ``ref_logprob`` and
no ``kl`` keys, and ``kl_coef`` must be 0 (the KL reward needs them). For trainers that
score the reference once per response in one teacher-forced forward (GRPO does). Default
True: every step carries ``ref_logprob`` and ``kl`` as documented in DESIGN.md.

Rewards, info keys and observations are those of :class:`envs.text_env.TextRLHFEnv`; in the
vector info each key ``k`` comes with the boolean mask ``_k`` of the sub-envs it is set for.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.prompt import TEMPLATE_DEFAULT, prompt_text
from envs.text_env import TextEnvParts, check_config


class TextRLHFVectorEnv(TextEnvParts, VectorEnv):
    """``num_envs`` prompts at a time, one batched actor and reference forward per step.

    Takes the arguments of :class:`envs.text_env.TextRLHFEnv` (``reference_share`` included) plus ``num_envs`` and
    ``autoreset_mode`` (``"NextStep"``, the default, or ``"SameStep"``) and
    ``reference_logprobs`` (default True; False: no per-token reference forward, no
    ``ref_logprob``/``kl`` info, requires ``kl_coef=0``).
    ``reset(seed=s)`` seeds sub-env ``i`` with ``s + i``; ``reset(options={"row": r})`` with
    a row index or a list of ``num_envs`` row indices (None entries draw) starts those rows
    of the dataset (GRPO's groups); ``reset(options={"prompt": p})`` with a string or a list
    of ``num_envs`` strings sets prompts by text (no row: their columns are None).
    """

    metadata = {"render_modes": ["ansi", "human"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        model: torch.nn.Module | None = None,
        reward_model: Callable | None = None,
        prompts: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        max_prompt_tokens: int = 64,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        temperature: float = 1.0,
        top_k: int = 0,
        device: str | torch.device = "cpu",
        dtype: Any = None,
        render_mode: str | None = None,
        reference: Any = None,
        tokenizer: Any = None,
        shared_model: bool = True,
        reference_share: str = "auto",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        reference_logprobs: bool = True,
        lm_spec: dict[str, Any] | None = None,
        dataset: Any = None,
        reward_funcs: Any = None,
        reward_weights: Sequence[float] | None = None,
        system_prompt: Any = TEMPLATE_DEFAULT,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        check_config(max_new_tokens, max_prompt_tokens, kl_estimator, render_mode, self.metadata["render_modes"], kl_coef, device)
        self.num_envs = int(num_envs)
        modes = {m.value.lower().replace("_", ""): m for m in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP)}
        mode = modes.get(str(getattr(autoreset_mode, "value", autoreset_mode)).lower().replace("_", ""))
        if mode is None:
            raise ValueError(f"autoreset_mode must be 'NextStep' or 'SameStep', got {autoreset_mode!r}")
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.single_observation_space = self._setup_parts(
            self.num_envs, model, reward_model, prompts, max_new_tokens, max_prompt_tokens, kl_coef, kl_estimator,
            temperature, top_k, dtype, render_mode, reference, tokenizer, shared_model, reference_share, lm_spec, dataset,
            reward_funcs, reward_weights, system_prompt)
        self.single_action_space = gym.spaces.Discrete(self.core.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs = [np.random.default_rng() for _ in range(self.num_envs)]
        self._prompts: list[str | None] = [None] * self.num_envs
        self._rows: list[int | None] = [None] * self.num_envs  # the row each sub-env answers (None: a prompt given by text)
        self._prompt_objs: list[Any] = [None] * self.num_envs  # each sub-env's prompt as given (string or messages)
        self._responses: list[list[int]] = [[] for _ in range(self.num_envs)]
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        # False: finished sub-envs stay idle until reset() (for whole-batch rollouts, GRPO)
        self.autoreset = True
        self._started = False
        self.reference_logprobs = reference_logprobs

    @property
    def reference_logprobs(self) -> bool:
        """Whether each step runs the reference and reports ``ref_logprob`` and ``kl``."""
        return self.contexts.with_reference

    @reference_logprobs.setter
    def reference_logprobs(self, enabled: bool) -> None:
        self.contexts.set_reference(bool(enabled))

    @property
    def keep_trunk(self) -> bool:
        """Whether the env keeps the actor's frozen-trunk hidden states of each context for
        the trainer's update (:meth:`envs.contexts.Contexts.kept_states`; default False, the
        text trainers switch it on). Takes effect for contexts prefilled from then on."""
        return self.contexts.keep_trunk

    @keep_trunk.setter
    def keep_trunk(self, enabled: bool) -> None:
        self.contexts.keep_trunk = bool(enabled)

    @property
    def row_indices(self) -> list[int | None]:
        """The dataset row each sub-env is answering (None for a prompt set by text)."""
        return list(self._rows)

    # -- Gymnasium vector API --------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Start new responses in every sub-env.

        :return: ``(observations, infos)`` with ``infos["prompt"]`` and ``infos["prompt_ids"]``
        """
        if seed is not None:
            seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(self.num_envs)]
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} sub-envs")
            self._rngs = [np.random.default_rng(s) for s in seeds]
        fixed = self._per_env(options, "prompt", "prompts", lambda v: isinstance(v, str) or (
            isinstance(v, list) and bool(v) and isinstance(v[0], dict)))
        rows = self._per_env(options, "row", "row indices", lambda v: isinstance(v, (int, np.integer)))
        if any(r is not None for r in rows) and any(p is not None for p in fixed):
            raise ValueError('reset options set both "row" and "prompt": give one of them')
        infos: dict[str, Any] = {}
        self._start(list(range(self.num_envs)), fixed, infos, rows)
        self._autoreset[:] = False
        self._started = True
        return self._observations(), infos

    def step(self, actions):
        """Advance every sub-env by one token (sub-envs that ended last step are reset instead).

        :raises ValueError: for an action outside ``[0, vocab_size)``
        :raises RuntimeError: when called before ``reset``
        """
        if not self._started:
            raise RuntimeError("step() called before reset(): call envs.reset() first")
        actions = np.asarray(actions)
        if actions.shape not in ((self.num_envs,), (self.num_envs, 1)):
            raise ValueError(f"expected {self.num_envs} actions (one token id per sub-env), got shape {actions.shape}")
        actions = actions.reshape(self.num_envs)
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=bool)
        infos: dict[str, Any] = {}
        reset_rows = [i for i in range(n) if self._autoreset[i]] if self.autoreset else []
        act_rows = [i for i in range(n) if not self._autoreset[i]]
        tokens = [self._check_action(actions[i]) for i in act_rows]
        if act_rows and not self.contexts.with_reference and self.kl_coef != 0:
            raise ValueError(
                f"kl_coef={self.kl_coef} needs the reference's per-token log-probs, but this env was set "
                "reference_logprobs=False: set kl_coef=0 or reference_logprobs=True"
            )
        if act_rows:
            logprob, ref_logprob, kl = self.contexts.log_probs(act_rows, torch.tensor(tokens), self.kl_estimator)
            logprob, ref_logprob, kl = logprob.cpu().numpy(), ref_logprob.cpu().numpy(), kl.cpu().numpy()
            if self.core.top_k and (logprob < -1e30).any():
                bad = tokens[int(np.argmax(logprob < -1e30))]
                raise ValueError(
                    f"action {bad} is outside the top_k={self.core.top_k} tokens of the policy's distribution "
                    "(probability 0): sample actions from the policy or build the env with top_k=0"
                )
            _put(infos, "logprob", act_rows, logprob, n)
            if self.contexts.with_reference:
                rewards[act_rows] = -self.kl_coef * kl
                _put(infos, "ref_logprob", act_rows, ref_logprob, n)
                _put(infos, "kl", act_rows, kl, n)
        # With NEXT_STEP autoreset the final observation is shown to the policy once more
        # (its action is then ignored): feeding the last token in the batched forward costs
        # no extra forward and puts that observation in the step cache, so the policy's
        # forward on it is a lookup. With SAME_STEP the row restarts at once: no forward.
        same_step = self.autoreset and self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
        advanced, advanced_tokens, finished = [], [], []
        for row, token in zip(act_rows, tokens):
            self._responses[row].append(token)
            done = token in self.core.eos_ids or len(self._responses[row]) >= self.max_new_tokens
            if done:
                finished.append(row)
            if done and same_step:
                self.contexts.ids[row].append(token)  # complete: no forward needed
            else:
                advanced.append(row)
                advanced_tokens.append(token)
        if advanced and not self.autoreset and len(finished) == len(advanced):
            # every row this step feeds ends here and none restarts (autoreset off): no forward
            # would ever be read, so the tokens are only appended (as generate stops after its
            # last token); a later policy forward on these final observations is a cache miss
            for row, token in zip(advanced, advanced_tokens):
                self.contexts.ids[row].append(token)
        else:
            self.contexts.advance(advanced, advanced_tokens)
        if finished:
            responses = [self.decode(self._responses[row]) for row in finished]
            prompts = [self._prompts[row] for row in finished]
            scores, values = self.task.score([self._rows[row] for row in finished], [self._prompt_objs[row] for row in finished],
                                             responses, [self._responses[row] for row in finished])
            rewards[finished] += scores
            terminated[finished] = True
            _put(infos, "score", finished, scores, n)
            _put(infos, "prompt", finished, prompts, n, dtype=object)
            _put(infos, "response", finished, responses, n, dtype=object)
            _put(infos, "row", finished, [self._rows[row] for row in finished], n, dtype=object)
            for key, value in values.items():
                _put(infos, key, finished, value, n)
        if reset_rows:
            self._start(reset_rows, [None] * len(reset_rows), infos)
        if finished and same_step:
            # SAME_STEP: the final observation and info move to "final_obs" / "final_info"
            # and the sub-env starts its next prompt in this very step
            final_obs = self._observations()
            infos = _move_rows(infos, finished, "final_info", n)
            infos["final_obs"] = {}
            for key, batch in final_obs.items():
                _put(infos["final_obs"], key, finished, [batch[row] for row in finished], n, dtype=object)
            infos["_final_obs"] = _mask(finished, n)
            self._start(finished, [None] * len(finished), infos)
            self._autoreset[:] = False
        else:
            self._autoreset = terminated.copy() if self.autoreset else (self._autoreset | terminated)
        if self.render_mode == "human":
            print(self.render())
        return self._observations(), rewards, terminated, np.zeros(n, dtype=bool), infos

    def render(self) -> str | None:
        """Prompt and response so far of every sub-env."""
        lines = [f"[{i}] prompt: {self._prompts[i]}\n    response: {self.decode(self._responses[i])}" for i in range(self.num_envs)]
        return "\n".join(lines)

    # -- helpers ---------------------------------------------------------------------------
    def _per_env(self, options: dict[str, Any] | None, key: str, what: str, single: Any) -> list[Any]:
        """``options[key]`` as one entry per sub-env (a single value applies to all)."""
        value = (options or {}).get(key)
        if value is None or single(value):
            return [value] * self.num_envs
        value = list(value)
        if len(value) != self.num_envs:
            raise ValueError(f'options["{key}"] has {len(value)} {what} for {self.num_envs} sub-envs')
        return value

    def _start(self, envs: list[int], fixed: list[Any], infos: dict[str, Any], rows: list[int | None] | None = None) -> None:
        """Start sub-envs ``envs``: on the prompt given by text in ``fixed``, else on the row
        given in ``rows``, else on a row drawn with the sub-env's generator."""
        prompts, ids, starts = [], [], []
        for j, (env, text) in enumerate(zip(envs, fixed)):
            row = None if text is not None else rows[j] if rows is not None and rows[j] is not None else self.task.draw(self._rngs[env])
            if text is not None:
                prompt, prompt_ids = text, self.task.encode(text, 'options["prompt"]')
            else:
                row = self.task.check_index(row, f'options["row"][{env}]')
                prompt, prompt_ids = self.rows[row]["prompt"], self.prompt_ids[row]
            self._rows[env], self._prompt_objs[env] = row, prompt
            self._prompts[env] = prompt_text(prompt)
            self._responses[env] = []
            prompts.append(self._prompts[env])
            ids.append(list(prompt_ids))
            starts.append(row)
        self.contexts.set_prompts(envs, ids)
        # a reset sub-env's prompt replaces the one a finishing sub-env reports on the same step
        # only if both happen to one sub-env, which NEXT_STEP autoreset rules out
        _put(infos, "prompt", envs, prompts, self.num_envs, dtype=object)
        _put(infos, "prompt_ids", envs, ids, self.num_envs, dtype=object)
        _put(infos, "row", envs, starts, self.num_envs, dtype=object)

    def _check_action(self, action: Any) -> int:
        if not (np.issubdtype(np.asarray(action).dtype, np.integer) or float(action).is_integer()):
            raise ValueError(f"action must be a token id, an integer in [0, {self.core.vocab_size}), got {action!r}")
        token = int(action)
        if not 0 <= token < self.core.vocab_size:
            raise ValueError(
                f"action {token} is not a token id: the vocabulary size is {self.core.vocab_size}, "
                f"so actions must lie in [0, {self.core.vocab_size})"
            )
        return token

    def _observations(self) -> dict[str, np.ndarray]:
        length = self.single_observation_space["input_ids"].shape[0]
        input_ids = np.full((self.num_envs, length), self.core.pad_id, dtype=np.int64)
        mask = np.zeros((self.num_envs, length), dtype=np.int64)
        for row, ids in enumerate(self.contexts.ids):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def _mask(rows: list[int], n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _move_rows(infos: dict[str, Any], rows: list[int], name: str, n: int) -> dict[str, Any]:
    """Move the entries of ``rows`` out of the vector info into the nested info ``name``."""
    moved: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for key, values in infos.items():
        if key.startswith("_"):
            continue
        mask = infos["_" + key]
        take = [row for row in rows if mask[row]]
        if take:
            _put(moved, key, take, [values[row] for row in take], n, dtype=object if values.dtype == object else None)
        left = mask.copy()
        left[rows] = False
        if left.any():
            kept[key], kept["_" + key] = values, left
    kept[name], kept["_" + name] = moved, _mask(rows, n)
    return kept


def _put(infos: dict[str, Any], key: str, rows: list[int], values: Sequence[Any], n: int, dtype: Any = None) -> None:
    """Set ``infos[key][rows] = values`` with Gymnasium's vector-info mask ``infos["_" + key]``."""
    if key not in infos:
        if dtype is object:
            infos[key] = np.empty(n, dtype=object)
        else:
            infos[key] = np.zeros(n, dtype=np.float64)
        infos["_" + key] = np.zeros(n, dtype=bool)
    for row, value in zip(rows, values):
        infos[key][row] = value
        infos["_" + key][row] = True
