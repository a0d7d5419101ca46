"""``LMActorCriticPolicy``: the language-model actor-critic of the text environments.

The actor IS the env's actor module (the same ``nn.Module`` object, reached through the
explicit handle the observation space carries, ``observation_space.lm``), so an optimizer
over ``policy.parameters()`` trains the model the env charges its KL with, and the
reference stays outside the policy. The critic
is a scalar value head on the trunk's last-layer hidden state at the last token of the
observation. The action distribution is the categorical of the env's sampling
distribution (logits / temperature, top-k), so the log-probability PPO stores for an
action is exactly the one the env charges.

No actor forward is computed twice per step: without gradients (rollout collection,
``predict``) the policy first looks the observation up in the env's step cache, which
holds the hidden state and logits the env already computed for that context; misses
(and every forward with gradients, i.e. PPO's minibatches) run the actor once on the
observation.

Works with ``stable_baselines3.PPO(LMActorCriticPolicy, env)`` and
``agents.PPO("LMPolicy", env)``. A saved policy's space holds only a description of the
model, so ``load`` rebuilds the actor from it, unless it is given the live env:
``agents.PPO.load(path, env=env)`` takes the env's space, and SB3's load does with
``PPO.load(path, env=env, custom_objects={"observation_space": env.observation_space})``
(envs made by name with ``shared_model=True``, the default, are found again without it).

The weights the env uses are tracked by the env's core version: the optimizer built here
tells the core after each step (:meth:`envs.lm_core.LMCore.parameters_changed`); an
optimizer of your own over the actor must do the same
(``opt.register_step_post_hook(policy.core.parameters_changed)``), since fused optimizers
write the weights without bumping their version counters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from gymnasium import spaces
from torch import nn

from agents.distributions import CategoricalDistribution
from agents.policies.base import BasePolicy, Schedule
from envs.decoder import set_trainable
from envs.lm_core import LMCore
from envs.sampling import sampling_logits
from envs.spaces import TextObservationSpace


class LMActorCriticPolicy(BasePolicy):
    """Actor-critic policy over a text env's actor.

    :param observation_space: the text env's observation space (a ``TextObservationSpace``)
    :param action_space: ``Discrete(vocab_size)``
    :param lr_schedule: learning rate schedule (the optimizer starts at ``lr_schedule(1)``)
    :param train_layers: None trains every actor weight; ``k`` trains only the last ``k``
        transformer blocks and the final norm (plus the value head)
    :param lora: train LoRA adapters injected into the actor instead (a dict of
        :func:`agents.lora.apply_lora` arguments, e.g. ``{"r": 8, "targets": ["q_proj", "v_proj"]}``;
        excludes ``train_layers``); the env's reference stays the frozen starting model
    :param detach_value: stop the value loss's gradient at the trunk (the critic then
        trains only its head)
    :param optimizer_class: optimizer class
    :param optimizer_kwargs: extra optimizer arguments; Adam and AdamW default to
        ``fused=True`` (pass ``{"fused": False}`` for the per-tensor loop)
    :param use_sde: must be False (SB3 passes it)
    :raises TypeError: any other keyword (a misspelt ``policy_kwargs`` key), naming the closest one
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule | None = None,
        train_layers: int | None = None,
        detach_value: bool = False,
        lora: dict[str, Any] | None = None,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
        **kwargs: Any,
    ):
        if kwargs:  # a misspelt policy_kwargs key (train_layer=4) would otherwise train every weight silently
            from agents.utils import init_parameters, unexpected_keyword

            raise unexpected_keyword(
                "LMActorCriticPolicy (policy_kwargs)", kwargs, init_parameters(type(self)) - {"observation_space", "action_space", "lr_schedule"}
            )
        if optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
            # one fused kernel over all trainable weights: the per-tensor loop costs tens of
            # milliseconds a step on one CPU thread (TRL's default is adamw_torch_fused too)
            optimizer_kwargs = {"fused": True, **(optimizer_kwargs or {})}
        super().__init__(observation_space, action_space, lr_schedule, optimizer_class, optimizer_kwargs, use_sde=use_sde)
        if not isinstance(observation_space, TextObservationSpace):
            raise TypeError(
                "LMActorCriticPolicy needs the observation space of a TextRLHF env "
                f"(TextObservationSpace), got {type(observation_space).__name__}; make the env with gym.make('TextRLHF-v0')"
            )
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"LMActorCriticPolicy needs a Discrete(vocab_size) action space, got {action_space}")
        # the env's core (a space unpickled in another process rebuilds it from its description)
        core = observation_space.lm.core()
        if core.vocab_size != action_space.n:
            raise ValueError(f"the model's vocabulary ({core.vocab_size}) differs from the action space ({action_space.n})")
        self._core: LMCore = core  # plain attribute: not a module, not in state_dict
        self.actor = core.actor
        self.train_layers = train_layers
        self.detach_value = detach_value
        hidden = int(core.actor.get_input_embeddings().weight.shape[1])
        self.value_head = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.value_head.weight, gain=1.0 / hidden**0.5)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(core.device)
        self.lora = None if lora is None else dict(lora)
        if self.lora is not None:
            if train_layers is not None:
                raise ValueError("pass either lora= or train_layers=, not both")
            from agents.lora import apply_lora

            apply_lora(self.actor, **self.lora)
            core.parameters_changed()  # the adapters are new parameters of the actor
        else:
            set_trainable(self.actor, train_layers)
        self.build_optimizer(lr_schedule)

    def build_optimizer(self, lr_schedule: Schedule | None = None) -> None:
        """The optimizer over the trainable weights; after each of its steps the env's core
        lists the actor's parameters again (a hook of this optimizer only), so the core's
        weight-change check never misses a parameter added since."""
        super().build_optimizer(lr_schedule)
        self.optimizer.register_step_post_hook(self._core.parameters_changed)

    # sampling configuration of the distribution (the env's)
    @property
    def temperature(self) -> float:
        return self._core.temperature

    @property
    def top_k(self) -> int:
        return self._core.top_k

    @property
    def core(self) -> LMCore:
        """The shared actor / reference machinery (step cache included)."""
        return self._core

    def set_training_mode(self, mode: bool) -> None:
        """Train mode for the value head only: the actor keeps dropout off, so the
        log-probabilities PPO optimises are those the env charged."""
        self.train(mode)
        self.actor.eval()

    def _features(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, logits = self._core.actor_features(obs["input_ids"], obs["attention_mask"])
        return hidden, sampling_logits(logits, self._core.temperature, self._core.top_k)

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.detach() if self.detach_value else hidden
        return self.value_head(hidden.to(self.value_head.weight.dtype))

    def _distribution(self, logits: torch.Tensor) -> CategoricalDistribution:
        return CategoricalDistribution(int(self.action_space.n)).proba_distribution(logits)

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False):
        """Sample tokens: ``(actions, values (B, 1), log_prob)``."""
        hidden, logits = self._features(obs)
        distribution = self._distribution(logits)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, self._values(hidden), distribution.log_prob(actions)

    def evaluate_actions(self, obs: dict[str, torch.Tensor], actions: torch.Tensor):
        """``(values (B, 1), log_prob, entropy)`` of ``actions`` under the current actor."""
        hidden, logits = self._features(obs)
        distribution = self._distribution(logits)
        return self._values(hidden), distribution.log_prob(actions.reshape(-1).long()), distribution.entropy()

    def get_distribution(self, obs: dict[str, torch.Tensor]) -> CategoricalDistribution:
        """The next-token distribution at each observation."""
        return self._distribution(self._features(obs)[1])

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """State values ``(B, 1)``."""
        return self._values(self._features(obs)[0])

    # --- export and small checkpoints -------------------------------------------------
    def training_info(self) -> dict[str, Any]:
        """How this policy trains: base model (the env's ``model=``), LoRA or trained blocks,
        sampling configuration."""
        spec = self._core.spec
        return {"base_model": spec.get("model"), "dtype": spec.get("dtype"), "lora": self.lora,
                "train_layers": self.train_layers, "temperature": self.temperature, "top_k": self.top_k}

    def save_pretrained(self, directory: str | os.PathLike, training: dict[str, Any] | None = None) -> Path:
        """Write the actor (LoRA adapters merged, on a copy) and its tokenizer as a Hugging
        Face folder that ``AutoModelForCausalLM.from_pretrained``, ``load_lm`` and
        ``gym.make("TextRLHF-v0", model=dir)`` load; ``rlhf_env_training.json`` records
        :meth:`training_info` updated with ``training``.

        :return: the folder
        """
        from agents.export import save_pretrained

        return save_pretrained(self.actor, self._core.tokenizer, directory, {**self.training_info(), **(training or {})})

    def frozen_keys(self) -> list[str]:
        """``state_dict`` keys of the actor weights that do not train (tied names included):
        the base model gives them back, so checkpoints leave them out."""
        return sorted(f"actor.{name}" for name, p in self.actor.named_parameters(remove_duplicate=False) if not p.requires_grad)

    def frozen_fingerprint(self) -> list[float]:
        """Two sums over a strided sample of every frozen actor weight: cheap (milliseconds
        on SmolLM2), and different when the model rebuilt at load time is not the one the
        checkpoint was trained from."""
        total, absolute = 0.0, 0.0
        with torch.no_grad():
            for name, p in sorted(self.actor.named_parameters(), key=lambda kv: kv[0]):
                if not p.requires_grad:
                    sample = p.detach().reshape(-1)[::97].double()
                    total += float(sample.sum())
                    absolute += float(sample.abs().sum())
        return [total, absolute]

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(state_dict without the frozen actor weights, what load needs to check them)``."""
        frozen = set(self.frozen_keys())
        state = {k: v for k, v in self.state_dict().items() if k not in frozen}
        return state, {"keys": sorted(frozen), "fingerprint": self.frozen_fingerprint(), "base_model": self._core.spec.get("model")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], frozen: dict[str, Any]) -> None:
        """Load a state saved by :meth:`checkpoint_state` into a policy rebuilt from the base model.

        :raises ValueError: when this policy's frozen weights are not those of the checkpoint
        """
        keys = set(frozen["keys"])
        if set(self.frozen_keys()) != keys:
            raise ValueError(
                "the checkpoint froze other actor weights than this policy does (train_layers / lora differ); "
                "load it with the policy_kwargs it was saved with"
            )
        mine = self.frozen_fingerprint()
        if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(mine, frozen["fingerprint"])):
            raise ValueError(
                f"the frozen weights of the actor differ from those the checkpoint was trained from "
                f"(base model {frozen.get('base_model')!r}): load it with env= an env made from that model"
            )
        missing, unexpected = self.load_state_dict(state, strict=False)
        self._core.parameters_changed()  # the env's caches follow the loaded weights
        missing = set(missing) - keys
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this policy: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return dict(super()._get_constructor_parameters(), train_layers=self.train_layers, lora=self.lora, detach_value=self.detach_value)
