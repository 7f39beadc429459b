"""Operators by iteration (sum_of, intersection, birkhoff, tv2d) and the sparse sets.

Oracles: closed forms of sums whose prox is known (l1 + ridge + box, l1 + nonneg, TV + l1 =
fused lasso, box ∩ hyperplane), scipy SLSQP / L-BFGS-B on small problems, exact 1-D TV (a
one-row image), and brute force over all supports for the sparse sets.
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

D = torch.float64


def rnd(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


# ----------------------------------------------------------------------------- sum_of
@pytest.mark.parametrize("seed", range(3))
def test_sum_of_matches_closed_forms(seed):
    x = rnd(40, seed=seed, scale=2)
    t = 0.7
    # l1 + ridge + box: separable and convex in 1-D, so clamp(soft(x, a t) / (1 + b t))
    got = pf.sum_of(pf.l1(0.3), pf.ridge(0.8), pf.box(-0.5, 0.6))(x, t)
    want = torch.clamp(pf.l1(0.3)(x, t) / (1 + 0.8 * t), -0.5, 0.6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    got = pf.sum_of(pf.l1(0.3), pf.nonneg())(x, t)
    torch.testing.assert_close(got, torch.clamp_min(x - 0.3 * t, 0), rtol=0, atol=1e-7)
    got = pf.sum_of(pf.tv1d(0.4), pf.l1(0.2))(x, t)
    torch.testing.assert_close(got, pf.fused_lasso(0.4, 0.2)(x, t), rtol=0, atol=1e-6)


def test_sum_of_value_warm_start_and_errors():
    x = rnd(30, seed=4, scale=3)
    op = pf.sum_of(pf.l1(0.3), pf.nonneg())
    z, state = op.solve(x, 0.5)
    assert float(op.value(z)) == pytest.approx(0.3 * float(z.abs().sum()))
    z2, _ = op.solve(x + 1e-3, 0.5, state)
    torch.testing.assert_close(z2, op(x + 1e-3, 0.5), rtol=0, atol=1e-7)
    assert torch.isinf(op.value(-torch.ones(30, dtype=D)))
    with pytest.raises(ValueError, match="ops"):
        pf.sum_of()
    with pytest.raises(TypeError, match="ops"):
        pf.sum_of(pf.l1(1.0), 3.0)
    with pytest.raises(ValueError, match="iters"):
        pf.sum_of(pf.l1(1.0), iters=0)
    with pytest.raises(TypeError, match="sets"):
        pf.intersection(pf.nonneg(), pf.l1(1.0))
    with pytest.raises(ValueError, match="state"):
        op.solve(x, 0.5, [[x]])


# ----------------------------------------------------------------------------- intersection
@pytest.mark.parametrize("seed", range(3))
def test_intersection_matches_closed_forms(seed):
    x = rnd(25, seed=10 + seed, scale=2)
    got = pf.intersection(pf.nonneg(), pf.l2_ball(1.0))(x)
    xp = x.clamp_min(0)
    torch.testing.assert_close(got, xp / max(1.0, float(xp.norm())), rtol=0, atol=1e-7)
    a = torch.ones(25, dtype=D)
    got = pf.intersection(pf.box(-0.5, 0.7), pf.hyperplane(a, 1.0))(x)
    torch.testing.assert_close(got, pf.box_hyperplane(-0.5, 0.7, 1.0)(x), rtol=0, atol=1e-6)


def test_intersection_vs_slsqp():
    x = rnd(8, seed=20, scale=2).numpy()
    a = np.linspace(-1, 2, 8)
    op = pf.intersection(pf.l1_ball(1.5), pf.halfspace(torch.tensor(a), 0.2), pf.box(-0.6, 0.9))
    got = op(torch.tensor(x)).numpy()
    cons = [{"type": "ineq", "fun": lambda z: 0.2 - a @ z}, {"type": "ineq", "fun": lambda z: 1.5 - np.abs(z).sum()}]
    res = minimize(lambda z: 0.5 * ((z - x) ** 2).sum(), np.clip(x, -0.6, 0.9) * 0, method="SLSQP",
                   bounds=[(-0.6, 0.9)] * 8, constraints=cons, options=dict(ftol=1e-14, maxiter=500))  # fmt: skip
    # strong convexity: a feasible point whose objective is within d of the minimum lies within
    # sqrt(2 d) of the minimiser, so an objective no worse than SLSQP's (feasible) point pins it
    f = lambda z: 0.5 * ((z - x) ** 2).sum()  # noqa: E731
    assert a @ got <= 0.2 + 1e-12 and np.abs(got).sum() <= 1.5 + 1e-9
    assert got.min() >= -0.6 - 1e-12 and got.max() <= 0.9 + 1e-12
    assert a @ res.x <= 0.2 + 1e-8 and np.abs(res.x).sum() <= 1.5 + 1e-8
    assert f(got) <= f(res.x) + 1e-10
    assert np.abs(got - res.x).max() < 1e-3


# ----------------------------------------------------------------------------- birkhoff
@pytest.mark.parametrize("seed", range(3))
def test_birkhoff_vs_slsqp(seed):
    n = 4
    X = rnd(n, n, seed=30 + seed, scale=1.5).numpy()
    got = pf.birkhoff()(torch.tensor(X)).numpy()
    cons = [
        {"type": "eq", "fun": lambda z: z.reshape(n, n).sum(1) - 1},
        {"type": "eq", "fun": lambda z: z.reshape(n, n).sum(0)[:-1] - 1},
    ]  # the last column follows
    opts = dict(ftol=1e-15, maxiter=1000)
    res = minimize(lambda z: 0.5 * ((z - X.ravel()) ** 2).sum(), np.full(n * n, 1 / n), jac=lambda z: z - X.ravel(),
                   method="SLSQP", bounds=[(0, None)] * (n * n), constraints=cons, options=opts)  # fmt: skip
    assert np.abs(got - res.x.reshape(n, n)).max() < 1e-6
    assert np.allclose(got.sum(0), 1, atol=1e-12) and np.allclose(got.sum(1), 1, atol=1e-12)


def test_birkhoff_batched_fixed_points_and_value():
    P = torch.eye(4, dtype=D)[[2, 0, 3, 1]]
    torch.testing.assert_close(pf.birkhoff()(P), P)  # a permutation matrix is its own projection
    Xs = rnd(3, 5, 5, seed=40, scale=4)
    out = pf.birkhoff()(Xs)
    for i in range(3):
        torch.testing.assert_close(out[i], pf.birkhoff()(Xs[i]), rtol=0, atol=1e-7)
    assert float(pf.birkhoff().value(out)) == 0.0
    assert torch.isinf(pf.birkhoff().value(Xs))
    with pytest.raises(ValueError, match="square"):
        pf.birkhoff()(torch.zeros(3, 4))


# ----------------------------------------------------------------------------- tv2d
def _dual_aniso_oracle(X, lam):
    H, W = X.shape
    ny, nx = (H - 1) * W, H * (W - 1)

    def unpack(w):
        py = np.zeros((H, W))
        px = np.zeros((H, W))
        py[:-1, :] = w[:ny].reshape(H - 1, W)
        px[:, :-1] = w[ny:].reshape(H, W - 1)
        return py, px

    def adj(py, px):
        dy = np.vstack([np.zeros((1, W)), py[:-1]]) - np.vstack([py[:-1], np.zeros((1, W))])
        dx = np.hstack([np.zeros((H, 1)), px[:, :-1]]) - np.hstack([px[:, :-1], np.zeros((H, 1))])
        return dy + dx

    def f(w):
        py, px = unpack(w)
        r = X - lam * adj(py, px)
        gy = (r[1:, :] - r[:-1, :]) * -lam
        gx = (r[:, 1:] - r[:, :-1]) * -lam
        return 0.5 * (r * r).sum(), np.concatenate([gy.ravel(), gx.ravel()])

    res = minimize(f, np.zeros(ny + nx), jac=True, method="L-BFGS-B", bounds=[(-1, 1)] * (ny + nx),
                   options=dict(ftol=1e-18, gtol=1e-13, maxiter=20000))  # fmt: skip
    return X - lam * adj(*unpack(res.x))


@pytest.mark.parametrize("seed", range(3))
def test_tv2d_anisotropic_vs_dual_lbfgs(seed):
    X = rnd(5, 4, seed=50 + seed, scale=2)
    got = pf.tv2d(0.4, isotropic=False, tol=1e-10, iters=20000)(X, 1.0).numpy()
    assert np.abs(got - _dual_aniso_oracle(X.numpy(), 0.4)).max() < 1e-6


@pytest.mark.parametrize("iso", [True, False])
def test_tv2d_one_row_is_exact_1d_tv_and_accuracy_bound(iso):
    x = rnd(1, 30, seed=60, scale=3)
    op = pf.tv2d(0.5, isotropic=iso, tol=1e-8, iters=100000)
    torch.testing.assert_close(op(x, 1.0), pf.tv1d(0.5)(x, 1.0), rtol=0, atol=1e-7 * (float(x.norm()) + 0.5))


def test_tv2d_isotropic_is_a_minimum_and_warm_start():
    X = rnd(2, 6, 7, seed=70, scale=2)
    op = pf.tv2d(0.3, tol=1e-9, iters=20000)
    Z = op(X, 1.0)

    def obj(z):
        return float(op.value(z)) + 0.5 * float(((z - X) ** 2).sum())

    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # a convex function: no nearby point is lower
        W = Z + 1e-4 * torch.randn(Z.shape, generator=g, dtype=D)
        assert obj(Z) <= obj(W) + 1e-12
    # smoothed primal by L-BFGS: same minimiser to the smoothing's accuracy
    x0 = X[0].numpy()

    def f(zf):
        z = torch.tensor(zf.reshape(6, 7), requires_grad=True)
        gy = torch.diff(z, dim=0, append=z[-1:, :])
        gx = torch.diff(z, dim=1, append=z[:, -1:])
        v = 0.3 * torch.sqrt(gy**2 + gx**2 + 1e-14).sum() + 0.5 * ((z - torch.tensor(x0)) ** 2).sum()
        v.backward()
        return float(v), z.grad.numpy().ravel()

    res = minimize(f, x0.ravel(), jac=True, method="L-BFGS-B", options=dict(ftol=1e-16, gtol=1e-12, maxiter=20000))
    assert np.abs(Z[0].numpy().ravel() - res.x).max() < 1e-4
    Z1, state = op.solve(X, 1.0)
    Z2, _ = op.solve(X, 1.0, state)
    torch.testing.assert_close(Z1, Z, rtol=0, atol=0)
    torch.testing.assert_close(Z2, Z, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="images"):
        op(torch.zeros(3), 1.0)
    with pytest.raises(TypeError, match="isotropic"):
        pf.tv2d(1.0, isotropic=1)


# ----------------------------------------------------------------------------- sparse sets
def _support_oracle(x, k, proj):
    best, bz = np.inf, None
    for S in itertools.combinations(range(len(x)), k):
        z = np.zeros_like(x)
        z[list(S)] = proj(torch.tensor(x[list(S)])).numpy()
        d = ((z - x) ** 2).sum()
        if d < best - 1e-12:
            best, bz = d, z
    return best, bz


@pytest.mark.parametrize("seed", range(10))
def test_sparse_sets_vs_all_supports(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 8)), int(rng.integers(1, 4))
    k = min(k, n)
    x = rng.normal(size=n) * 2
    r = float(rng.uniform(0.3, 3))
    for op, proj in ((pf.sparse_simplex(k, r), pf.simplex(r)), (pf.sparse_l1_ball(k, r), pf.l1_ball(r))):
        z = op(torch.tensor(x)).numpy()
        best, _ = _support_oracle(x, k, proj)
        assert ((z - x) ** 2).sum() <= best + 1e-10
        assert (z != 0).sum() <= k
        assert float(op.value(torch.tensor(z))) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    x=st.lists(st.floats(-5, 5, allow_nan=False), min_size=3, max_size=30),
    s=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    dtype=st.sampled_from([D, torch.float32]),
)
def test_sparse_sets_feasible_at_every_scale(x, s, dtype):
    xt = (torch.tensor(x, dtype=D) * s).to(dtype)
    for op in (pf.sparse_simplex(2, 1.5), pf.sparse_l1_ball(2, 1.5), pf.sparse_simplex(2, 1.5 * s)):
        z = op(xt)
        assert z.dtype == dtype and float(op.value(z)) == 0.0
        assert torch.equal(op(z), z) or torch.allclose(op(z), z, rtol=1e-5, atol=0)


def test_sparse_sets_errors_and_ties():
    with pytest.raises(ValueError, match="k"):
        pf.sparse_simplex(0)
    with pytest.raises(ValueError, match="radius"):
        pf.sparse_l1_ball(2, 0.0)
    with pytest.raises(ValueError, match="k=5"):
        pf.sparse_simplex(5)(torch.zeros(3))
    z = pf.sparse_simplex(1)(torch.tensor([1.0, 1.0, 1.0], dtype=D))
    assert torch.equal(z, torch.tensor([1.0, 0.0, 0.0], dtype=D))  # ties: the first entry
    assert torch.isinf(pf.sparse_simplex(1).value(torch.tensor([0.5, 0.5], dtype=D)))


# ----------------------------------------------------------------------------- transforms
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: pf.sum_of(pf.l1(0.3), pf.ridge(0.5), iters=12, tol=1e-300), (3, 6)),
        (lambda: pf.intersection(pf.nonneg(), pf.l2_ball(1.0), iters=12, tol=1e-300), (3, 6)),
        (lambda: pf.birkhoff(iters=12, tol=1e-300), (3, 4, 4)),
        (lambda: pf.tv2d(0.3, iters=12, tol=1e-300), (3, 4, 5)),
    ],
)
def test_iterative_operators_under_vmap_grad_and_compile(make, shape):
    """With a tolerance never met, eager and traced runs take the same ``iters`` iterations."""
    op = make()
    X = rnd(*shape, seed=80, scale=2)
    eager = op(X, 0.7)
    per = torch.stack([op(x, 0.7) for x in X])
    torch.testing.assert_close(torch.vmap(lambda a: op(a, 0.7))(X), per, rtol=1e-10, atol=1e-10)
    g = torch.func.grad(lambda a: (op(a, 0.7) ** 2).sum())(X)
    assert torch.isfinite(g).all()
    fn = torch.compile(lambda a: op(a, 0.7), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(X), eager, rtol=1e-10, atol=1e-10)
