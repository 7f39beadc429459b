"""All-or-nothing in-place updates, aliasing, clear errors and the kernel cache's refusals (issue 20)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import proxfunc as pf
import proxfunc.compat as pc


class _Boom(pf.Prox):
    def _prox(self, leaves, step, tree):
        raise RuntimeError("boom")


def _unchanged(fn, *tensors, exc=Exception):
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(exc):
        fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b)


def test_expanded_target_after_ordinary_ones_is_refused_before_any_write():
    a = torch.randn(4, 3)
    e = torch.randn(3).expand(4, 3)
    _unchanged(lambda: pc.apply_(pf.l1(0.1), [a, e], 0.1), a, exc=ValueError)
    with pytest.raises(ValueError, match=r"target\[1\].*stride-0"):
        pc.apply_(pf.l1(0.1), [a, e], 0.1)


def test_proxoptimizer_second_group_raising_leaves_first_group_unchanged():
    p1, p2 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    opt = pc.ProxOptimizer(
        torch.optim.SGD([{"params": [p1], "prox": pf.l1(0.1)}, {"params": [p2], "prox": _Boom()}], lr=0.1)
    )
    _unchanged(opt.prox_step, p1, p2, exc=RuntimeError)


def test_proxoptimizer_groups_all_applied_when_nothing_fails():
    p1, p2 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    w1, w2 = p1.detach().clone(), p2.detach().clone()
    opt = pc.ProxOptimizer(
        torch.optim.SGD([{"params": [p1], "prox": pf.l1(0.1)}, {"params": [p2], "prox": pf.l21(0.2)}], lr=0.5)
    )
    opt.prox_step()
    assert torch.equal(p1.detach(), pf.l1(0.1)(w1, 0.5))
    assert torch.equal(p2.detach(), pf.l21(0.2)(w2, 0.5))


def test_huge_threshold_after_an_in_place_rule_is_right():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    op = pf.partition({"a": pf.l1(0.1), "b": pf.l1(1e39)})
    want = op({"a": a, "b": b}, 0.1)
    pc.apply_(op, {"a": a, "b": b}, 0.1)
    assert torch.equal(a, want["a"]) and torch.equal(b, torch.zeros_like(b))


def test_reg_times_step_overflowing_float64_gives_zero():
    a = torch.randn(4, 3, dtype=torch.float64)
    pc.apply_(pf.l1(1e308), a, 1e10)
    assert torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("drop_in", [pc.l1, pc.l21, pc.linf1, pc.l2, pc.linf])
def test_seed_drop_in_float64_weight_float32_bias(drop_in):
    w, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5)
    want = {"l1": pf.l1, "l21": pf.l21, "linf1": pf.linf1, "l2": pf.l2, "linf": pf.linf}[drop_in.__name__](0.3)(
        (w, b), 0.5
    )
    drop_in(w, b, reg=0.3, lr=0.5)
    assert w.dtype == torch.float64 and b.dtype == torch.float32
    torch.testing.assert_close(w, want[0])
    torch.testing.assert_close(b, want[1])


@pytest.mark.parametrize("op", [pf.l21(0.5), pf.linf1(0.4), pf.l1(0.1)])
def test_weight_and_its_transpose_view(op):
    w = torch.randn(4, 4)
    vals = op([w, w.T], 0.1)
    if torch.equal(vals[0], vals[1].T):  # the same values for the same memory: applied
        pc.apply_(op, [w, w.T], 0.1)
        assert torch.equal(w, vals[0])
    else:
        _unchanged(lambda: pc.apply_(op, [w, w.T], 0.1), w, exc=ValueError)
        with pytest.raises(ValueError, match="share memory"):
            pc.apply_(op, [w, w.T], 0.1)


def test_tied_weights_still_applied_once():
    lin = nn.Linear(4, 4)
    w0 = lin.weight.detach().clone()
    pc.apply_(pf.l21(0.3), [lin.weight, lin.weight], 0.1)
    assert torch.equal(lin.weight.detach(), pf.l21(0.3)([w0, w0], 0.1)[0])  # one value for both: written once


def test_zero_column_groups():
    assert pf.l21(0.1)(torch.empty(5, 0), 0.1).shape == (5, 0)
    lin = nn.Linear(0, 5)
    pc.l21(lin.weight, lin.bias, reg=0.1, lr=0.1)
    for op in [pf.chain(pf.l1(0.1), pf.l21(0.2)), pf.scale(pf.l21(0.2), 2.0), pf.sparse_group_lasso(0.1, 0.2)]:
        assert op(torch.empty(5, 0), 0.1).shape == (5, 0)
    pc.apply_(pf.partition({"weight": pf.l21(0.1)}), lin, 0.1)


# ------------------------------------------------------------------------ clear errors
@pytest.mark.parametrize(
    "v, exc",
    [
        (torch.tensor([1.0, float("nan"), 0.0]), ValueError),
        (torch.tensor([1.0, float("inf"), 0.0]), ValueError),
        (torch.tensor([1, 2, 3]), TypeError),
        (torch.tensor([True, False, True]), TypeError),
        (torch.tensor([1j, 0j, 1j]), TypeError),
        (1j, TypeError),
        (True, TypeError),
        (float("nan"), ValueError),
    ],
)
def test_add_linear_refuses_bad_linear_terms(v, exc):
    with pytest.raises(exc, match="add_linear: v"):
        pf.add_linear(pf.l1(0.1), v)


def test_meta_and_sparse_hyperparameters_steps_and_params():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="l1: reg"):
        pf.l1(torch.tensor(0.1, device="meta"))(x)
    with pytest.raises(ValueError, match="l1: step"):
        pf.l1(0.1)(x, torch.tensor(0.1, device="meta"))
    with pytest.raises(TypeError, match="l1: reg"):
        pf.l1(torch.tensor(0.1).to_sparse())
    with pytest.raises(TypeError, match="l1: step"):
        pf.l1(0.1)(x, torch.tensor(0.1).to_sparse())
    with pytest.raises(TypeError, match="l1: params"):
        pf.l1(0.1)(x.to_sparse())
    with pytest.raises(ValueError, match=r"l2: params\[1\] is on meta"):
        pf.l2(0.1)([x, torch.randn(3, device="meta")])
    # meta params with CPU hyperparameters: shapes only, as before
    assert pf.l2(0.1)(torch.empty(3, device="meta")).device.type == "meta"


def test_bounds_beyond_float16_range():
    x = (torch.randn(50) * 1000).half()
    assert torch.equal(pf.box(-1e6, 1e6)(x), x)
    assert torch.equal(pf.linf_ball(1e6)(x), x)
    assert torch.equal(pf.box(-1e6, 0.5)(x), x.clamp(max=0.5))


def test_top_k_empty_and_numpy_k():
    with pytest.raises(ValueError, match="top_k: k"):
        pf.top_k(2)(torch.empty(0))
    x = torch.randn(6, 3)
    for make in (pf.top_k, pf.k_sparse, pf.group_top_k):
        assert torch.equal(make(np.int64(2))(x), make(2)(x))
    with pytest.raises(TypeError, match="k must be an int"):
        pf.top_k(2.0)


# ------------------------------------------------------------------ kernel cache refusals
def test_cache_directory_must_be_private(tmp_path, monkeypatch):
    from proxfunc.kernels.cpu import _cc

    d = tmp_path / "c"
    assert _cc._private(d, parents=False) == d and (os.stat(d).st_mode & 0o777) == 0o700
    os.chmod(d, 0o777)
    with pytest.raises(_cc._Refused, match="writable by group or others"):
        _cc._private(d, parents=False)
    os.chmod(d, 0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(_cc._Refused, match="symbolic link"):
        _cc._private(link, parents=False)
    monkeypatch.setattr(_cc.os, "getuid", lambda: os.stat(d).st_uid + 1)
    with pytest.raises(_cc._Refused, match="owned by uid"):
        _cc._private(d, parents=False)


def test_planted_or_truncated_library_is_not_loaded(tmp_path):
    import hashlib

    from proxfunc.kernels.cpu import _cc

    data = b"\x7fELF" + b"x" * 100
    good = _cc._store(tmp_path, "k-abc-", data)
    assert _cc._cached(tmp_path, "k-abc-")[0] == good
    good.write_bytes(data[:10])  # truncated after it was stored
    os.chmod(good, 0o700)
    assert _cc._cached(tmp_path, "k-abc-")[0] is None and not good.exists()
    planted = tmp_path / f"k-abc-{hashlib.sha256(b'other').hexdigest()}.so"
    planted.write_bytes(data)  # a name whose hash does not match its bytes
    assert _cc._cached(tmp_path, "k-abc-")[0] is None


def test_proxoptimizer_group_prox_and_wrapper_prox_on_one_tensor_compose():
    lin = nn.Linear(3, 4)
    w0 = lin.weight.detach().clone()
    sgd = torch.optim.SGD([{"params": [lin.weight], "prox": pf.l1(0.1)}, {"params": [lin.bias]}], lr=0.5)
    opt = pc.ProxOptimizer(sgd, pf.partition({"weight": pf.l21(0.2)}, strict=False), params=lin)
    opt.prox_step()
    assert torch.equal(lin.weight.detach(), pf.l21(0.2)(pf.l1(0.1)(w0, 0.5), 0.5))


def test_meta_and_empty_targets_and_consistent_overlapping_views():
    pc.apply_(pf.l21(0.1), nn.Linear(4, 3, device="meta"), 0.1)  # no memory: nothing to compare
    pc.apply_(pf.l1(0.1), [torch.empty(0), torch.empty(0, 3), torch.randn(3)], 0.1)
    w = torch.randn(4, 4)
    want = pf.l1(0.1)(w, 0.1)
    pc.apply_(pf.l1(0.1), [w, w[1:3]], 0.1)  # a separable prox gives a view the same values
    assert torch.equal(w, want)
