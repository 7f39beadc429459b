"""Every operator composes with torch.func: grad, vjp, jvp/jacfwd, jacrev, vmap, functional_call.

Iterates over ``tests.cases.CASES`` so operators registered later are covered automatically.
Oracles: eager autograd (a different code path: the eager threshold is the host-checked
fixed point, the transformed one the unrolled iteration), central finite differences
(``gradcheck`` in float64 away from kinks), per-example loops for vmap, and the in-place
``compat.apply_`` training loop for ``functional_call``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import proxfunc as pf
from proxfunc.compat import apply_
from tests.cases import CASES, layer, named
from tests.helpers import pytree

STEP = 0.7
ids = repr


def leaves(tree):
    return pytree.tree_leaves(tree)


def weights_like(tree, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in leaves(tree)]


def loss_of(out, ws):
    return sum((o * w).sum() for o, w in zip(leaves(out), ws))


def flat_fn(op, params, step=STEP):
    """``op`` as a function of one flat vector (for jacobians and gradcheck)."""
    ls, spec = pytree.tree_flatten(params)
    shapes = [x.shape for x in ls]
    sizes = [x.numel() for x in ls]

    def f(v):
        parts = torch.split(v, sizes)
        tree = pytree.tree_unflatten([q.reshape(s) for q, s in zip(parts, shapes)], spec)
        return torch.cat([o.reshape(-1) for o in leaves(op(tree, step))])

    return f, torch.cat([x.reshape(-1) for x in ls])


def float_field(op):
    """Name and value of the first float hyperparameter (None for combinators / no fields)."""
    for k in op._hyper_names:
        v = getattr(op, k)
        if isinstance(v, float) and k != "group_dim":
            return k, v
    return None


def rebuild(op, name, value):
    return type(op)(**{**dict(op._params()), name: value})


HYPER_CASES = [c for c in CASES if float_field(c.make_op()) is not None]
STEP_CASES = [c for c in CASES if not c.projection]
LOOP_CASES = [c for c in CASES if c.make_params in (layer, named)]


def assert_trees_close(a, b, **kw):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **kw)


# ---------------------------------------------------------------------------------- grad / vjp
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_grad_matches_eager_autograd(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    ws = weights_like(p)
    g = grad(lambda q: loss_of(op(q, STEP), ws))(p)
    req = pytree.tree_map(lambda x: x.detach().clone().requires_grad_(True), p)
    ref = torch.autograd.grad(loss_of(op(req, STEP), ws), leaves(req), allow_unused=True)
    ref = [torch.zeros_like(x) if r is None else r for x, r in zip(leaves(req), ref)]
    for a, b in zip(leaves(g), ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_vjp_equals_grad_of_weighted_output(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    ws = weights_like(p)
    out, pull = vjp(lambda q: op(q, STEP), p)
    assert_trees_close(out, op(p, STEP))
    (ct,) = pull(pytree.tree_unflatten(ws, pytree.tree_structure(out)))
    assert_trees_close(ct, grad(lambda q: loss_of(op(q, STEP), ws))(p))


# ------------------------------------------------------------------------ jvp / jacfwd / jacrev
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_jacfwd_jacrev_jvp_agree(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    f, v = flat_fn(op, p)
    jr = jacrev(f)(v)
    jf = jacfwd(f)(v)
    assert torch.isfinite(jr).all()
    torch.testing.assert_close(jf, jr)
    t = torch.randn(v.shape, generator=torch.Generator().manual_seed(5), dtype=v.dtype)
    out, tangent = jvp(f, (v,), (t,))
    torch.testing.assert_close(out, f(v))
    torch.testing.assert_close(tangent, jr @ t)


@pytest.mark.parametrize("case", [c for c in CASES if c.smooth_grad], ids=ids)
def test_gradcheck_float64_away_from_kinks(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    f, v = flat_fn(op, p)
    assert torch.autograd.gradcheck(f, (v.clone().requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ vmap
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_vmap_over_params(case):
    op = case.make_op()
    ps = [case.make_params(torch.float64, seed=s) for s in (0, 10, 20)]
    batched = pytree.tree_map(lambda *xs: torch.stack(xs), *ps)
    out = vmap(lambda q: op(q, STEP))(batched)
    for i, q in enumerate(ps):
        assert_trees_close(pytree.tree_map(lambda x, i=i: x[i], out), op(q, STEP))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_vmap_over_step(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    steps = torch.tensor([0.05, 0.7, 3.0], dtype=torch.float64)
    out = vmap(lambda s: op(p, s))(steps)
    for i, s in enumerate(steps.tolist()):
        assert_trees_close(pytree.tree_map(lambda x, i=i: x[i], out), op(p, s))


@pytest.mark.parametrize("case", HYPER_CASES, ids=ids)
def test_vmap_over_hyperparameter(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    name, value = float_field(op)
    vals = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) * value
    out = vmap(lambda r: rebuild(op, name, r)(p, STEP))(vals)
    for i, r in enumerate(vals.tolist()):
        assert_trees_close(pytree.tree_map(lambda x, i=i: x[i], out), rebuild(op, name, r)(p, STEP))


# ---------------------------------------------------------------- gradients w.r.t. hyperparameters
@pytest.mark.parametrize("case", HYPER_CASES, ids=ids)
def test_gradient_wrt_tensor_hyperparameter(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    name, value = float_field(op)
    ws = weights_like(p)

    def h(r):
        return loss_of(rebuild(op, name, r)(p, STEP), ws)

    r0 = torch.tensor(value, dtype=torch.float64)
    g = grad(h)(r0)
    assert torch.isfinite(g)
    assert torch.autograd.gradcheck(h, (r0.clone().requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g, torch.autograd.functional.jacobian(h, r0))


@pytest.mark.parametrize("case", [c for c in STEP_CASES if c.smooth_grad], ids=ids)
def test_gradient_wrt_tensor_step(case):
    op, p = case.make_op(), case.make_params(torch.float64)
    ws = weights_like(p)

    def h(s):
        return loss_of(op(p, s), ws)

    s0 = torch.tensor(STEP, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(h, (s0,), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(grad(h)(s0.detach()))


# ------------------------------------------------------- finiteness at zero groups, ties, boundaries
def degenerate_inputs(case):
    p = case.make_params(torch.float64)
    op = case.make_op()
    zeros = pytree.tree_map(torch.zeros_like, p)
    ties = pytree.tree_map(lambda x: torch.full_like(x, 0.25), p)
    signed_ties = pytree.tree_map(lambda x: torch.full_like(x, 0.25) * torch.sign(torch.randn_like(x)), p)
    zero_group = pytree.tree_map(lambda x: torch.cat([torch.zeros_like(x[:1]), x[1:]]) if x.dim() else x, p)
    boundary = op(p, STEP)  # on the boundary of a projection's set / at a threshold kink
    return {"zeros": zeros, "ties": ties, "signed_ties": signed_ties, "zero_group": zero_group, "boundary": boundary}


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_gradients_finite_at_zero_groups_ties_and_boundaries(case):
    op = case.make_op()
    for what, q in degenerate_inputs(case).items():
        ws = weights_like(q)
        out = op(q, STEP)
        assert all(torch.isfinite(x).all() for x in leaves(out)), what
        g = grad(lambda z, ws=ws: loss_of(op(z, STEP), ws))(q)
        assert all(torch.isfinite(x).all() for x in leaves(g)), what
        f, v = flat_fn(op, q)
        assert torch.isfinite(jacfwd(f)(v)).all(), what
        assert torch.isfinite(jacrev(f)(v)).all(), what


# ----------------------------------------------------------------- functional_call training loop
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(4, 6)
        self.linear2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


def model_prox(case):
    op = case.make_op()
    if case.make_params is layer:
        return pf.partition({("linear1.weight", "linear1.bias"): op})
    return op  # make_params is named: the op already takes the whole dict


@pytest.mark.parametrize("case", LOOP_CASES, ids=ids)
def test_functional_call_training_loop_matches_in_place_loop(case):
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randn(32, 3, dtype=torch.float64)
    prox = model_prox(case)
    lr = 0.1

    def loss_fn(p, x, y):
        return nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(5):
        g = grad(loss_fn)(params, x, y)
        params = prox({k: params[k] - lr * g[k] for k in params}, lr)

    # Independent path: autograd on the module, an in-place SGD update, compat.apply_.
    ref = MLP().double()
    ref.load_state_dict(model.state_dict())
    for _ in range(5):
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for w in ref.parameters():
                w -= lr * w.grad
        apply_(prox, ref, lr)
    for k, v in ref.named_parameters():
        assert torch.isfinite(params[k]).all()
        torch.testing.assert_close(params[k], v.detach())
    assert torch.isfinite(loss_fn(params, x, y))
