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
from scipy.optimize import linprog, minimize

import proxfunc as pf
from tests.helpers import rng, t64

D = torch.float64
SET = settings(max_examples=30, deadline=None)


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
        pf.conjugate(pf.k_sparse(1)).value(x)


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


# ------------------------------------------- conjugates of affine sets, box ∩ hyperplane, index groups
def _new_conj_ops(r, n):
    """The operators whose conjugate is a closed form added for sets.py / index_groups.py, on R^n."""
    a = t64(r.uniform(0.3, 2.0, n))
    lo = t64(r.uniform(-1.0, 0.0, n))
    hi = lo + t64(r.uniform(0.1, 2.0, n))
    b = float((a * (lo + r.uniform(0.2, 0.8) * (hi - lo))).sum())
    A = t64(r.normal(size=(3, n)))
    A[2] = A[0] - 2 * A[1]  # rank deficient: the row space has dimension 2
    index = torch.as_tensor(r.integers(-1, 3, n))
    return [
        pf.hyperplane(t64(r.normal(size=n)), 0.7),
        pf.halfspace(t64(r.normal(size=n)), -0.4),
        pf.halfspace(t64(r.normal(size=n)), 50.0),  # most points inside: y = 0
        pf.affine(A, A @ t64(r.normal(size=n))),
        pf.box_hyperplane(lo, hi, b, a),
        pf.box_hyperplane(0.0, 1.0, 2.0),
        pf.index_l21(index, 0.6),
        pf.index_linf1(index, 0.6),
    ]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 6, 13])
def test_fenchel_young_equality_new_conjugates(seed, n):
    r = rng(100 + seed)
    ops = _new_conj_ops(r, n)
    shape = (n,) if n != 6 else (2, 3)
    ops_x = [(f, t64(r.normal(size=n) * 2).reshape(shape)) for f in ops if not isinstance(f, pf.box_hyperplane)]
    ops_x += [(f, t64(r.normal(size=n) * 2)) for f in ops if isinstance(f, pf.box_hyperplane) and n >= 2]
    sgl = pf.sparse_group_lasso(0.3, 0.5, group_dim=seed % 2)
    ops_x.append((sgl, t64(r.normal(size=(n, 4)))))
    for f, x in ops_x:
        p = f(x, 1.0)
        y = x - p
        fs = pf.conjugate(f).value(y)
        assert torch.isfinite(fs), f
        assert torch.allclose(f.value(p) + fs, (p * y).sum(), rtol=1e-9, atol=1e-9), f
        # Fenchel-Young inequality at other points z of dom f (feasible points for the sets)
        for _ in range(3):
            z = f(t64(r.normal(size=x.shape) * 3), 1.0) if f.is_projection else t64(r.normal(size=x.shape) * 3)
            assert float(f.value(z) + fs) >= float((z * y).sum()) - 1e-9 * (1 + float(z.abs().sum())), f


def test_conjugate_hyperplane_halfspace_affine_domains():
    r = rng(7)
    a = t64(r.normal(size=5))
    for s in (-1.3, 0.0, 2.1):
        assert torch.allclose(pf.conjugate(pf.hyperplane(a, 0.7)).value(s * a), t64(0.7 * s))
        want = 0.7 * s if s >= 0 else np.inf
        assert float(pf.conjugate(pf.halfspace(a, 0.7)).value(s * a)) == pytest.approx(want)
    off = 2.0 * a + 1e-6 * t64(r.normal(size=5))  # not parallel to a
    assert torch.isinf(pf.conjugate(pf.hyperplane(a, 0.7)).value(off))
    assert torch.isinf(pf.conjugate(pf.halfspace(a, 0.7)).value(off))
    # hyperplane in a pytree: a is flattened like the params
    tree = (2.0 * a[:2], 2.0 * a[2:].reshape(3, 1))
    assert torch.allclose(pf.conjugate(pf.hyperplane(a, -0.5)).value(tree), t64(-1.0))
    A = t64(r.normal(size=(3, 6)))
    A[2] = A[0] + A[1]
    z0 = t64(r.normal(size=6))
    f = pf.conjugate(pf.affine(A, A @ z0))
    for _ in range(4):
        lam = t64(r.normal(size=3))
        y = A.T @ lam
        # independent: <y, z> is the same for every z in the set, e.g. z0 (lam is not unique)
        assert torch.allclose(f.value(y), (lam * (A @ z0)).sum(), rtol=1e-10, atol=1e-12)
        assert torch.isinf(f.value(y + 1e-5 * t64(r.normal(size=6))))
    # hyperparameter learning in A: the value is differentiable in A on the row space
    Ag = A.clone().requires_grad_(True)
    y = A.T @ t64([1.0, -2.0, 0.5])
    pf.conjugate(pf.affine(Ag, A @ z0)).value(y).backward()
    assert Ag.grad is not None and torch.isfinite(Ag.grad).all()


@pytest.mark.parametrize("seed", range(6))
def test_conjugate_box_hyperplane_vs_linprog(seed):
    from proxfunc.calculus import _box_hyperplane_support

    r = rng(200 + seed)
    n = 9
    a = r.uniform(0.2, 3.0, n)
    lo = r.uniform(-2.0, 0.0, n)
    hi = lo + r.uniform(0.0, 2.0, n)  # some zero-width entries
    b = float(a @ (lo + r.uniform(0, 1) * (hi - lo)))
    op = pf.box_hyperplane(t64(lo), t64(hi), b, t64(a))
    ys = [r.normal(size=n), np.round(r.normal(size=n)) * a, np.zeros(n)]  # the 2nd: tied breakpoints
    for y in ys:
        res = linprog(-y, A_eq=a[None], b_eq=[b], bounds=list(zip(lo, hi)), method="highs")
        assert float(pf.conjugate(op).value(t64(y))) == pytest.approx(-res.fun, rel=1e-9, abs=1e-9)
    # infinite bounds (reachable with traced bounds only): a support that is finite on a cone only
    lo_i, hi_i = lo.copy(), hi.copy()
    lo_i[0], hi_i[1] = -np.inf, np.inf
    bnds = [(None if np.isinf(p) else p, None if np.isinf(q) else q) for p, q in zip(lo_i, hi_i)]
    for y in [r.normal(size=n), a * 1.7, a * 1.7 + 0.1 * r.normal(size=n)]:
        res = linprog(-y, A_eq=a[None], b_eq=[b], bounds=bnds, method="highs")
        got = float(_box_hyperplane_support(t64(y), t64(a), t64(lo_i), t64(hi_i), t64(b)))
        want = -res.fun if res.status == 0 else np.inf  # status 3: unbounded
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (y, res.status)


def test_conjugate_index_groups_and_sparse_group_lasso_domains():
    r = rng(11)
    index = torch.tensor([0, 0, 1, -1, 1, 2, 2, 2])
    for cls, dual in ((pf.index_l21, 2), (pf.index_linf1, 1)):
        f = pf.conjugate(cls(index, 0.6))
        y = t64(r.normal(size=8))
        y[3] = 0.0
        for g in range(3):  # scale every group onto the dual-norm sphere of radius reg
            m = index == g
            y[m] *= 0.6 / torch.linalg.vector_norm(y[m], ord=dual)
        assert float(f.value(y)) == 0.0
        assert float(f.value(0.5 * y)) == 0.0
        assert torch.isinf(f.value(1.01 * y))
        y2 = y.clone()
        y2[3] = 1e-3  # a free entry: its conjugate is the indicator of {0}
        assert torch.isinf(f.value(0.5 * y2))
    # every entry free (no group at all): f = 0, the prox is the identity, f* = indicator of {0}
    x = t64(r.normal(size=3))
    for cls in (pf.index_l21, pf.index_linf1):
        f = cls(torch.full((3,), -1), 0.6)
        assert torch.equal(f(x, 1.0), x) and float(f.value(x)) == 0.0
        assert float(pf.conjugate(f).value(0 * x)) == 0.0 and torch.isinf(pf.conjugate(f).value(x))
    # sparse group lasso: y = u + w with |u| <= reg_l1 and every group norm of w <= reg_group
    f = pf.conjugate(pf.sparse_group_lasso(0.3, 0.5, group_dim=0))
    for _ in range(5):
        u = t64(r.uniform(-0.3, 0.3, size=(4, 3)))
        w = t64(r.normal(size=(4, 3)))
        w = w * (0.5 * t64(r.uniform(0, 1, size=(4, 1))) / w.norm(dim=1, keepdim=True))
        assert float(f.value(u + w)) == 0.0
    y = t64(np.full((4, 3), 0.3))
    y[2] += 0.5 / np.sqrt(3)  # soft-thresholded group 2 has norm exactly reg_group
    assert float(f.value(y)) == 0.0
    y[2, 0] += 1e-4
    assert torch.isinf(f.value(y))
