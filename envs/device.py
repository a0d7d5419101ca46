"""The ``device=`` argument: one clear error for a device this machine does not have.

``torch.device("cuda")`` is accepted on a machine without a GPU; the first tensor moved there
then fails deep inside a model load with torch's ``AssertionError: Torch not compiled with
CUDA enabled`` (a CPU build) or ``RuntimeError: No CUDA GPUs are available``. Envs, agents,
the model loader and the CLI check ``device=`` with :func:`check_device` before any slow work.
"""

from __future__ import annotations

from typing import Any

import torch


def _cuda_note() -> str:
    build = torch.version.cuda
    return f"this torch {torch.__version__} is a CPU build" if build is None else "no CUDA GPU is visible"


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` (``"auto"``/``None``: cuda if available, else cpu).

    :raises ValueError: a string that is no torch device, or a device this machine lacks
        (cuda without a visible GPU, an index past the GPU count, mps where it is unavailable),
        with what to pass instead
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asks for a GPU but {_cuda_note()} (torch.cuda.is_available() is False): "
                "use device='cpu', or 'auto' (a GPU when there is one), or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r}: Apple's MPS backend is not available here; use device='cpu' or 'auto'")
    return dev
