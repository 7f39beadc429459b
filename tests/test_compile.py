"""Every operator compiles with ``torch.compile(fullgraph=True)`` (no graph break), and a new
``step`` or tensor hyperparameter value (an lr schedule) reuses the compiled graph.

Graph breaks and recompiles are a property of dynamo's trace, not of the backend, so most
tests use ``CompileCounter`` (dynamo traces, the graph runs eagerly, frames are counted);
inductor runs for a few small cases (l1, linf1, and a whole training step) to check
the generated code too. Iterates over ``tests.cases.CASES``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch.func import functional_call, grad

import proxfunc as pf
from tests.cases import CASES
from tests.conftest import requires_compile
from tests.helpers import pytree

pytestmark = requires_compile

HYPER = [c for c in CASES if any(isinstance(getattr(c.make_op(), k), float) for k in c.make_op()._hyper_names)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def close(a, b, **kw):
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **kw)


def no_recompile():
    return torch._dynamo.config.patch(error_on_recompile=True)


def t64(v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fullgraph_and_no_recompile_on_new_step(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    cnt = CompileCounter()
    f = torch.compile(lambda q, s: op(q, s), backend=cnt, fullgraph=True)
    close(f(p, t64(0.7)), op(p, 0.7))
    with no_recompile():
        for s in (0.05, 1.3, 4.0):
            close(f(p, t64(s)), op(p, s))
    assert cnt.frame_count == (1 if cnt.op_count else 0)  # identity traces to no graph at all
    # value() compiles too
    g = torch.compile(op.value, backend=CompileCounter(), fullgraph=True)
    close(g(p), op.value(p))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_changing_python_float_step_recompiles_at_most_once(case):
    """An lr schedule passed as a Python float: dynamo specializes on the first value, then
    makes the float dynamic (one recompile) and reuses that graph for every later value."""
    op, p = case.make_op(), case.make_params(torch.float64)
    cnt = CompileCounter()
    f = torch.compile(lambda q, s: op(q, s), backend=cnt, fullgraph=True)
    for s in (0.7, 0.05, 1.3, 4.0, 0.3):
        close(f(p, s), op(p, s))
    assert cnt.frame_count <= 2


def test_import_does_not_load_dynamo():
    """``import proxfunc`` (and eager calls) leave ``torch._dynamo`` unimported: it costs
    about a second. :func:`proxfunc.calculus._constant` sets the marker that
    ``torch.compiler.assume_constant_result`` sets, which is checked here too."""
    code = (
        "import sys, torch, proxfunc as pf\n"
        "x = torch.randn(4, 3)\n"
        "pf.partition({'*': pf.l21(0.1)})({'w': x}, 0.1); pf.linf1(0.1)(x, torch.tensor(0.1))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    def fn():
        return 0

    before = set(vars(fn))
    torch.compiler.assume_constant_result(fn)
    assert set(vars(fn)) - before == {"_dynamo_marked_constant"} and fn._dynamo_marked_constant is True
    assert pf.calculus._resolve_plan._dynamo_marked_constant is True


@pytest.mark.parametrize("case", HYPER, ids=repr)
def test_no_recompile_on_new_tensor_hyperparameter(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    name = next(k for k in op._hyper_names if isinstance(getattr(op, k), float))
    base = getattr(op, name)

    def make(r):
        return type(op)(**{**dict(op._params()), name: r})

    cnt = CompileCounter()
    f = torch.compile(lambda q, r, s: make(r)(q, s), backend=cnt, fullgraph=True)
    close(f(p, t64(base), t64(0.7)), op(p, 0.7))
    with no_recompile():
        for k in (0.5, 2.0):
            close(f(p, t64(base * k), t64(0.3)), make(base * k)(p, 0.3))
    # A tensor hyperparameter held by the operator and updated in place (a schedule).
    r = t64(base)
    held = make(r)
    h = torch.compile(lambda q, s: held(q, s), backend=cnt, fullgraph=True)
    h(p, t64(0.7))
    with no_recompile():
        r.fill_(base * 1.5)
        close(h(p, t64(0.7)), make(base * 1.5)(p, 0.7))
    assert cnt.frame_count == 2


def big_model_params(layers=6, width=16):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*mods)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def test_whole_model_partition_is_one_graph():
    model, p = big_model_params()
    prox = pf.partition(
        {
            ("0.weight", "0.bias"): pf.linf1(0.05),
            ("2.weight", "2.bias"): pf.l21(0.1),
            "4.*": pf.l1(0.01),
            "6.weight": pf.l2_ball(2.0),
            "8.weight": pf.elastic_net(0.01, gamma=0.5),
            "10.bias": pf.nonneg(),
        }
    )
    cnt = CompileCounter()
    f = torch.compile(lambda q, s: prox(q, s), backend=cnt, fullgraph=True)
    close(f(p, torch.tensor(0.1)), prox(p, 0.1))
    with no_recompile():
        close(f(p, torch.tensor(0.02)), prox(p, 0.02))
    assert cnt.frame_count == 1
    assert set(f(p, torch.tensor(0.1))) == set(p)


# ---------------------------------------------------------------------------------- inductor
@pytest.mark.parametrize("op", [pf.l1(0.3), pf.linf1(0.4)], ids=["l1", "linf1"])
def test_inductor_matches_eager(op):
    x = torch.randn(33, 17, generator=torch.Generator().manual_seed(0))
    cnt = CompileCounterWithBackend("inductor")
    f = torch.compile(lambda q, s: op(q, s), backend=cnt, fullgraph=True)
    close(f(x, torch.tensor(0.5)), op(x, 0.5))
    with no_recompile():
        close(f(x, torch.tensor(2.0)), op(x, 2.0))
    assert cnt.frame_count == 1


def test_inductor_l1_is_bitwise_eager_with_gradients():
    """With gradients, eager and traced l1 both run the reference ``relu(x - t) - relu(-x - t)``:
    the same bits (+-inf, +-0, entries at +-t included; NaN where the input is NaN, its sign
    bit left to the compiler) and the same gradients in ``x`` and the step, the kinks
    ``|x| = t`` included (subgradient 0 there)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(41, generator=g)
    x[:10] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, -0.5, 1e-30, -1e30, 3.0])
    op = pf.l1(0.25)

    def value_and_grads(q, s):
        def total(q, s):
            out = op(q, s)
            return torch.where(torch.isfinite(out), out, 0).sum(), out

        (gq, gs), out = grad(total, argnums=(0, 1), has_aux=True)(q, s)
        return out, gq, gs

    cnt = CompileCounterWithBackend("inductor")
    f = torch.compile(value_and_grads, backend=cnt, fullgraph=True)
    step = torch.tensor(2.0)
    got, want = f(x, step), value_and_grads(x, step)
    nan = x.isnan()
    assert torch.equal(got[0].isnan(), nan) and torch.equal(want[0].isnan(), nan)
    assert torch.equal(got[0][~nan].view(torch.int32), want[0][~nan].view(torch.int32))
    kink = x.abs() == 0.5  # reg * step
    assert kink.sum() == 2
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1][kink], torch.zeros(2))  # a subgradient: the relu form's choice
    away = torch.where(kink, 1.5 * x, x)  # the same shapes: no recompile
    got, want = f(away, step), value_and_grads(away, step)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert cnt.frame_count == 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(2, 8)
        self.linear2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.linear2(torch.tanh(self.linear1(x)))


def test_design_training_step_compiles_to_one_graph():
    """A training step, grad + update + prox, in one compiled graph, lr as a tensor."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(64, 2)
    y = (x[:, :1] * x[:, 1:]).sign()
    prox = pf.partition({("linear1.weight", "linear1.bias"): pf.linf1(0.005)})

    def loss_fn(p, x, y):
        return nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    def train_step(p, x, y, lr):
        g = grad(loss_fn)(p, x, y)
        p = {k: p[k] - lr * g[k] for k in p}
        return prox(p, lr)

    cnt = CompileCounterWithBackend("inductor")
    step_c = torch.compile(train_step, backend=cnt, fullgraph=True)
    p_c = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_c = step_c(p_c, x, y, torch.tensor(0.5))
    p_e = train_step(p_e, x, y, 0.5)
    with no_recompile():
        for lr in (0.4, 0.3, 0.2):  # an lr schedule
            p_c = step_c(p_c, x, y, torch.tensor(lr))
            p_e = train_step(p_e, x, y, lr)
    assert cnt.frame_count == 1
    close(p_c, p_e, atol=1e-5, rtol=1e-4)
    assert loss_fn(p_c, x, y) < loss_fn({k: v.detach() for k, v in model.named_parameters()}, x, y)
