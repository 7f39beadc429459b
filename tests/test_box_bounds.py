"""Box bounds and max-norm radii that vary over the entries: tensors and pytrees.

Oracles: numpy's ``clip`` in float64 (exact: rounding is monotone, so the clip of a
representable point rounded to a dtype is the clamp to the rounded bounds), the scalar box
applied leaf by leaf, Moreau's identity for ``conjugate(l1(w))`` against ``linf_ball(w)``,
finite differences (``gradcheck``) for the derivatives with respect to the bounds, and the
closed form ``d op(x) / d lower = 1`` exactly where ``x`` is clamped to ``lower``.
"""

import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, jacrev, vmap

import proxfunc as pf
import proxfunc.compat
from tests.conftest import examples, requires_compile

D = torch.float64
INF = float("inf")
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bounds(shape, seed, scale, infinite=True):
    """``lower <= upper`` of ``shape`` (float64): ties, and some infinite entries on either side."""
    g = _gen(seed)
    lo = scale * torch.randn(shape, generator=g, dtype=D)
    hi = lo + scale * torch.rand(shape, generator=g, dtype=D)
    flat_lo, flat_hi = lo.view(-1), hi.view(-1)
    flat_hi[::7] = flat_lo[::7]  # pinned entries: lower == upper
    if infinite:
        flat_lo[1::5] = -INF
        flat_hi[2::6] = INF
    return lo, hi


def _clip(x, lo, hi):
    """numpy's clip in float64, rounded once to ``x``'s dtype."""
    out = np.asarray(np.clip(x.double().numpy(), lo.double().numpy(), hi.double().numpy()))
    return torch.from_numpy(out).to(x.dtype)


# ----------------------------------------------------------------------------- the numerical oracle
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=examples(25), deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    shape=st.sampled_from([(7,), (3, 5), (2, 3, 4), ()]),
    form=st.sampled_from(["full", "row", "column", "scalar_tensor"]),
)
def test_tensor_bounds_equal_numpy_clip(dtype, seed, scale, shape, form):
    x = (2 * scale * torch.randn(shape, generator=_gen(seed + 1), dtype=D)).to(dtype)
    if shape:
        x.view(-1)[::4] = 0.0
    bshape = {
        "full": shape,
        "row": shape[-1:],
        "column": shape[:-1] + (1,) if shape else (),
        "scalar_tensor": (),
    }[form]
    lo, hi = _bounds(bshape, seed, scale, infinite=bool(bshape))
    op = pf.box(lo, hi)
    out = op(x, 0.3)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, _clip(x, lo.expand(shape), hi.expand(shape)), atol=0, rtol=0)
    # feasible in its own dtype, and idempotent
    assert op.value(out) == 0
    assert torch.equal(op(out, 1.0), out)
    # a point strictly beyond a finite bound is outside
    fin = torch.isfinite(hi.expand(shape))
    if fin.any():
        far = x.clone()
        i = fin.reshape(-1).nonzero()[0, 0]
        far.view(-1)[i] = (hi.expand(shape).reshape(-1)[i] + 4 * scale).to(dtype)
        assert op.value(far) == INF
    # the same bounds as numbers where they are one value
    if form == "scalar_tensor":
        torch.testing.assert_close(out, pf.box(float(lo), float(hi))(x, 0.3), atol=0, rtol=0)


def test_value_is_membership_with_one_rounding_of_the_bounds():
    lo = torch.tensor([-1.0, 0.0, 1e-6, -INF], dtype=D)
    hi = torch.tensor([1.0, 0.0, 3e-6, 1e6], dtype=D)
    op = pf.box(lo, hi)
    inside = torch.tensor([-1.0, 0.0, 2e-6, -1e300], dtype=D)
    assert op.value(inside) == 0
    for i, bad in enumerate([-1.0000001, 1e-300, 3.001e-6, 2e6]):  # each entry just outside its own bounds
        x = inside.clone()
        x[i] = bad
        assert op.value(x) == INF, i
    # the bounds rounded to float32/bfloat16 by the clamp are inside (one rounding of slack)
    for dtype in (torch.float32, torch.bfloat16):
        b = torch.tensor([0.1, 1 / 3, 1e5 / 3], dtype=D)
        z = pf.box(b, 2 * b)(torch.zeros(3, dtype=dtype))
        assert torch.equal(z, b.to(dtype)) and pf.box(b, 2 * b).value(z) == 0
    assert op.value(torch.tensor([0.0, float("nan"), 2e-6, 0.0], dtype=D)) == INF


# ----------------------------------------------------------------------------- pytrees
def test_pytree_bounds_are_one_value_per_leaf():
    g = _gen(3)
    params = {
        "w": 3 * torch.randn(3, 4, generator=g, dtype=D),
        "b": 3 * torch.randn(3, generator=g, dtype=D),
        "none": None,
        "n": torch.tensor(7),  # a buffer: passed through, its bound is not read
        "nested": [3 * torch.randn(2, generator=g, dtype=D), 3 * torch.randn(5, generator=g, dtype=D)],
    }
    lw, hw = _bounds((4,), 1, 1.0)
    lower = {"w": lw, "b": torch.tensor([[-1.0], [0.0], [1.0]], dtype=D)[:, 0], "none": None, "n": None}
    lower["nested"] = [None, -0.5]
    upper = {"w": hw, "b": 2.0, "none": None, "n": None, "nested": [0.25, torch.linspace(-0.5, 1, 5, dtype=D)]}
    op = pf.box(lower, upper)
    out = op(params, 0.5)
    assert out["none"] is None and out["n"] is params["n"]
    torch.testing.assert_close(out["w"], pf.box(lw, hw)(params["w"]), atol=0, rtol=0)
    torch.testing.assert_close(out["b"], pf.box(lower["b"], 2.0)(params["b"]), atol=0, rtol=0)
    torch.testing.assert_close(out["nested"][0], params["nested"][0].clamp(max=0.25), atol=0, rtol=0)
    torch.testing.assert_close(
        out["nested"][1],
        _clip(params["nested"][1], torch.full((5,), -0.5, dtype=D), upper["nested"][1]),
        atol=0,
        rtol=0,
    )
    assert op.value(out) == 0 and op.value(params) == INF
    # one side a pytree, the other a number: the number applies to every leaf
    half = pf.box({"w": -1.0, "b": None, "none": None, "n": None, "nested": [None, None]}, 1.0)
    out2 = half(params)
    torch.testing.assert_close(out2["w"], params["w"].clamp(-1, 1), atol=0, rtol=0)
    torch.testing.assert_close(out2["b"], params["b"].clamp(max=1), atol=0, rtol=0)
    # tuples and lists of leaves, as a layer's (weight, bias)
    wb = (params["w"], params["b"])
    out3 = pf.box((0.0, -1.0), (1.0, torch.tensor(0.5, dtype=D)))(wb)
    assert isinstance(out3, tuple)
    torch.testing.assert_close(out3[0], wb[0].clamp(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(out3[1], wb[1].clamp(-1, 0.5), atol=0, rtol=0)


def test_none_and_infinite_numbers_are_no_bound():
    x = torch.tensor([-3.0, 0.5, 9.0], dtype=D)
    assert torch.equal(pf.box(None, 1.0)(x), x.clamp(max=1))
    assert torch.equal(pf.box(0.0, None)(x), x.clamp(min=0))
    assert pf.box(None, None) == pf.box()
    assert torch.equal(
        pf.box(torch.tensor([-INF, 0.0, -INF], dtype=D), INF)(x), torch.tensor([-3.0, 0.5, 9.0], dtype=D)
    )
    assert torch.equal(pf.box(-INF, torch.tensor([INF, 0.0, 1.0], dtype=D))(x), torch.tensor([-3.0, 0.0, 1.0], dtype=D))


def test_linf_ball_radii_per_entry_and_per_leaf():
    g = _gen(5)
    x = {"w": 4 * torch.randn(3, 4, generator=g, dtype=D), "b": 4 * torch.randn(3, generator=g, dtype=D)}
    r = {"w": torch.rand(4, generator=g, dtype=D) * 2, "b": 0.5}
    out = pf.linf_ball(r)(x, 0.7)
    for k in x:
        rk = torch.as_tensor(r[k], dtype=D)
        torch.testing.assert_close(out[k], pf.box(-rk, rk)(x[k]), atol=0, rtol=0)
    assert pf.linf_ball(r).value(out) == 0 and pf.linf_ball(r).value(x) == INF
    # the conjugate of the weighted l1 norm is the indicator of this ball (Moreau's identity)
    w = torch.rand(3, 4, generator=g, dtype=D) * 2
    xw = x["w"]
    conj = pf.conjugate(pf.l1(w))
    torch.testing.assert_close(conj(xw, 1.0), pf.linf_ball(w)(xw), atol=0, rtol=0)
    torch.testing.assert_close(conj(xw, 1.0) + pf.l1(w)(xw, 1.0), xw, atol=1e-15, rtol=0)
    # and its support function is the weighted l1 norm
    y = torch.randn(3, 4, generator=g, dtype=D)
    torch.testing.assert_close(pf.conjugate(pf.linf_ball(w)).value(y), pf.l1(w).value(y))
    lo, hi = _bounds((4,), 8, 1.0, infinite=False)
    support = torch.maximum(lo * y, hi * y).sum()
    torch.testing.assert_close(pf.conjugate(pf.box(lo, hi)).value(y), support)
    with pytest.raises(ValueError, match="linf_ball: radius must be >= 0"):
        pf.linf_ball(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="linf_ball: radius must be >= 0"):
        pf.linf_ball({"w": 1.0, "b": -0.5})


def test_box_hyperplane_takes_pytree_bounds_like_box():
    # the pytree form equals the flattened form (one bound per entry of all leaves, in leaf order)
    g = _gen(12)
    x = {"w": torch.randn(3, 4, generator=g, dtype=D), "b": torch.randn(3, generator=g, dtype=D)}
    lo_w = -0.1 * torch.rand(4, generator=g, dtype=D)
    lower = {"w": lo_w, "b": -1.0}
    upper = {"w": 0.4, "b": torch.tensor([0.0, 0.5, 1.0], dtype=D)}
    flat_lo = torch.cat([lo_w.expand(3, 4).reshape(-1), torch.full((3,), -1.0, dtype=D)])
    flat_hi = torch.cat([torch.full((12,), 0.4, dtype=D), upper["b"]])
    v = torch.cat([x["w"].reshape(-1), x["b"]])
    op = pf.box_hyperplane(lower, upper, 1.5)
    out = op(x)
    ref = pf.box_hyperplane(flat_lo, flat_hi, 1.5)(v)
    torch.testing.assert_close(torch.cat([out["w"].reshape(-1), out["b"]]), ref, atol=1e-14, rtol=0)
    assert op.value(out) == 0 and float(out["w"].sum() + out["b"].sum()) == pytest.approx(1.5, abs=1e-13)
    assert (out["w"] >= lo_w).all() and (out["b"] <= upper["b"]).all()
    # its conjugate (the support function) reads the same bounds
    torch.testing.assert_close(
        pf.conjugate(op).value(x), pf.conjugate(pf.box_hyperplane(flat_lo, flat_hi, 1.5)).value(v)
    )
    with pytest.raises(ValueError, match=r"box_hyperplane: lower must be <= upper, got lower\['w'\]=1.0"):
        pf.box_hyperplane({"w": 1.0, "b": 0.0}, {"w": 0.5, "b": 1.0})
    with pytest.raises(ValueError, match="box_hyperplane: lower must be finite"):
        pf.box_hyperplane({"w": -INF, "b": 0.0}, 1.0)
    with pytest.raises(ValueError, match="box_hyperplane: upper must be .*structure of params"):
        pf.box_hyperplane(0.0, {"w": 1.0}, 0.5)(x)


# ----------------------------------------------------------------------------- errors
def test_bad_bounds_raise_naming_them_and_change_nothing():
    x = torch.tensor([[-3.0, 0.5, 9.0], [2.0, -0.1, 4.0]], dtype=D)
    x0 = x.clone()
    with pytest.raises(
        ValueError, match=r"box: lower must be <= upper entrywise, got lower=2.0 > upper=1.0 at index \(1,\)"
    ):
        pf.box(torch.tensor([0.0, 2.0, 0.0]), 1.0)
    with pytest.raises(ValueError, match=r"lower\['b'\]=1.0 > upper\['b'\]=0.0"):
        pf.box({"w": 0.0, "b": 1.0}, {"w": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match=r"lower\['b'\]=0.5 > upper\['b'\]=0.0 at index \(1, 0\)"):
        pf.box({"w": -1.0, "b": torch.tensor([[0.0], [0.5]])}, torch.tensor(0.0))
    with pytest.raises(ValueError, match="box: lower must be <= upper"):
        pf.box(torch.tensor([0.0, 2.0], dtype=torch.float32), torch.tensor([1.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match="box: lower must not be NaN"):
        pf.box(torch.tensor([0.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="box: upper must not be NaN"):
        pf.box(0.0, {"w": float("nan"), "b": 1.0})
    with pytest.raises(ValueError, match=r"box: lower of shape \(3,\) and upper of shape \(4,\) do not broadcast"):
        pf.box(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="box: lower and upper must have the same structure"):
        pf.box({"w": 0.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="box: upper is an empty pytree"):
        pf.box(0.0, {})
    with pytest.raises(TypeError, match="box: lower"):
        pf.box({"w": "0"}, 1.0)
    with pytest.raises(TypeError, match="box: upper"):
        pf.box(0.0, torch.tensor([1, 2]))
    # at the call: a bound must broadcast to its leaf (not the leaf to the bound), and a pytree
    # bound must have the structure of params
    with pytest.raises(ValueError, match=r"box: lower of shape \(2, 1, 3\) does not broadcast to the leaf"):
        pf.box(torch.zeros(2, 1, 3, dtype=D))(x)
    with pytest.raises(ValueError, match=r"box: upper of shape \(3,\) does not broadcast to the leaf \['b'\]"):
        pf.box(None, torch.ones(3, dtype=D))({"w": x, "b": x[0, :2]})
    with pytest.raises(ValueError, match=r"box: lower must be .*structure of params; lower has the leaves \['w'\]"):
        pf.box({"w": 0.0}, 1.0)({"w": x, "b": x})
    with pytest.raises(ValueError, match="box: upper must be .*structure of params"):
        pf.box(0.0, {"w": 1.0, "b": 2.0}).value(x)
    assert torch.equal(x, x0)


# ----------------------------------------------------------------------------- derivatives
def test_gradients_with_respect_to_the_bounds():
    g = _gen(11)
    x = 3 * torch.randn(4, 5, generator=g, dtype=D)
    lo0 = -torch.rand(5, generator=g, dtype=D) - 0.2
    hi0 = torch.rand(4, 1, generator=g, dtype=D) + 0.2
    # no entry of x within 1e-3 of a bound: finite differences see one piece of the clamp
    gap = torch.minimum((x - lo0).abs(), (x - hi0).abs())
    x = torch.where(gap < 1e-3, x + 0.01, x)
    lo, hi = lo0.clone().requires_grad_(), hi0.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: pf.box(a, b)(x), (lo, hi))
    # closed form: d z_ij / d lower_j = 1 where x_ij < lower_j (summed over the rows), else 0
    J = jacrev(lambda a: pf.box(a, hi0)(x))(lo0)
    at_lo = (x < lo0).to(D)
    expected = torch.zeros(4, 5, 5, dtype=D)
    for j in range(5):
        expected[:, j, j] = at_lo[:, j]
    assert at_lo.any() and torch.equal(J, expected)
    Jh = jacrev(lambda b: pf.box(lo0, b)(x))(hi0)
    assert torch.equal(Jh.sum((0, 1)).reshape(-1), (x > hi0).to(D).sum(1))
    # a loss of the projection of a pytree, with respect to pytree bounds, through torch.func.grad
    params = {"w": x, "b": x[0]}
    bounds = {"w": lo0, "b": torch.full((5,), -0.1, dtype=D)}

    def loss(bd):
        z = pf.box(bd, {"w": hi0, "b": None})(params)
        return (z["w"] ** 2).sum() + z["b"].sum()

    gb = grad(loss)(bounds)
    torch.testing.assert_close(gb["w"], (2 * lo0 * at_lo).sum(0))
    torch.testing.assert_close(gb["b"], (x[0] < -0.1).to(D))
    r = torch.rand(5, generator=g, dtype=D) + 0.5
    x = torch.where((x.abs() - r).abs() < 1e-3, x + 0.01, x)
    assert torch.autograd.gradcheck(lambda r_: pf.linf_ball(r_)(x), (r.requires_grad_(),))


def test_vmap_over_points_and_over_bounds():
    g = _gen(2)
    x = 2 * torch.randn(6, 5, generator=g, dtype=D)
    lo, hi = _bounds((5,), 4, 1.0)
    op = pf.box(lo, hi)
    torch.testing.assert_close(vmap(lambda r: op(r))(x), op(x), atol=0, rtol=0)
    los = torch.stack([lo, lo - 1, torch.full_like(lo, -INF)])
    outs = vmap(lambda a: pf.box(a, hi)(x[0]))(los)
    for i in range(3):
        torch.testing.assert_close(outs[i], pf.box(los[i], hi)(x[0]), atol=0, rtol=0)
    vals = vmap(lambda a: pf.box(a, hi).value(x[0]))(los)
    assert [float(v) for v in vals] == [float(pf.box(los[i], hi).value(x[0])) for i in range(3)]


def test_functional_call_with_bounded_weights():
    # the model's forward sees its parameters projected onto per-neuron boxes; the gradient of
    # the loss reaches both the free parameters and the bounds
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    lower = {"weight": torch.tensor([[-0.1], [-0.2], [-0.3]], dtype=D), "bias": None}
    upper = {"weight": 0.1, "bias": torch.tensor([0.0, 0.1, 0.2], dtype=D)}
    xb = torch.randn(8, 4, dtype=D)

    def loss(p, lo_w):
        q = pf.box({"weight": lo_w, "bias": None}, upper)(p)
        return functional_call(model, q, (xb,)).square().mean()

    gp, gl = grad(loss, argnums=(0, 1))(params, lower["weight"])
    p_ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    lo_ref = lower["weight"].clone().requires_grad_()
    z = pf.box({"weight": lo_ref, "bias": None}, upper)(p_ref)
    ref = torch.autograd.grad(
        torch.nn.functional.linear(xb, z["weight"], z["bias"]).square().mean(), [*p_ref.values(), lo_ref]
    )
    torch.testing.assert_close(gp["weight"], ref[0])
    torch.testing.assert_close(gp["bias"], ref[1])
    torch.testing.assert_close(gl, ref[2])
    assert gl.abs().sum() > 0


# ----------------------------------------------------------------------------- in place, values
def test_in_place_layer_and_partition_take_tensor_bounds():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    lower = {k: (-0.1 * torch.rand(v.shape[-1:], dtype=D)) for k, v in before.items()}
    op = pf.box(lower, 0.05)
    pf.compat.apply_(op, model, 0.1)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), pf.box(lower[k], 0.05)(before[k]), atol=0, rtol=0)
    # a tensor bound shared by every tensor of a pattern rule (one batch call)
    col = torch.tensor([-0.01, 0.0, 0.01], dtype=D)
    x = {"a.weight": torch.randn(2, 3, dtype=D), "b.weight": torch.randn(5, 3, dtype=D), "c": torch.randn(3, dtype=D)}
    out = pf.partition({"*.weight": pf.box(col, 1.0)})(x)
    for k in ("a.weight", "b.weight"):
        torch.testing.assert_close(out[k], pf.box(col, 1.0)(x[k]), atol=0, rtol=0)
    assert out["c"] is x["c"]


def test_equality_hash_repr_and_serialisation():
    lo = {"w": torch.tensor([0.0, -1.0]), "b": None}
    op = pf.box(lo, {"w": 2.0, "b": torch.tensor(1.0)})
    same = pf.box({"w": torch.tensor([0.0, -1.0]), "b": None}, {"w": 2.0, "b": torch.tensor(1.0)})
    assert op == same and hash(op) == hash(same)
    assert op != pf.box({"w": torch.tensor([0.0, -2.0]), "b": None}, {"w": 2.0, "b": torch.tensor(1.0)})
    assert repr(op) == "box(lower={'w': tensor(shape=(2,)), 'b': None}, upper={'w': 2, 'b': tensor(1)})"
    assert pickle.loads(pickle.dumps(op)) == op and copy.deepcopy(op) == op
    assert pf.Prox.from_state(op.to_state()) == op
    assert pf.Prox.from_state(pf.linf_ball([torch.ones(3), 0.5]).to_state()) == pf.linf_ball([torch.ones(3), 0.5])


@requires_compile
def test_tensor_and_pytree_bounds_trace_with_fullgraph():
    x = {"w": torch.randn(3, 4, dtype=D), "b": torch.randn(4, dtype=D)}
    lo = {"w": -torch.rand(4, dtype=D), "b": None}
    hi = torch.rand(4, dtype=D)
    r = {"w": torch.rand(3, 1, dtype=D), "b": 0.5}

    def f(p, lo, hi, r):
        box = pf.box(lo, hi)
        return box(p), box.value(p), pf.linf_ball(r)(p)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, ref = cf(x, lo, hi, r), f(x, lo, hi, r)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # and the gradient with respect to the bounds through the compiled graph
    lo_w = lo["w"].clone().requires_grad_()
    cf({"w": x["w"], "b": x["b"]}, {"w": lo_w, "b": None}, hi, r)[0]["w"].sum().backward()
    torch.testing.assert_close(lo_w.grad, (x["w"] < lo["w"]).to(D).sum(0))
