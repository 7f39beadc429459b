"""linf1's prox of row groups on CUDA: each group's threshold and its clamp in one Triton
program per group, sort-free.

For a group ``x_g`` (row ``g`` of every part: a weight alone, or a layer's ``(weight, bias)``,
up to :data:`MAX_ROW` entries in all) and ``r = reg * step``, the prox of ``r * ||.||_inf`` is
``clamp(x_g, -tau_g, tau_g)`` with ``tau_g = max(theta_g, 0)`` and ``theta_g`` the simplex
threshold of ``|x_g|`` (``sum_j max(|x_j| - theta, 0) = r``; see
:mod:`proxfunc.kernels.threshold`). One program holds its group in registers: it reads the
group once, runs Michelot's fixed point there (started from
``max(max|x| - r, (||x||_1 - r) / n)``; Newton's step on a convex piecewise-linear function,
exact once the active set stops changing, at most ``n + 1`` steps, a handful in practice) and
writes the clamped group: one read and one write. In place is safe for the same reason: a
program reads all of its group before it writes any of it.

Rounding: sums and ``theta`` are in float32 for float32/float16/bfloat16 inputs and in float64
for float64 (``r`` is passed as a 1-element tensor of that dtype, since Triton would pass a
Python float as float32), pairwise within the group; the clamp is computed in that dtype and
rounded once to the input's dtype, to nearest even (as ATen's casts). The sums run in their
own order, so ``tau`` may differ from the ATen path's in the last bits.

Why: on CUDA the ATen path finds the thresholds through a segmented sort of every row; this
kernel is several times faster than that path at every measured shape (timings:
``benchmarks/README.md``, the CUDA sections; ``python -m benchmarks.cuda_variants``).

:func:`run` is reached only through :func:`proxfunc.dispatch.select`, which checks
:data:`SPEC`; kernels are built lazily by :mod:`._triton` (``PROXFUNC_TRITON=0`` switches them
off). A launch that raises switches the kernel off for the process and :func:`run` returns
``None``: the caller then takes the ATen path.
"""

from __future__ import annotations

from typing import Any

import torch

from ...dispatch import KernelSpec
from ..cpu._cc import bump
from . import _triton

__all__ = ["SPEC", "MAX_ROW", "available", "run"]

_NAME = "linf1_rows"

#: Longest group (all parts together) one program holds in registers (a power of two).
MAX_ROW = 8192


def available() -> bool:
    """Whether the kernel can be launched: triton imports, ``PROXFUNC_TRITON`` is not ``0``,
    the kernel is built (at the first call) and no launch of it has failed."""
    return _get_kernel() is not None


#: What the kernel takes (checked by :func:`proxfunc.dispatch.select` before :func:`run`).
SPEC = KernelSpec(
    name=_NAME,
    device="cuda",
    dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    max_parts=2,
    max_group=MAX_ROW,
    available=available,
)


def run(leaves: list[torch.Tensor], r: float, out: list[torch.Tensor] | None = None) -> list[torch.Tensor] | None:
    """``clamp(x_g, -tau_g, tau_g)`` for every row group ``g`` of ``leaves`` (row ``g`` of
    every leaf, along dim 0), linf1's prox with ``r = reg * step``; into ``out`` when given
    (``out=leaves``: in place, version counters bumped), else into new tensors.

    The layout is :data:`SPEC`'s, checked by :func:`proxfunc.dispatch.select`: one or two
    contiguous tensors of one dtype in ``SPEC.dtypes`` on one device, with the same number of
    rows and at most :data:`MAX_ROW` entries a group, ``0 <= r`` within the dtype's range.
    ``None`` when the kernel cannot run (switched off, or its launch raised: nothing written).
    """
    assert 0 < len(leaves) <= SPEC.max_parts and leaves[0].dtype in SPEC.dtypes and 0 <= r, "outside SPEC"
    dst = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in leaves] if out is None else out
    assert len(dst) == len(leaves) and all(
        y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous() for x, y in zip(leaves, dst)
    ), "out must match leaves"
    # a part with no columns (e.g. an empty bias slice) has nothing to read or write
    todo = [(x, y) for x, y in zip(leaves, dst) if x.numel()]
    if not todo:
        return dst
    if not _launch([x for x, _ in todo], r, [y for _, y in todo]):
        return None
    if out is not None:
        bump(out)
    return dst


def _get_kernel() -> Any:
    return _triton.kernel(_NAME, _build)


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _launch(leaves: list[torch.Tensor], r: float, out: list[torch.Tensor]) -> bool:
    """Launch the kernel over one or two non-empty parts (no layout checks: :func:`run`'s
    caller's, or a test's on the CPU under ``TRITON_INTERPRET=1``); ``False`` when it could not
    run (switched off, or the launch raised and switched it off), nothing written then."""
    kernel = _get_kernel()
    if kernel is None:
        return False
    a = leaves[0]
    b = leaves[1] if len(leaves) > 1 else a  # a placeholder when there is no second part
    rows = a.shape[0]
    na, nb = a.numel() // rows, b.numel() // rows
    block_a, block_b = _block(na), _block(nb)
    # r as a 1-element tensor: Triton passes a Python float as float32 (float64 groups need it exact)
    r_t = torch.full((1,), r, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=a.device)
    return _triton.launch(
        _NAME,
        kernel,
        (rows,),
        a,
        out[0],
        b,
        out[-1],
        r_t,
        na,
        nb,
        HAS_B=len(leaves) > 1,
        ACC64=a.dtype == torch.float64,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        num_warps=_warps(max(block_a, block_b)),
    )


def _warps(block: int) -> int:
    """Warps per program: every Michelot step reduces across the program's warps, so short
    groups want few. The fastest of 2/4/8/16 warps on an H200 (GPU time of one call in us,
    ``benchmarks/README.md``): 65536x256 137/228/435/835, 16384x1024 70/86/149/286, 4096x4096
    78/76/80/113, 1024x8192 50/51/48/58."""
    return 2 if block <= 1024 else 4 if block <= 4096 else 8


def _build(triton: Any, tl: Any) -> Any:
    @triton.jit
    def linf1_rows_kernel(a_ptr, oa_ptr, b_ptr, ob_ptr, r_ptr, na, nb, HAS_B: tl.constexpr, ACC64: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
        # group `row`: row `row` of a (na entries) and, with HAS_B, row `row` of b (nb entries)
        row = tl.program_id(0)
        ca = tl.arange(0, BLOCK_A)
        ma = ca < na
        offa = row.to(tl.int64) * na + ca
        xa = tl.load(a_ptr + offa, mask=ma, other=0)
        if ACC64:
            xa = xa.to(tl.float64)
        else:
            xa = xa.to(tl.float32)
        va = tl.abs(xa)  # 0 outside the row
        zero_a = tl.zeros_like(va)
        rr = tl.load(r_ptr)
        # n counted from the masks, not na.to(...): Triton turns an int argument equal to 1 into
        # a compile-time constant, and the loop-carried values must keep one type
        n = tl.sum(ma.to(xa.dtype), axis=0)
        top = tl.max(va, axis=0)
        total = tl.sum(va, axis=0)
        if HAS_B:
            cb = tl.arange(0, BLOCK_B)
            mb = cb < nb
            offb = row.to(tl.int64) * nb + cb
            xb = tl.load(b_ptr + offb, mask=mb, other=0).to(xa.dtype)
            vb = tl.abs(xb)
            zero_b = tl.zeros_like(vb)
            n += tl.sum(mb.to(xa.dtype), axis=0)
            top = tl.maximum(top, tl.max(vb, axis=0))
            total += tl.sum(vb, axis=0)
        # the lower bound max(max v - r, (sum v - r) / n), then Michelot's steps
        theta = tl.maximum(top - rr, (total - rr) / n)
        count = n
        steps = (n * 0).to(tl.int32)
        going = n > 0
        while going:
            act = (va > theta) & ma
            c = tl.sum(act.to(xa.dtype), axis=0)
            s = tl.sum(tl.where(act, va, zero_a), axis=0)
            if HAS_B:
                act_b = (vb > theta) & mb
                c += tl.sum(act_b.to(xa.dtype), axis=0)
                s += tl.sum(tl.where(act_b, vb, zero_b), axis=0)
            # c == 0 only when r == 0 and theta reached the max: theta is the answer. The max
            # keeps the iteration monotone under rounding (active sets only shrink).
            theta = tl.maximum(theta, tl.where(c > 0, (s - rr) / tl.maximum(c, 1), theta))
            steps += 1
            going = (c != count) & (c != 0) & (steps <= n.to(tl.int32) + 1)
            count = c
        tau = tl.maximum(theta, 0)
        ya = tl.where(xa > tau, tau, tl.where(xa < -tau, -tau, xa))  # clamp; NaN stays NaN
        tl.store(oa_ptr + offa, ya.to(oa_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ma)
        if HAS_B:
            yb = tl.where(xb > tau, tau, tl.where(xb < -tau, -tau, xb))
            tl.store(ob_ptr + offb, yb.to(ob_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mb)

    return linf1_rows_kernel
