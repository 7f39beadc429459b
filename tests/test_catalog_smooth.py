"""Smooth terms, order statistics and index-group norms against independent solutions.

Oracles: root finding (``scipy.optimize.brentq``) on the 1-D optimality condition of separable
terms; ``scipy.optimize.minimize`` (SLSQP / BFGS) on smooth epigraph reformulations of the
non-smooth ones. Moreau identity ``x = prox_{tf}(x) + t prox_{f*/t}(x/t)`` with conjugates
written here independently of the library.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq, minimize

import proxfunc as pf
from tests.helpers import rng, t64

SET = settings(max_examples=30, deadline=None)
D = torch.float64


def prox_np(op, x, t):
    return op(t64(x), t).numpy()


def epigraph(x, t, n_extra, cost, cons, x0_extra=None):
    """min cost(w) + ||z - x||^2/(2t) over w = (z, extra) subject to cons(w) >= 0 (SLSQP)."""
    n = len(x)

    def obj(w):
        return cost(w) + np.sum((w[:n] - x) ** 2) / (2 * t)

    w0 = np.r_[x, np.abs(x).sum() * np.ones(n_extra) if x0_extra is None else x0_extra]
    res = minimize(obj, w0, constraints=[{"type": "ineq", "fun": cons}], method="SLSQP",
                   options={"ftol": 1e-16, "maxiter": 2000})  # fmt: skip
    return res.x[:n]


def polish(F, z0, tol=1e-3):
    """Second stage of an oracle: entries with |z| < tol are fixed at 0 (a kink of F), and F is
    minimised over the others by BFGS with autograd gradients (F is smooth there)."""
    free = np.abs(z0) >= tol
    if not free.any():
        return np.zeros_like(z0)

    def fg(v):
        z = torch.zeros(len(z0), dtype=D)
        vt = torch.tensor(v, dtype=D, requires_grad=True)
        z = z.index_put((torch.tensor(np.nonzero(free)[0]),), vt)
        f = F(z)
        (g,) = torch.autograd.grad(f, vt)
        return float(f.detach()), g.numpy()

    res = minimize(fg, z0[free], jac=True, method="BFGS", options={"gtol": 1e-13, "maxiter": 5000})
    out = np.zeros_like(z0)
    out[free] = res.x
    return out


SEEDS = range(6)
STEPS = [0.3, 1.0, 2.5]


# ----------------------------------------------------------------------------- separable
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", STEPS)
def test_ridge_huber_neg_entropy_vs_root_finding(seed, t):
    r = rng(seed)
    x = r.normal(size=9) * 3
    reg, delta = 0.7, 0.8
    ridge = [brentq(lambda z, xi=xi: z - xi + t * reg * z, -50, 50, xtol=1e-15) for xi in x]
    assert np.allclose(prox_np(pf.ridge(reg), x, t), ridge, atol=1e-10)

    def dh(z):
        return np.clip(z, -delta, delta)

    hub = [brentq(lambda z, xi=xi: z - xi + t * reg * dh(z), -50, 50, xtol=1e-15) for xi in x]
    assert np.allclose(prox_np(pf.huber(reg, delta), x, t), hub, atol=1e-10)
    ent = [
        brentq(lambda z, xi=xi: z - xi + t * reg * (np.log(z) + 1), 1e-300, 100, xtol=1e-300, rtol=1e-15) for xi in x
    ]
    assert np.allclose(prox_np(pf.neg_entropy(reg), x, t), ent, atol=1e-10, rtol=1e-9)


def test_neg_entropy_extreme_inputs():
    op = pf.neg_entropy(1.0)
    x = torch.tensor([-800.0, -30.0, 0.0, 30.0, 1e6, 1e300], dtype=D)
    z = op(x, 1e-3)
    assert torch.isfinite(z).all() and (z >= 0).all()
    # optimality where z is representable and positive
    pos = z > 1e-300
    res = (z - x + 1e-3 * (torch.log(torch.where(pos, z, torch.ones_like(z))) + 1))[pos]
    assert (res.abs() <= 1e-9 * (1 + x[pos].abs())).all()
    assert z[0] == 0  # exp(-8e5) underflows to 0, the correctly rounded answer


@pytest.mark.parametrize("seed", SEEDS)
def test_quadratic_vs_bfgs(seed):
    r = rng(seed)
    n = 6
    B = r.normal(size=(n, 3))
    A = B @ B.T  # PSD, rank 3
    b = r.normal(size=n)
    x, t = r.normal(size=n), 0.8
    res = minimize(lambda z: 0.5 * z @ A @ z + b @ z + np.sum((z - x) ** 2) / (2 * t), x,
                   jac=lambda z: A @ z + b + (z - x) / t, method="BFGS", options={"gtol": 1e-13})  # fmt: skip
    op = pf.quadratic(t64(A), t64(b))
    assert np.allclose(prox_np(op, x, t), res.x, atol=1e-7)
    assert np.isclose(float(op.value(t64(x))), 0.5 * x @ A @ x + b @ x)


# ----------------------------------------------------------------------------- order statistics
def sumk_oracle(x, t, k, reg):
    n = len(x)
    # variables (z, s, u): reg*(k s + sum u), u >= z - s, u >= 0
    return epigraph(
        x, t, n + 1,
        lambda w: reg * (k * w[n] + w[n + 1:].sum()),
        lambda w: np.r_[w[n + 1:] - w[:n] + w[n], w[n + 1:]],
        x0_extra=np.r_[x.max(), np.zeros(n)],
    )  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3])
def test_sum_largest_and_max_entry_vs_lp(seed, k):
    r = rng(seed)
    x = np.round(r.normal(size=7) * 2, 1)  # ties
    t, reg = 0.9, 0.6
    want = sumk_oracle(x, t, k, reg)
    got = prox_np(pf.sum_largest(k, reg), x, t)
    assert np.allclose(got, want, atol=1e-6)
    if k == 1:
        assert np.allclose(prox_np(pf.max_entry(reg), x, t), want, atol=1e-6)
    assert np.isclose(float(pf.sum_largest(k, reg).value(t64(x))), reg * np.sort(x)[-k:].sum())


def proj_simplex_np(v, r):
    u = np.sort(v)[::-1]
    c = np.cumsum(u) - r
    j = np.nonzero(u - c / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - c[j] / (j + 1), 0)


vecs = st.lists(st.floats(-5, 5, allow_nan=False), min_size=7, max_size=7).map(np.array)
scales = st.sampled_from([1e-9, 1e-3, 1.0, 1e3, 1e9])


@SET
@given(x=vecs, s=scales, t=st.sampled_from(STEPS))
def test_moreau_identity_independent_conjugates(x, s, t):
    """x = prox_{tf}(x) + t * prox_{f*/t}(x/t) with f* written out here."""
    x = x * s
    reg = 0.7 * s  # keep the problem scale-homogeneous
    # ridge(0.7): f* = ||y||^2/(2*0.7), prox_{f*/t}(w) = w * 0.7t / (1 + 0.7t)
    y = (x / t) * 0.7 * t / (1 + 0.7 * t)
    assert np.allclose(prox_np(pf.ridge(0.7), x, t) + t * y, x, rtol=1e-12, atol=1e-300)
    # huber (reg, delta): f* = y^2/(2 reg) + ind(|y| <= reg*delta)
    delta = 0.5 * s
    yh = np.clip((x / t) * 0.7 * t / (1 + 0.7 * t), -0.7 * delta, 0.7 * delta)
    assert np.allclose(prox_np(pf.huber(0.7, delta), x, t) + t * yh, x, rtol=1e-10, atol=1e-12 * s)
    # max entry: f* = ind(reg * simplex)
    ym = proj_simplex_np(x / t, reg)
    assert np.allclose(prox_np(pf.max_entry(reg), x, t) + t * ym, x, rtol=1e-10, atol=1e-10 * s)


@pytest.mark.parametrize("seed", SEEDS)
def test_moreau_sum_largest_and_quadratic(seed):
    r = rng(seed)
    n, t, k, reg = 6, 0.7, 2, 0.9
    x = r.normal(size=n) * 2
    # sum_largest: f* = ind{0 <= y <= reg, sum y = k reg}; projection by SLSQP
    w = x / t
    res = minimize(lambda y: 0.5 * np.sum((y - w) ** 2), np.full(n, k * reg / n), jac=lambda y: y - w,
                   bounds=[(0, reg)] * n, constraints=[{"type": "eq", "fun": lambda y: y.sum() - k * reg}],
                   method="SLSQP", options={"ftol": 1e-16})  # fmt: skip
    assert np.allclose(prox_np(pf.sum_largest(k, reg), x, t) + t * res.x, x, atol=1e-6)
    # quadratic with A positive definite: f*(y) = 1/2 (y-b)^T A^{-1} (y-b)
    B = r.normal(size=(n, n))
    A = B @ B.T + 0.5 * np.eye(n)
    b = r.normal(size=n)
    Ai = np.linalg.inv(A)
    y = np.linalg.solve(Ai / t + np.eye(n), w + Ai @ b / t)
    assert np.allclose(prox_np(pf.quadratic(t64(A), t64(b)), x, t) + t * y, x, atol=1e-10)
    # neg entropy: f*(y) = reg * sum exp(y/reg - 1); prox_{f*/t} by root finding
    ye = [brentq(lambda v, wi=wi: np.exp(v / reg - 1) / t + v - wi, -60, 60, xtol=1e-15) for wi in w]
    assert np.allclose(prox_np(pf.neg_entropy(reg), x, t) + t * np.array(ye), x, atol=1e-9)


# ----------------------------------------------------------------------------- index groups
def groups_of(index):
    return [np.nonzero(index == g)[0] for g in range(index.max() + 1)]


@pytest.mark.parametrize("seed", range(4))
def test_index_l21_linf1_sparse_group_vs_slsqp(seed):
    r = rng(seed)
    n, t = 9, 0.8
    index = np.array([0, 1, 0, 2, -1, 1, 0, 2, 2])
    G = groups_of(index)
    x = r.normal(size=n) * 2
    if seed == 0:
        x[[1, 5]] = 0.0  # a zero group
    reg = 0.9
    want = epigraph(x, t, len(G), lambda w: reg * w[n:].sum(),
                    lambda w: np.r_[[w[n + i] ** 2 - np.sum(w[g] ** 2) for i, g in enumerate(G)], w[n:]])  # fmt: skip
    xt = t64(x)

    def F21(z):
        return reg * sum(torch.sqrt((z[g] ** 2).sum()) for g in G) + ((z - xt) ** 2).sum() / (2 * t)

    want = polish(F21, want)
    got = prox_np(pf.index_l21(torch.tensor(index), reg), x, t)
    assert np.allclose(got, want, atol=1e-6)
    assert got[4] == x[4]  # index -1: untouched

    def linf_cons(w):
        return np.r_[[w[n + i] - s * w[j] for i, g in enumerate(G) for j in g for s in (1, -1)]]

    want = epigraph(x, t, len(G), lambda w: reg * w[n:].sum(), linf_cons)
    assert np.allclose(prox_np(pf.index_linf1(torch.tensor(index), reg), x, t), want, atol=1e-6)
    # sparse group lasso with row groups of a (3, 3) matrix
    X = x.reshape(3, 3)
    r1, r2 = 0.3, 0.7

    def sgl_cons(w):
        z = w[:n].reshape(3, 3)
        u, tau = w[n : 2 * n], w[2 * n :]
        return np.r_[u - w[:n], u + w[:n], [tau[i] ** 2 - np.sum(z[i] ** 2) for i in range(3)], tau]

    want = epigraph(x, t, n + 3, lambda w: r1 * w[n : 2 * n].sum() + r2 * w[2 * n :].sum(), sgl_cons)

    def Fsgl(z):
        Z = z.reshape(3, 3)
        return (
            r1 * z.abs().sum()
            + r2 * sum(torch.sqrt((Z[i] ** 2).sum()) for i in range(3))
            + ((z - xt) ** 2).sum() / (2 * t)
        )

    want = polish(Fsgl, want)
    got = pf.sparse_group_lasso(r1, r2, group_dim=0)(t64(X), t).numpy().reshape(-1)
    assert np.allclose(got, want, atol=1e-6)


def test_index_groups_match_group_dim_operators():
    X = torch.randn(4, 5, dtype=D)
    index = torch.arange(4).repeat_interleave(5)  # row groups
    assert torch.allclose(pf.index_l21(index, 0.7)(X, 0.9), pf.l21(0.7)(X, 0.9))
    assert torch.allclose(pf.index_linf1(index, 0.7)(X, 0.9), pf.linf1(0.7)(X, 0.9))
    assert torch.allclose(pf.index_l21(index, 0.7).value(X), pf.l21(0.7).value(X))
    assert torch.allclose(pf.index_linf1(index, 0.7).value(X), pf.linf1(0.7).value(X))
    # non-contiguous, uneven groups over a pytree (W, b)
    W, b = torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)
    idx = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2])
    W2, b2 = pf.index_l21(idx, 0.5)((W, b), 1.0)
    v, v2 = torch.cat([W.reshape(-1), b]), torch.cat([W2.reshape(-1), b2])
    for g in range(3):
        m = idx == g
        n = v[m].norm()
        assert torch.allclose(v2[m], torch.clamp(1 - 0.5 / n, min=0) * v[m])


@SET
@given(x=vecs, y=vecs, s=scales)
def test_index_group_moreau_and_nonexpansive(x, y, s):
    x, y = x * s, y * s
    index = np.array([0, 0, 1, 2, 1, -1, 2])
    reg, t = 0.8 * s, 1.3
    p = prox_np(pf.index_l21(torch.tensor(index), reg), x, t)
    w = x / t
    proj = w.copy()
    for g in groups_of(index):
        n = np.linalg.norm(w[g])
        proj[g] = w[g] * min(1.0, reg / n) if n > 0 else 0.0
    proj[index < 0] = 0.0  # conjugate of f restricted: free entries have f* = ind{0}
    assert np.allclose(p + t * proj, x, rtol=1e-10, atol=1e-12 * s)
    q = prox_np(pf.index_linf1(torch.tensor(index), reg), y, t)
    p = prox_np(pf.index_linf1(torch.tensor(index), reg), x, t)
    assert np.linalg.norm(p - q) <= np.linalg.norm(x - y) * (1 + 1e-10) + 1e-300


def test_zero_groups_no_nan_in_value_output_grad():
    index = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=D, requires_grad=True)
    for op in (pf.index_l21(index, 0.5), pf.index_linf1(index, 0.5)):
        out = op(x, 1.0)
        (g,) = torch.autograd.grad(out.sum() + op.value(x), x)
        assert torch.isfinite(out).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    r = rng(3)
    x = t64(r.normal(size=(6, 5)))
    ops = [
        pf.ridge(0.5),
        pf.huber(0.5, 0.3),
        pf.neg_entropy(0.5),
        pf.sum_largest(4, 0.3),
        pf.max_entry(0.3),
        pf.index_l21(torch.arange(30) % 4, 0.3),
        pf.index_linf1(torch.arange(30) % 4, 0.3),
        pf.sparse_group_lasso(0.1, 0.2),
    ]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for op in ops:
        xl = x.to(dtype)
        z = op(xl, 0.7)
        assert z.dtype == dtype
        assert torch.allclose(z.double(), op(xl.double(), 0.7), atol=tol, rtol=tol), op
        assert torch.isfinite(op.value(z))


def test_validation():
    with pytest.raises(ValueError, match="positive semidefinite"):
        pf.quadratic(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        pf.quadratic(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        pf.quadratic(torch.ones(2, 3))
    with pytest.raises(ValueError, match="A is"):
        pf.quadratic(torch.eye(3))(torch.zeros(4))
    with pytest.raises(ValueError, match="reg"):
        pf.ridge(-1.0)
    with pytest.raises(ValueError, match="delta"):
        pf.huber(1.0, 0.0)
    with pytest.raises(ValueError, match="reg"):
        pf.neg_entropy(0.0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pf.sum_largest(0)
    with pytest.raises(ValueError, match="k=5"):
        pf.sum_largest(5)(torch.zeros(3))
    with pytest.raises(ValueError, match="index"):
        pf.index_l21(torch.tensor([0, -2]))
    with pytest.raises(TypeError, match="index"):
        pf.index_l21(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="index has 2 entries"):
        pf.index_linf1(torch.tensor([0, 1]))(torch.zeros(3))
    assert torch.isinf(pf.neg_entropy(1.0).value(torch.tensor([1.0, -1e-9])))
