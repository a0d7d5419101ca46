"""The text envs' observation space, and the handle it carries to the env's models.

``TextObservationSpace`` is ``Dict(input_ids=Box(0, vocab-1, (L,), int64),
attention_mask=Box(0, 1, (L,), int64))`` (int64, so SB3 does not one-hot it) plus
:attr:`TextObservationSpace.lm`, an :class:`LMHandle`: SB3's PPO builds a policy from the
observation space alone, so the space is how an LM policy reaches the env's own actor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces

if TYPE_CHECKING:
    from envs.lm_core import LMCore


class LMHandle:
    """The explicit handle from a text env's observation space to the env's :class:`envs.lm_core.LMCore`,
    so an LM policy built from the space alone (as SB3's PPO builds it) acts with the env's
    own actor.

    Pickled (``model.save``, a space sent to another process) it keeps only the core's
    serializable description :attr:`spec`; :meth:`core` of an unpickled handle rebuilds
    the core from it (:func:`envs.lm_core.core_from_spec`). Copies (``copy.deepcopy`` of the space) share
    the handle, hence the core.
    """

    def __init__(self, core: LMCore | None = None, spec: dict[str, Any] | None = None):
        self._core = core
        self.spec = dict(spec if spec is not None else core.spec if core is not None else {})

    def core(self) -> LMCore:
        """The env's core; rebuilt from :attr:`spec` (once) when the handle was unpickled."""
        if self._core is None:
            from envs.lm_core import core_from_spec

            self._core = core_from_spec(self.spec, device=self.spec.get("device", "cpu"))
        return self._core

    def __reduce__(self):
        return (LMHandle, (None, self.spec))

    def __copy__(self) -> "LMHandle":
        return self

    def __deepcopy__(self, memo: dict) -> "LMHandle":
        return self


class TextObservationSpace(spaces.Dict):
    """``Dict(input_ids=Box(0, vocab-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))``
    that also carries :attr:`lm`, the :class:`LMHandle` of the env's models (pickled as
    their serializable description, so the space pickles small)."""

    def __init__(self, length: int, vocab_size: int, lm: LMHandle | None = None):
        super().__init__(
            {
                "input_ids": spaces.Box(0, vocab_size - 1, (length,), np.int64),
                "attention_mask": spaces.Box(0, 1, (length,), np.int64),
            }
        )
        self.lm = lm if lm is not None else LMHandle()

    @property
    def lm_spec(self) -> dict[str, Any]:
        """The serializable description of the env's model (:attr:`LMHandle.spec`)."""
        return self.lm.spec

    def __reduce__(self):
        return (TextObservationSpace, (self["input_ids"].shape[0], int(self["input_ids"].high[0]) + 1, self.lm))
