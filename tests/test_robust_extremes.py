"""Right answers at the extremes of each dtype's range (issue 20): scaled norms and stable formulas,
checked against float64 (or exact) references. The fuzz test (tests/test_fuzz.py) sweeps every
operator; these are the named cases, with their exact answers."""

from __future__ import annotations

import math

import pytest
import torch

import proxfunc as pf

F32 = torch.finfo(torch.float32)


def close(a, b, rtol=1e-6):
    torch.testing.assert_close(a.double(), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "dtype, s", [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.float64, 1e200), (torch.float64, 1e-200)]
)
def test_l2_ball_sphere_and_l2_where_the_squares_overflow_or_underflow(dtype, s):
    x = torch.tensor([3.0, 4.0], dtype=torch.float64).mul(s).to(dtype)
    r = 2.5 * s
    close(pf.l2_ball(r)(x), [1.5 * s, 2.0 * s])
    close(pf.l2_sphere(r)(x), [1.5 * s, 2.0 * s])
    if s > 1:
        close(pf.l2_ball(1.0)(x), [0.6, 0.8])
    close(pf.l2_sphere(1.0)(x), [0.6, 0.8])
    close(pf.l2(1.0)(x, 2.5 * s), [1.5 * s, 2.0 * s])  # ||x|| = 5s, threshold 2.5s: x / 2
    close(pf.l2(1.0).value(x), 5 * s)


def test_l2_ball_sphere_at_the_top_of_float32():
    x = torch.full((8,), F32.max / 2)  # ||x|| = sqrt(8) max / 2, beyond float32
    want = torch.full((8,), 1 / math.sqrt(8))
    close(pf.l2_ball(1.0)(x), want)
    close(pf.l2_sphere(1.0)(x), want)
    close(pf.conjugate(pf.l2(1.0))(x, 1.0), want)


def test_subnormal_direction():
    x = torch.tensor([3.0, 4.0]) * 1e-44  # subnormal float32 entries (3 and 4 times the smallest step, rounded)
    d = x.double() / x.double().norm()
    close(pf.l2_sphere(1.0)(x), d, rtol=1e-6)


def test_zero_group_has_finite_gradients_with_scaled_norms():
    for op in (pf.l2(0.3), pf.l2_ball(0.5), pf.l2_sphere(1.0)):
        x = torch.zeros(4, requires_grad=True)
        op(x, 0.5).sum().backward()
        assert torch.isfinite(x.grad).all(), op
    x = torch.zeros(4, requires_grad=True)
    pf.l2(0.3).value(x).backward()
    assert torch.isfinite(x.grad).all()


def test_soc_at_1e20_float32():
    x = torch.tensor([1e20, 2e20, -1e20])
    ref = pf.soc()(x.double())
    close(pf.soc()(x), ref, rtol=1e-6)
    assert torch.isfinite(pf.soc()(x)).all()


@pytest.mark.parametrize("make", [lambda r: pf.scad(r, a=3.7), lambda r: pf.mcp(r, gamma=2.5)])
@pytest.mark.parametrize("reg", [1e30, 1e39, 1e300])
def test_scad_mcp_huge_reg_gives_zero(make, reg):
    x = torch.tensor([1.0, -2.0, 1e29, -1e-40])  # every |x| <= step * reg: the prox is 0
    assert torch.equal(make(reg)(x, 1.0).abs(), torch.zeros(4))
    assert torch.equal(make(reg)(x.double(), 1.0).abs(), torch.zeros(4, dtype=torch.float64))


def test_scad_mcp_scale_invariance_at_extremes():
    for s in (1e-30, 1e30):
        x = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
        for op, ops in ((pf.scad(0.4), pf.scad(0.4 * s)), (pf.mcp(0.4, gamma=2.5), pf.mcp(0.4 * s, gamma=2.5))):
            close(ops((x * s).float(), 1.0), op(x, 1.0) * s, rtol=1e-5)


def test_group_top_k_ranks_at_overflow_and_underflow():
    big = torch.tensor([[3e19, 3e19], [4e19, 4e19], [1e19, 1e19]])
    assert torch.equal(pf.group_top_k(1)(big, 1.0), torch.tensor([[0.0, 0.0], [4e19, 4e19], [0.0, 0.0]]))
    tiny = big * 1e-49
    out = pf.group_top_k(1)(tiny, 1.0)
    assert torch.equal(out[1], tiny[1]) and not out[0].any() and not out[2].any()


def test_box_hyperplane_at_1e20():
    op = pf.box_hyperplane(-1e21, 1e21, 1e20)
    x = torch.tensor([1e20, 3e20, -2e20, 5e19])
    z = op(x)
    ref = op(x.double())
    close(z, ref, rtol=1e-6)
    assert op.value(z) == 0


def test_log_barrier_at_3e38():
    x = torch.tensor([3e38, -3e38, 1.0])
    close(pf.log_barrier(0.2)(x, 1.0), pf.log_barrier(0.2)(x.double(), 1.0), rtol=1e-6)
    close(pf.log_barrier(1e39)(x, 1.0), pf.log_barrier(1e39)(x.double(), 1.0), rtol=1e-6)


def test_conjugate_of_norms_is_the_dual_ball_projection():
    x = torch.tensor([1e6, 1e6])
    close(pf.conjugate(pf.l2(0.8))(x, 1.0), [0.8 / math.sqrt(2)] * 2)
    close(pf.conjugate(pf.l1(0.8))(x, 1.0), [0.8, 0.8])
    close(pf.conjugate(pf.linf(0.8))(x, 1.0), [0.4, 0.4])


def test_neg_entropy_beyond_the_range():
    x = torch.tensor([1.0, 3e38, -3e38, 0.0])
    for reg, step in ((1e39, 1.0), (0.4, 1e-30)):
        close(pf.neg_entropy(reg)(x, step), pf.neg_entropy(reg)(x.double(), step), rtol=1e-5)


def test_affine_sets_and_l1_projections_at_the_top_of_float32():
    x = torch.linspace(-1, 1, 30).mul(F32.max / 2)
    a = torch.linspace(-1, 2, 30, dtype=torch.float64)
    for op in (pf.hyperplane(a, 0.3), pf.halfspace(a, -0.3), pf.l1_ball(1.5), pf.simplex(2.0)):
        ref = op(x.double())
        got = op(x)
        assert torch.isfinite(got).all(), op
        err = (got.double() - ref).abs().max()
        assert err <= 1e-5 * ref.abs().max(), (op, err)
