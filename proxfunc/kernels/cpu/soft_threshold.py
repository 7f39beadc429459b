"""l1's prox of many tensors on the CPU in one C call: ``x - clamp(x, -t, t)`` entry by entry.

The eager ATen path calls ``softshrink`` once per tensor; on a model's parameters (dozens of
tensors of some ten thousand to a million entries) the per-call cost of a Python call and an
ATen dispatch outweighs the arithmetic. Here one call walks every tensor: a loop the compiler
vectorises (``-O3 -march=native``), in place or into new tensors (timings: ``benchmarks/``).

Values: ``x - clamp(x, -t, t)`` in the tensor's dtype (float32 or float64, no wider
accumulator: each entry is one subtraction) is ``x - t``, ``x + t`` or ``+0`` and NaN for a
NaN: the same bits as the reference :func:`proxfunc.norms.soft_threshold` for ``0 < t``
within the dtype's range, and the same values as ATen's ``softshrink`` (whose zeros keep the
input's sign). ``t = 0`` is the identity.

:func:`run` is reached only through :func:`proxfunc.dispatch.select`, which checks
:data:`SPEC`. Work above :data:`PARALLEL_NUMEL` entries, when torch runs several threads, is
cut into ``torch.get_num_threads()`` spans of about equal size run at once
(:func:`._pool.run_blocks`); each entry is computed alone, so the bits do not depend on the
split.
"""

from __future__ import annotations

import ctypes
from operator import methodcaller

import torch

from ...dispatch import KernelSpec
from . import _cc
from ._pool import run_blocks

__all__ = ["SPEC", "available", "run", "PARALLEL_NUMEL", "MIN_NUMEL"]

_NAME = "soft_threshold"
#: Entries (all tensors together) above which a call is split over torch's threads. Below it
#: the pool's hand-off costs more than the second thread saves (``benchmarks/``).
PARALLEL_NUMEL = 1 << 22

#: Entries (all tensors together) below which ATen's ``softshrink`` per tensor is faster: the
#: kernel's fixed cost (the ctypes call and its argument array) is that of a few ATen calls.
MIN_NUMEL = 1 << 15

# The C source: one function per dtype, typed (see _Span and the argtypes below):
#   void proxfunc_soft_threshold_f32(const span_t *spans, int64_t nspans, float t)
#   void proxfunc_soft_threshold_f64(const span_t *spans, int64_t nspans, double t)
_SOURCE = r"""
#include <stdint.h>
typedef struct { const void *src; void *dst; int64_t numel; } span_t;
#define SOFT(T, NAME)                                                              \
void proxfunc_soft_threshold_##NAME(const span_t *spans, int64_t nspans, T t) {   \
    const T lo = -t;                                                               \
    for (int64_t k = 0; k < nspans; ++k) {                                         \
        const T *x = (const T *)spans[k].src;                                      \
        T *y = (T *)spans[k].dst;                                                  \
        const int64_t n = spans[k].numel;                                          \
        for (int64_t i = 0; i < n; ++i) {                                          \
            T v = x[i];                                                            \
            T c = v > t ? t : (v < lo ? lo : v);  /* NaN: c = v, and v - c is NaN */ \
            y[i] = v - c;                                                          \
        }                                                                          \
    }                                                                              \
}
SOFT(float, f32)
SOFT(double, f64)
"""


class _Span(ctypes.Structure):
    """``span_t``: ``numel`` contiguous entries read from ``src`` and written to ``dst``."""

    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("numel", ctypes.c_int64)]


_KERNEL, _SYMBOLS = _cc.per_dtype(_NAME, _SOURCE, "proxfunc_soft_threshold", [ctypes.POINTER(_Span), ctypes.c_int64])


def available() -> bool:
    """Whether the C kernel is built and loaded (it is built at the first call)."""
    return _KERNEL.available()


#: What the kernel takes (checked by :func:`proxfunc.dispatch.select` before :func:`run`):
#: any number of contiguous tensors of one dtype, entry by entry.
SPEC = KernelSpec(
    name=_NAME,
    device="cpu",
    dtypes=(torch.float32, torch.float64),
    max_parts=1 << 62,
    max_group=1,
    available=available,
    layout="entries",
    min_numel=MIN_NUMEL,
)

_DATA_PTR, _NUMEL = methodcaller("data_ptr"), methodcaller("numel")


def run(leaves: list[torch.Tensor], t: float, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``x - clamp(x, -t, t)`` of every leaf (l1's prox with ``t = reg * step``); into ``out``
    when given (``out=leaves``: in place, version counters bumped), else into new tensors.

    The layout is :data:`SPEC`'s, checked by :func:`proxfunc.dispatch.select`: contiguous CPU
    tensors of one dtype in ``SPEC.dtypes``, ``0 <= t`` within the dtype's range,
    :func:`available`."""
    first = leaves[0]
    assert first.dtype in _SYMBOLS and 0 <= t, "outside SPEC"
    if t == 0:  # the identity (``-0.0`` kept, as the other implementations keep it)
        return out if out is not None else [x.clone() for x in leaves]
    dst = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in leaves] if out is None else out
    sizes = list(map(_NUMEL, leaves))
    spans = list(zip(map(_DATA_PTR, leaves), map(_DATA_PTR, dst), sizes))
    fn = _KERNEL.function(_SYMBOLS[first.dtype])
    total = sum(sizes)
    threads = torch.get_num_threads()
    if threads > 1 and total > PARALLEL_NUMEL:
        run_blocks(fn, [(_array(b), len(b), t) for b in _split(spans, total, threads, first.element_size())])
    elif spans:
        fn(_array(spans), len(spans), t)
    if out is not None:
        _cc.bump(out)
    return dst


def _array(spans: list[tuple[int, int, int]]) -> ctypes.Array:
    return (_Span * len(spans))(*spans)


def _split(spans: list[tuple[int, int, int]], total: int, chunks: int, size: int) -> list[list[tuple[int, int, int]]]:
    """``spans`` cut into ``chunks`` runs of about ``total / chunks`` entries each (a tensor may
    be cut between two runs; ``size``: bytes an entry)."""
    bounds = [total * k // chunks for k in range(1, chunks + 1)]
    blocks: list[list[tuple[int, int, int]]] = [[]]
    done = 0  # entries placed in earlier blocks
    for src, dst, n in spans:
        a = 0
        while a < n:
            room = bounds[len(blocks) - 1] - done
            take = min(n - a, room)
            if take > 0:
                blocks[-1].append((src + a * size, dst + a * size, take))
                a += take
                done += take
            if done >= bounds[len(blocks) - 1] and len(blocks) < chunks:
                blocks.append([])
    return [b for b in blocks if b]
