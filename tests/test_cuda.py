"""The operators on a CUDA device: same results as on the CPU, nothing moved off the device.

Skipped where no CUDA device is present (CI has none). Oracle: the same operator on the CPU
(itself checked against independent oracles by the other test files), the sort-based threshold
for the sort-free kernels, and ``softshrink`` for l1's multi-tensor (foreach) path, which runs
on CUDA only. Covers every operator in ``tests.cases.CASES`` (values, gradients, vmap), the
low-precision dtypes, the in-place compat layer and ``ProxOptimizer``, ``torch.compile`` with
inductor (Triton kernels) and auto-sizing's shrink.
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
from proxfunc import autosize, norms
from proxfunc.compat import ProxOptimizer, apply_
from proxfunc.kernels import linf1_rows, scale
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
    monkeypatch.setattr(norms, "_FOREACH_DEVICES", (*norms._FOREACH_DEVICES, CUDA.type))
    calls = []
    real = torch._foreach_sub
    monkeypatch.setattr(torch, "_foreach_sub", lambda *a: calls.append(1) or real(*a))
    got = pf.l1(0.37)(leaves, 1.0)
    assert calls == [1]
    for a, x in zip(got, leaves):
        assert a.device.type == CUDA.type and torch.equal(a, torch.nn.functional.softshrink(x, 0.37))
        assert not torch.signbit(a[a == 0]).any()
    # and in place through the compat layer: the same foreach kernels, writing into the leaves
    copies = [x.clone() for x in leaves]
    real_ = torch._foreach_sub_
    monkeypatch.setattr(torch, "_foreach_sub_", lambda *a: calls.append(2) or real_(*a))
    apply_(pf.l1(0.37), copies, 1.0)
    assert calls == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(copies, got))


def count_launches(monkeypatch, module):
    """A list that grows by one each time ``module._launch`` (a Triton kernel's launcher) runs."""
    calls = []
    launch = module._launch
    monkeypatch.setattr(module, "_launch", lambda *a: calls.append(1) or launch(*a))
    return calls


BIG = [((2048, 1024), 0), ((1024, 2048), 1), ((128, 512, 3, 3), 1), ((16, 600, 130), 1), ((1536, 1024), None)]


@pytest.mark.parametrize("shape,d", BIG)
@pytest.mark.parametrize("xd,sd", test_triton_kernels.DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_scale_kernel_is_bitwise_aten(shape, d, xd, sd, monkeypatch):
    """l21's per-group scale on CUDA runs the Triton kernel (rounding to nearest even) and equals
    ATen's broadcast multiply bit for bit: new tensor, ``out=``, in place."""
    calls = count_launches(monkeypatch, scale)
    monkeypatch.setattr(scale, "MIN_NUMEL", 1 << 16)  # the kernel at test sizes
    x, s = test_triton_kernels.operands(shape, d, xd, sd)
    x, s = x.to(CUDA), s.to(CUDA)
    want = test_triton_kernels.reference(x, s, d)
    assert torch.equal(scale.mul_along(x, s, d), want)
    out = torch.empty_like(x)
    assert torch.equal(scale.mul_along(x, s, d, out=out), want)
    if xd == sd:
        y = x.clone()
        scale.mul_along(y, s, d, out=y)
        assert torch.equal(y, want)
    if CUDA.type == "cuda":
        assert scale._get_kernel() is not None, "triton ships with torch's CUDA wheels; no launch failed"
        assert len(calls) == (3 if xd == sd else 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_linf1_rows_kernel_against_the_sort_reference(dtype, monkeypatch):
    """linf1 on one CUDA matrix (groups = rows), or a (weight, bias) pair, runs the fused Triton
    kernel, functional and in place, and equals the clamp at the float64 sort-based threshold
    to float rounding."""
    calls = count_launches(monkeypatch, linf1_rows)
    expected = 0
    for name, masters in test_triton_kernels.linf1_rows_cases().items():
        for r in test_triton_kernels.LINF1_RADII:
            xs = tuple(x.to(dtype).to(CUDA) for x in masters)
            want = test_triton_kernels.linf1_reference([x.to(dtype) for x in masters], r)
            got = pf.linf1(r)(xs, 1.0)  # one tensor, or a (weight, bias)-like pair
            for a, w in zip(got, want):
                assert a.dtype == dtype and a.device.type == CUDA.type
                err = float((a.cpu().double() - w).abs().max())
                assert err <= test_triton_kernels.linf1_tol(masters, dtype), (name, r, err)
            ys = tuple(x.clone() for x in xs)
            apply_(pf.linf1(r), ys, 1.0)
            assert all(torch.equal(y, a) for y, a in zip(ys, got)), (name, r)
            expected += 2
    if CUDA.type == "cuda":
        assert linf1_rows._get_kernel() is not None  # no launch failed (that switches it off)
        assert len(calls) == expected


def test_small_tensors_keep_atens_kernel(monkeypatch):
    monkeypatch.setattr(scale, "_launch", lambda *a: pytest.fail("Triton launched below MIN_NUMEL"))
    x = torch.randn(512, 512, device=CUDA)
    s = torch.rand(512, device=CUDA)
    assert torch.equal(scale.mul_along(x, s, 0), x * s[:, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_l21_with_the_scale_kernel_equals_it_without(dtype, monkeypatch):
    """l21 (functional, a partition batch, in place) on large CUDA tensors: the Triton scale
    changes no bit against ATen's kernel."""
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(2048, 1024, generator=g) * 0.05).to(dtype).to(CUDA)
    V = (torch.randn(1024, 2048, generator=g) * 0.05).to(dtype).to(CUDA)
    op, part = pf.l21(1.5), pf.partition({"w": pf.l21(1.5), "v": pf.l21(1.5, group_dim=1)})
    calls = count_launches(monkeypatch, scale)
    monkeypatch.setattr(scale, "MIN_NUMEL", 1 << 16)  # the kernel at test sizes

    def run():
        one = op(W, 1.0)
        both = part({"w": W, "v": V}, 1.0)
        inplace = {"w": W.clone(), "v": V.clone()}
        apply_(part, inplace, 1.0)
        return [one, both["w"], both["v"], inplace["w"], inplace["v"]]

    with_kernel = run()
    if CUDA.type == "cuda":
        assert len(calls) == 5  # l21, the partition's two batches, in place twice
        assert scale._get_kernel() is not None  # every launch ran (a failed one switches it off)
    monkeypatch.setattr(scale, "_get_kernel", lambda: None)  # ATen's broadcast multiply
    without = run()
    for a, b in zip(with_kernel, without):
        assert torch.equal(a, b)
    assert int((with_kernel[0].abs().sum(1) == 0).sum()) > 0  # some rows died, some lived
    assert int((with_kernel[0].abs().sum(1) > 0).sum()) > 0


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
