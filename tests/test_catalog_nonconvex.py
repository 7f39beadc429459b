"""Non-convex pruning operators: the output is a global minimiser.

For every operator the objective ``f(z) + ||z - x||^2/(2t)`` at the output is compared with a
dense search (1-D grids for SCAD/MCP/l0, whose objectives are separable) or with all candidate
solutions (every support / every set of groups for l0-type and top-k operators). The classic
closed forms (Fan & Li's SCAD rule, firm thresholding) are checked for ``t = 1``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
from tests.helpers import rng, t64

D = torch.float64
SET = settings(max_examples=30, deadline=None)


def scad_pen(u, lam, a):
    u = np.abs(u)
    return np.where(
        u <= lam,
        lam * u,
        np.where(u <= a * lam, (2 * a * lam * u - u**2 - lam**2) / (2 * (a - 1)), (a + 1) * lam**2 / 2),
    )


def mcp_pen(u, lam, g):
    u = np.abs(u)
    return np.where(u <= g * lam, lam * u - u**2 / (2 * g), g * lam**2 / 2)


def grid_min(x, t, pen):
    """min over a dense grid (plus 0 and x) of pen(z) + (z - x)^2/(2t), for each entry of x."""
    out = []
    for xi in x:
        z = np.concatenate([np.linspace(-abs(xi) - 1, abs(xi) + 1, 200001), [0.0, xi]])
        out.append((pen(z) + (z - xi) ** 2 / (2 * t)).min())
    return np.array(out)


def obj(z, x, t, pen):
    return pen(z) + (z - x) ** 2 / (2 * t)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0, 10.0])  # t > a-1 / t > gamma: non-convex objective
@pytest.mark.parametrize("seed", range(3))
def test_scad_mcp_l0_global_vs_dense_search(t, seed):
    x = rng(seed).normal(size=12) * 3
    lam = 0.6
    for op, pen in (
        (pf.scad(lam, 3.7), lambda z: scad_pen(z, lam, 3.7)),
        (pf.mcp(lam, 2.5), lambda z: mcp_pen(z, lam, 2.5)),
        (pf.l0(lam), lambda z: lam * (np.asarray(z) != 0)),
    ):
        z = op(t64(x), t).numpy()
        mine = obj(z, x, t, pen)
        best = grid_min(x, t, pen)
        assert (mine <= best + 1e-12).all(), (op, t)
        assert float(op.value(t64(z))) == pytest.approx(pen(z).sum(), rel=1e-12, abs=1e-15)


def test_scad_mcp_classic_rules_at_unit_step():
    x = np.linspace(-6, 6, 1201)
    lam, a, g = 0.7, 3.7, 2.5
    ax, sg = np.abs(x), np.sign(x)
    scad_rule = np.where(
        ax <= 2 * lam,
        sg * np.maximum(ax - lam, 0),
        np.where(ax <= a * lam, ((a - 1) * x - sg * a * lam) / (a - 2), x),
    )
    assert np.allclose(pf.scad(lam, a)(t64(x), 1.0).numpy(), scad_rule, atol=1e-12)
    firm = np.where(ax <= lam, 0.0, np.where(ax <= g * lam, sg * (ax - lam) / (1 - 1 / g), x))
    assert np.allclose(pf.mcp(lam, g)(t64(x), 1.0).numpy(), firm, atol=1e-12)


def test_l0_tie_goes_to_zero():
    t, reg = 0.5, 1.0
    thr = np.sqrt(2 * reg * t)
    z = pf.l0(reg)(torch.tensor([thr, -thr, thr * 1.0001], dtype=D), t)
    assert z[0] == 0 and z[1] == 0 and z[2] != 0


@pytest.mark.parametrize("seed", range(6))
def test_group_l0_vs_all_group_subsets(seed):
    r = rng(seed)
    W, b = r.normal(size=(5, 3)), r.normal(size=5)
    t, reg = 0.7, 1.2
    if seed == 0:
        W[2], b[2] = 0, 0
    X = np.c_[W, b]
    best = min(
        reg * len(S) + sum(np.sum(X[i] ** 2) for i in range(5) if i not in S) / (2 * t)
        for k in range(6)
        for S in itertools.combinations(range(5), k)
    )
    op = pf.group_l0(reg)
    Z = np.c_[[z.numpy() for z in op((t64(W), t64(b)), t)][0], op((t64(W), t64(b)), t)[1].numpy()]
    mine = float(op.value((t64(Z[:, :3]), t64(Z[:, 3])))) + np.sum((Z - X) ** 2) / (2 * t)
    assert mine <= best + 1e-12
    assert all(np.array_equal(Z[i], X[i]) or not Z[i].any() for i in range(5))


@pytest.mark.parametrize("seed", range(6))
def test_group_top_k_and_top_k_vs_enumeration(seed):
    r = rng(seed)
    W1, W2 = np.round(r.normal(size=(5, 3)), 1), np.round(r.normal(size=(2, 5)), 1)
    k = 2
    mass = np.sum(W1**2, 1) + np.sum(W2**2, 0)
    best = min(sum(mass[i] for i in range(5) if i not in S) for S in itertools.combinations(range(5), k))
    op = pf.group_top_k(k, group_dim=(0, 1))
    Z1, Z2 = (z.numpy() for z in op((t64(W1), t64(W2))))
    assert np.isclose(np.sum((Z1 - W1) ** 2) + np.sum((Z2 - W2) ** 2), best, atol=1e-12)
    assert op.value((t64(Z1), t64(Z2))) == 0
    # per-row top-k over a pytree: every row of (W1 | b) keeps its k largest entries
    b = np.round(r.normal(size=5), 1)
    Z, zb = (z.numpy() for z in pf.top_k(k, group_dim=0)((t64(W1), t64(b))))
    X, ZZ = np.c_[W1, b], np.c_[Z, zb]
    for i in range(5):
        best_row = min(np.sum(np.delete(X[i], list(S)) ** 2) for S in itertools.combinations(range(4), k))
        assert np.isclose(np.sum((ZZ[i] - X[i]) ** 2), best_row, atol=1e-12)
        assert np.count_nonzero(ZZ[i]) <= k


def test_ties_are_deterministic():
    W = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.5, 0.5]], dtype=D)
    assert pf.group_top_k(1)(W).tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert pf.top_k(1, group_dim=0)(W).tolist() == [[1.0, 0.0], [1.0, 0.0], [0.5, 0.0]]
    assert torch.equal(pf.top_k(2)(W), pf.k_sparse(2)(W))


vec = st.lists(st.floats(-8, 8, allow_nan=False), min_size=5, max_size=5).map(np.array)


@SET
@given(x=vec, s=st.sampled_from([1e-9, 1e-3, 1.0, 1e3, 1e9]), t=st.sampled_from([0.3, 1.0, 5.0]))
def test_scad_mcp_scale_equivariance_and_sign(x, s, t):
    """p_{s lam}(s u) = s^2 p_lam(u) for SCAD and MCP, so prox(s x; s lam) = s prox(x; lam)."""
    for mk in (lambda r: pf.scad(r, 3.0), lambda r: pf.mcp(r, 2.0), pf.l0):
        base = mk(0.8)(t64(x), t).numpy()
        reg = 0.8 * s if mk is not pf.l0 else 0.8 * s * s
        scaled = mk(reg)(t64(x * s), t).numpy()
        assert np.allclose(scaled, s * base, rtol=1e-9, atol=1e-300)
        assert (np.sign(base) * np.sign(x) >= 0).all() and (np.abs(base) <= np.abs(x) + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    x = t64(rng(4).normal(size=(6, 5)) * 2)
    for op in (pf.l0(0.4), pf.group_l0(0.4), pf.top_k(2, group_dim=1), pf.group_top_k(3), pf.scad(0.4), pf.mcp(0.4)):
        xl = x.to(dtype)
        z = op(xl, 0.7)
        assert z.dtype == dtype
        assert torch.allclose(z.double(), op(xl.double(), 0.7).to(dtype).double(), atol=1e-2, rtol=1e-2), op


def test_validation():
    with pytest.raises(ValueError, match="a must be > 2"):
        pf.scad(1.0, a=2.0)
    with pytest.raises(ValueError, match="gamma"):
        pf.mcp(1.0, gamma=0.0)
    with pytest.raises(ValueError, match="reg"):
        pf.l0(-1.0)
    with pytest.raises(ValueError, match="k=4"):
        pf.group_top_k(4)(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="k=3"):
        pf.top_k(3, group_dim=0)(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="k must be an int"):
        pf.top_k(1.5)
    with pytest.raises(ValueError, match="different numbers of groups"):
        pf.group_l0(1.0, group_dim=(0, 0))((torch.zeros(3, 2), torch.zeros(4)))
