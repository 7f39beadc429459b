"""Registry of operator instances for the cross-cutting tests (torch.func, compile, contract).

Every public operator appears here at least once. ``make_params(dtype)`` returns a valid
input pytree (small, random, seeded) for that operator. Tests that apply to every operator
(purity, structure, torch.func transforms, torch.compile, gradients) iterate over CASES;
family-specific exactness tests live in their own files.

Flags:
  convex      -- the prox of a closed convex function (non-expansive, Moreau applies)
  projection  -- prox of an indicator (step is ignored)
  smooth_grad -- the prox is differentiable almost everywhere in params (gradcheck away from kinks)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import proxfunc as pf


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mat(dtype=torch.float64, shape=(5, 4), seed=0, scale=1.0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(dtype) * scale


def layer(dtype=torch.float64, seed=0):
    """(W, b) of a Linear(4 -> 6): the seed's (weight, bias) argument."""
    return (mat(dtype, (6, 4), seed), mat(dtype, (6,), seed + 1))


def neuron_tree(dtype=torch.float64, seed=0):
    """{'w1': (6, 4), 'b1': (6,), 'w2': (3, 6)} with groups along (0, 0, 1)."""
    return {"w1": mat(dtype, (6, 4), seed), "b1": mat(dtype, (6,), seed + 1), "w2": mat(dtype, (3, 6), seed + 2)}


def named(dtype=torch.float64, seed=0):
    """A flat {name: tensor} dict like dict(model.named_parameters())."""
    return {
        "linear1.weight": mat(dtype, (6, 4), seed),
        "linear1.bias": mat(dtype, (6,), seed + 1),
        "linear2.weight": mat(dtype, (3, 6), seed + 2),
        "linear2.bias": mat(dtype, (3,), seed + 3),
    }


@dataclass(frozen=True)
class Case:
    name: str
    make_op: Callable[[], pf.Prox]
    make_params: Callable[[torch.dtype], Any] = layer
    convex: bool = True
    projection: bool = False
    smooth_grad: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __repr__(self) -> str:
        return self.name


CASES: list[Case] = [
    Case("l1", lambda: pf.l1(0.3)),
    Case("l2", lambda: pf.l2(0.5)),
    Case("linf", lambda: pf.linf(0.4)),
    Case("elastic_net", lambda: pf.elastic_net(0.3, gamma=0.7)),
    Case("log_barrier", lambda: pf.log_barrier(0.2)),
    Case("l21", lambda: pf.l21(0.5)),
    Case("l21_neuron", lambda: pf.l21(0.5, group_dim={"w1": 0, "b1": 0, "w2": 1}), neuron_tree),
    Case("linf1", lambda: pf.linf1(0.4)),
    Case("linf1_neuron", lambda: pf.linf1(0.4, group_dim={"w1": 0, "b1": 0, "w2": 1}), neuron_tree),
    Case("box", lambda: pf.box(-0.5, 0.7), projection=True),
    Case("nonneg", lambda: pf.nonneg(), projection=True),
    Case("simplex", lambda: pf.simplex(2.0), projection=True),
    Case("l1_ball", lambda: pf.l1_ball(1.5), projection=True),
    Case("l2_ball", lambda: pf.l2_ball(1.0), projection=True),
    Case("linf_ball", lambda: pf.linf_ball(0.5), projection=True),
    Case("identity", lambda: pf.identity()),
    Case("chain_sparse_group", lambda: pf.chain(pf.l1(0.1), pf.l21(0.3))),
    Case(
        "partition",
        lambda: pf.partition({("linear1.weight", "linear1.bias"): pf.linf1(0.3), "linear2.weight": pf.l1(0.1)}),
        named,
    ),
]

# ---------------------------------------------------------------- catalog (issue 3)
_A7 = torch.randn(7, 30, generator=_g(7), dtype=torch.float64)
_PSD30 = (_A7.T @ _A7) / 30.0
_IDX30 = torch.tensor([i % 4 if i % 7 else -1 for i in range(30)])  # 4 groups, some entries in none


def mats(dtype=torch.float64, seed=0):
    """Two stacks of matrices: (2, 4, 3) and (3, 5)."""
    return (mat(dtype, (2, 4, 3), seed), mat(dtype, (3, 5), seed + 1))


def sq_mats(dtype=torch.float64, seed=0):
    return (mat(dtype, (2, 3, 3), seed), mat(dtype, (4, 4), seed + 1))


CASES += [
    Case("ridge", lambda: pf.ridge(0.7)),
    Case("quadratic", lambda: pf.quadratic(_PSD30, torch.linspace(-1, 1, 30, dtype=torch.float64)), layer),
    Case("huber", lambda: pf.huber(0.8, delta=0.5)),
    Case("neg_entropy", lambda: pf.neg_entropy(0.4)),
    Case("sum_largest", lambda: pf.sum_largest(3, 0.5)),
    Case("max_entry", lambda: pf.max_entry(0.6)),
    Case("hyperplane", lambda: pf.hyperplane(torch.linspace(-1, 2, 30, dtype=torch.float64), 0.3), projection=True),
    Case("halfspace", lambda: pf.halfspace(torch.linspace(-1, 2, 30, dtype=torch.float64), -0.3), projection=True),
    Case("affine", lambda: pf.affine(_A7[:3], _A7[:3] @ torch.ones(30, dtype=torch.float64)), projection=True),
    Case("soc", lambda: pf.soc(), projection=True),
    Case("psd", lambda: pf.psd(), sq_mats, projection=True),
    Case("l2_sphere", lambda: pf.l2_sphere(1.5), convex=False, projection=True),
    Case("l1_sphere", lambda: pf.l1_sphere(2.5), convex=False, projection=True, smooth_grad=False),
    Case("box_hyperplane", lambda: pf.box_hyperplane(-0.5, 0.7, 1.0), projection=True),
    Case("k_sparse", lambda: pf.k_sparse(7), convex=False, projection=True, smooth_grad=False),
    Case("index_l21", lambda: pf.index_l21(_IDX30, 0.5)),
    Case("index_linf1", lambda: pf.index_linf1(_IDX30, 0.4)),
    Case("sparse_group_lasso", lambda: pf.sparse_group_lasso(0.1, 0.3)),
    Case("nuclear", lambda: pf.nuclear(0.5), mats),
    Case("nuclear_ball", lambda: pf.nuclear_ball(2.0), mats, projection=True),
    Case("spectral", lambda: pf.spectral(0.5), mats),
    Case("rank_k", lambda: pf.rank_k(1), mats, convex=False, projection=True),
    Case("l0", lambda: pf.l0(0.2), convex=False, smooth_grad=False),
    Case("group_l0", lambda: pf.group_l0(0.8), convex=False, smooth_grad=False),
    Case("top_k", lambda: pf.top_k(2, group_dim=0), convex=False, projection=True, smooth_grad=False),
    Case(
        "group_top_k", lambda: pf.group_top_k(3, group_dim={"w1": 0, "b1": 0, "w2": 1}), neuron_tree, False, True, False
    ),
    Case("scad", lambda: pf.scad(0.4, a=3.7), convex=False, smooth_grad=False),
    Case("mcp", lambda: pf.mcp(0.4, gamma=2.5), convex=False, smooth_grad=False),
    Case("scale", lambda: pf.scale(pf.l21(0.5), 2.0)),
    Case("precompose", lambda: pf.precompose(pf.l1(0.3), -2.0, 0.5)),
    Case("add_linear", lambda: pf.add_linear(pf.l2(0.3), 0.2)),
    Case("add_quadratic", lambda: pf.add_quadratic(pf.linf(0.3), 1.5, 0.1)),
    Case("conjugate", lambda: pf.conjugate(pf.l2(0.8))),
    Case("moreau_env", lambda: pf.moreau_env(pf.l1(0.5), 0.7)),
]

# ---------------------------------------------------------------- catalog (issue 18)
CASES += [
    Case("tv1d", lambda: pf.tv1d(0.4), smooth_grad=False),
    Case("tv1d_dim0", lambda: pf.tv1d(0.3, dim=0), mats, smooth_grad=False),
    Case("fused_lasso", lambda: pf.fused_lasso(0.4, 0.1), smooth_grad=False),
    Case("log_sum", lambda: pf.log_sum(0.3, eps=0.5), convex=False, smooth_grad=False),
    Case(
        "weighted_nuclear",
        lambda: pf.weighted_nuclear(torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)),
        mats,
        convex=False,
    ),  # fmt: skip
    Case("sparse_simplex", lambda: pf.sparse_simplex(3, 2.0), convex=False, projection=True, smooth_grad=False),
    Case("sparse_l1_ball", lambda: pf.sparse_l1_ball(3, 1.5), convex=False, projection=True, smooth_grad=False),
]
# The iterative operators (sum_of, intersection, birkhoff, tv2d) have float tolerances that are not
# differentiable hyperparameters and an eager early stop that a trace does not take: they are
# tested in tests/test_catalog_combine.py, tests/test_catalog_value.py and tests/test_scale.py.
