"""Euclidean projections: the prox of the indicator of a closed convex set.

For a set ``C`` the operator is ``op(x, step) = argmin_{z in C} ||z - x||^2`` (``step`` is
accepted and ignored), and ``op.value(z)`` is ``0`` for ``z in C`` and ``inf`` otherwise (with
a relative tolerance of a few ulps times the number of entries for sets whose test needs a
reduction). Every set here is taken over the **whole object** given: all leaves of the
pytree together form one vector. For per-row projections use ``torch.func.vmap``::

    rows_on_simplex = torch.vmap(lambda r: pf.simplex()(r, 1.0))(X)

References: Parikh & Boyd (2014) section 6.2; Duchi, Shalev-Shwartz, Singer & Chandra,
*Efficient projections onto the l1-ball for learning in high dimensions*, ICML 2008;
Condat, *Fast projection onto the simplex and the l1 ball*, Math. Programming 2016.
"""

from __future__ import annotations

import torch

from . import _tree
from ._base import Hyper, Prox, check_hyper
from ._util import feasible_tol, indicator, safe_norm, traceable, zeros_like_value
from .kernels import threshold

__all__ = ["Projection", "box", "nonneg", "simplex", "l1_ball", "l2_ball", "linf_ball"]


class Projection(Prox):
    """Base of projections: ``step`` is validated, then ignored."""

    is_projection = True

    def _empty_value(self, leaves):
        return zeros_like_value(leaves)


class box(Projection):  # noqa: N801
    """Projection onto the box ``{z : lower <= z <= upper}`` (entrywise clamp).

    ``lower``/``upper`` are floats (``-inf``/``inf`` allowed) or tensors that broadcast
    against every leaf (per-entry bounds). ``lower <= upper`` is required.
    Parikh & Boyd (2014) section 6.2.1.
    """

    _fields = ("lower", "upper")
    _public_name = "box"
    separable = True

    def __init__(self, lower: Hyper = float("-inf"), upper: Hyper = float("inf")):
        lo = check_hyper("box", "lower", lower, min_value=None, allow_inf=True, scalar=False)
        hi = check_hyper("box", "upper", upper, min_value=None, allow_inf=True, scalar=False)
        if isinstance(lo, float) and isinstance(hi, float):
            if lo > hi:
                raise ValueError(f"box: lower must be <= upper, got lower={lo} > upper={hi}")
        elif not traceable(lo, hi):
            if bool((torch.as_tensor(lo) > torch.as_tensor(hi)).any()):
                raise ValueError("box: lower must be <= upper entrywise")
        self._set(lower=lo, upper=hi)

    def _bound(self, b, x):
        return b.to(device=x.device, dtype=x.dtype) if isinstance(b, torch.Tensor) else b

    def _prox(self, leaves, step, tree):
        out = []
        for x in leaves:
            lo, hi = self._bound(self.lower, x), self._bound(self.upper, x)
            if isinstance(lo, float) and isinstance(hi, float):
                out.append(torch.clamp(x, None if lo == float("-inf") else lo, None if hi == float("inf") else hi))
            else:
                lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
                hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
                out.append(torch.clamp(x, lo_t, hi_t))
        return out

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            lo, hi = self._bound(self.lower, x), self._bound(self.upper, x)
            ok = ok.to(x.device) & ((x >= _widen(lo, x, -1)) & (x <= _widen(hi, x, 1))).all()
        return indicator(ok, zeros_like_value(leaves).dtype)


class nonneg(Projection):  # noqa: N801
    """Projection onto the non-negative orthant ``{z >= 0}``: ``max(x, 0)``. Section 6.2.1."""

    _public_name = "nonneg"
    separable = True

    def _prox(self, leaves, step, tree):
        return [torch.clamp_min(x, 0) for x in leaves]

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            ok = ok.to(x.device) & (x >= 0).all()
        return indicator(ok, zeros_like_value(leaves).dtype)


def _widen(b, x: torch.Tensor, sign: int):
    """A bound widened by one rounding of ``x``'s dtype (a clamp to ``b`` rounds ``b``)."""
    eps = torch.finfo(x.dtype).eps
    if isinstance(b, float):
        return b + sign * eps * abs(b) if abs(b) != float("inf") else b
    return b + sign * eps * b.abs()


def _sum(leaves, fn):
    return _tree.total([_tree.reduce_except(x, None, fn)[0] for x in leaves], leaves)


def _numel(leaves) -> int:
    return sum(x.numel() for x in leaves)


class simplex(Projection):  # noqa: N801
    """Projection onto the simplex ``{z : z >= 0, sum(z) = radius}``, ``radius > 0``.

        op(x) = max(x - theta, 0),   theta such that sum(max(x - theta, 0)) = radius.

    ``theta`` is found exactly without sorting (Michelot 1986; Condat 2016), over all leaves
    together. Held, Wolfe & Crowder (1974); Duchi et al. (2008).
    """

    _fields = ("radius",)
    _public_name = "simplex"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("simplex", "radius", radius, strict=True))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        parts = [(x.to(_tree.acc_dtype(x)), None) for x in leaves]
        theta = threshold(parts, self.radius, traceable=traceable(self.radius, *leaves))
        return [torch.clamp_min(x.to(theta.dtype) - theta, 0).to(x.dtype) for x in leaves]

    def _value(self, leaves, tree):
        if not leaves:
            return indicator(torch.zeros((), dtype=torch.bool), torch.get_default_dtype())
        ok = torch.ones((), dtype=torch.bool, device=leaves[0].device)
        for x in leaves:
            ok = ok & (x >= 0).all()
        s = _sum(leaves, "sum")
        tol = feasible_tol(leaves[0], _numel(leaves))
        ok = ok & ((s - self.radius).abs() <= tol * (abs(self.radius) + s.abs()))
        return indicator(ok, s.dtype)


class l1_ball(Projection):  # noqa: N801
    """Projection onto the l1 ball ``{z : ||z||_1 <= radius}``, ``radius >= 0``.

        op(x) = x                                  if ||x||_1 <= radius (bit for bit)
        op(x) = sign(x) * max(|x| - tau, 0)        otherwise, sum(max(|x| - tau, 0)) = radius.

    Computed as ``x - clamp(x, -tau, tau)`` with ``tau = 0`` inside, so interior points are
    never moved. Sort-free exact threshold (Michelot; Condat 2016); Duchi et al. (2008).
    """

    _fields = ("radius",)
    _public_name = "l1_ball"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("l1_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        parts = [(x.to(_tree.acc_dtype(x)), None) for x in leaves]
        tau = threshold(parts, self.radius, traceable=traceable(self.radius, *leaves), absolute=True).clamp_min(0)
        out = []
        for x in leaves:
            xa = x.to(tau.dtype)
            out.append((xa - torch.clamp(xa, -tau, tau)).to(x.dtype))
        return out

    def _value(self, leaves, tree):
        if not leaves:
            return self._empty_value(leaves)
        s = _sum(leaves, "abssum")
        tol = feasible_tol(leaves[0], _numel(leaves))
        return indicator(s <= self.radius + tol * (abs(self.radius) + s), s.dtype)


class l2_ball(Projection):  # noqa: N801
    """Projection onto the Euclidean ball ``{z : ||z||_2 <= radius}``, ``radius >= 0``.

        op(x) = x * min(1, radius / ||x||_2)   (the norm over all leaves together).

    Points inside are returned unchanged. Parikh & Boyd (2014) section 6.2.3 (via 6.5.1).
    """

    _fields = ("radius",)
    _public_name = "l2_ball"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("l2_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        n = safe_norm(_sum(leaves, "sumsq"))
        r = self.radius
        scale = torch.where(n > r, r / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
        return [torch.where(n > r, x.to(scale.dtype) * scale, x.to(scale.dtype)).to(x.dtype) for x in leaves]

    def _value(self, leaves, tree):
        if not leaves:
            return self._empty_value(leaves)
        n = safe_norm(_sum(leaves, "sumsq"))
        tol = feasible_tol(leaves[0], _numel(leaves))
        return indicator(n <= self.radius + tol * (abs(self.radius) + n), n.dtype)


class linf_ball(Projection):  # noqa: N801
    """Projection onto the max-norm ball ``{z : max|z_j| <= radius}``: ``clamp(x, -r, r)``."""

    _fields = ("radius",)
    _public_name = "linf_ball"
    separable = True

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("linf_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        r = self.radius
        if isinstance(r, float):
            return [torch.clamp(x, -r, r) for x in leaves]
        return [torch.clamp(x, -r.to(x.dtype), r.to(x.dtype)) for x in leaves]

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            ok = ok.to(x.device) & (x.abs() <= _widen(self.radius, x, 1)).all()
        return indicator(ok, zeros_like_value(leaves).dtype)
