"""proxfunc's Triton kernel (:mod:`proxfunc.kernels.cuda.linf1`, eager CUDA path) against
oracles written out here, and its launcher (:mod:`proxfunc.kernels.cuda._triton`).

* ``cuda.linf1.run`` (linf1's threshold and clamp, fused per row group) equals the clamp at
  the sort-based threshold (``threshold_sort`` in float64) to float rounding, on Gaussian
  rows, ties, all-equal and zero rows, rows of 1 and 8192 entries, groups made of a row of a
  weight and an entry of a bias (or a row of a second tensor), radii 0 to 1e9; new tensors,
  ``out=``, and in place (same bits, version counters bumped); a part with no columns.
* Its :data:`~proxfunc.kernels.cuda.linf1.SPEC` is the layout it covers, as
  :func:`proxfunc.dispatch.select` checks it (one or two contiguous tensors of one dtype,
  groups along dim 0, at most ``MAX_ROW`` entries a group, a float threshold).
* A launch that raises switches the kernel off with one warning (``run`` returns ``None``,
  nothing written); ``PROXFUNC_TRITON=0`` switches it off; CPU tensors never reach it.

The kernel runs on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, in one
subprocess so the rest of the suite never sees the variable) when ``triton`` is installed
(the test extra installs it on Linux x86-64); ``tests/test_cuda.py`` checks it compiled on a
GPU, where it is used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import proxfunc as pf
from proxfunc import dispatch
from proxfunc.compat import apply_
from proxfunc.kernels.cuda import _triton
from proxfunc.kernels.cuda import linf1 as linf1_cuda
from proxfunc.kernels.threshold import threshold_sort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    tau = threshold_sort([(x.double(), 0) for x in leaves], r, absolute=True).clamp_min(0)
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


def test_spec_declares_the_kernel():
    spec = linf1_cuda.SPEC
    assert (spec.name, spec.device, spec.max_parts, spec.max_group) == ("linf1_rows", "cuda", 2, linf1_cuda.MAX_ROW)
    assert set(spec.dtypes) == {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    assert spec.available is linf1_cuda.available
    assert linf1_cuda.MAX_ROW & (linf1_cuda.MAX_ROW - 1) == 0  # a power of two: one program's block


def test_spec_covers_rows_of_one_or_two_contiguous_tensors_only():
    # The layout as dispatch checks it, on CPU tensors under a copy of SPEC declared for the
    # CPU (the kernel itself is never reached here).
    spec = dataclasses.replace(linf1_cuda.SPEC, device="cpu", available=lambda: True)

    def takes(leaves, dims, t=0.5):
        return dispatch.select(leaves, t, kernel=spec, dims=dims).impl == dispatch.KERNEL

    x, b = torch.randn(64, 100), torch.randn(64)
    row = linf1_cuda.MAX_ROW
    with dispatch.implementation("auto"):
        assert takes([x], [0]) and takes([x], [-2]) and takes([x, b], [0, 0]) and takes([b], [0])
        assert takes([x.half()], [0]) and takes([x.bfloat16(), b.bfloat16()], [0, 0])
        assert takes([torch.randn(2, row)], [0]) and takes([torch.randn(2, row - 1), torch.randn(2)], [0, 0])
        assert not takes([x], [1])  # groups are columns
        assert not takes([x.t()], [0])  # rows not contiguous
        assert not takes([torch.randn(2, row + 1)], [0])  # group too long
        assert not takes([torch.randn(2, row), torch.randn(2)], [0, 0])
        assert not takes([x, b.double()], [0, 0])  # mixed dtypes
        assert not takes([x, torch.randn(63)], [0, 0])  # different group counts
        assert not takes([x, b, b.clone()], [0, 0, 0])  # three parts
        assert not takes([x, x.t()], [0, 1])
        assert not takes([torch.randn(0, 5)], [0])  # no groups
        assert not takes([x], [0], float("inf"))
        assert not takes([x.half()], [0], 1e6)  # beyond float16's range
        assert not takes([x.requires_grad_()], [0])  # something to differentiate: the reference
    with dispatch.implementation("aten"):
        assert not takes([b], [0])


def test_linf1_on_the_cpu_never_launches(monkeypatch):
    monkeypatch.setattr(linf1_cuda, "_launch", lambda *a: pytest.fail("kernel launched for a CPU tensor"))
    x = torch.randn(64, 300, dtype=torch.float64)
    assert dispatch.select([x], 2.0, kernel=linf1_cuda.SPEC, dims=[0]).impl != dispatch.KERNEL
    got = pf.linf1(2.0)(x, 1.0)
    torch.testing.assert_close(got, linf1_reference([x], 2.0)[0], rtol=0, atol=1e-12)
    y = x.clone()
    apply_(pf.linf1(2.0), y, 1.0)
    assert torch.equal(y, got)


class Broken:
    """A built kernel whose launch raises, as Triton's does on a GPU or toolchain it cannot
    compile for (it compiles at the first launch)."""

    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise RuntimeError("no compiler for this GPU")

        return launch


def test_a_kernel_that_cannot_run_is_switched_off_with_a_warning(monkeypatch):
    # The operator must still answer (its ATen path), once warned, the kernel off for good.
    monkeypatch.setattr(_triton, "_BUILT", {"linf1_rows": Broken()})
    assert linf1_cuda.available()
    xs = [torch.randn(8, 50)]
    before = xs[0].clone()
    version = xs[0]._version
    with pytest.warns(RuntimeWarning, match="'linf1_rows' could not run"):
        assert linf1_cuda.run(xs, 0.5, out=xs) is None
    assert torch.equal(xs[0], before) and xs[0]._version == version  # nothing written
    assert not linf1_cuda.available() and linf1_cuda._get_kernel() is None
    assert linf1_cuda.run(xs, 0.5) is None  # no second warning, no launch


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("PROXFUNC_TRITON", "0")
    monkeypatch.setattr(_triton, "_BUILT", {})  # nothing built yet; restored afterwards
    assert not linf1_cuda.available()
    assert _triton._BUILT == {"linf1_rows": False}
    assert linf1_cuda.run([torch.randn(4, 8)], 0.5) is None


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from proxfunc.kernels.cuda import linf1
    from tests.test_triton_kernels import LINF1_RADII, linf1_reference, linf1_rows_cases, linf1_tol

    assert linf1.available(), "triton did not load"
    bad = []
    checked = 0
    for name, masters in linf1_rows_cases().items():
        for r in LINF1_RADII:
            for dt in (torch.float64, torch.float32, torch.bfloat16):  # float16: test_cuda
                xs = [x.to(dt) for x in masters]
                want = linf1_reference(xs, r)
                got = linf1.run(xs, r)
                outs = [torch.empty_like(x) for x in xs]
                into = linf1.run(xs, r, out=outs)
                ys = [x.clone() for x in xs]
                versions = [y._version for y in ys]
                mine = linf1.run(ys, r, out=ys)  # in place: each program reads its group first
                err = max(float((a.double() - b).abs().max()) for a, b in zip(got, want))
                same = all(torch.equal(a, b) and torch.equal(c, b) and a.dtype == dt for a, b, c in zip(ys, got, outs))
                same = same and into is outs and mine is ys
                bumped = all(y._version > v for y, v in zip(ys, versions))
                if not (err <= linf1_tol(masters, dt) and same and bumped):
                    bad.append((name, r, str(dt), err, same, bumped))
                checked += 1
    # a part with no columns: nothing to read or write, the other part as alone
    w = linf1_rows_cases()["gauss"][0].float()
    got = linf1.run([w, torch.empty(w.shape[0], 0)], 5.0)
    if not (torch.equal(got[0], linf1.run([w], 5.0)[0]) and got[1].shape == (w.shape[0], 0)):
        bad.append("empty part")
    print("checked", checked, "linf1 row cases; bad", bad)
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
