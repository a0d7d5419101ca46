"""Mixed precision of training steps: when bfloat16 autocast pays, and the context it runs in."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

AUTOCAST_CHOICES = ("auto", "bf16", "off")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (x86 AMX tiles or
    AVX512-BF16, as oneDNN uses them), so that bf16 autocast is faster, not just emulated."""
    cpu = getattr(torch, "cpu", None)
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, check, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # an older torch without cpuinfo support: treat as absent
            pass
    return False


def autocast_context(device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """The context a training forward runs in: ``torch.autocast`` to ``dtype`` on ``device``
    (nothing when ``dtype`` is ``None``).

    On a CPU it also selects the math backend of ``scaled_dot_product_attention``: the
    backward of torch's fused CPU attention kernel is several times slower in bfloat16 than in
    float32, which cancelled the gain of the bfloat16 matrix products; the math backend's are
    ordinary matrix products.
    """
    if dtype is None:
        return contextlib.nullcontext()
    dev = torch.device(device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(dev.type, dtype=dtype))
    if dev.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def resolve_autocast(setting: Optional[str], device) -> Optional[torch.dtype]:
    """The autocast dtype a :class:`RewardModelConfig` ``autocast`` setting means on ``device``.

    :param setting: ``"auto"``: ``torch.bfloat16`` on a CUDA device with
        ``torch.cuda.is_bf16_supported()`` and on a CPU with :func:`cpu_has_native_bf16`,
        else ``None``; ``"bf16"``: ``torch.bfloat16`` on any device; ``"off"``/``None``: ``None``
    :param device: the training device
    :return: ``torch.bfloat16``, or ``None`` for float32 (no autocast)
    :raises ValueError: for another setting
    """
    if setting is None or setting == "off":
        return None
    if setting not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES} or None, got {setting!r}")
    if setting == "bf16":
        return torch.bfloat16
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None
