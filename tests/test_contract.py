"""The operator contract, for every operator: purity, structure, dtypes, None leaves,
repr/eq/hash/pickle, and bad input raising ValueError/TypeError that names the argument."""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
from tests.cases import CASES, named
from tests.conftest import examples
from tests.helpers import pytree

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# -------------------------------------------------------------------- purity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_pure_and_structure_preserved(case, dtype):
    op = case.make_op()
    params = case.make_params(dtype)
    leaves, spec = pytree.tree_flatten(params)
    before = [x.clone() for x in leaves]
    versions = [x._version for x in leaves]
    for step in (0.3, torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float32)):
        out = op(params, step)
        out_leaves, out_spec = pytree.tree_flatten(out)
        assert out_spec == spec
        assert type(out) is type(params)
        for a, b, c, v in zip(leaves, out_leaves, before, versions):
            assert torch.equal(a, c) and a.dtype == c.dtype  # bit for bit (no NaN inputs here)
            assert a._version == v  # never written to, not even with the same value
            assert b.shape == a.shape and b.dtype == a.dtype and b.device == a.device
            assert bool(torch.isfinite(b.float()).all())
    value = op.value(params)
    assert value.dim() == 0
    assert all(torch.equal(a, c) for a, c in zip(leaves, before))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_requires_grad_inputs_and_noncontiguous_views(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    views = pytree.tree_map(lambda x: x.t().clone().t() if x.dim() == 2 else x, params)  # transposed storage
    grads = pytree.tree_map(lambda x: x.clone().requires_grad_(True), params)
    ref = op(params, 0.5)
    for p in (views, grads):
        out = op(p, 0.5)
        for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
            assert torch.allclose(a.detach(), b, atol=1e-14, rtol=0)
            assert a.shape == b.shape


def test_mixed_dtypes_per_leaf_preserved():
    W = torch.randn(4, 3, dtype=torch.float32)
    b = torch.randn(4, dtype=torch.float64)
    h = torch.randn(3, 4).to(torch.bfloat16)
    for op in (pf.l21(0.3, group_dim=(0, 0, 1)), pf.linf1(0.3, group_dim=(0, 0, 1)), pf.l2(0.3), pf.linf(0.3)):
        out = op((W, b, h), 0.5)
        assert [o.dtype for o in out] == [torch.float32, torch.float64, torch.bfloat16]
        ref = op((W.double(), b, h.double()), 0.5)
        for o, r in zip(out, ref):
            assert torch.allclose(o.double(), r, atol=2e-2 * float(r.abs().max()) + 1e-6, rtol=0)


def test_meta_tensors_keep_shape_dtype_device():
    for case in CASES:
        op = case.make_op()
        params = pytree.tree_map(lambda x: torch.empty_like(x, device="meta"), case.make_params(torch.float32))
        out = op(params, 0.5)
        for a, b in zip(pytree.tree_leaves(params), pytree.tree_leaves(out)):
            assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype, case


# ------------------------------------------------------------------ None leaves

NONE_OPS = [
    pf.l1(0.3),
    pf.l2(0.3),
    pf.linf(0.3),
    pf.elastic_net(0.3),
    pf.log_barrier(0.3),
    pf.l21(0.3),
    pf.linf1(0.3),
    pf.box(-0.2, 0.3),
    pf.nonneg(),
    pf.simplex(1.0),
    pf.l1_ball(1.0),
    pf.l2_ball(1.0),
    pf.linf_ball(0.2),
    pf.identity(),
    pf.chain(pf.l1(0.1), pf.l21(0.2)),
]


@pytest.mark.parametrize("op", NONE_OPS, ids=repr)
def test_none_leaves_pass_through(op):
    W = torch.randn(5, 3, dtype=torch.float64)
    out = op((W, None), 0.5)
    assert isinstance(out, tuple) and out[1] is None
    assert torch.equal(out[0], op((W,), 0.5)[0])
    d = op({"weight": W, "bias": None}, 0.5)
    assert d["bias"] is None and torch.equal(d["weight"], out[0])
    assert torch.equal(op.value((W, None)), op.value((W,)))


def test_none_leaf_with_pytree_group_dim():
    W1, W2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    op = pf.linf1(0.3, group_dim={"w1": 0, "b1": 0, "w2": 1})
    out = op({"w1": W1, "b1": None, "w2": W2}, 0.5)
    ref = pf.linf1(0.3, group_dim={"w1": 0, "w2": 1})({"w1": W1, "w2": W2}, 0.5)
    assert out["b1"] is None and torch.equal(out["w1"], ref["w1"]) and torch.equal(out["w2"], ref["w2"])


# ------------------------------------------------------- repr / eq / hash / pickle


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_repr_eq_hash_pickle(case):
    op = case.make_op()
    other = case.make_op()
    # equal hyperparameters make equal operators, tensors compared by value (their copies too)
    assert op == op and hash(op) == hash(op)
    assert op == other and hash(op) == hash(other)
    r = repr(op)
    assert r == repr(other)
    assert r.startswith(type(op).__name__ if not hasattr(op, "_public_name") else op._public_name)
    back = pickle.loads(pickle.dumps(op))
    assert repr(back) == r and type(back) is type(op)
    assert back == op and hash(back) == hash(op)
    params = case.make_params(torch.float64)
    for a, b in zip(pytree.tree_leaves(back(params, 0.5)), pytree.tree_leaves(op(params, 0.5))):
        assert torch.equal(a, b)
    assert len({op, other, back}) == 1
    with pytest.raises(AttributeError):
        op.reg = 5.0


def test_equality_distinguishes_hyperparameters():
    assert pf.l1(0.1) != pf.l1(0.2)
    assert pf.l1(0.1) != pf.l2(0.1)
    assert pf.l21(0.1) != pf.l21(0.1, group_dim=1)
    assert pf.l21(0.1, group_dim={"a": 0}) == pf.l21(0.1, group_dim={"a": 0})
    assert pf.elastic_net(0.1, gamma=2.0) != pf.elastic_net(0.1)
    assert pf.chain(pf.l1(0.1), pf.nonneg()) != pf.chain(pf.nonneg(), pf.l1(0.1))
    t = torch.tensor(0.1)
    assert pf.l1(t) == pf.l1(t) and pf.l1(t) == pf.l1(torch.tensor(0.1))  # tensors by value
    assert pf.l1(t) != pf.l1(torch.tensor(0.2)) and pf.l1(t) != pf.l1(0.1)
    assert repr(pf.l1(0.25)) == "l1(reg=0.25)"
    assert repr(pf.l1(torch.tensor(0.25))) == "l1(reg=tensor(0.25))"
    assert "linf1" in repr(pf.partition({("a", "b"): pf.linf1(0.1)}))


# ------------------------------------------------------------------ bad input

BAD_STEPS = [
    (0.0, ValueError),
    (-1.0, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (torch.tensor([0.1, 0.2]), ValueError),
    (torch.tensor(-0.1), ValueError),
    (torch.tensor(float("nan")), ValueError),
    (torch.tensor(1), TypeError),
    ("0.1", TypeError),
    (True, TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize("step,exc", BAD_STEPS, ids=repr)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bad_step_raises_naming_step(case, step, exc):
    op = case.make_op()
    params = case.make_params(torch.float64)
    with pytest.raises(exc, match="step"):
        op(params, step)


CTORS = {
    "l1": (lambda **k: pf.l1(**k), ["reg"]),
    "l2": (lambda **k: pf.l2(**k), ["reg"]),
    "linf": (lambda **k: pf.linf(**k), ["reg"]),
    "elastic_net": (lambda **k: pf.elastic_net(**k), ["reg", "gamma"]),
    "log_barrier": (lambda **k: pf.log_barrier(**k), ["reg"]),
    "l21": (lambda **k: pf.l21(**k), ["reg"]),
    "linf1": (lambda **k: pf.linf1(**k), ["reg"]),
    "simplex": (lambda **k: pf.simplex(**k), ["radius"]),
    "l1_ball": (lambda **k: pf.l1_ball(**k), ["radius"]),
    "l2_ball": (lambda **k: pf.l2_ball(**k), ["radius"]),
    "linf_ball": (lambda **k: pf.linf_ball(**k), ["radius"]),
}
#: Operators whose hyperparameters may be a vector of weights (tests/test_weighted.py).
WEIGHTED = {"l1", "elastic_net", "l21", "linf1", "linf_ball"}
BAD_HYPER = [
    (-0.1, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (torch.tensor(-0.1), ValueError),
    (torch.tensor(float("nan")), ValueError),
    (torch.tensor([0.1, 0.2]), ValueError),
    (torch.tensor(1), TypeError),
    (True, TypeError),
    ("0.1", TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize("value,exc", BAD_HYPER, ids=repr)
@pytest.mark.parametrize("name", list(CTORS))
def test_bad_hyperparameter_raises_naming_it(name, value, exc):
    make, args = CTORS[name]
    if name in WEIGHTED and isinstance(value, torch.Tensor) and value.dim() == 1:
        for arg in args:  # weights per entry (l1, elastic_net) or per group (l21, linf1) are valid
            make(**{arg: value})
        value = torch.tensor([0.1, -0.2])  # but not a negative one
    for arg in args:
        with pytest.raises(exc, match=rf"{name}.*{arg}"):
            make(**{arg: value})


@pytest.mark.parametrize("name", ["log_barrier", "simplex"])
def test_zero_hyperparameter_refused_where_it_must_be_positive(name):
    make, args = CTORS[name]
    with pytest.raises(ValueError, match=args[0]):
        make(**{args[0]: 0.0})


def test_box_bad_bounds():
    with pytest.raises(ValueError, match="lower"):
        pf.box(1.0, 0.0)
    with pytest.raises(ValueError, match="lower"):
        pf.box(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="lower"):
        pf.box(float("nan"), 1.0)
    with pytest.raises(ValueError, match="upper"):
        pf.box(0.0, float("nan"))
    with pytest.raises(TypeError, match="upper"):
        pf.box(0.0, True)
    with pytest.raises(TypeError, match="lower"):
        pf.box("0", 1.0)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_floating_params_raise_type_error_naming_params(case, dtype):
    op = case.make_op()
    params = pytree.tree_map(lambda x: (x * 10).to(dtype), case.make_params(torch.float64))
    before = [x.clone() for x in pytree.tree_leaves(params)]
    with pytest.raises(TypeError, match="params"):
        op(params, 0.5)
    with pytest.raises(TypeError, match="params"):
        op.value(params)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(params), before))


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "partition"], ids=repr)
def test_non_tensor_leaf_raises(case):
    op = case.make_op()
    with pytest.raises(TypeError, match="params"):
        op((torch.zeros(3), [1.0, 2.0]), 0.5)
    with pytest.raises(TypeError, match="params"):
        op("abc", 0.5)


@pytest.mark.parametrize("make", [pf.l21, pf.linf1], ids=["l21", "linf1"])
def test_mismatched_groups_name_leaves_and_sizes(make):
    W, b = torch.randn(3, 2), torch.randn(4)
    with pytest.raises(ValueError, match=r"params\[0\].*3.*params\[1\].*4"):
        make(0.1)((W, b), 0.5)
    with pytest.raises(ValueError, match=r"w2"):
        make(0.1, group_dim={"w1": 0, "w2": 1})({"w1": torch.randn(3, 2), "w2": torch.randn(3, 4)}, 0.5)
    with pytest.raises(ValueError, match=r"params"):
        make(0.1).value((W, b))


@pytest.mark.parametrize("make", [pf.l21, pf.linf1], ids=["l21", "linf1"])
def test_bad_group_dim(make):
    W, b = torch.randn(3, 2), torch.randn(3)
    with pytest.raises(ValueError, match="group_dim"):
        make(0.1, group_dim=(0, 0, 1))((W, b), 0.5)  # wrong structure
    with pytest.raises(ValueError, match="group_dim"):
        make(0.1, group_dim={"a": 0})((W, b), 0.5)
    with pytest.raises(ValueError, match="group_dim"):
        make(0.1, group_dim=2)((W, b), 0.5)  # out of range for b
    with pytest.raises(ValueError, match="group_dim"):
        make(0.1, group_dim=-3)((W, b), 0.5)
    with pytest.raises(TypeError, match="group_dim"):
        make(0.1, group_dim=1.5)
    with pytest.raises(TypeError, match="group_dim"):
        make(0.1, group_dim=True)
    with pytest.raises(TypeError, match="group_dim"):
        make(0.1, group_dim=(0, "x"))
    with pytest.raises(ValueError, match="group_dim"):
        make(0.1)(torch.tensor(1.0), 0.5)  # a 0-d leaf has no dim 0


def test_partition_bad_names_and_rules():
    p = named()
    before = {k: v.clone() for k, v in p.items()}
    with pytest.raises(ValueError, match="nope"):
        pf.partition({"nope": pf.l1(0.1)})(p, 0.5)
    with pytest.raises(ValueError, match="linear9.weight"):
        pf.partition({("linear1.weight", "linear9.weight"): pf.l21(0.1)})(p, 0.5)
    with pytest.raises(ValueError, match=r"linear1\.weight.*two rules"):
        pf.partition({"linear1.*": pf.l1(0.1), ("linear1.weight", "linear2.weight"): pf.l21(0.1)})(p, 0.5)
    with pytest.raises(ValueError, match=r"matches 2 names"):
        pf.partition({("linear*.bias",): pf.l2(0.1)})(p, 0.5)
    with pytest.raises(ValueError, match="nope"):
        pf.partition({"nope": pf.l1(0.1)}).value(p)
    with pytest.raises(TypeError, match="operator"):
        pf.partition({"linear1.weight": 0.1})
    with pytest.raises(TypeError, match="key"):
        pf.partition({3: pf.l1(0.1)})
    with pytest.raises(TypeError, match="key"):
        pf.partition({(): pf.l1(0.1)})
    with pytest.raises(TypeError, match="mapping"):
        pf.partition({"a": pf.l1(0.1)})([torch.zeros(2)], 0.5)
    with pytest.raises(TypeError, match="strict"):
        pf.partition({"a": pf.l1(0.1)}, strict="yes")
    with pytest.raises(TypeError, match="ops"):
        pf.chain(pf.l1(0.1), "l2")
    assert all(torch.equal(p[k], before[k]) for k in p)
    # strict=False: an unmatched rule is simply unused
    out = pf.partition({"nope": pf.l1(0.1)}, strict=False)(p, 0.5)
    assert all(out[k] is p[k] for k in p)


@settings(max_examples=examples(25))
@given(step=st.floats(allow_nan=True, allow_infinity=True), reg=st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_step_and_reg_either_works_or_raises_cleanly(step, reg):
    """Never a silent NaN: a float step/reg is accepted (finite, valid) or refused by name."""
    x = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=torch.float64)
    try:
        op = pf.linf1(reg)
    except ValueError as e:
        assert "reg" in str(e) and not (math.isfinite(reg) and reg >= 0)
        return
    try:
        out = op((x, x[:, 0]), step)
    except ValueError as e:
        assert "step" in str(e) and not (math.isfinite(step) and step > 0)
        return
    assert all(bool(torch.isfinite(o).all()) for o in out) or not math.isfinite(reg * step)
    assert re.match(r"linf1\(reg=", repr(op))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_cuda_keeps_device_and_matches_cpu(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    gpu = pytree.tree_map(lambda x: x.cuda(), params)
    out = op(gpu, 0.5)
    for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(op(params, 0.5))):
        assert a.device.type == "cuda"
        assert torch.allclose(a.cpu(), b, atol=1e-12, rtol=0)
    assert op.value(gpu).device.type == "cuda"
