"""The sort-free thresholds (eager fixed point and unrolled traceable) equal the sort reference.

Oracle: ``threshold_sort`` (Held-Wolfe-Crowder / Duchi et al. sort + cumsum) and the defining
equation ``sum_j max(v_j - theta, 0) = r``. Adversarial inputs: ties, all-equal rows, rows
already inside the ball, zero rows, huge and tiny radii, geometric and cubic spreads, groups
spread over several tensors with different group dims, blocks smaller than a row.
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
import proxfunc.kernels.threshold  # noqa: F401
from proxfunc import dispatch, norms
from proxfunc.compat import apply_

K = sys.modules["proxfunc.kernels.threshold"]
METHODS = {"fixed_point": K.threshold_fixed_point, "unrolled": K.threshold_unrolled, "max": K.threshold_max}


def tol(v, dtype):
    eps = torch.finfo(dtype).eps
    return 8 * eps * (float(v.abs().max()) if v.numel() else 1.0) * max(1, v.shape[-1]) ** 0.5


def rows(name, dtype):
    g = torch.Generator().manual_seed(0)
    n = 257
    out = {
        "gauss": torch.randn(16, n, generator=g, dtype=torch.float64),
        "ties": torch.randint(-2, 3, (16, n), generator=g).double(),
        "all_equal": torch.full((4, n), -0.75, dtype=torch.float64),
        "zeros": torch.zeros(4, n, dtype=torch.float64),
        "geometric": (0.5 ** torch.arange(n, dtype=torch.float64)).repeat(3, 1),
        "cubic": (torch.arange(n, dtype=torch.float64) ** 3).repeat(2, 1),
        "tiny_values": torch.randn(8, n, generator=g, dtype=torch.float64) * 1e-30,
        "one_big": torch.cat([torch.full((4, 1), 1e6), torch.rand(4, n - 1, generator=g)], 1).double(),
    }[name]
    return out.to(dtype)


RADII = [0.0, 1e-30, 1e-8, 0.5, 3.0, 100.0, 1e8, 1e30]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name", ["gauss", "ties", "all_equal", "zeros", "geometric", "cubic", "tiny_values", "one_big"]
)
@pytest.mark.parametrize("absolute", [False, True])
def test_matches_sort_reference_on_adversarial_rows(method, dtype, name, absolute):
    v = rows(name, dtype)
    for r in RADII:
        if r == 0.0 and not absolute:
            continue  # the simplex needs r > 0
        ref = K.threshold_sort([(v, 0)], r, absolute=absolute)
        got = METHODS[method]([(v, 0)], r, absolute=absolute)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        # exact to rounding in the threshold, relative to the data and to r
        scale = tol(v, dtype) + 8 * torch.finfo(dtype).eps * r
        assert (got - ref).abs().max() <= scale, (name, r)
        if absolute:  # what l1_ball / linf1 use: tau = max(theta, 0) must be feasible and tight
            tau = got.clamp_min(0)
            excess = (v.abs() - tau[:, None]).clamp_min(0).sum(1)
            inside = v.abs().sum(1) <= r
            assert torch.all(torch.where(inside, tau == 0, (excess - r).abs() <= scale * v.shape[1] + 1e-300))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", [7, 32])
def test_groups_spread_over_parts_and_small_blocks(method, block, monkeypatch):
    # 7: blocks of one row; 32: blocks of 4 rows then 2 (the last block uses a narrowed,
    # for w2 non-contiguous, view of the shared workspace)
    monkeypatch.setattr(K, "_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b1 = torch.randn(6, generator=g, dtype=torch.float64)
    w2 = torch.randn(3, 6, generator=g, dtype=torch.float64)
    parts = [(w1, 0), (b1, 0), (w2, 1)]
    before = [a.clone() for a, _ in parts]
    for r in (0.1, 1.0, 4.0, 50.0):
        for absolute in (True, False):
            ref = K.threshold_sort(parts, r, absolute=absolute)
            got = METHODS[method](parts, r, absolute=absolute)
            torch.testing.assert_close(got, ref)
    assert all(torch.equal(a, b) for (a, _), b in zip(parts, before))  # inputs untouched


def test_single_group_over_several_tensors():
    g = torch.Generator().manual_seed(2)
    parts = [(torch.randn(5, 3, generator=g), None), (torch.randn(7, generator=g), None)]
    for r in (0.01, 1.0, 30.0):
        torch.testing.assert_close(K.threshold(parts, r, traceable=False), K.threshold_sort(parts, r))
        torch.testing.assert_close(K.threshold(parts, r, traceable=True), K.threshold_sort(parts, r))


def test_unrolled_converges_on_long_gaussian_rows():
    # The benchmark's shape: rows of 4096 Gaussian entries, radii from small to large.
    v = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3))
    for r in (0.01, 1.0, 5.0, 100.0, 1000.0):
        ref = K.threshold_sort([(v, 0)], r, absolute=True)
        torch.testing.assert_close(K.threshold_unrolled([(v, 0)], r, absolute=True), ref)


def test_gradients_flow_to_values_and_radius():
    v = torch.rand(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = torch.tensor(0.7, dtype=torch.float64)
    for fn in METHODS.values():
        assert torch.autograd.gradcheck(lambda a, b, fn=fn: fn([(a, 0)], b), (v.requires_grad_(), r.requires_grad_()))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 40),
    st.floats(1e-6, 1e3),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1.0, 1e-3, 1e4]),
    st.booleans(),
)
def test_random_shapes_match_sort(g, n, r, seed, scale, quantize):
    x = torch.randn(g, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if quantize:  # many ties
        x = torch.round(x * 2) / 2
    ref = K.threshold_sort([(x, 0)], r, absolute=True)
    for fn in METHODS.values():
        got = fn([(x, 0)], r, absolute=True)
        assert (got - ref).abs().max() <= tol(x, x.dtype) + 1e-12 * r


@pytest.mark.parametrize("name", ["gauss", "ties", "all_equal", "zeros", "geometric", "one_big"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block", [None, 100])
def test_single_group_compaction_path(name, dtype, block, monkeypatch):
    # d=None on every part: the eager path streams the values in chunks while many entries
    # are active, then filters the candidates after each step. block=100: chunks of 100
    # entries, none lined up with the parts (2 x 257 and 14 x 257 or fewer entries)
    if block is not None:
        monkeypatch.setattr(K, "_BLOCK", block)
    v = rows(name, dtype)
    parts = [(v[:2], None), (v[2:].reshape(-1), None)]
    for r in (1e-30, 1e-3, 1.0, 50.0, 1e30):
        ref = K.threshold_sort(parts, r, absolute=True)
        for fn in METHODS.values():
            got = fn(parts, r, absolute=True)
            assert (got - ref).abs().max() <= tol(v.reshape(1, -1), v.dtype) + 8 * torch.finfo(v.dtype).eps * r


@pytest.mark.parametrize("absolute", [True, False])
def test_single_group_over_parts_of_different_dtypes(absolute, monkeypatch):
    # linf / l1_ball / simplex over a float32 and a float64 tensor: one group, computed in
    # float64; chunks of 100 entries so that the streamed steps convert chunk by chunk
    monkeypatch.setattr(K, "_BLOCK", 100)
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(300, generator=g), torch.randn(7, 50, generator=g, dtype=torch.float64)
    for r in (1e-3, 0.1, 5.0, 1e3):
        got = K.threshold_fixed_point([(a, None), (b, None)], r, absolute=absolute)
        ref = K.threshold_sort([(a.double(), None), (b, None)], r, absolute=absolute)
        assert got.dtype == torch.float64
        assert (got - ref).abs().max() <= 1e-12 * (1 + r)
    for op in (pf.linf(2.0), pf.l1_ball(3.0), pf.simplex(3.0)):
        fast = op([a, b], 1.0)
        slow = op([a.clone().requires_grad_(), b.clone().requires_grad_()], 1.0)
        for u, v in zip(fast, slow):
            if isinstance(op, pf.linf):  # its gradient path re-evaluates the threshold
                torch.testing.assert_close(u, v.detach(), rtol=0, atol=1e-6)
            else:  # the eager in-place polish: bit for bit, also across dtypes
                assert u.dtype == v.dtype and torch.equal(u, v.detach())


def test_operators_eager_blocked_equal_traced_and_sort(monkeypatch):
    import proxfunc as pf

    monkeypatch.setattr(K, "_BLOCK", 5000)  # several blocks on a 64 x 300 matrix
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(6))
    for op in (pf.linf1(2.0), pf.linf(30.0), pf.l1_ball(40.0), pf.simplex(3.0)):
        eager = op(x, 1.0)
        traced = torch.func.vmap(lambda s, op=op: op(x, s))(torch.tensor([1.0]))[0]  # the unrolled path
        torch.testing.assert_close(eager, traced)
    tau = K.threshold_sort([(x, 0)], 2.0, absolute=True).clamp_min(0)[:, None]
    torch.testing.assert_close(pf.linf1(2.0)(x, 1.0), torch.clamp(x, -tau, tau))


def test_radius_zero_on_tied_maxima():
    # r = 0: theta is the group max; rounding of k * max / k must not lose the active set.
    v = torch.tensor([[0.1, 0.1, 0.1, 0.05], [1 / 3, 1 / 3, 1 / 3, 1 / 3]], dtype=torch.float32)
    for fn in METHODS.values():
        got = fn([(v, 0)], 0.0, absolute=True)
        torch.testing.assert_close(got, v.amax(1), rtol=2e-7, atol=0)
        x = v.clone().requires_grad_()
        assert torch.isfinite(torch.autograd.grad(fn([(x, 0)], 0.0, absolute=True).sum(), x)[0]).all()


# ------------------------------------------ l1 over many leaves: the multi-tensor (foreach) path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
def test_l1_foreach_path_is_bitwise_softshrink(dtype, scale, monkeypatch):
    # The foreach path runs on CUDA only; forcing it here on the CPU (where "auto" takes the C
    # kernel, ruled out by "aten") checks its arithmetic.
    monkeypatch.setattr(norms, "_FOREACH_DEVICES", ("cpu", "cuda"))
    with dispatch.implementation("aten"):
        g = torch.Generator().manual_seed(3)
        t = 0.37 * scale
        shapes = [(7, 5), (5,), (1,), (3, 2, 4), (0, 3)]
        leaves = [torch.randn(*shape, generator=g, dtype=dtype) * scale for shape in shapes]
        leaves[0][0, :3] = torch.tensor([t, -t, 0.0], dtype=dtype)  # exactly at the kink, and a zero
        leaves[1][:] = 0.0  # a zero leaf
        want = [torch.nn.functional.softshrink(x, t) for x in leaves]
        got = pf.l1(0.37)(leaves, scale)
        assert len(got) == len(want)
        for a, b, x in zip(got, want, leaves):
            assert torch.equal(a, b) and a.dtype == dtype and (a is not x or not x.numel())
            assert not torch.signbit(a[a == 0]).any()  # +0, as the reference gives
        # gradients requested: the per-leaf path (autograd through softshrink), same values
        req = [x.clone().requires_grad_() for x in leaves[:3]]
        out = pf.l1(0.37)(req, scale)
        assert all(o.grad_fn is not None for o in out)
        assert all(torch.equal(o.detach(), w) for o, w in zip(out, want[:3]))
        # it is taken: the foreach ops are called
        calls = []
        real = torch._foreach_sub
        monkeypatch.setattr(torch, "_foreach_sub", lambda *a: calls.append(1) or real(*a))
        pf.l1(0.37)(leaves, scale)
        assert calls == [1]
        # in place (compat.apply_): the same kernels writing into the leaves, bit for bit
        real_ = torch._foreach_sub_
        monkeypatch.setattr(torch, "_foreach_sub_", lambda *a: calls.append(2) or real_(*a))
        copies = [x.clone() for x in leaves]
        apply_(pf.l1(0.37), copies, scale)
        assert calls == [1, 2]
        for a, b in zip(copies, want):
            assert torch.equal(a, b) and not torch.signbit(a[a == 0]).any()


# ----------------------------------------------- block soft thresholding near its kink
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
def test_block_scale_keeps_relative_accuracy_just_above_the_kink(dtype, grad):
    """Groups of one entry have an exact norm ``|x|``, so l21, l2 and index_l21 must equal soft
    thresholding ``x - t sign(x)`` to a few ulps also when ``|x|`` is barely above ``t``.
    ``1 - t/|x|`` would lose ``eps / delta`` of relative accuracy there (3e-3 at delta=1e-5
    in float32); ``(|x| - t) / |x|`` is exact up to two roundings."""
    eps = torch.finfo(dtype).eps
    t = 0.37
    delta = torch.logspace(-6 if dtype == torch.float32 else -14, 0, 41, dtype=torch.float64)
    x = torch.cat([t * (1 + delta), -t * (1 + delta)]).to(dtype)
    td = float(torch.tensor(t, dtype=dtype))  # the kernels compute with t rounded to dtype
    want = torch.sign(x.double()) * (x.double().abs() - td)  # exact: Sterbenz, in float64
    idx = torch.arange(x.numel())
    ops = {
        "l21": (pf.l21(1.0), x.reshape(-1, 1)),
        "l21_vector": (pf.l21(1.0), x),
        "index_l21": (pf.index_l21(idx, 1.0), x),
    }
    for name, (op, arg) in ops.items():
        arg = arg.clone().requires_grad_(grad)
        got = op(arg, t).detach().reshape(-1).double()
        rel = ((got - want).abs() / want.abs()).max()
        assert rel <= 3 * eps, (name, float(rel))
    for xi, wi in zip(x[::10], want[::10]):  # l2 of a one-entry tensor
        got = pf.l2(1.0)(xi.reshape(1).clone().requires_grad_(grad), t).detach().double()
        assert abs(float(got) - float(wi)) <= 3 * eps * abs(float(wi))


@pytest.mark.parametrize("grad", [False, True])
def test_block_scale_of_an_infinite_norm_is_one_not_nan(grad):
    x = torch.tensor([[float("inf"), 1.0], [0.0, 0.0], [3.0, 4.0]], requires_grad=grad)
    out = pf.l21(1.0)(x, 1.0).detach()
    assert torch.equal(out[0], x.detach()[0]) and not out[1].any()
    assert torch.allclose(out[2], torch.tensor([2.4, 3.2]))
    assert not torch.isnan(out).any()


def test_threshold_max_gradients_equal_the_sort_reference_away_from_ties():
    """The small-input path (max over the prefix candidates) has the sort reference's
    gradient with respect to the values and the radius, and passes gradcheck."""
    g = torch.Generator().manual_seed(7)
    for absolute in (False, True):
        v = torch.randn(5, 9, generator=g, dtype=torch.float64).requires_grad_()
        r = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, generator=g, dtype=torch.float64)
        got = torch.autograd.grad((K.threshold_max([(v, 0)], r, absolute=absolute) * w).sum(), (v, r))
        ref = torch.autograd.grad((K.threshold_sort([(v, 0)], r, absolute=absolute) * w).sum(), (v, r))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda v, r, a=absolute: K.threshold_max([(v, 0)], r, absolute=a), (v, r))


def test_threshold_max_sums_long_groups_in_float64():
    """A float32 prefix sum over 2**20 entries drifts; the long-group path accumulates in float64."""
    g = torch.Generator().manual_seed(11)
    v = torch.rand(1 << 20, generator=g) * 3
    for r in (1.0, 1e3, float(v.sum()) * 0.5):
        want = K.threshold_sort([(v.double(), None)], r)
        got = K.threshold_max([(v, None)], r)
        assert got.dtype == torch.float32
        assert float((got.double() - want).abs().max()) <= 2 * torch.finfo(torch.float32).eps * float(want.abs().max())
