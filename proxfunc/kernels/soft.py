"""Soft thresholding of many CPU tensors in one C call: l1's eager kernel on the CPU.

``split(xs, t)`` says which tensors the kernel takes; for those, ``shrink(xs, t)`` returns
``x - clamp(x, -t, t)`` for every tensor ``x`` (new tensors) and ``shrink_(xs, t)`` writes it
into them. Both are bit for bit ATen's
``softshrink(x, t)``: ``x - t`` above ``t``, ``x + t`` below ``-t``, ``+0.0`` in between, NaN
kept (``max``/``min`` of a NaN ``x`` return ``x``).

Why: ATen's ``softshrink`` is bound by its arithmetic, not by memory, on the CPU (two compares,
two masked selects and a subtraction per vector): 8.9 us for a 256x256 float32 tensor against
4.9 us for an in-place multiply and 4.2 us for this kernel (2-core AMD EPYC with AVX-512,
one thread). Over a model's 48 tensors the C call also replaces 48 dispatcher round trips:
88 us against 254 us for the ``softshrink`` loop and 186 us for ``SGD(foreach)``'s
``_foreach_add_`` (``python -m benchmarks``, benchmarks/README.md).

The C loop is single-threaded: a tensor gets it when torch uses one thread or when it has at
most ``_cc.SERIAL_NUMEL`` entries; larger tensors with more threads take ATen's parallel
``softshrink`` (:func:`proxfunc.kernels._cc.serial`). Callers reach this module only when nothing is differentiated or
traced (:func:`proxfunc._util.eager_nograd`); tensors the kernel does not take (not CPU,
not float32/float64, not contiguous, a tensor subclass) go through ``softshrink``.
"""

from __future__ import annotations

from operator import attrgetter

import torch

from . import _cc

__all__ = ["shrink", "shrink_", "available", "split", "takes"]

_NAME = "soft"
# ``meta`` holds 3k + 1 int64: k, then k source addresses, k destination addresses, k lengths. Two loops:
# in place (source == destination, which a compiler would otherwise guard with an aliasing
# check that picks its scalar loop) and out of place (a fresh output, no overlap).
_SOURCE = r"""
#include <stdint.h>
#define SHRINK(T, SRC, DST)                                                        \
    for (int64_t i = 0; i < n; ++i) {                                              \
        T v = SRC[i];                                                              \
        T c = v < lo ? lo : v;                                                     \
        c = c > t ? t : c;                                                         \
        DST[i] = v - c;                                                            \
    }
#define SOFT(T, NAME)                                                              \
void NAME(const int64_t *meta0, T t) {                                             \
    const int64_t k = meta0[0], *meta = meta0 + 1;                                 \
    const T lo = -t;                                                               \
    for (int64_t j = 0; j < k; ++j) {                                              \
        const int64_t n = meta[2 * k + j];                                         \
        if (meta[j] == meta[k + j]) {                                              \
            T *x = (T *)(intptr_t)meta[j];                                         \
            SHRINK(T, x, x)                                                        \
        } else {                                                                   \
            const T *restrict a = (const T *)(intptr_t)meta[j];                    \
            T *restrict b = (T *)(intptr_t)meta[k + j];                            \
            SHRINK(T, a, b)                                                        \
        }                                                                          \
    }                                                                              \
}
SOFT(float, proxfunc_soft_f32)
SOFT(double, proxfunc_soft_f64)
"""
_KERNEL = _cc.Kernel(_NAME, _SOURCE)
_DTYPE = attrgetter("dtype")
_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel


def available() -> bool:
    """Whether the C kernel is built and loaded (it is built at the first call)."""
    return _KERNEL.available()


def takes(x: torch.Tensor, t: float) -> bool:
    """Whether the kernel takes tensor ``x`` for threshold ``t``. A threshold beyond the
    dtype's range stays with ATen, which refuses it."""
    return _cc.dense_dtype([x]) is not None and _cc.serial(x.numel()) and 0 < t <= _cc.MAX[x.dtype]


def split(xs: list[torch.Tensor], t: float) -> tuple[list[int], list[int]]:
    """Indices of ``xs`` the kernel takes (:func:`takes`), and of the others (all of them
    when the kernel is unavailable)."""
    if not isinstance(t, float) or not xs or not available():
        return [], list(range(len(xs)))
    dtype = _cc.dense_dtype(xs)  # the common case: a model's tensors, one dtype, all at once
    if dtype is not None and 0 < t <= _cc.MAX[dtype] and _cc.serial(max(map(_NUMEL, xs))):
        return list(range(len(xs))), []
    mine, rest = [], []
    for i, x in enumerate(xs):
        (mine if takes(x, t) else rest).append(i)
    return mine, rest


def _run(srcs: list[torch.Tensor], dsts: list[torch.Tensor], t: float) -> None:
    dtypes = set(map(_DTYPE, srcs))
    for dtype in dtypes:
        if len(dtypes) == 1:
            src, dst = srcs, dsts
        else:
            idx = [i for i, x in enumerate(srcs) if x.dtype == dtype]
            src, dst = [srcs[i] for i in idx], [dsts[i] for i in idx]
        ptrs = list(map(_PTR, src))
        _KERNEL(dtype, [len(src), *ptrs, *(ptrs if dst is src else map(_PTR, dst)), *map(_NUMEL, src)], t)


def shrink(xs: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    """``softshrink(x, t)`` of every tensor of ``xs`` (tensors :func:`split` gave to the
    kernel), as new tensors, in one C call per dtype."""
    out = [torch.empty_like(x) for x in xs]
    _run(xs, out, t)
    return out


def shrink_(xs: list[torch.Tensor], t: float) -> None:
    """``x <- softshrink(x, t)`` for every tensor of ``xs`` (tensors :func:`split` gave to
    the kernel), bumping their version counters as an ATen in-place op does."""
    _run(xs, xs, t)
    _cc.bump(xs)
