"""Per-group scaling ``x * s`` along one dim of ``x``: l21's second pass, one read + one write.

``mul_along(x, s, d)`` multiplies slice ``i`` of ``x`` along dim ``d`` by ``s[i]`` (``d=None``:
``s`` is one value for all of ``x``), in ``s``'s dtype, rounded once to ``x``'s dtype;
``out=x`` writes in place. The result is bit for bit the ATen expression
``(x.to(s.dtype) * s.reshape(...)).to(x.dtype)`` (one correctly rounded multiply per entry).

Why a kernel of our own: on CUDA, ATen runs a broadcast multiply (``x * s[:, None]``) with its
generic elementwise kernel, which does not vectorize operands with a zero stride; on an H200
it took 1.51x the time of a ``clone`` of ``x`` (2.6 TB/s) where one read and one write
should take 1.0x. A Triton kernel that loads ``s`` once per row (or per column block) runs
at 1.02-1.06x on large tensors (``python -m benchmarks.cuda_variants``). It is used eagerly
(callers only reach this module when nothing is differentiated or traced) for contiguous
CUDA tensors of at least ``MIN_NUMEL`` entries when triton is usable
(:mod:`proxfunc.kernels._triton`); everything else takes the ATen expression.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _tree
from . import _triton

__all__ = ["mul_along", "scaled", "MIN_NUMEL"]

#: Smaller tensors take ATen's kernel. Triton's launch costs ~19 us of host time (H200 host,
#: torch 2.11): the multiply alone is faster from 2**24 entries (36 vs 55 us), but an eager
#: l21 call at that size is bound by host time (its ~90 us of Python and launches exceed the
#: GPU's 62 us) and gained nothing; at 2**28 it went from 2.08x to 1.58x a clone.
MIN_NUMEL = 1 << 25
#: Entries per program (a power of two); rows shorter than ``_MIN_ROW`` take ATen's kernel.
_BLOCK = 4096
_MIN_ROW = 512
_NUM_WARPS = 8


def mul_along(x: torch.Tensor, s: torch.Tensor, d: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * s`` with ``s`` along dim ``d`` of ``x`` (``None``: ``s`` is 0-d), computed in
    ``s.dtype`` and rounded to ``x.dtype``; into ``out`` when given (``out=x``: in place,
    ``x`` then has ``s``'s dtype)."""
    if _usable(x, s, out):
        return _launch(x, s, d, torch.empty_like(x) if out is None else out)
    return scaled(x, s, d) if out is None else _aten_into(x, s, d, out)


def scaled(x: torch.Tensor, s: torch.Tensor, d: int | None) -> torch.Tensor:
    """The ATen expression of :func:`mul_along` (differentiable, traceable)."""
    return _tree.cast(_tree.cast(x, s.dtype) * _tree.along(s, x, d), x.dtype)


def _aten_into(x: torch.Tensor, s: torch.Tensor, d: int | None, out: torch.Tensor) -> torch.Tensor:
    return x.mul_(_tree.along(s, x, d)) if out is x else out.copy_(scaled(x, s, d))


def _usable(x: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None) -> bool:
    if x.device.type != "cuda" or x.numel() < MIN_NUMEL or not x.is_contiguous() or not s.is_contiguous():
        return False
    if s.device != x.device:
        return False
    if out is not None and not (out is x or (out.is_contiguous() and out.shape == x.shape)):
        return False
    return _get_kernel() is not None


def _get_kernel() -> Any:
    return _triton.kernel("mul_along", _build)


def _geometry(shape: torch.Size, d: int | None) -> tuple[int, int, int, bool]:
    """``(rows, row_len, inner, by_row)``: ``x`` seen as ``rows`` rows of ``row_len`` entries.

    ``by_row``: rows are the slices ``(outer, i)`` of length ``inner`` (the product of the dims
    after ``d``), each scaled by one ``s[row % size_d]``; otherwise rows are the ``outer``
    blocks of ``size_d * inner`` entries and entry ``c`` takes ``s[c // inner]``.
    """
    n = 1
    for k in shape:
        n *= k
    if d is None:
        return 1, n, n, True
    inner = 1
    for k in shape[d + 1 :]:
        inner *= k
    size_d = shape[d]
    if inner >= _MIN_ROW:
        return n // max(inner, 1), inner, inner, True
    return n // max(size_d * inner, 1), size_d * inner, inner, False


def _launch(x: torch.Tensor, s: torch.Tensor, d: int | None, out: torch.Tensor) -> torch.Tensor:
    """Run the Triton kernel (no eligibility checks: the caller's, or a test's on the CPU under
    ``TRITON_INTERPRET=1``). Falls back to ATen for shapes the kernel does not cover."""
    kernel = _get_kernel()
    d = None if d is None else d % max(x.dim(), 1)
    rows, row_len, inner, by_row = _geometry(x.shape, d)
    chunks = -(-row_len // _BLOCK) if row_len else 0
    if kernel is None or row_len < _MIN_ROW or rows * chunks >= 2**31 or x.numel() == 0:
        return _aten_into(x, s, d, out)
    size_d = 1 if d is None else x.shape[d]
    ok = _triton.launch(
        "mul_along",
        kernel,
        (rows * chunks,),
        x,
        s,
        out,
        row_len,
        chunks,
        size_d,
        inner,
        BY_ROW=by_row,
        INNER_ONE=inner == 1,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out if ok else _aten_into(x, s, d, out)


def _build(triton: Any, tl: Any) -> Any:
    @triton.jit
    def mul_along_kernel(x_ptr, s_ptr, o_ptr, row_len, chunks, size_d, inner, BY_ROW: tl.constexpr,
                         INNER_ONE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        row = pid // chunks
        cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_len
        offs = row.to(tl.int64) * row_len + cols
        v = tl.load(x_ptr + offs, mask=mask)
        if BY_ROW:  # the whole row is one slice along d
            sv = tl.load(s_ptr + row % size_d)
        elif INNER_ONE:  # d is the last dim: entry c of a row belongs to slice c
            sv = tl.load(s_ptr + cols, mask=mask, other=0)
        else:
            sv = tl.load(s_ptr + cols // inner, mask=mask, other=0)
        r = v.to(sv.dtype) * sv
        tl.store(o_ptr + offs, r.to(o_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    return mul_along_kernel
