"""The private torch kernels of the fast paths, guarded.

:mod:`agents.fast_mlp` (PPO's hand-written MLP gradients and flat Adam) and the lean gradient
clipping and Adam step of every agent (:func:`lean_clip_grad_norm`, :func:`lean_adam_step`,
behind :func:`clip_grad_norm` and :func:`optimizer_step`) call private torch kernels: ``torch._fused_adam_`` (Adam's fused
update), ``aten.tanh_backward`` / ``aten.threshold_backward`` (the activations' backward) and
``torch._foreach_norm`` / ``_foreach_mul_`` / ``_foreach_add_`` (clipping, step counts). They
skip Python bookkeeping that costs more than the maths for small networks (measured in
``docs/benchmarks.md``).

:func:`fast_path_unavailable` checks once per process that they exist and compute what these
functions expect (against public torch on a few numbers). Where they do not (another torch),
it warns once, the lean functions return None/False and the fast PPO loss is not built: every
agent then clips with ``torch.nn.utils.clip_grad_norm_``, steps with ``optimizer.step()`` and
PPO takes its autograd path. The same numbers, only slower.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

_UNCHECKED = object()
_fast_path_state: list = [_UNCHECKED]  # None (available) or the reason it is not, once checked


def _aten_op(name: str) -> Any:
    """``torch.ops.aten.<name>.default``, or None where this torch has no such kernel."""
    try:
        return getattr(torch.ops.aten, name).default
    except (AttributeError, RuntimeError):
        return None


# the activations' own backward kernels: dy * (1 - y^2) and dy * (y > 0) in one pass each
_TANH_BACKWARD = _aten_op("tanh_backward")
_THRESHOLD_BACKWARD = _aten_op("threshold_backward")


def _tanh_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _TANH_BACKWARD(grad, y)


def _relu_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _THRESHOLD_BACKWARD(grad, y, 0)


def _fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps) -> None:
    """Adam's update of tensors in place as ONE fused kernel (``torch.optim.Adam(fused=True)``'s
    kernel, called without the optimizer's Python bookkeeping)."""
    torch._fused_adam_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None,
    )


def lean_clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """``torch.nn.utils.clip_grad_norm_``'s maths (scale by ``max_norm / (norm + 1e-6)`` when
    above) for gradients of one device and dtype, as two foreach kernels without its
    per-call grouping; None where it does not apply (mixed devices or dtypes, sparse
    gradients, or a torch without the kernels): then call torch's function.

    :return: the total gradient norm before clipping
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    first = grads[0]
    if fast_path_unavailable() or any(g.device != first.device or g.dtype != first.dtype or g.is_sparse for g in grads):
        return None
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def lean_adam_step(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()`` of a fused single-group ``torch.optim.Adam`` whose state exists,
    as the two kernels Adam runs (step count, fused update) without its Python bookkeeping
    (profiler hooks, state grouping). Returns False, doing nothing, where that does not
    apply (another optimizer or setting, the first step, a partial gradient, or a torch
    without the kernels): then call ``optimizer.step()``."""
    groups = optimizer.param_groups
    if type(optimizer) is not torch.optim.Adam or len(groups) != 1:
        return False
    group = groups[0]
    if not group.get("fused") or group["amsgrad"] or group["maximize"] or group.get("differentiable") or group.get(
        "capturable"
    ) or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor) or fast_path_unavailable():
        return False
    params = group["params"]
    states = [optimizer.state.get(p) for p in params]
    if any(p.grad is None or not st for p, st in zip(params, states)):
        return False  # first step (state created there) or a partial gradient
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    _fused_adam(params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                steps, group["lr"], beta1, beta2, group["weight_decay"], group["eps"])
    return True


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``: through the lean version of
    this module (same maths, without the per-call grouping that costs more than
    the clipping for a small network) where this torch has the kernels it calls, through
    torch's function otherwise.

    :return: the total gradient norm before clipping
    """
    total = lean_clip_grad_norm(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if total is None else total


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; for a fused single-group Adam whose state exists, the same
    kernels through :func:`lean_adam_step` (without the optimizer's Python
    bookkeeping, which costs more than the update for a small network) where this torch
    has them."""
    if not lean_adam_step(optimizer):
        optimizer.step()


def _check_private_kernels() -> str | None:
    """None when the private kernels compute what this module expects, else why not."""
    try:
        y = torch.tensor([-0.5, 0.0, 0.25, 0.9])
        g = torch.tensor([1.0, -2.0, 0.5, 3.0])
        if not torch.allclose(_tanh_backward(g, y), g * (1 - y * y)):
            return "aten.tanh_backward computes something else"
        if not torch.allclose(_relu_backward(g, y), g * (y > 0)):
            return "aten.threshold_backward computes something else"
        # two Adam steps against torch.optim.Adam (public) on the same numbers
        p_ref = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        ref = torch.optim.Adam([p_ref], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
        p = p_ref.detach().clone()
        m, v, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
        for grad in (torch.tensor([0.3, -1.0, 2.0]), torch.tensor([-0.2, 0.5, 1.0])):
            p_ref.grad = grad.clone()
            ref.step()
            step.add_(1)
            _fused_adam([p], [grad.clone()], [m], [v], [step], 0.1, 0.9, 0.99, 0.01, 1e-8)
        if not torch.allclose(p, p_ref.detach(), atol=1e-6):
            return "torch._fused_adam_ computes something else than torch.optim.Adam"
        norms = torch._foreach_norm([g, y])
        if not torch.allclose(torch.stack(norms), torch.stack([g.norm(), y.norm()])):
            return "torch._foreach_norm computes something else"
        scaled = [g.clone()]
        torch._foreach_mul_(scaled, torch.tensor(0.5))
        if not torch.allclose(scaled[0], g * 0.5):
            return "torch._foreach_mul_ computes something else"
    except Exception as exc:  # missing or changed signature: any failure means "not here"
        return f"{type(exc).__name__}: {exc}"
    return None


def fast_path_unavailable() -> str | None:
    """Why the hand-written fast path cannot run on this torch (None when it can), checked
    once per process; the first time it cannot, one warning says so."""
    if _fast_path_state[0] is _UNCHECKED:
        reason = _check_private_kernels()
        _fast_path_state[0] = reason
        if reason is not None:
            warnings.warn(
                f"agents.fast_mlp: the private torch kernels of PPO's fast path are not usable on torch "
                f"{torch.__version__} ({reason}); PPO uses autograd and torch.optim instead (same results, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _fast_path_state[0]
