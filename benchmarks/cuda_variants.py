"""GPU timings of method variants side by side (``python -m benchmarks.cuda_variants``).

linf1's row thresholds on a 4096x4096 float32 matrix and the l1 ball's one threshold over it:
the eager fixed point (what ``pf.linf1`` / ``pf.l1_ball`` use eagerly), the unrolled fixed point
run eagerly (the traceable path: no host sync, a fixed number of passes), the sort reference
and ``max_k (c_k - r) / k``; each checked against the float64 sort reference.

Then eager l21 taken apart at 4096^2 and 16384^2 (the norm kernel, the scale, ATen's
broadcast multiply, the whole operator, each against ``clone``), and the CUDA kernels one l21
call launches (``torch.profiler``), to see where time beyond three passes goes.

Then linf1 of row groups three ways, each against ``clone``: the Triton kernel (what
``"auto"`` takes, :mod:`proxfunc.kernels.cuda.linf1`), ATen's eager path
(``pf.dispatch.implementation("aten")``: the threshold by a segmented sort, then a clamp) and
``torch.compile`` of the operator call (inductor compiles the reference), with the compiled
function's first call (its cold-start compile time). The kernel is kept only while it is at
least 1.5x faster than the ATen path.
"""

import os
import shutil
import sys
import tempfile
import time

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
    linf1_fused()


def linf1_fused():
    """Eager linf1 (groups = rows): the Triton kernel against ATen's eager path, and
    ``torch.compile`` of the operator call with its cold-start compile time."""
    import torch._dynamo

    import proxfunc as pf
    from proxfunc.dispatch import implementation
    from proxfunc.kernels.cuda import linf1 as linf1_cuda

    if not linf1_cuda.available():
        print("\n(the linf1 Triton kernel is not available here: triton missing or PROXFUNC_TRITON=0)")
    cache_dir = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold start: nothing cached on disk by earlier runs
        cache_dir = tempfile.mkdtemp(prefix="proxfunc-variants-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False  # each shape compiles its own graph
    try:
        t0 = time.perf_counter()  # inductor's start-up, paid by a program's first compile: no row's
        torch.compile(lambda a: a + 1, fullgraph=True)(torch.ones(4, device="cuda"))
        torch.cuda.synchronize()
        warmup = time.perf_counter() - t0
        print("\n## eager linf1, rows: Triton kernel vs ATen's eager path vs torch.compile (us, / clone)\n")
        print(f"compile s: the compiled call's first call (cold start; inductor start-up {warmup:.1f} s excluded)\n")
        print("| shape | clone | kernel (auto) | aten | aten / kernel | compiled | compile s | max abs diff |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for shape in ((4096, 4096), (16384, 4096), (65536, 256), (1024, 8192), (4096, 4096, "bias")):
            _linf1_row(pf, implementation, shape)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)


def _linf1_row(pf, implementation, shape):
    x = torch.randn(shape[:2], device="cuda")
    if len(shape) > 2:  # a layer's (weight, bias): neuron i is x[i, :] and its bias
        x = (x, torch.randn(shape[0], device="cuda"))
    op = pf.linf1(5.0)
    step = torch.tensor(1.0, device="cuda")  # a 0-d tensor: one graph for every step

    def aten():
        with implementation("aten"):
            return op(x, 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(lambda a, s: op(a, s), fullgraph=True)  # under compile: the reference
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    c = compiled(x, step)
    torch.cuda.synchronize()
    cold = time.perf_counter() - t0
    clone = bench(lambda: torch.utils._pytree.tree_map(torch.clone, x))
    fused = bench(lambda: op(x, 1.0))
    at = bench(aten)
    comp = bench(lambda: compiled(x, step))
    a, b = op(x, 1.0), aten()
    leaves = torch.utils._pytree.tree_leaves
    diff = max(float((p - q).abs().max()) for t in (b, c) for p, q in zip(leaves(a), leaves(t)))
    name = f"{shape[0]}x{shape[1]}" + (" + bias" if len(shape) > 2 else "")
    print(f"| {name} | {clone * 1e6:.0f} | {fused * 1e6:.0f} ({fused / clone:.2f}) | {at * 1e6:.0f} ({at / clone:.2f}) "
          f"| {at / fused:.1f} | {comp * 1e6:.0f} ({comp / clone:.2f}) | {cold:.1f} | {diff:.1e} |")  # fmt: skip


def l21_parts(n):
    """Eager l21 on an n x n float32 matrix, piece by piece, against clone (group_dim=0: rows)."""
    import proxfunc as pf
    from proxfunc._util import block_scale_

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


if __name__ == "__main__":
    main()
