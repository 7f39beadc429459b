"""Properties every catalog operator must have, over its registered example (tests/cases.py).

* convex operators: non-expansive, and the prox optimality inequality
  ``f(y) >= f(p) + <(x - p)/t, y - p>`` for points ``y`` of ``dom f`` (``y`` is itself a prox
  output, so it lies in the domain);
* every operator: ``value`` finite at its own output (the output lies in ``dom f``), inputs
  untouched, dtype kept and results finite for float32/bfloat16 and for inputs scaled by
  1e-9..1e9, projections idempotent, the prox beats the input on the prox objective.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
from tests.cases import CASES
from tests.helpers import pytree

SET = settings(max_examples=25, deadline=None)
_FIRST = [c.name for c in CASES].index("ridge")
CATALOG = CASES[_FIRST:]
CONVEX = [c for c in CATALOG if c.convex]


def leaves(t):
    return [x for x in pytree.tree_leaves(t) if x is not None]


def flat(t):
    return torch.cat([x.reshape(-1).double() for x in leaves(t)])


def dot(a, b):
    return (flat(a) * flat(b)).sum()


def sub(a, b):
    return pytree.tree_map(lambda u, v: u - v, a, b)


def scaled(t, s):
    return pytree.tree_map(lambda u: u * s, t)


@pytest.mark.parametrize("case", CONVEX, ids=repr)
@SET
@given(seed=st.integers(0, 10_000), t=st.sampled_from([0.1, 0.7, 3.0]), s=st.sampled_from([0.3, 1.0, 4.0]))
def test_convex_nonexpansive_and_optimality(case, seed, t, s):
    op = case.make_op()
    x = scaled(case.make_params(torch.float64, seed), s)
    w = scaled(case.make_params(torch.float64, seed + 1), s)
    p, q = op(x, t), op(w, t)
    assert (flat(p) - flat(q)).norm() <= (flat(x) - flat(w)).norm() * (1 + 1e-9) + 1e-12
    # q is in dom f; f(q) >= f(p) + <(x - p)/t, q - p>
    fp, fq = op.value(p), op.value(q)
    assert torch.isfinite(fp) and torch.isfinite(fq)
    lhs = fq
    rhs = fp + dot(sub(x, p), sub(q, p)) / t
    assert lhs >= rhs - 1e-9 * (1 + lhs.abs() + rhs.abs())


@pytest.mark.parametrize("case", CATALOG, ids=repr)
def test_output_in_domain_beats_input_and_idempotent(case):
    op = case.make_op()
    x = case.make_params(torch.float64, 3)
    t = 0.7
    p = op(x, t)
    fp = op.value(p)
    assert torch.isfinite(fp)
    fx = op.value(x)
    if torch.isfinite(fx):  # the prox objective at p is no worse than at x
        assert fp + (flat(p) - flat(x)).pow(2).sum() / (2 * t) <= fx + 1e-10 * (1 + fx.abs())
    if case.projection:
        p2 = op(p, 2 * t)
        for a, b in zip(leaves(p), leaves(p2)):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CATALOG, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtype_and_finite(case, dtype):
    op = case.make_op()
    x = case.make_params(dtype, 5)
    out = op(x, 0.7)
    for a, b in zip(leaves(x), leaves(out)):
        assert b.dtype == dtype and b.shape == a.shape and torch.isfinite(b).all()
    assert torch.isfinite(op.value(out))


@pytest.mark.parametrize("case", CATALOG, ids=repr)
@pytest.mark.parametrize("s", [1e-9, 1e9])
def test_extreme_scales_finite(case, s):
    op = case.make_op()
    x = scaled(case.make_params(torch.float64, 7), s)
    out = op(x, 0.7)
    for b in leaves(out):
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("case", CATALOG, ids=repr)
def test_pickle_repr_hash(case):
    import pickle

    op = case.make_op()
    op2 = pickle.loads(pickle.dumps(op))
    assert type(op2) is type(op) and repr(op2) == repr(op)
    hash(op)
    x = case.make_params(torch.float64, 2)
    for a, b in zip(leaves(op(x, 0.5)), leaves(op2(x, 0.5))):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


_HYPER = {
    "ridge": lambda r: pf.ridge(r),
    "huber.reg": lambda r: pf.huber(r, 0.5),
    "huber.delta": lambda r: pf.huber(0.7, r),
    "neg_entropy": lambda r: pf.neg_entropy(r),
    "sum_largest": lambda r: pf.sum_largest(3, r),
    "max_entry": lambda r: pf.max_entry(r),
    "l2_sphere": lambda r: pf.l2_sphere(r),
    "l1_sphere": lambda r: pf.l1_sphere(r),
    "box_hyperplane.b": lambda r: pf.box_hyperplane(-1.0, 1.0, r),
    "hyperplane.b": lambda r: pf.hyperplane(torch.ones(24, dtype=torch.float64), r),
    "index_l21": lambda r: pf.index_l21(torch.arange(24) % 5, r),
    "index_linf1": lambda r: pf.index_linf1(torch.arange(24) % 5, r),
    "sparse_group_lasso": lambda r: pf.sparse_group_lasso(r, 0.3),
    "nuclear": lambda r: pf.nuclear(r),
    "nuclear_ball": lambda r: pf.nuclear_ball(3 * r),
    "spectral": lambda r: pf.spectral(r),
    "scad": lambda r: pf.scad(r),
    "mcp": lambda r: pf.mcp(r),
    "scale": lambda r: pf.scale(pf.l1(0.3), r),
    "precompose": lambda r: pf.precompose(pf.l1(0.3), r, 0.1),
    "add_quadratic": lambda r: pf.add_quadratic(pf.l1(0.3), r, 0.2),
    "moreau_env": lambda r: pf.moreau_env(pf.l1(0.3), r),
}


@pytest.mark.parametrize("name", list(_HYPER), ids=str)
def test_hyperparameter_gradient_matches_finite_difference(name):
    """A tensor hyperparameter may require grad (hyperparameter learning through the prox)."""
    f = _HYPER[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    r = torch.tensor(0.61, dtype=torch.float64, requires_grad=True)
    (gr,) = torch.autograd.grad((f(r)(x, 0.7) * w).sum(), r)
    h = 1e-6
    up = (f(torch.tensor(0.61 + h, dtype=torch.float64))(x, 0.7) * w).sum()
    dn = (f(torch.tensor(0.61 - h, dtype=torch.float64))(x, 0.7) * w).sum()
    fd = (up - dn) / (2 * h)
    assert abs(float(gr) - float(fd)) <= 1e-5 * (1 + abs(float(fd)))
