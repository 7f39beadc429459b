"""linf1 of row groups on the CPU in one C call: each group's threshold and its clamp, sort-free,
while the group's rows are in cache (the CPU counterpart of :mod:`.linf1_rows`).

For a group ``x_g`` (row ``g`` of every part: a weight alone, or a layer's ``(weight, bias)``)
and ``r = reg * step``, the prox of ``r * ||.||_inf`` is ``clamp(x_g, -tau_g, tau_g)`` with
``tau_g = max(theta_g, 0)`` and ``theta_g`` the simplex threshold of ``|x_g|``
(``sum_j max(|x_j| - theta, 0) = r``; see :mod:`proxfunc.kernels.threshold`). Per group: one
pass for ``||x_g||_1`` and ``max |x_g|`` (``tau = 0`` when ``||x_g||_1 <= r``: the group
dies), then Michelot's fixed point from ``max(max|x| - r, (||x||_1 - r) / n)``: each pass sums
and counts the entries above ``theta`` and sets ``theta`` to their mean excess (Newton's step
on a convex piecewise-linear function: ``theta`` only grows, and is exact once the active set
stops shrinking); then the clamp. Sums run in the tensor's dtype in 16 (float32) or 8 (float64)
lanes of a 64-byte vector (GCC vector extensions) and are combined in float64; ``theta`` is
computed in float64 and rounded to the dtype. A NaN in a group makes the group NaN, an infinite
entry leaves the group unchanged, ``r = 0`` is the identity (as the sort-based reference).

Why: the eager CPU path runs the same fixed point with ATen kernels over blocks of rows (four
passes per step, each a kernel launch per block): 4.0x a ``clone`` at 4096x4096 and ~75 us
for the seed's ``Linear(2 -> 100)``. Used eagerly only (nothing differentiated or traced) for
plain, contiguous CPU float32/float64 tensors of one dtype grouped along dim 0, a float
``r >= 0``, work of at most ``_cc.SERIAL_NUMEL`` entries or one torch thread.
"""

from __future__ import annotations

import math

import torch

from . import _cc

__all__ = ["linf1_rows_cpu", "available"]

_NAME = "linf1_rows"
# meta (int64): the number of parts and of rows, then per part: source address, destination
# address, entries per row.
_SOURCE = r"""
#include <stdint.h>
#include <math.h>
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vfi __attribute__((vector_size(64), aligned(4)));
typedef double vd __attribute__((vector_size(64), aligned(8)));
typedef int64_t vdi __attribute__((vector_size(64), aligned(8)));
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
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
/* sum and count of the |x_i| > th: one Michelot step */                          \
static void scan_##NAME(const T *x, int64_t n, T th, double *s, double *c) {       \
    enum { W = sizeof(V) / sizeof(T) };                                            \
    const I keep = (I){0} + (SIGNLESS);                                            \
    const V one = (V){0} + 1, thv = (V){0} + th;                                   \
    V as = {0}, ac = {0};                                                          \
    int64_t i = 0;                                                                 \
    for (; i + W <= n; i += W) {                                                   \
        V a = (V)(*(const I *)(x + i) & keep);                                     \
        I m = a > thv;                                                             \
        as += (V)((I)a & m);                                                       \
        ac += (V)((I)one & m);                                                     \
    }                                                                              \
    double ss = 0, cc = 0;                                                         \
    for (int l = 0; l < W; ++l) { ss += as[l]; cc += ac[l]; }                      \
    for (; i < n; ++i) {                                                           \
        T a = fabs((double)x[i]);                                                  \
        if (a > th) { ss += a; cc += 1; }                                          \
    }                                                                              \
    *s += ss; *c += cc;                                                            \
}                                                                                  \
void NAME(const int64_t *meta, T r) {                                              \
    const int64_t np = meta[0], rows = meta[1];                                    \
    const int64_t *p = meta + 2;                                                   \
    int64_t width = 0;                                                             \
    for (int64_t q = 0; q < np; ++q) width += p[3 * q + 2];                        \
    for (int64_t row = 0; row < rows; ++row) {                                     \
        double s = 0;                                                              \
        T mx = 0;                                                                  \
        for (int64_t q = 0; q < np; ++q) {                                         \
            const int64_t cols = p[3 * q + 2];                                     \
            const T *x = (const T *)(intptr_t)p[3 * q] + row * cols;               \
            total_##NAME(x, cols, &s, &mx);                                        \
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
                    const int64_t cols = p[3 * q + 2];                             \
                    const T *x = (const T *)(intptr_t)p[3 * q] + row * cols;       \
                    scan_##NAME(x, cols, (T)th, &ss, &cc);                         \
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
            const int64_t cols = p[3 * q + 2];                                     \
            const T *x = (const T *)(intptr_t)p[3 * q] + row * cols;               \
            T *y = (T *)(intptr_t)p[3 * q + 1] + row * cols;                       \
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
}
LINF1(float, vf, vfi, 0x7fffffff, proxfunc_linf1_rows_f32, vf8)
LINF1(double, vd, vdi, 0x7fffffffffffffffLL, proxfunc_linf1_rows_f64, vd)
"""
_KERNEL = _cc.Kernel(_NAME, _SOURCE)


def available() -> bool:
    """Whether the C kernel is built and loaded (it is built at the first call)."""
    return _KERNEL.available()


def linf1_rows_cpu(
    leaves: list[torch.Tensor], dims: list[int], r: object, out: list[torch.Tensor] | None = None
) -> list[torch.Tensor] | None:
    """``clamp(x_g, -tau_g, tau_g)`` for every row group ``g`` of ``leaves`` (groups along dim
    0 of every leaf), into ``out`` when given (``out=leaves``: in place, version-bumped);
    ``None`` (nothing done) when the kernel does not take them."""
    if not isinstance(r, float) or not 0 <= r <= _cc.MAX.get(leaves[0].dtype, 0.0) or math.isnan(r):
        return None
    if not all(x.dim() >= 1 and (d == 0 or d == -x.dim()) for x, d in zip(leaves, dims)):
        return None
    dtype = _cc.dense_dtype(leaves)
    rows = leaves[0].shape[0]
    if dtype is None or rows == 0 or any(x.shape[0] != rows for x in leaves):
        return None
    if not _cc.serial(sum(x.numel() for x in leaves)) or not available():
        return None
    dst = [torch.empty_like(x) for x in leaves] if out is None else out
    meta = [len(leaves), rows]
    for x, y in zip(leaves, dst):
        meta += (x.data_ptr(), y.data_ptr(), x.numel() // rows)
    _KERNEL(dtype, meta, r)
    if out is not None:
        _cc.bump(out)
    return dst
