"""The seed's operators are exact proxes: l1, l2, linf, elastic_net, log_barrier, l21, linf1.

Every property is checked against code that shares nothing with proxfunc (tests/oracles.py):

* the output equals the argmin found by scipy.optimize on a smooth reformulation (to 1e-6),
  and the prox objective is never lower at a perturbed point;
* the Moreau identity ``x = prox_{t f}(x) + t * prox_{f*/t}(x / t)`` holds with independently
  written conjugates (l1 <-> linf ball, l2 <-> l2 ball, linf <-> l1 ball by sorting, l21 <->
  per-group l2 balls, linf1 <-> per-group l1 balls, elastic net and log barrier in closed
  form), across scales 1e-9..1e9, exact zeros, ties, equal rows and empty / 1-element shapes;
* non-expansiveness; float32 / float16 / bfloat16 agree with the float64 result rounded;
* zero groups give no NaN/Inf in the value or in ``torch.func.grad`` through the operator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
from tests import oracles as O
from tests.conftest import examples
from tests.helpers import pytree

# ----------------------------------------------------------------------------- specs


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64))


@dataclass(frozen=True)
class Spec:
    """An operator, how to build inputs for it, and its independent oracles.

    ``build(rng, scale, mode, small)`` returns ``(params, leaves, dims, pick)``: the pytree
    handed to the operator, its tensor leaves in a fixed order with their group dims
    (``None``: the whole object is one group), and ``pick(out) -> leaves`` in that order.
    Oracles act on the group matrix (row i = group i, see ``O.group_matrix``).
    """

    name: str
    make: Callable[..., pf.Prox]
    build: Callable
    num: Callable  # (M, reg, t) -> argmin, numerically
    obj: Callable  # (M, reg) -> f
    conj: Callable  # (V, reg, t) -> prox_{f*/t}(V)
    positive_reg: bool = False

    def __repr__(self) -> str:
        return self.name


def _shape(rng, small):
    nd = int(rng.integers(0, 4))
    hi = 4 if small else 6
    dims = [int(rng.integers(0 if rng.random() < 0.15 else 1, hi)) for _ in range(nd)]
    return tuple(dims)


def build_tensor(rng, scale, mode, small):
    x = _t(O.make_array(rng, _shape(rng, small), scale, mode))
    return x, [x], [None], lambda out: [out]


def build_layer_whole(rng, scale, mode, small):
    params, leaves, _, pick = build_layer(rng, scale, mode, small)
    return params, leaves, [None, None], pick


def build_layer(rng, scale, mode, small):
    """(W, b) of a Linear layer, groups = rows (the seed's (weight, bias) call)."""
    H = int(rng.integers(0 if rng.random() < 0.1 else 1, 5))
    D = int(rng.integers(1, 5 if small else 7))
    W = _t(O.make_array(rng, (H, D), scale, mode))
    b = _t(O.make_array(rng, (H,), scale, mode))
    return (W, b), [W, b], [0, 0], lambda out: list(out)


def build_neuron(rng, scale, mode, small):
    """{'w1': (H, D), 'b1': (H,), 'w2': (O, H)}, group_dim {'w1': 0, 'b1': 0, 'w2': 1}: whole neurons."""
    H = int(rng.integers(1, 5))
    D = int(rng.integers(1, 4))
    Od = int(rng.integers(1, 3))
    p = {
        "w1": _t(O.make_array(rng, (H, D), scale, mode)),
        "b1": _t(O.make_array(rng, (H,), scale, mode)),
        "w2": _t(O.make_array(rng, (Od, H), scale, mode)),
    }
    return p, [p["w1"], p["b1"], p["w2"]], [0, 0, 1], lambda out: [out["w1"], out["b1"], out["w2"]]


def build_cols(rng, scale, mode, small):
    """A single 3-d tensor grouped along its last dim (group_dim=-1)."""
    shape = (int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    x = _t(O.make_array(rng, shape, scale, mode))
    return x, [x], [2], lambda out: [out]


NEURON_DIMS = {"w1": 0, "b1": 0, "w2": 1}


def _flat_num(fn):
    def num(M, reg, t):
        return fn(M.ravel(), reg, t).reshape(M.shape)

    return num


SPECS = [
    Spec(
        "l1",
        lambda r: pf.l1(r),
        build_tensor,
        _flat_num(O.num_l1),
        O.obj_l1,
        lambda V, r, t: O.proj_linf_ball(V, r),
    ),
    Spec(
        "l1_tree",
        lambda r: pf.l1(r),
        build_neuron,
        _flat_num(O.num_l1),
        O.obj_l1,
        lambda V, r, t: O.proj_linf_ball(V, r),
    ),
    Spec(
        "elastic_net",
        lambda r: pf.elastic_net(r, gamma=0.7),
        build_tensor,
        _flat_num(lambda x, r, t: O.num_l1(x, r, t, gamma=0.7)),
        lambda M, r: O.obj_elastic(M, r, 0.7),
        lambda V, r, t: O.prox_elastic_conj(V, r, 0.7, 1.0 / t),
    ),
    Spec(
        "elastic_net_gamma0",
        lambda r: pf.elastic_net(r, gamma=0.0),
        build_layer_whole,
        _flat_num(O.num_l1),
        O.obj_l1,
        lambda V, r, t: O.prox_elastic_conj(V, r, 0.0, 1.0 / t),
    ),
    Spec(
        "log_barrier",
        lambda r: pf.log_barrier(r),
        build_tensor,
        _flat_num(O.num_logbarrier),
        O.obj_logbarrier,
        lambda V, r, t: O.prox_logbarrier_conj(V, r, 1.0 / t),
        positive_reg=True,
    ),
    Spec(
        "l2",
        lambda r: pf.l2(r),
        build_layer_whole,
        O.num_group_l2,
        O.obj_l21,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l2_ball),
    ),
    Spec(
        "linf",
        lambda r: pf.linf(r),
        build_layer_whole,
        O.num_group_linf,
        O.obj_linf1,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l1_ball_sort),
    ),
    Spec(
        "l21",
        lambda r: pf.l21(r),
        build_layer,
        O.num_group_l2,
        O.obj_l21,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l2_ball),
    ),
    Spec(
        "l21_neuron",
        lambda r: pf.l21(r, group_dim=NEURON_DIMS),
        build_neuron,
        O.num_group_l2,
        O.obj_l21,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l2_ball),
    ),
    Spec(
        "l21_lastdim",
        lambda r: pf.l21(r, group_dim=-1),
        build_cols,
        O.num_group_l2,
        O.obj_l21,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l2_ball),
    ),
    Spec(
        "linf1",
        lambda r: pf.linf1(r),
        build_layer,
        O.num_group_linf,
        O.obj_linf1,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l1_ball_sort),
    ),
    Spec(
        "linf1_neuron",
        lambda r: pf.linf1(r, group_dim=NEURON_DIMS),
        build_neuron,
        O.num_group_linf,
        O.obj_linf1,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l1_ball_sort),
    ),
    Spec(
        "linf1_lastdim",
        lambda r: pf.linf1(r, group_dim=-1),
        build_cols,
        O.num_group_linf,
        O.obj_linf1,
        lambda V, r, t: O.proj_rows(V, r, O.proj_l1_ball_sort),
    ),
]

BY_NAME = {s.name: s for s in SPECS}
MODES = st.sampled_from(O.MODES)


def _matrix(spec, leaves, dims):
    return O.group_matrix([np.asarray(x.detach().double().numpy()) for x in leaves], dims)


def _run(spec, params, reg, t):
    ins, spec_in = pytree.tree_flatten(params)
    before = [x.clone() for x in ins]
    out = spec.make(reg)(params, t)
    assert all(torch.equal(x, c) for x, c in zip(ins, before))  # pure
    outs, spec_out = pytree.tree_flatten(out)
    assert spec_in == spec_out
    for i, o in zip(ins, outs):
        assert o.shape == i.shape and o.dtype == i.dtype  # 0-d and empty leaves included
    return out


def _reg_for(spec, rng, scale, t, allow_zero=True):
    """A reg with reg*t between 0 and ~3x the data scale (so all regimes occur)."""
    f = float(rng.choice([0.0, 0.01, 0.3, 1.0, 3.0])) if allow_zero else float(rng.choice([0.01, 0.3, 1.0, 3.0]))
    if spec.positive_reg and f == 0.0:
        f = 0.05
    return f * scale / t


# --------------------------------------------------------------- 1. scipy argmin


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@settings(max_examples=examples(12))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_output_is_the_argmin_scipy(spec, seed, mode):
    rng = np.random.default_rng(seed)
    scale = float(10.0 ** rng.uniform(-1, 1))
    params, leaves, dims, pick = spec.build(rng, scale, mode, True)
    t = float(10.0 ** rng.uniform(-1, 0.5))
    reg = _reg_for(spec, rng, scale, t)
    X = _matrix(spec, leaves, dims)
    Z = _matrix(spec, pick(_run(spec, params, reg, t)), dims)
    N = spec.num(X, reg, t)

    def F(M):
        return O.prox_objective(lambda A: spec.obj(A, reg), M, X, t)

    size = max(np.abs(X).max(initial=0.0), reg * t, 1e-300)
    assert np.abs(Z - N).max(initial=0.0) <= 1e-6 * size, (np.abs(Z - N).max(), size)
    # ours is at least as good as the solver's point (up to rounding)
    assert F(Z) <= F(N) + 1e-12 * (1 + abs(F(N)))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@settings(max_examples=examples(20))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_no_perturbation_lowers_the_objective(spec, seed, mode):
    rng = np.random.default_rng(seed)
    scale = float(10.0 ** rng.uniform(-3, 3))
    params, leaves, dims, pick = spec.build(rng, scale, mode, False)
    t = float(10.0 ** rng.uniform(-2, 2))
    reg = _reg_for(spec, rng, scale, t)
    X = _matrix(spec, leaves, dims)
    Z = _matrix(spec, pick(_run(spec, params, reg, t)), dims)
    if Z.size == 0:
        return

    def F(M):
        return O.prox_objective(lambda A: spec.obj(A, reg), M, X, t)

    f0 = F(Z)
    tol = 1e-12 * (abs(f0) + (scale**2) / t + reg * scale)
    deltas = [rng.standard_normal(Z.shape) * scale * 10.0**e for e in (-1, -3, -6)]
    for k in range(min(Z.size, 8)):  # single coordinates, both directions
        e = np.zeros(Z.size)
        e[rng.integers(Z.size)] = scale * 1e-4 * (1 if k % 2 else -1)
        deltas.append(e.reshape(Z.shape))
    deltas.append(-Z)  # the zero point
    deltas.append(X - Z)  # the input itself
    for d in deltas:
        assert F(Z + d) >= f0 - tol, (F(Z + d), f0)


# ------------------------------------------------------------ 2. Moreau identity


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@settings(max_examples=examples(40))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES, log_scale=st.sampled_from([-9, -4, 0, 4, 9]))
def test_moreau_identity_with_independent_conjugate(spec, seed, mode, log_scale):
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    params, leaves, dims, pick = spec.build(rng, scale, mode, False)
    t = float(10.0 ** rng.uniform(-3, 3))
    reg = _reg_for(spec, rng, scale, t)
    X = _matrix(spec, leaves, dims)
    P = _matrix(spec, pick(_run(spec, params, reg, t)), dims)
    D = t * spec.conj(X / t, reg, t)
    size = max(np.abs(X).max(initial=0.0), np.abs(P).max(initial=0.0), np.abs(D).max(initial=0.0), 1e-300)
    assert np.all(np.isfinite(P))
    assert np.abs(P + D - X).max(initial=0.0) <= 1e-12 * size, np.abs(P + D - X).max()


def test_moreau_boundary_points_exactly_at_threshold():
    """Entries / groups exactly at the kink (|x| = reg*t, ||x_g|| = reg*t, ||x_g||_1 = reg*t)."""
    t, reg = 0.5, 2.0  # reg*t = 1
    x = torch.tensor([[1.0, -1.0, 0.0, 0.5], [0.6, 0.8, 0.0, 0.0], [0.25, -0.25, 0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(pf.l1(reg)(x, t)[0], torch.zeros(4, dtype=torch.float64).where(x[0].abs() <= 1, x[0]))
    assert torch.equal(pf.l21(reg)(x, t)[1], torch.zeros(4, dtype=torch.float64))  # ||row 1|| = 1
    assert torch.equal(pf.linf1(reg)(x, t)[2], torch.zeros(4, dtype=torch.float64))  # ||row 2||_1 = 1
    for spec in (BY_NAME["l21"], BY_NAME["linf1"]):
        P = spec.make(reg)((x, torch.zeros(3, dtype=torch.float64)), t)[0].numpy()
        D = t * spec.conj(x.numpy() / t, reg, t)
        assert np.abs(P + D - x.numpy()).max() <= 1e-15


# ----------------------------------------------------------- 3. non-expansive


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@settings(max_examples=examples(25))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES, log_scale=st.sampled_from([-9, -3, 0, 3, 9]))
def test_non_expansive(spec, seed, mode, log_scale):
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    params, leaves, dims, pick = spec.build(rng, scale, mode, False)
    # a second point of the same structure: a perturbation at a random relative size
    rel = float(10.0 ** rng.uniform(-6, 1))
    noise = [_t(rng.standard_normal(tuple(x.shape)) * scale * rel) for x in leaves]
    by_id = {id(x): n for x, n in zip(leaves, noise)}
    params2 = pytree.tree_map(lambda x: x + by_id[id(x)], params)
    t = float(10.0 ** rng.uniform(-2, 2))
    reg = _reg_for(spec, rng, scale, t)
    op = spec.make(reg)
    a = torch.cat([z.reshape(-1) for z in pick(op(params, t))])
    b = torch.cat([z.reshape(-1) for z in pick(op(params2, t))])
    dx = torch.cat([n.reshape(-1) for n in noise]).norm()
    xs = torch.cat([x.reshape(-1) for x in leaves])
    big = float(xs.abs().max()) if xs.numel() else 0.0
    # the inputs themselves carry a rounding of ~eps*|x| per entry (x + noise was rounded)
    assert (a - b).norm() <= dx * (1 + 1e-12) + 4e-16 * (big + reg * t) * (xs.numel() + 1) ** 0.5


# -------------------------------------------------------- 4. low precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
@settings(max_examples=examples(15))
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_low_precision_matches_float64_rounded(spec, dtype, seed, mode):
    rng = np.random.default_rng(seed)
    lo, hi = {torch.float32: (-9, 9), torch.float16: (-2, 3), torch.bfloat16: (-9, 9)}[dtype]
    scale = float(10.0 ** rng.uniform(lo, hi))
    params, leaves, dims, pick = spec.build(rng, scale, mode, False)
    lim = 6e4 if dtype == torch.float16 else float("inf")  # float16 overflows above 65504
    params_lo = pytree.tree_map(lambda x: x.clamp(-lim, lim).to(dtype), params)
    params_up = pytree.tree_map(lambda x: x.to(torch.float64), params_lo)  # same values, float64
    t = float(10.0 ** rng.uniform(-1, 1))
    reg = _reg_for(spec, rng, scale, t)
    op = spec.make(reg)
    out = pick(op(params_lo, t))
    ref = pick(op(params_up, t))
    eps = torch.finfo(dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    size = max(float(max((x.abs().max() for x in pick(params_up) if x.numel()), default=0.0)), reg * t)
    for o, r in zip(out, ref):
        assert o.dtype == dtype
        assert torch.isfinite(o).all()
        r_round = r.to(dtype).double()
        err = (o.double() - r_round).abs()
        # one rounding of the result, plus the float32 accumulation error (absolute, ~eps32 * size:
        # thresholds like x - reg*t cancel, so only the scale of the data bounds it)
        # (a few float32 roundings relative to the result too: log_barrier's sqrt/hypot/divide)
        assert (err <= eps * r.abs() + 4 * eps32 * r.abs() + 16 * eps32 * size).all(), err.max()


# --------------------------------------------------------- 5. zero groups


def _zero_group_params():
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    return W, b


ZERO_OPS = {
    "l1": lambda r: pf.l1(r),
    "l2": lambda r: pf.l2(r),
    "linf": lambda r: pf.linf(r),
    "elastic_net": lambda r: pf.elastic_net(r, gamma=0.5),
    "l21": lambda r: pf.l21(r),
    "l21_cols": lambda r: pf.l21(r, group_dim=(1, 0)),
    "linf1": lambda r: pf.linf1(r),
}


@pytest.mark.parametrize("all_zero", [False, True], ids=["one_zero_group", "all_zero"])
@pytest.mark.parametrize("name", list(ZERO_OPS))
def test_zero_groups_no_nan_in_value_or_grad(name, all_zero):
    W, b = _zero_group_params()
    if all_zero:
        W, b = torch.zeros_like(W), torch.zeros_like(b)
    if name == "l21_cols":
        b = torch.zeros(3, dtype=torch.float64) if all_zero else torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    make = ZERO_OPS[name]
    reg = torch.tensor(0.4, dtype=torch.float64)
    op = make(reg)
    v = op.value((W, b))
    assert torch.isfinite(v)
    gW, gb = torch.func.grad(lambda p: op.value(p))((W, b))
    assert torch.isfinite(gW).all() and torch.isfinite(gb).all()

    def loss(p, r):
        out = make(r)(p, 0.7)
        return sum((o * torch.arange(1, o.numel() + 1, dtype=o.dtype).reshape(o.shape)).sum() for o in out)

    gp, gr = torch.func.grad(loss, argnums=(0, 1))((W, b), reg)
    assert all(torch.isfinite(g).all() for g in gp)
    assert torch.isfinite(gr)
    gv = torch.func.grad(lambda r: make(r).value(make(r)((W, b), 0.7)))(reg)
    assert torch.isfinite(gv)


def test_grad_through_prox_matches_finite_differences():
    """d prox / d x and d prox / d reg from torch.func.grad agree with central differences."""
    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    for make in (lambda r: pf.l21(r), lambda r: pf.linf1(r), lambda r: pf.l2(r), lambda r: pf.linf(r)):

        def f(Wx, r, make=make):
            return (make(r)((Wx, b), 0.5)[0] * w).sum()

        r0 = torch.tensor(0.6, dtype=torch.float64)
        gW, gr = torch.func.grad(f, argnums=(0, 1))(W, r0)
        h = 1e-6
        fd_r = (f(W, r0 + h) - f(W, r0 - h)) / (2 * h)
        assert torch.allclose(gr, fd_r, atol=1e-6)
        E = torch.zeros_like(W)
        E[1, 2] = h
        fd_w = (f(W + E, r0) - f(W - E, r0)) / (2 * h)
        assert torch.allclose(gW[1, 2], fd_w, atol=1e-6)


# ---------------------------------------------------------- 6. closed cases


def test_seed_semantics_l2_scales_bias_too():
    """The seed's l2 bug is fixed: the bias is shrunk by the same factor as the weight."""
    W = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([4.0], dtype=torch.float64)
    W2, b2 = pf.l2(1.0)((W, b), 2.5)  # ||(W, b)|| = 5, factor 1 - 2.5/5 = 0.5
    assert torch.equal(W2, 0.5 * W) and torch.equal(b2, 0.5 * b)


def test_linf1_kills_small_groups_keeps_large():
    W = torch.tensor([[0.1, -0.1], [3.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.05, 0.0], dtype=torch.float64)
    W2, b2 = pf.linf1(1.0)((W, b), 0.25)  # row 0 has l1 norm 0.25 <= 0.25: dies
    assert torch.equal(W2[0], torch.zeros(2, dtype=torch.float64)) and b2[0] == 0
    # row 1: l1 projection of (3, 1, 0) on radius .25 is (.25, 0, 0): prox = (2.75, 1, 0)
    assert torch.allclose(W2[1], torch.tensor([2.75, 1.0], dtype=torch.float64), atol=1e-15)


def test_log_barrier_large_negative_keeps_relative_accuracy():
    x = torch.tensor([-1e8, -1e3, 0.0, 1e3], dtype=torch.float64)
    out = pf.log_barrier(1e-3)(x, 1.0)
    ref = torch.from_numpy(O.num_logbarrier(x.numpy(), 1e-3, 1.0))
    assert (out > 0).all()
    assert torch.allclose(out, ref, rtol=1e-13, atol=0)


def test_eager_autograd_sort_free_path_equals_torch_func_grad_sort_path():
    """The eager threshold (sort-free fixed point + one differentiable formula) and the
    traceable one (sort, used under torch.func) give the same values and gradients."""
    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    for make in (lambda r: pf.linf1(r), lambda r: pf.linf(r), lambda r: pf.l1_ball(r), lambda r: pf.simplex(r)):

        def f(Wx, r, make=make):
            return (make(r)(Wx, 0.5) * w).sum()

        Wg = W.clone().requires_grad_(True)
        r = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        val = f(Wg, r)
        gW, gr = torch.autograd.grad(val, (Wg, r))
        gW2, gr2 = torch.func.grad(f, argnums=(0, 1))(W, r.detach())
        assert torch.allclose(gW, gW2, atol=1e-14) and torch.allclose(gr, gr2, atol=1e-14)
        assert torch.allclose(torch.vmap(lambda x, make=make: make(0.7)(x, 0.5))(W[None])[0], make(0.7)(W, 0.5))


def test_zero_reg_on_tied_maxima_is_the_identity():
    """Regression (found by the thorough profile): linf(0) / linf1(0) returned 0 instead of x
    when rounding put the sort-free threshold a hair above tied maxima."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = float(rng.uniform(0, 1))
        x = torch.tensor([a, -a, a, a / 2], dtype=torch.float64)
        for out in (pf.linf(0.0)(x, 1.0), pf.linf1(0.0)(x[None], 1.0)[0], pf.linf1(0.0)((x[None], x[:1]), 1.0)[0][0]):
            assert torch.allclose(out, x, rtol=4e-16, atol=0)
