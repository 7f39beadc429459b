"""Total variation (tv1d, fused_lasso): exactness against independent oracles.

Oracles: the dual problems solved by scipy's L-BFGS-B (box constraints), and the exact
optimality certificate of the 1-D TV prox: ``u = -cumsum(x - z)`` must satisfy ``|u_j| <= lam``
with ``u_j = lam * sign(z_{j+1} - z_j)`` at every jump and ``sum(x - z) = 0``. Scales 1e-6..1e6
(input and weight scaled together), float64 and float32, derivatives against finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import proxfunc as pf
from proxfunc.tv import tv1d_rows

D = torch.float64


def _dt(u):  # D^T u with (D z)_j = z_{j+1} - z_j
    return np.concatenate([[0.0], u]) - np.concatenate([u, [0.0]])


def dual_oracle(x, lam_tv, lam_l1=0.0):
    """argmin_z lam_tv TV(z) + lam_l1 |z|_1 + |z - x|^2/2 through its dual (L-BFGS-B, boxes)."""
    n = len(x)

    def f(w):
        u, v = w[: n - 1], w[n - 1 :]
        r = x - _dt(u) - v
        return 0.5 * r @ r, np.concatenate([-(r[1:] - r[:-1]), -r])

    bounds = [(-lam_tv, lam_tv)] * (n - 1) + [(-lam_l1, lam_l1)] * n
    res = minimize(f, np.zeros(2 * n - 1), jac=True, bounds=bounds, method="L-BFGS-B",
                   options=dict(ftol=1e-18, gtol=1e-13, maxiter=20000))  # fmt: skip
    u, v = res.x[: n - 1], res.x[n - 1 :]
    return x - _dt(u) - v


def certificate_ok(x, z, lam, eps):
    """The optimality conditions of the 1-D TV prox, to a tolerance relative to the data."""
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    n = len(x)
    scale = np.abs(x).max() + lam + 1e-300
    tol = 64 * eps * n * scale
    r = np.cumsum(x - z)
    u = -r[:-1]
    if abs(r[-1]) > tol:
        return False, "mean not kept"
    if np.any(np.abs(u) > lam + tol):
        return False, f"|u| > lam by {np.abs(u).max() - lam}"
    jumps = np.abs(np.diff(z)) > 8 * eps * scale
    want = lam * np.sign(np.diff(z))
    if np.any(np.abs(u - want)[jumps] > tol):
        return False, "u != lam sign at a jump"
    return True, ""


@pytest.mark.parametrize("seed", range(12))
def test_tv1d_vs_dual_lbfgs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 25))
    lam = float(rng.uniform(0.0, 2.0))
    x = rng.normal(size=n) * (3.0 if seed % 2 else 1.0)
    if seed % 3 == 0:
        x = np.round(x)  # ties and flat stretches
    z = pf.tv1d(lam)(torch.tensor(x), 1.0).numpy()
    assert np.abs(z - dual_oracle(x, lam)).max() < 1e-6
    assert certificate_ok(x, z, lam, np.finfo(np.float64).eps)[0]


@pytest.mark.parametrize("seed", range(8))
def test_fused_lasso_vs_dual_lbfgs(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 20))
    a, b, t = float(rng.uniform(0, 1.5)), float(rng.uniform(0, 1.0)), float(rng.uniform(0.3, 2))
    x = rng.normal(size=n) * 2
    z = pf.fused_lasso(a, b)(torch.tensor(x), t).numpy()
    assert np.abs(z - dual_oracle(x, a * t, b * t)).max() < 1e-6
    val = a * np.abs(np.diff(z)).sum() + b * np.abs(z).sum()
    assert float(pf.fused_lasso(a, b).value(torch.tensor(z))) == pytest.approx(val, rel=1e-12, abs=1e-300)


signals = st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=1, max_size=40)
scales = st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6])


@settings(max_examples=60, deadline=None)
@given(x=signals, lam=st.floats(0, 4), s=scales, dtype=st.sampled_from([torch.float64, torch.float32]))
def test_tv1d_certificate_at_every_scale(x, lam, s, dtype):
    xt = (torch.tensor(x, dtype=D) * s).to(dtype)
    z = pf.tv1d(lam * s)(xt, 1.0)
    assert z.dtype == dtype and z.shape == xt.shape
    eps = float(torch.finfo(dtype).eps)
    ok, why = certificate_ok(xt.double().numpy(), z.double().numpy(), lam * s, eps)
    assert ok, why
    assert torch.isfinite(pf.tv1d(lam * s).value(z))  # value accepts its own prox
    # the prox never increases TV and keeps the mean
    tv = pf.tv1d(1.0)
    assert float(tv.value(z.double())) <= float(tv.value(xt.double())) * (1 + 1e-5) + 1e-300


@settings(max_examples=30, deadline=None)
@given(x=signals, a=st.floats(0, 3), b=st.floats(0, 3), s=scales)
def test_fused_lasso_is_soft_threshold_of_tv_and_moreau(x, a, b, s):
    xt = torch.tensor(x, dtype=D) * s
    op = pf.fused_lasso(a * s, b * s)
    z = op(xt, 0.7)
    want = pf.l1(b * s)(pf.tv1d(a * s)(xt, 0.7), 0.7)
    assert torch.equal(z, want)
    # prox inequality: f(z) + |z-x|^2/(2t) <= f(w) + |w-x|^2/(2t) for nearby w
    g = torch.Generator().manual_seed(0)
    obj = lambda w: float(op.value(w)) + float(((w - xt) ** 2).sum()) / 1.4  # noqa: E731
    for _ in range(5):
        w = z + 1e-3 * s * torch.randn(z.shape, generator=g, dtype=D)
        assert obj(z) <= obj(w) + 1e-9 * (1 + abs(obj(w)))


def test_rows_dim_and_pytree():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 7, 5, generator=g, dtype=D)
    for dim in (0, 1, 2, -1):
        out = pf.tv1d(0.4, dim=dim)(X, 0.5)
        rows = X.movedim(dim, -1).reshape(-1, X.shape[dim])
        want = torch.stack([pf.tv1d(0.4)(r, 0.5) for r in rows]).reshape(X.movedim(dim, -1).shape).movedim(-1, dim)
        assert torch.allclose(out, want, rtol=0, atol=1e-14)
        val = 0.4 * torch.diff(X, dim=dim).abs().sum()
        assert torch.allclose(pf.tv1d(0.4, dim=dim).value(X), val)
    tree = {"a": X[0], "b": torch.tensor(3.0, dtype=D), "c": X[1, :, :1]}
    out = pf.tv1d(0.4, dim=1)(tree, 1.0)
    assert torch.equal(out["b"], tree["b"]) and torch.equal(out["c"], tree["c"])  # one entry per row: unchanged
    assert torch.allclose(out["a"], pf.tv1d(0.4, dim=1)(X[0], 1.0))


def test_known_values_and_extremes():
    x = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=D)
    assert torch.allclose(pf.tv1d(0.5)(x), torch.tensor([0.5, 2.0, 0.25, 0.25], dtype=D))
    assert torch.allclose(pf.tv1d(1.0)(x), torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=D))  # two segments merge
    assert torch.equal(pf.tv1d(0.0)(x), x)
    big = pf.tv1d(1e9)(x)  # a large weight gives the mean
    assert torch.allclose(big, torch.full_like(x, 0.75))
    assert torch.equal(pf.tv1d(1.0)(torch.zeros(0, dtype=D)), torch.zeros(0, dtype=D))
    # per-row weights
    X = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]], dtype=D)
    out = tv1d_rows(X, torch.tensor([0.0, 1.0], dtype=D))
    assert torch.equal(out[0], X[0]) and torch.allclose(out[1], pf.tv1d(1.0)(X[1]))
    # low precision: computed in float64, rounded once
    xh = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.bfloat16)
    assert torch.equal(pf.tv1d(1.0)(xh), pf.tv1d(1.0)(xh.double()).to(torch.bfloat16))


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, generator=g, dtype=D) * 2
    lam = torch.tensor(0.6, dtype=D, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: tv1d_rows(a, b), (xr, lam), eps=1e-7, atol=1e-6)
    assert torch.autograd.gradcheck(lambda a: pf.fused_lasso(0.5, 0.2)(a, 0.9), (xr,), eps=1e-7, atol=1e-6)
    # forward mode and torch.func agree with reverse mode
    v = torch.randn(3, 9, generator=g, dtype=D)
    jv = torch.func.jvp(lambda a: tv1d_rows(a, 0.6), (x,), (v,))[1]
    vj = torch.func.vjp(lambda a: tv1d_rows(a, 0.6), x)[1](v)[0]
    assert torch.allclose(jv, vj)  # J is symmetric (segment averaging)
    gl = torch.func.grad(lambda r: (tv1d_rows(x, r) ** 2).sum())(torch.tensor(0.6, dtype=D))
    fd = ((tv1d_rows(x, 0.6 + 1e-6) ** 2).sum() - (tv1d_rows(x, 0.6 - 1e-6) ** 2).sum()) / 2e-6
    assert torch.allclose(gl, fd, rtol=1e-5)


def test_vmap_and_compile():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 3, 8, generator=g, dtype=D)
    op = pf.tv1d(0.5)
    assert torch.allclose(torch.vmap(lambda a: op(a, 0.7))(X), op(X, 0.7), atol=1e-14)
    lams = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=D)
    got = torch.vmap(lambda a, r: pf.tv1d(r)(a, 1.0))(X, lams)
    want = torch.stack([pf.tv1d(float(r))(a, 1.0) for a, r in zip(X, lams)])
    assert torch.allclose(got, want, atol=1e-14)
    fn = torch.compile(lambda a: pf.fused_lasso(0.5, 0.1)(a, 0.7), fullgraph=True, backend="aot_eager")
    assert torch.allclose(fn(X), pf.fused_lasso(0.5, 0.1)(X, 0.7), atol=1e-14)


def test_validation_errors_name_the_argument():
    with pytest.raises(ValueError, match="reg"):
        pf.tv1d(-1.0)
    with pytest.raises(TypeError, match="dim"):
        pf.tv1d(1.0, dim=1.5)
    with pytest.raises(ValueError, match="reg_l1"):
        pf.fused_lasso(1.0, -0.1)
    with pytest.raises(ValueError, match="dim"):
        pf.tv1d(1.0, dim=2)(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="lam"):
        tv1d_rows(torch.zeros(3, 4), torch.ones(2))
