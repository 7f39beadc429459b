"""``kernels.scale.mul_along`` (l21's per-group scale) equals the ATen expression bit for bit.

Oracle: ``(x.to(s.dtype) * s.reshape(along d)).to(x.dtype)`` written out here. The Triton
kernel itself is checked on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, in a
subprocess so the rest of the suite never sees the variable) when ``triton`` is installed
(``.ci/run`` installs it); ``tests/test_cuda.py`` checks it compiled on a GPU. Shapes cover
both kernel layouts (a row per slice; slices inside a row, with and without the division),
``d=None``, rows not a multiple of the block, and the fallbacks.
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
from proxfunc.compat import apply_
from proxfunc.kernels import scale

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


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("PROXFUNC_TRITON", "0")
    monkeypatch.setattr(scale, "_kernel", None)  # not loaded yet; restored afterwards
    assert scale._get_kernel() is None


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from proxfunc.kernels import scale
    from tests.test_scale_kernel import DTYPES, SHAPES, operands, reference

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
    print("checked", len(SHAPES) * len(DTYPES), "bad", bad)
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
    assert "bad []" in r.stdout
