"""GPU timings of the threshold methods side by side (``python -m benchmarks.cuda_variants``).

linf1's row thresholds on a 4096x4096 float32 matrix and the l1 ball's one threshold over it:
the eager fixed point (what ``pf.linf1`` / ``pf.l1_ball`` use eagerly), the unrolled fixed point
run eagerly (the traceable path: no host sync, a fixed number of passes), the sort reference
and ``max_k (c_k - r) / k``; each checked against the float64 sort reference.
"""

import sys

import torch

import proxfunc.kernels.threshold  # noqa: F401

from .run import timeit

K = sys.modules["proxfunc.kernels.threshold"]


def bench(fn, reps=20):
    """One warm-up call, then the mean call of a synced batch (``run.timeit`` on a GPU)."""
    fn()
    return timeit(fn, reps, torch.cuda.synchronize)


def main():
    dev = "cuda"
    n = 4096
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dev)
    clone = bench(lambda: x.clone())
    print(f"# {torch.cuda.get_device_name()}  clone of {n}x{n} float32: {clone * 1e6:.1f} us\n")
    print("| threshold | groups | us | / clone | max rel err vs float64 sort |")
    print("|---|---|---:|---:|---:|")
    methods = {
        "fixed point (eager path)": K.threshold_fixed_point,
        "unrolled, run eagerly": K.threshold_unrolled,
        "sort (reference)": K.threshold_sort,
        "max_k (c_k - r)/k": K.threshold_max,
    }
    for label, parts, r in (("rows (linf1, t=5)", [(x, 0)], 5.0), ("one (l1 ball)", [(x, None)], 0.1 * n * n)):
        want = K.threshold_sort([(p.double(), d) for p, d in parts], r, absolute=True)
        for name, fn in methods.items():
            got = fn(parts, r, absolute=True)
            err = float(((got.double() - want).abs() / want.abs().clamp_min(1e-30)).max())
            t = bench(lambda fn=fn, parts=parts, r=r: fn(parts, r, absolute=True))
            print(f"| {name} | {label} | {t * 1e6:.0f} | {t / clone:.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
