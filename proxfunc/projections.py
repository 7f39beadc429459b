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

import math

import torch

from . import _tree, dispatch
from ._base import Hyper, Prox, check_hyper
from ._util import clamp, feasible_tol, indicator, norm_parts, scaled_norm, traceable, zeros_like_value
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

    Args:
        lower: lower bound, a float (``-inf`` allowed) or a tensor broadcasting against every leaf.
        upper: upper bound, likewise; ``lower <= upper``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.box(-1.0, 1.0)(torch.tensor([-2.0, 0.5, 3.0]))
        tensor([-1.0000,  0.5000,  1.0000])
    """

    _hyper_names = ("lower", "upper")
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
        if isinstance(b, torch.Tensor):
            try:
                torch.broadcast_shapes(b.shape, x.shape)
            except RuntimeError:
                raise ValueError(
                    f"box: a bound of shape {tuple(b.shape)} does not broadcast with params of shape {tuple(x.shape)}"
                ) from None
            return b.to(device=x.device, dtype=x.dtype)
        return _in_range(b, x)

    def _prox(self, leaves, step, tree):
        out = []
        for x in leaves:
            lo, hi = self._bound(self.lower, x), self._bound(self.upper, x)
            if isinstance(lo, float) and isinstance(hi, float):
                lo_f = None if lo == float("-inf") else lo
                hi_f = None if hi == float("inf") else hi
                # box() with both bounds infinite is the identity (torch.clamp refuses two Nones)
                out.append(x if lo_f is None and hi_f is None else clamp(x, lo_f, hi_f))
            else:
                lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
                hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
                out.append(clamp(x, lo_t, hi_t))
        return out

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            lo, hi = self._bound(self.lower, x), self._bound(self.upper, x)
            ok = ok.to(x.device) & ((x >= _widen(lo, x, -1)) & (x <= _widen(hi, x, 1))).all()
        return indicator(ok, zeros_like_value(leaves).dtype)


class nonneg(Projection):  # noqa: N801
    """Projection onto the non-negative orthant ``{z >= 0}``: ``max(x, 0)``. Section 6.2.1.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.nonneg()(torch.tensor([-2.0, 0.5]))
        tensor([0.0000, 0.5000])
    """

    _public_name = "nonneg"
    separable = True

    def _prox(self, leaves, step, tree):
        return [clamp(x, 0.0, None) for x in leaves]

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


def _with_headroom(leaves: list[torch.Tensor], radius: Hyper, project) -> list[torch.Tensor]:
    """``project(leaves, radius)``, a projection onto an l1-type set (sums of ``|x|``), computed as
    ``s * project(leaves / s, radius / s)`` (exact: the set scales with its radius) with ``s`` a
    power of two large enough that no sum over the leaves overflows their accumulation dtype, where
    ``numel * max|x|`` comes near its largest value; ``s = 1`` (no rescaling) otherwise. Eager: one
    host read of ``max|x|``; traced: ``s`` is a tensor, 1 for ordinary inputs (a division by 1)."""
    dt = _tree.common_acc_dtype(leaves)
    big = torch.finfo(dt).max / (4 * max(_numel(leaves), 1))
    m = None
    for x in leaves:
        if x.numel():
            a = x.detach().abs().amax().to(dt)
            m = a if m is None else torch.maximum(m, a)
    if m is None:
        return project(leaves, radius)
    if not traceable(*leaves):
        mf = float(m)
        if not mf > big or mf == float("inf"):
            return project(leaves, radius)
        s = 2.0 ** math.ceil(math.log2(mf / big))
        out = project([x / s for x in leaves], radius / s)
        return [(z * s).to(x.dtype) for z, x in zip(out, leaves)]
    need = (m > big) & (m < float("inf"))
    s = torch.exp2(torch.ceil(torch.log2(torch.where(need, m / big, torch.ones_like(m)))))
    out = project([x / s.to(x.dtype) for x in leaves], radius / s)
    return [(z * s.to(z.dtype)).to(x.dtype) for z, x in zip(out, leaves)]


def _in_range(b: float, x: torch.Tensor) -> float:
    """A bound as ``clamp`` on ``x`` takes it: beyond the largest finite value of ``x``'s dtype
    (``1e6`` on float16) it is ``+-inf``, which clamps every representable value the same way
    (ATen refuses to convert such a number to the dtype)."""
    big = torch.finfo(x.dtype).max
    return b if -big <= b <= big else (float("inf") if b > 0 else float("-inf"))


def _sum(leaves, fn):
    return _tree.total([_tree.reduce_except(x, None, fn)[0] for x in leaves], leaves)


def _numel(leaves) -> int:
    return sum(x.numel() for x in leaves)


def _polish_sum(d: list[torch.Tensor], radius: Hyper, in_place: bool = False) -> list[torch.Tensor]:
    """``max(d, 0)`` corrected once so that its sum is ``radius`` to rounding (``d = v - theta``).

    ``max(v - theta, 0)`` inherits the absolute error of ``theta`` (about ``eps * max v``),
    which is large relative to ``radius`` when ``radius << max v`` (``v = 5``, ``radius =
    1e-10``: the float32 result would be 0). Shifting the active entries (``v >= theta``) by the
    common ``(radius - sum) / k`` removes that error, which is common to all of them.
    (A polish, not a new method: the threshold stays the exact sort-free one.)

    With ``in_place`` (eager, nothing to differentiate, ``d`` fresh tensors) the same
    operations overwrite ``d``, bit for bit: an inactive entry has ``d < cut <= 0``, so its
    ``max(d, 0)`` is 0 and a multiplication by the mask stands for the ``where``.
    """
    # the active set is never empty: when rounding put theta a hair above the largest entry
    # (radius below eps * max v, e.g. on tied maxima) the largest entries are the active ones
    tops = [di.amax() for di in d if di.numel()]
    if tops:
        top = tops[0]
        for tp in tops[1:]:
            top = torch.maximum(top, tp.to(top.dtype))
        cut = top.clamp(max=0)
        act = [di >= cut.to(di.dtype) for di in d]
    z = [di.clamp_min_(0) if in_place else di.clamp_min(0) for di in d]
    if not tops:
        return z
    s = _tree.total([zi.sum() for zi in z], z)
    k = _tree.total([a.sum().to(s.dtype) for a in act], z)
    k = k.clamp_min(1)
    # (z - s/k) + r/k rather than z + (r - s)/k: exact when r is far below s's rounding
    mean, share = s / k, radius / k
    if in_place:
        return [zi.sub_(mean.to(zi.dtype)).add_(share).clamp_min_(0).mul_(a) for zi, a in zip(z, act)]
    return [torch.where(a, ((zi - mean.to(zi.dtype)) + share).clamp_min(0), zi) for zi, a in zip(z, act)]


def _l1_ball_eager(leaves: list[torch.Tensor], radius: Hyper) -> list[torch.Tensor]:
    """``l1_ball`` on the eager path with nothing to differentiate: the same operations as the
    differentiable path, bit for bit, written into one fresh ``|x|`` per leaf.

    The differentiable path allocates about a dozen full-size temporaries; each is a fresh
    page-faulted buffer on large inputs, which cost more than the arithmetic.
    """
    # the threshold's dtype: the differentiable path promotes every leaf to it before the polish
    dtype = _tree.common_acc_dtype(leaves)
    mags = [_tree.cast(x, dtype).abs() for x in leaves]
    tau = threshold([(m, None) for m in mags], radius, traceable=False).clamp_min(0).reshape(())
    if bool(tau <= 0):  # inside the ball: x comes back bit for bit (as a new tensor)
        return [x.clone() for x in leaves]
    mags = _polish_sum([m.sub_(tau.to(m.dtype)) for m in mags], radius, in_place=True)
    return [_tree.cast(torch.copysign(m, x, out=m), x.dtype) for m, x in zip(mags, leaves)]


class simplex(Projection):  # noqa: N801
    """Projection onto the simplex ``{z : z >= 0, sum(z) = radius}``, ``radius > 0``.

        op(x) = max(x - theta, 0),   theta such that sum(max(x - theta, 0)) = radius.

    ``theta`` is found exactly without sorting (Michelot 1986; Condat 2016), over all leaves
    together. Held, Wolfe & Crowder (1974); Duchi et al. (2008).

    Args:
        radius: the sum of the result, ``> 0``, over all leaves together.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.simplex()(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])
    """

    _hyper_names = ("radius",)
    _public_name = "simplex"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("simplex", "radius", radius, strict=True))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        return _with_headroom(leaves, self.radius, self._project)

    def _project(self, leaves, radius):
        impl, r = dispatch.select(leaves, radius)
        eager = impl != dispatch.REFERENCE
        parts = [(x.to(_tree.acc_dtype(x)), None) for x in leaves]
        # one group (the whole object): a 0-d threshold, so 0-d leaves keep their shape
        theta = threshold(parts, r, traceable=not eager).reshape(())
        # x - theta is a fresh tensor: on the eager path the polish may overwrite it
        z = _polish_sum([x.to(theta.dtype) - theta for x in leaves], r, eager)
        return [zi.to(x.dtype) for zi, x in zip(z, leaves)]

    def _value(self, leaves, tree):
        if not leaves:
            return indicator(torch.zeros((), dtype=torch.bool), torch.get_default_dtype())
        ok = torch.ones((), dtype=torch.bool, device=leaves[0].device)
        for x in leaves:
            ok = ok & (x >= 0).all()
        s = _sum(leaves, "sum")
        tol = feasible_tol(list(leaves), _numel(leaves))
        ok = ok & ((s - self.radius).abs() <= tol * (abs(self.radius) + s.abs()))
        return indicator(ok, s.dtype)


class l1_ball(Projection):  # noqa: N801
    """Projection onto the l1 ball ``{z : ||z||_1 <= radius}``, ``radius >= 0``.

        op(x) = x                                  if ||x||_1 <= radius (bit for bit)
        op(x) = sign(x) * max(|x| - tau, 0)        otherwise, sum(max(|x| - tau, 0)) = radius.

    Computed as ``x - clamp(x, -tau, tau)`` with ``tau = 0`` inside, so interior points are
    never moved. Sort-free exact threshold (Michelot; Condat 2016); Duchi et al. (2008).

    Args:
        radius: radius of the ball, ``>= 0``, over all leaves together.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l1_ball(1.0)(torch.tensor([3.0, -1.0, 0.5]))
        tensor([1., -0., 0.])
    """

    _hyper_names = ("radius",)
    _public_name = "l1_ball"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("l1_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        return _with_headroom(leaves, self.radius, self._project)

    def _project(self, leaves, radius):
        impl, r = dispatch.select(leaves, radius)
        if impl != dispatch.REFERENCE:
            return _l1_ball_eager(leaves, r)
        parts = [(x.to(_tree.acc_dtype(x)), None) for x in leaves]
        tau = threshold(parts, radius, traceable=True, absolute=True)
        tau = tau.clamp_min(0).reshape(())
        xs = [x.to(tau.dtype) for x in leaves]
        mags = _polish_sum([xa.abs() - tau for xa in xs], radius)
        # tau == 0 inside the ball: x comes back bit for bit (no polish there)
        inside = tau <= 0
        return [torch.where(inside, xa, torch.copysign(m, xa)).to(x.dtype) for xa, m, x in zip(xs, mags, leaves)]

    def _value(self, leaves, tree):
        if not leaves:
            return self._empty_value(leaves)
        s = _sum(leaves, "abssum")
        tol = feasible_tol(list(leaves), _numel(leaves))
        return indicator(s <= self.radius + tol * (abs(self.radius) + s), s.dtype)


class l2_ball(Projection):  # noqa: N801
    """Projection onto the Euclidean ball ``{z : ||z||_2 <= radius}``, ``radius >= 0``.

        op(x) = x * min(1, radius / ||x||_2)   (the norm over all leaves together).

    Points inside are returned unchanged. Parikh & Boyd (2014) section 6.2.3 (via 6.5.1).

    Args:
        radius: radius of the ball, ``>= 0``, over all leaves together.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l2_ball(1.0)(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """

    _hyper_names = ("radius",)
    _public_name = "l2_ball"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("l2_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        m, nu = norm_parts(list(leaves))  # ||x|| = m * nu: no overflow of the squares (nor of the norm)
        n = m * nu
        r = self.radius
        d = torch.where(n > r, nu, torch.ones_like(nu))  # x / m / nu * r: r / n may underflow, n overflow
        return [torch.where(n > r, x.to(n.dtype) / m / d * r, x.to(n.dtype)).to(x.dtype) for x in leaves]

    def _value(self, leaves, tree):
        if not leaves:
            return self._empty_value(leaves)
        n = scaled_norm(list(leaves))
        tol = feasible_tol(list(leaves), _numel(leaves))
        return indicator(n <= self.radius + tol * (abs(self.radius) + n), n.dtype)


class linf_ball(Projection):  # noqa: N801
    """Projection onto the max-norm ball ``{z : max|z_j| <= radius}``: ``clamp(x, -r, r)``.

    Args:
        radius: radius of the ball, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.linf_ball(1.0)(torch.tensor([3.0, -0.5]))
        tensor([ 1.0000, -0.5000])
    """

    _hyper_names = ("radius",)
    _public_name = "linf_ball"
    separable = True

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("linf_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        r = self.radius
        if isinstance(r, float):
            return [clamp(x, -_in_range(r, x), _in_range(r, x)) for x in leaves]
        return [clamp(x, -r.to(x.dtype), r.to(x.dtype)) for x in leaves]

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            ok = ok.to(x.device) & (x.abs() <= _widen(self.radius, x, 1)).all()
        return indicator(ok, zeros_like_value(leaves).dtype)
