"""GPU timings of method variants side by side (``python -m benchmarks.cuda_variants``).

linf1's row thresholds on a 4096x4096 float32 matrix and the l1 ball's one threshold over it:
the eager fixed point (what ``pf.linf1`` / ``pf.l1_ball`` use eagerly), the unrolled fixed point
run eagerly (the traceable path: no host sync, a fixed number of passes), the sort reference
and ``max_k (c_k - r) / k``; each checked against the float64 sort reference.

Then eager l21 taken apart at 4096^2 and 16384^2 (the norm kernel, the scale, the multiply,
the whole operator, each against ``clone``), and the CUDA kernels one l21 call launches
(``torch.profiler``), to see where time beyond three passes goes.
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
    for size in (4096, 16384):
        l21_parts(size)
    scale_sweep()
    linf1_fused()


def linf1_fused():
    """Eager linf1 (groups = rows): the fused Triton kernel against the sort path it replaces."""
    import proxfunc as pf
    from proxfunc.kernels import linf1_rows

    print("\n## eager linf1, rows: fused Triton kernel vs the sort path (us, / clone)\n")
    print("| shape | clone | fused kernel | sort path | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for shape in ((4096, 4096), (16384, 4096), (65536, 256), (1024, 8192), (4096, 4096, "bias")):
        x = torch.randn(shape[:2], device="cuda")
        if len(shape) > 2:  # a layer's (weight, bias): neuron i is x[i, :] and its bias
            x = (x, torch.randn(shape[0], device="cuda"))
        op = pf.linf1(5.0)
        clone = bench(lambda x=x: torch.utils._pytree.tree_map(torch.clone, x))
        fused = bench(lambda x=x, op=op: op(x, 1.0))
        a = op(x, 1.0)
        keep = linf1_rows._get_kernel
        linf1_rows._get_kernel = lambda: None
        try:
            sort = bench(lambda x=x, op=op: op(x, 1.0))
            b = op(x, 1.0)
        finally:
            linf1_rows._get_kernel = keep
        diff = max(float((p - q).abs().max()) for p, q in zip(*(torch.utils._pytree.tree_leaves(t) for t in (a, b))))
        name = f"{shape[0]}x{shape[1]}" + (" + bias" if len(shape) > 2 else "")
        print(f"| {name} | {clone * 1e6:.0f} | {fused * 1e6:.0f} ({fused / clone:.2f}) "
              f"| {sort * 1e6:.0f} ({sort / clone:.2f}) | {diff:.1e} |")  # fmt: skip


def l21_parts(n):
    """Eager l21 on an n x n float32 matrix, piece by piece, against clone (group_dim=0: rows)."""
    import proxfunc as pf
    from proxfunc._util import block_scale_
    from proxfunc.kernels import scale as kernels_scale

    x = torch.randn(n, n, device="cuda")
    t = 0.5 * n**0.5
    op = pf.l21(t)
    norms = torch.linalg.vector_norm(x, 2, dim=[1], dtype=torch.float32)
    scale = block_scale_(norms.clone(), t)
    rows = {
        "clone": lambda: x.clone(),
        "row norms: vector_norm(x, dim=[1], dtype=float32)": lambda: torch.linalg.vector_norm(
            x, 2, dim=[1], dtype=torch.float32
        ),
        "row norms: vector_norm(x, dim=1)": lambda: torch.linalg.vector_norm(x, 2, dim=1),
        "row sums: x.sum(1)": lambda: x.sum(1),
        "scale of the n norms: block_scale_": lambda: block_scale_(norms.clone(), t),
        "multiply: x * scale[:, None] (ATen, broadcast)": lambda: x * scale[:, None],
        # the kernel itself: mul_along takes ATen's multiply below MIN_NUMEL (e.g. at 4096^2)
        "multiply: the Triton kernel (kernels.scale._launch)": lambda: kernels_scale._launch(
            x, scale, 0, torch.empty_like(x)
        ),
        "l21(x, 1.0), whole operator": lambda: op(x, 1.0),
    }
    clone = bench(rows["clone"])
    print(f"\n## eager l21 on {n}x{n} float32, piece by piece\n")
    print("| piece | us | / clone |")
    print("|---|---:|---:|")
    for name, fn in rows.items():
        us = bench(fn)
        print(f"| {name} | {us * 1e6:.1f} | {us / clone:.2f} |")
    from torch.profiler import ProfilerActivity, profile

    op(x, 1.0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op(x, 1.0)
        torch.cuda.synchronize()
    print(f"\nCUDA kernels of one l21 call at {n}x{n}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


def scale_sweep():
    """ATen's broadcast multiply against the Triton kernel by size (where MIN_NUMEL comes from),
    rows of 1024 entries and columns of 1024 (d = last dim), float32."""
    from proxfunc.kernels import scale

    print("\n## per-group scale by size: ATen broadcast vs Triton (us)\n")
    print("| entries | layout | clone | ATen | Triton | Triton, 4 warps |")
    print("|---:|---|---:|---:|---:|---:|")
    for k in (14, 16, 18, 20, 22, 24):
        for layout, d in (("rows", 0), ("columns", 1)):
            us = [f"{t * 1e6:.1f}" for t in _scale_times((1 << k) // 1024, 1024, d, scale)]
            print(f"| 2^{k} | {layout} | " + " | ".join(us) + " |")


def _scale_times(rows, cols, d, scale):
    """(clone, ATen broadcast multiply, Triton kernel, Triton with 4 warps) of x * s along d."""
    x = torch.randn(rows, cols, device="cuda")
    s = torch.rand(x.shape[d], device="cuda")
    out = torch.empty_like(x)
    v = s[:, None] if d == 0 else s[None, :]
    clone = bench(lambda: x.clone())
    aten = bench(lambda: torch.mul(x, v, out=out))
    tri = bench(lambda: scale._launch(x, s, d, out))
    old, scale._NUM_WARPS = scale._NUM_WARPS, 4
    tri4 = bench(lambda: scale._launch(x, s, d, out))
    scale._NUM_WARPS = old
    return clone, aten, tri, tri4


if __name__ == "__main__":
    main()
