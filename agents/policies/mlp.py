"""``ActorCriticPolicy``: SB3's MLP actor-critic (separate policy and value networks),
for Box, Discrete, MultiDiscrete, MultiBinary and Dict observations.

When the policy and value networks have the same hidden sizes (SB3's default,
64-64 / 64-64), their layers are stored stacked and run as one batched matmul per
layer: the same maths and gradients as two ``nn.Sequential`` networks, half the
kernel launches on the rollout and training paths.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from agents.distributions import DiagGaussianDistribution, Distribution, make_proba_distribution
from agents.policies.base import BasePolicy, Schedule
from agents.preprocessing import check_observation_space, flat_dim, preprocess_obs


def _parse_net_arch(net_arch: list[int] | dict[str, list[int]] | None) -> tuple[list[int], list[int]]:
    if net_arch is None:
        return [64, 64], [64, 64]
    if isinstance(net_arch, dict):
        return list(net_arch.get("pi", [])), list(net_arch.get("vf", []))
    if isinstance(net_arch, (list, tuple)) and net_arch and isinstance(net_arch[0], dict):
        # SB3 < 1.8 style [dict(pi=..., vf=...)]
        return _parse_net_arch(net_arch[0])
    return list(net_arch), list(net_arch)


_FUNCTIONAL_ACTIVATIONS = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu}


class MlpExtractor(nn.Module):
    """Policy and value MLPs over the same features; ``forward`` -> (latent_pi, latent_vf).

    :param feature_dim: input features
    :param net_arch: hidden sizes, a list (same for both) or ``dict(pi=[...], vf=[...])``
    :param activation_fn: activation class, e.g. ``nn.Tanh``
    """

    def __init__(self, feature_dim: int, net_arch: Any, activation_fn: type[nn.Module]):
        super().__init__()
        pi_arch, vf_arch = _parse_net_arch(net_arch)
        self.activation = activation_fn()
        # the plain function where there is one: a module call costs more than a tanh of 8 rows
        self._activation = _FUNCTIONAL_ACTIVATIONS.get(activation_fn, self.activation)
        self.stacked = pi_arch == vf_arch and len(pi_arch) > 0
        if self.stacked:
            dims = [feature_dim] + pi_arch
            self.weights = nn.ParameterList(
                nn.Parameter(torch.empty(2, dims[i], dims[i + 1])) for i in range(len(pi_arch))
            )
            self.biases = nn.ParameterList(nn.Parameter(torch.zeros(2, 1, dims[i + 1])) for i in range(len(pi_arch)))
            for w in self.weights:  # default init as nn.Linear would do
                bound = 1.0 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)
            # iterating a ParameterList costs more than the matmuls; the Parameter objects
            # stay the same through .to() and load_state_dict, so a plain list is safe
            self._layers = list(zip(self.weights, self.biases))
        else:
            self.policy_net = self._mlp(feature_dim, pi_arch, activation_fn)
            self.value_net = self._mlp(feature_dim, vf_arch, activation_fn)
        self.latent_dim_pi = pi_arch[-1] if pi_arch else feature_dim
        self.latent_dim_vf = vf_arch[-1] if vf_arch else feature_dim

    @staticmethod
    def _mlp(in_dim: int, arch: list[int], activation_fn: type[nn.Module]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for size in arch:
            layers += [nn.Linear(in_dim, size), activation_fn()]
            in_dim = size
        return nn.Sequential(*layers)

    def orthogonal_init(self, gain: float) -> None:
        if self.stacked:
            with torch.no_grad():
                for w, b in zip(self.weights, self.biases):
                    for k in range(2):  # init the (out, in) matrix like nn.Linear's weight
                        w[k].copy_(nn.init.orthogonal_(torch.empty(w.shape[2], w.shape[1]), gain=gain).T)
                    b.zero_()
        else:
            for module in list(self.policy_net) + list(self.value_net):
                if isinstance(module, nn.Linear):
                    nn.init.orthogonal_(module.weight, gain=gain)
                    module.bias.data.fill_(0.0)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stacked:
            h = features.unsqueeze(0).expand(2, -1, -1)
            for w, b in self._layers:
                h = self._activation(torch.baddbmm(b, h, w))
            return h[0], h[1]
        return self.policy_net(features), self.value_net(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self._forward_stacked(features, 0) if self.stacked else self.policy_net(features)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self._forward_stacked(features, 1) if self.stacked else self.value_net(features)

    def _forward_stacked(self, features: torch.Tensor, net: int) -> torch.Tensor:
        """One of the stacked networks on its own (0: actor, 1: critic)."""
        h = features
        for w, b in self._layers:
            h = self._activation(torch.addmm(b[net], h, w[net]))
        return h


class ActorCriticPolicy(BasePolicy):
    """MLP actor-critic with SB3's defaults (tanh, 64-64 for both heads, orthogonal
    init, Adam with eps 1e-5).

    :param observation_space: observation space of one environment
    :param action_space: action space of one environment
    :param lr_schedule: learning-rate schedule (progress remaining -> lr)
    :param net_arch: hidden sizes: a list for both networks or ``dict(pi=[...], vf=[...])``
    :param activation_fn: activation class
    :param ortho_init: orthogonal initialisation with SB3's gains (sqrt 2, 0.01, 1)
    :param log_std_init: initial log standard deviation for Box actions
    :param optimizer_class: optimizer class (default ``torch.optim.Adam``)
    :param optimizer_kwargs: optimizer arguments (default ``eps=1e-5``)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        log_std_init: float = 0.0,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
        squash_output: bool = False,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        **kwargs: Any,
    ):
        if optimizer_kwargs is None:
            # SB3's eps; the fused kernel does the whole Adam update in one op
            optimizer_kwargs = {"eps": 1e-5, "fused": True} if optimizer_class is torch.optim.Adam else {}
        super().__init__(
            observation_space, action_space, lr_schedule, optimizer_class, optimizer_kwargs, use_sde, squash_output
        )
        check_observation_space(observation_space)
        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.ortho_init = ortho_init
        self.log_std_init = log_std_init
        self.features_dim = flat_dim(observation_space)
        self.mlp_extractor = MlpExtractor(self.features_dim, net_arch, activation_fn)
        self.action_dist = make_proba_distribution(action_space)
        if isinstance(self.action_dist, DiagGaussianDistribution):
            self.action_net, self.log_std = self.action_dist.proba_distribution_net(
                self.mlp_extractor.latent_dim_pi, log_std_init=log_std_init
            )
        else:
            self.action_net = self.action_dist.proba_distribution_net(self.mlp_extractor.latent_dim_pi)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if ortho_init:
            self.mlp_extractor.orthogonal_init(math.sqrt(2))
            for module, gain in ((self.action_net, 0.01), (self.value_net, 1.0)):
                nn.init.orthogonal_(module.weight, gain=gain)
                module.bias.data.fill_(0.0)
        if lr_schedule is not None:
            self.build_optimizer(lr_schedule)
        self._lean = self._lean_forward_applies()
        # the parameters the lean path reads (nn.Module attribute lookups cost more than its
        # small ops); the Parameter objects stay the same through .to() and load_state_dict
        self._lean_params = (
            self.mlp_extractor._layers, self.mlp_extractor._activation is torch.tanh,
            self.value_net.weight, self.value_net.bias, self.action_net.weight, self.action_net.bias,
        ) if self._lean else None
        self._lean_discrete = isinstance(action_space, spaces.Discrete)

    def _lean_forward_applies(self) -> bool:
        """Whether :meth:`forward` may take the lean path: this class's own maths (not a
        subclass's), stacked tanh/ReLU layers, Box observations, linear heads and a
        Discrete or unsquashed Box action space."""
        return (
            type(self) is ActorCriticPolicy
            and self.mlp_extractor.stacked
            and type(self.mlp_extractor.activation) in (nn.Tanh, nn.ReLU)
            and isinstance(self.observation_space, spaces.Box)
            and isinstance(self.action_space, (spaces.Discrete, spaces.Box))
            and not self.squash_output
            and type(self.action_net) is nn.Linear
            and type(self.value_net) is nn.Linear
        )

    def extract_features(self, obs: Any) -> torch.Tensor:
        return preprocess_obs(obs, self.observation_space)

    def _distribution(self, latent_pi: torch.Tensor) -> Distribution:
        flat = self.action_net(latent_pi)
        if isinstance(self.action_dist, DiagGaussianDistribution):
            return self.action_dist.proba_distribution(flat, self.log_std)
        return self.action_dist.proba_distribution(flat)

    def forward(self, obs: Any, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._lean and isinstance(obs, torch.Tensor):
            return self._lean_forward(obs, deterministic)
        latent_pi, latent_vf = self.mlp_extractor(self.extract_features(obs))
        values = self.value_net(latent_vf)
        distribution = self._distribution(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        actions = actions.reshape((-1, *self.action_space.shape))
        return actions, values, log_prob

    def _lean_forward(self, obs: torch.Tensor, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s numbers (the same ops in the same order, so the same samples
        for the same RNG state) without the module calls and distribution objects, which
        cost more than the maths for the few rows of a rollout step."""
        layers, tanh, value_w, value_b, action_w, action_b = self._lean_params
        x = obs.reshape(obs.shape[0], -1)
        if x.dtype != torch.float32:
            x = x.float()
        h = x.expand(2, -1, -1)
        for w, b in layers:
            h = torch.baddbmm(b, h, w)
            h = h.tanh_() if tanh else h.relu_()
        values = F.linear(h[1], value_w, value_b)
        flat = F.linear(h[0], action_w, action_b)
        if self._lean_discrete:
            logits = torch.log_softmax(flat, dim=-1)
            if deterministic:
                actions = torch.argmax(logits, dim=-1)
            else:  # Gumbel-max, as agents.distributions samples
                noise = torch.rand_like(logits).clamp_(min=1e-20).log_().neg_().log_()
                actions = torch.argmax(logits - noise, dim=-1)
            log_prob = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            return actions, values, log_prob
        log_std = self.log_std.expand_as(flat)
        actions = flat if deterministic else flat + torch.randn_like(flat) * log_std.exp()
        z = (actions - flat) * torch.exp(-log_std)
        log_prob = (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def evaluate_actions(self, obs: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent_pi, latent_vf = self.mlp_extractor(self.extract_features(obs))
        distribution = self._distribution(latent_pi)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.reshape(-1)
        else:
            actions = actions.reshape(actions.shape[0], -1)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: Any) -> Distribution:
        return self._distribution(self.mlp_extractor.forward_actor(self.extract_features(obs)))

    def predict_values(self, obs: Any) -> torch.Tensor:
        return self.value_net(self.mlp_extractor.forward_critic(self.extract_features(obs)))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return dict(super()._get_constructor_parameters(), net_arch=self.net_arch, activation_fn=self.activation_fn,
                    ortho_init=self.ortho_init, log_std_init=self.log_std_init)


MultiInputActorCriticPolicy = ActorCriticPolicy
