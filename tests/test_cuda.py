"""The operators on a CUDA device: same results as on the CPU, nothing moved off the device.

Skipped where no CUDA device is present (CI has none). Oracle: the same operator on the CPU
(itself checked against independent oracles by the other test files), the sort-based threshold
for the sort-free kernels, and ``softshrink`` for l1's multi-tensor (foreach) path, which runs
on CUDA only. Covers every operator in ``tests.cases.CASES`` (values, gradients, vmap), the
low-precision dtypes, linf1's Triton kernel (taken by :func:`proxfunc.dispatch.select` exactly
where its layout holds, launches counted; ATen's path once it is switched off), the in-place
compat layer and ``ProxOptimizer``, ``torch.compile`` with inductor (Triton kernels) and
auto-sizing's shrink.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, grad, vmap

import proxfunc as pf
import proxfunc.compat as pg
import proxfunc.kernels.threshold  # noqa: F401
from proxfunc import autosize, dispatch
from proxfunc.compat import ProxOptimizer, apply_
from proxfunc.kernels.cuda import _triton
from proxfunc.kernels.cuda import linf1 as linf1_cuda
from tests import test_triton_kernels
from tests.cases import CASES
from tests.conftest import requires_compile
from tests.helpers import pytree

#: PROXFUNC_TEST_DEVICE=cpu runs this file against the CPU itself (to check the file, not a GPU).
CUDA = torch.device(os.environ.get("PROXFUNC_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

K = sys.modules["proxfunc.kernels.threshold"]


def to(tree, device):
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


def assert_close_tree(got, want, dtype):
    lg, lw = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(lg) == len(lw)
    for a, b in zip(lg, lw):
        assert a.device.type == CUDA.type and a.dtype == b.dtype and a.shape == b.shape
        assert torch.isfinite(a).all() == torch.isfinite(b).all()
        torch.testing.assert_close(a.cpu(), b, atol=tol(dtype), rtol=tol(dtype))


# ------------------------------------------------------------------------- every operator
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_values_match_cpu_and_input_untouched(case, dtype):
    op = case.make_op()
    params = case.make_params(dtype)
    gpu = to(params, CUDA)
    before = [x.clone() for x in pytree.tree_leaves(gpu)]
    for step in (0.5, torch.tensor(0.5, dtype=dtype, device=CUDA)):
        assert_close_tree(op(gpu, step), op(params, 0.5), dtype)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(gpu), before))
    v = op.value(gpu)
    assert v.device.type == CUDA.type
    want = op.value(params)
    assert torch.isinf(v).item() == torch.isinf(want).item()
    if torch.isfinite(want):
        torch.testing.assert_close(v.cpu(), want, atol=tol(dtype), rtol=tol(dtype))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gradients_match_cpu(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    w = pytree.tree_map(
        lambda x: torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype), params
    )

    def loss(p, w):
        out = op(p, 0.5)
        return sum((a * b).sum() for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(w)))

    g_cpu = grad(loss)(params, w)
    g_gpu = grad(loss)(to(params, CUDA), to(w, CUDA))
    assert_close_tree(g_gpu, g_cpu, torch.float64)


@pytest.mark.parametrize("case", [c for c in CASES if not c.projection], ids=repr)
def test_vmap_over_steps_matches_cpu(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    steps = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    want = vmap(lambda s: op(params, s))(steps)
    gpu = to(params, CUDA)
    got = vmap(lambda s: op(gpu, s))(steps.to(CUDA))
    assert_close_tree(got, want, torch.float64)


# ------------------------------------------------------------------------- low precision
LOW = ["l1", "l2", "linf", "elastic_net", "l21", "linf1", "box", "simplex", "l1_ball", "l2_ball", "partition"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in LOW], ids=repr)
def test_low_precision_matches_cpu(case, dtype):
    op = case.make_op()
    params = case.make_params(dtype)
    out = op(to(params, CUDA), 0.5)
    want = op(params, 0.5)
    for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(want)):
        assert a.dtype == dtype and a.device.type == CUDA.type and torch.isfinite(a).all()
        # both round a float32 result once: at most one unit in the last place apart
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=tol(dtype), rtol=tol(dtype))


# ------------------------------------------------------------------------- kernels
def adversarial_rows(dtype):
    g = torch.Generator().manual_seed(0)
    n = 1000
    rows = [
        torch.randn(8, n, generator=g, dtype=torch.float64),
        torch.randint(-2, 3, (8, n), generator=g).double(),  # ties
        torch.full((4, n), -0.75, dtype=torch.float64),  # all equal
        torch.zeros(4, n, dtype=torch.float64),
        (0.5 ** torch.arange(n, dtype=torch.float64)).repeat(3, 1),  # geometric spread
        torch.randn(4, n, generator=g, dtype=torch.float64) * 1e-9,
        torch.randn(4, n, generator=g, dtype=torch.float64) * 1e9,
    ]
    return torch.cat(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("radius", [0.0, 1e-30, 0.3, 7.0, 1e5, 1e12])
def test_thresholds_match_sort_reference(radius, dtype):
    v = adversarial_rows(dtype)
    want = K.threshold_sort([(v.double(), 0)], radius, absolute=True)
    vg = v.to(CUDA)
    methods = {"fixed_point": K.threshold_fixed_point, "unrolled": K.threshold_unrolled, "max": K.threshold_max}
    for name, fn in methods.items():
        got = fn([(vg, 0)], radius, absolute=True)
        assert got.device.type == CUDA.type, name
        scale = torch.maximum(v.abs().amax(1).double(), want.abs()).clamp_min(1e-300)
        err = ((got.cpu().double() - want).abs() / scale).max()
        assert err <= 64 * torch.finfo(dtype).eps * v.shape[1] ** 0.5, (name, float(err))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_group_threshold_on_a_large_vector(dtype):
    """The l1 ball over one tensor larger than a CPU block (the CPU streams it in chunks)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3 * K._BLOCK + 17, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.finfo(dtype).eps
    for r in (1e-3, 10.0, float(x.abs().sum()) * 0.9, float(x.abs().sum()) * 2):
        want = pf.l1_ball(r)(x, 1.0)
        got = pf.l1_ball(r)(x.to(CUDA), 1.0)
        torch.testing.assert_close(got.cpu(), want, atol=8 * eps * float(x.abs().max()), rtol=0)
        assert float(got.abs().double().sum()) <= r * (1 + 64 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_foreach_path_is_taken_and_bitwise_softshrink(dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    shapes = [(64, 33), (33,), (1,), (3, 2, 4), (0, 3), (256, 256)]
    leaves = [(torch.randn(*s, generator=g, dtype=dtype) * 2).to(CUDA) for s in shapes]
    leaves[0][0, :3] = torch.tensor([0.37, -0.37, 0.0], dtype=dtype)  # at the kink, and a zero
    on_cuda = CUDA.type == "cuda"  # the foreach kernels are CUDA's path only
    calls = []
    real = torch._foreach_sub
    monkeypatch.setattr(torch, "_foreach_sub", lambda *a: calls.append(1) or real(*a))
    got = pf.l1(0.37)(leaves, 1.0)
    assert calls == [1] * on_cuda
    for a, x in zip(got, leaves):
        assert a.device.type == CUDA.type and torch.equal(a, torch.nn.functional.softshrink(x, 0.37))
        assert not torch.signbit(a[a == 0]).any()
    # and in place through the compat layer: the same foreach kernels, writing into the leaves
    copies = [x.clone() for x in leaves]
    real_ = torch._foreach_sub_
    monkeypatch.setattr(torch, "_foreach_sub_", lambda *a: calls.append(2) or real_(*a))
    apply_(pf.l1(0.37), copies, 1.0)
    assert calls == [1, 2] * on_cuda
    assert all(torch.equal(a, b) for a, b in zip(copies, got))


def count_launches(monkeypatch):
    """A list that grows by one each time the linf1 Triton kernel's launcher runs."""
    calls = []
    launch = linf1_cuda._launch
    monkeypatch.setattr(linf1_cuda, "_launch", lambda *a: calls.append(1) or launch(*a))
    return calls


def takes_kernel(leaves, t, dims):
    """Whether dispatch gives linf1 of ``leaves`` (groups along ``dims``) to the Triton kernel."""
    return dispatch.select(list(leaves), t, kernel=linf1_cuda.SPEC, dims=dims).impl == dispatch.KERNEL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_linf1_rows_kernel_against_the_sort_reference(dtype, monkeypatch):
    """linf1 on one CUDA matrix (groups = rows), or a (weight, bias) pair, runs the fused Triton
    kernel, functional and in place, and equals the clamp at the float64 sort-based threshold
    to float rounding."""
    calls = count_launches(monkeypatch)
    expected = 0
    for name, masters in test_triton_kernels.linf1_rows_cases().items():
        for r in test_triton_kernels.LINF1_RADII:
            xs = tuple(x.to(dtype).to(CUDA) for x in masters)
            if CUDA.type == "cuda":
                assert takes_kernel(xs, r, [0] * len(xs)), (name, r)
            want = test_triton_kernels.linf1_reference([x.to(dtype) for x in masters], r)
            got = pf.linf1(r)(xs, 1.0)  # one tensor, or a (weight, bias)-like pair
            for a, w in zip(got, want):
                assert a.dtype == dtype and a.device.type == CUDA.type
                err = float((a.cpu().double() - w).abs().max())
                assert err <= test_triton_kernels.linf1_tol(masters, dtype), (name, r, err)
            ys = tuple(x.clone() for x in xs)
            apply_(pf.linf1(r), ys, 1.0)  # in place (float16/bfloat16: computed, then copied)
            assert all(torch.equal(y, a) for y, a in zip(ys, got)), (name, r)
            expected += 2
    if CUDA.type == "cuda":
        assert linf1_cuda.available()  # no launch failed (that switches the kernel off)
        assert len(calls) == expected


def test_linf1_kernel_only_where_its_layout_holds(monkeypatch):
    """Row groups of one or two contiguous tensors up to MAX_ROW entries take the kernel;
    other layouts, a tensor threshold, something to differentiate and the ``"aten"`` and
    ``"reference"`` choices take the other paths, with the same values."""
    g = torch.Generator().manual_seed(7)
    row = linf1_cuda.MAX_ROW
    W, b = torch.randn(64, 300, generator=g).to(CUDA), torch.randn(64, generator=g).to(CUDA)
    long = torch.randn(4, row + 1, generator=g).to(CUDA)
    kernel = [(pf.linf1(2.0), W), (pf.linf1(2.0), (W, b)), (pf.linf1(2.0), torch.randn(4, row, generator=g).to(CUDA))]
    other = [
        (pf.linf1(2.0, group_dim=1), W),  # groups are columns
        (pf.linf1(2.0), W.t()),  # rows not contiguous
        (pf.linf1(2.0), long),  # groups longer than MAX_ROW
        (pf.linf1(2.0), (W, b, b.clone())),  # three parts
    ]
    calls = count_launches(monkeypatch)
    for op, x in kernel:
        leaves = pytree.tree_leaves(x)
        if CUDA.type == "cuda":
            assert takes_kernel(leaves, 2.0, [0] * len(leaves))
        before = len(calls)
        got = op(x, 1.0)
        with dispatch.implementation("aten"):
            aten = op(x, 1.0)
        with dispatch.implementation("reference"):
            ref = op(x, 1.0)
        assert len(calls) == before + (CUDA.type == "cuda")  # only the "auto" call launched
        for a, c, d in zip(pytree.tree_leaves(got), pytree.tree_leaves(aten), pytree.tree_leaves(ref)):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, d, atol=1e-5, rtol=1e-5)
    n = len(calls)
    for op, x in other:
        want = pytree.tree_map(lambda y: y.cpu(), op(pytree.tree_map(lambda y: y.cpu(), x), 1.0))
        assert_close_tree(op(x, 1.0), want, torch.float32)
    op, x = pf.linf1(2.0), W.clone().requires_grad_()
    assert not takes_kernel([x], 2.0, [0]) and not takes_kernel([W], torch.tensor(2.0, device=CUDA), [0])
    op(x, 1.0).sum().backward()  # the reference, differentiated
    op(W, torch.tensor(1.0, device=CUDA))  # a 0-d step on the device: no host read, the reference
    assert len(calls) == n


def test_a_linf1_kernel_switched_off_takes_the_aten_path(monkeypatch):
    """A kernel whose launch failed (or ``PROXFUNC_TRITON=0``) is no longer available:
    dispatch gives linf1 to ATen, with the same values."""
    W = torch.randn(64, 300, generator=torch.Generator().manual_seed(8)).to(CUDA)
    want = pf.linf1(2.0)(W.cpu(), 1.0)
    monkeypatch.setattr(_triton, "_BUILT", {"linf1_rows": False})
    calls = count_launches(monkeypatch)
    assert dispatch.select([W], 2.0, kernel=linf1_cuda.SPEC, dims=[0]).impl == dispatch.ATEN
    assert_close_tree(pf.linf1(2.0)(W, 1.0), want, torch.float32)
    assert calls == []


# ------------------------------------------------------------------------- compat, in place
def mlp(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)


@pytest.mark.parametrize(
    "op",
    [
        pf.l1(0.05),
        pf.partition({"*.weight": pf.l21(0.3)}),
        pf.partition({("0.weight", "0.bias"): pf.linf1(0.2), "2.*": pf.l1(0.01), "4.weight": pf.l1_ball(3.0)}),
    ],
    ids=["l1", "l21", "mixed"],
)
def test_apply_in_place_on_a_cuda_module(op):
    cpu, gpu = mlp("cpu"), mlp(CUDA)
    apply_(op, cpu, 0.5)
    apply_(op, gpu, 0.5)
    for (k, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters()):
        assert a.device.type == CUDA.type, k
        torch.testing.assert_close(a.detach().cpu(), b.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["l1", "l2", "l21", "linf", "linf1", "elasticnet", "logbarrier"])
def test_seed_drop_ins_on_cuda(name):
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(100, 2, generator=g), torch.randn(100, generator=g)
    wc, bc = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    wg, bg = nn.Parameter(w.to(CUDA)), nn.Parameter(b.to(CUDA))
    getattr(pg, name)(wc, bc, reg=0.05, lr=0.5)
    getattr(pg, name)(wg, bg, reg=0.05, lr=0.5)
    torch.testing.assert_close(wg.detach().cpu(), wc.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bg.detach().cpu(), bc.detach(), atol=1e-6, rtol=1e-5)


def test_prox_optimizer_on_cuda_matches_cpu():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(5))
    y = x[:, :3].sin()
    models = {}
    for dev in ("cpu", CUDA):
        model = mlp(dev)
        opt = ProxOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            pf.partition({"*.weight": pf.l21(0.05)}),
            params=model,
        )
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
        models[dev] = model
    for a, b in zip(models[CUDA].parameters(), models["cpu"].parameters()):
        assert a.device.type == CUDA.type
        torch.testing.assert_close(a.detach().cpu(), b.detach(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@requires_compile
def test_inductor_on_cuda_one_graph_no_recompile(fresh_dynamo):
    """l1, l21, linf1, the l1 ball and a whole-model partition, compiled by inductor (Triton)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 257, generator=g).to(CUDA)
    params = {k: v.detach() for k, v in mlp(CUDA).named_parameters()}
    part = pf.partition({("0.weight", "0.bias"): pf.linf1(0.05), "2.weight": pf.l21(0.1), "4.*": pf.l1(0.01)})
    cases = [(pf.l1(0.3), x), (pf.l21(2.0), x), (pf.linf1(4.0), x), (pf.l1_ball(100.0), x), (part, params)]
    for op, p in cases:
        cnt = CompileCounterWithBackend("inductor")
        f = torch.compile(lambda q, s, op=op: op(q, s), backend=cnt, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=False):
            first = f(p, torch.tensor(0.5, device=CUDA))
        for a, b in zip(pytree.tree_leaves(first), pytree.tree_leaves(op(p, 0.5))):
            assert a.device.type == CUDA.type
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for s in (0.1, 2.0):
                for a, b in zip(pytree.tree_leaves(f(p, torch.tensor(s, device=CUDA))), pytree.tree_leaves(op(p, s))):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert cnt.frame_count == 1, op


@requires_compile
def test_apply_compiled_in_place_on_cuda(fresh_dynamo):
    """compat.apply_ traced by inductor writes a CUDA module in place, one graph for every lr."""
    model, ref = mlp(CUDA), mlp(CUDA)
    part = pf.partition({("0.weight", "0.bias"): pf.linf1(0.05), "2.weight": pf.l21(0.1), "4.*": pf.l1(0.01)})
    cnt = CompileCounterWithBackend("inductor")
    step = torch.compile(lambda s: apply_(part, model, s), backend=cnt, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=False):
        step(torch.tensor(0.5, device=CUDA))
    apply_(part, ref, 0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in (0.3, 0.1):
            step(torch.tensor(s, device=CUDA))
            apply_(part, ref, s)
    assert cnt.frame_count == 1
    for a, b in zip(model.parameters(), ref.parameters()):
        assert a.device.type == CUDA.type and a.requires_grad
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@requires_compile
def test_design_training_step_compiled_on_cuda(fresh_dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(CUDA)
    x = torch.randn(128, 2, device=CUDA)
    y = (x[:, :1] * x[:, 1:]).sign()
    prox = pf.partition({("0.weight", "0.bias"): pf.linf1(0.005)})

    def loss_fn(p):
        return nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    def train_step(p, lr):
        g = grad(loss_fn)(p)
        return prox({k: p[k] - lr * g[k] for k in p}, lr)

    cnt = CompileCounterWithBackend("inductor")
    step_c = torch.compile(train_step, backend=cnt, fullgraph=True)
    p_c = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_c, p_e = step_c(p_c, torch.tensor(0.5, device=CUDA)), train_step(p_e, 0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lr in (0.4, 0.3, 0.2):
            p_c, p_e = step_c(p_c, torch.tensor(lr, device=CUDA)), train_step(p_e, lr)
    assert cnt.frame_count == 1
    for k in p_e:
        assert p_c[k].device.type == CUDA.type
        torch.testing.assert_close(p_c[k], p_e[k], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- auto-sizing
def test_shrink_a_cuda_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(CUDA)
    prox, _ = autosize.neuron_prox(model, pf.linf1(0.5))
    x = torch.randn(64, 4, device=CUDA)
    y = x[:, :1] * 2
    p = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = grad(lambda q: nn.functional.mse_loss(functional_call(model, q, (x,)), y))
    for _ in range(200):
        gr = g(p)
        p = prox({k: p[k] - 0.05 * gr[k] for k in p}, 0.05)
    model.load_state_dict(p)
    rep = autosize.report(model)
    small = autosize.shrink(model, x)
    assert rep.rows[0].alive == small[0].out_features < 16
    assert next(small.parameters()).device.type == CUDA.type
    z = torch.randn(20, 4, device=CUDA)
    torch.testing.assert_close(small(z), model(z), atol=1e-5, rtol=1e-5)
