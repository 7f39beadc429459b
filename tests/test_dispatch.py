"""Every implementation equals the reference: operator x implementation x layout x dtype x step
type x (functional, in place) x thread count, with the branch actually taken pinned, and a
planted 0.1% error in each fast branch caught by the same comparison.

The reference (pure torch ops) is what ``proxfunc.dispatch.implementation("reference")``
forces; ``"aten"`` and ``"auto"`` (which adds the hand-written kernels) must give the same
values: bit for bit where the arithmetic is the same (l1), and within a few units in the last
place where only the summation order of a norm or threshold differs.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import proxfunc as pf
from proxfunc import dispatch, groups, norms, projections, sets, smooth
from proxfunc.compat import apply_
from proxfunc.kernels.cpu import linf1 as linf1_cpu
from proxfunc.kernels.cpu import soft_threshold as soft_cpu

OPS = {
    "l1": lambda: pf.l1(0.3),
    "l21": lambda: pf.l21(0.3),
    "linf1": lambda: pf.linf1(0.3),
    "linf": lambda: pf.linf(0.3),
    "l1_ball": lambda: pf.l1_ball(3.0),
    "simplex": lambda: pf.simplex(3.0),
    "sum_largest": lambda: pf.sum_largest(3, 0.5),  # the knapsack multiplier: bisection vs sort
    "box_hyperplane": lambda: pf.box_hyperplane(-0.5, 0.7, 1.0),
}
KNAPSACK = ("sum_largest", "box_hyperplane")
GROUPED = ("l21", "linf1")  # layouts with a partition give these per-tensor groups


def _rand(shape, seed, dtype):
    """Entries on scales from 1e-3 to 10 (rows scaled differently, so some groups die and
    some survive), with exact zeros and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if x.dim() >= 1 and x.shape[0] > 1:
        x = x * torch.logspace(-3, 1, x.shape[0], dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[::7] = 0.0
        n = flat[2::11].numel()  # ties: entries equal to their neighbour
        flat[1::11][:n] = flat[2::11]
    return x.to(dtype)


def _layout(name, dtype):
    """``(target, wrap)``: a pytree of tensors and how the operator is applied to it (a
    partition for model-shaped layouts)."""
    if name == "contiguous":
        return _rand((37, 29), 0, dtype), None
    if name == "transposed":
        return _rand((29, 37), 1, dtype).T, None
    if name == "weight_bias":
        return (_rand((40, 30), 2, dtype), _rand((40,), 3, dtype)), None
    if name == "model":  # an MLP's named parameters: (weight, bias) neurons and a pattern rule
        p = {
            "0.weight": _rand((32, 16), 4, dtype),
            "0.bias": _rand((32,), 5, dtype),
            "2.weight": _rand((24, 32), 6, dtype),
            "2.bias": _rand((24,), 7, dtype),
            "4.weight": _rand((8, 24), 8, dtype),
        }
        return p, lambda op: pf.partition({("0.weight", "0.bias"): op, "2.*": op, "4.weight": op})
    if name.startswith("mixed"):  # one tensor above 2**17 entries (_MIXED_NUMEL), the others far below
        p = {"big": _rand((400, 400), 9, dtype), "a": _rand((16, 8), 10, dtype), "b": _rand((64, 32), 11, dtype)}
        return p, lambda op: pf.partition({"*": op})
    if name == "empty_groups":
        return (torch.empty(5, 0, dtype=dtype), _rand((5,), 12, dtype)), None
    raise AssertionError(name)


_MIXED_NUMEL = 400 * 400
LAYOUTS = ("contiguous", "transposed", "weight_bias", "model", "mixed-1thread", "mixed-2threads", "empty_groups")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
STEPS = ("float", "tensor")


@contextlib.contextmanager
def _threads(layout):
    """One torch thread, or two for the ``*-2threads`` layouts, where the mixed layout's
    calls are above both kernels' ``PARALLEL_NUMEL`` (checked here): they run split over the
    threads. The soft-threshold kernel takes calls of any size here (its ``min_numel``, where
    ATen is faster, would leave the small layouts to ATen: ``test_small_l1_calls_take_aten``)."""
    assert _MIXED_NUMEL > max(soft_cpu.PARALLEL_NUMEL, linf1_cpu.PARALLEL_NUMEL)
    n = torch.get_num_threads()
    two = layout.endswith("2threads")
    torch.set_num_threads(2 if two else 1)
    mp = pytest.MonkeyPatch()
    mp.setitem(norms._SOFT_KERNELS, "cpu", dataclasses.replace(soft_cpu.SPEC, min_numel=0))
    try:
        yield
    finally:
        mp.undo()
        torch.set_num_threads(n)


def _apply(op_name, layout, dtype, step_kind, impl, in_place, taken=None):
    op = OPS[op_name]()
    target, wrap = _layout(layout, dtype)
    if wrap is not None:
        op = wrap(op)
    step = 0.5 if step_kind == "float" else torch.tensor(0.5)
    with _threads(layout), dispatch.implementation(impl), _spy(taken):
        if in_place:
            apply_(op, target, step)
            return target
        return op(target, step)


@contextlib.contextmanager
def _spy(taken):
    """Record every implementation :func:`dispatch.select` chooses (into the list ``taken``)."""
    if taken is None:
        yield
        return
    real = dispatch.select

    def spy(*a, **k):
        c = real(*a, **k)
        taken.append(c.impl)
        return c

    mp = pytest.MonkeyPatch()
    mp.setattr(dispatch, "select", spy)
    try:
        yield
    finally:
        mp.undo()


def _tol(dtype, op_name):
    if op_name == "l1":  # the same arithmetic in every implementation
        return 0.0, 0.0
    if dtype == torch.bfloat16:  # float32 inside, rounded once: at most one ulp of bf16 apart
        return 2.0**-7, 1e-30
    eps = torch.finfo(dtype).eps
    if op_name in KNAPSACK:  # the multiplier by bisection + exact finish vs by sorting: an
        return 64 * eps, 1024 * eps  # absolute error of a few ulps of the entries (up to ~40)
    return 64 * eps, 64 * eps * 1e-3  # orders of summation; far below a 0.1% error


def _leaves(tree):
    return pf._tree.tree_leaves(tree)


def check(got, want, dtype, op_name):
    rtol, atol = _tol(dtype, op_name)
    for g, w in zip(_leaves(got), _leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, equal_nan=True)


def _reference(op_name, layout, dtype, step_kind):
    return _apply(op_name, layout, dtype, step_kind, "reference", in_place=False)


def _applies(op_name, layout):
    """Whole-object operators (one threshold over every leaf) take the single-tensor and
    (weight, bias) layouts; the separable and grouped ones every layout."""
    if op_name in GROUPED + ("l1",):
        return True
    return layout in ("contiguous", "transposed", "weight_bias")


CASES = [
    (op_name, impl, layout)
    for op_name in OPS
    for impl in ("auto", "aten")
    for layout in LAYOUTS
    if _applies(op_name, layout)
]


@pytest.mark.parametrize("mode", ["functional", "in_place"])
@pytest.mark.parametrize("step_kind", STEPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("op_name", "impl", "layout"), CASES)
def test_every_implementation_equals_the_reference(op_name, impl, layout, dtype, step_kind, mode):
    want = _reference(op_name, layout, dtype, step_kind)
    taken: list[str] = []
    got = _apply(op_name, layout, dtype, step_kind, impl, mode == "in_place", taken)
    check(got, want, dtype, op_name)
    fast = {"aten", "kernel"} & set(taken)
    if impl == "aten":
        assert "kernel" not in taken
    eligible = dtype != torch.bfloat16 or mode == "functional"
    if mode == "in_place" and layout == "transposed":
        eligible = False  # not contiguous: computed, then copied
    if eligible and layout != "empty_groups":
        assert fast, f"no fast implementation was taken: {taken}"
    # the hand-written kernels take linf1's row groups and l1's tensors (contiguous
    # float32/float64 on the CPU)
    if impl == "auto" and dtype != torch.bfloat16 and layout != "transposed":
        if op_name == "l1" or (op_name == "linf1" and layout != "empty_groups"):
            assert "kernel" in taken, taken


@pytest.mark.parametrize("op_name", list(OPS))
def test_reference_takes_no_fast_path(op_name):
    taken: list[str] = []
    _apply(op_name, "weight_bias", torch.float32, "float", "reference", False, taken)
    _apply(op_name, "weight_bias", torch.float32, "float", "reference", True, taken)
    assert taken and set(taken) == {"reference"}


@pytest.mark.parametrize("op_name", list(OPS))
def test_tensor_step_takes_the_float_steps_path(op_name):
    for layout in ("contiguous", "weight_bias"):
        a: list[str] = []
        b: list[str] = []
        _apply(op_name, layout, torch.float32, "float", "auto", False, a)
        _apply(op_name, layout, torch.float32, "tensor", "auto", False, b)
        assert a == b and "reference" not in a


def test_select_conditions():
    x = torch.randn(6, 4)
    spec = linf1_cpu.SPEC
    assert dispatch.select([x], 0.1).impl == "aten"
    assert dispatch.select([x], 0.1, kernel=spec, dims=[0]).impl == ("kernel" if spec.available() else "aten")
    assert dispatch.select([x], 0.1, kernel=spec, dims=[1]).impl == "aten"  # column groups
    assert dispatch.select([x.T.contiguous().T], 0.1, kernel=spec, dims=[0]).impl == "aten"
    assert dispatch.select([x], -0.1).impl == "reference"
    assert dispatch.select([x], torch.tensor(0.1)).t == pytest.approx(0.1)
    w = torch.randn(3, requires_grad=True)
    assert dispatch.select([w], 0.1).impl == "reference"
    with torch.no_grad():
        assert dispatch.select([w], 0.1).impl == "aten"
    assert dispatch.select([x], torch.tensor(0.1, requires_grad=True)).impl == "reference"
    assert dispatch.select([x.to("meta")], 0.1).impl == "reference"
    assert dispatch.select([x.to_sparse()], 0.1).impl == "reference"
    assert dispatch.select([x.t()], 0.1, in_place=True).impl == "reference"  # not contiguous
    assert dispatch.select([x.bfloat16()], 0.1, in_place=True).impl == "reference"
    assert dispatch.select([x, x.double()], 0.1, in_place=True).impl == "reference"  # two dtypes
    assert dispatch.select([torch.empty(5, 0)], 0.1, kernel=spec, dims=[0]).impl == "aten"
    assert dispatch.select([torch.empty(0, 5)], 0.1, kernel=spec, dims=[0]).impl == "aten"
    entries = dataclasses.replace(soft_cpu.SPEC, min_numel=0)  # contiguous tensors of one dtype
    kernel = "kernel" if entries.available() else "aten"
    assert dispatch.select([x, x[0], torch.empty(0)], 0.1, kernel=entries).impl == kernel
    assert dispatch.select([x, x[0]], 0.1, kernel=entries, in_place=True).impl == kernel
    assert dispatch.select([x, x.t()], 0.1, kernel=entries).impl == "aten"  # not contiguous
    assert dispatch.select([x, x.double()], 0.1, kernel=entries).impl == "aten"  # two dtypes
    assert dispatch.select([x.bfloat16()], 0.1, kernel=entries).impl == "aten"
    with dispatch.implementation("aten"):
        assert dispatch.select([x], 0.1, kernel=spec, dims=[0]).impl == "aten"
        with dispatch.implementation("reference"):
            assert dispatch.select([x], 0.1).impl == "reference"
        assert dispatch.current() == "aten"
    assert dispatch.current() == "auto"
    with pytest.raises(ValueError, match="impl must be one of"):
        with dispatch.implementation("fast"):
            pass

    class Sub(torch.Tensor):
        pass

    assert dispatch.select([x.as_subclass(Sub)], 0.1).impl == "reference"
    out = torch.func.vmap(lambda v: torch.tensor(0.0) if dispatch.select([v], 0.1).impl == "reference" else v)(x)
    assert out.shape == (6,)


def test_small_l1_calls_take_aten():
    """Below ``min_numel`` entries in all, l1 takes ATen's ``softshrink`` (a few of its calls
    cost less than the kernel's fixed cost); from there on the kernel."""
    spec = soft_cpu.SPEC
    if not spec.available():
        pytest.skip(f"the C kernel is not available: {soft_cpu._cc.why(spec.name)}")
    small = [torch.randn(100, 2), torch.randn(100)]
    large = [torch.randn(spec.min_numel // 2), torch.randn(spec.min_numel - spec.min_numel // 2)]
    for leaves in (small, large):
        for in_place in (False, True):
            want = "kernel" if leaves is large else "aten"
            assert dispatch.select(leaves, 0.1, kernel=spec, in_place=in_place).impl == want
    taken: list[str] = []
    with _spy(taken):
        pf.l1(0.1)(small, 0.5)
        pf.l1(0.1)(large, 0.5)
    assert taken == ["aten", "kernel"]


def test_empty_groups_do_not_crash():
    for op in (pf.l21(0.1), pf.linf1(0.1), pf.l1(0.1)):
        for x in (torch.empty(5, 0), torch.empty(0, 5)):
            assert op(x, 0.1).shape == x.shape
            apply_(op, x, 0.1)


# ------------------------------------------------------------- planted errors are caught
def _threshold_scaled(fn):
    def wrapped(parts, radius, *, traceable, absolute=False):
        tau = fn(parts, radius, traceable=traceable, absolute=absolute)
        return tau if traceable else tau * 1.001

    return wrapped


def _knapsack_scaled(fn):
    """The multiplier off by 0.1% (of 1 + |lam|) on its eager (bisection) branch only."""

    def wrapped(*args, **kwargs):
        lam = fn(*args, **kwargs)
        return lam if dispatch.current() == "reference" else lam + 1e-3 * (1 + lam.abs())

    return wrapped


PLANTS = [  # (operator, layout, implementation, object, attribute, replacement factory)
    ("l1", "model", "aten", norms, "_soft_threshold_aten", lambda fn: lambda xs, t, out: fn(xs, t * 1.001, out)),
    (
        "l1",
        "mixed-2threads",
        "aten",
        norms,
        "_soft_threshold_aten",
        lambda fn: lambda xs, t, out: fn(xs, t * 1.001, out),
    ),
    ("l21", "weight_bias", "aten", groups, "block_scale_", lambda fn: lambda n, t: fn(n, t * 1.001)),
    ("l21", "model", "aten", groups, "block_scale_", lambda fn: lambda n, t: fn(n, t * 1.001)),
    ("linf1", "model", "aten", groups, "threshold", _threshold_scaled),
    ("l1", "model", "auto", soft_cpu, "run", lambda fn: lambda xs, t, out=None: fn(xs, t * 1.001, out)),
    ("l1", "mixed-2threads", "auto", soft_cpu, "run", lambda fn: lambda xs, t, out=None: fn(xs, t * 1.001, out)),
    ("linf1", "weight_bias", "auto", linf1_cpu, "run", lambda fn: lambda xs, r, out=None: fn(xs, r * 1.001, out)),
    ("linf1", "mixed-2threads", "auto", linf1_cpu, "run", lambda fn: lambda xs, r, out=None: fn(xs, r * 1.001, out)),
    ("linf", "contiguous", "aten", norms, "threshold", _threshold_scaled),
    ("l1_ball", "contiguous", "aten", projections, "_l1_ball_eager", lambda fn: lambda xs, r: fn(xs, r * 1.001)),
    ("sum_largest", "contiguous", "aten", smooth, "knapsack_lambda", _knapsack_scaled),
    ("box_hyperplane", "contiguous", "aten", sets, "knapsack_lambda", _knapsack_scaled),
    # simplex's polish corrects a threshold error exactly: the plant is in its eager (in-place) polish
    (
        "simplex",
        "contiguous",
        "aten",
        projections,
        "_polish_sum",
        lambda fn: lambda d, r, in_place=False: fn(d, r * 1.001 if in_place else r, in_place),
    ),
]


@pytest.mark.parametrize("mode", ["functional", "in_place"])
@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: f"{p[0]}-{p[1]}-{p[4]}")
def test_a_planted_error_in_each_fast_branch_is_caught(plant, mode, monkeypatch):
    op_name, layout, impl, obj, attr, make = plant
    if impl == "auto" and not obj.available():
        pytest.skip(f"the C kernel is not available: {obj.SPEC.name}: {obj._cc.why(obj.SPEC.name)}")
    dtype = torch.float32
    want = _reference(op_name, layout, dtype, "float")
    monkeypatch.setattr(obj, attr, make(getattr(obj, attr)))
    got = _apply(op_name, layout, dtype, "float", impl, mode == "in_place")
    with pytest.raises(AssertionError):
        check(got, want, dtype, op_name)


def test_a_threshold_beyond_the_dtype_takes_the_reference():
    """``reg * step`` above float32's largest value on float32 tensors: ATen's kernels refuse
    such a threshold, so ``select`` takes the reference, which gives the float64 answer (every
    finite group inside the ball), also in place next to a rule that writes in place."""
    x = torch.randn(6, 4)
    assert dispatch.select([x], 1e39).impl == "reference"
    assert dispatch.select([x.double()], 1e39).impl == "aten"
    for op in (pf.l1(1e39), pf.l21(1e39), pf.linf1(1e39), pf.linf(1e39), pf.l1_ball(1e39)):
        want = op(x.double(), 1.0)
        for impl in ("auto", "aten", "reference"):
            with dispatch.implementation(impl):
                got = op(x, 1.0)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    a, b = torch.randn(5), torch.randn(3, 2)
    a0 = a.clone()
    apply_(pf.partition({"a": pf.l1(1e-3), "b": pf.linf1(1e39)}), {"a": a, "b": b}, 1.0)
    assert torch.equal(a, pf.l1(1e-3)(a0, 1.0)) and not b.any()
