"""log_sum and weighted_nuclear: global minimisers against brute force and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, minimize_scalar

import proxfunc as pf

D = torch.float64


def log_sum_oracle(a, c, e):
    """Global minimiser over u >= 0 of (u - a)^2/2 + c log(1 + u/e): bounded search on [0, a] and 0."""
    obj = lambda u: 0.5 * (u - a) ** 2 + c * np.log1p(u / e)  # noqa: E731
    grid = np.linspace(0, a, 2001)
    u0 = grid[np.argmin(obj(grid))]
    lo, hi = max(0.0, u0 - a / 1000), min(a, u0 + a / 1000)
    res = minimize_scalar(obj, bounds=(lo, hi), method="bounded", options=dict(xatol=1e-14 * max(a, 1e-300)))
    best = min([0.0, res.x], key=obj)
    return best, obj


@settings(max_examples=80, deadline=None)
@given(
    x=st.floats(-10, 10, allow_nan=False),
    reg=st.floats(0, 5),
    e=st.floats(0.01, 5),
    s=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    dtype=st.sampled_from([D, torch.float32]),
)
def test_log_sum_is_the_global_minimiser(x, reg, e, s, dtype):
    # natural scale: x and eps scale by s, reg * t by s^2 (the log term is scale free)
    op = pf.log_sum(reg * s * s, eps=e * s)
    xt = torch.tensor([x * s], dtype=dtype)
    z = float(op(xt, 1.0)[0])
    a, c, ee = abs(float(xt[0])), reg * s * s, e * s  # the input as the dtype holds it
    best, obj = log_sum_oracle(a, c, ee)
    assert np.sign(z) in (0.0, np.sign(x))
    rel = 1e-9 if dtype == D else 1e-5
    assert obj(abs(z)) <= obj(best) + rel * (obj(0.0) + 1e-300) + 1e-300
    assert torch.isfinite(op.value(torch.tensor([z], dtype=dtype)))


def test_log_sum_values_and_errors():
    x = torch.tensor([-3.0, 0.5, 2.0, 0.0], dtype=D)
    z = pf.log_sum(1.0, eps=0.5)(x, 1.0)
    torch.testing.assert_close(z, torch.tensor([-(2.5 + 8.25**0.5) / 2, 0.0, 1.5, 0.0], dtype=D))
    assert float(pf.log_sum(2.0, eps=0.5).value(x)) == pytest.approx(2 * float(torch.log1p(x.abs() / 0.5).sum()))
    assert torch.equal(pf.log_sum(0.0)(x, 1.0), x)
    with pytest.raises(ValueError, match="eps"):
        pf.log_sum(1.0, eps=0.0)
    with pytest.raises(ValueError, match="reg"):
        pf.log_sum(-1.0)


def _wn_obj(Z, X, w, t):
    s = np.linalg.svd(Z, compute_uv=False)
    return (w * s).sum() + 0.5 * ((Z - X) ** 2).sum() / t


@pytest.mark.parametrize("seed", range(6))
def test_weighted_nuclear_global_minimiser(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4, 3)) * 2
    w = np.sort(rng.uniform(0, 2, size=3))
    t = float(rng.uniform(0.3, 1.5))
    Z = pf.weighted_nuclear(torch.tensor(w))(torch.tensor(X), t).numpy()
    f = _wn_obj(Z, X, w, t)
    for k in range(6):  # local searches from several starts never do better
        start = X if k == 0 else rng.normal(size=(4, 3)) * 2
        res = minimize(lambda v: _wn_obj(v.reshape(4, 3), X, w, t), start.ravel(), method="Nelder-Mead",
                       options=dict(maxiter=20000, xatol=1e-10, fatol=1e-12))  # fmt: skip
        assert f <= res.fun + 1e-8
    # equal weights: the nuclear norm's prox; a diagonal input: thresholds in place
    torch.testing.assert_close(
        pf.weighted_nuclear(torch.full((3,), 0.7, dtype=D))(torch.tensor(X), t), pf.nuclear(0.7)(torch.tensor(X), t)
    )
    d = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=D))
    out = pf.weighted_nuclear(torch.tensor([0.5, 1.0, 2.0], dtype=D))(d, 1.0)
    torch.testing.assert_close(out, torch.diag(torch.tensor([4.5, 2.0, 0.0], dtype=D)))
    assert float(pf.weighted_nuclear(torch.tensor([0.5, 1.0, 2.0], dtype=D)).value(d)) == pytest.approx(7.5)


@pytest.mark.parametrize("s", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("dtype", [D, torch.float32], ids=str)
def test_weighted_nuclear_scales_and_batches(s, dtype):
    X = (torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=D) * s).to(dtype)
    w = torch.tensor([0.1, 0.2, 0.5, 0.9], dtype=D) * s
    op = pf.weighted_nuclear(w.to(dtype))
    Z = op(X, 1.0)
    ref = pf.weighted_nuclear(w)(X.double(), 1.0)
    tol = 1e-10 if dtype == D else 1e-4
    assert (Z.double() - ref).abs().max() <= tol * s * 10
    for i in range(3):
        torch.testing.assert_close(Z[i], op(X[i], 1.0))
    assert torch.isfinite(op.value(Z))


def test_weighted_nuclear_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        pf.weighted_nuclear(torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        pf.weighted_nuclear(torch.tensor([-1.0, 1.0]))
    with pytest.raises(TypeError, match="weights"):
        pf.weighted_nuclear([1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        pf.weighted_nuclear(torch.tensor(1.0))
    # fewer weights than singular values: the last weight applies to the rest; more: the first ones
    X = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=D)
    short = pf.weighted_nuclear(torch.tensor([0.1, 0.5], dtype=D))(X, 1.0)
    full = pf.weighted_nuclear(torch.tensor([0.1, 0.5, 0.5, 0.5], dtype=D))(X, 1.0)
    long = pf.weighted_nuclear(torch.tensor([0.1, 0.5, 0.5, 0.5, 9.0], dtype=D))(X, 1.0)
    torch.testing.assert_close(short, full)
    torch.testing.assert_close(long, full)
