"""Projections (prox of an indicator): box, nonneg, simplex, l1_ball, l2_ball, linf_ball.

Properties, each against code independent of proxfunc (tests/oracles.py):
the output is the nearest feasible point found by scipy (SLSQP / L-BFGS-B) and by the
textbook sort-based formulas; it is feasible (``value == 0``) and idempotent; interior points
come back bit for bit; the projection is non-expansive and ignores ``step``; points off the
set have ``value == inf``; low precision agrees with the float64 result rounded; the
per-row form through ``torch.vmap`` (the traceable sort path) agrees with the eager path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import proxfunc as pf
from tests import oracles as O
from tests.conftest import examples
from tests.helpers import pytree

KINDS = ["box", "nonneg", "simplex", "l1_ball", "l2_ball", "linf_ball"]
MODES = st.sampled_from(O.MODES)


def make(kind: str, scale: float, rng: np.random.Generator):
    """(operator, numpy oracle kwargs) with a radius / bounds on the scale of the data."""
    r = float(scale * rng.choice([0.0, 0.1, 0.7, 2.0, 10.0]))
    if kind == "box":
        lo = -float(scale * rng.uniform(0, 2))
        hi = float(scale * rng.uniform(0, 2))
        if rng.random() < 0.2:
            lo = -np.inf
        return pf.box(lo, hi), {"lower": lo, "upper": hi}
    if kind == "nonneg":
        return pf.nonneg(), {}
    if kind == "simplex":
        r = r if r > 0 else scale
        return pf.simplex(r), {"radius": r}
    return getattr(pf, kind)(r), {"radius": r}


def exact(kind: str, x: np.ndarray, kw) -> np.ndarray:
    """Closed-form / sort-based projections written independently (float64)."""
    if kind == "box":
        return np.clip(x, kw["lower"], kw["upper"])
    if kind == "nonneg":
        return np.maximum(x, 0)
    if kind == "simplex":
        return O.proj_simplex_sort(x.ravel(), kw["radius"]).reshape(x.shape) if x.size else x.copy()
    if kind == "l1_ball":
        return O.proj_l1_ball_sort(x, kw["radius"])
    if kind == "l2_ball":
        return O.proj_l2_ball(x, kw["radius"])
    if kind == "linf_ball":
        return O.proj_linf_ball(x, kw["radius"])
    raise ValueError(kind)


def _shape(rng, small):
    nd = int(rng.integers(0, 4))
    return tuple(int(rng.integers(0 if rng.random() < 0.1 else 1, 4 if small else 6)) for _ in range(nd))


def _pair(x: np.ndarray, rng):
    """The same data as a pytree (W, b) when it is 2-d, else a tensor; and a flattener."""
    t = torch.from_numpy(x.copy())
    if x.ndim == 2 and rng.random() < 0.5:
        k = x.shape[1] // 2
        tree = (t[:, :k].contiguous(), t[:, k:].contiguous())

        def flat(out):
            return torch.cat([out[0], out[1]], dim=1).numpy()

        return tree, flat
    return t, lambda out: out.numpy()


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=examples(20))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_projection_is_the_nearest_feasible_point(kind, seed, mode):
    rng = np.random.default_rng(seed)
    scale = float(10.0 ** rng.uniform(-1, 1))
    x = O.make_array(rng, _shape(rng, True), scale, mode)
    if kind == "simplex" and x.size == 0:
        return
    op, kw = make(kind, scale, rng)
    tree, flat = _pair(x, rng)
    out = op(tree, 1.0)
    for o, i in zip(pytree.tree_leaves(out), pytree.tree_leaves(tree)):
        assert o.shape == i.shape
    p = flat(out)
    num = O.num_proj(kind, x, **kw).reshape(x.shape)
    ref = exact(kind, x, kw)
    size = max(np.abs(x).max(initial=0.0), kw.get("radius", 0.0), 1e-300)
    assert np.abs(p - num).max(initial=0.0) <= 1e-6 * size
    assert np.abs(p - ref).max(initial=0.0) <= 1e-12 * size
    # no feasible point is nearer: the scipy point, and feasible perturbations of p
    d = ((p - x) ** 2).sum()
    num_feasible = exact(kind, num, kw)  # scipy's point may violate a constraint by ~1e-9
    assert d <= ((num_feasible - x) ** 2).sum() + 1e-12 * size**2
    for _ in range(5):
        q = exact(kind, p + rng.standard_normal(p.shape) * scale * 0.1, kw)  # some feasible point near p
        assert d <= ((q - x) ** 2).sum() + 1e-12 * size**2


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=examples(30))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES, log_scale=st.sampled_from([-9, -4, 0, 4, 9]))
def test_feasible_idempotent_nonexpansive_and_step_free(kind, seed, mode, log_scale):
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    x = O.make_array(rng, _shape(rng, False), scale, mode)
    if kind == "simplex" and x.size == 0:
        return
    op, kw = make(kind, scale, rng)
    xt = torch.from_numpy(x)
    p = op(xt, 1.0)
    assert p.shape == xt.shape and p.dtype == xt.dtype  # 0-d and empty inputs included
    assert op.value(p) == 0  # feasible
    assert torch.equal(op(xt, 1e-6), p) and torch.equal(op(xt, 1e6), p)  # step is ignored
    pp = op(p, 1.0)
    size = max(np.abs(x).max(initial=0.0), 1e-300)
    assert (pp - p).abs().max().item() <= 4e-16 * size * (x.size + 1) if x.size else True  # idempotent
    if kind in ("box", "nonneg", "linf_ball"):
        assert torch.equal(pp, p)  # exactly, for the entrywise sets
    y = xt + torch.from_numpy(rng.standard_normal(x.shape)) * scale * float(10.0 ** rng.uniform(-6, 1))
    q = op(y, 1.0)
    assert (p - q).norm() <= (xt - y).norm() * (1 + 1e-12) + 4e-16 * size * (x.size + 1) ** 0.5
    # agrees with the independent formula
    assert np.abs(p.numpy() - exact(kind, x, kw)).max(initial=0.0) <= 1e-12 * max(size, kw.get("radius", 0.0))


@pytest.mark.parametrize("kind", ["box", "nonneg", "l1_ball", "l2_ball", "linf_ball"])
@settings(max_examples=examples(30))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES, log_scale=st.sampled_from([-9, 0, 9]))
def test_interior_points_unchanged_bit_for_bit(kind, seed, mode, log_scale):
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    x = O.make_array(rng, _shape(rng, False), scale, mode)
    if kind == "box":
        op = pf.box(-float(np.abs(x).max(initial=0)) * 1.5 - 1, float(np.abs(x).max(initial=0)) * 1.5 + 1)
    elif kind == "nonneg":
        x = np.abs(x)
        op = pf.nonneg()
    elif kind == "l1_ball":
        op = pf.l1_ball(float(np.abs(x).sum()) * (1 + float(rng.choice([1e-12, 0.5]))))
    elif kind == "l2_ball":
        op = pf.l2_ball(float(np.sqrt((x * x).sum())) * (1 + float(rng.choice([1e-12, 0.5]))))
    else:
        op = pf.linf_ball(float(np.abs(x).max(initial=0)) * (1 + float(rng.choice([0.0, 0.5]))))
    xt = torch.from_numpy(x)
    out = op(xt, 1.0)
    assert torch.equal(out, xt)
    assert op.value(xt) == 0


def test_boundary_points():
    x = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert torch.equal(pf.l2_ball(5.0)(x, 1.0), x)
    assert torch.equal(pf.l1_ball(7.0)(x, 1.0), x)
    assert torch.equal(pf.linf_ball(4.0)(x, 1.0), x)
    assert torch.equal(pf.box(-4.0, 3.0)(x, 1.0), x)
    e = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    assert torch.equal(pf.simplex(2.0)(e, 1.0), e)  # a vertex of the simplex
    assert torch.equal(pf.l1_ball(2.0)(-e, 1.0), -e)
    # all equal entries (ties at the threshold)
    z = torch.full((4,), 3.0, dtype=torch.float64)
    assert torch.equal(pf.simplex(2.0)(z, 1.0), torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.equal(pf.l1_ball(2.0)(-z, 1.0), torch.full((4,), -0.5, dtype=torch.float64))
    # radius 0 balls are the origin
    assert torch.equal(pf.l1_ball(0.0)(x, 1.0), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(pf.l2_ball(0.0)(x, 1.0), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(pf.linf_ball(0.0)(x, 1.0), torch.zeros(2, dtype=torch.float64))


def test_value_inf_outside_zero_inside():
    x = torch.tensor([[0.5, -0.5], [0.2, 0.1]], dtype=torch.float64)
    inside = {
        pf.box(-1.0, 1.0): True,
        pf.box(0.0, 1.0): False,
        pf.nonneg(): False,
        pf.simplex(1.0): False,
        pf.simplex(1.3): False,
        pf.l1_ball(1.3): True,
        pf.l1_ball(1.29): False,
        pf.l2_ball(0.76): True,
        pf.l2_ball(0.7): False,
        pf.linf_ball(0.5): True,
        pf.linf_ball(0.49): False,
    }
    for op, ok in inside.items():
        v = op.value(x)
        assert v.dim() == 0
        assert (v == 0) if ok else (v == float("inf")), op
    assert pf.simplex(1.0).value(torch.tensor([0.25, 0.75], dtype=torch.float64)) == 0


def test_box_tensor_bounds_and_infinite_bounds():
    x = torch.tensor([[-3.0, 0.5, 9.0], [2.0, -0.1, 4.0]], dtype=torch.float64)
    lo = torch.tensor([-1.0, 0.0, float("-inf")], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.2, 5.0], dtype=torch.float64)
    out = pf.box(lo, hi)(x, 1.0)
    assert torch.equal(out, torch.from_numpy(np.clip(x.numpy(), lo.numpy(), hi.numpy())))
    assert pf.box(lo, hi).value(out) == 0
    assert torch.equal(pf.box()(x, 1.0), x)
    assert torch.equal(pf.box(upper=0.0)(x, 1.0), x.clamp(max=0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@settings(max_examples=examples(15))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_low_precision_matches_float64_rounded(kind, dtype, seed, mode):
    rng = np.random.default_rng(seed)
    lo, hi = {torch.float32: (-9, 9), torch.float16: (-2, 3), torch.bfloat16: (-9, 9)}[dtype]
    scale = float(10.0 ** rng.uniform(lo, hi))
    x = O.make_array(rng, _shape(rng, False), scale, mode)
    if dtype == torch.float16:
        x = np.clip(x, -6e4, 6e4)  # float16 overflows above 65504
    if kind == "simplex" and x.size == 0:
        return
    op, kw = make(kind, scale, rng)
    xl = torch.from_numpy(x).to(dtype)
    out = op(xl, 1.0)
    ref = op(xl.double(), 1.0)
    assert out.dtype == dtype and out.shape == xl.shape
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    size = max(float(xl.double().abs().max()) if x.size else 0.0, kw.get("radius", 0.0))
    err = (out.double() - ref.to(dtype).double()).abs()
    assert (err <= eps * ref.abs() + 16 * eps32 * size * (1 + x.size) ** 0.5).all(), err.max()
    assert op.value(out) == 0  # feasible in its own dtype


@pytest.mark.parametrize("kind", ["simplex", "l1_ball", "l2_ball"])
def test_vmap_rows_equal_eager_rows(kind):
    """Per-row projection by vmap (traceable sort path) == eager row by row (sort-free) == oracle."""
    rng = np.random.default_rng(3)
    X = O.make_array(rng, (7, 5), 1.0, "ties")
    X[2] = 0.0
    op = getattr(pf, kind)(1.0)
    Xt = torch.from_numpy(X)
    rows = torch.vmap(lambda r: op(r, 1.0))(Xt)
    eager = torch.stack([op(r, 1.0) for r in Xt])
    ref = np.stack([exact(kind, r, {"radius": 1.0}) for r in X])
    assert torch.allclose(rows, eager, atol=1e-15, rtol=0)
    assert np.abs(rows.numpy() - ref).max() <= 1e-15


def test_moreau_between_balls_and_their_support_functions():
    """x = P_C(x) + prox_{sigma_C}(x, 1): l1_ball <-> linf, l2_ball <-> l2, linf_ball <-> l1."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = torch.from_numpy(O.make_array(rng, (4, 3), 1.0, str(rng.choice(O.MODES))))
        r = float(rng.uniform(0, 3))
        for ball, support in ((pf.l1_ball, pf.linf), (pf.l2_ball, pf.l2), (pf.linf_ball, pf.l1)):
            s = ball(r)(x, 1.0) + support(r)(x, 1.0)
            assert torch.allclose(s, x, atol=1e-14 * float(x.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_tiny_radius_far_point_is_feasible(dtype):
    """radius << |x|: the sum of P(x) is the radius to rounding of the radius, not of |x|
    (float32 simplex(1e-10)(5.0) is feasible and accurate, not 0)."""
    x = torch.tensor([5.0, -3.0], dtype=dtype)
    for r in (1e-10, 1e-6):
        p = pf.simplex(r)(x, 1.0)
        assert pf.simplex(r).value(p) == 0
        assert torch.allclose(p.double(), torch.tensor([r, 0.0], dtype=torch.float64), rtol=1e-2, atol=0)
        q = pf.l1_ball(r)(-x, 1.0)
        assert pf.l1_ball(r).value(q) == 0
        assert torch.allclose(q.double(), torch.tensor([-r, 0.0], dtype=torch.float64), rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_projection_is_feasible_by_its_own_value(dtype):
    """Regression: value() used the float32 tolerance for half leaves, so a projection rounded
    to float16/bfloat16 was reported infeasible (inf)."""
    torch.manual_seed(0)
    for n in (3, 17, 29):
        x = (torch.randn(n) * 3).to(dtype)
        for op in (pf.simplex(1.0), pf.l1_ball(1.0), pf.l2_ball(1.0)):
            p = op(x, 1.0)
            assert op.value(p) == 0, op
            assert op.value(op(p, 1.0)) == 0, op


@pytest.mark.parametrize("kind", KINDS)
def test_zero_d_and_one_element_inputs_keep_their_shape(kind):
    """Regression: simplex / l1_ball returned shape (1,) for a 0-d tensor."""
    for x in (torch.tensor(2.0, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)):
        op, kw = make(kind, 1.0, np.random.default_rng(0))
        out = op(x, 1.0)
        assert out.shape == x.shape
        assert np.abs(out.numpy() - exact(kind, x.numpy(), kw)).max() <= 1e-15
        assert torch.vmap(lambda r, op=op: op(r, 1.0))(x.reshape(1, *x.shape)).shape == (1, *x.shape)


@pytest.mark.parametrize("kind", ["simplex", "l1_ball", "l2_ball", "linf_ball", "box"])
def test_grad_through_projection_finite_and_matches_finite_differences(kind):
    """torch.func.grad w.r.t. the input and a tensor radius/bound: finite at 0, equal to
    central differences at a generic point."""
    torch.manual_seed(0)
    w = torch.randn(6, dtype=torch.float64)

    def make_op(r):
        return pf.box(-r, r) if kind == "box" else getattr(pf, kind)(r)

    def f(x, r):
        return (make_op(r)(x, 1.0) * w).sum()

    r0 = torch.tensor(0.8, dtype=torch.float64)
    for x in (torch.zeros(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)):
        gx, gr = torch.func.grad(f, argnums=(0, 1))(x, r0)
        assert torch.isfinite(gx).all() and torch.isfinite(gr)
    x = torch.randn(6, dtype=torch.float64) * 2
    gx, gr = torch.func.grad(f, argnums=(0, 1))(x, r0)
    h = 1e-6
    assert torch.allclose(gr, (f(x, r0 + h) - f(x, r0 - h)) / (2 * h), atol=1e-6)
    for j in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[j] = h
        assert torch.allclose(gx[j], (f(x + e, r0) - f(x - e, r0)) / (2 * h), atol=1e-6)


def test_tied_maxima_with_tiny_or_zero_radius():
    """Regression (found by the thorough profile): with tied maxima, rounding can put the
    threshold a hair above the maximum. simplex/l1_ball with radius << eps*max|x| then
    returned 0 (infeasible for the simplex); l1_ball(0) must be 0 and stay feasible."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = float(rng.uniform(0.1, 1))
        x = torch.tensor([a, a, a, a / 2], dtype=torch.float64)
        for r in (1e-300, 1e-17, 1e-3):
            p = pf.simplex(r)(x, 1.0)
            assert pf.simplex(r).value(p) == 0 and p[3] == 0
            assert torch.allclose(p[:3], torch.full((3,), r / 3, dtype=torch.float64), rtol=1e-12, atol=0)
            q = pf.l1_ball(r)(-x, 1.0)
            assert pf.l1_ball(r).value(q) == 0 and torch.allclose(q, -p, rtol=1e-12, atol=0)
        assert torch.equal(pf.l1_ball(0.0)(x, 1.0), torch.zeros(4, dtype=torch.float64))


@settings(max_examples=examples(40), deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.sampled_from([-9, -3, 0, 3, 9]),
    log_radius=st.sampled_from([-30, -8, -1, 0, 2, 5]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    leaves=st.integers(1, 3),
    ties=st.booleans(),
)
def test_eager_in_place_path_equals_the_differentiable_path_bit_for_bit(
    seed, log_scale, log_radius, dtype, leaves, ties
):
    """l1_ball and simplex write their eager, no-grad result into fresh buffers; it must be the
    differentiable path's result exactly (same operations, same order), zeros and all."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for i in range(leaves):
        x = torch.randn(3 + 5 * i, 4, generator=g, dtype=torch.float64) * 10.0**log_scale
        if ties:
            x = x.sign() * x.abs().round().clamp_max(2) * 10.0**log_scale
        x[0] = 0.0
        xs.append(x.to(dtype))
    assume(all(torch.isfinite(x).all() for x in xs))  # float16 overflows at 1e9
    r = 10.0**log_radius
    for op in (pf.l1_ball(r), pf.simplex(r)):
        fast = op(xs, 1.0)
        slow = op([x.clone().requires_grad_() for x in xs], 1.0)
        for a, b, x in zip(fast, slow, xs):
            assert a.dtype == x.dtype and not a.requires_grad
            assert torch.equal(a, b.detach()), (op, dtype)
            assert a.data_ptr() != x.data_ptr()  # a new tensor, also inside the ball
