"""Optional Triton kernels for eager CUDA paths: built lazily, once each, when ``triton``
imports (it ships with torch's CUDA wheels) and ``PROXFUNC_TRITON`` is not ``0``.

Callers reach a kernel only for concrete CUDA tensors with nothing to differentiate and
nothing traced; every caller keeps an ATen path for everything else, and the tests run the
kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["kernel", "on_device"]

_BUILT: dict[str, Any] = {}  # name -> jitted kernel, or False when triton is unusable


def kernel(name: str, build: Callable[[Any, Any], Any]) -> Any:
    """The kernel ``build(triton, triton.language)`` made under ``name``, or ``None`` when
    triton cannot be imported or is switched off (``PROXFUNC_TRITON=0``)."""
    got = _BUILT.get(name)
    if got is None:
        got = _BUILT[name] = _build(build) or False
    return got or None


def _build(build: Callable[[Any, Any], Any]) -> Any:
    if os.environ.get("PROXFUNC_TRITON", "1") == "0":
        return None
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed (CPU wheels) or broken: the ATen path then
        return None
    return build(triton, tl)


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
