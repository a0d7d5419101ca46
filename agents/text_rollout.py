"""Collecting a text rollout: run the env with the LM policy and regroup what happened
into :class:`agents.segments.TextSegment` s, one per response (or part of one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents import distributed
from agents.segments import TextSegment

def _reward_keys(infos: Any) -> list[str]:
    """The ``rewards/{name}`` keys (per reward function values) present in a step's infos."""
    if isinstance(infos, dict):
        keys = list(infos) + list(infos.get("final_info") or {})
    elif isinstance(infos, (list, tuple)):
        keys = [k for info in infos for k in info]
    else:
        return []
    return list(dict.fromkeys(k for k in keys if isinstance(k, str) and k.startswith("rewards/")))


def _info_value(infos: Any, key: str, i: int) -> Any:
    """``infos[key]`` of sub-env ``i`` for Gymnasium vector infos (dict of arrays with a
    ``_key`` mask) and SB3 infos (list of dicts); None when it is not set for ``i``."""
    if isinstance(infos, dict):
        # SAME_STEP autoreset (SyncVectorEnv of single envs): the finished step's info sits
        # under "final_info", the reset's info in the main dict
        final = infos.get("final_info")
        if isinstance(final, dict) and infos.get("_final_info") is not None and infos["_final_info"][i]:
            value = _info_value(final, key, i)
            if value is not None:
                return value
        if key not in infos:
            return None
        mask = infos.get("_" + key)
        if mask is not None and not mask[i]:
            return None
        return infos[key][i]
    if isinstance(infos, (list, tuple)) and i < len(infos):
        return infos[i].get(key)
    return None


class TextEpisodeStats:
    """The text metrics (``rollout/score_mean``, ``kl_mean``, ``response_len_mean``) for the
    per-token loops of A2C and REINFORCE, which do not regroup responses: each step's ``kl``
    info is summed per env, and a finished response's ``score`` closes it. The sums carry
    over from one rollout to the next (a response can span two)."""

    def __init__(self, num_envs: int):
        self.kl = np.zeros(num_envs)
        self.length = np.zeros(num_envs, dtype=np.int64)
        self.scores: list[float] = []
        self.kls: list[float] = []
        self.lengths: list[int] = []

    def update(self, infos: Any, valid: np.ndarray, finished: np.ndarray) -> None:
        """One env step: ``valid`` envs acted (not a reset step), ``finished`` ones ended a response."""
        for i in np.nonzero(valid)[0]:
            kl = _info_value(infos, "kl", i)
            self.kl[i] += 0.0 if kl is None else float(kl)
            self.length[i] += 1
            if finished[i]:
                score = _info_value(infos, "score", i)
                if score is not None:
                    self.scores.append(float(score))
                    self.kls.append(float(self.kl[i]))
                    self.lengths.append(int(self.length[i]))
                self.kl[i], self.length[i] = 0.0, 0

    def record(self, logger: Any) -> None:
        """Log the means over the responses finished since the last call, then forget them."""
        if self.scores:
            logger.record("rollout/score_mean", float(np.mean(self.scores)))
            logger.record("rollout/kl_mean", float(np.mean(self.kls)))
            logger.record("rollout/response_len_mean", float(np.mean(self.lengths)))
        self.scores, self.kls, self.lengths = [], [], []


def text_episode_stats(algo: Any, env: Any) -> TextEpisodeStats | None:
    """``algo``'s :class:`TextEpisodeStats` for ``env`` (made on first use, remade when the
    number of envs changes), or None when ``env`` holds no text env."""
    stats = getattr(algo, "_text_episodes", None)
    if stats is None or len(stats.kl) != env.num_envs:
        stats = TextEpisodeStats(env.num_envs) if find_text_env(env) is not None else None
        algo._text_episodes = stats
    return stats


def find_text_env(env: Any) -> Any:
    """The unwrapped text env (batched vector env or single env) behind ``env`` (an
    adapter, a vector env, an SB3 VecEnv or a Gymnasium env), or None."""
    inner = getattr(env, "env", env)  # VecEnvAdapter -> its env
    for candidate in (inner, getattr(inner, "unwrapped", None)):
        if candidate is not None and hasattr(candidate, "kl_coef") and hasattr(candidate, "core"):
            return candidate
    envs = getattr(inner, "envs", None)  # SyncVectorEnv / DummyVecEnv of single envs
    if envs:
        first = getattr(envs[0], "unwrapped", envs[0])
        if hasattr(first, "kl_coef") and hasattr(first, "core"):
            return first
    return None


@dataclass
class RolloutStats:
    """What a text rollout produced besides its segments (for logging)."""

    scores: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)  # KL per finished response (sum of per-token kl)
    lengths: list[int] = field(default_factory=list)
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # (prompt, response, score)
    # each reward function's value per finished response (the env's info["rewards/{name}"],
    # NaN where the function does not apply), logged as rewards/{name}/mean and /std
    rewards: dict[str, list[float]] = field(default_factory=dict)
    n_steps: int = 0


class _OpenSegment:
    __slots__ = ("context", "tokens", "logprobs", "rewards", "values", "ref_logprobs", "group")

    def kept(self, contexts: Any, row: int) -> tuple[torch.Tensor, tuple] | None:
        """The env's kept trunk states of this segment's tokens (all but the last), if any."""
        if contexts is None or not self.tokens:
            return None
        return contexts.kept_states(row, self.context.tolist() + self.tokens[:-1])

    def __init__(self, context: torch.Tensor, group: int):
        self.context = context
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.rewards: list[float] = []
        self.values: list[float] = []
        self.ref_logprobs: list[float] = []
        self.group = group

    def close(self, terminated: bool, last_value: float, score: float | None, prompt: str, response: str,
              kept: tuple[torch.Tensor, tuple] | None = None) -> TextSegment:
        t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
        return TextSegment(
            context_ids=self.context,
            response_ids=torch.tensor(self.tokens, dtype=torch.long),
            old_logprobs=t(self.logprobs),
            rewards=t(self.rewards),
            old_values=t(self.values),
            ref_logprobs=t(self.ref_logprobs),
            terminated=terminated,
            last_value=last_value,
            score=score,
            prompt=prompt or "",
            response=response or "",
            group=self.group,
            trunk_states=None if kept is None else kept[0],
            trunk_sig=None if kept is None else kept[1],
        )


def _act(policy: Any, obs: dict[str, torch.Tensor], active: np.ndarray | None):
    """The policy's ``(actions, values, log_probs)`` for every env; with ``active`` given
    (GRPO mode), only those rows are computed and the others (envs whose response has
    finished and that the env keeps idle, ignoring their action) get zeros. An idle env's
    observation is its final context, which the env's step cache does not hold, so acting
    for it would cost a full forward without KV cache per idle row and step."""
    if active is None or active.all():
        return policy(obs)
    rows = torch.as_tensor(np.flatnonzero(active), device=obs["input_ids"].device)
    actions, values, log_probs = policy({key: value[rows] for key, value in obs.items()})
    n = len(active)
    full_actions = torch.zeros((n, *actions.shape[1:]), dtype=actions.dtype, device=actions.device)
    full_values = torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device)
    full_log_probs = torch.zeros((n, *log_probs.shape[1:]), dtype=log_probs.dtype, device=log_probs.device)
    full_actions[rows], full_values[rows], full_log_probs[rows] = actions, values, log_probs
    return full_actions, full_values, full_log_probs


def collect_text_rollout(
    algo: Any,
    env: Any,
    callback: Any,
    n_rollout_steps: int,
    groups: list[int] | None = None,
) -> tuple[bool, list[TextSegment], RolloutStats]:
    """Run the env with the algorithm's LM policy and regroup what happened into segments.

    Two modes:

    * ``groups is None`` (PPO): ``n_rollout_steps`` steps of every env, as SB3 does; a
      response still open at the end becomes a segment with ``terminated=False`` that
      bootstraps from ``V(s_T)``, and the next rollout continues it from its current context.
    * ``groups`` given (GRPO): the caller has just reset env ``i`` to a prompt of group
      ``groups[i]``; the rollout runs until every env has finished that one response
      (at most ``n_rollout_steps`` steps) and returns exactly one segment per env.

    Per step the policy acts from the env's observation (its forward is a lookup in the
    env's step cache), and the log-probability, value, reward and the env's info
    (``ref_logprob``, ``kl``, ``score``, ``prompt``, ``response``) are recorded per token.

    With the batched env, its ``keep_trunk`` is switched on and each segment takes the
    actor's frozen-trunk states of its tokens (``TextSegment.trunk_states``) for the
    update (see :func:`kept_trunk_batch`).

    :param algo: the algorithm (its ``policy``, ``_last_obs``, counters, episode stats).
    :param env: its :class:`agents.vec_env.VecEnvAdapter`.
    :param callback: the callback of ``learn`` (``on_step`` is called every step).
    :param n_rollout_steps: steps per env.
    :param groups: group index of each env (GRPO mode), or None.
    :return: ``(continue_training, segments, stats)``.
    """
    from agents.preprocessing import as_tensor

    policy = algo.policy
    policy.set_training_mode(False)
    device = algo.device
    n_envs = env.num_envs
    open_segs: list[_OpenSegment | None] = [None] * n_envs
    segments: list[TextSegment] = []
    stats = RolloutStats()
    finished_once = np.zeros(n_envs, dtype=bool)
    # KL and length of each env's current response, kept across rollouts (a PPO response
    # can start in one rollout and end in the next)
    if getattr(algo, "_response_kl", None) is None or len(algo._response_kl) != n_envs or groups is not None:
        algo._response_kl = np.zeros(n_envs)
        algo._response_len = np.zeros(n_envs, dtype=np.int64)
    text_env = find_text_env(env)
    contexts = getattr(text_env, "contexts", None) if hasattr(text_env, "num_envs") else None
    if contexts is not None and not contexts.keep_trunk:
        contexts.keep_trunk = True  # contexts prefilled from now on keep their trunk states
    if contexts is not None:
        contexts.refresh()  # after an update: the env's caches follow the new weights, so the policy's reads hit
    callback.on_rollout_start()
    n_steps = 0
    last_obs = algo._last_obs
    while n_steps < n_rollout_steps:
        obs_tensor = as_tensor(last_obs, algo.observation_space, device)
        with torch.no_grad():
            actions, values, log_probs = _act(policy, obs_tensor, None if groups is None else ~finished_once)
        step = env.step(actions.cpu().numpy())
        algo.num_timesteps += n_envs * distributed.world_size()  # counted over ranks: all run as many iterations
        callback.update_locals(locals())
        if not callback.on_step():
            algo._last_obs = step.obs
            return False, segments, stats
        done = step.terminated | step.truncated
        algo._update_episode_stats(step.rewards, done, step.valid)
        actions_l = actions.reshape(-1).tolist()
        values_l = values.reshape(-1).tolist()
        logp_l = log_probs.reshape(-1).tolist()
        for i in range(n_envs):
            if not step.valid[i] or (groups is not None and finished_once[i]):
                continue
            seg = open_segs[i]
            if seg is None:
                n = int(last_obs["attention_mask"][i].sum())
                context = torch.as_tensor(np.asarray(last_obs["input_ids"][i][:n]), dtype=torch.long)
                seg = open_segs[i] = _OpenSegment(context, -1 if groups is None else groups[i])
            seg.tokens.append(int(actions_l[i]))
            seg.logprobs.append(float(logp_l[i]))
            seg.values.append(float(values_l[i]))
            seg.rewards.append(float(step.rewards[i]))
            ref = _info_value(step.infos, "ref_logprob", i)
            kl = _info_value(step.infos, "kl", i)
            seg.ref_logprobs.append(float(ref) if ref is not None else float("nan"))
            algo._response_kl[i] += float(kl) if kl is not None else 0.0
            algo._response_len[i] += 1
            if done[i]:
                score = _info_value(step.infos, "score", i)
                prompt = _info_value(step.infos, "prompt", i)
                response = _info_value(step.infos, "response", i)
                # a time-limit truncation (outer wrapper) still has a future: bootstrap it
                last_value = 0.0
                if step.truncated[i] and not step.terminated[i]:
                    last_value = _truncation_value(algo, step, i, device)
                segments.append(seg.close(bool(step.terminated[i]), last_value,
                                          None if score is None else float(score), prompt, response,
                                          kept=seg.kept(contexts, i)))
                if score is not None:
                    stats.scores.append(float(score))
                    stats.kls.append(float(algo._response_kl[i]))
                    stats.lengths.append(int(algo._response_len[i]))
                    stats.samples.append((str(prompt or ""), str(response or ""), float(score)))
                    for key in _reward_keys(step.infos):
                        value = _info_value(step.infos, key, i)
                        stats.rewards.setdefault(key, []).append(float("nan") if value is None else float(value))
                open_segs[i] = None
                finished_once[i] = True
                algo._response_kl[i] = 0.0
                algo._response_len[i] = 0
        last_obs = step.obs
        algo._last_obs = step.obs
        algo._last_episode_starts = ~step.valid if env.next_step_autoreset else done
        n_steps += 1
        if groups is not None and finished_once.all():
            break
    stats.n_steps = n_steps
    # responses still open: bootstrap from the value of their current state
    still_open = [i for i in range(n_envs) if open_segs[i] is not None]
    if still_open:
        with torch.no_grad():
            last_values = policy.predict_values(as_tensor(last_obs, algo.observation_space, device)).reshape(-1)
        for i in still_open:
            segments.append(open_segs[i].close(False, float(last_values[i]), None, "", "", kept=open_segs[i].kept(contexts, i)))
    callback.update_locals(locals())
    callback.on_rollout_end()
    return True, segments, stats


def _truncation_value(algo: Any, step: Any, i: int, device: Any) -> float:
    from agents.preprocessing import as_tensor

    obs = step.final_obs if step.final_obs is not None else step.obs
    row = {k: v[i : i + 1] for k, v in obs.items()}
    with torch.no_grad():
        return float(algo.policy.predict_values(as_tensor(row, algo.observation_space, device)).reshape(-1)[0])
