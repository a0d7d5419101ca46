"""Callbacks with SB3's hooks: ``_on_training_start``, ``_on_rollout_start``, ``_on_step``
(return False to stop), ``_on_rollout_end``, ``_on_training_end``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from agents import distributed
from agents.evaluation import evaluate_policy


class BaseCallback:
    """Base class; override the ``_on_*`` hooks.

    :param verbose: 0 quiet, 1 info messages
    """

    def __init__(self, verbose: int = 0):
        self.verbose = verbose
        self.model: Any = None
        self.n_calls = 0
        self.num_timesteps = 0
        self.locals: dict[str, Any] = {}
        self.globals: dict[str, Any] = {}
        self.parent: BaseCallback | None = None

    @property
    def training_env(self) -> Any:
        return self.model.get_env()

    @property
    def logger(self) -> Any:
        return self.model.logger

    def init_callback(self, model: Any) -> None:
        self.model = model
        self._init_callback()

    def _init_callback(self) -> None:
        pass

    def on_training_start(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        self.locals, self.globals = locals_, globals_
        self.num_timesteps = self.model.num_timesteps
        self._on_training_start()

    def _on_training_start(self) -> None:
        pass

    def on_rollout_start(self) -> None:
        self._on_rollout_start()

    def _on_rollout_start(self) -> None:
        pass

    def on_step(self) -> bool:
        self.n_calls += 1
        self.num_timesteps = self.model.num_timesteps
        return self._on_step()

    def _on_step(self) -> bool:
        return True

    def on_rollout_end(self) -> None:
        self._on_rollout_end()

    def _on_rollout_end(self) -> None:
        pass

    def on_training_end(self) -> None:
        self._on_training_end()

    def _on_training_end(self) -> None:
        pass

    def update_locals(self, locals_: dict[str, Any]) -> None:
        self.locals.update(locals_)
        self.update_child_locals(locals_)

    def update_child_locals(self, locals_: dict[str, Any]) -> None:
        pass


class EventCallback(BaseCallback):
    """Runs ``callback`` when an event fires (e.g. a new best evaluation)."""

    def __init__(self, callback: BaseCallback | None = None, verbose: int = 0):
        super().__init__(verbose=verbose)
        self.callback = callback
        if callback is not None:
            callback.parent = self

    def init_callback(self, model: Any) -> None:
        super().init_callback(model)
        if self.callback is not None:
            self.callback.init_callback(self.model)

    def _on_training_start(self) -> None:
        if self.callback is not None:
            self.callback.on_training_start(self.locals, self.globals)

    def _on_event(self) -> bool:
        return self.callback.on_step() if self.callback is not None else True

    def update_child_locals(self, locals_: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback.update_locals(locals_)


class CallbackList(BaseCallback):
    """Several callbacks, called in order; training stops if any ``_on_step`` is False."""

    def __init__(self, callbacks: list[BaseCallback]):
        super().__init__()
        self.callbacks = list(callbacks)

    def _init_callback(self) -> None:
        for cb in self.callbacks:
            cb.init_callback(self.model)

    def _on_training_start(self) -> None:
        for cb in self.callbacks:
            cb.on_training_start(self.locals, self.globals)

    def _on_rollout_start(self) -> None:
        for cb in self.callbacks:
            cb.on_rollout_start()

    def _on_step(self) -> bool:
        continue_training = True
        for cb in self.callbacks:
            continue_training = cb.on_step() and continue_training
        return continue_training

    def _on_rollout_end(self) -> None:
        for cb in self.callbacks:
            cb.on_rollout_end()

    def _on_training_end(self) -> None:
        for cb in self.callbacks:
            cb.on_training_end()

    def update_child_locals(self, locals_: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.update_locals(locals_)


class CheckpointCallback(BaseCallback):
    """Save the model every ``save_freq`` calls as ``{save_path}/{name_prefix}_{steps}_steps.zip``.

    :param save_freq: calls between saves (one call = one vector step)
    :param save_path: directory
    :param name_prefix: file name prefix
    :param save_only_model: checkpoints without the optimizer state (Hugging Face's
        ``save_only_model``; see ``save``): a third of a text agent's checkpoint, resumed
        with a fresh optimizer
    """

    def __init__(self, save_freq: int, save_path: str, name_prefix: str = "rl_model", verbose: int = 0,
                 save_only_model: bool = False, **kwargs: Any):
        super().__init__(verbose)
        self.save_freq, self.save_path, self.name_prefix = save_freq, save_path, name_prefix
        self.save_only_model = bool(save_only_model)

    def _init_callback(self) -> None:
        os.makedirs(self.save_path, exist_ok=True)

    def _checkpoint_path(self) -> str:
        return os.path.join(self.save_path, f"{self.name_prefix}_{self.num_timesteps}_steps.zip")

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0 and distributed.is_main_process():  # rank 0 saves
            path = self._checkpoint_path()
            self.model.save(path, save_only_model=self.save_only_model)
            if self.verbose >= 1:
                print(f"Saving model checkpoint to {path}")
        return True


class StopTrainingOnRewardThreshold(BaseCallback):
    """Used as ``EvalCallback(callback_on_new_best=...)``: stop once the best mean
    evaluation return reaches ``reward_threshold``."""

    def __init__(self, reward_threshold: float, verbose: int = 0):
        super().__init__(verbose=verbose)
        self.reward_threshold = reward_threshold

    def _on_step(self) -> bool:
        assert self.parent is not None, "StopTrainingOnRewardThreshold must be used with an EvalCallback"
        continue_training = bool(self.parent.best_mean_reward < self.reward_threshold)
        if self.verbose >= 1 and not continue_training:
            print(
                f"Stopping training because the mean reward {self.parent.best_mean_reward:.2f} "
                f"is above the threshold {self.reward_threshold}"
            )
        return continue_training


class EvalCallback(EventCallback):
    """Evaluate every ``eval_freq`` calls; keep the best model; log ``eval/mean_reward``
    and ``eval/mean_ep_length``.

    :param eval_env: env to evaluate on (id, Env, VectorEnv or SB3 VecEnv)
    :param callback_on_new_best: run when the mean return improves
    :param callback_after_eval: run after every evaluation
    :param n_eval_episodes: episodes per evaluation
    :param eval_freq: calls between evaluations (one call = one vector step)
    :param log_path: where ``evaluations.npz`` goes
    :param best_model_save_path: where ``best_model.zip`` goes
    :param deterministic: deterministic actions during evaluation
    """

    def __init__(
        self,
        eval_env: Any,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        log_path: str | None = None,
        best_model_save_path: str | None = None,
        deterministic: bool = True,
        render: bool = False,
        verbose: int = 1,
        warn: bool = True,
    ):
        super().__init__(callback_after_eval, verbose=verbose)
        self.callback_on_new_best = callback_on_new_best
        if callback_on_new_best is not None:
            callback_on_new_best.parent = self
        from agents.vec_env import wrap_env

        self.eval_env = wrap_env(eval_env)
        self.n_eval_episodes = n_eval_episodes
        self.eval_freq = eval_freq
        self.best_mean_reward = -np.inf
        self.last_mean_reward = -np.inf
        self.deterministic = deterministic
        self.render = render
        self.best_model_save_path = best_model_save_path
        self.log_path = os.path.join(log_path, "evaluations") if log_path is not None else None
        self.evaluations_timesteps: list[int] = []
        self.evaluations_results: list[list[float]] = []
        self.evaluations_length: list[list[int]] = []

    def _init_callback(self) -> None:
        if self.eval_env.observation_space != self.model.observation_space:
            raise ValueError(
                f"EvalCallback: eval env observation space {self.eval_env.observation_space} differs from the "
                f"training env's {self.model.observation_space}"
            )
        for path in (self.best_model_save_path, os.path.dirname(self.log_path) if self.log_path else None):
            if path:
                os.makedirs(path, exist_ok=True)
        if self.callback_on_new_best is not None:
            self.callback_on_new_best.init_callback(self.model)

    def _on_step(self) -> bool:
        continue_training = True
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            rewards, lengths = evaluate_policy(
                self.model,
                self.eval_env,
                n_eval_episodes=self.n_eval_episodes,
                deterministic=self.deterministic,
                return_episode_rewards=True,
            )
            self.evaluations_timesteps.append(self.num_timesteps)
            self.evaluations_results.append(rewards)
            self.evaluations_length.append(lengths)
            if self.log_path is not None:
                np.savez(
                    self.log_path,
                    timesteps=self.evaluations_timesteps,
                    results=self.evaluations_results,
                    ep_lengths=self.evaluations_length,
                )
            mean_reward, mean_length = float(np.mean(rewards)), float(np.mean(lengths))
            self.last_mean_reward = mean_reward
            if self.verbose >= 1:
                print(f"Eval num_timesteps={self.num_timesteps}, episode_reward={mean_reward:.2f} +/- {np.std(rewards):.2f}")
                print(f"Episode length: {mean_length:.2f} +/- {np.std(lengths):.2f}")
            self.logger.record("eval/mean_reward", mean_reward)
            self.logger.record("eval/mean_ep_length", mean_length)
            self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
            self.logger.dump(self.num_timesteps)
            if mean_reward > self.best_mean_reward:
                if self.verbose >= 1:
                    print("New best mean reward!")
                if self.best_model_save_path is not None:
                    self.model.save(os.path.join(self.best_model_save_path, "best_model"))
                self.best_mean_reward = mean_reward
                if self.callback_on_new_best is not None:
                    continue_training = self.callback_on_new_best.on_step()
            if self.callback is not None:
                continue_training = continue_training and self._on_event()
        return continue_training


class ProgressBarCallback(BaseCallback):
    """A tqdm progress bar over ``total_timesteps`` (``learn(progress_bar=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pbar = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.pbar = tqdm(total=self.locals["total_timesteps"] - self.model.num_timesteps, unit="steps")
        self._last = self.model.num_timesteps

    def _on_step(self) -> bool:
        step = self.model.num_timesteps - self._last
        if self.pbar.total is not None and self.pbar.n + step > self.pbar.total:
            # the last rollout runs past total_timesteps (whole rollouts, as SB3): the bar grows
            # with it rather than dropping its total ("312steps" instead of "312/312")
            self.pbar.total = self.pbar.n + step
        self.pbar.update(step)
        self._last = self.model.num_timesteps
        return True

    def _on_training_end(self) -> None:
        self.pbar.refresh()
        self.pbar.close()


def convert_callback(callback: Any) -> BaseCallback:
    """None -> a no-op callback; a list -> ``CallbackList``; a plain function
    ``f(locals, globals) -> bool`` -> a wrapper."""
    if callback is None:
        return BaseCallback()
    if isinstance(callback, (list, tuple)):
        return CallbackList([convert_callback(cb) for cb in callback])
    if isinstance(callback, BaseCallback):
        return callback
    if callable(callback):
        return _FunctionCallback(callback)
    raise ValueError(f"callback must be a BaseCallback, a list of them or a function, got {type(callback).__name__}")


class _FunctionCallback(BaseCallback):
    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn

    def _on_step(self) -> bool:
        return self.fn(self.locals, self.globals) is not False
