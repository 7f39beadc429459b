"""proxfunc.compat: in-place application (all-or-nothing), the seed drop-ins, ProxOptimizer (basic)."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch import nn

import proxfunc as pf
import proxfunc.compat as pg
from tests.conftest import requires_compile


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.linear2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear2(self.bn(self.linear1(x)).relu())


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net().double()
    net(torch.randn(8, 4, dtype=torch.float64))  # moves BN running stats and num_batches_tracked
    return net


def _snapshot(obj):
    if isinstance(obj, nn.Module):
        return {k: v.detach().clone() for k, v in obj.state_dict().items()}
    return {k: v.clone() for k, v in obj.items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


NEURON = pf.partition(
    {("linear1.weight", "linear1.bias", "linear2.weight"): pf.linf1(0.2, group_dim=(0, 0, 1)), "bn.*": pf.l1(0.05)}
)

# ----------------------------------------------------------------- apply_


def test_apply_on_module_equals_functional_and_keeps_parameter_objects():
    net = _net()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    ids = {k: id(v) for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    want = NEURON(params, 0.5)
    assert pg.apply_(NEURON, net, 0.5) is net
    for k, v in net.named_parameters():
        assert id(v) == ids[k] and v.requires_grad and isinstance(v, nn.Parameter)
        assert torch.equal(v.detach(), want[k])
    assert _same({k: v for k, v in net.named_buffers()}, buffers)  # buffers are not parameters


def test_apply_on_state_dict_leaves_integer_buffer_untouched():
    net = _net()
    sd = net.state_dict()
    nbt = sd["bn.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.item() == 1
    before = _snapshot(sd)
    op = pf.partition({"linear1.*": pf.l1(0.1), "bn.running_mean": pf.l2_ball(0.01)})
    pg.apply_(op, sd, 0.5)
    assert sd["bn.num_batches_tracked"] is nbt and nbt.item() == 1 and nbt.dtype == torch.int64
    assert torch.equal(sd["linear1.weight"], pf.l1(0.1)(before["linear1.weight"], 0.5))
    assert torch.equal(sd["bn.running_mean"], pf.l2_ball(0.01)(before["bn.running_mean"], 1.0))
    for k in ("linear2.weight", "linear2.bias", "bn.weight", "bn.running_var"):
        assert torch.equal(sd[k], before[k])
    # the state_dict shares storage with the module: the module changed too
    assert torch.equal(net.linear1.weight.detach(), sd["linear1.weight"])
    # a non-partition operator on a state_dict acts on its floating tensors only
    pg.apply_(pf.l1(0.0), sd, 0.5)
    assert nbt.item() == 1


def test_apply_on_tensor_and_tuples():
    torch.manual_seed(0)
    W, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    W0, b0 = W.clone(), b.clone()
    assert pg.apply_(pf.l21(0.4), (W, b), 0.5) == (W, b)
    W1, b1 = pf.l21(0.4)((W0, b0), 0.5)
    assert torch.equal(W, W1) and torch.equal(b, b1)
    x = torch.randn(7, dtype=torch.float32)
    x0 = x.clone()
    pg.apply_(pf.simplex(), x, 1.0)
    assert torch.equal(x, pf.simplex()(x0, 1.0))
    W2 = W.clone()
    pg.apply_(pf.linf1(0.3), [W, None], 0.5)  # a list with a missing bias
    assert torch.equal(W, pf.linf1(0.3)(W2, 0.5))
    # identity writes nothing (same tensors back)
    v = W._version
    pg.apply_(pf.identity(), W, 0.5)
    assert W._version == v


def test_apply_is_all_or_nothing():
    net = _net()
    before = _snapshot(net)
    bad = [
        (pf.partition({"linear1.weight": pf.l1(0.1), "nope": pf.l1(0.1)}), ValueError, "nope"),
        (pf.partition({"linear1.*": pf.l1(0.1), "*.bias": pf.l1(0.1)}), ValueError, "two rules"),
        # first rule fine, second fails on mismatched groups: the first must not be written
        (
            pf.partition({"linear2.bias": pf.l1(0.1), ("linear1.weight", "linear2.weight"): pf.l21(0.1)}),
            ValueError,
            "groups",
        ),
        (pf.l1(0.1), ValueError, "step"),
    ]
    for op, exc, msg in bad:
        step = -1.0 if msg == "step" else 0.5
        with pytest.raises(exc, match=msg):
            pg.apply_(op, net, step)
        assert _same(_snapshot(net), before)
    sd = net.state_dict()
    with pytest.raises(ValueError, match="nope"):
        pg.apply_(pf.partition({"linear1.weight": pf.l1(0.1), "nope": pf.l1(0.1)}), sd, 0.5)
    assert _same(_snapshot(net), before)
    W, b = torch.randn(3, 2), torch.randn(4)
    W0, b0 = W.clone(), b.clone()
    with pytest.raises(ValueError, match="groups"):
        pg.apply_(pf.linf1(0.1), (W, b), 0.5)
    assert torch.equal(W, W0) and torch.equal(b, b0)
    with pytest.raises(TypeError, match="op"):
        pg.apply_("l1", W, 0.5)
    with pytest.raises(TypeError, match="target"):
        pg.apply_(pf.l1(0.1), 3.0, 0.5)
    with pytest.raises(TypeError, match="target"):
        pg.apply_(pf.l1(0.1), (W, "b"), 0.5)
    assert torch.equal(W, W0)


# ------------------------------------------------------------ seed drop-ins

SEED = {
    "l1": lambda reg, **k: pf.l1(reg),
    "l2": lambda reg, **k: pf.l2(reg),
    "l21": lambda reg, **k: pf.l21(reg),
    "linf": lambda reg, **k: pf.linf(reg),
    "linf1": lambda reg, **k: pf.linf1(reg),
    "elasticnet": lambda reg, gamma=1.0: pf.elastic_net(reg, gamma=gamma),
    "logbarrier": lambda reg, **k: pf.log_barrier(reg),
}


@pytest.mark.parametrize("name", list(SEED))
def test_seed_signature_and_defaults(name):
    sig = inspect.signature(getattr(pg, name))
    names = list(sig.parameters)
    assert names[:4] == ["parameter", "bias", "reg", "lr"]
    assert sig.parameters["bias"].default is None
    assert sig.parameters["reg"].default == 0.01
    assert sig.parameters["lr"].default == 0.1
    if name == "elasticnet":
        assert names[4] == "gamma" and sig.parameters["gamma"].default == 1.0


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name", list(SEED))
def test_seed_drop_ins_equal_the_functional_ops_in_place(name, with_bias):
    torch.manual_seed(1)
    lin = nn.Linear(4, 5).double()
    if name == "logbarrier":
        with torch.no_grad():
            lin.weight.abs_()
            lin.bias.abs_()
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    fn = getattr(pg, name)
    args = (lin.weight, lin.bias) if with_bias else (lin.weight,)
    assert fn(*args) is None  # defaults: reg=0.01, lr=0.1
    want = SEED[name](0.01)((W0, b0) if with_bias else W0, 0.1)
    want_W = want[0] if with_bias else want
    assert torch.equal(lin.weight.detach(), want_W)
    assert torch.equal(lin.bias.detach(), want[1] if with_bias else b0)
    assert lin.weight.requires_grad
    # keyword form with other hyperparameters
    W1, b1 = lin.weight.detach().clone(), lin.bias.detach().clone()
    kw = {"gamma": 0.5} if name == "elasticnet" else {}
    fn(lin.weight, lin.bias, reg=0.3, lr=0.7, **kw)
    want = SEED[name](0.3, **kw)((W1, b1), 0.7)
    assert torch.equal(lin.weight.detach(), want[0]) and torch.equal(lin.bias.detach(), want[1])


@pytest.mark.parametrize("name", list(SEED))
def test_seed_drop_ins_refuse_bad_input_and_change_nothing(name):
    W, b = torch.rand(3, 2) + 0.1, torch.rand(3) + 0.1
    W0, b0 = W.clone(), b.clone()
    fn = getattr(pg, name)
    with pytest.raises(ValueError, match="reg"):
        fn(W, b, reg=-1.0)
    with pytest.raises(ValueError, match="step"):
        fn(W, b, lr=0.0)
    with pytest.raises(TypeError, match="parameter"):
        fn([1.0, 2.0], b)
    with pytest.raises(TypeError, match="bias"):
        fn(W, 3.0)
    with pytest.raises(TypeError, match="params"):
        fn(torch.ones(3, 2, dtype=torch.int64))
    if name in ("l21", "linf1"):
        with pytest.raises(ValueError, match="groups"):
            fn(W, torch.rand(4))
    assert torch.equal(W, W0) and torch.equal(b, b0)


# ----------------------------------------------------------- ProxOptimizer


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def _sgd_then_prox(net, lr, prox_fn):
    """Reference: one plain SGD step on a copy, then the prox, functionally."""
    x, y = _data()
    ref = copy.deepcopy(net)
    ref.zero_grad()
    nn.functional.mse_loss(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    return prox_fn({k: v.detach() for k, v in ref.named_parameters()})


def _step(net, opt):
    x, y = _data()
    opt.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def test_prox_optimizer_per_group_prox_entry():
    net = _net()
    net.train(False)
    op = pf.linf1(0.3)
    groups = [
        {"params": [net.linear1.weight, net.linear1.bias], "prox": op},
        {"params": [p for n, p in net.named_parameters() if not n.startswith("linear1")]},
    ]
    opt = pg.ProxOptimizer(torch.optim.SGD(groups, lr=0.1))

    def prox(p):
        W, b = op((p["linear1.weight"], p["linear1.bias"]), 0.1)
        return {**p, "linear1.weight": W, "linear1.bias": b}

    want = _sgd_then_prox(net, 0.1, prox)
    _step(net, opt)
    for k, v in net.named_parameters():
        assert torch.allclose(v.detach(), want[k], atol=1e-14, rtol=0), k


def test_prox_optimizer_with_partition_over_the_model_and_a_scheduler():
    net = _net()
    net.train(False)
    opt = pg.ProxOptimizer(torch.optim.SGD(net.parameters(), lr=0.2), NEURON, params=net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for lr in (0.2, 0.1, 0.05):  # the prox must use the scheduled lr of each step
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        want = _sgd_then_prox(net, lr, lambda p, lr=lr: NEURON(p, lr))
        _step(net, opt)
        sched.step()
        for k, v in net.named_parameters():
            assert torch.allclose(v.detach(), want[k], atol=1e-14, rtol=0), (lr, k)


def test_prox_optimizer_state_dict_round_trip_and_zero_grad():
    net = _net()
    net.train(False)
    op = pf.l21(0.2)
    make = lambda n: pg.ProxOptimizer(  # noqa: E731
        torch.optim.SGD([{"params": [n.linear1.weight, n.linear1.bias], "prox": op}], lr=0.1, momentum=0.9)
    )
    opt = make(net)
    _step(net, opt)
    _step(net, opt)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    net2 = copy.deepcopy(net)
    opt2 = make(net2)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["prox"] == op and opt2.param_groups[0]["lr"] == 0.1
    mom = opt.state[net.linear1.weight]["momentum_buffer"]
    assert torch.equal(opt2.state[net2.linear1.weight]["momentum_buffer"], mom)
    _step(net, opt)
    _step(net2, opt2)
    assert torch.equal(net.linear1.weight, net2.linear1.weight)  # the two continue identically
    opt.zero_grad()
    assert net.linear1.weight.grad is None


def test_prox_optimizer_bad_arguments():
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        pg.ProxOptimizer("sgd")
    with pytest.raises(TypeError, match="prox"):
        pg.ProxOptimizer(sgd, "l1", params=net)
    with pytest.raises(ValueError, match="together"):
        pg.ProxOptimizer(sgd, pf.l1(0.1))
    with pytest.raises(TypeError, match="prox"):
        pg.ProxOptimizer(torch.optim.SGD([{"params": net.parameters(), "prox": 0.1}], lr=0.1))


# ------------------------------------------------- apply_: the in-place fast path
def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [0.3, "tensor"])
def test_apply_fast_path_is_bitwise_the_functional_prox(dtype, step):
    # l1 on a whole model writes in place with the functional kernel (float32/64, float step)
    # and falls back to compute-and-copy otherwise; both must equal the pure operator exactly.
    step = torch.tensor(0.3, dtype=torch.float64) if step == "tensor" else step
    ops = (
        pf.l1(0.7),
        pf.partition({"*.bias": pf.l1(0.7), "0.weight": pf.l21(0.5), "2.weight": pf.l1(0.1)}),
        # both weights in one l21 writer (each its own groups), the biases in one l1 writer
        pf.partition({"*.weight": pf.l21(0.5, group_dim=-1), "*.bias": pf.l1(0.1)}),
        # tuple rules: one joint writer each (neuron i = row i of W1, b1[i], column i of W2)
        pf.partition({("0.weight", "0.bias", "2.weight"): pf.l21(0.9, group_dim=(0, 0, 1)), "2.bias": pf.l1(0.1)}),
        pf.partition({("0.weight", "0.bias", "2.weight"): pf.linf1(0.9, group_dim=(0, 0, 1))}),
    )
    for op in ops:
        net = _mlp(dtype)
        params = {k: v.detach().clone() for k, v in net.named_parameters()}
        want = op(params, step) if isinstance(op, pf.partition) else dict(zip(params, op(list(params.values()), step)))
        objs = {k: id(v) for k, v in net.named_parameters()}
        target = net if isinstance(op, pf.partition) else list(net.parameters())
        ptrs = {k: v.data_ptr() for k, v in net.named_parameters()}
        pg.apply_(op, target, step)
        got = dict(net.named_parameters())
        assert {k: id(v) for k, v in got.items()} == objs
        assert {k: v.data_ptr() for k, v in got.items()} == ptrs
        for k in want:
            assert torch.equal(got[k].detach(), want[k]), k
            assert got[k].dtype == dtype


def test_joint_writers_fall_back_for_mixed_dtypes_and_views():
    # l21 / linf1 on a (weight, bias) pair write in place only for one float32/float64 dtype
    # and contiguous tensors; otherwise they compute and copy: the values are the same.
    for op in (pf.l21(0.8), pf.linf1(0.8)):
        W, b = torch.randn(5, 3), torch.randn(5, dtype=torch.float64)
        want = op((W, b), 0.5)
        pg.apply_(op, (W, b), 0.5)
        assert torch.equal(W, want[0]) and torch.equal(b, want[1])
        W = torch.randn(3, 5).t()  # non-contiguous
        b = torch.randn(5)
        want = op((W, b), 0.5)
        pg.apply_(op, (W, b), 0.5)
        assert torch.equal(W, want[0]) and torch.equal(b, want[1])


def test_apply_fast_path_writes_once_and_only_where_it_may():
    W = torch.randn(6, 4)
    # a transposed (non-contiguous) view: computed and copied, same values
    Wt = W.clone().t()
    want = pf.l1(0.2)(Wt, 0.5)
    pg.apply_(pf.l1(0.2), Wt, 0.5)
    assert torch.equal(Wt, want)
    # tied weights (one tensor under two names, as in a state_dict): the prox acts once
    sd = {"enc.weight": W, "dec.weight": W}
    want = pf.l1(0.2)(W, 0.5)
    pg.apply_(pf.partition({"*": pf.l1(0.2)}), sd, 0.5)
    assert torch.equal(W, want)
    want = pf.l21(0.4)(W, 0.5)  # the same for l21's writer
    pg.apply_(pf.partition({"*": pf.l21(0.4)}), sd, 0.5)
    assert torch.equal(W, want)
    for op in (pf.l21(0.4), pf.linf1(0.4)):  # and for the joint writers: one tensor twice
        want = op((W, W), 0.5)[0]
        pg.apply_(op, (W, W), 0.5)
        assert torch.equal(W, want)
    # views of one storage passed together: also computed from the old values, then copied
    base = torch.randn(10)
    a, b = base[:5], base[5:]
    want = torch.cat(pf.l1(0.2)([a, b], 0.5))
    pg.apply_(pf.l1(0.2), [a, b], 0.5)
    assert torch.equal(base, want)
    # reg = 0 is the identity: nothing is written, the version counter stays
    v = W._version
    pg.apply_(pf.l1(0.0), W, 0.5)
    assert W._version == v


def test_apply_fast_path_keeps_autograd_and_optimizer_state_usable():
    net = _mlp()
    opt = pg.ProxOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), pf.partition({"*": pf.l1(0.01)}), params=net)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    ref = copy.deepcopy(net)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        # independent path: autograd + manual SGD + the pure operator
        g = torch.autograd.grad(nn.functional.mse_loss(ref(x), y), list(ref.parameters()))
        with torch.no_grad():
            for p, gp in zip(ref.parameters(), g):
                p.copy_(pf.l1(0.01)(p - 0.1 * gp, 0.1))
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
        assert p.requires_grad


@requires_compile
@pytest.mark.parametrize(
    "prox",
    [
        pf.partition({"*": pf.l1(0.1)}),
        pf.partition({"*.weight": pf.l21(0.5), "*.bias": pf.l1(0.1)}),
        pf.partition({("0.weight", "0.bias"): pf.linf1(0.5), "2.*": pf.l2(0.1)}),
    ],
    ids=["l1", "l21+l1", "linf1+l2"],
)
def test_apply_compiles_fullgraph_and_computes_and_copies(prox):
    # Traced, apply_ takes the compute-and-copy path (no host reads of data pointers, no
    # inference-mode query): one graph, the same values as the functional prox.
    net = _mlp()
    ref = {k: v.detach().clone() for k, v in net.named_parameters()}
    step = torch.tensor(0.5)
    torch.compile(lambda s: pg.apply_(prox, net, s), fullgraph=True, backend="eager")(step)
    want = prox(ref, step)  # eager; traced group operators may round differently
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), want[k], rtol=1e-6, atol=1e-7)
        assert v.requires_grad


@requires_compile
def test_prox_optimizer_step_under_torch_compile():
    # torch.optim's step breaks the graph itself (optimizer._use_grad); the prox step traces.
    net, ref = _mlp(), _mlp()
    prox = pf.partition({"*.weight": pf.l21(0.5), "*.bias": pf.l1(0.1)})
    opt = pg.ProxOptimizer(torch.optim.SGD(net.parameters(), lr=0.2), prox, params=net)
    ref_opt = pg.ProxOptimizer(torch.optim.SGD(ref.parameters(), lr=0.2), prox, params=ref)
    step = torch.compile(opt.step, backend="eager")
    x = torch.randn(16, 5)
    for _ in range(3):
        for m, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
        step()
        ref_opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_apply_refuses_inference_tensors_outside_inference_mode():
    with torch.inference_mode():
        net = _mlp()
        W = torch.randn(3, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"target\['0.weight'\] is an inference tensor"):
        pg.apply_(pf.partition({"0.*": pf.l21(0.5), "2.*": pf.l1(0.5)}), net, 0.5)
    assert _same(net.state_dict(), before)
    with pytest.raises(ValueError, match=r"target\[0\] is an inference tensor"):
        pg.apply_(pf.l1(0.5), W, 0.5)
    with torch.inference_mode():  # inside inference mode it may be written
        want = pf.l1(0.5)(W, 0.5)
        pg.apply_(pf.l1(0.5), W, 0.5)
        assert torch.equal(W, want)


def test_module_walk_lists_what_named_parameters_lists():
    """apply_ walks a module's parameters itself (faster); the list must be named_parameters()'s."""
    from torch.nn.utils import parametrize

    from proxfunc.compat import _named_parameters

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 3, bias=False)
            self.dec = nn.Linear(3, 4)
            self.dec.weight = nn.Parameter(self.enc.weight.t().clone())
            self.head = nn.Linear(4, 4)
            self.tail = self.head  # a shared submodule
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.LayerNorm(2)])
            self.named = nn.ModuleDict({"b": nn.Linear(1, 1), "a": nn.Conv2d(1, 2, 3)})
            self.scale = nn.Parameter(torch.ones(()))
            self.head2 = nn.Linear(4, 4)
            self.head2.weight = self.head.weight  # a tied parameter
            self.register_parameter("missing", None)

    class Listed(nn.Linear):  # lists its parameters its own way: named_parameters() is used
        def named_parameters(self, *a, **k):
            yield from reversed(list(super().named_parameters(*a, **k)))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Listed(2, 2)

    m = Tied()
    parametrize.register_parametrization(m.head2, "bias", nn.Identity())
    for mod in (m, nn.Sequential(), nn.Linear(3, 2), Listed(3, 2), Outer(), nn.Sequential(m, nn.Linear(2, 2))):
        (names, tensors), want = _named_parameters(mod), list(mod.named_parameters())
        assert names == [k for k, _ in want] and len(tensors) == len(want)
        assert all(a is b for a, (_, b) in zip(tensors, want))
