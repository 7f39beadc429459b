"""Projections of the catalog: exact against an independent scipy solution, feasible, idempotent.

Oracle: ``scipy.optimize.minimize`` (SLSQP) on ``1/2 ||z - x||^2`` with the set written as
smooth constraints; for non-convex sets every convex piece (orthant / support) is solved and
the best kept. Properties with hypothesis: feasibility, idempotence, non-expansiveness (convex
sets), the obtuse-angle characterisation ``<x - P(x), y - P(x)> <= 0`` for points ``y`` of the
set, scales 1e-9..1e9 and float32/bfloat16 against float64.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import proxfunc as pf
from tests.helpers import rng, t64

SET = settings(max_examples=30, deadline=None)
D = torch.float64


def slsqp(x, cons, bounds=None, x0=None):
    x = np.asarray(x, dtype=np.float64)
    res = minimize(
        lambda z: 0.5 * np.sum((z - x) ** 2),
        x if x0 is None else x0,
        jac=lambda z: z - x,
        constraints=cons,
        bounds=bounds,
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return res.x


SEEDS = range(8)


# ------------------------------------------------------------------------ oracle agreement
@pytest.mark.parametrize("seed", SEEDS)
def test_hyperplane_halfspace_vs_scipy(seed):
    r = rng(seed)
    x, a, b = r.normal(size=7), r.normal(size=7), r.normal()
    z = slsqp(x, [{"type": "eq", "fun": lambda z: a @ z - b, "jac": lambda z: a}])
    assert np.allclose(pf.hyperplane(t64(a), b)(t64(x)).numpy(), z, atol=1e-6)
    z = slsqp(x, [{"type": "ineq", "fun": lambda z: b - a @ z, "jac": lambda z: -a}])
    assert np.allclose(pf.halfspace(t64(a), b)(t64(x)).numpy(), z, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_affine_vs_scipy_including_rank_deficient(seed):
    r = rng(seed)
    A = r.normal(size=(3, 7))
    if seed % 2:
        A = np.vstack([A, A[0] + 2 * A[1]])  # rank deficient, still consistent
    b = A @ r.normal(size=7)
    x = r.normal(size=7) * 3
    A3, b3 = A[:3], b[:3]  # the oracle gets independent rows (SLSQP needs them)
    z = slsqp(x, [{"type": "eq", "fun": lambda z: A3 @ z - b3, "jac": lambda z: A3}])
    got = pf.affine(t64(A), t64(b))(t64(x)).numpy()
    assert np.allclose(got, z, atol=1e-6)
    assert np.allclose(A @ got, b, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_soc_vs_scipy(seed):
    r = rng(seed)
    x = r.normal(size=6)
    x[-1] = r.choice([-3.0, -0.5, 0.5, 3.0]) * np.linalg.norm(x[:-1])
    cons = [
        {"type": "ineq", "fun": lambda z: z[-1] ** 2 - z[:-1] @ z[:-1]},
        {"type": "ineq", "fun": lambda z: z[-1]},
    ]
    z = slsqp(x, cons, x0=np.r_[np.zeros(5), 1.0])
    got = pf.soc()((t64(x[:-1]), t64(x[-1:])))
    assert np.allclose(torch.cat(got).numpy(), z, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_psd_vs_factorised_scipy(seed):
    """Independent: minimise ||L L^T - X||_F^2 over full L (no spurious local minima)."""
    r = rng(seed)
    n = 3
    X = r.normal(size=(n, n))
    res = minimize(
        lambda v: np.sum((v.reshape(n, n) @ v.reshape(n, n).T - X) ** 2),
        r.normal(size=n * n),
        method="BFGS",
        options={"gtol": 1e-12, "maxiter": 5000},
    )
    L = res.x.reshape(n, n)
    Z = L @ L.T
    got = pf.psd()(t64(X)).numpy()
    assert np.allclose(got, Z, atol=1e-6)
    assert np.linalg.eigvalsh(got).min() >= -1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_l2_sphere_vs_scipy(seed):
    r = rng(seed)
    x, rad = r.normal(size=5), 1.7
    cons = [{"type": "eq", "fun": lambda z: z @ z - rad**2, "jac": lambda z: 2 * z}]
    z = slsqp(x, cons, x0=r.normal(size=5))
    if np.sum((z - x) ** 2) > np.sum((-z - x) ** 2):  # escape the antipodal stationary point
        z = slsqp(x, cons, x0=-z)
    assert np.allclose(pf.l2_sphere(rad)(t64(x)).numpy(), z, atol=1e-6)


def l1_sphere_oracle(x, rad):
    best, bz = np.inf, None
    for s in itertools.product([-1.0, 1.0], repeat=len(x)):
        s = np.array(s)
        z = slsqp(
            x,
            [
                {"type": "eq", "fun": lambda z, s=s: s @ z - rad, "jac": lambda z, s=s: s},
                {"type": "ineq", "fun": lambda z, s=s: s * z, "jac": lambda z, s=s: np.diag(s)},
            ],
            x0=s * rad / len(x),
        )
        d = np.sum((z - x) ** 2)
        if d < best - 1e-12:
            best, bz = d, z
    return best, bz


@pytest.mark.parametrize("seed", range(6))
def test_l1_sphere_vs_orthant_enumeration(seed):
    r = rng(seed)
    x = r.normal(size=5) * (0.2 if seed % 2 else 2.0)  # inside and outside the ball
    rad = 2.0
    best, bz = l1_sphere_oracle(x, rad)
    got = pf.l1_sphere(rad)(t64(x)).numpy()
    assert abs(np.abs(got).sum() - rad) < 1e-12
    assert np.sum((got - x) ** 2) <= best + 1e-9
    assert np.allclose(got, bz, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_box_hyperplane_vs_scipy(seed):
    r = rng(seed)
    n = 8
    x = r.normal(size=n) * 2
    lo, hi = -0.3 - r.random(n), 0.2 + r.random(n)
    a = 0.5 + r.random(n) if seed % 2 else np.ones(n)
    b = float(a @ (lo + (hi - lo) * r.random()))
    z = slsqp(x, [{"type": "eq", "fun": lambda z: a @ z - b, "jac": lambda z: a}], bounds=list(zip(lo, hi)))
    op = pf.box_hyperplane(t64(lo), t64(hi), b, a=None if seed % 2 == 0 else t64(a))
    got = op(t64(x)).numpy()
    assert np.allclose(got, z, atol=1e-6)
    assert abs(a @ got - b) < 1e-10 and (got >= lo).all() and (got <= hi).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_k_sparse_vs_all_supports(seed):
    r = rng(seed)
    x = np.round(r.normal(size=7), 1)  # rounding creates ties
    k = 3
    best = min(np.sum(np.delete(x, list(S)) ** 2) for S in itertools.combinations(range(7), k))
    got = pf.k_sparse(k)(t64(x)).numpy()
    assert np.count_nonzero(got) <= k
    assert np.isclose(np.sum((got - x) ** 2), best, atol=1e-12)
    assert set(got[got != 0]) <= set(x)


def test_k_sparse_ties_keep_first():
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5], dtype=D)
    assert pf.k_sparse(2)(x).tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]
    assert pf.k_sparse(0)(x).abs().sum() == 0


# ------------------------------------------------------------------------ properties
def _ops(n, seed=0):
    r = rng(100 + seed)
    a = t64(r.normal(size=n))
    A = t64(r.normal(size=(2, n)))
    return {
        "hyperplane": pf.hyperplane(a, 0.7),
        "halfspace": pf.halfspace(a, -0.2),
        "affine": pf.affine(A, A @ t64(r.normal(size=n))),
        "soc": pf.soc(),
        "box_hyperplane": pf.box_hyperplane(-1.0, 1.5, 0.3),
        "l2_ball_ref": pf.l2_ball(1.0),  # sanity for the harness itself
    }


CONVEX_NAMES = ["hyperplane", "halfspace", "affine", "soc", "box_hyperplane"]
vecs = st.lists(st.floats(-5, 5, allow_nan=False), min_size=6, max_size=6).map(lambda v: t64(v))
scales = st.sampled_from([1e-9, 1e-3, 1.0, 1e3, 1e9])


@SET
@given(x=vecs, y=vecs, s=scales, name=st.sampled_from(CONVEX_NAMES))
def test_convex_sets_feasible_idempotent_nonexpansive_obtuse(x, y, s, name):
    op = _ops(6)[name]
    if name in ("hyperplane", "halfspace", "affine", "box_hyperplane"):
        s = 1.0 if name == "box_hyperplane" else s  # fixed sets are not scale invariant
    px, py = op(x * s, 1.0), op(y * s, 0.3)
    assert op.value(px) == 0 and op.value(py) == 0
    assert torch.allclose(op(px, 2.0), px, rtol=1e-10, atol=1e-12 * (1 + px.abs().max()))
    assert (px - py).norm() <= (x * s - y * s).norm() * (1 + 1e-9) + 1e-12
    # obtuse angle: <x - Px, y' - Px> <= 0 for y' = Py in the set
    size = (x * s).norm() + px.norm() + py.norm() + 1  # rounding of px, py is relative to this
    assert torch.dot(x * s - px, py - px) <= 1e-10 * size * ((x * s - px).norm() + 1)


@SET
@given(X=st.lists(st.floats(-3, 3), min_size=9, max_size=9), s=scales)
def test_psd_properties(X, s):
    X = t64(X).reshape(3, 3) * s
    op = pf.psd()
    P = op(X)
    assert op.value(P) == 0
    assert torch.allclose(op(P), P, rtol=1e-9, atol=1e-12 * s)
    # Moreau decomposition with the polar cone (negative semidefinite), written independently.
    S = 0.5 * (X + X.T)
    w, Q = np.linalg.eigh(S.numpy())
    N = (Q * np.minimum(w, 0)) @ Q.T
    assert np.allclose(P.numpy() + N, S.numpy(), atol=1e-10 * s)


@SET
@given(x=vecs, s=scales, rad=st.sampled_from([0.0, 0.5, 3.0]))
def test_spheres_on_sphere_and_idempotent(x, s, rad):
    x = x * s
    rad = rad * s
    for op, norm in ((pf.l2_sphere(rad), lambda z: z.norm()), (pf.l1_sphere(rad), lambda z: z.abs().sum())):
        z = op(x)
        assert abs(float(norm(z)) - rad) <= 1e-12 * (rad + float(norm(x))) + 1e-300
        assert op.value(z) == 0
        assert torch.allclose(op(z), z, rtol=1e-12, atol=1e-14 * rad)


def test_sphere_ties_and_zero():
    z = pf.l2_sphere(2.0)(torch.zeros(3, dtype=D))
    assert z.tolist() == [2.0, 0.0, 0.0]
    z = pf.l1_sphere(3.0)(torch.zeros(3, dtype=D))
    assert z.tolist() == [1.0, 1.0, 1.0]
    z = pf.l1_sphere(3.0)(torch.tensor([-1.0, 0.0, 0.0], dtype=D))
    assert torch.allclose(z, torch.tensor([-5 / 3, 2 / 3, 2 / 3], dtype=D))


def test_inside_points_unchanged_bit_for_bit():
    x = torch.tensor([0.1, -0.2, 0.3, 2.0], dtype=D)
    assert torch.equal(pf.halfspace(torch.ones(4, dtype=D), 5.0)(x), x)
    assert torch.equal(pf.soc()(x), x)
    assert torch.equal(pf.soc()(torch.tensor([0.1, -0.2, 0.3, -2.0], dtype=D)), torch.zeros(4, dtype=D))


def test_pytree_whole_object():
    W, b = torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)
    a = torch.randn(9, dtype=D)
    W2, b2 = pf.hyperplane(a, 1.0)((W, b))
    assert torch.allclose(torch.dot(a, torch.cat([W2.reshape(-1), b2])), torch.tensor(1.0, dtype=D))
    out = pf.box_hyperplane(0.0, 1.0, 2.0)({"w": W, "b": b})
    assert torch.allclose(out["w"].sum() + out["b"].sum(), torch.tensor(2.0, dtype=D))
    out = pf.psd()({"a": torch.randn(4, 3, 3, dtype=D), "b": None})
    assert out["b"] is None and torch.linalg.eigvalsh(out["a"]).min() > -1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_float64(dtype):
    r = rng(5)
    x64 = t64(r.normal(size=8))
    ops = [
        pf.hyperplane(t64(r.normal(size=8)), 0.3),
        pf.halfspace(t64(r.normal(size=8)), -0.3),
        pf.soc(),
        pf.l2_sphere(2.0),
        pf.l1_sphere(2.0),
        pf.box_hyperplane(-1.0, 1.0, 0.5),
        pf.k_sparse(3),
    ]
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    for op in ops:
        z = op(x64.to(dtype))
        assert z.dtype == dtype
        assert torch.allclose(z.double(), op(x64.to(dtype).double()), atol=tol * 10, rtol=tol), op
    X = t64(r.normal(size=(2, 3, 3)))
    assert torch.allclose(pf.psd()(X.to(dtype)).double(), pf.psd()(X.to(dtype).double()), atol=tol * 10)


def test_validation_errors_name_the_argument():
    with pytest.raises(ValueError, match="a must not be zero"):
        pf.hyperplane(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="b is not in the range"):
        pf.affine(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="radius"):
        pf.l2_sphere(-1.0)
    with pytest.raises(ValueError, match="radius"):
        pf.l1_sphere(-1.0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        pf.k_sparse(-1)
    with pytest.raises(ValueError, match="k=9"):
        pf.k_sparse(9)(torch.zeros(4))
    with pytest.raises(ValueError, match="square"):
        pf.psd()(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="b="):
        pf.box_hyperplane(0.0, 1.0, 5.0)(torch.zeros(3))
    with pytest.raises(ValueError, match="lower"):
        pf.box_hyperplane(1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="a must be > 0"):
        pf.box_hyperplane(0.0, 1.0, 0.5, a=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="entries"):
        pf.hyperplane(torch.ones(3), 0.0)(torch.zeros(4))


@SET
@given(x=vecs, s=scales)
def test_soc_moreau_decomposition_with_polar_cone(x, s):
    """K = SOC is self-dual, so its polar is -K: x = P_K(x) - P_K(-x), with orthogonal parts."""
    x = x * s
    op = pf.soc()
    p, q = op(x), -op(-x)
    assert torch.allclose(p + q, x, rtol=1e-12, atol=1e-12 * s)
    assert abs(float(torch.dot(p, q))) <= 1e-12 * float(x.norm()) ** 2 + 1e-300
    # the polar part lies in -K: ||q_y|| <= -q_s
    assert q[:-1].norm() <= -q[-1] + 1e-12 * s


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_sort_and_bisection_agree(seed):
    """The traced (sort) and eager (bisection) multipliers give the same projection, ties included."""
    from proxfunc.sets import knapsack_lambda, knapsack_lambda_sort

    r = rng(seed)
    n = 9
    x = t64(np.round(r.normal(size=n), 1 if seed % 2 else 6))
    a = t64(0.5 + r.random(n)) if seed % 3 else torch.ones(n, dtype=D)
    lo, hi = t64(-r.random(n)), t64(r.random(n))
    b = torch.tensor(float((a * (lo + (hi - lo) * r.random())).sum()), dtype=D)
    z1 = torch.clamp(x - knapsack_lambda(x, a, lo, hi, b) * a, lo, hi)
    z2 = torch.clamp(x - knapsack_lambda_sort(x, a, lo, hi, b) * a, lo, hi)
    assert torch.allclose(z1, z2, atol=1e-12)
    assert abs(float((a * z2).sum() - b)) < 1e-12


def test_radius_zero_with_tied_entries():
    """Regression: the sort-free threshold returned -radius when rounding put its final theta a
    hair above tied maxima (radius 0): the l1 sphere/ball then left x unchanged, max_entry zeroed it."""
    for x in (torch.tensor([0.0, 0, 0, 3, 3, 3], dtype=D) * 1e-3, torch.full((6,), 1.25e-9, dtype=D)):
        assert torch.equal(pf.l1_sphere(0.0)(x), torch.zeros_like(x))
        assert pf.l1_ball(0.0)(x).abs().max() <= 1e-15 * x.abs().max()
        assert torch.allclose(pf.max_entry(0.0)(x, 1.0), x, rtol=1e-15, atol=0)
        assert torch.allclose(pf.spectral(0.0)(x.reshape(2, 3), 1.0), x.reshape(2, 3), rtol=1e-12, atol=0)


def test_affine_gradient_in_A_and_b():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 5, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    x, w = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    gA, gb = torch.autograd.grad((pf.affine(A, b)(x) * w).sum(), (A, b))
    h = 1e-6
    E = torch.zeros(2, 5, dtype=D)
    E[1, 3] = h
    fd = ((pf.affine(A.detach() + E, b.detach())(x) - pf.affine(A.detach() - E, b.detach())(x)) * w).sum() / (2 * h)
    assert abs(float(gA[1, 3]) - float(fd)) < 1e-6
    e = torch.tensor([0.0, h], dtype=D)
    fd = ((pf.affine(A.detach(), b.detach() + e)(x) - pf.affine(A.detach(), b.detach() - e)(x)) * w).sum() / (2 * h)
    assert abs(float(gb[1]) - float(fd)) < 1e-6
