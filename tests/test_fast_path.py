"""The hand-written PPO gradients of agents.fast_mlp equal autograd's, and PPO.train()
takes the same step with either path."""

import copy

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from agents import PPO
from agents.fast_mlp import FusedPPOLoss, fused_unsupported_reason
from agents.policies.mlp import ActorCriticPolicy
from agents.ppo import kl_and_clip_fraction

pytestmark = pytest.mark.usefixtures("one_thread")

OBS_SPACE = spaces.Box(-5.0, 5.0, (4,), np.float32)
SETTINGS = {
    "clip": dict(clip_range=0.2, clip_range_vf=None, ent_coef=0.0, vf_coef=0.5, kl_beta=None),
    "clip+vf_clip+entropy": dict(clip_range=0.1, clip_range_vf=0.05, ent_coef=0.05, vf_coef=0.7, kl_beta=None),
    "kl_penalty": dict(clip_range=0.2, clip_range_vf=None, ent_coef=0.01, vf_coef=0.5, kl_beta=0.7),
}


def autograd_loss(policy, obs, actions, old_log_prob, advantages, returns, old_values,
                  clip_range, clip_range_vf, ent_coef, vf_coef, kl_beta):
    """PPO.train()'s autograd formulas, written out independently of agents.ppo."""
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    values = values.flatten()
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    if kl_beta is None:
        pg_loss = -torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
    else:
        pg_loss = -(ratio * advantages).mean() + kl_beta * ((ratio - 1) - log_ratio).mean()
    if clip_range_vf is not None:
        values = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    v_loss = F.mse_loss(returns, values)
    entropy_loss = -entropy.mean()
    return ratio, pg_loss, v_loss, entropy_loss, pg_loss + ent_coef * entropy_loss + vf_coef * v_loss


def random_batch(policy, action_space, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 4, generator=g)
    if isinstance(action_space, spaces.Discrete):
        actions = torch.randint(0, action_space.n, (n,), generator=g)
    else:
        actions = torch.randn(n, action_space.shape[0], generator=g)
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(obs, actions)
    # old policy a little different: some ratios fall outside the clip range, and some
    # values outside the value clip
    old_log_prob = log_prob + 0.3 * torch.randn(n, generator=g)
    old_values = values.flatten() + 0.1 * torch.randn(n, generator=g)
    return obs, actions, old_log_prob, torch.randn(n, generator=g), torch.randn(n, generator=g), old_values


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("action_space", [spaces.Discrete(3), spaces.Box(-1.0, 1.0, (2,), np.float32)], ids=["discrete", "box"])
def test_fused_loss_and_gradients_equal_autograd(action_space, activation, setting):
    torch.manual_seed(0)
    policy = ActorCriticPolicy(OBS_SPACE, action_space, lambda _: 1e-3, activation_fn=activation, log_std_init=-0.5)
    batch = random_batch(policy, action_space)
    kwargs = SETTINGS[setting]

    ratio, pg_loss, v_loss, entropy_loss, loss = autograd_loss(policy, *batch, **kwargs)
    clipped = ((ratio - 1).abs() > kwargs["clip_range"]).float().mean().item()
    assert 0.05 < clipped < 0.95  # both branches of the clipped surrogate are exercised
    loss.backward()
    expected = {name: p.grad.clone() for name, p in policy.named_parameters()}
    for p in policy.parameters():
        p.grad = None

    terms = FusedPPOLoss(policy).loss_and_grads(*batch, **kwargs)
    for got, want in zip(terms[2:], (pg_loss, v_loss, entropy_loss, loss)):
        assert got.item() == pytest.approx(want.item(), abs=1e-6)
    torch.testing.assert_close(terms.ratio, ratio.detach(), rtol=1e-6, atol=1e-6)
    for name, p in policy.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == expected[name].shape, name
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert expected[name].abs().max() > 1e-4 or name == "log_std", name  # a real gradient


def test_fused_coverage():
    box = spaces.Box(-1.0, 1.0, (2,), np.float32)
    make = lambda space=spaces.Discrete(2), **kw: ActorCriticPolicy(OBS_SPACE, space, lambda _: 1e-3, **kw)  # noqa: E731
    assert FusedPPOLoss.for_policy(make()) is not None
    assert FusedPPOLoss.for_policy(make(box, net_arch=[32, 16, 8])) is not None
    assert "hidden sizes" in fused_unsupported_reason(make(net_arch=dict(pi=[64], vf=[32])))
    assert "activation ELU" in fused_unsupported_reason(make(activation_fn=nn.ELU))
    assert "MultiDiscrete" in fused_unsupported_reason(make(spaces.MultiDiscrete([2, 3])))
    frozen = make()
    frozen.value_net.weight.requires_grad_(False)
    assert "frozen" in fused_unsupported_reason(frozen)

    class Custom(ActorCriticPolicy):
        pass

    assert FusedPPOLoss.for_policy(Custom(OBS_SPACE, spaces.Discrete(2), lambda _: 1e-3)) is None
    with pytest.raises(ValueError, match="not ActorCriticPolicy.*fused_update=False"):
        FusedPPOLoss(Custom(OBS_SPACE, spaces.Discrete(2), lambda _: 1e-3))


def test_kl_and_clip_fraction_by_hand():
    ratios = [torch.tensor([1.0, 1.5, 0.5]), torch.tensor([1.1, 0.9, 1.0]), torch.tensor([2.0, 1.0])]
    log_ratios = [r.log() for r in ratios]
    kls, fractions = kl_and_clip_fraction(ratios, log_ratios, clip_range=0.2)
    want_kl = [np.mean([(x - 1) - np.log(x) for x in r.tolist()]) for r in ratios]
    np.testing.assert_allclose(kls.numpy(), want_kl, rtol=1e-6)
    np.testing.assert_allclose(fractions.numpy(), [2 / 3, 0.0, 0.5], rtol=1e-6)
    # equal minibatch sizes take the one-op path: same answer
    kls2, fractions2 = kl_and_clip_fraction(ratios[:2], log_ratios[:2], clip_range=0.2)
    np.testing.assert_allclose(kls2.numpy(), want_kl[:2], rtol=1e-6)
    np.testing.assert_allclose(fractions2.numpy(), [2 / 3, 0.0])


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("CartPole-v1", dict(batch_size=64)),  # whole rollout as one minibatch
        ("CartPole-v1", dict(batch_size=24, clip_range_vf=0.2, ent_coef=0.01)),  # shuffled, unequal minibatches
        ("CartPole-v1", dict(batch_size=64, loss_type="kl_penalty", target_kl=0.05)),
        ("Pendulum-v1", dict(batch_size=32, policy_kwargs=dict(activation_fn=nn.ReLU))),
    ],
)
def test_train_step_equal_with_and_without_fused(env_id, kwargs):
    model = PPO("MlpPolicy", env_id, n_envs=2, n_steps=32, n_epochs=3, learning_rate=1e-3, seed=0, **kwargs)
    model.learn(64)  # one rollout and one update; train() is repeated on the next rollout below
    model.collect_rollouts(model.env, _NoCallback(model), model.rollout_buffer, model.n_steps)
    policy_state = copy.deepcopy(model.policy.state_dict())
    optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())
    kl_beta, n_updates = model.kl_beta, model._n_updates
    results = {}
    for fused in (True, False):
        model.policy.load_state_dict(policy_state)
        model.policy.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        model.kl_beta, model._n_updates = kl_beta, n_updates
        model.fused_update = fused
        torch.manual_seed(1)  # same minibatch order
        model.train()
        logged = {k: v for k, v in model.logger.name_to_value.items() if k.startswith("train/")}
        results[fused] = ({k: v.clone() for k, v in model.policy.state_dict().items()}, logged)
    (params_fused, log_fused), (params_auto, log_auto) = results[True], results[False]
    for name in params_auto:
        assert not torch.equal(params_auto[name], policy_state[name]) or name == "log_std", f"{name} did not move"
        torch.testing.assert_close(params_fused[name], params_auto[name], rtol=1e-5, atol=2e-6, msg=name)
    assert log_fused.keys() == log_auto.keys()
    for key in log_auto:
        assert log_fused[key] == pytest.approx(log_auto[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "env_id, kwargs",
    [("CartPole-v1", dict(batch_size=24, clip_range_vf=0.2, ent_coef=0.01)),
     ("Pendulum-v1", dict(batch_size=32, policy_kwargs=dict(activation_fn=nn.ReLU)))],
)
def test_fallback_on_a_torch_without_the_private_kernels_equals_the_fast_path(env_id, kwargs, monkeypatch):
    """On a torch whose private kernels fail the check (forced here), the fast path says so
    once and PPO trains with autograd, torch's clipping and torch.optim: the same numbers."""
    from agents import fast_kernels

    model = PPO("MlpPolicy", env_id, n_envs=2, n_steps=32, n_epochs=3, learning_rate=1e-3, seed=0, **kwargs)
    model.learn(64)
    model.collect_rollouts(model.env, _NoCallback(model), model.rollout_buffer, model.n_steps)
    policy_state = copy.deepcopy(model.policy.state_dict())
    optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())
    n_updates = model._n_updates

    def train_once():
        model.policy.load_state_dict(policy_state)
        model.policy.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        model._n_updates = n_updates
        torch.manual_seed(1)  # same minibatch order
        model.train()
        return {k: v.clone() for k, v in model.policy.state_dict().items()}

    assert fast_kernels.fast_path_unavailable() is None and FusedPPOLoss.for_policy(model.policy) is not None
    fast = train_once()
    monkeypatch.setattr(fast_kernels, "_check_private_kernels", lambda: "simulated: torch._fused_adam_ changed")
    monkeypatch.setattr(fast_kernels, "_fast_path_state", [fast_kernels._UNCHECKED])  # check again, on this "torch"
    with pytest.warns(RuntimeWarning, match="autograd and torch.optim"):
        assert FusedPPOLoss.for_policy(model.policy) is None
    assert fast_kernels.lean_clip_grad_norm(list(model.policy.parameters()), 1.0) is None
    assert fast_kernels.lean_adam_step(model.policy.optimizer) is False
    fallback = train_once()
    for name in fast:
        assert not torch.equal(fast[name], policy_state[name]) or name == "log_std", f"{name} did not move"
        torch.testing.assert_close(fallback[name], fast[name], rtol=1e-5, atol=2e-6, msg=name)


def test_the_check_catches_a_kernel_that_changed(monkeypatch):
    from agents import fast_kernels

    assert fast_kernels._check_private_kernels() is None  # this torch: all kernels as expected
    monkeypatch.setattr(fast_kernels, "_TANH_BACKWARD", lambda grad, y: grad * (1 - y))  # another maths
    assert "tanh_backward" in fast_kernels._check_private_kernels()
    monkeypatch.setattr(fast_kernels, "_TANH_BACKWARD", None)  # a torch without the kernel
    assert "TypeError" in fast_kernels._check_private_kernels()


class _NoCallback:
    """The few callback hooks collect_rollouts calls."""

    def __init__(self, model):
        self.model = model

    def on_rollout_start(self):
        pass

    def update_locals(self, _):
        pass

    def on_step(self):
        return True

    def on_rollout_end(self):
        pass


def _adam_pair(fused_reference):
    torch.manual_seed(0)
    policy = ActorCriticPolicy(OBS_SPACE, spaces.Discrete(3), lambda _: 1e-3)
    reference = copy.deepcopy(policy)
    reference.optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, eps=1e-5, fused=fused_reference)
    return policy, reference


@pytest.mark.parametrize("fused_reference", [True, False], ids=["fused", "foreach"])
def test_flat_adam_is_torch_adam(fused_reference):
    """FlatAdam's one update on flat buffers equals torch.optim.Adam's (fused and default
    implementations, to rounding), keeps the state in the optimizer's state_dict and
    takes loaded state back in."""
    from agents.fast_mlp import FlatAdam

    policy, reference = _adam_pair(fused_reference)
    batch = random_batch(policy, policy.action_space)
    kwargs = SETTINGS["clip+vf_clip+entropy"]
    for step in range(6):
        if step == 3:  # the optimizer's state replaced from outside: copied into the flat buffers again
            policy.optimizer.load_state_dict(copy.deepcopy(policy.optimizer.state_dict()))
        reference.optimizer.param_groups[0]["lr"] = policy.optimizer.param_groups[0]["lr"] = 1e-3 * (1 + step)
        fused = FusedPPOLoss(policy)
        assert isinstance(fused.flat_adam, FlatAdam)
        fused.loss_and_grads(*batch, **kwargs)
        grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
        fused.optimizer_step()
        for name, p in reference.named_parameters():
            p.grad = grads[name].clone()
        reference.optimizer.step()
        for (name, p), q in zip(policy.named_parameters(), reference.parameters()):
            # the same formula; only the vectorised vs scalar rounding of the kernels differs
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # the parameters and the state are views of the flat buffers, and the state_dict has it all
    flat_param = policy.optimizer._flat_adam_layout[0]
    assert all(p.data_ptr() >= flat_param.data_ptr() for p in policy.parameters())
    ours, theirs = policy.optimizer.state_dict(), reference.optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for key, st in theirs["state"].items():
        assert float(ours["state"][key]["step"]) == float(st["step"]) == 6
        torch.testing.assert_close(ours["state"][key]["exp_avg"], st["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours["state"][key]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_flat_adam_not_used_where_it_does_not_apply():
    from agents.fast_mlp import FlatAdam

    policy = ActorCriticPolicy(OBS_SPACE, spaces.Discrete(3), lambda _: 1e-3)
    grad = torch.zeros(sum(p.numel() for p in policy.parameters()))
    params = list(policy.parameters())
    assert FlatAdam.for_optimizer(policy.optimizer, params, grad) is not None
    assert FlatAdam.for_optimizer(torch.optim.Adam(params, fused=True, amsgrad=True), params, grad) is None
    assert FlatAdam.for_optimizer(torch.optim.Adam(params), params, grad) is None  # not the fused kernel
    assert FlatAdam.for_optimizer(torch.optim.SGD(params, lr=0.1), params, grad) is None
    assert FlatAdam.for_optimizer(policy.optimizer, params[::-1], grad) is None
    # another optimizer still steps through the fused loss (agents.fast_kernels.optimizer_step)
    policy.optimizer = torch.optim.SGD(params, lr=0.1)
    fused = FusedPPOLoss(policy)
    assert fused.flat_adam is None
    before = [p.detach().clone() for p in params]
    fused.loss_and_grads(*random_batch(policy, policy.action_space), **SETTINGS["clip"])
    fused.optimizer_step()
    for p, b, g in zip(params, before, fused.grads.values()):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("action_space", [spaces.Discrete(3), spaces.Box(-1.0, 1.0, (2,), np.float32)], ids=["discrete", "box"])
def test_lean_rollout_forward_equals_the_general_one(action_space, activation):
    """The rollout's lean forward of ActorCriticPolicy gives the general path's actions,
    values and log-probs, the same samples for the same RNG state."""
    policy = ActorCriticPolicy(OBS_SPACE, action_space, lambda _: 1e-3, activation_fn=activation)
    assert policy._lean
    obs = torch.randn(8, 4)
    for deterministic in (False, True):
        torch.manual_seed(3)
        lean = policy(obs, deterministic)
        policy._lean = False
        torch.manual_seed(3)
        general = policy(obs, deterministic)
        policy._lean = True
        for a, b in zip(lean, general):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b)

    class Custom(ActorCriticPolicy):  # a subclass may change the maths: general path
        pass

    assert not Custom(OBS_SPACE, action_space, lambda _: 1e-3)._lean
