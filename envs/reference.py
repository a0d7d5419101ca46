"""The reference forward on the actor's frozen trunk (exact, cheaper per-step KL rewards).

The env charges ``log pi_ref(a_t | s_t)`` at every step, so it runs the reference one token
at a time alongside the actor; on a memory-bound device that reads every reference weight
again for each token. When the policy trains only the top ``k`` decoder blocks (the LM
policy's ``train_layers=k``), the actor's embeddings and blocks ``0 .. s-1`` (``s = n - k``)
are frozen and still identical to the reference's, so the hidden state entering block
``s`` is the same in both models. The reference then only needs its own blocks
``s .. n-1``, its final norm and its head, run on the actor's hidden state at block ``s``
(captured by a forward pre-hook during the actor's forward, together with the exact causal
mask and rotary position embeddings the actor used), with a KV cache of those top blocks
only. The log-probabilities are those of a full reference forward (same weights, same
inputs, same operations). When the actor's head is also frozen and equal to the
reference's (tied embeddings, as in SmolLM2), both heads run as ONE matmul over the two
row sets: on a memory-bound CPU the 49k-token head of SmolLM2-135M costs about as much as
8 of its 30 decoder blocks, so reading it once per step instead of twice matters.

Safety. :meth:`SharedTrunk.split` is re-evaluated before every forward the env makes (a
few hundred attribute reads): a block counts as shared only while every parameter of the
embeddings and of the blocks below it has ``requires_grad=False``, and only after a
one-time ``torch.equal`` check against the reference, which is redone whenever any
shared parameter's in-place version counter (``_version``: bumped by optimizer steps,
``load_state_dict``, any in-place write) changes or a parameter turns trainable. When that
check fails the env falls back to (or shares fewer blocks with) the full reference and
rebuilds the reference's KV cache. So a policy that sets its trainable layers after the
env was built (SB3 builds the policy after the env) switches the env to the shared trunk
at its next forward, and training the whole actor (or LoRA, whose adapters are trainable
in every block) keeps the full reference. Not detected: changes to the lower blocks that
touch no parameter (a forward hook or a replaced ``forward`` method on a frozen block);
use ``reference_share="off"`` for such actors.

Supported architectures: Llama-like causal LMs whose logits are ``lm_head(norm(h))``
(``model.model.layers``, ``model.model.norm``, ``model.lm_head``; model types in
:data:`SUPPORTED_MODEL_TYPES`) with the same attention mask for every layer. Any other
model, or an actor and reference of different classes, dtypes or devices, always uses
the full reference.
"""

from __future__ import annotations

import weakref
from typing import Any, ContextManager

import torch
from torch import nn

from envs.decoder import SUPPORTED_MODEL_TYPES, decoder_parts  # noqa: F401 (SUPPORTED_MODEL_TYPES: documented above)
from envs.trunk_states import capture_block_input

REFERENCE_SHARE_MODES = ("auto", "off")

_CACHE_KEYS = ("cache", "past_key_values")


def check_reference_share(mode: Any) -> str:
    """Validate the env's ``reference_share`` argument."""
    if mode is True:
        return "auto"
    if mode is False or mode is None:
        return "off"
    if mode not in REFERENCE_SHARE_MODES:
        raise ValueError(
            f"reference_share must be one of {REFERENCE_SHARE_MODES} ('auto' shares the actor's frozen lower "
            f"blocks with the reference when that is exact, 'off' always runs the full reference), got {mode!r}"
        )
    return mode


class SharedTrunk:
    """Decides how many lower blocks the reference can take from the actor, and runs the
    reference's remaining blocks on the actor's hidden state.

    :param actor: the trainable causal LM
    :param reference: the frozen reference (same architecture)
    """

    def __init__(self, actor: nn.Module, reference: nn.Module):
        self.actor = actor
        self.reference = reference
        self.reason: str | None = None
        actor_parts, reason = decoder_parts(actor)
        ref_parts, ref_reason = decoder_parts(reference)
        self.reason = reason or ref_reason
        if self.reason is None:
            self.reason = _mismatch(actor, reference, actor_parts, ref_parts)
        self.actor_parts = actor_parts if self.reason is None else None
        self.ref_parts = ref_parts if self.reason is None else None
        self._stamp: tuple | None = None
        self._split = 0
        # the actor's head is frozen and equal to the reference's: one matmul serves both
        self.fused_head = False

    @property
    def supported(self) -> bool:
        """Whether this actor/reference pair can share a trunk at all (see :attr:`reason`)."""
        return self.reason is None

    def _frozen_prefix(self) -> tuple[int, int]:
        """``(f, version)``: the number of leading blocks that, with the embeddings, have no
        trainable parameter, and the summed ``_version`` of those parameters in both models."""
        a, r = self.actor_parts, self.ref_parts
        version = 0
        for p in a["embed"].parameters():
            if p.requires_grad:
                return 0, 0
            version += p._version
        for p in r["embed"].parameters():
            version += p._version
        frozen = 0
        for block, ref_block in zip(a["layers"], r["layers"]):
            block_version = 0
            for p in block.parameters():
                if p.requires_grad:
                    return frozen, version
                block_version += p._version
            for p in ref_block.parameters():
                block_version += p._version
            version += block_version
            frozen += 1
        return frozen, version

    def split(self) -> int:
        """Number of lower blocks the reference takes from the actor right now (0 = run the
        full reference). Cheap when nothing changed; re-verifies equality otherwise."""
        if self.actor_parts is None:
            return 0
        frozen, version = self._frozen_prefix()
        head_trainable, head_version = False, 0
        for p in self.actor_parts["head"].parameters():
            head_trainable |= p.requires_grad
            head_version += p._version
        for p in self.ref_parts["head"].parameters():
            head_version += p._version
        stamp = (frozen, version, head_trainable, head_version)
        if stamp != self._stamp:
            self._stamp = stamp
            self._split = self._equal_prefix(frozen) if frozen > 0 else 0
            with torch.no_grad():
                self.fused_head = (
                    self._split > 0 and not head_trainable and _same_params(self.actor_parts["head"], self.ref_parts["head"])
                )
        return self._split

    @torch.no_grad()
    def _equal_prefix(self, frozen: int) -> int:
        a, r = self.actor_parts, self.ref_parts
        if not _same_params(a["embed"], r["embed"]):
            return 0
        n = len(a["layers"])
        equal = 0
        # at most n - 1: the reference always runs its top block, so the hidden state it
        # takes from the actor is always the input of one of its decoder layers
        for block, ref_block in list(zip(a["layers"], r["layers"]))[: min(frozen, n - 1)]:
            if not _same_params(block, ref_block):
                break
            equal += 1
        return equal

    def capture(self, split: int) -> ContextManager[dict[str, Any]]:
        """Record the input of the actor's block ``split`` (hidden state and keyword
        arguments: causal mask, position embeddings ...) during the forwards in the block
        (:func:`envs.trunk_states.capture_block_input`)."""
        return capture_block_input(self.actor_parts["layers"][split], with_kwargs=True)

    def reference_top(self, split: int, captured: dict[str, Any], cache: Any, head: bool = True) -> torch.Tensor:
        """Run the reference's blocks ``split ..``, final norm and head on a captured
        actor hidden state; ``cache`` (an offset cache of those blocks) is updated in place.

        :param head: False stops before the head (see :meth:`heads`)
        :return: raw next-token logits of the last position, ``(B, vocab)``, or with
            ``head=False`` the normed hidden state of the last position, ``(B, 1, H)``
        """
        if "hidden" not in captured:
            raise RuntimeError("the actor's forward did not reach the captured block (no hidden state recorded)")
        kwargs = dict(captured["kwargs"])
        keys = [k for k in _CACHE_KEYS if k in kwargs]
        if not keys:
            raise RuntimeError(
                f"the decoder layers of {type(self.reference).__name__} did not receive their KV cache as a keyword "
                f"({' or '.join(_CACHE_KEYS)}); build the env with reference_share='off'"
            )
        for key in keys:
            kwargs[key] = cache
        hidden = captured["hidden"]
        for layer in self.ref_parts["layers"][split:]:
            hidden = layer(hidden, **kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        hidden = self.ref_parts["norm"](hidden[:, -1:])
        return self.ref_parts["head"](hidden)[:, -1] if head else hidden

    def actor_trunk(self, **kwargs: Any) -> Any:
        """The actor's decoder without its head (``model.model(**kwargs)``): for the
        supported models the logits are exactly ``lm_head`` of its last hidden state."""
        return self.actor_parts["inner"](**kwargs)

    def heads(self, actor_hidden: torch.Tensor, ref_hidden: torch.Tensor, stamp: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits ``(B, vocab)`` of the actor and of the reference from their normed last
        hidden states ``(B, 1, H)``. When the actor's head is frozen and equal to the
        reference's (tied, frozen embeddings), one matmul over both row sets reads the
        vocabulary-sized weight once instead of twice (on a memory-bound device the head
        costs as much as several decoder blocks). ``stamp``: the actor's weight version
        (see :func:`decode_head`)."""
        if self.fused_head:
            logits = decode_head(self.actor_parts["head"], torch.cat([actor_hidden, ref_hidden.to(actor_hidden.dtype)]))[:, -1]
            return logits[: actor_hidden.shape[0]], logits[actor_hidden.shape[0] :]
        return decode_head(self.actor_parts["head"], actor_hidden, stamp)[:, -1], decode_head(self.ref_parts["head"], ref_hidden)[:, -1]


_HEAD_T: "weakref.WeakKeyDictionary[nn.Module, tuple[int, int, int, Any, torch.Tensor]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def decode_head(head: nn.Module, hidden: torch.Tensor, stamp: Any = None) -> torch.Tensor:
    """``head(hidden)`` for the few rows of an incremental step. On CPU a bias-free linear
    head is applied as ``hidden @ W^T`` with ``W^T`` kept as a contiguous ``(H, vocab)``
    copy (rebuilt whenever the weight changes: new tensor, in-place version, or a new
    ``stamp``): for 4 rows of SmolLM2's 49k x 576 head this takes about 14 ms instead of
    18 ms (float rounding aside, the same numbers). Elsewhere, or with gradients on, it is
    ``head(hidden)``.

    :param stamp: the caller's version of the weights (e.g. :meth:`envs.lm_core.LMCore.version`,
        which counts optimizer steps): fused optimizers write weights without bumping their
        in-place version counter, so a trainable head must pass one
    """
    weight = getattr(head, "weight", None)
    if (
        type(head) is not nn.Linear or head.bias is not None or weight is None or weight.device.type != "cpu"
        or torch.is_grad_enabled() and weight.requires_grad
    ):
        return head(hidden)
    key = (id(weight), weight.data_ptr(), weight._version, stamp)
    cached = _HEAD_T.get(head)
    if cached is None or cached[:4] != key:
        cached = _HEAD_T[head] = (*key, weight.detach().t().contiguous())
    return hidden.to(weight.dtype) @ cached[4]


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.named_parameters()), list(b.named_parameters())
    if len(pa) != len(pb):
        return False
    for (na, x), (nb, y) in zip(pa, pb):
        if na != nb or x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
            return False
    ba, bb = list(a.named_buffers()), list(b.named_buffers())
    return len(ba) == len(bb) and all(
        na == nb and x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        for (na, x), (nb, y) in zip(ba, bb)
    )


def _mismatch(actor: nn.Module, reference: nn.Module, a: dict, r: dict) -> str | None:
    """Why the actor's hidden states cannot feed the reference's blocks (None if they can)."""
    if type(actor) is not type(reference) or type(a["inner"]) is not type(r["inner"]):
        return f"the actor ({type(actor).__name__}) and the reference ({type(reference).__name__}) differ in class"
    if len(a["layers"]) != len(r["layers"]):
        return f"the actor has {len(a['layers'])} blocks and the reference {len(r['layers'])}"
    if getattr(actor.config, "_attn_implementation", None) != getattr(reference.config, "_attn_implementation", None):
        return "the actor and the reference use different attention implementations"
    pa, pr = next(actor.parameters()), next(reference.parameters())
    if pa.device != pr.device or pa.dtype != pr.dtype:
        return f"the actor ({pa.dtype}, {pa.device}) and the reference ({pr.dtype}, {pr.device}) differ in dtype or device"
    # position embeddings come from the actor's forward: its rotary tables must be the reference's
    rot_a, rot_r = getattr(a["inner"], "rotary_emb", None), getattr(r["inner"], "rotary_emb", None)
    if (rot_a is None) != (rot_r is None) or (rot_a is not None and not _same_params(rot_a, rot_r)):
        return "the actor's and the reference's rotary position embeddings differ"
    return None
