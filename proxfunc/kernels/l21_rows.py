"""l21 (block soft thresholding) of row groups on the CPU, in one C call: norm and scale of
each group while its rows are in cache.

A *job* is a list of tensors ("parts") whose groups are their slices along dim 0 (row ``i`` of
every part is group ``i``: a weight alone, or a layer's ``(weight, bias)``). For each group the
kernel sums the squares of its entries in float64 (32 partial sums, so the loop
vectorizes and overlaps its additions), takes ``n = sqrt(sum)`` rounded to the tensor's dtype (``|x|`` for a one-entry
group), and writes ``x * s`` with the scale of :func:`proxfunc._util.block_scale_` computed in
that dtype: ``m = clamp(n, tiny, max)``, ``s = max((m - t) / m, 0)``. Zero groups get ``s = 0``
(no NaN), a NaN group stays NaN. The values equal ATen's path (a ``vector_norm`` kernel, the
scale, a broadcast multiply) up to the rounding of the norm, which here is the float64 sum
rounded once (ATen sums float32 tensors in float32).

Why: ATen's path is a norm kernel and a multiply per tensor, plus a few kernels for the
scales: on the 24 weights of a width-256 MLP that was ~26 us per weight, mostly per-op cost; on
a 4096x4096 matrix two passes over memory. Here each row is read twice while it sits in L1
(once from memory) and the whole batch is one ctypes call (``python -m benchmarks``).

Used eagerly only (callers have checked that nothing is differentiated or traced), for plain,
contiguous CPU float32/float64 tensors of one dtype and a float threshold ``t > 0``, work of
at most ``_cc.SERIAL_NUMEL`` entries per job or one torch thread (the loop is single-threaded).
"""

from __future__ import annotations

import torch

from . import _cc

__all__ = ["l21_rows", "available"]

_NAME = "l21_rows"
# meta (int64): the number of jobs, then per job: its number of parts and of rows, then per
# part: source address, destination address, entries per row.
_SOURCE = r"""
#include <stdint.h>
#include <math.h>
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef double vd __attribute__((vector_size(64), aligned(8)));
#define L21(T, V, NAME, TINY, BIG)                                                 \
static T sumsq_##NAME(const T *x, int64_t n) {                                     \
    enum { W = sizeof(V) / sizeof(T) };                                            \
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                      \
    int64_t i = 0;                                                                 \
    for (; i + 4 * W <= n; i += 4 * W) {                                           \
        V v0 = *(const V *)(x + i), v1 = *(const V *)(x + i + W);                  \
        V v2 = *(const V *)(x + i + 2 * W), v3 = *(const V *)(x + i + 3 * W);      \
        a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;                \
    }                                                                              \
    for (; i + W <= n; i += W) {                                                   \
        V v = *(const V *)(x + i);                                                 \
        a0 += v * v;                                                               \
    }                                                                              \
    a0 = (a0 + a1) + (a2 + a3);                                                    \
    T s = 0;                                                                       \
    for (int l = 0; l < W; ++l) s += a0[l];                                        \
    for (; i < n; ++i) s += x[i] * x[i];                                           \
    return s;                                                                      \
}                                                                                  \
void NAME(const int64_t *meta, T t) {                                              \
    const int64_t jobs = meta[0];                                                  \
    const int64_t *m = meta + 1;                                                   \
    for (int64_t j = 0; j < jobs; ++j) {                                           \
        const int64_t np = m[0], rows = m[1];                                      \
        const int64_t *p = m + 2;                                                  \
        if (np == 1 && p[2] == 1) { /* one entry a group: vectorizes */           \
            const T *x = (const T *)(intptr_t)p[0];                                \
            T *y = (T *)(intptr_t)p[1];                                            \
            for (int64_t r = 0; r < rows; ++r) {                                   \
                T v = x[r];                                                        \
                T c = v < (T)0 ? -v : v;                                           \
                c = c < (T)TINY ? (T)TINY : c;                                     \
                c = c > (T)BIG ? (T)BIG : c;                                       \
                T s = (c - t) / c;                                                 \
                y[r] = v * (s < (T)0 ? (T)0 : s);                                  \
            }                                                                      \
            m = p + 3;                                                             \
            continue;                                                              \
        }                                                                          \
        for (int64_t r = 0; r < rows; ++r) {                                       \
            T sum = 0, only = 0;                                                   \
            int64_t count = 0;                                                     \
            for (int64_t q = 0; q < np; ++q) {                                     \
                const int64_t cols = p[3 * q + 2];                                 \
                const T *x = (const T *)(intptr_t)p[3 * q] + r * cols;             \
                sum += cols == 1 ? x[0] * x[0] : sumsq_##NAME(x, cols);            \
                only = x[0];                                                       \
                count += cols;                                                     \
            }                                                                      \
            T n = count == 1 ? (T)fabs((double)only) : (T)sqrt((double)sum);      \
            T c = n < (T)TINY ? (T)TINY : n;                                       \
            c = c > (T)BIG ? (T)BIG : c;                                           \
            T s = (c - t) / c;                                                     \
            s = s < (T)0 ? (T)0 : s;                                               \
            for (int64_t q = 0; q < np; ++q) {                                     \
                const int64_t cols = p[3 * q + 2];                                 \
                if (p[3 * q] == p[3 * q + 1]) {                                    \
                    T *x = (T *)(intptr_t)p[3 * q] + r * cols;                     \
                    for (int64_t i = 0; i < cols; ++i)                             \
                        x[i] = x[i] * s;                                           \
                } else {                                                           \
                    const T *restrict x = (const T *)(intptr_t)p[3 * q] + r * cols; \
                    T *restrict y = (T *)(intptr_t)p[3 * q + 1] + r * cols;        \
                    for (int64_t i = 0; i < cols; ++i)                             \
                        y[i] = x[i] * s;                                           \
                }                                                                  \
            }                                                                      \
        }                                                                          \
        m = p + 3 * np;                                                            \
    }                                                                              \
}
L21(float, vf, proxfunc_l21_rows_f32, 1.17549435082228750797e-38, 3.40282346638528859812e+38)
L21(double, vd, proxfunc_l21_rows_f64, 2.2250738585072013831e-308, 1.7976931348623157081e+308)
"""
_KERNEL = _cc.Kernel(_NAME, _SOURCE)


def available() -> bool:
    """Whether the C kernel is built and loaded (it is built at the first call)."""
    return _KERNEL.available()


def l21_rows(jobs: list[list[torch.Tensor]], t: object, in_place: bool = False) -> list[list[torch.Tensor]] | None:
    """Block soft thresholding of every job's row groups with threshold ``t``: new tensors,
    or (``in_place``) the parts themselves, written and version-bumped; ``None`` (nothing
    done) when the kernel does not take them."""
    if not isinstance(t, float) or not jobs or not available():
        return None
    flat = [x for job in jobs for x in job]
    dtype = _cc.dense_dtype(flat)
    if dtype is None or not 0 < t <= _cc.MAX[dtype] or not _cc.serial(max(sum(x.numel() for x in job) for job in jobs)):
        return None
    meta = [len(jobs)]
    outs = []
    for job in jobs:
        if not job or any(x.dim() == 0 for x in job):
            return None
        rows = job[0].shape[0]
        if any(x.shape[0] != rows for x in job):
            return None
        dst = job if in_place else [torch.empty_like(x) for x in job]
        outs.append(dst)
        meta += (len(job), rows)
        for x, y in zip(job, dst):
            meta += (x.data_ptr(), y.data_ptr(), x.numel() // rows if rows else 0)
    _KERNEL(dtype, meta, t)
    if in_place:
        _cc.bump(flat)
    return outs
