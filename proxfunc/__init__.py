"""proxfunc: pure proximal operators for PyTorch pytrees, built for ``torch.func``.

``op = pf.l21(reg)`` makes an operator; ``op(params, step)`` returns
``argmin_z f(z) + ||z - params||^2 / (2 * step)`` for a tensor or any pytree of tensors,
without mutating ``params``; ``op.value(params)`` returns ``f(params)``.
In-place use on modules, the seed's API and an optimizer wrapper live in
:mod:`proxfunc.compat`.
"""

from . import autosize
from ._base import Prox
from .calculus import chain, identity, partition
from .groups import l21, linf1
from .norms import elastic_net, l1, l2, linf, log_barrier
from .projections import box, l1_ball, l2_ball, linf_ball, nonneg, simplex
from .solvers import ProxGradResult, ProxGradState, ProximalGradient, prox_adam, prox_sgd, proximal_gradient

__version__ = "0.1.0.dev0"

__all__ = [
    "Prox",
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
    "prox_sgd",
    "prox_adam",
]
