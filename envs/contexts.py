"""``Contexts``: the N token contexts of a text env, advanced with one batched forward per model.

:class:`Contexts` holds ``N`` token contexts with one batched KV cache per model and
advances all of them with ONE incremental forward of the actor and ONE of the
reference; the single env uses it with ``N = 1`` and the vector env with ``N = num_envs``,
so both charge bit-for-bit the same computation.

Layout of the batched KV cache: rows are right-aligned (left padding). ``mask[i, j]`` is 1
where column ``j`` of row ``i`` holds a real token; positions are passed explicitly
(``position_ids`` = number of real tokens before the token), so a row's keys keep their
rotary positions wherever its columns sit. A reset writes the prefilled KV of the new
prompt into its row (the cache grows on the left when the prompt is longer than the
others) and all-pad leading columns are trimmed.

After every actor forward the contexts store the actor's last hidden state and logits in
the core's step cache (:meth:`envs.lm_core.LMCore.store`), stamped with the actor's weight
version; when that version changed since a cache was built (an update mid-episode), the
next forward first re-prefills (or, with kept trunk states, recomputes only the top
blocks), so the log-probabilities charged stay exact for the current actor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from envs.decoder import decoder_parts
from envs.kv_cache import cache_layers, new_cache, output_cache, prefill
from envs.lm_core import LMCore
from envs.reference import check_reference_share, decode_head
from envs.sampling import kl_terms
from envs.trunk_states import capture_block_input, frozen_blocks, frozen_signature, top_hidden


def _expand(out: dict[str, Any], inverse: list[int]) -> dict[str, Any]:
    """A :func:`prefill` result for the unique sequences, repeated to one row per
    sequence (``inverse[j]`` is the unique row of sequence ``j``)."""
    if inverse == list(range(len(inverse))):
        return out
    idx = torch.as_tensor(inverse, device=out["mask"].device)
    expanded = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    if "kv" in out:
        expanded["kv"] = [(k[idx], v[idx]) for k, v in out["kv"]]
    return expanded


class _ModelState:
    """Batched KV cache of one model: per-layer (keys, values), mask, next-token logits."""

    def __init__(self):
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.version: int | None = None
        # first model layer the cache holds (> 0: the reference's top blocks on a shared trunk)
        self.offset = 0

    def clear(self) -> None:
        self.cache = self.mask = self.logits = self.hidden = self.version = None


class Contexts:
    """``n`` token contexts (prompt + response so far) with a batched KV cache of the actor
    and of the reference.

    With ``reference_share="auto"`` the reference runs only the blocks above the actor's
    frozen, identical lower blocks, on the actor's hidden state (see :mod:`envs.reference`);
    :attr:`shared_blocks` says how many lower blocks it currently takes from the actor
    (0 = a full reference forward). The split is re-checked before every forward; when it
    changes the reference's cache is rebuilt. On a shared trunk both caches keep the same
    column layout (they are prefilled, stepped and trimmed together), so the reference's
    blocks reuse the causal mask and position embeddings of the actor's forward.

    :param core: the models
    :param n: number of contexts (rows)
    :param reference_share: ``"auto"`` (share the frozen trunk when exact) or ``"off"``

    :attr:`with_reference` False (see :meth:`set_reference`) runs no reference forward at
    all: only the actor's cache is kept and :meth:`log_probs` returns NaN for
    ``ref_logprob`` and ``kl`` (for trainers that compute reference log-probs themselves,
    once per response, e.g. GRPO).

    :attr:`keep_trunk` True (set by the text trainers) also keeps, per context, the actor's
    hidden state entering its first trainable block ``s`` (:attr:`keep_split`, the number of
    leading frozen blocks) for every token the actor has run; :meth:`kept_states` hands
    them to the update, which then runs only the top blocks (see :mod:`envs.trunk_states`).

    Contexts with equal token ids in one prefill (GRPO's group of ``G`` copies of a prompt)
    are run once and their KV caches copied.
    """

    def __init__(self, core: LMCore, n: int, reference_share: str = "auto"):
        self.core = core
        self.n = n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.prompt_len = [0] * n
        self.actor = _ModelState()
        self.ref = _ModelState()
        self.reference_share = check_reference_share(reference_share)
        self.trunk = core.shared_trunk() if self.reference_share == "auto" else None
        self.shared_blocks = 0
        self.with_reference = True
        # the actor's frozen-trunk states per context (see keep_trunk / kept_states)
        self._actor_parts = decoder_parts(core.actor)[0]
        self.keep_trunk = False
        self.keep_split = 0
        self._keep_sig: tuple | None = None
        self._kept: list[list[torch.Tensor] | None] = [None] * n
        self._kept_len = [0] * n
        core.reserve(n)

    def set_reference(self, enabled: bool) -> None:
        """Switch the per-token reference forward on or off. Switching it back on rebuilds
        both caches of every live context (so the reference's covers every token)."""
        enabled = bool(enabled)
        if enabled == self.with_reference:
            return
        self.with_reference = enabled
        self.actor.clear()
        self.ref.clear()
        rows = [row for row in range(self.n) if self.ids[row]]
        self.shared_blocks = self.ref.offset = self.trunk.split() if (enabled and self.trunk is not None) else 0
        self._prefill_rows(rows, actor=True, ref=enabled)

    # -- cache surgery ---------------------------------------------------------------
    @staticmethod
    def _write_rows(state: _ModelState, model: nn.Module, rows: list[int], n: int, out: dict[str, Any]) -> None:
        """Write prefilled KV of ``rows`` into the batched cache (right-aligned)."""
        new_mask, kv = out["mask"], out["kv"]
        width = new_mask.shape[1]
        device = new_mask.device
        idx = torch.as_tensor(rows, device=device)
        if state.cache is None or sorted(rows) == list(range(n)):
            # every row restarts (or first fill): the prefill becomes the cache, no copy
            if list(rows) == list(range(n)):
                state.cache = new_cache(kv, state.offset)
                state.mask = new_mask
                Contexts._trim(state)
                return
            mask = torch.zeros((n, width), dtype=torch.long, device=device)
            mask[idx] = new_mask
            full = []
            for k, v in kv:
                fk = k.new_zeros((n, *k.shape[1:]))
                fv = v.new_zeros((n, *v.shape[1:]))
                fk[idx], fv[idx] = k, v
                full.append((fk, fv))
            state.cache = new_cache(full, state.offset)
            state.mask = mask
        else:
            layers = cache_layers(state.cache)
            cur = state.mask.shape[1]
            if width > cur:  # grow on the left
                grow = width - cur
                state.mask = torch.cat([state.mask.new_zeros((n, grow)), state.mask], dim=1)
                for layer in layers:
                    pad = layer.keys.new_zeros((n, layer.keys.shape[1], grow, layer.keys.shape[3]))
                    layer.keys = torch.cat([pad, layer.keys], dim=2)
                    layer.values = torch.cat([pad, layer.values], dim=2)
            total = state.mask.shape[1]
            state.mask[idx] = 0
            state.mask[idx, total - width :] = new_mask
            for layer, (k, v) in zip(layers, kv):
                layer.keys[idx] = 0
                layer.values[idx] = 0
                layer.keys[idx, :, total - width :] = k
                layer.values[idx, :, total - width :] = v
        Contexts._trim(state)

    @staticmethod
    def _trim(state: _ModelState) -> None:
        used = state.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else state.mask.shape[1]
        if first > 0:
            state.mask = state.mask[:, first:]
            for layer in cache_layers(state.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    # -- operations ------------------------------------------------------------------
    @torch.no_grad()
    def set_prompts(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Start contexts ``rows`` at the given prompt token ids (prefill of both models)."""
        for row, ids in zip(rows, prompts):
            self.ids[row] = list(ids)
            self.prompt_len[row] = len(ids)
        if sorted(rows) == list(range(self.n)):
            # every context restarts (a GRPO group reset): drop the old caches instead of
            # first bringing them up to date with the actor's new weights
            self.actor.clear()
            self.ref.clear()
        actor_done, ref_done = self._refresh()  # a rebuild already covers the new prompts
        self._prefill_rows(rows, actor=not actor_done, ref=not ref_done)

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring the caches up to date with the current actor (what the next forward does
        first); the next-token logits of every context land in the core's step cache."""
        self._refresh(check_split=False)

    def _refresh(self, check_split: bool = True) -> tuple[bool, bool]:
        """Before a forward: re-check the reference's shared trunk and the actor's weights,
        and re-prefill every context of the model(s) whose cache is stale.

        :param check_split: re-check the trunk split even when the actor is not stale (a
            step that runs no forward can skip it: logits already computed stay exact)
        :return: ``(actor rebuilt, reference rebuilt)``; rebuilt caches already hold every
            token of :attr:`ids`
        """
        share = self.trunk is not None and self.with_reference
        if self.actor.cache is None:  # nothing built yet
            self.shared_blocks = self.ref.offset = self.trunk.split() if share else 0
            return False, False
        stale = self.actor.version != self.core.version()
        if not (stale or check_split):
            return False, False
        split = self.trunk.split() if share else 0
        changed = split != self.shared_blocks
        if not (stale or changed):
            return False, False
        if stale and not changed and self._refresh_top():
            # only the actor's top blocks changed: their KV recomputed in place from the kept
            # trunk states, same layout (the reference's cache stays valid); nothing advanced
            return False, False
        self.shared_blocks = self.ref.offset = split
        # on a shared trunk both caches are rebuilt together so their layouts stay equal
        rebuild_actor = stale or split > 0
        rebuild_ref = (changed or split > 0) and self.with_reference
        rows = [row for row in range(self.n) if self.ids[row]]
        if rebuild_actor:
            self.actor.clear()
        if rebuild_ref:
            self.ref.clear()
        self._prefill_rows(rows, actor=rebuild_actor, ref=rebuild_ref)
        return rebuild_actor, rebuild_ref

    def _prefill_rows(self, rows: list[int], actor: bool, ref: bool) -> None:
        if not rows or not (actor or ref):
            return
        core = self.core
        seqs = [self.ids[row] for row in rows]
        # equal contexts (a GRPO group) are run once: their rows get copies of one prefill
        first: dict[tuple, int] = {}
        inverse = [first.setdefault(tuple(s), len(first)) for s in seqs]
        unique = [list(key) for key in first]
        split = self.shared_blocks
        if split and actor != ref:
            raise RuntimeError("internal error: on a shared trunk the actor and reference caches are prefilled together")
        ref_out = None
        if actor:
            version = core.version()
            keep = self._keep_begin(rows)
            with contextlib.ExitStack() as stack:
                captured = stack.enter_context(self.trunk.capture(split)) if split else None
                kept = stack.enter_context(capture_block_input(self._actor_parts["layers"][keep])) if keep else None
                out = prefill(core.actor, unique, core.pad_id)
            if split and ref and self.with_reference:
                ref_out = _expand(self._reference_top_prefill(captured, out["mask"]), inverse)
            if keep:
                states = kept["hidden"].detach()
                for j, row in enumerate(rows):
                    u = inverse[j]
                    self._kept[row] = [states[u, out["mask"][u].bool()]]
                    self._kept_len[row] = len(seqs[j])
            out = _expand(out, inverse)
            self._write_rows(self.actor, core.actor, rows, self.n, out)
            self._set_next(self.actor, rows, out["logits"], out["hidden"])
            self.actor.version = version
            core.store([tuple(s) for s in seqs], version, out["hidden"], out["logits"])
        if ref and self.with_reference:
            if ref_out is None:
                ref_out = _expand(prefill(core.reference, unique, core.pad_id, hidden=False), inverse)
            self._write_rows(self.ref, core.reference, rows, self.n, ref_out)
            self._set_next(self.ref, rows, ref_out["logits"], None)

    # -- the actor's frozen-trunk states (keep_trunk) -----------------------------------
    def _keep_begin(self, rows: list[int]) -> int:
        """Before a prefill of ``rows``: the block whose input to keep (0 = none). A change
        of the frozen prefix drops the states of every other row."""
        if not self.keep_trunk or self._actor_parts is None:
            split, sig = 0, None
        else:
            split = frozen_blocks(self._actor_parts)
            sig = frozen_signature(self._actor_parts, split)
        if split != self.keep_split or sig != self._keep_sig:
            self._kept = [None] * self.n
            self._kept_len = [0] * self.n
        self.keep_split, self._keep_sig = split, sig
        return split

    @torch.no_grad()
    def _refresh_top(self) -> bool:
        """After an update of the actor's top blocks only (its lower blocks still make the
        kept states, same :func:`envs.trunk_states.frozen_signature`), recompute the KV of
        blocks :attr:`keep_split` .. of every cached token and the next-token logits from
        the kept trunk states, in the cache's own column layout, instead of re-prefilling
        every context through the whole model. False (nothing done) unless every cached
        token's state was kept."""
        from envs.trunk_states import frozen_signature, top_hidden

        split, state, core = self.keep_split, self.actor, self.core
        if not split or state.cache is None or state.mask is None or self.actor.offset != 0:
            return False
        if frozen_signature(self._actor_parts, split) != self._keep_sig:
            return False
        counts = state.mask.sum(-1).tolist()
        rows = [row for row in range(self.n) if counts[row]]
        if not rows or any(self._kept[row] is None or self._kept_len[row] != counts[row] for row in rows):
            return False
        mask = state.mask
        keep = mask.bool()
        parts = self._actor_parts
        states = torch.cat([chunk for row in rows for chunk in self._kept[row]])
        hidden = states.new_zeros((*mask.shape, states.shape[-1]))
        hidden[keep] = states.reshape(-1, states.shape[-1])
        cache = new_cache(None, split)
        out = top_hidden(parts, split, hidden, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
        layers = cache_layers(state.cache)
        kv_keep = keep[:, None, :, None]
        for layer, new in zip(layers[split:], cache_layers(cache)):
            layer.keys = torch.where(kv_keep, new.keys, 0.0)
            layer.values = torch.where(kv_keep, new.values, 0.0)
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # each row's last real column
        idx = torch.as_tensor(rows, device=mask.device)
        h_last = out[idx, last[idx]]
        logits = parts["head"](h_last[:, None])[:, -1]
        self._set_next(state, rows, logits, h_last)
        state.version = core.version()
        core.store([tuple(self.ids[row][: counts[row]]) for row in rows], state.version, h_last, logits)
        return True

    def kept_states(self, row: int, ids: Sequence[int]) -> tuple[torch.Tensor, tuple] | None:
        """``(states, signature)``: the actor's input of block :attr:`keep_split` for the
        tokens ``ids`` of context ``row`` (``(len(ids), H)``, no gradient) and the
        :func:`envs.trunk_states.frozen_signature` of the weights that made them; None when
        the context does not start with ``ids`` or its states were not kept."""
        chunks = self._kept[row]
        n = len(ids)
        if chunks is None or self._kept_len[row] < n or n == 0 or self.ids[row][:n] != list(ids):
            return None
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks)]
        return chunks[0][:n], self._keep_sig

    def _keep_step(self, rows: list[int], box: dict[str, Any] | None) -> None:
        if box is None:
            return
        hidden = box["hidden"].detach()
        for row in rows:
            if self._kept[row] is not None:
                self._kept[row].append(hidden[row])
                self._kept_len[row] += 1

    def _keep_capture(self, stack: contextlib.ExitStack) -> dict[str, Any] | None:
        if not self.keep_split:
            return None
        return stack.enter_context(capture_block_input(self._actor_parts["layers"][self.keep_split]))

    def _reference_top_prefill(self, captured: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
        """:func:`prefill`'s result for the reference, from the actor's captured trunk state."""
        cache = new_cache(None, self.shared_blocks)
        logits = self.trunk.reference_top(self.shared_blocks, captured, cache)
        keep = mask[:, None, :, None].bool()
        kv = [(torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0)) for layer in cache_layers(cache)]
        return {"logits": logits, "mask": mask, "kv": kv}

    def _set_next(self, state: _ModelState, rows: list[int], logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        idx = torch.as_tensor(rows, device=logits.device)
        if state.logits is None:
            state.logits = logits.new_zeros((self.n, logits.shape[-1]))
        state.logits[idx] = logits
        if hidden is not None:
            if state.hidden is None:
                state.hidden = hidden.new_zeros((self.n, hidden.shape[-1]))
            state.hidden[idx] = hidden

    @torch.no_grad()
    def log_probs(self, rows: list[int], actions: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logprob, ref_logprob, kl)`` of ``actions`` (one per row in ``rows``) at the
        current contexts, under the current actor (re-prefilled if its weights changed)."""
        self._refresh(check_split=False)
        idx = torch.as_tensor(rows, device=self.actor.logits.device)
        actor_logp = self.core.log_probs(self.actor.logits[idx])
        if not self.with_reference:
            logprob = actor_logp.gather(-1, actions.to(actor_logp.device)[:, None]).squeeze(-1)
            nan = torch.full_like(logprob, float("nan"))
            return logprob, nan, nan.clone()
        ref_logp = self.core.ref_log_probs(self.ref.logits[idx].to(actor_logp.device))
        return kl_terms(actor_logp, ref_logp, actions.to(actor_logp.device), estimator)

    @torch.no_grad()
    def advance(self, rows: list[int], tokens: list[int]) -> None:
        """Append ``tokens`` to contexts ``rows`` with one incremental forward of each model
        over all ``n`` rows (the other rows are fed a masked pad token)."""
        if not rows:
            return
        for row, tok in zip(rows, tokens):
            self.ids[row].append(int(tok))
        core = self.core
        # a model whose cache was rebuilt (weights changed, trunk split changed) already holds the tokens
        actor_done, ref_done = self._refresh()
        split = self.shared_blocks
        if split and not actor_done:
            self._step_shared(rows, tokens)
        else:
            if not actor_done:
                self._step(self.actor, core.actor, rows, tokens, hidden=True)
            if not ref_done and self.with_reference:
                self._step(self.ref, core.reference, rows, tokens, hidden=False)
        if not actor_done:
            core.store([tuple(self.ids[row]) for row in rows], self.actor.version, self.actor.hidden[rows], self.actor.logits[rows])

    def _feed(self, state: _ModelState, rows: list[int], tokens: list[int]) -> tuple[torch.Tensor, ...]:
        """``(input_ids, attention_mask, position_ids, row index)`` of one incremental step."""
        device = state.mask.device
        live = torch.zeros((self.n, 1), dtype=torch.long, device=device)
        idx = torch.as_tensor(rows, device=device)
        live[idx, 0] = 1
        feed = torch.full((self.n, 1), self.core.pad_id, dtype=torch.long, device=device)
        feed[idx, 0] = torch.as_tensor([int(t) for t in tokens], device=device)
        return feed, torch.cat([state.mask, live], dim=1), state.mask.sum(-1, keepdim=True), idx

    def _step(self, state: _ModelState, model: nn.Module, rows: list[int], tokens: list[int], hidden: bool) -> None:
        """One incremental forward of ``model`` over all rows."""
        feed, mask, position_ids, idx = self._feed(state, rows, tokens)
        parts = self._actor_parts if state is self.actor else None
        every_row = list(rows) == list(range(self.n))
        with contextlib.ExitStack() as stack:
            box = self._keep_capture(stack) if state is self.actor else None
            if parts is not None:
                # decoder, then the head on the last position of the rows fed a token only
                # (logits = head(norm(h)) for the supported models; see decode_head)
                out = parts["inner"](input_ids=feed, attention_mask=mask, position_ids=position_ids,
                                     cache=state.cache, use_cache=True)
                last = out.last_hidden_state[:, -1:]
                live = last if every_row else last[idx]
                logits, last_hidden = decode_head(parts["head"], live, state.version)[:, -1], last[:, -1]
            else:
                out = model(
                    input_ids=feed,
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=state.cache,
                    use_cache=True,
                    output_hidden_states=hidden,
                )
                logits = out.logits[:, -1]
                if not every_row:
                    logits = logits[idx]
                last_hidden = out.hidden_states[-1][:, -1] if hidden else None
        self._keep_step(rows, box)
        state.cache = output_cache(out)
        state.mask = mask
        state.logits[idx] = logits.to(state.logits.dtype)  # (len(rows), vocab), in the order of rows
        if hidden:
            state.hidden[idx] = last_hidden[idx].to(state.hidden.dtype)
        # rows fed a masked pad keep a dead column; columns dead in every row are dropped
        self._trim(state)

    def _step_shared(self, rows: list[int], tokens: list[int]) -> None:
        """One incremental step of the actor and of the reference's top blocks on the
        actor's trunk state (same causal mask and position embeddings), with both heads
        in one matmul when they are the same weights."""
        actor, ref, split = self.actor, self.ref, self.shared_blocks
        if ref.mask.shape != actor.mask.shape:
            raise RuntimeError("internal error: the actor and reference caches lost their common layout")
        feed, mask, position_ids, idx = self._feed(actor, rows, tokens)
        with self.trunk.capture(split) as captured, contextlib.ExitStack() as stack:
            box = self._keep_capture(stack)
            out = self.trunk.actor_trunk(
                input_ids=feed,
                attention_mask=mask,
                position_ids=position_ids,
                cache=actor.cache,
                use_cache=True,
                output_hidden_states=True,
            )
        self._keep_step(rows, box)
        ref_hidden = self.trunk.reference_top(split, captured, ref.cache, head=False)
        actor_logits, ref_logits = self.trunk.heads(out.last_hidden_state[:, -1:], ref_hidden, actor.version)
        actor.cache = output_cache(out)
        actor.mask, ref.mask = mask, mask.clone()
        actor.logits[idx] = actor_logits[idx].to(actor.logits.dtype)
        actor.hidden[idx] = out.hidden_states[-1][idx, -1].to(actor.hidden.dtype)
        ref.logits[idx] = ref_logits[idx].to(ref.logits.dtype)
        self._trim(actor)
        self._trim(ref)
