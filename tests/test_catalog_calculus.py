"""Calculus rules (Parikh & Boyd 2014 section 2.2) against independent minimisation.

Separable rules are checked entry by entry with a golden-section search on the defining 1-D
convex problem (no library code involved); non-separable ones with BFGS/SLSQP. ``value()`` of
each rule is checked against its definition; conjugate values against a numerical supremum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import proxfunc as pf

D = torch.float64
SET = settings(max_examples=30, deadline=None)


def t64(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def rng(seed):
    return np.random.default_rng(seed)


def golden(F, lo, hi, iters=200):
    """Vectorised golden-section search of convex 1-D functions F (elementwise) on [lo, hi]."""
    g = (np.sqrt(5) - 1) / 2
    a, b = np.array(lo, dtype=float), np.array(hi, dtype=float)
    for _ in range(iters):
        c, d = b - g * (b - a), a + g * (b - a)
        left = F(c) <= F(d)
        b = np.where(left, d, b)
        a = np.where(left, a, c)
    return (a + b) / 2


def prox_1d(g, x, t, dom=None):
    """argmin_z g(z) + (z - x)^2/(2t) entrywise (g convex, elementwise numpy) over dom."""
    w = 10 * (1 + np.abs(x))
    lo, hi = (x - w, x + w) if dom is None else (np.full_like(x, dom[0]), np.full_like(x, dom[1]))
    return golden(lambda z: g(z) + (z - x) ** 2 / (2 * t), lo, hi)


def huber_np(z, d):
    a = np.abs(z)
    return np.where(a <= d, 0.5 * z**2, d * (a - d / 2))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t", [0.4, 1.0, 3.0])
def test_separable_rules_vs_golden_section(seed, t):
    x = rng(seed).normal(size=10) * 2
    reg, a, alpha, b, rho, v = 0.7, 2.5, -1.7, 0.4, 1.3, 0.6
    cases = [
        (pf.scale(pf.l1(reg), a), lambda z: a * reg * np.abs(z)),
        (pf.precompose(pf.l1(reg), alpha, b), lambda z: reg * np.abs(alpha * z + b)),
        (pf.precompose(pf.huber(reg, 0.5), 0.5, -1.0), lambda z: reg * huber_np(0.5 * z - 1.0, 0.5)),
        (pf.add_linear(pf.l1(reg), v), lambda z: reg * np.abs(z) + v * z),
        (pf.add_quadratic(pf.l1(reg), rho, v), lambda z: reg * np.abs(z) + rho / 2 * (z - v) ** 2),
        (pf.conjugate(pf.huber(reg, 0.5)), lambda z: z**2 / (2 * reg)),  # on its domain |z| <= reg*0.5
        (pf.moreau_env(pf.l1(reg), 0.8), lambda z: reg * huber_np(z / (reg * 0.8), 1.0) * (reg * 0.8)),
        (pf.conjugate(pf.conjugate(pf.elastic_net(reg, 0.5))), lambda z: reg * (np.abs(z) + 0.25 * z**2)),
    ]
    for op, g in cases:
        want = prox_1d(g, x, t, (-reg * 0.5, reg * 0.5) if "conjugate(op=huber" in repr(op) else None)
        got = op(t64(x), t).numpy()
        assert np.allclose(got, want, atol=1e-6), op
        if "conjugate(op=huber" not in repr(op):
            assert np.isclose(float(op.value(t64(x))), g(x).sum(), rtol=1e-10), op


def test_moreau_env_of_l1_is_huber():
    x = t64(np.linspace(-4, 4, 81))
    reg, mu = 0.7, 0.8
    env, hub = pf.moreau_env(pf.l1(reg), mu), pf.huber(1 / mu, reg * mu)
    assert torch.allclose(env.value(x), hub.value(x), rtol=1e-12)
    assert torch.allclose(env(x, 0.6), hub(x, 0.6), atol=1e-12)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(hub.value(xg), xg)
    assert torch.allclose(env.grad(x), g, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_non_separable_rules_vs_bfgs(seed):
    """add_quadratic / add_linear / precompose / scale around l2 (smooth away from 0)."""
    r = rng(seed)
    x = r.normal(size=6) * 2
    t, reg, rho = 0.7, 0.5, 1.4
    v = r.normal(size=6)
    xt = t64(x)

    def solve(F):
        def fg(z):
            zt = torch.tensor(z, dtype=D, requires_grad=True)
            f = F(zt) + ((zt - xt) ** 2).sum() / (2 * t)
            (g,) = torch.autograd.grad(f, zt)
            return float(f.detach()), g.numpy()

        return minimize(fg, x, jac=True, method="BFGS", options={"gtol": 1e-12}).x

    cases = [
        (pf.add_quadratic(pf.l2(reg), rho, t64(v)), lambda z: reg * z.norm() + rho / 2 * ((z - t64(v)) ** 2).sum()),
        (pf.add_linear(pf.l2(reg), t64(v)), lambda z: reg * z.norm() + (t64(v) * z).sum()),
        (pf.precompose(pf.l2(reg), 2.0, t64(v)), lambda z: reg * (2.0 * z + t64(v)).norm()),
        (pf.scale(pf.quadratic(torch.eye(6, dtype=D) * 2), 0.3), lambda z: 0.3 * (z * z).sum()),
    ]
    for op, F in cases:
        want = solve(F)
        assert np.allclose(op(xt, t).numpy(), want, atol=1e-6), op
        assert torch.allclose(op.value(xt), F(xt), rtol=1e-12), op


def test_conjugate_known_pairs():
    x = t64(rng(1).normal(size=(4, 3)) * 2)
    pairs = [
        (pf.conjugate(pf.l1(0.7)), pf.linf_ball(0.7)),
        (pf.conjugate(pf.l2(0.7)), pf.l2_ball(0.7)),
        (pf.conjugate(pf.linf(0.7)), pf.l1_ball(0.7)),
        (pf.conjugate(pf.ridge(0.7)), pf.ridge(1 / 0.7)),
        (pf.conjugate(pf.max_entry(0.7)), pf.simplex(0.7)),
        (pf.conjugate(pf.nuclear(0.7)), None),
    ]
    for cj, ref in pairs:
        got = cj(x, 0.9)
        if ref is None:
            U, s, Vh = torch.linalg.svd(x, full_matrices=False)
            want = (U * s.clamp(max=0.7)) @ Vh
        else:
            want = ref(x, 0.9)
        assert torch.allclose(got, want, atol=1e-10), cj


def conj_sup(f_np, y, lo=-30, hi=30):
    """f*(y) = sup_z y z - f(z), entrywise, by golden section on the concave objective."""
    z = golden(lambda z: -(y * z - f_np(z)), np.full_like(y, lo), np.full_like(y, hi))
    return y * z - f_np(z)


@SET
@given(y=st.lists(st.floats(-3, 3, allow_nan=False), min_size=5, max_size=5).map(np.array))
def test_conjugate_values_vs_numerical_sup(y):
    reg = 0.9
    # ridge, huber (inside its domain), negative entropy: separable f, numerical sup per entry
    assert np.isclose(float(pf.conjugate(pf.ridge(reg)).value(t64(y))), conj_sup(lambda z: reg / 2 * z**2, y).sum())
    yh = np.clip(y, -0.4, 0.4)
    want = conj_sup(lambda z: reg * huber_np(z, 0.5), yh, -1e3, 1e3).sum()
    assert np.isclose(float(pf.conjugate(pf.huber(reg, 0.5)).value(t64(yh))), want, rtol=1e-6, atol=1e-9)
    ent = conj_sup(lambda z: reg * z * np.log(np.maximum(z, 1e-300)), y, 1e-300, 1e3).sum()
    assert np.isclose(float(pf.conjugate(pf.neg_entropy(reg)).value(t64(y))), ent, rtol=1e-6)
    # Fenchel-Young at the prox: f(p) + f*(u) = <p, u> with p = prox_f(x), u = x - p
    fs = (pf.ridge(reg), pf.huber(reg, 0.5), pf.l1(reg), pf.l2(reg), pf.linf(reg), pf.sum_largest(2, reg))
    fs += (pf.elastic_net(reg, 0.5), pf.log_barrier(reg), pf.box(-0.5, 2.0), pf.simplex(2.0), pf.soc())
    fs += (pf.max_entry(reg), pf.neg_entropy(reg), pf.scale(pf.l2(reg), 2.0), pf.l2_ball(1.3), pf.linf_ball(0.4))
    for f in fs:
        x = t64(y)
        p = f(x, 1.0)
        u = -f(-x, 1.0) if isinstance(f, pf.soc) else x - p  # cone: u = P_polar(x) (Moreau)
        fy = f.value(p) + pf.conjugate(f).value(u)
        assert torch.allclose(fy, (p * u).sum(), rtol=1e-9, atol=1e-9), f
    # matrices: nuclear <-> spectral ball, nuclear ball <-> spectral norm, PSD <-> NSD
    X = t64(np.resize(y, 9)).reshape(3, 3)
    for f in (pf.nuclear(reg), pf.spectral(reg), pf.nuclear_ball(1.1), pf.psd()):
        p = f(X, 1.0)
        # for the cone, u = P_polar(X) = -P(-X) (Moreau): X - p is only NSD up to rounding of X
        u = -f(-X, 1.0) if isinstance(f, pf.psd) else X - p
        fy = f.value(p) + pf.conjugate(f).value(u)
        assert torch.allclose(fy, (p * u).sum(), rtol=1e-9, atol=1e-9), f


def test_scale_of_conjugate_and_projection_flags():
    op = pf.scale(pf.l2_ball(1.0), 3.0)
    assert op.is_projection
    x = t64([3.0, 4.0])
    assert torch.allclose(op(x, 0.1), x / 5)
    assert torch.allclose(pf.conjugate(pf.scale(pf.l1(0.5), 2.0)).value(x * 0.1), torch.tensor(0.0, dtype=D))
    assert torch.isinf(pf.conjugate(pf.scale(pf.l1(0.5), 2.0)).value(x))
    with pytest.raises(NotImplementedError, match="no closed form"):
        pf.conjugate(pf.halfspace(torch.ones(2, dtype=D), 1.0)).value(x)


def test_pytrees_and_partition_inside_rules():
    W, b = torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)
    v = (torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D))
    op = pf.add_linear(pf.l21(0.3), v)
    W2, b2 = op((W, b), 0.5)
    W3, b3 = pf.l21(0.3)((W - 0.5 * v[0], b - 0.5 * v[1]), 0.5)
    assert torch.allclose(W2, W3) and torch.allclose(b2, b3)
    named = {"a.weight": W, "a.bias": b}
    part = pf.scale(pf.partition({"a.weight": pf.l1(0.2)}), 2.0)
    out = part(named, 0.5)
    assert torch.allclose(out["a.weight"], pf.l1(0.2)(W, 1.0)) and out["a.bias"] is b
    with pytest.raises(ValueError, match="b"):
        pf.precompose(pf.l1(), 1.0, (torch.zeros(2),))((W, b), 1.0)


def test_validation():
    with pytest.raises(ValueError, match="a must be > 0"):
        pf.scale(pf.l1(), 0.0)
    with pytest.raises(ValueError, match="alpha must be non-zero"):
        pf.precompose(pf.l1(), 0.0)
    with pytest.raises(ValueError, match="alpha must be non-zero"):
        pf.precompose(pf.l1(), torch.tensor(0.0))
    with pytest.raises(ValueError, match="rho"):
        pf.add_quadratic(pf.l1(), -1.0)
    with pytest.raises(ValueError, match="mu"):
        pf.moreau_env(pf.l1(), 0.0)
    with pytest.raises(TypeError, match="op must be a proxfunc operator"):
        pf.conjugate(lambda x, t: x)
