"""Guards that keep a long run's work safe.

- :func:`check_finite`: a non-finite loss or gradient stops training with an error naming
  the update and the last good checkpoint (``on_nonfinite="raise"``), or skips that batch
  (``on_nonfinite="skip"``), before the optimizer can spread NaN into the weights.
- :func:`training_guard`: while ``learn`` runs with a :class:`~agents.callbacks.CheckpointCallback`,
  Ctrl-C or SIGTERM stops at the next environment step (weights never half-updated),
  writes a final checkpoint and raises :class:`TrainingInterrupted`, which names it. A
  second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from typing import Any, Iterator

import torch

from agents import distributed

ON_NONFINITE = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite.

    :ivar step: the update (``n_updates``) where it happened
    :ivar checkpoint: the last checkpoint written before it (None when there is none)
    """

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after writing a final checkpoint.

    :ivar checkpoint: the path of that checkpoint (None on ranks other than 0)
    :ivar num_timesteps: the step counter at the stop
    """

    def __init__(self, message: str, checkpoint: str | None = None, num_timesteps: int | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.num_timesteps = num_timesteps

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "training interrupted"


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    low_open: bool = False,
) -> float | int:
    """``value`` as a number, or a ``TypeError``/``ValueError`` that names the argument.

    :param name: the argument's name, for the message
    :param low: smallest allowed value (None: no bound)
    :param high: largest allowed value (None: no bound)
    :param integer: require an integer (bools are refused)
    :param low_open: exclude ``low`` itself
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (hasattr(value, "__index__") or hasattr(value, "__float__")):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer() or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be {kind}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"{name} must be {kind}, got nan")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_finite(
    loss: torch.Tensor | float,
    grad_norm: torch.Tensor | float | None,
    step: int,
    on_nonfinite: str = "raise",
    last_checkpoint: str | None = None,
    what: str = "update",
) -> bool:
    """Whether this batch may be applied.

    Call after ``backward`` (and the gradient all-reduce) and before ``optimizer.step``;
    ``grad_norm`` is what ``clip_grad_norm_`` returns (non-finite if any gradient is). In a
    multi-process run the ranks agree: a batch is bad if it is bad on any rank.

    :param loss: the loss of the batch
    :param grad_norm: total gradient norm, or None when not computed
    :param step: the update number, for the message
    :param on_nonfinite: ``"raise"`` (stop with :class:`NonFiniteError`) or ``"skip"`` (return False)
    :param last_checkpoint: the last good checkpoint, for the message
    :param what: what ``step`` counts ("update", "step", ...)
    :return: True when loss and gradients are finite; False to skip the batch
    :raises NonFiniteError: on a non-finite value with ``on_nonfinite="raise"``
    :raises ValueError: on an unknown ``on_nonfinite``
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    loss_value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
    norm_value = None if grad_norm is None else (float(grad_norm.item()) if isinstance(grad_norm, torch.Tensor) else float(grad_norm))
    bad_here = not math.isfinite(loss_value) or (norm_value is not None and not math.isfinite(norm_value))
    if not distributed.allreduce_any(bad_here):
        return True
    if on_nonfinite == "skip":
        return False
    where = "the last good checkpoint is " + repr(last_checkpoint) if last_checkpoint else "no checkpoint was written yet"
    raise NonFiniteError(
        f"non-finite values at {what} {step} (loss={loss_value}, gradient norm={norm_value}"
        f"{'' if bad_here else ', on another rank'}); the weights were not updated; {where}. "
        "Lower the learning rate or check the rewards/inputs; pass on_nonfinite='skip' to drop such batches.",
        step=step,
        checkpoint=last_checkpoint,
    )


def find_checkpoint_callback(callback: Any) -> Any:
    """The first :class:`~agents.callbacks.CheckpointCallback` in a callback tree, or None."""
    from agents.callbacks import CheckpointCallback

    if isinstance(callback, CheckpointCallback):
        return callback
    for child in list(getattr(callback, "callbacks", [])) + [getattr(callback, "callback", None)]:
        if child is not None:
            found = find_checkpoint_callback(child)
            if found is not None:
                return found
    return None


def _interrupt_callback_class():
    from agents.callbacks import BaseCallback

    class _InterruptCheck(BaseCallback):
        """Stops ``learn`` at the next environment step once a stop was requested (on any rank)."""

        def __init__(self, state: dict):
            super().__init__()
            self.state = state

        def _on_step(self) -> bool:
            return not distributed.allreduce_any(self.state["requested"])

    return _InterruptCheck


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """While active, SIGINT and SIGTERM only set ``state["requested"]`` (and
    ``state["signal"]``), so the loop can stop at a safe point; a second SIGINT raises
    ``KeyboardInterrupt`` at once. The previous handlers come back on exit. Outside the
    main thread nothing is installed.

    :return: (yields) the state dict
    """
    state = {"requested": False, "signal": None}

    def request_stop(signum, frame):
        if state["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        state["requested"] = True
        state["signal"] = signal.Signals(signum).name
        if distributed.is_main_process():
            print(
                f"\n{state['signal']} received: stopping after this step and writing a checkpoint"
                + (" (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""),
                file=sys.stderr,
                flush=True,
            )

    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, request_stop)
    try:
        yield state
    finally:
        for sig, handler in installed.items():
            signal.signal(sig, handler)


def interrupted_error(state: dict, step: int, path: str | None, what: str = "step") -> TrainingInterrupted:
    """The :class:`TrainingInterrupted` to raise after the final checkpoint ``path``."""
    why = state.get("signal") or "KeyboardInterrupt"
    return TrainingInterrupted(
        f"training interrupted ({why}) at {what} {step}; "
        + (f"final checkpoint written to {path}" if path else "rank 0 wrote the final checkpoint"),
        checkpoint=path,
        num_timesteps=step,
    )


@contextlib.contextmanager
def training_guard(model: Any, callback: Any) -> Iterator[Any]:
    """Wrap the body of ``learn``: yields the callback to use.

    Without a ``CheckpointCallback`` in ``callback`` this changes nothing. With one:
    SIGINT/SIGTERM set a flag (a second SIGINT raises at once), ``learn`` stops at the next
    step, a final checkpoint ``{save_path}/{name_prefix}_{num_timesteps}_steps.zip`` is
    written (rank 0) and :class:`TrainingInterrupted` is raised. A ``KeyboardInterrupt``
    raised inside ``learn`` (by a callback or an env) is handled the same way.
    """
    from agents.callbacks import CallbackList

    checkpoint_cb = find_checkpoint_callback(callback)
    if checkpoint_cb is None:
        yield callback
        return
    interrupted = False
    with stop_requests() as state:
        guard = _interrupt_callback_class()(state)
        guarded = CallbackList([callback, guard])
        guarded.init_callback(model)  # (re-initialising ``callback`` only re-binds the model)
        try:
            yield guarded
            interrupted = state["requested"]
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        path = checkpoint_cb._checkpoint_path() if distributed.is_main_process() else None
        if path is not None:
            model.save(path, save_only_model=getattr(checkpoint_cb, "save_only_model", False))
        raise interrupted_error(state, model.num_timesteps, path)
