"""Combinators: identity, chain and partition are proxes of the sums they claim to be.

* identity: the prox of 0 (the same tensors come back);
* chain: exact for the documented pairs -- the sparse group lasso ``chain(l1, l21)`` against
  an SLSQP solution of the summed objective, ``chain(l1, nonneg)`` and
  ``chain(elastic_net, box)`` against entrywise brute force; ``value`` is the sum;
* partition: a separable sum over named tensors -- every block equals its own independent
  oracle, joint tuple groups span several tensors, unmatched names pass through as the same
  tensors, the mapping type is kept, it is non-expansive, and ``value`` is the sum.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
from tests import oracles as O
from tests.conftest import examples

MODES = st.sampled_from(O.MODES)


def _np(t):
    return t.detach().double().numpy()


# ------------------------------------------------------------------ identity


def test_identity_is_the_prox_of_zero():
    x = {"a": torch.randn(3, 2), "b": None, "c": torch.randn(0)}
    out = pf.identity()(x, 0.7)
    assert out["a"] is x["a"] and out["b"] is None and out["c"] is x["c"]
    assert pf.identity().value(x) == 0
    assert pf.identity() == pf.identity() and hash(pf.identity()) == hash(pf.identity())


# ------------------------------------------------------------------ chain


@settings(max_examples=examples(10))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_chain_l1_l21_is_the_sparse_group_lasso_prox(seed, mode):
    rng = np.random.default_rng(seed)
    G, m = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    X = O.make_array(rng, (G, m), 1.0, mode)
    r1, r2, t = float(rng.uniform(0, 1)), float(rng.uniform(0, 1.5)), float(rng.uniform(0.3, 2))
    op = pf.chain(pf.l1(r1), pf.l21(r2))
    Z = _np(op(torch.from_numpy(X), t))
    N = O.num_sparse_group(X, r1, r2, t)
    assert np.abs(Z - N).max() <= 1e-6 * max(np.abs(X).max(), 1.0)

    def F(A):
        return O.obj_l1(A, r1) + O.obj_l21(A, r2) + ((A - X) ** 2).sum() / (2 * t)

    assert F(Z) <= F(N) + 1e-12
    for _ in range(10):
        assert F(Z + rng.standard_normal(Z.shape) * 10.0 ** rng.uniform(-7, -1)) >= F(Z) - 1e-13
    v = op.value(torch.from_numpy(X))
    assert abs(float(v) - (O.obj_l1(X, r1) + O.obj_l21(X, r2))) <= 1e-12 * (1 + abs(float(v)))


@settings(max_examples=examples(15))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_chain_of_separable_terms_matches_entrywise_brute_force(seed, mode):
    rng = np.random.default_rng(seed)
    x = O.make_array(rng, (int(rng.integers(1, 7)),), 1.0, mode)
    t = float(rng.uniform(0.3, 2))
    r = float(rng.uniform(0, 1))
    out = _np(pf.chain(pf.l1(r), pf.nonneg())(torch.from_numpy(x), t))
    ref = O.num_scalar(lambda z: r * abs(z), x, t, lo=0.0)
    assert np.abs(out - ref).max() <= 1e-7
    g, lo, hi = float(rng.uniform(0, 2)), float(-rng.uniform(0, 1)), float(rng.uniform(0, 1))
    out = _np(pf.chain(pf.elastic_net(r, gamma=g), pf.box(lo, hi))(torch.from_numpy(x), t))
    ref = O.num_scalar(lambda z: r * (abs(z) + g / 2 * z * z), x, t, lo=lo, hi=hi)
    assert np.abs(out - ref).max() <= 1e-7


def test_chain_value_is_the_sum_and_empty_chain_is_identity():
    x = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    ops = (pf.l1(0.2), pf.l21(0.3), pf.linf1(0.1))
    assert torch.allclose(pf.chain(*ops).value(x), sum(op.value(x) for op in ops), rtol=1e-15, atol=0)
    out = x
    for op in ops:
        out = op(out, 0.4)
    assert all(torch.equal(a, b) for a, b in zip(pf.chain(*ops)(x, 0.4), out))
    e = pf.chain()
    assert all(a is b for a, b in zip(e(x, 0.4), x)) and e.value(x) == 0
    assert pf.chain(pf.l2_ball(1.0), pf.nonneg()).value(torch.tensor([3.0, -1.0])) == float("inf")


# ------------------------------------------------------------------ partition


def _model_params(rng, scale=1.0, mode="normal"):
    H, D, Od = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
    return OrderedDict(
        [
            ("linear1.weight", torch.from_numpy(O.make_array(rng, (H, D), scale, mode))),
            ("linear1.bias", torch.from_numpy(O.make_array(rng, (H,), scale, mode))),
            ("linear2.weight", torch.from_numpy(O.make_array(rng, (Od, H), scale, mode))),
            ("linear2.bias", torch.from_numpy(O.make_array(rng, (Od,), scale, mode))),
            ("norm.weight", torch.from_numpy(O.make_array(rng, (Od,), scale, mode))),
        ]
    )


NEURON = ("linear1.weight", "linear1.bias", "linear2.weight")


@settings(max_examples=examples(12))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_partition_blocks_each_equal_their_oracle(seed, mode):
    rng = np.random.default_rng(seed)
    p = _model_params(rng, 1.0, mode)
    r1, r2, t = float(rng.uniform(0, 1)), float(rng.uniform(0, 1)), float(rng.uniform(0.3, 2))
    op = pf.partition(
        {
            NEURON: pf.l21(r1, group_dim=(0, 0, 1)),  # whole neurons (W1[i,:], b1[i], W2[:, i])
            "linear2.bias": pf.l1(r2),
            "norm.*": pf.box(-0.5, 0.5),
        }
    )
    out = op(p, t)
    assert type(out) is OrderedDict and list(out) == list(p)
    leaves = [_np(p[k]) for k in NEURON]
    M = O.group_matrix(leaves, [0, 0, 1])
    Z = O.group_matrix([_np(out[k]) for k in NEURON], [0, 0, 1])
    assert np.abs(Z - O.num_group_l2(M, r1, t)).max() <= 1e-6 * max(np.abs(M).max(), 1.0)
    b = _np(p["linear2.bias"])
    assert np.abs(_np(out["linear2.bias"]) - O.num_l1(b, r2, t)).max() <= 1e-7
    assert np.array_equal(_np(out["norm.weight"]), np.clip(_np(p["norm.weight"]), -0.5, 0.5))
    v = op.value(p)
    want = O.obj_l21(M, r1) + O.obj_l1(b, r2) + (0.0 if np.abs(_np(p["norm.weight"])).max() <= 0.5 else np.inf)
    assert (v == want) if np.isinf(want) else abs(float(v) - want) <= 1e-12 * (1 + want)


def test_partition_tuple_rule_equals_the_operator_on_the_tuple_and_passes_the_rest_through():
    rng = np.random.default_rng(1)
    p = dict(_model_params(rng))
    op = pf.partition({("linear1.weight", "linear1.bias"): pf.linf1(0.3)})
    out = op(p, 0.5)
    W, b = pf.linf1(0.3)((p["linear1.weight"], p["linear1.bias"]), 0.5)
    assert torch.equal(out["linear1.weight"], W) and torch.equal(out["linear1.bias"], b)
    for k in ("linear2.weight", "linear2.bias", "norm.weight"):
        assert out[k] is p[k]
    assert type(out) is dict
    # glob patterns: '*' crosses dots; each match gets the operator on its own
    out = pf.partition({"*.weight": pf.l2(0.2)})(p, 0.5)
    for k in ("linear1.weight", "linear2.weight", "norm.weight"):
        assert torch.equal(out[k], pf.l2(0.2)(p[k], 0.5))
    assert out["linear1.bias"] is p["linear1.bias"]
    # tuple entries may be patterns that match exactly one name
    out2 = pf.partition({("linear1.w*", "linear1.b*"): pf.linf1(0.3)})(p, 0.5)
    assert torch.equal(out2["linear1.weight"], W)


@settings(max_examples=examples(25))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES, log_scale=st.sampled_from([-6, 0, 6]))
def test_partition_is_non_expansive_and_pure(seed, mode, log_scale):
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    p = _model_params(rng, scale, mode)
    q = OrderedDict((k, v + torch.from_numpy(rng.standard_normal(tuple(v.shape))) * scale * 0.1) for k, v in p.items())
    before = {k: v.clone() for k, v in p.items()}
    op = pf.partition(
        {NEURON: pf.linf1(scale * 0.5, group_dim=(0, 0, 1)), "linear2.bias": pf.l2(scale), "norm.weight": pf.simplex()}
    )
    a, b = op(p, 0.7), op(q, 0.7)

    def flat(d):
        return torch.cat([v.reshape(-1) for v in d.values()])

    xs = flat(p).abs().max().item()
    assert (flat(a) - flat(b)).norm() <= (flat(p) - flat(q)).norm() * (1 + 1e-12) + 1e-15 * xs * 10
    assert all(torch.equal(p[k], before[k]) for k in p)


def test_partition_under_torch_func_grad_and_value_sum():
    rng = np.random.default_rng(2)
    p = dict(_model_params(rng))
    p["linear1.weight"][0] = 0.0  # a dead neuron
    p["linear1.bias"][0] = 0.0
    p["linear2.weight"][:, 0] = 0.0
    op = pf.partition({NEURON: pf.l21(0.3, group_dim=(0, 0, 1)), "linear2.bias": pf.l1(0.1)})

    def loss(q):
        out = op(q, 0.5)
        return sum((v * v).sum() for v in out.values()) + op.value(q)

    g = torch.func.grad(loss)(p)
    assert set(g) == set(p) and all(bool(torch.isfinite(v).all()) for v in g.values())
    v = op.value(p)
    ref = pf.l21(0.3, group_dim=(0, 0, 1)).value(tuple(p[k] for k in NEURON)) + pf.l1(0.1).value(p["linear2.bias"])
    assert torch.allclose(v, ref, rtol=1e-15, atol=0)
    assert pf.partition({}).value(p) == 0
    assert all(a is b for a, b in zip(pf.partition({})(p, 0.5).values(), p.values()))


def test_partition_pickle_eq_and_disjointness_is_checked_per_call():
    op = pf.partition({NEURON: pf.l21(0.3, group_dim=(0, 0, 1)), "linear2.bias": pf.l1(0.1)})
    import pickle

    back = pickle.loads(pickle.dumps(op))
    assert back == op and hash(back) == hash(op) and repr(back) == repr(op)
    p = dict(_model_params(np.random.default_rng(0)))
    for a, b in zip(back(p, 0.5).values(), op(p, 0.5).values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="two rules"):
        pf.partition({"linear1.*": pf.l1(0.1), "*.bias": pf.l1(0.1)})(p, 0.5)


# ------------------------------------------------- partition: one batch per operator
def _batch_model(dtype, seed=0):
    """Several weights of different shapes, with zero rows, rows at the kink and big/tiny rows."""
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i, shape in enumerate([(5, 3), (4, 7), (6,), (3, 2, 4), (1, 1)]):
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        if w.dim() > 1:
            w[0] = 0.0  # a dead neuron
            w[-1] *= 1e6 if i % 2 else 1e-6
        p[f"layer{i}.weight"] = w.to(dtype)
        p[f"layer{i}.bias"] = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_dim", [0, -1])
def test_partition_pattern_rule_batch_equals_one_call_per_tensor(dtype, group_dim):
    """A pattern rule hands its tensors to the operator as one batch (l21: one scale
    computation for all of them); the result is the same, bit for bit, as one call each."""
    p = _batch_model(dtype)
    ops = (pf.l21(0.9, group_dim=group_dim), pf.l21(0.0), pf.l1(0.2), pf.linf1(0.5, group_dim=group_dim))
    for step in (0.7, torch.tensor(0.7, dtype=torch.float64), 1e-30, 1e30):
        for op in ops:
            out = pf.partition({"*.weight": op})(p, step)
            for k, v in p.items():
                want = op(v, step) if k.endswith("weight") else v
                assert out[k].dtype == v.dtype and torch.equal(out[k], want), (k, op, step)
                assert not torch.isnan(out[k]).any()
            assert not out["layer0.weight"][0].any()


def test_partition_batch_falls_back_for_mixed_dtypes_gradients_and_bad_tensors():
    p = _batch_model(torch.float32)
    p["layer1.weight"] = p["layer1.weight"].double()  # mixed dtypes: one call per tensor
    op = pf.l21(0.9)
    out = pf.partition({"*.weight": op})(p, 0.5)
    for k in p:
        if k.endswith("weight"):
            assert torch.equal(out[k], op(p[k], 0.5))
    # gradients flow through the batch (the differentiable path), finite at the dead neuron
    q = {k: v.double().requires_grad_() for k, v in _batch_model(torch.float64).items()}
    out = pf.partition({"*.weight": op})(q, 0.5)
    sum(v.sum() for v in out.values()).backward()
    for k, v in q.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k
    ref = {k: v.detach().clone().requires_grad_() for k, v in q.items()}
    sum(op(v, 0.5).sum() if k.endswith("weight") else v.sum() for k, v in ref.items()).backward()
    for k in q:
        assert torch.allclose(q[k].grad, ref[k].grad, rtol=1e-12, atol=0), k
    # a tensor the operator refuses is refused as it would be alone, naming the problem
    bad = dict(_batch_model(torch.float32), **{"scalar.weight": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="group_dim 0 is out of range"):
        pf.partition({"*.weight": op})(bad, 0.5)
    bad = dict(_batch_model(torch.float32), **{"cplx.weight": torch.ones(3, 2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="floating tensor"):
        pf.partition({"*.weight": op})(bad, 0.5)
    with pytest.raises(TypeError, match="floating tensor"):
        pf.partition({"*.weight": pf.l1(0.1)})(bad, 0.5)
    # an integer tensor is a buffer, not a parameter: no rule matches it, it comes back as it is
    buf = dict(_batch_model(torch.float32), **{"int.weight": torch.ones(3, 2, dtype=torch.int64)})
    out = pf.partition({"*.weight": op})(buf, 0.5)
    assert out["int.weight"] is buf["int.weight"]
