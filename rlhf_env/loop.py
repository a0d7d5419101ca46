"""The loop the offline trainers (reward model, SFT, DPO) share around their losses:
data order, data-parallel steps, the non-finite guard, checkpoints, resume and interrupts.

A trainer writes::

    loop = TrainLoop("dpo", model, optimizer, lengths, cfg.batch_size, cfg.epochs, gen, ...)
    for epoch in loop.epochs():
        for idx in loop.batches(epoch):          # global batch; resumes where a checkpoint stopped
            local, weight = loop.shard(idx)      # this rank's share
            loss = ...                           # mean loss over ``local`` (None when empty)
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            if not loop.step(loss, weight):      # all-reduce, NaN guard, optimizer/scheduler step, checkpoint
                continue

A checkpoint (``{checkpoint_dir}/checkpoint_{step}.pt``, written to a temporary file and
renamed, the newest ``keep`` kept) holds the model's and optimizer's state, the
scheduler's, the step, the position in the data (epoch, batch, the data-order generator at
the epoch's start) and the random-number generators: resuming from it replays exactly the
batches that were left. Ctrl-C or SIGTERM stop at the next batch, write a checkpoint (when
``checkpoint_dir`` is set) and raise :class:`agents.guards.TrainingInterrupted`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from rlhf_env.agents import distributed
from rlhf_env.agents.guards import check_finite, interrupted_error, stop_requests
from rlhf_env.training import length_batches
from rlhf_env.agents.atomic import atomic_file

FORMAT = "rlhf-env-trainer-checkpoint"


def latest_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """``path`` itself when it is a file, else the newest ``checkpoint_*.pt`` in the folder.

    :raises FileNotFoundError: naming the path when there is none
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else -1)
        if found:
            return found[-1]
        raise FileNotFoundError(f"no checkpoint_*.pt in {str(path)!r}: nothing to resume from")
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def save_atomic(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never
    leaves a partial file under ``path``."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class TrainLoop:
    """Epochs and batches of an offline trainer, with checkpoints, resume and guards.

    :param kind: the trainer's name (``"reward_model"``, ``"sft"``, ``"dpo"``); a checkpoint of another kind is refused
    :param model: the trained module (its ``state_dict`` is checkpointed)
    :param optimizer: its optimizer
    :param lengths: the length of every training example (batches group similar lengths)
    :param batch_size: examples per global batch (over all ranks)
    :param epochs: passes over the data
    :param generator: the data-order generator (seeded by the trainer)
    :param scheduler: an optional learning-rate scheduler, stepped after each update
    :param checkpoint_dir: where checkpoints go (None: no checkpoints; interrupts then just stop)
    :param checkpoint_every: updates between checkpoints (None: only on interrupt and at the end)
    :param resume_from: a checkpoint file, or a folder (its newest checkpoint)
    :param on_nonfinite: ``"raise"`` or ``"skip"`` for a NaN/inf loss or gradient
    :param keep: checkpoints kept in ``checkpoint_dir`` (older ones are removed)
    """

    def __init__(
        self,
        kind: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lengths: Sequence[int],
        batch_size: int,
        epochs: int,
        generator: torch.Generator,
        scheduler: Any = None,
        checkpoint_dir: Union[str, os.PathLike, None] = None,
        checkpoint_every: Optional[int] = None,
        resume_from: Union[str, os.PathLike, None] = None,
        on_nonfinite: str = "raise",
        keep: int = 2,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive number of updates or None, got {checkpoint_every!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.kind, self.model, self.optimizer, self.scheduler = kind, model, optimizer, scheduler
        self.lengths, self.batch_size, self.n_epochs, self.generator = list(lengths), batch_size, epochs, generator
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.on_nonfinite, self.keep = checkpoint_every, on_nonfinite, keep
        self.step_count = 0  # updates applied (and skipped) so far
        self.skipped = 0
        self.epoch = 0
        self.next_batch = 0  # index, within the epoch, of the next batch to run
        self.last_checkpoint: Optional[str] = None
        self.total_steps = self.count_steps(len(self.lengths), batch_size, epochs)
        self._epoch_generator_state = generator.get_state()
        self._resumed_generator_state = None
        self._stop_state = {"requested": False, "signal": None}
        distributed.broadcast_parameters(model)  # every rank starts from rank 0's weights
        if resume_from is not None:
            self._resume(latest_checkpoint(resume_from))

    @staticmethod
    def count_steps(examples: int, batch_size: int, epochs: int) -> int:
        """Updates a loop over ``examples`` makes: ``ceil(examples / batch_size)`` an epoch
        (the last batch may be short)."""
        return -(-examples // batch_size) * epochs

    # --- data ------------------------------------------------------------------------
    def epochs(self) -> Iterator[int]:
        """The epochs still to run. While they run, Ctrl-C/SIGTERM only request a stop,
        honoured before the next batch; a final checkpoint is written at the end."""
        with stop_requests() as self._stop_state:
            yield from range(self.epoch, self.n_epochs)
            if self.checkpoint_dir is not None and self.last_checkpoint != str(self._path()):
                self.save()

    def batches(self, epoch: int) -> Iterator[list[int]]:
        """The global batches of ``epoch`` not yet trained on (index lists)."""
        if self._resumed_generator_state is not None and epoch == self.epoch:
            self.generator.set_state(self._resumed_generator_state)
            self._resumed_generator_state = None
        else:
            self.next_batch = 0
        self.epoch = epoch
        self._epoch_generator_state = self.generator.get_state()
        order = length_batches(self.lengths, self.batch_size, shuffle=True, generator=self.generator)
        for b in range(self.next_batch, len(order)):
            self._check_stop()
            yield order[b]
        self.epoch, self.next_batch = epoch + 1, 0
        self._epoch_generator_state = self.generator.get_state()

    @staticmethod
    def shard(idx: Sequence[int]) -> tuple[list[int], float]:
        """This rank's share of a global batch and its weight (see :func:`agents.distributed.shard`)."""
        return distributed.shard(idx)

    # --- update ----------------------------------------------------------------------
    def step(self, loss: Optional[torch.Tensor], weight: float, params: Optional[Sequence[torch.Tensor]] = None, max_grad_norm: Optional[float] = None) -> bool:
        """After ``loss.backward()``: average gradients over ranks, check them, step the
        optimizer and scheduler, checkpoint when due.

        :param loss: this rank's mean loss (None when its share of the batch was empty)
        :param weight: this rank's number of examples
        :param params: the trained parameters (default: those of the optimizer)
        :param max_grad_norm: clip the gradient norm (None: no clipping, norm still checked)
        :return: False when the batch was skipped (``on_nonfinite="skip"``)
        """
        if params is None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
        distributed.allreduce_gradients(params, weight=weight)
        grads = [p.grad for p in params if p.grad is not None]
        if max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        elif grads:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        else:
            grad_norm = None
        ok = check_finite(0.0 if loss is None else loss, grad_norm, self.step_count + 1, self.on_nonfinite, self.last_checkpoint, what=f"{self.kind} step")
        if ok:
            self.optimizer.step()
        else:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        self.next_batch += 1
        if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            self.save()
        return ok

    # --- checkpoints -----------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "step": self.step_count,
            "skipped": self.skipped,
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "epoch_generator_state": self._epoch_generator_state,
            "n_examples": len(self.lengths),
            "batch_size": self.batch_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save(self) -> Optional[str]:
        """Write ``checkpoint_{step}.pt`` (rank 0; atomic) and prune old ones.

        :return: its path (None without ``checkpoint_dir`` or on other ranks)
        """
        if self.checkpoint_dir is None or not distributed.is_main_process():
            return None
        path = save_atomic(self.state(), self._path())
        self.last_checkpoint = str(path)
        old = sorted(self.checkpoint_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else -1)
        for p in old[: -self.keep] if self.keep else []:
            if p != path:
                p.unlink(missing_ok=True)
        return self.last_checkpoint

    def _path(self) -> Path:
        return self.checkpoint_dir / f"checkpoint_{self.step_count}.pt"

    def _resume(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable trainer checkpoint ({type(exc).__name__}: {exc}); it may be truncated") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not a checkpoint written by the rlhf_env trainers")
        if state["kind"] != self.kind:
            raise ValueError(f"{path} is a {state['kind']} checkpoint, not {self.kind}: resume it with the {state['kind']} trainer")
        if state["n_examples"] != len(self.lengths) or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"{path} was written for {state['n_examples']} examples in batches of {state['batch_size']}, "
                f"this run has {len(self.lengths)} in batches of {self.batch_size}: resume with the same data and batch size"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step_count, self.skipped = state["step"], state["skipped"]
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]
        self._resumed_generator_state = state["epoch_generator_state"]
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.last_checkpoint = str(path)

    # --- stop --------------------------------------------------------------------------
    def _check_stop(self) -> None:
        if distributed.allreduce_any(self._stop_state["requested"]):
            raise interrupted_error(self._stop_state, self.step_count, self.save(), what=f"{self.kind} step")


def setup_distributed(device: Union[str, torch.device]) -> torch.device:
    """Join torchrun's process group if launched by it; the device this rank trains on
    (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    distributed.init_distributed(device)
    return distributed.local_device(device)


def check_config(cfg: Any, counts: tuple[str, ...] = ()) -> None:
    """Refuse a trainer config whose batch size or epoch count (or LoRA rank, where it has one
    and it is set, or any field named in ``counts``) is not a positive integer, before any
    model is loaded."""
    names = ["batch_size", "epochs", *counts] + (["lora_rank"] if getattr(cfg, "lora_rank", None) is not None else [])
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r} (in {type(cfg).__name__})")
