"""Hand-written forward and backward of PPO's loss for the plain MLP actor-critic.

For :class:`agents.policies.mlp.ActorCriticPolicy` with its stacked policy/value MLP
(same hidden sizes for both, tanh or ReLU) and a Discrete or 1-D Box action space, a PPO
update step is a few dozen tiny kernels; with autograd, recording and replaying the graph
costs more than the maths. :class:`FusedPPOLoss` computes the same loss as
``PPO.train()``'s autograd branch (clipped surrogate or KL penalty, optionally clipped
value loss, entropy bonus) and writes its gradients into ``param.grad`` directly:

    forward   h_l = act(h_{l-1} W_l + b_l)   (policy and value stacked: one baddbmm per layer)
              logits / mean = h_L^pi W_a + b_a,   V = h_L^vf W_v + b_v
    backward  dL/dlog_prob = -A * ratio / B  where the unclipped term is the smaller one
                             (clip)  or  (beta * (ratio - 1) - A * ratio) / B  (KL penalty)
              dL/dV = vf_coef * 2 (V_pred - R) / B  (zero where the value clip is active)
              then the chain rule through the heads and the layers, by hand

The gradients match autograd's to rounding (``tests/test_fast_path.py``). They live in one
flat buffer, so :meth:`FusedPPOLoss.clip_grad_norm_` scales them in one op, and with the
policy's default fused Adam the parameters and the optimizer state are views of flat
buffers too (:class:`FlatAdam`), so :meth:`FusedPPOLoss.optimizer_step` is one kernel
call. The gradient all-reduce (under torchrun) stays with the caller.

The private torch kernels it calls (fused Adam, the activations' backward) come from
:mod:`agents.fast_kernels`, behind its check: on a torch where they differ,
:meth:`FusedPPOLoss.for_policy` and :meth:`FlatAdam.for_optimizer` return None (after one
warning) and PPO takes its autograd path with ``torch.optim``: the same numbers, only slower.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from agents.fast_kernels import _fused_adam, _relu_backward, _tanh_backward, fast_path_unavailable, lean_adam_step
from agents.losses import clipped_surrogate, kl_penalty_surrogate, value_loss

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class FusedLossTerms(NamedTuple):
    """What ``PPO.train()`` logs and checks; all detached tensors."""

    ratio: torch.Tensor
    log_ratio: torch.Tensor
    pg_loss: torch.Tensor
    v_loss: torch.Tensor
    entropy_loss: torch.Tensor
    loss: torch.Tensor


def fused_unsupported_reason(policy: Any) -> str | None:
    """Why :class:`FusedPPOLoss` cannot serve ``policy`` (None when it can)."""
    from agents.policies.mlp import ActorCriticPolicy  # late: agents.policies imports much

    if type(policy) is not ActorCriticPolicy:
        return f"policy class {type(policy).__name__} is not ActorCriticPolicy"
    if not policy.mlp_extractor.stacked:
        return "policy and value networks differ in hidden sizes (net_arch)"
    if type(policy.mlp_extractor.activation) not in (nn.Tanh, nn.ReLU):
        return f"activation {type(policy.mlp_extractor.activation).__name__} (only Tanh and ReLU)"
    if not isinstance(policy.action_space, (spaces.Discrete, spaces.Box)):
        return f"action space {type(policy.action_space).__name__} (only Discrete and Box)"
    if isinstance(policy.action_space, spaces.Box) and getattr(policy, "squash_output", False):
        return "squashed Box actions"
    params = list(policy.parameters())
    if not all(p.requires_grad for p in params):
        return "some parameters are frozen (requires_grad=False)"
    if len({(p.dtype, p.device) for p in params}) != 1:
        return "parameters of several dtypes or devices"
    optimizer = getattr(policy, "optimizer", None)
    if optimizer is not None:
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if optimized != {id(p) for p in params}:
            return "the optimizer does not hold exactly the policy's parameters"
    return None


class FlatAdam:
    """``torch.optim.Adam(fused=True).step()`` as ONE fused kernel call on flat buffers.

    The parameters, their gradients and Adam's ``exp_avg``/``exp_avg_sq``/``step`` state
    are re-pointed to views of one flat tensor each (``param.data``, ``optimizer.state``),
    so the optimizer, ``state_dict`` and ``load_state_dict`` keep working unchanged while
    one update covers all tensors: Adam's maths is elementwise, so the numbers are
    exactly those of ``optimizer.step()`` (``tests/test_fast_path.py`` checks it against
    ``torch.optim.Adam``). The layout is kept on the optimizer and checked by pointer
    each time one is built; state loaded or replaced since is copied in again.

    Build it with :meth:`for_optimizer` (None where it does not apply).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], flat_grad: torch.Tensor):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.flat_grad = flat_grad
        layout = getattr(optimizer, "_flat_adam_layout", None)
        if layout is None or not self._is_current(layout, params):
            layout = self._flatten(optimizer, params)
            optimizer._flat_adam_layout = layout
        self.flat_param, self.exp_avg, self.exp_avg_sq, self.steps = layout
        self.step_view = self.steps[0]

    @classmethod
    def for_optimizer(
        cls, optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor], flat_grad: torch.Tensor
    ) -> "FlatAdam | None":
        """A flat Adam for ``optimizer`` over ``params`` (whose gradients are the views of
        ``flat_grad`` in that order), or None: the optimizer is not a single-group fused
        ``torch.optim.Adam`` with plain settings, or its state is not one shared step."""
        if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1 or fast_path_unavailable():
            return None
        group = optimizer.param_groups[0]
        if (
            not group.get("fused") or group["amsgrad"] or group["maximize"] or group.get("differentiable")
            or group.get("capturable") or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor)
            or len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params))
        ):
            return None
        states = [optimizer.state.get(p) for p in params]
        if any(states) and not all(st and {"step", "exp_avg", "exp_avg_sq"} <= st.keys() for st in states):
            return None  # some parameters have state, others not: leave it to optimizer.step()
        if all(states) and len({float(st["step"]) for st in states}) != 1:
            return None
        return cls(optimizer, params, flat_grad)

    def _is_current(self, layout: tuple[torch.Tensor, ...], params: list[torch.Tensor]) -> bool:
        flat_param, exp_avg, exp_avg_sq, steps = layout
        if flat_param.numel() != self.flat_grad.numel() or len(steps) != len(params):
            return False
        size, offset = flat_param.element_size(), 0
        for i, p in enumerate(params):
            st = self.optimizer.state.get(p)
            if (
                not st or p.data_ptr() != flat_param.data_ptr() + offset * size
                or st["exp_avg"].data_ptr() != exp_avg.data_ptr() + offset * size
                or st["exp_avg_sq"].data_ptr() != exp_avg_sq.data_ptr() + offset * size
                or st["step"].data_ptr() != steps.data_ptr() + i * steps.element_size()
            ):
                return False
            offset += p.numel()
        return True

    @torch.no_grad()
    def _flatten(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        flat_param = torch.cat([p.detach().reshape(-1) for p in params])
        states = [optimizer.state.get(p) for p in params]
        if all(states):  # copy the existing state in
            exp_avg = torch.cat([st["exp_avg"].reshape(-1) for st in states]).to(flat_param)
            exp_avg_sq = torch.cat([st["exp_avg_sq"].reshape(-1) for st in states]).to(flat_param)
            steps = torch.stack([st["step"].reshape(()) for st in states]).to(device=flat_param.device, dtype=torch.float32)
        else:  # Adam's first step creates zero state, as here
            exp_avg, exp_avg_sq = torch.zeros_like(flat_param), torch.zeros_like(flat_param)
            steps = torch.zeros(len(params), dtype=torch.float32, device=flat_param.device)
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            p.data = flat_param[offset : offset + n].view_as(p)
            optimizer.state[p] = {
                "step": steps[i],
                "exp_avg": exp_avg[offset : offset + n].view_as(p),
                "exp_avg_sq": exp_avg_sq[offset : offset + n].view_as(p),
            }
            offset += n
        return flat_param, exp_avg, exp_avg_sq, steps

    def step(self) -> None:
        """One Adam update of all parameters from the gradients in ``flat_grad``."""
        group = self.group
        self.steps.add_(1)
        beta1, beta2 = group["betas"]
        _fused_adam(
            [self.flat_param], [self.flat_grad], [self.exp_avg], [self.exp_avg_sq], [self.step_view],
            group["lr"], beta1, beta2, group["weight_decay"], group["eps"],
        )


class FusedPPOLoss:
    """PPO loss and its gradients for one :class:`ActorCriticPolicy` without autograd.

    Build it with :meth:`for_policy` (None for a policy it does not cover) for one update
    (``PPO.train()`` makes one per call): it holds the policy's parameters and a gradient
    buffer on their device, so it is not kept across ``.to()``.

    :param policy: an ``ActorCriticPolicy`` accepted by :func:`fused_unsupported_reason`
    """

    def __init__(self, policy: Any, _checked: bool = False):
        reason = None if _checked else fused_unsupported_reason(policy)
        if reason is not None:
            raise ValueError(f"FusedPPOLoss does not cover this policy: {reason}; use the autograd path (PPO(fused_update=False))")
        self.policy = policy
        self.discrete = isinstance(policy.action_space, spaces.Discrete)
        self.tanh = isinstance(policy.mlp_extractor.activation, nn.Tanh)
        self.box_observations = isinstance(policy.observation_space, spaces.Box)
        self.layers = list(policy.mlp_extractor._layers)
        self.action_net, self.value_net = policy.action_net, policy.value_net
        optimizer = getattr(policy, "optimizer", None)
        # the optimizer's order (when it holds them) so that a flat Adam lines up with the gradients
        params = list(optimizer.param_groups[0]["params"]) if optimizer is not None and len(optimizer.param_groups) == 1 else list(policy.parameters())
        self.dtype = params[0].dtype
        # every gradient is a view of one flat buffer: clipping scales it in one op
        self.flat_grad = torch.zeros(sum(p.numel() for p in params), dtype=self.dtype, device=params[0].device)
        self.grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        offset = 0
        for p in params:
            self.grads[p] = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self._action_src: torch.Tensor | None = None
        self.optimizer = optimizer
        # the parameters and Adam's state as views of flat buffers: one fused update (None: not Adam)
        self.flat_adam = FlatAdam.for_optimizer(optimizer, params, self.flat_grad) if optimizer is not None else None
        # transposed weights for the backward, views that follow the in-place updates
        self._layers_t = [w.transpose(1, 2) for w, _ in self.layers]
        for p, grad in self.grads.items():
            p.grad = grad

    def optimizer_step(self) -> None:
        """Apply the optimizer to the gradients in :attr:`flat_grad`: one fused Adam step
        on the flat buffers (:class:`FlatAdam`) or, for any other optimizer,
        :func:`lean_adam_step` or ``optimizer.step()``."""
        if self.flat_adam is not None:
            self.flat_adam.step()
        else:
            if not lean_adam_step(self.optimizer):
                self.optimizer.step()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients by ``max_norm / (norm + 1e-6)`` when the global norm exceeds
        ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s maths); returns the norm before."""
        total = torch.linalg.vector_norm(self.flat_grad)
        self.flat_grad.mul_(total.add(1e-6).reciprocal_().mul_(max_norm).clamp_(max=1.0))
        return total

    @classmethod
    def for_policy(cls, policy: Any) -> "FusedPPOLoss | None":
        """The fused loss for ``policy``, or None when only autograd covers it (a policy it
        does not cover, or a torch without the private kernels: :func:`fast_path_unavailable`)."""
        if fused_unsupported_reason(policy) is not None or fast_path_unavailable():
            return None
        return cls(policy, _checked=True)

    def loss_and_grads(
        self,
        observations: torch.Tensor | dict[str, torch.Tensor],
        actions: torch.Tensor,
        old_log_prob: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        old_values: torch.Tensor,
        clip_range: float,
        clip_range_vf: float | None,
        ent_coef: float,
        vf_coef: float,
        kl_beta: float | None = None,
    ) -> FusedLossTerms:
        """Compute PPO's loss on one minibatch and set ``param.grad`` of every parameter
        of the policy to its gradient (replacing what was there).

        :param observations: minibatch observations as stored in the rollout buffer
        :param actions: the actions taken
        :param old_log_prob: their log-probabilities at collection time
        :param advantages: advantages, already normalised if the caller wants that
        :param returns: value targets
        :param old_values: values at collection time (for ``clip_range_vf``)
        :param clip_range: ratio clip epsilon (ignored with ``kl_beta``)
        :param clip_range_vf: value clip around ``old_values``, or None
        :param ent_coef: entropy bonus weight
        :param vf_coef: value loss weight
        :param kl_beta: None: clipped surrogate; a number: ``-ratio*A + kl_beta * KL`` (k3 estimate)
        """
        # inference mode: no autograd bookkeeping at all on the intermediates (cheaper per op
        # than no_grad); the gradients go into the flat buffer made outside it
        with torch.inference_mode():
            return self._loss_and_grads(
                observations, actions, old_log_prob, advantages, returns, old_values,
                clip_range, clip_range_vf, ent_coef, vf_coef, kl_beta,
            )

    def _loss_and_grads(
        self, observations, actions, old_log_prob, advantages, returns, old_values,
        clip_range, clip_range_vf, ent_coef, vf_coef, kl_beta,
    ) -> FusedLossTerms:
        policy, layers, grads = self.policy, self.layers, self.grads
        action_w, action_b = self.action_net.weight, self.action_net.bias
        value_w, value_b = self.value_net.weight, self.value_net.bias
        if self.box_observations:
            x = observations.reshape(observations.shape[0], -1)
        else:
            x = policy.extract_features(observations)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        batch = x.shape[0]
        inv_batch = 1.0 / batch

        # --- forward: every layer's input is kept for the backward ----------------------
        inputs = []
        h = x.expand(2, -1, -1)
        for w, b in layers:
            inputs.append(h)
            h = torch.baddbmm(b, h, w)
            h = h.tanh_() if self.tanh else h.relu_()
        h_pi, h_vf = h[0], h[1]
        flat = F.linear(h_pi, action_w, action_b)
        values = F.linear(h_vf, value_w, value_b).view(-1)
        if self.discrete:
            log_probs_all = torch.log_softmax(flat, dim=-1)
            if actions is not self._action_src:  # the whole-rollout minibatch repeats every epoch
                self._action_src, self._action_idx = actions, actions.view(-1, 1).long()
            action_idx = self._action_idx
            log_prob = log_probs_all.gather(1, action_idx).view(-1)
            probs = log_probs_all.exp()
            if ent_coef != 0.0:
                entropy = (probs * log_probs_all).sum(-1).neg_()
                entropy_loss = -entropy.mean()
            else:  # only logged: the mean straight away
                entropy_loss = (probs * log_probs_all).sum() * inv_batch
        else:
            log_std = policy.log_std
            inv_std = torch.exp(-log_std)
            z = (actions.reshape(batch, -1) - flat) * inv_std
            log_prob = (z * z).sum(-1).mul_(-0.5).sub_(log_std.sum() + _HALF_LOG_2PI * log_std.numel())
            # state-independent: the same for every sample
            entropy_loss = -(log_std.sum() + (0.5 + _HALF_LOG_2PI) * log_std.numel())

        log_ratio = log_prob - old_log_prob
        ratio = torch.exp(log_ratio)
        # the losses are agents.losses' functions; their derivatives are written here
        if kl_beta is None:
            pg_losses = clipped_surrogate(ratio, advantages, clip_range)
            pg_loss = pg_losses.mean()
            # d(-min)/dlog_prob = -A * ratio where the unclipped term is the minimum (inside
            # the clip range both are equal and the clamp passes the gradient: also -A * ratio)
            unclipped = advantages * ratio
            d_log_prob = unclipped.mul_(pg_losses.neg_() == unclipped).mul_(-inv_batch)
        else:
            pg_loss = kl_penalty_surrogate(ratio, log_ratio, advantages, kl_beta).mean()
            d_log_prob = ((ratio - 1) * kl_beta - ratio * advantages).mul_(inv_batch)

        v_loss = value_loss(values, returns, old_values, clip_range_vf).mean()
        # d (V_pred - R)^2 / dV = 2 (V_pred - R), zero where the value clip is active
        if clip_range_vf is None:
            d_values = (values - returns).mul_(2.0 * vf_coef * inv_batch)
        else:
            delta = values - old_values
            values_diff = old_values + torch.clamp(delta, -clip_range_vf, clip_range_vf) - returns
            inside = (delta >= -clip_range_vf) & (delta <= clip_range_vf)
            d_values = (values_diff * inside).mul_(2.0 * vf_coef * inv_batch)
        loss = torch.add(pg_loss, v_loss, alpha=vf_coef)
        if ent_coef != 0.0:
            loss = loss + ent_coef * entropy_loss

        # --- backward through the heads -------------------------------------------------
        if self.discrete:
            # log_softmax: d flat = g - p * sum(g); g is d_log_prob at the action, and the
            # entropy bonus adds ent_coef / B * p * (log p + H)
            coef = d_log_prob.neg().unsqueeze_(1)
            if ent_coef != 0.0:
                coef = coef + (log_probs_all + entropy.unsqueeze(1)) * (ent_coef * inv_batch)
            d_flat = probs.mul_(coef)
            d_flat.scatter_add_(1, action_idx, d_log_prob.unsqueeze(1))
        else:
            d_flat = (z * inv_std).mul_(d_log_prob.unsqueeze(1))  # d log_prob / d mean = z / std
            # d log_prob / d log_std = z^2 - 1 per dimension; the entropy's is 1
            log_std_grad = grads[policy.log_std]
            torch.sum(z.square_().sub_(1).mul_(d_log_prob.unsqueeze(1)), 0, out=log_std_grad)
            log_std_grad.sub_(ent_coef)
        torch.mm(d_flat.t(), h_pi, out=grads[action_w])
        torch.sum(d_flat, 0, out=grads[action_b])
        d_values = d_values.unsqueeze_(1)
        torch.mm(d_values.t(), h_vf, out=grads[value_w])
        torch.sum(d_values, 0, out=grads[value_b])
        d_h = torch.stack((d_flat.mm(action_w), d_values.mm(value_w)))

        # --- backward through the stacked layers ----------------------------------------
        for i in range(len(layers) - 1, -1, -1):
            w, b = layers[i]
            d_pre = _tanh_backward(d_h, h) if self.tanh else _relu_backward(d_h, h)
            h = inputs[i]
            torch.bmm(h.transpose(1, 2), d_pre, out=grads[w])
            torch.sum(d_pre, 1, keepdim=True, out=grads[b])
            if i > 0:
                d_h = torch.bmm(d_pre, self._layers_t[i])
        for p, grad in grads.items():
            if p.grad is not grad:  # set once per update unless someone replaced it
                p.grad = grad
        return FusedLossTerms(ratio, log_ratio, pg_loss, v_loss, entropy_loss, loss)
