"""Norms and separable penalties: l1, l2, linf, elastic net, log barrier.

Every operator here follows the contract of :class:`proxfunc.Prox`:
``op(params, step) = argmin_z f(z) + ||z - params||^2 / (2 * step)`` with ``f`` defined on
the **whole object** given (all leaves of the pytree together).

References: N. Parikh and S. Boyd, *Proximal Algorithms*, Foundations and Trends in
Optimization 1(3), 2014 (section numbers below refer to it).
"""

from __future__ import annotations

from functools import partial

import torch

from . import _tree
from ._base import Hyper, Prox, _is_compiling, check_hyper
from ._util import block_scale, eager_nograd, safe_norm, traceable, zeros_like_value
from .kernels import soft, threshold

__all__ = ["l1", "l2", "linf", "elastic_net", "log_barrier", "Elementwise", "soft_threshold"]


_INPLACE_DTYPES = (torch.float32, torch.float64)
_softshrink = torch._C._nn.softshrink  # F.softshrink without the Python wrapper, for ``out=``


def _writable(leaves: list[torch.Tensor]) -> bool:
    """Every leaf float32/float64 and contiguous: what the in-place writers overwrite."""
    return all(x.dtype in _INPLACE_DTYPES and x.is_contiguous() for x in leaves)


def _noop() -> None:
    return None


def _shrink_all(mine: list[torch.Tensor], rest: list[torch.Tensor], t: float) -> None:
    """``x <- softshrink(x, t)``: the C kernel for ``mine`` (:mod:`proxfunc.kernels.soft`),
    one ATen ``softshrink`` per tensor of ``rest``."""
    if mine:
        soft.shrink_(mine, t)
    for x in rest:
        _softshrink(x, t, out=x)


def _cpu_split(leaves: list[torch.Tensor], t: Hyper) -> tuple[list[int], list[int]]:
    """Indices of the leaves the CPU soft-threshold kernel takes, and of the others."""
    if isinstance(t, float) and t > 0 and leaves and eager_nograd(t, leaves):
        return soft.split(leaves, t)
    return [], list(range(len(leaves)))


#: Devices where many leaves go through ``torch._foreach_*`` (fused multi-tensor kernels).
#: Not the CPU: there the foreach ops loop over tensors in C++ with three passes, which was
#: measured 1.5-4x slower than one fused ``softshrink`` per tensor (benchmarks/README.md).
_FOREACH_DEVICES = ("cuda",)


def _foreach_device(leaves: list[torch.Tensor]) -> bool:
    """Two or more float32/float64 leaves on one device where foreach kernels pay."""
    if len(leaves) < 2 or leaves[0].device.type not in _FOREACH_DEVICES:
        return False
    first = leaves[0]
    return all(x.device == first.device and x.dtype in _INPLACE_DTYPES for x in leaves)


def _foreach_ok(leaves: list[torch.Tensor], t: Hyper) -> bool:
    if not isinstance(t, float) or t <= 0:
        return False
    return _foreach_device(leaves) and eager_nograd(t, leaves)


def _foreach_clamped(leaves: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    """``clamp(x, -t, t)`` for every leaf in two multi-tensor launches. ``x - clamp(x, -t, t)``
    equals ``softshrink(x, t)`` bit for bit (both are ``x -/+ t`` or exactly ``+0``)."""
    clamped = torch._foreach_clamp_max(leaves, t)
    torch._foreach_clamp_min_(clamped, -t)
    return clamped


def _shrink_all_foreach(leaves: list[torch.Tensor], t: float) -> None:
    torch._foreach_sub_(leaves, _foreach_clamped(leaves, t))


def soft_threshold(x: torch.Tensor, t: Hyper) -> torch.Tensor:
    """``sign(x) * max(|x| - t, 0)`` in one kernel when ``t`` is a float.

    Computed in float32 for float16/bfloat16 inputs and rounded once at the end.
    """
    if isinstance(t, float) and t > 0 and x.dtype not in _tree.LOW_DTYPES:
        return _softshrink(x, t)  # the hot path: one kernel, no dtype round trips
    acc = _tree.acc_dtype(x)
    xa = x.to(acc)
    if isinstance(t, float):
        out = _softshrink(xa, t) if t > 0 else xa
    elif _is_compiling():
        # For t > 0 the same values bit for bit as below (``x - t``, ``x + t`` as ``-x - t`` is
        # ``-(x + t)``, or ``+0``; NaN kept) and the same gradients away from the kinks
        # ``|x| = t`` (there relu gives ``x`` 0; clamp gives 0 under torch 2.13, 0.5 under
        # 2.14, which splits ties; all are subgradients), in the form inductor's CPU
        # code vectorizes best: its ``relu`` is one ``max`` instruction, its ``clamp`` a
        # NaN-checking ``maximum`` + ``minimum``. Compiled in-place step on the 48-tensor MLP:
        # 0.29 -> 0.21 ms (benchmarks/README.md, session 6).
        t = t.to(acc)
        out = torch.relu(xa - t) - torch.relu(-xa - t)
    else:
        t = t.to(acc)
        out = xa - torch.clamp(xa, -t, t)
    return out.to(x.dtype)


class Elementwise(Prox):
    """A separable ``f(z) = sum_j g(z_j)``: the prox acts on each entry on its own."""

    separable = True

    def _prox(self, leaves, step, tree):
        return [self._prox_leaf(x, step) for x in leaves]

    def _value(self, leaves, tree):
        parts = [self._value_leaf(x) for x in leaves]
        return _tree.total(parts, leaves) if parts else zeros_like_value(leaves)

    def _prox_leaf(self, x: torch.Tensor, step: Hyper) -> torch.Tensor:
        raise NotImplementedError

    def _value_leaf(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class l1(Elementwise):  # noqa: N801 - public operator names are lower case, like torch.nn.functional
    """Prox of the l1 norm (soft thresholding).

    ``f(z) = reg * sum_j |z_j|`` over every entry of every leaf, and

        op(x, t) = argmin_z reg*||z||_1 + ||z - x||^2 / (2t) = sign(x) * max(|x| - reg*t, 0).

    Separable, so leaf structure does not matter. Parikh & Boyd (2014), section 6.5.2.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l1(0.5)(torch.tensor([-2.0, 0.3, 1.0]), 1.0)
        tensor([-1.5000,  0.0000,  0.5000])
    """

    _fields = ("reg",)
    _public_name = "l1"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("l1", "reg", reg))

    def _prox(self, leaves, step, tree):
        t = self.reg * step  # once for all leaves
        if _foreach_ok(leaves, t):  # three multi-tensor launches instead of one kernel per leaf
            return list(torch._foreach_sub(leaves, _foreach_clamped(leaves, t)))
        mine, rest = _cpu_split(leaves, t)
        if not mine:
            return [soft_threshold(x, t) for x in leaves]
        out: list[torch.Tensor] = [None] * len(leaves)  # type: ignore[list-item]
        for i, y in zip(mine, soft.shrink([leaves[i] for i in mine], t)):  # one C call for all
            out[i] = y
        for i in rest:
            out[i] = soft_threshold(leaves[i], t)
        return out

    def _writer(self, leaves, step):
        t = self.reg * step
        if not isinstance(t, float):
            return None
        if t == 0:
            return _noop  # the identity
        # The same kernels as the functional hot path (bit-identical results), writing into x.
        if t > 0 and _writable(leaves):
            if _foreach_device(leaves):
                return partial(_shrink_all_foreach, leaves, t)
            mine, rest = _cpu_split(leaves, t)  # decided now: the writer itself cannot fail
            return partial(_shrink_all, [leaves[i] for i in mine], [leaves[i] for i in rest], t)
        return None

    def _value_leaf(self, x):
        return self.reg * _tree.reduce_except(x, None, "abssum")[0]


class elastic_net(Elementwise):  # noqa: N801
    """Prox of the elastic net penalty.

    ``f(z) = reg * (||z||_1 + gamma/2 * ||z||_2^2)``, and

        op(x, t) = soft_threshold(x, reg*t) / (1 + reg*gamma*t).

    Parikh & Boyd (2014), section 6.5.3 (Zou & Hastie 2005). ``gamma >= 0``; ``gamma = 0`` is l1.
    """

    _fields = ("reg", "gamma")
    _public_name = "elastic_net"

    def __init__(self, reg: Hyper = 1.0, gamma: Hyper = 1.0):
        self._set(reg=check_hyper("elastic_net", "reg", reg), gamma=check_hyper("elastic_net", "gamma", gamma))

    def _prox_leaf(self, x, step):
        t = self.reg * step
        shrink = 1.0 + t * self.gamma
        y = soft_threshold(x, t).to(_tree.acc_dtype(x))
        return (y / shrink).to(x.dtype)

    def _value_leaf(self, x):
        a = _tree.reduce_except(x, None, "abssum")[0]
        q = _tree.reduce_except(x, None, "sumsq")[0]
        return self.reg * (a + 0.5 * self.gamma * q)


class log_barrier(Elementwise):  # noqa: N801
    """Prox of the logarithmic barrier of the positive orthant.

    ``f(z) = -reg * sum_j log(z_j)`` (``+inf`` unless every ``z_j > 0``), ``reg > 0``, and

        op(x, t) = (x + sqrt(x^2 + 4*reg*t)) / 2,

    evaluated as ``2*reg*t / (sqrt(x^2 + 4*reg*t) - x)`` for ``x < 0`` so that large negative
    entries keep full relative accuracy. Parikh & Boyd (2014), section 6.1.2 (the seed's
    ``logbarrier``).
    """

    _fields = ("reg",)
    _public_name = "log_barrier"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("log_barrier", "reg", reg, strict=True))

    def _prox_leaf(self, x, step):
        acc = _tree.acc_dtype(x)
        xa = x.to(acc)
        rt = self.reg * step
        c = torch.sqrt(torch.as_tensor(4.0 * rt, dtype=acc, device=x.device))
        h = torch.hypot(xa, c)  # sqrt(x^2 + 4rt) without overflow
        neg = xa < 0
        denom = torch.where(neg, h - xa, torch.ones_like(xa))
        z = torch.where(neg, 2.0 * rt / denom, 0.5 * (xa + h))
        return z.to(x.dtype)

    def _value_leaf(self, x):
        xa = x.to(_tree.acc_dtype(x))
        pos = xa > 0
        logs = torch.log(torch.where(pos, xa, torch.ones_like(xa))).sum()
        return torch.where(pos.all(), -self.reg * logs, float("inf"))


class l2(Prox):
    """Prox of the Euclidean norm of the whole object (block soft thresholding).

    ``f(z) = reg * ||z||_2`` where the norm is taken over **all leaves together**, and

        op(x, t) = max(1 - reg*t / ||x||_2, 0) * x.

    The seed's ``l2(weight, bias)`` is ``pf.l2(reg)((weight, bias), lr)`` (with the seed's bias
    bug fixed: the bias is scaled by the same factor). Parikh & Boyd (2014), section 6.5.1.
    """

    _fields = ("reg",)
    _public_name = "l2"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("l2", "reg", reg))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        sq = _tree.total([_tree.reduce_except(x, None, "sumsq")[0] for x in leaves], leaves)
        n = safe_norm(sq)
        t = self.reg * step
        scale = block_scale(n, t)
        return [_tree.cast(_tree.cast(x, scale.dtype) * scale, x.dtype) for x in leaves]

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        sq = _tree.total([_tree.reduce_except(x, None, "sumsq")[0] for x in leaves], leaves)
        return self.reg * safe_norm(sq)


class linf(Prox):
    """Prox of the max-norm of the whole object.

    ``f(z) = reg * max_j |z_j|`` over all entries of all leaves. By the Moreau identity
    ``op(x, t) = x - P_{||.||_1 <= reg*t}(x) = clamp(x, -tau, tau)``, where ``tau`` is the
    threshold of the projection onto the l1 ball of radius ``reg*t`` (``tau = max|x|``, the
    identity, when ``reg*t = 0``). Parikh & Boyd (2014), sections 2.5 and 6.5.2; the l1-ball
    threshold is found without sorting (see :mod:`proxfunc.kernels.threshold`).
    """

    _fields = ("reg",)
    _public_name = "linf"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("linf", "reg", reg))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        t = self.reg * step
        parts = [(_tree.cast(x, _tree.acc_dtype(x)), None) for x in leaves]
        tau = threshold(parts, t, traceable=traceable(t, *leaves), absolute=True).clamp_min(0)
        return [_clamp_sym(x, tau, None) for x in leaves]

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        return self.reg * _tree.maximum([_tree.reduce_except(x, None, "amax_abs")[0] for x in leaves])


def _clamp_sym(x: torch.Tensor, tau: torch.Tensor, d: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(x, -tau, tau)`` with ``tau`` per group along dim ``d``, in the accumulation dtype
    (``out``: written there, for a float32/float64 ``x`` whose dtype ``tau`` shares)."""
    acc = torch.promote_types(_tree.acc_dtype(x), tau.dtype)
    tb = _tree.along(_tree.cast(tau, acc), x, d)
    if out is not None:
        return torch.clamp(x, -tb, tb, out=out)
    return _tree.cast(torch.clamp(_tree.cast(x, acc), -tb, tb), x.dtype)
