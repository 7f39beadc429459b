"""proxfunc's Triton kernels (eager CUDA paths) against oracles written out here.

* ``kernels.scale.mul_along`` (l21's per-group scale) equals the ATen expression
  ``(x.to(s.dtype) * s.reshape(along d)).to(x.dtype)`` bit for bit. Shapes cover both kernel
  layouts (a row per slice; slices inside a row, with and without the division), ``d=None``,
  rows not a multiple of the block, and the fallbacks.
* ``kernels.linf1_rows`` (linf1's threshold and clamp, fused per row) equals the clamp at the
  sort-based threshold (``threshold_sort`` in float64) to float rounding, on Gaussian rows,
  ties, all-equal and zero rows, rows of 1 and 8192 entries, groups made of a row of a
  weight and an entry of a bias (or a row of a second tensor), radii 0 to 1e9.

The kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, in one
subprocess so the rest of the suite never sees the variable) when ``triton`` is installed
(the test extra installs it on Linux x86-64); ``tests/test_cuda.py`` checks them compiled on a
GPU, where they are used.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import proxfunc as pf
import proxfunc.kernels.threshold  # noqa: F401
from proxfunc.compat import apply_
from proxfunc.kernels import _triton, linf1_rows, scale

K = sys.modules["proxfunc.kernels.threshold"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (shape, d): by row (inner >= 512), inside a row with d last (no division), inside a row with
# a division (3-D, 4-D), d=None, a single long row, a 1-D tensor, a negative d.
SHAPES = [
    ((600, 700), 0),
    ((600, 700), 1),
    ((3, 520, 5), 1),
    ((2, 3, 1100), 1),
    ((7, 1300), None),
    ((4, 600), -1),
    ((1, 4097), 0),
    ((9000,), 0),
    ((5, 7, 9, 11), 2),
    ((8, 64, 3, 3), 1),
]
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def linf1_rows_cases():
    """name -> the leaves of one linf1 argument, groups along dim 0 (float64 masters)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 300, generator=g, dtype=torch.float64)
    return {
        "gauss": [torch.randn(33, 257, generator=g, dtype=torch.float64)],
        "ties": [torch.randint(-2, 3, (16, 300), generator=g).double()],
        "equal": [torch.full((4, 100), -0.75, dtype=torch.float64)],
        "zeros": [torch.zeros(3, 50, dtype=torch.float64)],
        "long": [torch.randn(4, 8192, generator=g, dtype=torch.float64)],
        "3d": [torch.randn(5, 7, 9, generator=g, dtype=torch.float64) * 1e-3],
        "vector": [torch.randn(20, generator=g, dtype=torch.float64)],
        # a layer's (weight, bias): neuron i is W[i, :] and b[i]; a bias that dominates its row
        "weight+bias": [W, torch.randn(40, generator=g, dtype=torch.float64) * 10],
        "weight+bias, tied": [W.round(), W[:, 0].round()],
        "two matrices": [torch.randn(6, 1000, generator=g, dtype=torch.float64), torch.randn(6, 3, 5, generator=g)],
    }


LINF1_RADII = (0.0, 1e-9, 0.5, 5.0, 1e9)


def linf1_reference(leaves, r):
    """clamp(x_g, -tau_g, tau_g) with tau_g from the sort-based threshold over the group's
    entries in all leaves, in float64."""
    tau = K.threshold_sort([(x.double(), 0) for x in leaves], r, absolute=True).clamp_min(0)
    out = []
    for x in leaves:
        tb = tau.reshape([-1] + [1] * (x.dim() - 1))
        out.append(torch.clamp(x.double(), -tb, tb))
    return out


def linf1_tol(leaves, dtype):
    """Float rounding of the sums (pairwise, in float32 below float64) and of the result."""
    eps = torch.finfo(dtype).eps
    big = max(float(x.abs().max()) for x in leaves)
    n = sum(x.numel() // max(x.shape[0], 1) for x in leaves)
    return 8 * eps * big * max(1, n) ** 0.5 + 2 * eps * big


def reference(x, s, d):
    if d is None:
        v = s.reshape(())
    else:
        shape = [1] * x.dim()
        shape[d] = -1
        v = s.reshape(shape)
    return (x.to(s.dtype) * v).to(x.dtype)


def operands(shape, d, xd, sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(xd)
    n = 1 if d is None else shape[d]
    s = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5).to(sd)
    s[0] = 0.0  # a dead group
    return x, (s.reshape(()) if d is None else s)


@pytest.mark.parametrize("shape,d", SHAPES)
@pytest.mark.parametrize("xd,sd", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_mul_along_equals_aten_expression(shape, d, xd, sd):
    # On the CPU (or any tensor the kernel does not take) this is the ATen path itself;
    # the point is the contract: new tensor, out=, and in place all equal the reference.
    x, s = operands(shape, d, xd, sd)
    want = reference(x, s, d)
    assert torch.equal(scale.mul_along(x, s, d), want)
    out = torch.empty_like(x)
    assert scale.mul_along(x, s, d, out=out) is out and torch.equal(out, want)
    if xd == sd:
        y = x.clone()
        assert scale.mul_along(y, s, d, out=y) is y and torch.equal(y, want)


def test_geometry_picks_the_layout():
    # by row: one scale per row of `inner` entries; else rows of size_d * inner entries
    assert scale._geometry(torch.Size([600, 700]), 0) == (600, 700, 700, True)
    assert scale._geometry(torch.Size([600, 700]), 1) == (600, 700, 1, False)
    assert scale._geometry(torch.Size([8, 64, 3, 3]), 1) == (8, 576, 9, False)
    assert scale._geometry(torch.Size([2, 3, 1100]), 1) == (6, 1100, 1100, True)
    assert scale._geometry(torch.Size([7, 1300]), None) == (1, 9100, 9100, True)


def test_cpu_tensors_never_reach_the_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the Triton launcher ran for a CPU tensor")

    monkeypatch.setattr(scale, "_launch", boom)
    monkeypatch.setattr(scale, "MIN_NUMEL", 1 << 16)
    x = torch.randn(2048, 1024)  # above MIN_NUMEL
    op = pf.l21(20.0)
    got = op(x, 1.0)
    n = x.double().norm(dim=1)
    torch.testing.assert_close(got, (x.double() * (1 - 20.0 / n).clamp_min(0)[:, None]).float())
    y = x.clone()
    apply_(op, y, 1.0)
    assert torch.equal(y, got)


def test_linf1_rows_covers_rows_of_one_or_two_contiguous_tensors_only(monkeypatch):
    # The layout checks (the kernel itself is never reached here: CPU tensors).
    monkeypatch.setattr(linf1_rows, "_get_kernel", lambda: object())
    use = linf1_rows.usable
    x, b = torch.randn(64, 100), torch.randn(64)
    assert use([x], [0], 0.5, None) and use([x], [-2], 0.5, [x]) and use([x, b], [0, 0], 0.5, [x, b])
    assert not use([x], [1], 0.5, None)  # groups are columns
    assert not use([x], [None], 0.5, None)  # one group over everything
    assert not use([x.t()], [0], 0.5, None)  # rows not contiguous
    assert not use([x], [0], torch.tensor(0.5), None)  # tensor threshold: the ATen path
    assert not use([torch.randn(2, linf1_rows.MAX_ROW + 1)], [0], 0.5, None)
    assert not use([torch.randn(2, linf1_rows.MAX_ROW), torch.randn(2)], [0, 0], 0.5, None)  # group too long
    assert not use([x], [0], 0.5, [torch.empty(64, 100, dtype=torch.float64)])
    assert not use([torch.randint(0, 3, (4, 4))], [0], 0.5, None)
    assert not use([x, b.double()], [0, 0], 0.5, None)  # mixed dtypes
    assert not use([x, torch.randn(63)], [0, 0], 0.5, None)  # different group counts
    assert not use([x, b, b.clone()], [0, 0, 0], 0.5, None)  # three leaves
    assert not use([x, x.t()], [0, 1], 0.5, None)
    assert linf1_rows.linf1_rows([x], [0], 0.5) is None  # a CPU tensor: the caller's path


def test_linf1_on_the_cpu_never_launches(monkeypatch):
    monkeypatch.setattr(linf1_rows, "_launch", lambda *a: pytest.fail("kernel launched for a CPU tensor"))
    x = torch.randn(64, 300, dtype=torch.float64)
    got = pf.linf1(2.0)(x, 1.0)
    torch.testing.assert_close(got, linf1_reference([x], 2.0)[0], rtol=0, atol=1e-12)
    y = x.clone()
    apply_(pf.linf1(2.0), y, 1.0)
    assert torch.equal(y, got)


def test_a_kernel_that_cannot_run_is_switched_off_with_a_warning(monkeypatch):
    # Triton compiles at the first launch; a GPU or toolchain it cannot compile for raises
    # there. The operator must still answer (ATen path), once warned, kernel off for good.
    class Broken:
        def __getitem__(self, grid):
            def run(*args, **meta):
                raise RuntimeError("no compiler for this GPU")

            return run

    monkeypatch.setattr(_triton, "_BUILT", {"mul_along": Broken(), "linf1_rows": Broken()})
    x, s = operands((600, 700), 0, torch.float32, torch.float32)
    out = torch.empty_like(x)
    with pytest.warns(RuntimeWarning, match="'mul_along' could not run"):
        got = scale._launch(x, s, 0, out)
    assert got is out and torch.equal(got, reference(x, s, 0))
    assert scale._get_kernel() is None
    xs = [torch.randn(8, 50)]
    with pytest.warns(RuntimeWarning, match="'linf1_rows' could not run"):
        assert linf1_rows._launch(xs, 0.5, [torch.empty_like(xs[0])]) is None
    assert linf1_rows._get_kernel() is None


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("PROXFUNC_TRITON", "0")
    monkeypatch.setattr(_triton, "_BUILT", {})  # nothing built yet; restored afterwards
    assert scale._get_kernel() is None
    assert _triton._BUILT == {"mul_along": False}


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from proxfunc.kernels import linf1_rows, scale
    from tests.test_triton_kernels import DTYPES, LINF1_RADII, SHAPES, linf1_reference, linf1_rows_cases
    from tests.test_triton_kernels import linf1_tol, operands, reference

    assert scale._get_kernel() is not None, "triton did not load"
    bad = []
    for shape, d in SHAPES:
        for xd, sd in DTYPES:
            x, s = operands(shape, d, xd, sd, seed=1)
            want = reference(x, s, d)
            got = scale._launch(x, s, d, torch.empty_like(x))
            if xd == torch.bfloat16:
                # the interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even,
                # checked exactly in tests/test_cuda.py): at most one unit in the last place
                ulp = (want.float().abs() * 2.0**-7).clamp_min(2.0**-133)
                ok = bool(((got.float() - want.float()).abs() <= ulp).all())
            else:
                ok = torch.equal(got, want)
            if xd == sd:
                y = x.clone()
                ok = ok and scale._launch(y, s, d, y) is y and torch.equal(y, want)
            if not ok:
                bad.append((shape, d, str(xd)))

    assert linf1_rows._get_kernel() is not None
    for name, masters in linf1_rows_cases().items():
        for r in LINF1_RADII:
            for dt in (torch.float64, torch.float32, torch.bfloat16):  # float16: test_cuda
                xs = [x.to(dt) for x in masters]
                want = linf1_reference(xs, r)
                got = linf1_rows._launch(xs, r, [torch.empty_like(x) for x in xs])
                ys = [x.clone() for x in xs]
                linf1_rows._launch(ys, r, ys)  # in place: each program reads its rows first
                err = max(float((a.double() - b).abs().max()) for a, b in zip(got, want))
                same = all(torch.equal(a, b) and a.dtype == dt for a, b in zip(ys, got))
                if not (err <= linf1_tol(masters, dt) and same):
                    bad.append(("linf1_rows", name, r, str(dt), err))
    print("checked", len(SHAPES) * len(DTYPES), "+ linf1 rows; bad", bad)
    assert not bad, bad
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (.ci/run installs it)")
def test_triton_kernel_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    env.pop("PROXFUNC_TRITON", None)
    r = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bad []" in r.stdout, r.stdout
