"""``TextRLHFEnv``: token generation by a language model as a Gymnasium environment.

The token MDP (see ``DESIGN.md``): the state is the prompt plus the response so far, the
action is the next token id, the episode ends (``terminated``) at EOS or after
``max_new_tokens`` tokens, and the reward of step ``t`` is::

    r_t = -kl_coef * kl_t + [t == T] * score(prompt, response)

with ``kl_t`` the chosen estimator of the KL between the actor (the policy that acts,
under its sampling distribution: logits / temperature, top-k) and the frozen reference
(same temperature, no top-k): ``k1 = log pi(a_t|s_t) - log ref(a_t|s_t)``,
``k3 = (exp(r) - 1) - r`` with ``r = log ref - log pi``, or ``full`` = the exact KL of the two
next-token distributions.

Observation layout (fixed shape ``L = max_prompt_tokens + max_new_tokens``, int64, so SB3
does not one-hot it): ``input_ids`` holds the prompt tokens then the response tokens,
left-aligned, followed by the tokenizer's pad id; ``attention_mask`` is 1 on real tokens
and 0 on padding. SB3's rollout buffers store it as float32, which holds token ids
exactly; cast back with ``.long()``.

Prompts longer than ``max_prompt_tokens`` (after the chat template) are an error, raised
when the env is built (for the prompt list) or at ``reset`` (for ``options["prompt"]``):
truncating a chat-formatted prompt would silently cut its header.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from envs.contexts import Contexts
from envs.device import check_device
from envs.lm_core import LMCore, build_core
from envs.prompt import TEMPLATE_DEFAULT, prompt_text
from envs.reference import check_reference_share
from envs.sampling import KL_ESTIMATORS
from envs.spaces import LMHandle, TextObservationSpace
from envs.task import Task


def check_reward(reward_model: Any) -> Callable | None:
    """The env's reward model: None or a callable ``(prompts, responses) -> scores`` (names
    and reward-model directories are resolved by ``rlhf_env``'s registration)."""
    if reward_model is not None and not callable(reward_model):
        raise TypeError(
            f"reward_model must be a callable (prompts, responses) -> scores, got {reward_model!r}: to use a "
            "name or a reward-model directory, make the env by id (import rlhf_env; gym.make('TextRLHF-v0', "
            "reward_model=...))"
        )
    return reward_model


class TextEnvParts:
    """What the single and the batched text env share: the models (:class:`envs.lm_core.LMCore`),
    the reward, the task's rows, the configuration and the token contexts, set up by
    :meth:`_setup_parts`, and the model accessors the design card names."""

    def _setup_parts(
        self, n: int, model: Any, reward_model: Any, prompts: Any, max_new_tokens: int, max_prompt_tokens: int,
        kl_coef: float, kl_estimator: str, temperature: float, top_k: int, dtype: Any, render_mode: str | None,
        reference: Any, tokenizer: Any, shared_model: bool, reference_share: Any, lm_spec: dict[str, Any] | None,
        dataset: Any, reward_funcs: Any, reward_weights: Sequence[float] | None, system_prompt: Any,
    ) -> TextObservationSpace:
        """Build the parts of an env of ``n`` contexts (arguments checked by :func:`check_config`
        first); returns the observation space of one context."""
        reference_share = check_reference_share(reference_share)  # before the (slow) model work
        self.reward_model = check_reward(reward_model)
        self.core: LMCore = build_core(model, tokenizer, reference, temperature, top_k, dtype, shared_model, lm_spec)
        check_positions(self.core.actor, int(max_prompt_tokens), int(max_new_tokens))
        self.max_new_tokens = int(max_new_tokens)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.render_mode = render_mode
        self.task = Task(self.core.tokenizer, self.max_prompt_tokens, prompts, dataset, system_prompt, self.reward_model,
                         reward_funcs, reward_weights)
        self.rows, self.prompts, self.prompt_ids = self.task.rows, self.task.prompts, self.task.prompt_ids
        self.contexts = Contexts(self.core, n, reference_share)
        length = self.max_prompt_tokens + self.max_new_tokens
        return TextObservationSpace(length, self.core.vocab_size, LMHandle(self.core))

    # the models, as the design card names them
    @property
    def actor(self) -> torch.nn.Module:
        """The trainable causal LM (the policy's actor module)."""
        return self.core.actor

    @property
    def reference(self) -> torch.nn.Module:
        """The frozen reference model."""
        return self.core.reference

    @property
    def tokenizer(self):
        """The tokenizer of the actor and the reference."""
        return self.core.tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        """Response text of token ids (special tokens dropped)."""
        return self.core.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextRLHFEnv(TextEnvParts, gym.Env):
    """One prompt at a time; the agent writes the response token by token.

    Built from parts: the models, the tokenizer, the reward callable and the prompt list are
    objects. ``gym.make("TextRLHF-v0", ...)`` (registered by ``import rlhf_env``) resolves
    names (``model="smollm2-135m"``, ``reward_model="sentiment"``, prompt files) and builds
    this class (:mod:`rlhf_env.registration`).

    :param model: the actor, a Hugging Face causal LM module (trained by the policy)
    :param reward_model: a callable ``(prompts, responses) -> scores``, or None when
        ``reward_funcs`` give the score
    :param prompts: the prompt strings (a non-empty sequence; the short form of ``dataset``)
    :param max_new_tokens: response length at which the episode ends
    :param max_prompt_tokens: longest prompt in tokens (after the chat template); longer
        prompts are an error
    :param kl_coef: coefficient of the per-token KL penalty (settable between rollouts)
    :param kl_estimator: ``"k1"`` (default), ``"k3"`` or ``"full"``
    :param temperature: sampling temperature of the policy's distribution (the reference's
        log-probabilities use the same temperature)
    :param top_k: top-k of the policy's distribution (0 = off)
    :param device: torch device of the models (checked; the modules are used where they are)
    :param dtype: the models' dtype name, recorded in :attr:`lm_spec` (the modules are used as they are)
    :param render_mode: None, ``"ansi"`` (``render()`` returns the text) or ``"human"`` (prints it)
    :param reference: None (a frozen deep copy of the starting model) or a causal LM module
    :param tokenizer: the tokenizer of the actor and the reference
    :param shared_model: envs of one process built on the same module, reference and
        sampling configuration share one actor and one reference (so the N copies in a
        ``DummyVecEnv`` are one policy); False builds an independent core
    :param reference_share: ``"auto"`` (default): while the actor's embeddings and lower
        decoder blocks are frozen (``requires_grad=False``, e.g. the LM policy's
        ``train_layers=k``) and identical to the reference's, run only the reference's
        blocks above them, on the actor's hidden state (exact; re-checked before every
        forward, with a fall back to the full reference; Llama-like models only, see
        :mod:`envs.reference`); ``"off"``: always run the full reference
    :param lm_spec: how to rebuild the actor in another process (a policy loaded from disk
        without its env): ``{"model": name or path, "loader": "module:function", ...}``,
        set by ``rlhf_env``'s registration; None records the model's ``name_or_path``
    :param dataset: rows instead of ``prompts``: dicts with a ``"prompt"`` (a string or a list
        of chat messages) and any other columns, or a ``datasets.Dataset``; each reward
        function gets the columns of the rows it scores (see :mod:`envs.reward_funcs`)
    :param reward_funcs: a callable or a list, TRL's convention
        ``f(prompts, completions, completion_ids, **columns) -> list of float or None``;
        the score is their weighted sum (plus ``reward_model``'s score when given)
    :param reward_weights: one weight per reward function (default 1 each)
    :param system_prompt: the system message of every prompt without its own:
        ``TEMPLATE_DEFAULT`` (default: the chat template decides; SmolLM2's adds its default
        system message), a string, or None (no system message at all)
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
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
        lm_spec: dict[str, Any] | None = None,
        dataset: Any = None,
        reward_funcs: Any = None,
        reward_weights: Sequence[float] | None = None,
        system_prompt: Any = TEMPLATE_DEFAULT,
    ):
        super().__init__()
        check_config(max_new_tokens, max_prompt_tokens, kl_estimator, render_mode, self.metadata["render_modes"], kl_coef, device)
        self.observation_space = self._setup_parts(
            1, model, reward_model, prompts, max_new_tokens, max_prompt_tokens, kl_coef, kl_estimator, temperature, top_k,
            dtype, render_mode, reference, tokenizer, shared_model, reference_share, lm_spec, dataset, reward_funcs,
            reward_weights, system_prompt)
        self.action_space = gym.spaces.Discrete(self.core.vocab_size)
        self._prompt: str | None = None
        self._row: int | None = None
        self._prompt_obj: Any = None  # the row's prompt as given (a string or chat messages)
        self._response_ids: list[int] = []
        self._done = True

    def encode(self, prompt: Any, where: str = "prompt") -> list[int]:
        """Prompt token ids (a string or chat messages, chat template where the model has
        one, the env's system prompt), checked against ``max_prompt_tokens``."""
        return self.task.encode(prompt, where)

    # -- Gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start a new response. ``options={"row": i}`` answers row ``i`` of the dataset,
        ``options={"prompt": text}`` a prompt given by text (no row: its columns are None);
        otherwise a row is drawn with the env's seeded generator.

        :return: ``(observation, {"prompt": text, "prompt_ids": list of ids, "row": index or None})``
        """
        super().reset(seed=seed)
        if options and options.get("row") is not None:
            row = self.task.check_index(options["row"], 'options["row"]')
            prompt, ids = self.rows[row]["prompt"], self.prompt_ids[row]
        elif options and options.get("prompt") is not None:
            row, prompt = None, options["prompt"]
            ids = self.encode(prompt, where='options["prompt"]')
        else:
            row = self.task.draw(self.np_random)
            prompt, ids = self.rows[row]["prompt"], self.prompt_ids[row]
        self._row, self._prompt_obj = row, prompt
        prompt = self._prompt = prompt_text(prompt)
        self._response_ids = []
        self._done = False
        self.contexts.set_prompts([0], [ids])
        if self.render_mode == "human":
            self.render()
        return self._observation(), {"prompt": prompt, "prompt_ids": list(ids), "row": row}

    def step(self, action):
        """Append token ``action``; see the module docstring for the reward.

        :raises ValueError: for an action outside ``[0, vocab_size)`` or outside the policy's
            top-k set
        :raises RuntimeError: when called after the episode ended without ``reset``
        """
        if self._done:
            raise RuntimeError(
                "step() called after the episode ended (or before the first reset): call env.reset() first"
            )
        token = self._check_action(action)
        logprob, ref_logprob, kl = self.contexts.log_probs([0], torch.tensor([token]), self.kl_estimator)
        logprob, ref_logprob, kl = float(logprob[0]), float(ref_logprob[0]), float(kl[0])
        if self.core.top_k and logprob < -1e30:
            raise ValueError(
                f"action {token} is outside the top_k={self.core.top_k} tokens of the policy's distribution "
                "(probability 0): sample actions from the policy or build the env with top_k=0"
            )
        self._response_ids.append(token)
        terminated = token in self.core.eos_ids or len(self._response_ids) >= self.max_new_tokens
        reward = -self.kl_coef * kl
        info: dict[str, Any] = {"logprob": logprob, "ref_logprob": ref_logprob, "kl": kl}
        if terminated:
            response = self.decode(self._response_ids)
            scores, values = self.task.score([self._row], [self._prompt_obj], [response], [self._response_ids])
            score = float(scores[0])
            reward += score
            info.update(score=score, prompt=self._prompt, response=response, row=self._row)
            info.update({key: float(v[0]) for key, v in values.items()})
            self._done = True
            # the context is complete; no forward is needed for a next state
            self.contexts.ids[0].append(token)
        else:
            self.contexts.advance([0], [token])
        if self.render_mode == "human":
            self.render()
        return self._observation(), float(reward), terminated, False, info

    def render(self) -> str | None:
        """The prompt and the response so far (``"ansi"`` returns it, ``"human"`` prints it)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; build the env with render_mode='ansi' or 'human'")
            return None
        text = f"prompt: {self._prompt}\nresponse: {self.decode(self._response_ids)}"
        if self.render_mode == "human":
            print(text)
            return None
        return text

    # -- helpers ---------------------------------------------------------------------------
    def _check_action(self, action: Any) -> int:
        arr = np.asarray(action)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer) and not (
            np.issubdtype(arr.dtype, np.floating) and float(arr.reshape(-1)[0]).is_integer()
        ):
            raise ValueError(f"action must be one token id, an integer in [0, {self.core.vocab_size}), got {action!r}")
        token = int(arr.reshape(-1)[0])
        if not 0 <= token < self.core.vocab_size:
            raise ValueError(
                f"action {token} is not a token id: the vocabulary size is {self.core.vocab_size}, "
                f"so actions must lie in [0, {self.core.vocab_size})"
            )
        return token

    def _observation(self) -> dict[str, np.ndarray]:
        return context_observation(self.contexts.ids[0], self.observation_space, self.core.pad_id)


def context_observation(ids: Sequence[int], space: TextObservationSpace, pad_id: int) -> dict[str, np.ndarray]:
    """Observation of one context: ids left-aligned then ``pad_id``, mask 1 on real tokens."""
    length = space["input_ids"].shape[0]
    input_ids = np.full(length, pad_id, dtype=np.int64)
    mask = np.zeros(length, dtype=np.int64)
    input_ids[: len(ids)] = ids
    mask[: len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def check_positions(actor: torch.nn.Module, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a context longer than the positions the model knows (``max_position_embeddings``,
    GPT-2's ``n_positions``): learned position tables fail with an index error halfway through
    a rollout, rotary ones quietly write garbage past them."""
    config = getattr(actor, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and max_prompt_tokens + max_new_tokens > positions:
        raise ValueError(
            f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens} + {max_new_tokens} = {max_prompt_tokens + max_new_tokens} "
            f"is more than the model's {positions} positions (config.max_position_embeddings): lower max_new_tokens "
            "or max_prompt_tokens"
        )


def check_config(
    max_new_tokens: int, max_prompt_tokens: int, kl_estimator: str, render_mode: str | None, modes, kl_coef: float = 0.0, device: Any = "cpu"
) -> None:
    """The text envs' cheap argument checks (one clear error each), run before any model work."""
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_tokens", max_prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer >= 1, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float, np.number)) or not kl_coef >= 0:
        raise ValueError(f"kl_coef must be a number >= 0 (the weight of the KL penalty), got {kl_coef!r}")
    check_device(device)  # a GPU this machine lacks is one clear line, before the model load
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if render_mode is not None and render_mode not in modes:
        raise ValueError(f"render_mode must be None or one of {modes}, got {render_mode!r}")
