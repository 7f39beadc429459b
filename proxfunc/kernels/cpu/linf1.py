"""linf1's prox of row groups on the CPU: each group's threshold and its clamp in one C call,
sort-free, while the group's rows are in cache.

For a group ``x_g`` (row ``g`` of every part: a weight alone, or a layer's ``(weight, bias)``)
and ``r = reg * step``, the prox of ``r * ||.||_inf`` is ``clamp(x_g, -tau_g, tau_g)`` with
``tau_g = max(theta_g, 0)`` and ``theta_g`` the simplex threshold of ``|x_g|``
(``sum_j max(|x_j| - theta, 0) = r``; see :mod:`proxfunc.kernels.threshold`). Per group:

1. One pass for ``||x_g||_1`` and ``max |x_g|``. The l1 norm, which decides whether the group
   dies (``tau = 0`` when ``||x_g||_1 <= r``), is summed in float64 lanes (two vectors of 8)
   for float32 and float64 alike; it is NaN exactly when an entry is, and the group is then NaN.
2. Michelot's fixed point from ``theta = max(max|x| - r, (||x||_1 - r) / n)``: each pass sums
   and counts the ``|x_j| > theta`` and sets ``theta`` to their mean excess (Newton's step on
   a convex piecewise-linear function: ``theta`` only grows, and is exact once the active set
   stops shrinking). These masked sums and counts run in the dtype's lanes of a 64-byte
   vector (GCC vector extensions): 16 float32 lanes for float32, 8 float64 lanes for float64;
   the lanes are added into float64 totals every 4096 entries a lane and at the end of each
   part's row, and the entries past a part's last whole vector are added in float64. ``theta``
   is computed in float64; each pass compares the entries with ``theta`` rounded to the dtype.
3. The clamp at ``tau`` rounded to the dtype.

An infinite entry leaves its group unchanged, ``r = 0`` is the identity (as the sort-based
reference). The sums run in their own order, so ``tau`` may differ from the eager path's in
the last bits.

Why: the ATen eager path runs the same fixed point over blocks of rows, several kernels per
step and a host read of its stopping test per step; here each group is finished while it is in
cache, in one pass per step (timings: ``benchmarks/``).

:func:`run` is reached only through :func:`proxfunc.dispatch.select`, which checks
:data:`SPEC`. A call above :data:`PARALLEL_NUMEL` entries, when torch runs several threads,
splits its rows into ``torch.get_num_threads()`` blocks of consecutive rows, one a thread of
an OpenMP team (built with ``-fopenmp``, see :mod:`._cc`: the threads of the OpenMP runtime
torch has loaded); each group is computed by one thread, so the bits do not depend on the
split. Without OpenMP (``_KERNEL.threaded()`` is false), and in a forked child (GNU OpenMP's
threads do not survive a fork), the call runs on the calling thread.
"""

from __future__ import annotations

import ctypes

import torch

from ...dispatch import KernelSpec
from . import _cc

__all__ = ["SPEC", "available", "run", "PARALLEL_NUMEL"]

_NAME = "linf1_rows"
#: Work (entries, all parts together) above which the rows are split over torch's threads.
PARALLEL_NUMEL = 1 << 16

# The C source: one function per dtype, typed (see _Part and the argtypes below):
#   void proxfunc_linf1_rows_f32(const part_t *parts, int64_t nparts, int64_t rows, int64_t threads, float r)
#   void proxfunc_linf1_rows_f64(const part_t *parts, int64_t nparts, int64_t rows, int64_t threads, double r)
# Built with OpenMP (see _cc), ``threads > 1`` splits the rows into that many blocks of
# consecutive rows, one a thread of the OpenMP team torch's own kernels use.
_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
typedef struct { const void *src; void *dst; int64_t cols; } part_t;
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vfi __attribute__((vector_size(64), aligned(4)));
typedef double vd __attribute__((vector_size(64), aligned(8)));
typedef int64_t vdi __attribute__((vector_size(64), aligned(8)));
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
/* entries a lane sums (and counts) before its sum is added into float64 */
#define LANE_BLOCK 4096
#define CLAMP(SRC, DST)                                                            \
    for (int64_t i = 0; i < cols; ++i) {                                           \
        __typeof__(hi) v = SRC[i];                                                 \
        __typeof__(hi) u = v < lo ? lo : v;                                        \
        DST[i] = u > hi ? hi : u;                                                  \
    }
#define LINF1(T, V, I, SIGNLESS, NAME, H8)                                         \
/* ||x||_1 in float64 lanes (whether a group dies is decided on it) and max |x| */   \
static void total_##NAME(const T *x, int64_t n, double *s, T *mx) {               \
    const vdi keep = (vdi){0} + 0x7fffffffffffffffLL;                             \
    vd a0 = {0}, a1 = {0}, m0 = {0};                                               \
    int64_t i = 0;                                                                 \
    for (; i + 16 <= n; i += 16) {                                                 \
        vd v0 = (vd)((vdi)__builtin_convertvector(*(const H8 *)(x + i), vd) & keep); \
        vd v1 = (vd)((vdi)__builtin_convertvector(*(const H8 *)(x + i + 8), vd) & keep); \
        a0 += v0; a1 += v1;                                                        \
        vdi g = v0 > m0;                                                           \
        m0 = (vd)(((vdi)v0 & g) | ((vdi)m0 & ~g));                                 \
        g = v1 > m0;                                                               \
        m0 = (vd)(((vdi)v1 & g) | ((vdi)m0 & ~g));                                 \
    }                                                                              \
    a0 += a1;                                                                      \
    double ss = 0, mm = *mx;                                                       \
    for (int l = 0; l < 8; ++l) { ss += a0[l]; mm = m0[l] > mm ? m0[l] : mm; }     \
    for (; i < n; ++i) {                                                           \
        double a = fabs((double)x[i]);                                             \
        ss += a; mm = a > mm ? a : mm;                                             \
    }                                                                              \
    *s += ss; *mx = (T)mm;                                                         \
}                                                                                  \
/* sum and count of the |x_i| > th (one Michelot step) in the dtype's lanes, added \
   into float64 every LANE_BLOCK entries of a lane */                              \
static void scan_##NAME(const T *x, int64_t n, T th, double *s, double *c) {       \
    enum { W = sizeof(V) / sizeof(T) };                                            \
    const I keep = (I){0} + (SIGNLESS);                                            \
    const V one = (V){0} + 1, thv = (V){0} + th;                                   \
    double ss = 0, cc = 0;                                                         \
    int64_t i = 0;                                                                 \
    while (i + W <= n) {                                                           \
        const int64_t stop = n - i > (int64_t)W * LANE_BLOCK ? i + (int64_t)W * LANE_BLOCK : n; \
        V as = {0}, ac = {0};                                                      \
        for (; i + W <= stop; i += W) {                                            \
            V a = (V)(*(const I *)(x + i) & keep);                                 \
            I m = a > thv;                                                         \
            as += (V)((I)a & m);                                                   \
            ac += (V)((I)one & m);                                                 \
        }                                                                          \
        for (int l = 0; l < W; ++l) { ss += as[l]; cc += ac[l]; }                  \
    }                                                                              \
    for (; i < n; ++i) {                                                           \
        T a = fabs((double)x[i]);                                                  \
        if (a > th) { ss += a; cc += 1; }                                          \
    }                                                                              \
    *s += ss; *c += cc;                                                            \
}                                                                                  \
static void rows_##NAME(const part_t *p, int64_t np, int64_t row0, int64_t row1, T r) { \
    int64_t width = 0;                                                             \
    for (int64_t q = 0; q < np; ++q) width += p[q].cols;                           \
    for (int64_t row = row0; row < row1; ++row) {                                  \
        double s = 0;                                                              \
        T mx = 0;                                                                  \
        for (int64_t q = 0; q < np; ++q) {                                         \
            const int64_t cols = p[q].cols;                                        \
            total_##NAME((const T *)p[q].src + row * cols, cols, &s, &mx);         \
        }                                                                          \
        const int nan = s != s; /* the sum of |x| is NaN exactly when an entry is */ \
        double tau;                                                                \
        if (nan) {                                                                 \
            tau = NAN;                                                             \
        } else if (s <= (double)r) {                                               \
            tau = 0;                                                               \
        } else {                                                                   \
            double th = (double)mx - (double)r, mean = (s - (double)r) / (double)width; \
            th = mean > th ? mean : th;                                            \
            double prev = (double)width + 1;                                       \
            for (;;) {                                                             \
                double ss = 0, cc = 0;                                             \
                for (int64_t q = 0; q < np; ++q) {                                 \
                    const int64_t cols = p[q].cols;                                \
                    scan_##NAME((const T *)p[q].src + row * cols, cols, (T)th, &ss, &cc); \
                }                                                                  \
                if (cc == 0) break; /* r = 0, or an infinite entry */             \
                double next = (ss - (double)r) / cc;                               \
                if (cc >= prev) { th = next; break; } /* the active set is stable */ \
                prev = cc;                                                         \
                th = next;                                                         \
            }                                                                      \
            tau = th > 0 ? th : 0;                                                 \
        }                                                                          \
        const T hi = (T)tau, lo = -hi;                                             \
        for (int64_t q = 0; q < np; ++q) {                                         \
            const int64_t cols = p[q].cols;                                        \
            const T *x = (const T *)p[q].src + row * cols;                         \
            T *y = (T *)p[q].dst + row * cols;                                     \
            if (nan) {                                                             \
                for (int64_t i = 0; i < cols; ++i) y[i] = (T)NAN;                  \
                continue;                                                          \
            }                                                                      \
            if (x == y) {                                                          \
                CLAMP(y, y)                                                        \
            } else {                                                               \
                const T *restrict a = x;                                           \
                T *restrict b = y;                                                 \
                CLAMP(a, b)                                                        \
            }                                                                      \
        }                                                                          \
    }                                                                              \
}                                                                                  \
void NAME(const part_t *p, int64_t np, int64_t rows, int64_t threads, T r) {       \
    if (threads <= 1 || rows <= 1) { rows_##NAME(p, np, 0, rows, r); return; }     \
    PARALLEL_ROWS(NAME)                                                            \
}
#ifdef _OPENMP
#define PARALLEL_ROWS(NAME)                                                        \
    _Pragma("omp parallel num_threads(threads)")                                  \
    {                                                                              \
        const int64_t k = omp_get_thread_num(), m = omp_get_num_threads();         \
        rows_##NAME(p, np, rows / m * k + rows % m * k / m,                         \
                    rows / m * (k + 1) + rows % m * (k + 1) / m, r);                \
    }
#else
#define PARALLEL_ROWS(NAME) rows_##NAME(p, np, 0, rows, r);
#endif
LINF1(float, vf, vfi, 0x7fffffff, proxfunc_linf1_rows_f32, vf8)
LINF1(double, vd, vdi, 0x7fffffffffffffffLL, proxfunc_linf1_rows_f64, vd)
"""


class _Part(ctypes.Structure):
    """``part_t``: one tensor of the argument, rows of ``cols`` contiguous entries."""

    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("cols", ctypes.c_int64)]


_KERNEL, _SYMBOLS = _cc.per_dtype(
    _NAME,
    _SOURCE,
    "proxfunc_linf1_rows",
    [ctypes.POINTER(_Part), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64],
)


#: Whether the C kernel is built and loaded (it is built at the first call).
available = _KERNEL.available


#: What the kernel takes (checked by :func:`proxfunc.dispatch.select` before :func:`run`).
SPEC = KernelSpec(
    name=_NAME,
    device="cpu",
    dtypes=(torch.float32, torch.float64),
    max_parts=16,
    max_group=1 << 40,
    available=available,
)


def run(leaves: list[torch.Tensor], r: float, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``clamp(x_g, -tau_g, tau_g)`` for every row group ``g`` of ``leaves`` (row ``g`` of
    every leaf, along dim 0), linf1's prox with ``r = reg * step``; into ``out`` when given
    (``out=leaves``: in place, version counters bumped), else into new tensors.

    The layout is :data:`SPEC`'s, checked by :func:`proxfunc.dispatch.select`: contiguous CPU
    tensors of one dtype in ``SPEC.dtypes`` with the same number of rows, ``0 <= r`` within
    the dtype's range, :func:`available`."""
    first = leaves[0]
    rows = first.shape[0]
    assert 0 < len(leaves) <= SPEC.max_parts and first.dtype in _SYMBOLS and 0 <= r, "outside SPEC"
    dst = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in leaves] if out is None else out
    assert len(dst) == len(leaves) and all(y.shape == x.shape and y.is_contiguous() for x, y in zip(leaves, dst))
    if rows:
        cols = [x.numel() // rows for x in leaves]
        parts = (_Part * len(leaves))(*[(x.data_ptr(), y.data_ptr(), c) for x, y, c in zip(leaves, dst, cols)])
        threads = min(_cc.threads_for(sum(cols) * rows, PARALLEL_NUMEL), rows)
        _KERNEL.function(_SYMBOLS[first.dtype])(parts, len(leaves), rows, threads, r)
    if out is not None:
        _cc.bump(out)
    return dst
