"""Weighted penalties: tensor and pytree hyperparameters, per-entry and per-group weights.

Oracles: the scalar operators applied entry by entry or group by group (each tested on its
own elsewhere), the optimality conditions of the weighted problems, scikit-learn's Lasso on
rescaled features for the adaptive lasso, gradcheck for the derivatives with respect to the
weights, and torch.optim + the prox for the training-loop steps.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso
from torch.func import grad, vmap

import proxfunc as pf
from proxfunc.compat import ProxOptimizer
from tests.conftest import requires_compile

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _weights(*shape, seed=1, zeros=True):
    w = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * 2
    if zeros:
        w.view(-1)[::5] = 0.0  # unpenalised entries
    return w


ENTRYWISE = {
    "l1": (lambda r: pf.l1(r), lambda r: pf.l1(r)),
    "elastic_net": (lambda r: pf.elastic_net(r, 0.7), lambda r: pf.elastic_net(r, 0.7)),
    "elastic_net_gamma": (lambda r: pf.elastic_net(0.3, r), lambda r: pf.elastic_net(0.3, r)),
    "ridge": (lambda r: pf.ridge(r), lambda r: pf.ridge(r)),
    "huber": (lambda r: pf.huber(r, 0.5), lambda r: pf.huber(r, 0.5)),
    "huber_delta": (lambda r: pf.huber(0.8, r + 0.1), lambda r: pf.huber(0.8, r + 0.1)),
}


@pytest.mark.parametrize("name", sorted(ENTRYWISE))
@pytest.mark.parametrize("step", [0.5, torch.tensor(1.7, dtype=D)])
def test_entrywise_weights_equal_the_scalar_operator_per_entry(name, step):
    make, scalar = ENTRYWISE[name]
    x = _rand(4, 5, scale=2.0)
    w = _weights(4, 5)
    out = make(w)(x, step)
    expected = torch.stack([scalar(float(wi))(xi.reshape(1), step)[0] for wi, xi in zip(w.view(-1), x.view(-1))])
    torch.testing.assert_close(out.view(-1), expected, atol=1e-15, rtol=1e-14)
    value = make(w).value(x)
    expected_value = sum(float(scalar(float(wi)).value(xi.reshape(1))) for wi, xi in zip(w.view(-1), x.view(-1)))
    assert float(value) == pytest.approx(expected_value, rel=1e-13)
    # a row of weights broadcasts over the rows
    row = _weights(5, seed=3)
    torch.testing.assert_close(make(row)(x, step), make(row.expand(4, 5).clone())(x, step), atol=0, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    step=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
)
def test_weighted_l1_optimality(seed, scale, step):
    # z = prox(x): 0 in w * d|z| + (z - x) / step for every entry, at every scale; zero weights
    # and exact zeros of x included
    x = _rand(30, seed=seed, scale=scale)
    x[::7] = 0.0
    w = _weights(30, seed=seed + 1) * scale
    z = pf.l1(w)(x, step)
    r = (x - z) / step
    on = z != 0
    torch.testing.assert_close(r[on], w[on] * torch.sign(z[on]), atol=1e-12 * scale / step, rtol=1e-12)
    assert (r[~on].abs() <= w[~on] * (1 + 1e-12) + 1e-300).all()


def test_pytree_weights_are_one_value_per_leaf():
    params = {"w": _rand(3, 4), "b": _rand(4, seed=2), "skip": _rand(2, seed=5)}
    reg = {"w": _weights(3, 4), "b": 0.3, "skip": 0.0}
    out = pf.l1(reg)(params, 0.5)
    torch.testing.assert_close(out["w"], pf.l1(reg["w"])(params["w"], 0.5), atol=0, rtol=0)
    torch.testing.assert_close(out["b"], pf.l1(0.3)(params["b"], 0.5), atol=0, rtol=0)
    torch.testing.assert_close(out["skip"], params["skip"], atol=0, rtol=0)
    v = pf.l1(reg).value(params)
    assert float(v) == pytest.approx(float((reg["w"] * params["w"].abs()).sum() + 0.3 * params["b"].abs().sum()))
    with pytest.raises(ValueError, match="l1: reg .*structure"):
        pf.l1({"w": 0.1})(params, 0.5)
    with pytest.raises(ValueError, match="l1: reg must be >= 0"):
        pf.l1({"w": 0.1, "b": -1.0})


@pytest.mark.parametrize("op_name", ["l21", "linf1"])
@pytest.mark.parametrize("group_dim", [0, 1])
def test_group_weights_equal_the_scalar_operator_per_group(op_name, group_dim):
    make = getattr(pf, op_name)
    W = _rand(6, 5, scale=1.5)
    b = _rand(6 if group_dim == 0 else 5, seed=4)
    G = W.shape[group_dim]
    w = _weights(G, seed=7)
    step = 0.4
    gd = (group_dim, 0)  # group g is (the slice g of W along group_dim, b[g])
    out_W, out_b = make(w, group_dim=gd)((W, b), step)
    for g in range(G):
        Wg = W.select(group_dim, g)
        ref_W, ref_b = make(float(w[g]), group_dim=0)((Wg.unsqueeze(0), b[g].reshape(1)), step)
        torch.testing.assert_close(out_W.select(group_dim, g), ref_W[0], atol=1e-14, rtol=1e-13)
        torch.testing.assert_close(out_b[g], ref_b[0], atol=1e-14, rtol=1e-13)
    norms = make(1.0, group_dim=gd).group_norms((W, b))
    assert float(make(w, group_dim=gd).value((W, b))) == pytest.approx(float((w * norms).sum()), rel=1e-14)
    with pytest.raises(ValueError, match=f"{op_name}: reg has 3 weights but params has {G} groups"):
        make(_weights(3), group_dim=gd)((W, b), step)
    with pytest.raises(ValueError, match=f"{op_name}: reg must be a number or a vector"):
        make(_weights(2, 2))


def test_l21_group_weights_optimality():
    # live group: x_g - z_g = step * w_g * z_g / ||z_g||; dead group: ||x_g|| <= step * w_g
    X = _rand(20, 6, scale=1.0)
    w = torch.linspace(0.0, 10.0, 20, dtype=D)
    step = 0.5
    Z = pf.l21(w)(X, step)
    n = Z.norm(dim=1)
    live = n > 0
    assert live.any() and (~live).any()
    torch.testing.assert_close(X[live] - Z[live], step * w[live, None] * Z[live] / n[live, None], atol=1e-13, rtol=0)
    assert (X[~live].norm(dim=1) <= step * w[~live] + 1e-13).all()


@pytest.mark.parametrize("name", ["l1", "elastic_net", "ridge", "huber", "l21", "linf1"])
def test_gradients_with_respect_to_the_weights(name):
    x = _rand(5, 4, scale=2.0, seed=11)
    if name in ("l21", "linf1"):
        w0 = torch.tensor([0.3, 0.5, 0.1, 0.7, 0.2], dtype=D)
        make = lambda w: getattr(pf, name)(w)  # noqa: E731
    else:
        w0 = torch.rand(5, 4, generator=torch.Generator().manual_seed(2), dtype=D) + 0.1
        make = {
            "l1": pf.l1,
            "elastic_net": lambda w: pf.elastic_net(w, 0.5),
            "ridge": pf.ridge,
            "huber": lambda w: pf.huber(w, 1.0),
        }[name]
    w = w0.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w_: make(w_)(x, 0.7), (w,))
    assert torch.autograd.gradcheck(lambda w_: make(w_).value(x), (w,))
    # and through torch.func: grad of a loss of the prox with respect to the weights
    g = grad(lambda w_: (make(w_)(x, 0.7) ** 2).sum())(w0)
    g_ref = torch.autograd.grad((make(w)(x, 0.7) ** 2).sum(), w)[0]
    torch.testing.assert_close(g, g_ref)


def test_weights_under_vmap_and_compile_free_reference():
    # vmap over the inputs with fixed weights, and over the weights themselves
    x = _rand(8, 6)
    w = _weights(6)
    out = vmap(lambda r: pf.l1(w)(r, 0.5))(x)
    torch.testing.assert_close(out, pf.l1(w)(x, 0.5))
    ws = torch.stack([w, 2 * w, 0 * w])
    outs = vmap(lambda wi: pf.l1(wi)(x[0], 0.5))(ws)
    for i in range(3):
        torch.testing.assert_close(outs[i], pf.l1(ws[i])(x[0], 0.5))


def test_adaptive_lasso_matches_sklearn_on_rescaled_features():
    # min ||Xw - y||^2/(2n) + alpha sum_j c_j |w_j|  ==  Lasso on X_j / c_j, then w_j = v_j / c_j
    X, y = load_diabetes(return_X_y=True)
    y = y / y.std()
    c = np.linspace(0.5, 2.0, 10)
    alpha = 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = Lasso(alpha=alpha, tol=1e-16, max_iter=1_000_000, fit_intercept=False).fit(X / c, y)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    res = pf.proximal_gradient(
        lambda w: 0.5 * ((Xt @ w - yt) ** 2).mean(),
        torch.zeros(10, dtype=D),
        pf.l1(alpha * torch.tensor(c)),
        tol=1e-14,
        maxiter=5000,
    )
    assert res.converged
    np.testing.assert_allclose(res.params.numpy(), sk.coef_ / c, atol=1e-10, rtol=0)


def test_prox_sgd_prox_adam_and_prox_optimizer_take_tensor_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: _rand(*v.shape, seed=3) for k, v in params.items()}
    reg = {"weight": _weights(3, 4), "bias": torch.tensor([0.0, 0.1, 0.2], dtype=D)}
    prox = pf.l1(reg)
    new, _ = pf.prox_sgd(prox, lr=0.1).step(params, grads, pf.prox_sgd(prox, lr=0.1).init(params))
    for k in params:
        expected = pf.l1(reg[k])(params[k] - 0.1 * grads[k], 0.1)
        torch.testing.assert_close(new[k], expected, atol=1e-15, rtol=0)
    adam = pf.prox_adam(prox, lr=0.01)
    new_a, _ = adam.step(params, grads, adam.init(params))
    moved = {k: params[k] - 0.01 * grads[k] / (grads[k].abs() + 1e-8) for k in params}  # Adam's first step
    for k in params:
        torch.testing.assert_close(new_a[k], pf.l1(reg[k])(moved[k], 0.01), atol=1e-12, rtol=0)
    # in place, through torch.optim.SGD: per-group weights of l21 on the weight's rows
    ref = {k: v.detach().clone() for k, v in model.named_parameters()}
    for p in model.parameters():
        p.grad = grads["weight" if p.dim() == 2 else "bias"].clone()
    gw = torch.tensor([0.5, 0.0, 100.0], dtype=D)
    opt = ProxOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pf.partition({"weight": pf.l21(gw)}), params=model)
    opt.step()
    expected = pf.l21(gw)(ref["weight"] - 0.1 * grads["weight"], 0.1)
    torch.testing.assert_close(model.weight.detach(), expected, atol=1e-15, rtol=0)
    assert (model.weight.detach()[2] == 0).all() and (model.weight.detach()[1] != 0).all()


def _box_bounds(params):
    """Per-entry (weight: one lower bound per input column), per-neuron (bias) and missing bounds."""
    lower = {"weight": -_weights(params["weight"].shape[1], seed=5, zeros=False) / 4, "bias": None}
    upper = {"weight": 0.3, "bias": torch.linspace(-0.1, 0.2, params["bias"].shape[0], dtype=D)}
    return lower, upper


@pytest.mark.parametrize("kind", ["box", "l21", "l1"])
def test_prox_sgd_and_prox_adam_take_tensor_box_bounds_and_group_weights(kind):
    # functional steps: the new parameters are the prox (with these hyperparameters) of the
    # plain optimizer's update, leaf by leaf; momentum and a second step included
    torch.manual_seed(0)
    params = {k: v.detach().clone() for k, v in torch.nn.Linear(4, 3).double().named_parameters()}
    grads = [{k: _rand(*v.shape, seed=3 + i) for k, v in params.items()} for i in range(2)]
    if kind == "box":
        lower, upper = _box_bounds(params)
        prox = pf.box(lower, upper)
        per = {k: pf.box(lower[k], upper[k]) for k in params}
    elif kind == "l21":  # one weight per output neuron: rows of the weight with their bias entry
        gw = torch.tensor([0.5, 0.0, 100.0], dtype=D)
        prox = pf.l21(gw)
        per = None
    else:  # per coordinate, one tensor broadcast to every leaf's last dimension
        w = torch.tensor([0.0, 0.05, 0.2], dtype=D)
        prox = pf.l1({"weight": torch.ones(4, dtype=D) * 0.1, "bias": w})
        per = {"weight": pf.l1(torch.ones(4, dtype=D) * 0.1), "bias": pf.l1(w)}

    def reference(op_moved, lr):
        if per is None:
            return prox(op_moved, lr)
        return {k: per[k](op_moved[k], lr) for k in op_moved}

    sgd = pf.prox_sgd(prox, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(v.clone()) for v in params.values()], lr=0.1, momentum=0.9)
    p, st_ = params, sgd.init(params)
    ref_p = dict(zip(params, ref_opt.param_groups[0]["params"]))
    for g in grads:
        p, st_ = sgd.step(p, g, st_)
        for k, t in ref_p.items():
            t.grad = g[k].clone()
        ref_opt.step()
        with torch.no_grad():  # the prox after torch.optim.SGD's update, written back
            new = reference({k: t.detach() for k, t in ref_p.items()}, 0.1)
            for k, t in ref_p.items():
                t.copy_(new[k])
        for k in params:
            torch.testing.assert_close(p[k], ref_p[k].detach(), atol=1e-14, rtol=0)
    if kind == "box":
        assert pf.box(*_box_bounds(params)).value(p) == 0
    adam = pf.prox_adam(prox, lr=0.01, prox_step="scaled")
    new_a, sa = adam.step(params, grads[0], adam.init(params))
    denom = {k: grads[0][k].abs() + 1e-8 for k in params}  # Adam's first step: sqrt(v_hat) = |g|
    moved = {k: params[k] - 0.01 * grads[0][k] / denom[k] for k in params}
    n = sum(v.numel() for v in denom.values())
    step = 0.01 / (sum(v.sum() for v in denom.values()) / n)
    expected = reference(moved, step)
    for k in params:
        torch.testing.assert_close(new_a[k], expected[k], atol=1e-12, rtol=0)
    # differentiable with respect to the hyperparameters through a functional step
    if kind == "box":
        lw = lower["weight"].clone().requires_grad_()
        opt = pf.prox_sgd(pf.box({"weight": lw, "bias": None}, upper), lr=0.1)
        out, _ = opt.step(params, grads[0], opt.init(params))
        (gl,) = torch.autograd.grad(out["weight"].sum(), lw)
        clamped = (params["weight"] - 0.1 * grads[0]["weight"]) < lower["weight"]
        torch.testing.assert_close(gl, clamped.to(D).sum(0))


def test_prox_optimizer_takes_tensor_hyperparameters_in_place_and_in_its_state_dict():
    import io

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    first = {"weight": model[0].weight, "bias": model[0].bias}
    lower, upper = _box_bounds({k: v.detach() for k, v in first.items()})
    w2 = _weights(2, 3, seed=6)  # per-coordinate l1 weights of the second layer's weight
    # the wrapper's prox on named parameters (a partition whose tuple rule hands its box the
    # tuple (weight, bias): tuple-structured bounds) and a param group's own prox on its list of
    # tensors (list-structured bounds)
    bounds = [(lower["weight"], lower["bias"]), (upper["weight"], upper["bias"])]
    prox = pf.partition({("0.weight", "0.bias"): pf.box(*bounds), "2.weight": pf.l1(w2)})
    opt = ProxOptimizer(
        torch.optim.Adam(
            [
                {"params": [model[0].weight, model[0].bias, model[2].weight]},
                {"params": [model[2].bias], "prox": pf.box([torch.tensor([-0.01, 0.0], dtype=D)], 0.02)},
            ],
            lr=0.05,
        ),
        prox,
        params=model,
    )
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.05)
    x = _rand(16, 4, seed=8)
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        with torch.no_grad():  # what the in-place layer must have written
            r = dict(ref_model.named_parameters())
            r["0.weight"].copy_(pf.box(lower["weight"], upper["weight"])(r["0.weight"]))
            r["0.bias"].copy_(pf.box(None, upper["bias"])(r["0.bias"]))
            r["2.weight"].copy_(pf.l1(w2)(r["2.weight"], 0.05))
            r["2.bias"].copy_(pf.box(torch.tensor([-0.01, 0.0], dtype=D), 0.02)(r["2.bias"]))
        for (k, a), b in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-14, rtol=0, msg=k)
    assert (model[0].weight.detach() <= 0.3).all() and (model[2].bias.detach() <= 0.02).all()
    # the state dict holds the operators with their tensor hyperparameters as plain data
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = ProxOptimizer(torch.optim.Adam(opt.optimizer.param_groups[0]["params"], lr=0.05), prox, params=model)
    opt2.optimizer.add_param_group({"params": [model[2].bias]})
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["prox"] == opt.param_groups[1]["prox"]


def test_bad_weights_raise_naming_them():
    x = _rand(3, 4)
    with pytest.raises(ValueError, match="l1: reg of shape \\(5,\\) does not broadcast"):
        pf.l1(_weights(5))(x, 1.0)
    with pytest.raises(ValueError, match="elastic_net: gamma must be >= 0"):
        pf.elastic_net(0.1, torch.tensor([0.1, -1.0]))
    with pytest.raises(ValueError, match="l1: reg must not be NaN"):
        pf.l1(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="huber: delta must be > 0"):
        pf.huber(1.0, torch.tensor([0.1, 0.0]))
    with pytest.raises(TypeError, match="l1: reg"):
        pf.l1({"w": "a"})
    assert x.equal(_rand(3, 4))  # nothing changed


def test_repr_of_weights():
    assert repr(pf.l1({"w": torch.ones(2, 3), "b": 0.5})) == "l1(reg={'w': tensor(shape=(2, 3)), 'b': 0.5})"
    assert repr(pf.l21(torch.ones(4))) == "l21(reg=tensor(shape=(4,)), group_dim=0)"


@pytest.mark.parametrize("impl", ["auto", "aten", "reference"])
def test_every_implementation_and_the_in_place_layer_agree(impl):
    # dispatch's fast paths take a Python-float threshold: weights take the reference, under any
    # choice, and the in-place layer (compat.apply_) copies the reference's values in
    x = _rand(6, 5).float()
    w = _weights(6, 5).float()
    gw = _weights(6, seed=9).float()
    with pf.dispatch.implementation(impl):
        for op in (pf.l1(w), pf.l21(gw), pf.linf1(gw)):
            with pf.dispatch.implementation("reference"):
                ref = op(x, 0.3)
            torch.testing.assert_close(op(x, 0.3), ref, atol=0, rtol=0)
            model = torch.nn.Linear(5, 6, bias=False)
            with torch.no_grad():
                model.weight.copy_(x)
            pf.compat.apply_(pf.partition({"weight": op}), model, 0.3)
            torch.testing.assert_close(model.weight.detach(), ref, atol=0, rtol=0)


@requires_compile
def test_weights_trace_with_fullgraph():
    x = _rand(4, 3)
    step = torch.tensor(0.5, dtype=D)
    ops = [pf.l1(_weights(4, 3)), pf.elastic_net(_weights(3), 0.5), pf.l21(_weights(4)), pf.linf1(_weights(4))]
    ops.append(pf.l1({"a": _weights(4, 3), "b": 0.2}))
    for op in ops:
        arg = {"a": x, "b": x} if isinstance(op.reg, dict) else x
        f = torch.compile(lambda a, s, op=op: (op(a, s), op.value(a)), fullgraph=True, backend="eager")
        out, val = f(arg, step)
        torch.testing.assert_close(out, op(arg, step), atol=0, rtol=0)
        torch.testing.assert_close(val, op.value(arg), atol=0, rtol=0)
