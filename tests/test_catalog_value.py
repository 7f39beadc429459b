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
