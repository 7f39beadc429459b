"""Every public operator at inputs from 1e-6 to 1e6 times its natural scale, in float64 and float32.

Oracles, by family:

* **scale covariance** (every operator but ``birkhoff``): if ``f_s(s z) = s^2 f(z)`` then
  ``prox_{t f_s}(s x) = s prox_{t f}(x)``. ``f_s`` is ``f`` with its hyperparameters scaled as the
  input is: the weights of norms and the radii, bounds and offsets of sets by ``s``, the weights of
  counts and of logarithms (``l0``, ``group_l0``, ``log_barrier``, ``log_sum``) by ``s^2``, the
  rates of quadratics (``ridge``, ``quadratic``'s ``A``, ``add_quadratic``'s ``rho``,
  ``moreau_env``'s ``mu``) and cones unchanged. The scaled operator on the scaled input must give
  ``s`` times the float64 answer at unit scale, computed from the same rounded input, to a few
  ulps of the scale (the unit-scale answers are checked against scipy and closed forms in the
  family test files). ``neg_entropy`` is not homogeneous: ``s z log(s z)`` adds the linear term
  ``log(s) z``, which shifts the input. The iterative operators (``sum_of``, ``intersection``,
  ``tv2d``) are compared with closed forms or a tightly converged run at unit scale, within their
  documented accuracy relative to the scale;
* **the prox minimises its objective at the scaled problem** (every operator, independent of
  the unit-scale answer): ``f(p) + ||p - x||^2 / (2t)`` is no larger at ``p = op(x, t)`` than at
  the other candidates at hand (other outputs of the operator, ``0``, ``x``, ``p`` perturbed),
  and for convex ``f`` the prox inequality ``f(y) >= f(p) + <(x - p)/t, y - p>`` holds;
* **birkhoff** (the polytope does not scale): the KKT conditions of the projection
  (``Z >= 0``, doubly stochastic to the documented tolerance, and ``Z = max(X - a 1^T - 1 b^T, 0)``
  for dual vectors ``a, b`` fitted by least squares on the support, the entries off it below
  the threshold) for ``X`` from ``1e-6`` to ``1e6``;
* **value**: ``op.value(op(x, t))`` is finite (``0`` for a projection: membership relative to the
  set's scale) and, for convex operators, ``conjugate(op).value((x - op(x, t)) / t)`` is finite
  at every scale, wherever the conjugate has a closed form.

:data:`SCALED` holds one entry per public operator; a test fails if an operator of
``proxfunc.__all__`` is missing from it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import proxfunc as pf
from tests.cases import _A7, _IDX30, _PSD30, layer, mats, named, neuron_tree, sq_mats
from tests.helpers import pytree

SCALES = [1e-6, 1e-3, 1.0, 1e3, 1e6]
DTYPES = [torch.float64, torch.float32]
STEPS = (0.3, 3.0)
D = torch.float64

_A30 = torch.linspace(-1, 2, 30, dtype=D)
_W3 = torch.tensor([0.1, 0.3, 0.6], dtype=D)
_NEURON = {"w1": 0, "b1": 0, "w2": 1}


_A12 = torch.linspace(-1, 2, 12, dtype=D)


def _ball_cap(x):
    """Projection onto l2_ball(1) ∩ hyperplane(a, 0.5): the hyperplane's projection, then, within
    the hyperplane, the projection onto the circle around ``c = 0.5 a / |a|^2`` of radius
    ``sqrt(1 - |c|^2)`` (Dykstra converges to it linearly, not in finitely many steps)."""
    a = _A12
    c = 0.5 * a / (a @ a)
    h = x - (x @ a - 0.5) / (a @ a) * a
    rho = (1 - c @ c).sqrt()
    d = h - c
    return c + d * (rho / torch.maximum(rho, d.norm()))


@dataclass(frozen=True)
class Scaled:
    """``make(s)``: the operator at scale ``s`` (``make(1.0)`` is the natural scale).

    ``expect(x, t, s)``: the float64 answer ``op_s(s x, t) / s`` from unit-scale data (default:
    ``make(1.0)(x, t)``). ``ulps``: the allowed error in units of ``eps * s * M`` (``M`` the unit
    input's largest magnitude, at least 1) for float64 and float32; an iterative operator gives
    its relative accuracy ``acc`` instead. ``full_domain``: ``f`` is finite everywhere (its
    objective can be compared at perturbed points).
    """

    name: str
    make: Callable[[float], pf.Prox]
    params: Callable[[torch.dtype], Any] = layer
    expect: Callable[[Any, float, float], Any] | None = None
    ulps: tuple[float, float] = (64, 64)
    acc: tuple[float, float] | None = None
    convex: bool = True
    full_domain: bool = True

    def __repr__(self) -> str:
        return self.name


@functools.lru_cache
def _tv2d_reference(t):
    """tv2d at unit scale converged to 1e-8 (its duality-gap bound), from the unrounded input: the
    rounded inputs differ by the input's rounding, which the non-expansive prox does not amplify."""
    return pf.tv2d(0.3, tol=1e-8, iters=100_000)(mats(D), t)


def _neg_entropy_expect(x, t, s):
    # f_s(w) = 0.4 s sum w log w; at w = s z: s^2 (0.4 sum z log z + 0.4 log(s) sum z)
    return pf.neg_entropy(0.4)(tmap(lambda u: u - t * 0.4 * math.log(s), x), t)


SCALED: list[Scaled] = [
    # norms and penalties: weights by s (counts, logarithms by s^2)
    Scaled("l1", lambda s: pf.l1(0.3 * s)),
    Scaled("l2", lambda s: pf.l2(0.5 * s)),
    Scaled("linf", lambda s: pf.linf(0.4 * s)),
    Scaled("elastic_net", lambda s: pf.elastic_net(0.3 * s, gamma=0.7 / s)),
    Scaled("log_barrier", lambda s: pf.log_barrier(0.2 * s * s), full_domain=False),
    Scaled("l21", lambda s: pf.l21(0.5 * s, group_dim=_NEURON), neuron_tree),
    Scaled("linf1", lambda s: pf.linf1(0.4 * s)),
    # projections: radii and bounds by s
    Scaled("box", lambda s: pf.box(-0.5 * s, 0.7 * s)),
    Scaled("nonneg", lambda s: pf.nonneg()),
    Scaled("simplex", lambda s: pf.simplex(2.0 * s)),
    Scaled("l1_ball", lambda s: pf.l1_ball(1.5 * s)),
    Scaled("l2_ball", lambda s: pf.l2_ball(1.0 * s)),
    Scaled("linf_ball", lambda s: pf.linf_ball(0.5 * s)),
    # combinators
    Scaled("identity", lambda s: pf.identity()),
    Scaled("chain", lambda s: pf.chain(pf.l1(0.1 * s), pf.l21(0.3 * s))),
    Scaled(
        "partition",
        lambda s: pf.partition(
            {("linear1.weight", "linear1.bias"): pf.linf1(0.3 * s), "linear2.weight": pf.l1(0.1 * s)}
        ),
        named,
    ),
    # smooth terms and order statistics
    Scaled("ridge", lambda s: pf.ridge(0.7)),
    Scaled("quadratic", lambda s: pf.quadratic(_PSD30, _A30 * s)),
    Scaled("huber", lambda s: pf.huber(0.8, delta=0.5 * s)),
    Scaled("neg_entropy", lambda s: pf.neg_entropy(0.4 * s), expect=_neg_entropy_expect, full_domain=False),
    Scaled("sum_largest", lambda s: pf.sum_largest(3, 0.5 * s)),
    Scaled("max_entry", lambda s: pf.max_entry(0.6 * s)),
    # sets
    Scaled("hyperplane", lambda s: pf.hyperplane(_A30, 0.3 * s)),
    Scaled("halfspace", lambda s: pf.halfspace(_A30, -0.3 * s)),
    Scaled("affine", lambda s: pf.affine(_A7[:3], _A7[:3] @ torch.ones(30, dtype=D) * s)),
    Scaled("soc", lambda s: pf.soc()),
    Scaled("psd", lambda s: pf.psd(), sq_mats),
    Scaled("l2_sphere", lambda s: pf.l2_sphere(1.5 * s), convex=False),
    Scaled("l1_sphere", lambda s: pf.l1_sphere(2.5 * s), convex=False),
    Scaled("box_hyperplane", lambda s: pf.box_hyperplane(-0.5 * s, 0.7 * s, 1.0 * s)),
    Scaled("k_sparse", lambda s: pf.k_sparse(7), convex=False),
    Scaled("sparse_simplex", lambda s: pf.sparse_simplex(3, 2.0 * s), convex=False),
    Scaled("sparse_l1_ball", lambda s: pf.sparse_l1_ball(3, 1.5 * s), convex=False),
    # index groups
    Scaled("index_l21", lambda s: pf.index_l21(_IDX30, 0.5 * s)),
    Scaled("index_linf1", lambda s: pf.index_linf1(_IDX30, 0.4 * s)),
    Scaled("sparse_group_lasso", lambda s: pf.sparse_group_lasso(0.1 * s, 0.3 * s)),
    # matrices
    Scaled("nuclear", lambda s: pf.nuclear(0.5 * s), mats),
    Scaled("nuclear_ball", lambda s: pf.nuclear_ball(2.0 * s), mats),
    Scaled("spectral", lambda s: pf.spectral(0.5 * s), mats),
    Scaled("rank_k", lambda s: pf.rank_k(1), mats, convex=False),
    Scaled("weighted_nuclear", lambda s: pf.weighted_nuclear(_W3 * s), mats, convex=False),
    # non-convex
    Scaled("l0", lambda s: pf.l0(0.2 * s * s), convex=False),
    Scaled("group_l0", lambda s: pf.group_l0(0.8 * s * s), convex=False),
    Scaled("top_k", lambda s: pf.top_k(2, group_dim=0), convex=False),
    Scaled("group_top_k", lambda s: pf.group_top_k(3, group_dim=_NEURON), neuron_tree, convex=False),
    Scaled("scad", lambda s: pf.scad(0.4 * s, a=3.7), convex=False),
    Scaled("mcp", lambda s: pf.mcp(0.4 * s, gamma=2.5), convex=False),
    Scaled("log_sum", lambda s: pf.log_sum(0.3 * s * s, eps=0.5 * s), convex=False),
    # calculus rules: the inner operator scaled, shifts by s, rates unchanged
    Scaled("scale", lambda s: pf.scale(pf.l21(0.5 * s), 2.0)),
    Scaled("precompose", lambda s: pf.precompose(pf.l1(0.3 * s), -2.0, 0.5 * s)),
    Scaled("add_linear", lambda s: pf.add_linear(pf.l2(0.3 * s), 0.2 * s)),
    Scaled("add_quadratic", lambda s: pf.add_quadratic(pf.linf(0.3 * s), 1.5, 0.1 * s)),
    Scaled("conjugate", lambda s: pf.conjugate(pf.l2(0.8 * s))),
    Scaled("moreau_env", lambda s: pf.moreau_env(pf.l1(0.5 * s), 0.7)),
    # total variation
    Scaled("tv1d", lambda s: pf.tv1d(0.4 * s)),
    Scaled("fused_lasso", lambda s: pf.fused_lasso(0.4 * s, 0.1 * s)),
    # by iteration: closed forms or a tight unit-scale run, within the documented accuracy
    Scaled(
        "tv2d",
        lambda s: pf.tv2d(0.3 * s),
        mats,
        expect=lambda x, t, s: _tv2d_reference(t),
        acc=(1e-6, 1e-5),
    ),
    Scaled(
        "sum_of",
        lambda s: pf.sum_of(pf.l1(0.3 * s), pf.nonneg(), pf.box(-1.0 * s, 0.5 * s)),
        expect=lambda x, t, s: pytree.tree_map(lambda u: (u - 0.3 * t).clamp(0, 0.5), x),
        acc=(1e-6, 1e-5),
        full_domain=False,
    ),
    Scaled(
        "intersection",
        lambda s: pf.intersection(pf.l2_ball(1.0 * s), pf.hyperplane(_A12, 0.5 * s)),
        expect=lambda x, t, s: _ball_cap(x),
        params=lambda dtype: torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=D).to(dtype),
        acc=(1e-6, 1e-5),
    ),
]

#: not homogeneous (the polytope is fixed): the KKT test below
KKT_ONLY = {"birkhoff"}

#: convex operators whose conjugate has no closed-form value (``NotImplementedError``)
NO_CONJUGATE_VALUE = {"chain", "partition", "precompose", "add_linear", "add_quadratic",
                      "moreau_env", "tv1d", "fused_lasso", "tv2d", "sum_of", "intersection"}  # fmt: skip


def _public_operators() -> set[str]:
    out = set()
    for name in pf.__all__:
        obj = getattr(pf, name)
        if isinstance(obj, type) and issubclass(obj, pf.Prox) and obj is not pf.Prox:
            out.add(name)
    return out


def test_every_public_operator_is_covered():
    have = [c.name for c in SCALED]
    assert len(have) == len(set(have)), "an operator is listed twice"
    missing = _public_operators() - set(have) - KKT_ONLY
    assert not missing, f"operators without a scale test: {sorted(missing)}"
    assert set(have) | KKT_ONLY == _public_operators()
    for c in SCALED:  # the entry's operator is the one it is named after
        assert type(c.make(1.0)) is getattr(pf, c.name), c.name


# ----------------------------------------------------------------------------- helpers
def leaves(t):
    return [x for x in pytree.tree_leaves(t) if x is not None]


def flat(t):
    return torch.cat([x.reshape(-1).double() for x in leaves(t)])


def tmap(f, *ts):
    return pytree.tree_map(f, *ts)


def prox_objective(op, z, x, t):
    return float(op.value(z)) + float((flat(z) - flat(x)).pow(2).sum()) / (2 * t)


def _inputs(case: Scaled, dtype, s, seed=0):
    base = case.params(D) if seed == 0 else _reseed(case, seed)
    xs = tmap(lambda u: (u * s).to(dtype), base)
    xu = tmap(lambda u: u.double() / s, xs)  # the rounded input, at unit scale
    return xs, xu


def _reseed(case: Scaled, seed: int):
    try:
        return case.params(D, seed)
    except TypeError:
        return tmap(lambda u: u.flip(0).contiguous() * 1.3, case.params(D))


# ----------------------------------------------------------------------------- covariance
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SCALED, ids=repr)
def test_prox_scale_covariance(case, dtype):
    eps = torch.finfo(dtype).eps
    k = DTYPES.index(dtype)
    bad = []
    for s in SCALES:
        op = case.make(s)
        xs, xu = _inputs(case, dtype, s)
        M = max(1.0, float(flat(xu).abs().max()))
        for t in STEPS:
            got = op(xs, t)
            for g, x in zip(leaves(got), leaves(xs)):
                assert g.dtype == dtype and g.shape == x.shape
            want = case.expect(xu, t, s) if case.expect else case.make(1.0)(xu, t)
            err = float((flat(got) / s - flat(want)).abs().max()) if flat(want).numel() else 0.0
            if case.acc is not None:  # relative to the input's norm and the hyperparameters' scale
                bound = case.acc[k] * (float(flat(xu).norm()) + 1.0)
            else:
                bound = case.ulps[k] * eps * M
            if not err <= bound:
                bad.append(f"s={s:g} t={t:g}: error {err:.3g} (relative to s) > {bound:.3g}")
    assert not bad, f"{case.name} {dtype}:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- optimality
def _candidates(case: Scaled, op, xs, p, s, t):
    """Points to compare the prox objective with: other outputs of op (in dom f), 0, x, and
    (full domain) p moved by 1e-3 and 1e-6 of the scale in random directions."""
    out = [op(tmap(lambda u, c=c: u * c, xs), t) for c in (0.5, -1.0, 2.0)]
    out.append(op(_inputs(case, D, s, seed=1)[0], t))
    out += [tmap(torch.zeros_like, xs), xs]
    if case.full_domain and not op.is_projection:
        g = torch.Generator().manual_seed(11)
        for h in (1e-3, 1e-6):
            out.append(tmap(lambda u, h=h: u + h * s * torch.randn(u.shape, generator=g, dtype=D), p))
    return out


@pytest.mark.parametrize("case", SCALED, ids=repr)
def test_prox_minimises_its_objective_at_every_scale(case):
    rel = 1e-9 if case.acc is None else 10 * case.acc[0]
    bad = []
    for s in SCALES:
        op = case.make(s)
        xs, _ = _inputs(case, D, s)
        for t in STEPS:
            p = op(xs, t)
            fp = float(op.value(p))
            Fp = prox_objective(op, p, xs, t)
            g = (flat(xs) - flat(p)) / t
            ref = s * s * (1.0 + float(flat(xs).norm() / s) ** 2)  # the objective's scale
            for i, y in enumerate(_candidates(case, op, xs, p, s, t)):
                fy = float(op.value(y))
                if not math.isfinite(fy):
                    continue
                Fy = prox_objective(op, y, xs, t)
                if not Fp <= Fy + rel * ref / t:
                    bad.append(f"s={s:g} t={t:g} candidate {i}: objective {Fp:.17g} > {Fy:.17g}")
                if case.convex:  # f(y) >= f(p) + <g, y - p>
                    gap = fy - fp - float(g @ (flat(y) - flat(p)))
                    if not gap >= -rel * ref / t:
                        bad.append(f"s={s:g} t={t:g} candidate {i}: prox inequality misses by {-gap:.3g}")
    assert not bad, f"{case.name}:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- value
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SCALED, ids=repr)
def test_value_accepts_own_prox_and_dual_points(case, dtype):
    bad = []
    for s in SCALES:
        op = case.make(s)
        conj = pf.conjugate(op) if case.convex else None
        xs, _ = _inputs(case, dtype, s)
        for t in STEPS:
            p = op(xs, t)
            v = op.value(p)
            ok = bool(v == 0) if op.is_projection else bool(torch.isfinite(v))
            if not ok:
                bad.append(f"s={s:g} t={t:g}: value {float(v)}")
            if conj is None:
                continue
            y = tmap(lambda a, b, t=t: (a - b) / t, xs, p)
            if case.name in NO_CONJUGATE_VALUE:
                with pytest.raises(NotImplementedError):
                    conj.value(y)
                continue
            cv = conj.value(y)
            if not bool(torch.isfinite(cv)):
                bad.append(f"s={s:g} t={t:g}: conjugate value {float(cv)} at (x - p)/t")
    assert not bad, f"{case.name} {dtype}:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- birkhoff
def _birkhoff_kkt(X: np.ndarray, Z: np.ndarray, feas: float, slack: float) -> list[str]:
    """The projection's KKT conditions for one matrix: ``Z >= 0``, its sums within ``feas`` of 1,
    and dual vectors ``a, b`` with ``X - Z = a 1^T + 1 b^T`` on the support of ``Z`` and
    ``X - a 1^T - 1 b^T <= 0`` off it, to ``slack`` (the scale of ``X``'s rounding).

    On each connected component of the support (a bipartite graph of rows and columns) ``a, b``
    are fixed by a spanning tree up to one constant ``c_p`` (``a + c_p``, ``b - c_p``); the
    entries off the support ask ``c_p - c_q >= X_ij - a_i - b_j`` between the components of row
    ``i`` and column ``j``: difference constraints, feasible iff the graph with edges ``p -> q`` of
    weight ``slack - (X_ij - a_i - b_j)`` has no negative cycle (Bellman-Ford)."""
    n = X.shape[0]
    msgs = []
    if (Z < 0).any():
        msgs.append("negative entry")
    miss = max(np.abs(Z.sum(1) - 1).max(), np.abs(Z.sum(0) - 1).max())
    if miss > feas:
        msgs.append(f"sums miss 1 by {miss:.3g} > {feas:.3g}")
    S, R = Z > 0, X - Z
    pot = np.full(2 * n, np.nan)  # a (rows 0..n-1), b (columns n..2n-1)
    comp = np.full(2 * n, -1)
    for root in range(2 * n):
        if comp[root] >= 0:
            continue
        comp[root], pot[root] = root, 0.0
        stack = [root]
        while stack:
            u = stack.pop()
            nbrs = np.nonzero(S[u])[0] + n if u < n else np.nonzero(S[:, u - n])[0]
            for v in nbrs:
                if comp[v] < 0:
                    i, j = (u, v - n) if u < n else (v, u - n)
                    comp[v], pot[v] = root, R[i, j] - pot[u]
                    stack.append(v)
    a, b = pot[:n], pot[n:]
    fit = R - a[:, None] - b[None, :]  # the support's cycles must close
    if S.any() and np.abs(fit[S]).max() > slack:
        msgs.append(f"support residual {np.abs(fit[S]).max():.3g} > {slack:.3g}")
    roots = sorted(set(comp))
    idx = {r: k for k, r in enumerate(roots)}
    dist = np.zeros(len(roots))
    edges = [(idx[comp[i]], idx[comp[n + j]], slack - (X[i, j] - a[i] - b[j])) for i, j in zip(*np.nonzero(~S))]
    for _ in range(len(roots)):
        for p, q, w in edges:
            dist[q] = min(dist[q], dist[p] + w)
    if any(dist[p] + w < dist[q] for p, q, w in edges):
        msgs.append("no dual vectors keep the entries off the support at or below the threshold")
    return msgs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 6])
def test_birkhoff_kkt_at_every_scale(dtype, n):
    op = pf.birkhoff()
    g = torch.Generator().manual_seed(n)
    base = torch.randn(4, n, n, generator=g, dtype=D)
    base[0] = torch.eye(n, dtype=D)[torch.randperm(n, generator=g)] * 2 - 0.3  # far from the polytope, a vertex
    bad = []
    for s in SCALES + [1e9]:
        X = (base * s).to(dtype)
        Z = op(X)
        assert Z.dtype == dtype and torch.isfinite(Z).all()
        if not bool(op.value(Z) == 0):
            bad.append(f"s={s:g}: value {float(op.value(Z))}")
        Xd, Zd = X.double().numpy(), Z.double().numpy()
        ulp = torch.finfo(dtype).eps
        # the entries X - a - b carry an absolute error of about eps * max|X|; float32 output
        # adds its own rounding of every entry
        slack = 16 * n * (torch.finfo(D).eps * (np.abs(Xd).max() + 1) + ulp)
        feas = 1e-10 + 16 * n * (torch.finfo(D).eps * np.abs(Xd).max() + ulp)
        for m in range(Xd.shape[0]):
            bad += [f"s={s:g} matrix {m}: {msg}" for msg in _birkhoff_kkt(Xd[m], Zd[m], feas, slack)]
    assert not bad, "\n".join(bad)


def test_birkhoff_scaled_inputs_match_a_tight_reference():
    """Small inputs (the projection near the centre J/n) and large ones (near a vertex) against
    a float64 run to the dtype's resolution."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 5, 5, generator=g, dtype=D)
    tight = pf.birkhoff(iters=100_000, tol=1e-300)
    for s in SCALES:
        X = base * s
        want = tight(X)
        got = pf.birkhoff()(X)
        assert (got - want).abs().max() <= 1e-9, s
        got32 = pf.birkhoff()(X.float())
        assert (got32.double() - want).abs().max() <= 1e-6, s


def test_birkhoff_kkt_oracle_rejects_wrong_answers():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(5, 5, generator=g, dtype=D) * 1e3
    assert not _birkhoff_kkt(X.numpy(), pf.birkhoff()(X).numpy(), 1e-9, 1e-9)
    Y = torch.randn(5, 5, generator=g, dtype=D) * 3
    early = pf.birkhoff(iters=2)(Y).numpy()  # columns sum to 1, rows not yet
    assert any("sums" in m for m in _birkhoff_kkt(Y.numpy(), early, 1e-9, 1e-9))
    # feasible points that are not the projection: the centre, a vertex
    for W in (np.full((5, 5), 0.2), np.eye(5)):
        assert _birkhoff_kkt(Y.numpy(), W, 1e-9, 1e-9)
