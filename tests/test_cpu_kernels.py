"""proxfunc's C kernel for eager CPU soft thresholding (``proxfunc.kernels.soft``) and its
loader (``proxfunc.kernels._cc``), against oracles written out here.

* Values: bit for bit the ATen expression ``x - clamp(x, -t, t)`` in the same dtype (the
  kernel's arithmetic done by other code), and equal in value to ATen's ``softshrink`` and to
  the textbook ``sign(x) * max(|x| - t, 0)`` in numpy; over shapes whose lengths cross every
  vector tail, scales 1e-9..1e9, NaN, +-inf, +-0, subnormals, entries exactly at +-t and
  the largest finite values, in float32 and float64, out of place and in place.
* Which tensors it takes (CPU, float32/float64, contiguous, plain tensors, thread rule) and
  that everything else keeps ATen's path with the same results; l1 / ``apply_`` / compat
  use it and stay bit-identical to their functional results.
* In-place writes bump the autograd version counter (a tensor saved for backward is caught),
  inference tensors are written inside ``inference_mode``.
* The loader: ``PROXFUNC_CC=0``, no compiler, a failing compiler (the ATen path, with the
  reason in ``why``), the on-disk cache (a second process loads without compiling), and
  processes building at once into an empty cache.

The kernel needs a C compiler; the tests that need the kernel skip only where none is on
``PATH`` (CI has gcc, which ``torch.compile`` needs too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
import proxfunc.compat as pg
from proxfunc.compat import apply_
from proxfunc.kernels import _cc, soft

from .conftest import examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_CC = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on PATH")
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _kernel_built():
    if HAVE_CC:
        assert soft.available(), _cc.why(soft._NAME)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, as integers (compares signs of zeros and NaN payloads)."""
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])


def reference(x: torch.Tensor, t: float) -> torch.Tensor:
    """The kernel's arithmetic done by ATen: ``x - clamp(x, -t, t)`` in ``x``'s dtype."""
    return x - torch.clamp(x, -t, t)


def textbook(x: torch.Tensor, t: float) -> np.ndarray:
    """``sign(x) * max(|x| - t, 0)`` in numpy, in ``x``'s dtype (NaN stays NaN)."""
    a = x.numpy()
    tt = a.dtype.type(t)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(a) > tt, a - np.sign(a) * tt, a.dtype.type(0) * np.abs(a))


def specials(dtype: torch.dtype, t: float) -> list[float]:
    fi = torch.finfo(dtype)
    return [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, t, -t, fi.tiny / 4, -fi.tiny / 4, fi.max, -fi.max]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.one_of(st.integers(0, 70), st.sampled_from([127, 129, 255, 1000, 4099])))
    scale = 10.0 ** draw(st.integers(-9, 9))
    t = scale * draw(st.sampled_from([1e-3, 0.1, 0.5, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = float(torch.tensor(t, dtype=dtype))  # a threshold the dtype holds (ATen rounds it so)
    if n:
        k = draw(st.integers(0, min(n, 11)))
        pos = torch.randperm(n, generator=g)[:k]
        x[pos] = torch.tensor(specials(dtype, t)[:k], dtype=dtype)
    return x, t


@needs_kernel
@given(cases())
@settings(max_examples=examples(300))
def test_values_bitwise_against_the_aten_expression(case):
    x, t = case
    ref = reference(x, t)
    (out,) = soft.shrink([x], t)
    assert torch.equal(bits(out), bits(ref)), (x, t)
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    y = x.clone()
    soft.shrink_([y], t)
    assert torch.equal(bits(y), bits(ref))
    # ATen's softshrink: equal in value (it writes -0.0 for small negative entries in its
    # scalar tail loop, +0.0 in its vector loop; the kernel writes +0.0 everywhere)
    aten = torch._C._nn.softshrink(x, t)
    same = (aten == out) | (torch.isnan(aten) & torch.isnan(out))
    assert bool(same.all())
    np.testing.assert_array_equal(out.numpy(), textbook(x, t))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_are_positive_and_nan_propagates(dtype):
    x = torch.tensor([-0.3, -0.0, 0.0, 0.3, float("nan"), -0.5, 0.5, 2.0, -2.0] * 3, dtype=dtype)
    (out,) = soft.shrink([x], 0.5)
    zero = out == 0
    assert not torch.signbit(out[zero]).any()
    assert torch.isnan(out[torch.isnan(x)]).all()
    assert torch.equal(out[x.abs() > 0.5], (x - 0.5 * torch.sign(x))[x.abs() > 0.5])


@needs_kernel
def test_mixed_dtypes_shapes_and_empty_in_one_call():
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(256, 256, generator=g),
        torch.randn(3, dtype=torch.float64, generator=g),
        torch.empty(0),
        torch.randn(5, 7, 1, generator=g),
        torch.randn(33, dtype=torch.float64, generator=g),
    ]
    before = [x.clone() for x in xs]
    outs = soft.shrink(xs, 0.25)
    for x, b, o in zip(xs, before, outs):
        assert torch.equal(bits(x), bits(b)), "the functional kernel wrote into its input"
        assert o.dtype == x.dtype and o.shape == x.shape and o.is_contiguous()
        assert torch.equal(bits(o), bits(reference(x, 0.25)))
    soft.shrink_(xs, 0.25)
    for x, o in zip(xs, outs):
        assert torch.equal(bits(x), bits(o))


@needs_kernel
def test_which_tensors_the_kernel_takes(monkeypatch):
    x = torch.randn(8, 9)
    assert soft.split([x], 0.1) == ([0], [])
    not_taken = {
        "non-contiguous": torch.randn(9, 8).t(),
        "bfloat16": torch.randn(4, dtype=torch.bfloat16),
        "float16": torch.randn(4, dtype=torch.float16),
        "integer": torch.arange(4),
        "sparse": torch.randn(3, 3).to_sparse(),
        "meta": torch.empty(4, device="meta"),
        "subclass": torch.randn(4).as_subclass(type("Sub", (torch.Tensor,), {})),
    }
    for name, y in not_taken.items():
        assert soft.split([x, y], 0.1) == ([0], [1]), name
    assert soft.split([x], 0.0) == ([], [0])  # t = 0 is the identity: the callers' business
    assert soft.split([x.double()], 1e39) == ([0], [])  # within float64's range
    assert soft.split([x], 1e39) == ([], [0])  # beyond float32's: ATen refuses it
    assert soft.split([x], torch.tensor(0.1)) == ([], [0])  # a tensor threshold
    big = torch.empty(_cc.SERIAL_NUMEL + 1)
    small = torch.empty(_cc.SERIAL_NUMEL)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert soft.split([big, small], 0.1) == ([0, 1], [])
        torch.set_num_threads(2)  # ATen splits large tensors over threads: it keeps them
        assert soft.split([big, small], 0.1) == ([1], [0])
    finally:
        torch.set_num_threads(n)


@needs_kernel
def test_beyond_float32_range_still_refused_as_before():
    x = torch.randn(40)
    with pytest.raises(RuntimeError, match="lambda"):
        torch._C._nn.softshrink(x, 1e39)
    with pytest.raises(RuntimeError, match="lambda"):
        pf.l1(1e39)(x, 1.0)


def _count_runs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = soft._run

    def counted(srcs, dsts, t):
        calls.append(len(srcs))
        return real(srcs, dsts, t)

    monkeypatch.setattr(soft, "_run", counted)
    return calls


@needs_kernel
def test_l1_functional_and_in_place_use_one_call_and_agree(monkeypatch):
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    op = pf.partition({"*": pf.l1(0.3)})
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    calls = _count_runs(monkeypatch)
    new = op(params, 0.5)
    assert calls == [4]  # the four tensors in one C call
    for k in params:
        assert torch.equal(bits(new[k]), bits(reference(params[k], 0.15)))
    apply_(op, model, 0.5)
    assert calls == [4, 4]
    for k, p in model.named_parameters():
        assert torch.equal(bits(p.detach()), bits(new[k]))
    # the seed's compat call (weight, bias) in place
    w, b = model[0].weight, model[0].bias
    expect = [reference(w.detach(), 0.005 * 0.1), reference(b.detach(), 0.005 * 0.1)]
    pg.l1(w, b, reg=0.005, lr=0.1)
    assert calls[-1] == 2
    assert torch.equal(bits(w.detach()), bits(expect[0])) and torch.equal(bits(b.detach()), bits(expect[1]))


@needs_kernel
def test_paths_that_keep_aten(monkeypatch):
    calls = _count_runs(monkeypatch)
    x = torch.randn(50, dtype=torch.float64)
    op = pf.l1(0.2)
    # something to differentiate: the differentiable path
    xg = x.clone().requires_grad_()
    y = op(xg, 1.0)
    y.sum().backward()
    assert calls == [] and torch.equal(xg.grad, (x.abs() > 0.2).double())
    # torch.func transforms
    torch.func.vmap(lambda r: op(r, 1.0))(x.reshape(5, 10))
    torch.func.grad(lambda r: op(r, 1.0).sum())(x)
    assert calls == []
    # a tensor step
    op(x, torch.tensor(1.0, dtype=torch.float64))
    assert calls == []
    # low precision keeps its float32 round trip
    h = torch.randn(20, dtype=torch.bfloat16)
    assert torch.equal(op(h, 1.0), torch._C._nn.softshrink(h.float(), 0.2).bfloat16())
    assert calls == []


@needs_kernel
def test_in_place_bumps_the_version_counter():
    saved = torch.randn(6, requires_grad=True)
    p = torch.nn.Parameter(torch.randn(6))
    z = (saved * p).sum()  # saves p for backward
    v = p._version
    apply_(pf.l1(0.1), [p], 1.0)
    assert p._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@needs_kernel
def test_inference_tensors_written_inside_inference_mode(monkeypatch):
    calls = _count_runs(monkeypatch)
    with torch.inference_mode():
        x = torch.randn(40)
        expect = reference(x, 0.1)
        apply_(pf.l1(0.1), [x], 1.0)
        assert torch.equal(bits(x), bits(expect))
        out = pf.l1(0.1)([x], 1.0)[0]
        assert out.is_inference()
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="inference tensor"):
        apply_(pf.l1(0.1), [x], 1.0)


def _fresh(monkeypatch, **env):
    """Forget the loaded library for this test (and restore it afterwards)."""
    monkeypatch.setattr(_cc, "_LIBS", {})
    monkeypatch.setattr(_cc, "_WHY", {})
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _l1_still_right():
    x = torch.randn(300, dtype=torch.float64)
    assert torch.equal(pf.l1(0.4)(x, 1.0), torch._C._nn.softshrink(x, 0.4))
    y = x.clone()
    apply_(pf.l1(0.4), [y], 1.0)
    assert torch.equal(y, torch._C._nn.softshrink(x, 0.4))


def test_switched_off(monkeypatch):
    _fresh(monkeypatch, PROXFUNC_CC="0")
    assert not soft.available()
    assert "PROXFUNC_CC=0" in _cc.why(soft._NAME)
    _l1_still_right()


def test_no_compiler(monkeypatch, tmp_path):
    _fresh(monkeypatch, CC=str(tmp_path / "no-such-cc"), PROXFUNC_CACHE_DIR=str(tmp_path / "cache"))
    assert not soft.available()
    assert "no C compiler" in _cc.why(soft._NAME)
    _l1_still_right()


def test_failing_compiler(monkeypatch, tmp_path):
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\necho 'badcc: error: cannot compile' >&2\nexit 1\n")
    bad.chmod(0o755)
    _fresh(monkeypatch, CC=str(bad), PROXFUNC_CACHE_DIR=str(tmp_path / "cache"))
    assert not soft.available()
    assert "badcc: error: cannot compile" in _cc.why(soft._NAME)
    assert not list((tmp_path / "cache").glob("*.tmp")), "a failed build left a partial file"
    _l1_still_right()


@needs_kernel
def test_cache_is_reused_without_compiling(monkeypatch, tmp_path):
    _fresh(monkeypatch, PROXFUNC_CACHE_DIR=str(tmp_path))
    assert soft.available()
    built = list(tmp_path.glob("soft-*.so"))
    assert len(built) == 1 and str(built[0]) in _cc.why(soft._NAME)

    def no_compiling(*a, **k):
        raise AssertionError("compiled again")

    _fresh(monkeypatch)
    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert soft.available()
    (out,) = soft.shrink([torch.tensor([-2.0, 0.1, 3.0])], 1.0)
    assert out.tolist() == [-1.0, 0.0, 2.0]


@needs_kernel
def test_processes_building_at_once(tmp_path):
    code = textwrap.dedent(
        """
        import torch
        from proxfunc.kernels import _cc, soft
        assert soft.available(), _cc.why(soft._NAME)
        (y,) = soft.shrink([torch.tensor([-2.0, 0.5, 3.0])], 1.0)
        assert y.tolist() == [-1.0, 0.0, 2.0]
        """
    )
    env = {**os.environ, "PROXFUNC_CACHE_DIR": str(tmp_path), "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert len(list(tmp_path.glob("soft-*.so"))) == 1
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------ l21 rows
from proxfunc.kernels import l21_rows as l21k  # noqa: E402


def l21_oracle(parts: list[torch.Tensor], t: float) -> list[np.ndarray]:
    """Block soft thresholding of the row groups of ``parts``, in float64 numpy."""
    if parts[0].shape[0] == 0:
        return [np.zeros(tuple(p.shape)) for p in parts]
    a = [p.double().numpy().reshape(p.shape[0], -1) for p in parts]
    n = np.sqrt(sum((x * x).sum(axis=1) for x in a))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(n > t, (n - t) / np.where(n > 0, n, 1.0), 0.0)
    return [(x * s[:, None]).reshape(p.shape) for x, p in zip(a, parts)]


@st.composite
def l21_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(0, 40))
    widths = draw(st.lists(st.sampled_from([None, 1, 2, 15, 16, 17, 63, 64, 65, 200]), min_size=1, max_size=3))
    scale = 10.0 ** draw(st.integers(-9, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    parts = [
        (torch.randn((rows,) if w is None else (rows, w), generator=g, dtype=torch.float64) * scale).to(dtype)
        for w in widths
    ]
    if rows:
        for p in parts:  # zero groups, and groups right at the threshold's scale
            p[: draw(st.integers(0, min(rows, 3)))] = 0
    n = float(sum((p.double() ** 2).reshape(rows, -1).sum(1) for p in parts).sqrt().mean()) if rows else 1.0
    t = float(torch.tensor(max(n, 1e-30) * draw(st.sampled_from([0.01, 0.5, 0.9, 1.0, 1.1, 3.0])), dtype=dtype))
    return parts, t


@needs_kernel
@given(l21_cases())
@settings(max_examples=examples(200))
def test_l21_rows_against_float64(case):
    parts, t = case
    before = [p.clone() for p in parts]
    got = l21k.l21_rows([parts], t)
    assert got is not None
    (outs,) = got
    eps = torch.finfo(parts[0].dtype).eps
    width = sum(p[0].numel() for p in parts) if parts[0].shape[0] else 1
    for p, b, y, want in zip(parts, before, outs, l21_oracle(parts, t)):
        assert torch.equal(bits(p), bits(b)), "wrote into its input"
        assert torch.isfinite(y).all()
        err = np.abs(y.double().numpy() - want)
        tol = (width / 64 + 16) * eps * np.abs(p.double().numpy()) + 1e-300
        assert (err <= tol).all(), float((err / tol).max())
    # in place: the same bits as out of place
    l21k.l21_rows([parts], t, in_place=True)
    for p, y in zip(parts, outs):
        assert torch.equal(bits(p), bits(y))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_l21_rows_special_groups(dtype):
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0], [float("nan"), 1.0], [float("inf"), 1.0], [1e-30, 0.0]], dtype=dtype)
    (y,) = l21k.l21_rows([[w]], 1.0)[0]
    assert torch.equal(y[0], torch.zeros(2, dtype=dtype)) and not torch.signbit(y[0]).any()
    torch.testing.assert_close(y[1], torch.tensor([2.4, 3.2], dtype=dtype))
    assert torch.isnan(y[2]).all()  # a NaN group stays NaN (as ATen's path)
    assert y[3, 0] == float("inf") and y[3, 1] == 1.0  # an infinite norm: nothing shrinks
    assert torch.equal(y[4], torch.zeros(2, dtype=dtype))
    b = torch.tensor([0.0, -0.5, 2.0, -3.0], dtype=dtype)  # a bias alone: one entry a group
    (yb,) = l21k.l21_rows([[b]], 1.0)[0]
    assert yb.tolist() == [0.0, 0.0, 1.0, -2.0]


@needs_kernel
def test_l21_routing_and_agreement_with_aten(monkeypatch):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(30, 20, generator=g), torch.randn(30, generator=g)
    assert l21k.l21_rows([[w.t()]], 0.5) is None  # not contiguous
    assert l21k.l21_rows([[w, b.double()]], 0.5) is None  # two dtypes
    assert l21k.l21_rows([[w]], torch.tensor(0.5)) is None  # a tensor threshold
    assert l21k.l21_rows([[w, torch.randn(29)]], 0.5) is None  # rows differ
    assert l21k.l21_rows([[torch.tensor(1.0)]], 0.5) is None  # 0-d
    calls: list[int] = []
    real = l21k.l21_rows

    def counted(jobs, t, in_place=False):
        calls.append(len(jobs))
        return real(jobs, t, in_place)

    import proxfunc.groups as groups

    monkeypatch.setattr(groups, "l21_rows", counted)
    op = pf.l21(0.1)
    fast = op((w, b), 2.0)
    with torch.enable_grad():  # the differentiable ATen path
        slow = op((w.clone().requires_grad_(), b.clone().requires_grad_()), 2.0)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s.detach(), rtol=4e-6, atol=1e-7)
    # the seed's call in place, and a partition of weights (each its own groups), one call each
    w2, b2 = w.clone(), b.clone()
    pg.l21(w2, b2, reg=0.1, lr=2.0)
    assert torch.equal(w2, fast[0]) and torch.equal(b2, fast[1])
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 4))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    part = pf.partition({"*.weight": pf.l21(0.1)})
    new = part(params, 1.0)
    apply_(part, model, 1.0)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), new[k])
    assert calls == [1, 1, 2, 2]
    # columns as groups keep ATen
    calls.clear()
    pf.l21(0.1, group_dim=1)(w, 1.0)
    assert calls == []


# ----------------------------------------------------------------------------------- linf1 rows
from proxfunc.kernels import linf1_cpu  # noqa: E402
from proxfunc.kernels.threshold import threshold_sort  # noqa: E402


def linf1_oracle(parts: list[torch.Tensor], r: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The clamp at the float64 sort-based threshold (tau = max(theta, 0)) of every row group."""
    p64 = [(p.double(), 0) for p in parts]
    tau = threshold_sort(p64, r, absolute=True).clamp_min(0)
    return [
        torch.maximum(
            torch.minimum(p.double(), tau.view(-1, *[1] * (p.dim() - 1))), -tau.view(-1, *[1] * (p.dim() - 1))
        )
        for p in parts
    ], tau


@st.composite
def linf1_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 30))
    widths = draw(st.lists(st.sampled_from([None, 1, 2, 7, 15, 16, 17, 64, 65, 300]), min_size=1, max_size=3))
    scale = 10.0 ** draw(st.integers(-9, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["gauss", "ties", "equal", "zeros", "few"]))
    parts = []
    for w in widths:
        shape = (rows,) if w is None else (rows, w)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if kind == "ties":
            x = torch.round(x * 2) / 2
        elif kind == "equal":
            x = torch.ones(shape, dtype=torch.float64) * torch.sign(x)
        elif kind == "zeros":
            x[: rows // 2] = 0
        elif kind == "few":
            x = x * (torch.rand(shape, generator=g) < 0.1)
        parts.append((x * scale).to(dtype))
    l1 = float(sum(p.double().abs().reshape(rows, -1).sum(1) for p in parts).mean())
    r = draw(st.sampled_from([0.0, 1e-30, 0.01, 0.5, 0.99, 1.0, 1.01, 2.0, 1e30]))
    r = float(torch.tensor(r * max(l1, 1e-300) if r < 1e29 else 1e30, dtype=dtype))
    return parts, r


@needs_kernel
@given(linf1_cases())
@settings(max_examples=examples(300))
def test_linf1_rows_against_the_sort_reference(case):
    parts, r = case
    before = [p.clone() for p in parts]
    outs = linf1_cpu.linf1_rows_cpu(parts, [0] * len(parts), r)
    if r > torch.finfo(parts[0].dtype).max:
        assert outs is None
        return
    assert outs is not None
    want, tau = linf1_oracle(parts, r)
    eps = torch.finfo(parts[0].dtype).eps
    width = sum(p[0].numel() for p in parts)
    big = torch.stack([p.double().abs().reshape(p.shape[0], -1).amax(1) for p in parts]).amax(0)
    tol = (width / 8 + 16) * eps * (big + tau) + 1e-300
    for p, b, y, w in zip(parts, before, outs, want):
        assert torch.equal(bits(p), bits(b)), "wrote into its input"
        err = (y.double() - w).abs().reshape(p.shape[0], -1).amax(1)
        assert (err <= tol).all(), float((err / tol).max())
    dead = tau == 0  # groups inside the ball die exactly
    for y in outs:
        assert (y.reshape(y.shape[0], -1)[dead] == 0).all()
    linf1_cpu.linf1_rows_cpu(parts, [0] * len(parts), r, out=parts)  # in place: the same bits
    for p, y in zip(parts, outs):
        assert torch.equal(bits(p), bits(y))


@needs_kernel
def test_linf1_routing(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(100, 2, generator=g), torch.randn(100, generator=g)
    assert linf1_cpu.linf1_rows_cpu([w.t()], [0], 0.5) is None  # not contiguous
    assert linf1_cpu.linf1_rows_cpu([w], [1], 0.5) is None  # columns
    assert linf1_cpu.linf1_rows_cpu([w, b.double()], [0, 0], 0.5) is None  # two dtypes
    assert linf1_cpu.linf1_rows_cpu([w], [0], torch.tensor(0.5)) is None  # a tensor radius
    assert linf1_cpu.linf1_rows_cpu([w.bfloat16()], [0], 0.5) is None
    calls: list[int] = []
    real = linf1_cpu.linf1_rows_cpu

    def counted(leaves, dims, r, out=None):
        calls.append(len(leaves))
        return real(leaves, dims, r, out)

    import proxfunc.groups as groups

    monkeypatch.setattr(groups, "linf1_rows_cpu", counted)
    op = pf.linf1(0.005)
    fast = op((w, b), 0.1)
    assert calls == [2]
    with torch.enable_grad():  # the differentiable path (the unrolled fixed point)
        slow = op((w.clone().requires_grad_(), b.clone().requires_grad_()), 0.1)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s.detach(), rtol=1e-6, atol=1e-7)
    wp, bp = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    pg.linf1(wp, bp, reg=0.005, lr=0.1)  # the seed's call, in place
    assert calls == [2, 2]
    assert torch.equal(wp.detach(), fast[0]) and torch.equal(bp.detach(), fast[1])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_linf1_rows_special_groups(dtype):
    nan, inf = float("nan"), float("inf")
    rows = [[1.0, nan, 3.0] + [1.0] * 17, [1.0, inf, 3.0] + [1.0] * 17, [0.0] * 20, [0.04] * 20, [0.1] * 20]
    w = torch.tensor(rows, dtype=dtype)
    (y,) = linf1_cpu.linf1_rows_cpu([w], [0], 1.0)
    assert torch.isnan(y[0]).all()  # a NaN anywhere in the group (here in the vector loop)
    assert torch.equal(y[1], w[1])  # an infinite entry: nothing is clamped
    assert torch.equal(y[2], torch.zeros(20, dtype=dtype))
    assert torch.equal(y[3], torch.zeros(20, dtype=dtype))  # ||x||_1 = 0.8 <= r: the group dies
    torch.testing.assert_close(y[4], torch.full((20,), 0.05, dtype=dtype))  # all equal: (2 - 1) / 20
    (same,) = linf1_cpu.linf1_rows_cpu([w[1:]], [0], 0.0)  # r = 0: the identity
    assert torch.equal(same, w[1:])
    tail = torch.tensor([[2.0, nan]], dtype=dtype)  # a NaN in the scalar tail
    assert torch.isnan(linf1_cpu.linf1_rows_cpu([tail], [0], 1.0)[0]).all()
