"""The remembered facts of the in-place fast paths (proxfunc._facts) and what is built on them.

A step on the same parameters reuses what was read of them (their facts behind a C++ guard,
the overlap answer for the data pointers seen last, the soft-threshold kernel's span array).
Each test changes the tensors between two steps in one way the cache must notice (replaced,
resized, another dtype or device, requires_grad toggled, made non-contiguous, tied, moved)
and checks the step against the functional operator on copies taken just before it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import struct

import pytest
import torch
from torch import nn

import proxfunc as pf
import proxfunc.compat as pg
from proxfunc import _facts, dispatch
from proxfunc.kernels.cpu import soft_threshold as soft_cpu

L1 = pf.partition({"*": pf.l1(0.05)})


def _fresh(ts):
    """The facts read from scratch (nothing remembered)."""
    return _facts.Facts(ts)


def _same_facts(a, b):
    return all(getattr(a, k) == getattr(b, k) for k in _facts.Facts.__slots__ if k != "disjoint")


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    # above the soft-threshold kernel's min_numel: l1's in-place step takes the kernel
    return nn.Sequential(nn.Linear(160, 160), nn.ReLU(), nn.Linear(160, 64), nn.Linear(64, 64)).to(dtype)


def _check_step(target, op=L1, step=0.5):
    """``apply_(op, target, step)`` equals ``op`` on copies of the tensors taken just before."""
    params = (
        {k: v.detach().clone() for k, v in target.named_parameters()}
        if isinstance(target, nn.Module)
        else {k: v.detach().clone() for k, v in target.items()}
    )
    want = op(params, step)
    pg.apply_(op, target, step)
    got = dict(target.named_parameters()) if isinstance(target, nn.Module) else target
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].detach(), want[k]), k


# ------------------------------------------------------------------------------- _facts.of
def test_facts_are_those_read_afresh_and_remembered():
    ts = [torch.randn(5, 3), torch.randn(3, dtype=torch.float64), torch.randn(4, 2).t(), nn.Parameter(torch.randn(2))]
    f = _facts.of(ts)
    assert f is not None and _same_facts(f, _fresh(ts))
    assert f.dtypes == {torch.float32, torch.float64} and not f.contiguous and f.requires_grad
    assert f.numels == (15, 3, 8, 2) and f.numel == 28 and f.nbytes == (60, 24, 32, 8)
    assert _facts.of(list(ts)) is f  # the same tensors: the remembered answers
    others = [
        torch.zeros(5, 3),
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(4, 2).t(),
        nn.Parameter(torch.zeros(2)),
    ]
    assert _same_facts(_facts.of(others), f)


@pytest.mark.parametrize(
    "change",
    ["replaced", "resize_", "set_", "dtype", "requires_grad", "transposed", "as_strided_", "expanded", "grown"],
)
def test_facts_notice_every_change_of_metadata(change):
    ts = [torch.randn(6, 4), nn.Parameter(torch.randn(6))]
    f = _facts.of(ts)
    w = ts[0]
    if change == "replaced":
        ts[0] = torch.randn(4, 6)
    elif change == "resize_":  # the same object, fewer entries at the same address
        w.resize_(20)
    elif change == "set_":
        w.set_(torch.randn(8, 3))
    elif change == "dtype":
        w.data = w.data.double()
    elif change == "requires_grad":
        w.requires_grad_(True)
    elif change == "transposed":
        w.data = torch.randn(4, 6).t()
    elif change == "as_strided_":
        w.as_strided_((6, 4), (1, 6))
    elif change == "expanded":
        w.data = torch.randn(6, 1).expand(6, 4)
    elif change == "grown":
        ts.append(torch.randn(3))
    g = _facts.of(ts)
    assert g is not None and g is not f
    assert _same_facts(g, _fresh(ts))


def test_facts_are_not_kept_for_what_the_fast_paths_never_take():
    x = torch.randn(4, 4)

    class Sub(torch.Tensor):
        pass

    assert _facts.of([]) is None
    assert _facts.of([x, 3.0]) is None
    assert _facts.of([x.as_subclass(Sub)]) is None
    assert _facts.of([x.to_sparse()]) is None
    assert _facts.of([x.to("meta")]) is None
    assert _facts.of([x]) is not None
    # inside a transform nothing is answered, even for tensors from outside it
    seen = []
    torch.func.vmap(lambda v: seen.append(_facts.of([x])) or v)(torch.randn(3, 2))
    assert seen == [None]
    # an inference tensor has other dispatch keys: its own answers
    with torch.inference_mode():
        y = torch.randn(4, 4)
    fy = _facts.of([y])
    assert fy is not None and fy.inference and not _facts.of([x]).inference


def test_facts_remember_at_most_slots_lists():
    lists = [[torch.randn(i + 1)] for i in range(_facts.SLOTS + 5)]
    for ts in lists:
        _facts.of(ts)
    assert len(_facts._SEEN) <= _facts.SLOTS
    for ts in lists:
        assert _same_facts(_facts.of(ts), _fresh(ts))


# --------------------------------------------------------------------- apply_ across steps
@pytest.mark.parametrize("kind", ["module", "dict"])
@pytest.mark.parametrize(
    "change",
    ["none", "replaced", "resize_", "dtype", "requires_grad", "transposed", "moved", "tied", "swapped", "inference"],
)
def test_steps_notice_what_changed_between_them(kind, change):
    model = _model()
    assert sum(p.numel() for p in model.parameters()) > soft_cpu.MIN_NUMEL
    target = model if kind == "module" else dict(model.named_parameters())
    for _ in range(2):  # the first steps remember what they read
        _check_step(target)
    lin = model[2]
    if change == "replaced":
        new = nn.Parameter(torch.randn(64, 160))
        lin.weight = new
        if kind == "dict":
            target["2.weight"] = new
    elif change == "resize_":  # the same object, fewer entries at the same address
        with torch.no_grad():
            lin.weight.requires_grad_(False).resize_(32, 160)
    elif change == "dtype":
        lin.weight.data = lin.weight.data.double()
    elif change == "requires_grad":
        lin.weight.requires_grad_(False)
    elif change == "transposed":
        lin.weight.data = torch.randn(160, 64).t()
    elif change == "moved":  # the same metadata, other memory
        lin.weight.data = lin.weight.data.clone()
    elif change == "tied":  # the same metadata, one memory for two tensors
        model[3].weight.data = torch.randn(64, 64)
        lin.bias.data = model[3].bias.data
    elif change == "swapped":  # two tensors of one shape trade places
        model[3].bias.data, lin.bias.data = lin.bias.data, model[3].bias.data
    elif change == "inference":
        with torch.inference_mode():
            lin.weight.data = torch.randn(64, 160)
        with pytest.raises(ValueError, match="inference tensor"):
            pg.apply_(L1, target, 0.5)
        return
    _check_step(target)
    _check_step(target)


def test_tied_after_disjoint_steps_is_shrunk_once():
    # the overlap answer is remembered per data pointers: a tie made between steps is seen
    a, b, c = torch.randn(40000), torch.randn(40000), torch.randn(40000)
    sd = {"a": a, "b": b, "c": c}
    for _ in range(2):
        _check_step(sd)
    sd["b"] = a  # one tensor under two names: the prox acts once
    want = pf.l1(0.05)(a.clone(), 0.5)
    pg.apply_(L1, sd, 0.5)
    assert torch.equal(a, want)
    shared = torch.randn(40000)
    want = torch.cat([pf.l1(0.05)(shared[:30000], 0.5), shared[30000:]])
    sd = {"a": shared[:20000], "b": shared[10000:30000], "c": c}  # overlapping views: each entry once
    pg.apply_(L1, sd, 0.5)
    assert torch.equal(shared, want)
    x = torch.randn(300, 300)
    sd = {"x": x, "xt": x.t(), "c": c}  # a weight and its transpose: l21 gives them different values
    with pytest.raises(ValueError, match="share memory"):
        pg.apply_(pf.partition({"*": pf.l21(0.05)}), sd, 0.5)


def test_kernel_spans_follow_the_tensors():
    if not soft_cpu.available():
        pytest.skip(f"the C kernel is not available: {soft_cpu._KERNEL.why()}")
    xs = [torch.randn(30000), torch.randn(20000)]
    t = 0.1
    for _ in range(2):
        want = [x - x.clamp(-t, t) for x in xs]
        soft_cpu.run(xs, t, xs)
        assert all(torch.equal(x, w) for x, w in zip(xs, want))
    xs[1].resize_(10000)  # the same address, fewer entries: nothing written past them
    tail = xs[1].untyped_storage()
    before = torch.tensor([], dtype=torch.float32).set_(tail, 10000, (10000,)).clone()
    want = [x - x.clamp(-t, t) for x in xs]
    soft_cpu.run(xs, t, xs)
    assert all(torch.equal(x, w) for x, w in zip(xs, want))
    assert torch.equal(torch.tensor([], dtype=torch.float32).set_(tail, 10000, (10000,)), before)
    xs[0] = torch.randn(30000)  # another tensor
    want = [x - x.clamp(-t, t) for x in xs]
    soft_cpu.run(xs, t, xs)
    assert all(torch.equal(x, w) for x, w in zip(xs, want))


# ------------------------------------------------------------------------ select with facts
def _cases():
    x = torch.randn(200, 200)
    entries = dataclasses.replace(soft_cpu.SPEC, min_numel=0)
    yield [x, x[0]], 0.1, entries
    yield [x, x.t()], 0.1, entries
    yield [x, x.double()], 0.1, entries
    yield [x.bfloat16()], 0.1, entries
    yield [x, torch.empty(0)], 0.1, soft_cpu.SPEC
    yield [torch.randn(10)], 0.1, soft_cpu.SPEC
    yield [x], -0.1, entries
    yield [x], 1e39, entries
    yield [x.double()], 1e39, entries
    yield [x], torch.tensor(0.1), entries
    yield [x], torch.tensor(0.1, requires_grad=True), entries
    yield [x], torch.tensor(0.1, device="meta"), entries
    yield [nn.Parameter(x.clone())], 0.1, entries
    yield [x], 0.1, None


@pytest.mark.parametrize("grad", [False, True])
def test_select_decides_the_same_with_remembered_facts(grad, monkeypatch):
    with torch.set_grad_enabled(grad):
        for leaves, t, kernel in _cases():
            for impl in dispatch.IMPLEMENTATIONS:
                with dispatch.implementation(impl):
                    got = dispatch.select(leaves, t, in_place=True, kernel=kernel)
                    got2 = dispatch.select(leaves, t, in_place=True, kernel=kernel, facts=_facts.of(leaves))
                    with monkeypatch.context() as m:
                        m.setattr(_facts, "of", lambda ts: None)
                        want = dispatch.select(leaves, t, in_place=True, kernel=kernel)
                assert got.impl == got2.impl == want.impl, (leaves, t, impl)
                assert got.t is want.t or got.t == want.t


# ------------------------------------------------------------------------------ host_product
def _f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def test_host_product_is_the_tensor_products_value():
    rng = random.Random(0)
    for _ in range(20000):
        reg = 10 ** rng.uniform(-12, 8) * rng.choice([1.0, 3.7, 0.3])
        for dtype in (torch.float32, torch.float64):
            lr = torch.tensor(10 ** rng.uniform(-9, 3), dtype=dtype)
            got = dispatch.host_product(reg, lr)
            assert type(got) is float and got == float(reg * lr), (reg, lr)
    # the naive double product is not it (reg is rounded to float32 first): the test can fail
    assert any(
        _f32(r * _f32(s)) != float(r * torch.tensor(s))
        for r, s in ((10 ** rng.uniform(-12, 8), 10 ** rng.uniform(-9, 3)) for _ in range(200))
    )


def test_host_product_leaves_the_rest_to_the_tensor_product():
    lr = torch.tensor(0.01)
    cases = [
        (torch.tensor(0.5), lr),  # a tensor reg
        (0.5, torch.tensor(0.01, dtype=torch.bfloat16)),
        (0.5, torch.tensor(0.01, dtype=torch.float16)),
        (0.5, torch.tensor(0.01, device="meta")),
        (0.5, torch.tensor([0.01])),
        (1e-30, torch.tensor(1e-15)),  # a float32 subnormal product
        (0.5, torch.tensor(1e-40)),  # a subnormal step
        (1e-40, lr),  # reg subnormal in float32
        (1e39, lr),  # reg beyond float32
        (3e38, torch.tensor(10.0)),  # the product beyond float32
    ]
    for reg, step in cases:
        got = dispatch.host_product(reg, step)
        assert isinstance(got, torch.Tensor), (reg, step)
        want = reg * step
        assert got.dtype == want.dtype and got.device == want.device
        if want.device.type != "meta":
            assert torch.equal(got, want)
    w = torch.tensor(0.01, requires_grad=True)
    assert isinstance(dispatch.host_product(0.5, w), torch.Tensor) and dispatch.host_product(0.5, w).requires_grad
    with torch.no_grad():
        assert dispatch.host_product(0.5, w) == float(0.5 * w)
    assert dispatch.host_product(0.5, 0.01) == 0.5 * 0.01
    out = torch.func.grad(lambda s: dispatch.host_product(0.5, s) * 2.0)(torch.tensor(0.01))
    assert float(out) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_lr_step_is_bitwise_the_tensor_threshold(dtype):
    # the in-place step with a 0-d tensor lr equals the reference with that tensor lr, for lr
    # values where reading lr as a float and multiplying in double would round otherwise
    rng = random.Random(1)
    model = _model(dtype=dtype)
    for _ in range(20):
        lr = torch.tensor(10 ** rng.uniform(-4, 0), dtype=torch.float32)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        with dispatch.implementation("reference"):
            want = L1(params, lr)
        pg.apply_(L1, model, lr)
        for k, v in model.named_parameters():
            assert torch.equal(v.detach(), want[k]), k
    assert math.isfinite(float(lr))


def test_guards_pass_their_self_test_and_without_them_nothing_is_remembered(monkeypatch):
    assert _facts._self_test()  # this torch's guards tell every change above apart
    monkeypatch.setattr(_facts, "_USABLE", [False])
    monkeypatch.setattr(_facts, "_SEEN", {})
    ts = [torch.randn(4)]
    assert _facts.of(ts) is None and not _facts._SEEN
    model = _model()
    for _ in range(2):
        _check_step(model)
        _check_step(dict(model.named_parameters()), step=torch.tensor(0.3))
