"""Every operator's ``value`` accepts every output of its own prox, at every scale.

For each operator of :data:`tests.cases.CASES`, inputs from 1e-6 to 1e6 times the case's natural
scale (its hyperparameters fixed: a set far from, or deep inside, a large input) in float64
and float32, several steps: ``op.value(op(x, t))`` is finite (``0`` for a projection).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

import proxfunc as pf
from tests.cases import CASES, Case, mats, sq_mats

_G = torch.Generator().manual_seed(18)
_A = torch.randn(30, generator=_G, dtype=torch.float64)
_W = torch.rand(30, generator=_G, dtype=torch.float64) + 0.1
_M = torch.randn(4, 30, generator=_G, dtype=torch.float64)
_B = torch.randn(30, 3, generator=_G, dtype=torch.float64)
_PSD_SINGULAR = _B @ _B.T  # rank 3

# the defect classes of issue 18 beyond the shared cases: sets with general data, conjugates of
# every operator with a closed form (duals of norms, of singular quadratics, of sets)
EXTRA = (
    [
        Case("hyperplane_random", lambda: pf.hyperplane(_A, 0.3), projection=True),
        Case("halfspace_random", lambda: pf.halfspace(_A, -0.3), projection=True),
        Case("affine_random", lambda: pf.affine(_M, _M @ torch.ones(30, dtype=torch.float64)), projection=True),
        Case("box_hyperplane_weighted", lambda: pf.box_hyperplane(-0.5, 0.7, 1.0, a=_W), projection=True),
        Case("quadratic_singular_c", lambda: pf.quadratic(_PSD_SINGULAR, _A, c=-2.0)),
    ]
    + [
        Case(f"conjugate_{name}", make)
        for name, make in [
            ("l1", lambda: pf.conjugate(pf.l1(0.8))),
            ("linf", lambda: pf.conjugate(pf.linf(0.8))),
            ("l21", lambda: pf.conjugate(pf.l21(0.5))),
            ("elastic_net", lambda: pf.conjugate(pf.elastic_net(0.3, 0.7))),
            ("huber", lambda: pf.conjugate(pf.huber(0.8, 0.5))),
            ("ridge", lambda: pf.conjugate(pf.ridge(0.7))),
            ("quadratic_singular", lambda: pf.conjugate(pf.quadratic(_PSD_SINGULAR))),
            ("box", lambda: pf.conjugate(pf.box(-0.5, 0.7))),
            ("l2_ball", lambda: pf.conjugate(pf.l2_ball(1.0))),
            ("simplex", lambda: pf.conjugate(pf.simplex(2.0))),
            ("nonneg", lambda: pf.conjugate(pf.nonneg())),
            ("hyperplane", lambda: pf.conjugate(pf.hyperplane(_A, 0.3))),
            ("scale_l1", lambda: pf.conjugate(pf.scale(pf.l1(0.5), 2.0))),
        ]
    ]
    + [
        Case("conjugate_nuclear", lambda: pf.conjugate(pf.nuclear(0.5)), mats),
        Case("conjugate_spectral", lambda: pf.conjugate(pf.spectral(0.5)), mats),
        Case("conjugate_psd", lambda: pf.conjugate(pf.psd()), sq_mats),
        Case("sum_of", lambda: pf.sum_of(pf.l1(0.3), pf.nonneg(), pf.box(-1.0, 0.5))),
        Case("intersection", lambda: pf.intersection(pf.nonneg(), pf.l2_ball(1.0)), projection=True),
        Case("birkhoff", lambda: pf.birkhoff(), sq_mats, projection=True),
        Case("tv2d_iso", lambda: pf.tv2d(0.3), mats),
        Case("tv2d_aniso", lambda: pf.tv2d(0.3, isotropic=False), mats),
    ]
)

SCALES = [1e-6, 1e-3, 1.0, 1e3, 1e6]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + EXTRA, ids=repr)
def test_value_accepts_own_prox(case, dtype):
    op = case.make_op()
    bad = []
    for seed in range(2):
        base = case.make_params(torch.float64, seed) if seed else case.make_params(torch.float64)
        for s in SCALES:
            x = tree_map(lambda t, s=s: (t * s).to(dtype), base)
            for step in (0.1, 1.0, 10.0):
                z = op(x, step)
                v = op.value(z)
                ok = bool(v == 0) if case.projection else bool(torch.isfinite(v))
                if not ok:
                    bad.append(f"seed={seed} scale={s:g} step={step:g}: value={float(v)}")
    assert not bad, f"{case.name} {dtype}:\n" + "\n".join(bad)


# ---------------------------------------------------------------- the defects of issue 18, one by one
D = torch.float64


def test_conjugate_accepts_dual_points_built_by_hand():
    x = torch.tensor([1000.3, -2.0, 0.1], dtype=D)
    op, t = pf.l1(0.8), 0.1
    y = (x - op(x, t)) / t  # |x| / t = 1e4 |y|: y carries an absolute error of about eps * 1e4
    assert float(pf.conjugate(op).value(y)) == 0.0
    assert torch.isinf(pf.conjugate(op).value(y * (1 + 1e-6)))  # still a tight test
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=D) * 10
    nuc = pf.nuclear(0.5)
    Y = (X - nuc(X, t)) / t
    assert float(pf.conjugate(nuc).value(Y)) == 0.0
    assert torch.isinf(pf.conjugate(nuc).value(Y * 1.01))


@pytest.mark.parametrize(
    "make",
    [
        lambda: pf.l1(0.8),
        lambda: pf.l2(0.8),
        lambda: pf.linf(0.8),
        lambda: pf.l21(0.5),
        lambda: pf.huber(0.8, 0.5),
        lambda: pf.nonneg(),
        lambda: pf.scale(pf.l1(0.5), 2.0),
        lambda: pf.scale(pf.huber(0.5, 0.3), 3.0),
    ],
)
def test_conjugate_direct_prox_is_the_moreau_identity(make):
    op = make()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=D) * 2
    for t in (0.1, 1.0, 7.0):
        moreau = x - t * op(x / t, 1 / t)
        torch.testing.assert_close(pf.conjugate(op)(x, t), moreau, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: pf.nuclear(0.5), lambda: pf.spectral(0.5)])
def test_conjugate_direct_prox_of_matrix_norms(make):
    op = make()
    x = (torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(6), dtype=D) * 2,)
    for t in (0.1, 1.0):
        moreau = x[0] - t * op((x[0] / t,), 1 / t)[0]
        torch.testing.assert_close(pf.conjugate(op)(x, t)[0], moreau, rtol=1e-10, atol=1e-10)


def test_quadratic_conjugate_with_singular_psd_A():
    g = torch.Generator().manual_seed(7)
    B = torch.randn(6, 2, generator=g, dtype=D)
    A = B @ B.T  # rank 2
    b = torch.randn(6, generator=g, dtype=D)
    f = pf.quadratic(A, b, c=0.4)
    fs = pf.conjugate(f)
    for _ in range(5):
        # in the range: the supremum is attained at z = A^+ (y - b): f*(y) = <y, z> - f(z)
        y = b + A @ torch.randn(6, generator=g, dtype=D)
        z = torch.linalg.pinv(A) @ (y - b)
        want = y @ z - f.value(z)
        torch.testing.assert_close(fs.value(y), want, rtol=1e-9, atol=1e-9)
        assert float(fs.value(y)) >= -float(f.value(torch.zeros(6, dtype=D))) - 1e-12
        # off the range: +inf (the supremum along the null space is unbounded)
        assert torch.isinf(fs.value(y + 1e-3 * torch.randn(6, generator=g, dtype=D)))
    A0 = torch.diag(torch.tensor([2.0, 0.0, 0.0], dtype=D))  # exactly singular
    f0 = pf.conjugate(pf.quadratic(A0))
    assert float(f0.value(torch.tensor([2.0, 0.0, 0.0], dtype=D))) == 1.0
    assert torch.isinf(f0.value(torch.tensor([2.0, 1.0, 0.0], dtype=D)))
    assert float(pf.quadratic(A0, c=-3.0).value(torch.ones(3, dtype=D))) == -2.0
    with pytest.raises(ValueError, match="c"):
        pf.quadratic(A0, c=float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", [1e3, 1e6])
def test_refined_projections_stay_exact(dtype, s):
    """The refinement changes the rounded output only: it stays the float64 projection's rounding."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(30, generator=g, dtype=D) * s).to(dtype)
    eps = torch.finfo(dtype).eps
    for op in (pf.hyperplane(_A, 0.3), pf.halfspace(_A, -0.3), pf.affine(_M, _M @ torch.ones(30, dtype=D))):
        z = op(x)
        op64 = type(op)(*(getattr(op, k).double() if isinstance(getattr(op, k), torch.Tensor) else getattr(op, k)
                          for k in op._hyper_names))  # fmt: skip
        ref = op64(x.double())
        assert (z.double() - ref).abs().max() <= 64 * eps * x.double().abs().max()
        assert float(op.value(z)) == 0.0
    w = _W.to(dtype)
    bh = pf.box_hyperplane(-0.5, 0.7, 1.0, a=w)
    z = bh(x)
    assert float(bh.value(z)) == 0.0
    ref = pf.box_hyperplane(-0.5, 0.7, 1.0, a=w.double())(x.double())
    assert (z.double() - ref).abs().max() <= 64 * eps * x.double().abs().max()
