"""proxfunc: pure proximal operators for PyTorch pytrees, built for ``torch.func``.

``op = pf.l21(reg)`` makes an operator; ``op(params, step)`` returns
``argmin_z f(z) + ||z - params||^2 / (2 * step)`` for a tensor or any pytree of tensors,
without mutating ``params``; ``op.value(params)`` returns ``f(params)``.
Which implementation computes an operator (the reference math, ATen eager kernels or a
hand-written kernel) is decided in one place, :func:`proxfunc.dispatch.select`.
In-place use on modules, the seed's API and an optimizer wrapper live in
:mod:`proxfunc.compat`.
"""

from . import autosize, dispatch
from ._base import Prox
from .calculus import add_linear, add_quadratic, chain, conjugate, identity, moreau_env, partition, precompose, scale
from .combine import birkhoff, intersection, sum_of, tv2d
from .groups import l21, linf1
from .implicit import argmin
from .index_groups import index_l21, index_linf1, sparse_group_lasso
from .matrix import nuclear, nuclear_ball, rank_k, spectral, weighted_nuclear
from .nonconvex import group_l0, group_top_k, l0, log_sum, mcp, scad, top_k
from .norms import elastic_net, l1, l2, linf, log_barrier
from .projections import box, l1_ball, l2_ball, linf_ball, nonneg, simplex
from .sets import (
    affine,
    box_hyperplane,
    halfspace,
    hyperplane,
    k_sparse,
    l1_sphere,
    l2_sphere,
    psd,
    soc,
    sparse_l1_ball,
    sparse_simplex,
)
from .smooth import huber, max_entry, neg_entropy, quadratic, ridge, sum_largest
from .solvers import ProxGradResult, ProxGradState, ProximalGradient, prox_adam, prox_sgd, proximal_gradient
from .tv import fused_lasso, tv1d
from .working_sets import LeastSquaresResult, least_squares

__version__ = "0.1.0.dev0"

__all__ = [
    "Prox",
    "dispatch",
    # norms and penalties
    "l1",
    "l2",
    "linf",
    "elastic_net",
    "log_barrier",
    # groups
    "l21",
    "linf1",
    # projections
    "box",
    "nonneg",
    "simplex",
    "l1_ball",
    "l2_ball",
    "linf_ball",
    # combinators
    "identity",
    "chain",
    "partition",
    # auto-sizing (module analysis, report, shrink)
    "autosize",
    # solvers and training-loop steps
    "proximal_gradient",
    "ProximalGradient",
    "ProxGradState",
    "ProxGradResult",
    "argmin",
    "least_squares",
    "LeastSquaresResult",
    "prox_sgd",
    "prox_adam",
    # catalog: smooth terms and order statistics
    "ridge",
    "quadratic",
    "huber",
    "neg_entropy",
    "sum_largest",
    "max_entry",
    # catalog: sets
    "hyperplane",
    "halfspace",
    "affine",
    "soc",
    "psd",
    "l2_sphere",
    "l1_sphere",
    "box_hyperplane",
    "k_sparse",
    "sparse_simplex",
    "sparse_l1_ball",
    # catalog: index groups
    "index_l21",
    "index_linf1",
    "sparse_group_lasso",
    # catalog: matrices
    "nuclear",
    "nuclear_ball",
    "spectral",
    "rank_k",
    "weighted_nuclear",
    # catalog: non-convex (pruning)
    "l0",
    "group_l0",
    "top_k",
    "group_top_k",
    "scad",
    "mcp",
    "log_sum",
    # catalog: calculus rules
    "scale",
    "precompose",
    "add_linear",
    "add_quadratic",
    "conjugate",
    "moreau_env",
    # catalog: total variation
    "tv1d",
    "fused_lasso",
    "tv2d",
    # catalog: by iteration (no closed form)
    "sum_of",
    "intersection",
    "birkhoff",
]
