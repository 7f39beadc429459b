"""Building and launching proxfunc's Triton kernels: each built lazily, once per process, when
``triton`` imports (it ships with torch's CUDA wheels) and ``PROXFUNC_TRITON`` is not ``0``.

Which calls reach a kernel is decided by :func:`proxfunc.dispatch.select` from the kernel's
:class:`~proxfunc.dispatch.KernelSpec` (concrete CUDA tensors with nothing to differentiate
and nothing traced); every operator keeps its ATen path for everything else, and for a kernel
whose launch failed (:func:`launch`). The tests run the kernels on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["kernel", "launch"]

_BUILT: dict[str, Any] = {}  # name -> jitted kernel, or False when triton is unusable


def kernel(name: str, build: Callable[[Any, Any], Any]) -> Any:
    """The kernel ``build(triton, triton.language)`` made under ``name``, or ``None`` when
    triton cannot be imported, is switched off (``PROXFUNC_TRITON=0``, read at the first call
    for ``name``) or a launch of the kernel failed."""
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
    except Exception:  # not installed (CPU wheels) or broken: the operators' ATen paths then
        return None
    return build(triton, tl)


def launch(name: str, built: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> bool:
    """Launch ``built`` (the kernel :func:`kernel` made under ``name``) on the device of its
    first argument (Triton launches on the current device); ``False`` when the launch raised.

    Triton compiles a kernel at its first launch for each argument signature; on a GPU or
    toolchain it cannot compile for, that raises here, before anything is written. The kernel
    is then switched off for the rest of the process with one ``RuntimeWarning``, and the
    caller takes its ATen path: a missing optimisation must not break an operator.
    """
    first = args[0]
    try:
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            built[grid](*args, **meta)
    except Exception as e:
        _BUILT[name] = False
        warnings.warn(
            f"proxfunc: the Triton kernel {name!r} could not run ({type(e).__name__}: {e}); "
            "using the ATen path instead (PROXFUNC_TRITON=0 skips the kernels)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
