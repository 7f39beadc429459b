"""Matrix operators against independent solutions.

Oracle: the variational form ``||Z||_* = min {(||A||_F^2 + ||B||_F^2)/2 : Z = A B^T}`` turns the
nuclear-norm prox and the nuclear-ball projection into smooth problems over the factors
(BFGS / SLSQP; full-width factorisations have no spurious local minima). The spectral-norm prox
is checked through the Moreau identity against that independent ball projection, SVT through its
subgradient certificate, rank-k through a factorised least-squares oracle (Eckart-Young).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import proxfunc as pf
from tests.helpers import rng, t64

D = torch.float64
SET = settings(max_examples=25, deadline=None)


def _fg(F, shape_a, shape_b):
    def fg(v):
        vt = torch.tensor(v, dtype=D, requires_grad=True)
        na = int(np.prod(shape_a))
        A, B = vt[:na].reshape(shape_a), vt[na:].reshape(shape_b)
        f = F(A, B)
        (g,) = torch.autograd.grad(f, vt)
        return float(f.detach()), g.numpy()

    return fg


def nuclear_oracle(X, t, reg, seed=0):
    m, n = X.shape
    r = min(m, n)
    Xt = t64(X)
    fg = _fg(
        lambda A, B: reg * ((A**2).sum() + (B**2).sum()) / 2 + ((A @ B.T - Xt) ** 2).sum() / (2 * t), (m, r), (n, r)
    )
    best = None
    for s in range(2):
        res = minimize(fg, rng(seed + s).normal(size=(m + n) * r), jac=True, method="BFGS",
                       options={"gtol": 1e-12, "maxiter": 20000})  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    A, B = best.x[: m * r].reshape(m, r), best.x[m * r :].reshape(n, r)
    return A @ B.T


@pytest.mark.parametrize("seed", range(5))
def test_nuclear_vs_factorised_oracle_and_certificate(seed):
    r = rng(seed)
    X = r.normal(size=(4, 3))
    t, reg = 0.8, 1.0
    Z = pf.nuclear(reg)(t64(X), t).numpy()
    want = nuclear_oracle(X, t, reg, seed)
    assert np.allclose(Z, want, atol=1e-6)
    # Subgradient certificate: (X - Z)/(t reg) = U V^T + W, U^T W = 0, W V = 0, ||W||_2 <= 1.
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    k = int((s > 1e-10).sum())
    U, V = U[:, :k], Vt[:k].T
    G = (X - Z) / (t * reg)
    W = G - U @ V.T
    assert np.abs(U.T @ W).max() < 1e-10 and np.abs(W @ V).max() < 1e-10
    assert np.linalg.norm(W, 2) <= 1 + 1e-10


def nuclear_ball_oracle(mats, radius, seed=0):
    """Project a list of matrices jointly onto {sum ||Z_b||_* <= radius} (SLSQP over factors)."""
    shapes = [m.shape for m in mats]
    sizes = [(m + n) * min(m, n) for m, n in shapes]

    def split(v):
        out, i = [], 0
        for (m, n), sz in zip(shapes, sizes):
            r = min(m, n)
            out.append((v[i : i + m * r].reshape(m, r), v[i + m * r : i + sz].reshape(n, r)))
            i += sz
        return out

    def obj(v):
        return sum(np.sum((A @ B.T - X) ** 2) for (A, B), X in zip(split(v), mats)) / 2

    def con(v):
        return radius - sum((np.sum(A**2) + np.sum(B**2)) / 2 for A, B in split(v))

    best = None
    for s in range(3):
        v0 = rng(seed + s).normal(size=sum(sizes)) * 0.1
        res = minimize(obj, v0, constraints=[{"type": "ineq", "fun": con}], method="SLSQP",
                       options={"ftol": 1e-16, "maxiter": 3000})  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    return [A @ B.T for A, B in split(best.x)]


@pytest.mark.parametrize("seed", range(4))
def test_nuclear_ball_and_spectral_vs_oracle(seed):
    r = rng(seed)
    mats = [r.normal(size=(3, 2)), r.normal(size=(2, 2))]
    total = sum(np.linalg.svd(m, compute_uv=False).sum() for m in mats)
    radius = 0.4 * total
    want = nuclear_ball_oracle(mats, radius, seed)
    got = pf.nuclear_ball(radius)(tuple(t64(m) for m in mats))
    for g, w in zip(got, want):
        assert np.allclose(g.numpy(), w, atol=1e-6)
    # spectral prox with reg*t = radius: X - P_ball(X) (Moreau), checked against the oracle
    t = 0.5
    sp = pf.spectral(radius / t)(tuple(t64(m) for m in mats), t)
    for g, X, w in zip(sp, mats, want):
        assert np.allclose(g.numpy(), X - w, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_rank_k_vs_factorised_least_squares(seed):
    r = rng(seed)
    X = r.normal(size=(5, 4))
    k = 2
    Xt = t64(X)
    fg = _fg(lambda A, B: ((A @ B.T - Xt) ** 2).sum(), (5, k), (4, k))
    res = minimize(fg, r.normal(size=9 * k), jac=True, method="BFGS", options={"gtol": 1e-12})
    Zo = res.x[: 5 * k].reshape(5, k) @ res.x[5 * k :].reshape(4, k).T
    Z = pf.rank_k(k)(Xt).numpy()
    assert np.linalg.matrix_rank(Z, tol=1e-10) == k
    assert np.sum((Z - X) ** 2) <= res.fun + 1e-10
    assert np.allclose(Z, Zo, atol=1e-6)


sq = st.lists(st.floats(-3, 3, allow_nan=False), min_size=12, max_size=12).map(lambda v: t64(v).reshape(4, 3))
scales = st.sampled_from([1e-9, 1e-3, 1.0, 1e3, 1e9])


@SET
@given(X=sq, Y=sq, s=scales, t=st.sampled_from([0.3, 1.0, 3.0]))
def test_nuclear_moreau_and_nonexpansive(X, Y, s, t):
    X, Y = X * s, Y * s
    reg = 0.6 * s
    P = pf.nuclear(reg)(X, t)
    # conjugate of reg*||.||_*: indicator of the spectral ball of radius reg (written with numpy)
    U, sv, Vt = np.linalg.svd(X.numpy() / t, full_matrices=False)
    proj = (U * np.minimum(sv, reg)) @ Vt
    assert np.allclose(P.numpy() + t * proj, X.numpy(), rtol=1e-9, atol=1e-10 * s)
    Q = pf.nuclear(reg)(Y, t)
    assert (P - Q).norm() <= (X - Y).norm() * (1 + 1e-9) + 1e-12 * s
    for op in (pf.spectral(reg), pf.nuclear_ball(2 * s)):
        P, Q = op(X, t), op(Y, t)
        assert (P - Q).norm() <= (X - Y).norm() * (1 + 1e-9) + 1e-12 * s
    B = pf.nuclear_ball(2 * s)
    P = B(X)
    assert B.value(P) == 0 and torch.allclose(B(P), P, rtol=1e-9, atol=1e-12 * s)
    R = pf.rank_k(1)
    P = R(X)
    assert R.value(P) == 0 and torch.allclose(R(P), P, rtol=1e-9, atol=1e-12 * s)


def test_batched_and_pytree_semantics():
    r = rng(1)
    S = t64(r.normal(size=(3, 4, 2)))
    out = pf.nuclear(0.5)(S, 1.0)
    for i in range(3):
        assert torch.allclose(out[i], pf.nuclear(0.5)(S[i], 1.0))
    assert torch.allclose(pf.nuclear(0.5).value(S), sum(torch.linalg.svdvals(S[i]).sum() for i in range(3)) * 0.5)
    # spectral value is the max over all matrices; nuclear_ball is joint over leaves
    assert torch.allclose(pf.spectral(2.0).value((S, S[0] * 10)), 2.0 * torch.linalg.matrix_norm(S[0] * 10, 2))
    Z = pf.nuclear_ball(1.0)((S, S[0]))
    assert abs(float(torch.linalg.svdvals(Z[0]).sum() + torch.linalg.svdvals(Z[1]).sum()) - 1.0) < 1e-10
    inside = S * 1e-3
    assert torch.equal(pf.nuclear_ball(100.0)(inside), inside)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    X = t64(rng(2).normal(size=(2, 4, 3)))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for op in (pf.nuclear(0.5), pf.nuclear_ball(2.0), pf.spectral(0.5), pf.rank_k(2)):
        xl = X.to(dtype)
        z = op(xl, 0.7)
        assert z.dtype == dtype
        assert torch.allclose(z.double(), op(xl.double(), 0.7), atol=tol * 4, rtol=tol), op


def test_validation():
    with pytest.raises(ValueError, match=r"params\[1\]"):
        pf.nuclear(1.0)((torch.zeros(2, 2), torch.zeros(3)))
    with pytest.raises(ValueError, match="k=3"):
        pf.rank_k(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="k must be >= 0"):
        pf.rank_k(-1)
    with pytest.raises(ValueError, match="radius"):
        pf.nuclear_ball(-1.0)
    with pytest.raises(ValueError, match="reg"):
        pf.spectral(-1.0)


def test_gradients_exact_and_finite_at_ties_and_zeros():
    """Backward through the singular vectors: gradcheck at generic points and at tied singular
    values where SVT is differentiable; finite (no NaN) at zero matrices and ties."""
    from torch.autograd import gradcheck

    g = torch.Generator().manual_seed(0)
    ops = (pf.nuclear(0.3), pf.nuclear_ball(1.0), pf.spectral(0.5), pf.rank_k(2))
    for shape in [(4, 3), (3, 4), (2, 3, 3)]:
        X = torch.randn(*shape, generator=g, dtype=D, requires_grad=True)
        for op in ops:
            assert gradcheck(lambda x, op=op: op(x, 0.7), (X,), atol=1e-6), (op, shape)
    for X in (torch.eye(3, dtype=D), torch.diag(torch.tensor([2.0, 2.0, 0.1], dtype=D))):
        X.requires_grad_(True)
        assert gradcheck(lambda x: pf.nuclear(0.3)(x, 0.7), (X,), atol=1e-6)
    for X in (torch.zeros(3, 2, dtype=D), torch.eye(3, dtype=D), torch.ones(3, 3, dtype=D)):
        X.requires_grad_(True)
        for op in ops[:3] + (pf.rank_k(1),):
            (gx,) = torch.autograd.grad((op(X, 0.7) * torch.randn(X.shape, generator=g, dtype=D)).sum(), X)
            assert torch.isfinite(gx).all(), op
