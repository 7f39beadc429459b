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
:data:`SPEC`. A call above :data:`PARALLEL_NUMEL` entries, when torch runs several threads, is
cut into ``torch.get_num_threads()`` runs of equal length over the concatenated tensors, one
a thread of an OpenMP team: built with ``-fopenmp`` (see :mod:`._cc`), the library shares the
OpenMP runtime torch has loaded, whose threads are already running (a hand-off of about a
microsecond). Without OpenMP (``_KERNEL.threaded()`` is false) the whole call runs on the calling
thread, as it does in a forked child (GNU OpenMP's threads do not survive a fork: a
parallel region there would wait for them forever). Each entry is computed alone, so the
bits do not depend on the split.
"""

from __future__ import annotations

import array
import ctypes

import torch

from ... import _facts
from ...dispatch import KernelSpec
from . import _cc

__all__ = ["SPEC", "available", "run", "PARALLEL_NUMEL", "MIN_NUMEL"]

_NAME = "soft_threshold"
#: Entries (all tensors together) above which a call is split over torch's threads: about
#: where two threads start to gain on one (each thread's share is then at least ATen's
#: grain size, 32768 entries).
PARALLEL_NUMEL = 1 << 16

#: Entries (all tensors together) below which ATen's ``softshrink`` per tensor is faster: the
#: kernel's fixed cost (the ctypes call and its argument array) is that of a few ATen calls.
MIN_NUMEL = 1 << 15

# The C source: one function per dtype, typed (see _Span and the argtypes below):
#   void proxfunc_soft_threshold_f32(const span_t *spans, int64_t nspans, int64_t threads, float t)
#   void proxfunc_soft_threshold_f64(const span_t *spans, int64_t nspans, int64_t threads, double t)
# Built with OpenMP (see _cc), ``threads > 1`` cuts the concatenation of the spans into that
# many runs of equal length, one a thread of the OpenMP team torch's own kernels use.
_SOURCE = r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
typedef struct { const void *src; void *dst; int64_t numel; } span_t;
#define SOFT(T, NAME)                                                                   \
static void soft_##NAME(const span_t *spans, int64_t nspans, T t, int64_t lo, int64_t hi) { \
    const T neg = -t;                                                                   \
    int64_t base = 0; /* entries of the spans before span k */                          \
    for (int64_t k = 0; k < nspans && base < hi; ++k) {                                 \
        const int64_t n = spans[k].numel;                                               \
        const int64_t a = lo > base ? lo - base : 0, b = hi - base < n ? hi - base : n;  \
        const T *x = (const T *)spans[k].src;                                           \
        T *y = (T *)spans[k].dst;                                                       \
        for (int64_t i = a; i < b; ++i) {                                               \
            T v = x[i];                                                                 \
            T c = v > t ? t : (v < neg ? neg : v);  /* NaN: c = v, and v - c is NaN */  \
            y[i] = v - c;                                                               \
        }                                                                               \
        base += n;                                                                      \
    }                                                                                   \
}                                                                                       \
void proxfunc_soft_threshold_##NAME(const span_t *spans, int64_t nspans, int64_t threads, T t) { \
    int64_t total = 0;                                                                  \
    for (int64_t k = 0; k < nspans; ++k) total += spans[k].numel;                       \
    if (threads <= 1) { soft_##NAME(spans, nspans, t, 0, total); return; }              \
    PARALLEL(NAME)                                                                      \
}
#ifdef _OPENMP
#define PARALLEL(NAME)                                                                  \
    _Pragma("omp parallel num_threads(threads)")                                       \
    {                                                                                   \
        const int64_t r = omp_get_thread_num(), m = omp_get_num_threads();              \
        soft_##NAME(spans, nspans, t, total / m * r + total % m * r / m,                 \
                    total / m * (r + 1) + total % m * (r + 1) / m);                      \
    }
#else
#define PARALLEL(NAME) soft_##NAME(spans, nspans, t, 0, total);
#endif
SOFT(float, f32)
SOFT(double, f64)
"""


class _Span(ctypes.Structure):
    """``span_t``: ``numel`` contiguous entries read from ``src`` and written to ``dst``."""

    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("numel", ctypes.c_int64)]


_KERNEL, _SYMBOLS = _cc.per_dtype(
    _NAME,
    _SOURCE,
    "proxfunc_soft_threshold",
    [ctypes.POINTER(_Span), ctypes.c_int64, ctypes.c_int64],
)


#: Whether the C kernel is built and loaded (it is built at the first call).
available = _KERNEL.available


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

_DATA_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel
# A span array is built from a flat int64 array (three 8-byte fields a span, in order): an
# order of magnitude cheaper than constructing the Structures one by one.
assert ctypes.sizeof(_Span) == 24 and [getattr(_Span, f).offset for f in ("src", "dst", "numel")] == [0, 8, 16]

# The last in-place call's spans: (data pointers, sizes, flat int64 array, span array over it).
# A step writes into the same tensors at the same places: their spans are built once.
_LAST: tuple[list[int], tuple[int, ...], array.array, ctypes.Array] | None = None


def run(leaves: list[torch.Tensor], t: float, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``x - clamp(x, -t, t)`` of every leaf (l1's prox with ``t = reg * step``); into ``out``
    when given (``out=leaves``: in place, version counters bumped), else into new tensors.

    The layout is :data:`SPEC`'s, checked by :func:`proxfunc.dispatch.select`: contiguous CPU
    tensors of one dtype in ``SPEC.dtypes``, ``0 <= t`` within the dtype's range,
    :func:`available`."""
    global _LAST
    first = leaves[0]
    assert first.dtype in _SYMBOLS and 0 <= t, "outside SPEC"
    if t == 0:  # the identity (``-0.0`` kept, as the other implementations keep it)
        return out if out is not None else [x.clone() for x in leaves]
    src = list(map(_DATA_PTR, leaves))
    if out is leaves:  # in place: the sizes remembered with the tensors' metadata (_facts)
        facts = _facts.of(leaves)
        sizes = facts.numels if facts is not None else tuple(map(_NUMEL, leaves))
        last = _LAST
        if last is not None and last[0] == src and last[1] == sizes:
            spans = last[3]
        else:
            flat = _flat(array.array("q", src), array.array("q", src), array.array("q", sizes))
            spans = _array(flat)
            _LAST = (src, sizes, flat, spans)  # the flat array lives as long as the spans over it
        dst = out
    else:
        dst = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in leaves] if out is None else out
        sizes = tuple(map(_NUMEL, leaves))
        src_ptrs = array.array("q", src)
        flat = _flat(src_ptrs, array.array("q", map(_DATA_PTR, dst)), array.array("q", sizes))
        spans = _array(flat)
    threads = _cc.threads_for(sum(sizes), PARALLEL_NUMEL)
    _KERNEL.function(_SYMBOLS[first.dtype])(spans, len(leaves), threads, t)
    if out is not None:
        _cc.bump(out)
    return dst


def _flat(src: array.array, dst: array.array, sizes: array.array) -> array.array:
    """The spans ``(src[i], dst[i], sizes[i])`` one after another in one int64 array."""
    flat = array.array("q", bytes(24 * len(sizes)))
    flat[0::3], flat[1::3], flat[2::3] = src, dst, sizes
    return flat


def _array(flat: array.array) -> ctypes.Array:
    """The span array over ``flat``'s memory (``flat`` must outlive the call)."""
    return (_Span * (len(flat) // 3)).from_buffer(flat)
