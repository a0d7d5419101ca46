"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

The same script runs on every rank. ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` (called by the agents and the offline trainers
themselves, so a user script needs no change) joins the process group with gloo on CPU
and NCCL on CUDA. Then:

- every rank starts from rank 0's parameters (:func:`broadcast_parameters`);
- every rank draws its own data: agents seed their envs with ``seed + rank * n_envs``, so
  2 ranks x N envs see the envs of one process with 2N envs; the offline trainers give
  each rank its share of every global batch (:func:`shard`);
- after ``backward`` the gradients are averaged (:func:`allreduce_gradients`), weighted by
  each rank's sample count, so one update equals the update of one process on the union of
  the ranks' batches (the "doubled batch"), and every rank applies the same update;
- logging, progress bars and checkpoints happen on rank 0 only (:func:`is_main_process`).

Outside ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every function is a cheap no-op.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it; unset it to run one process)") from None


def launched_by_torchrun() -> bool:
    """True when ``WORLD_SIZE`` > 1 in the environment (``torchrun --nproc_per_node=N``, N > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_distributed() -> bool:
    """True once a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: torch.device | str | None = None, backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment variables, once.

    :param device: the training device; ``cuda`` picks NCCL and ``cuda:LOCAL_RANK``, anything else gloo
    :param backend: force a backend (``"gloo"``, ``"nccl"``)
    :param timeout_s: collective timeout (default: torch's)
    :return: True when this process is one of several ranks
    :raises RuntimeError: when torchrun's variables are incomplete
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: launch with "
            "`torchrun --nproc_per_node=N script.py` (or unset WORLD_SIZE for one process)"
        )
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    use_cuda = local_device(device).type == "cuda"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    kwargs = {}
    if timeout_s is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, **kwargs)
    return is_distributed()


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 outside torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    """Number of ranks (1 outside torchrun)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the rank that logs and saves."""
    return rank() == 0


def local_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank).

    :raises ValueError: a string that is no torch device, or a device this machine lacks
        (``envs.device.check_device``)
    """
    from envs.device import check_device

    device = check_device(device)
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", local_rank())
    return device


def rank_seed(seed: int | None, stride: int = 1) -> int | None:
    """``seed + rank * stride``: different data on each rank, reproducible per rank.

    :param stride: seeds used per rank (an agent with N envs uses seeds seed..seed+N-1)
    """
    return None if seed is None else int(seed) + rank() * int(stride)


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by dtype: one flat collective per group rather than one per tensor."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the 1-D ``flat`` shaped as the tensors of ``like``, in order."""
    return [chunk.view_as(t) for chunk, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


@torch.no_grad()
def broadcast_parameters(module_or_params: torch.nn.Module | Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (in place)."""
    if not is_distributed():
        return
    if isinstance(module_or_params, torch.nn.Module):
        tensors = list(module_or_params.parameters()) + list(module_or_params.buffers())
    else:
        tensors = list(module_or_params)
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return
    for group in _by_dtype(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        for t, chunk in zip(group, _split_like(flat, group)):
            t.copy_(chunk)


@torch.no_grad()
def allreduce_gradients(params: Iterable[torch.Tensor], weight: float | None = None) -> None:
    """Average the gradients of ``params`` over ranks, in place (call after ``backward``,
    before clipping and ``optimizer.step``).

    :param weight: this rank's number of samples when the ranks' batches differ in size:
        the result is then ``sum_r weight_r * grad_r / sum_r weight_r``, the gradient of the
        mean loss over the union of the batches. ``None``: a plain average (equal batches).

    Parameters without a gradient on this rank count as zero (every rank must take part in
    the same collective).
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for group in _by_dtype(params):
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        if weight is None:
            flat = torch.cat(grads)
            dist.all_reduce(flat)
            flat.div_(world_size())
        else:
            # the weight travels in the same message: one collective per dtype
            w = torch.tensor([float(weight)], dtype=group[0].dtype, device=group[0].device)
            flat = torch.cat(grads + [w.clone()])
            flat[:-1].mul_(w)
            dist.all_reduce(flat)
            total = flat[-1].clone()
            flat = flat[:-1]
            if float(total) > 0:
                flat.div_(total)
        for p, chunk in zip(group, _split_like(flat, group)):
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)


def allreduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a number over ranks (the number itself in one process)."""
    if not is_distributed():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1).clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def allreduce_any(flag: bool) -> bool:
    """True when ``flag`` is True on any rank (every rank gets the same answer)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def allreduce_min(value: int) -> int:
    """The smallest of an integer over ranks (the integer itself in one process), e.g. a
    number of minibatches that every rank must run."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def shard(indices: Sequence[int]) -> tuple[list[int], float]:
    """This rank's share of a global batch, and its weight for :func:`allreduce_gradients`.

    Rank ``r`` takes ``indices[r::world_size]``; a rank whose share is empty gets weight 0
    and must still join the gradient all-reduce (with zero gradients).

    :return: ``(local_indices, len(local_indices))``
    """
    local = list(indices)[rank() :: world_size()]
    return local, float(len(local))


def destroy() -> None:
    """Leave the process group (end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "allreduce_any",
    "allreduce_gradients",
    "allreduce_mean",
    "allreduce_min",
    "barrier",
    "broadcast_parameters",
    "destroy",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "local_device",
    "local_rank",
    "rank",
    "rank_seed",
    "shard",
    "world_size",
]
