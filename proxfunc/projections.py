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
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import _tree, dispatch
from ._base import Hyper, Prox, check_hyper, check_hyper_tree, is_scalar_hyper
from ._util import (
    clamp,
    feasible_tol,
    indicator,
    leaf_hypers,
    norm_parts,
    scaled_norm,
    traceable,
    zeros_like_value,
)
from .kernels import threshold

__all__ = ["Projection", "box", "nonneg", "simplex", "l1_ball", "l2_ball", "linf_ball"]


class Projection(Prox):
    """Base of projections: ``step`` is validated, then ignored."""

    is_projection = True

    def _empty_value(self, leaves):
        return zeros_like_value(leaves)


class box(Projection):  # noqa: N801
    """Projection onto the box ``{z : lower <= z <= upper}`` (entrywise clamp).

    Each bound is one of

    * a number (``-inf``/``inf`` allowed, ``None`` for no bound on that side): the same for
      every entry;
    * a floating tensor that broadcasts to each leaf's shape: per-entry bounds (a row of bounds
      for every row of a weight, one bound per output neuron as a column, ...);
    * a pytree with the structure of ``params`` (the same dicts, lists and tuples, ``None``
      where ``params`` has ``None``), one number, tensor or ``None`` (no bound) per leaf.

    ``lower <= upper`` entrywise (``lower == upper`` pins an entry); NaN bounds are refused.
    Both are checked when the operator is made, wherever their values can be read (not for
    tensors being traced or transformed); a tensor bound that does not broadcast to its leaf,
    or a pytree bound of another structure, raises ``ValueError`` at the call. Tensor bounds
    are hyperparameters like any other: the projection is differentiable with respect to
    them (``d op(x) / d lower = 1`` where ``x`` is clamped to ``lower``, 0 elsewhere), also
    under ``torch.func`` transforms and ``torch.compile``. A bound is rounded to each leaf's
    dtype, as ``torch.clamp`` rounds it; ``value`` tests ``lower <= z <= upper`` up to that
    rounding. Parikh & Boyd (2014) section 6.2.1.

    Args:
        lower: lower bound: a number (``-inf`` or ``None``: unbounded below), a tensor
            broadcasting to every leaf, or a pytree matching ``params``.
        upper: upper bound, likewise (``inf`` or ``None``: unbounded above); ``lower <= upper``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.box(-1.0, 1.0)(torch.tensor([-2.0, 0.5, 3.0]))
        tensor([-1.0000,  0.5000,  1.0000])
        >>> params = {"w": torch.tensor([[-2.0, 3.0], [0.5, 9.0]]), "b": torch.tensor([-4.0, 4.0])}
        >>> op = pf.box({"w": torch.tensor([0.0, -1.0]), "b": None}, {"w": 2.0, "b": 1.0})
        >>> op(params)["w"]     # the columns of w have their own lower bound
        tensor([[0.0000, 2.0000],
                [0.5000, 2.0000]])
        >>> op(params)["b"]     # no lower bound on b
        tensor([-4.,  1.])
    """

    _hyper_names = ("lower", "upper")
    _public_name = "box"
    separable = True

    def __init__(self, lower: Any = float("-inf"), upper: Any = float("inf")):
        lo = float("-inf") if lower is None else check_hyper_tree("box", "lower", lower, min_value=None, allow_inf=True)
        hi = float("inf") if upper is None else check_hyper_tree("box", "upper", upper, min_value=None, allow_inf=True)
        for path, a, b in _bound_pairs("box", lo, hi):
            _check_order("box", path, a, b)
        self._set(lower=lo, upper=hi)

    def _leaf_bounds(self, leaves, tree) -> list[tuple[Any, Any]]:
        """``(lower, upper)`` of each leaf as given (a number or a tensor broadcasting to it)."""
        los = _per_leaf(self.lower, leaves, tree, "lower", float("-inf"))
        his = _per_leaf(self.upper, leaves, tree, "upper", float("inf"))
        return list(zip(los, his))

    def _bound(self, b, x):
        """One leaf's bound as the clamp of ``x`` takes it: a float within ``x``'s range, or a
        tensor of ``x``'s dtype and device."""
        if isinstance(b, torch.Tensor):
            return b.to(device=x.device, dtype=x.dtype)
        return _in_range(b, x)

    def _prox(self, leaves, step, tree):
        out = []
        for x, (lo_b, hi_b) in zip(leaves, self._leaf_bounds(leaves, tree)):
            lo, hi = self._bound(lo_b, x), self._bound(hi_b, x)
            if isinstance(lo, float) and isinstance(hi, float):
                lo_f = None if lo == float("-inf") else lo
                hi_f = None if hi == float("inf") else hi
                # box() with both bounds infinite is the identity (torch.clamp refuses two Nones)
                out.append(x if lo_f is None and hi_f is None else clamp(x, lo_f, hi_f))
            else:
                # torch.clamp takes two tensors or two numbers; an infinite number is no bound
                lo_t = None if _inf(lo) else torch.as_tensor(lo, dtype=x.dtype, device=x.device)
                hi_t = None if _inf(hi) else torch.as_tensor(hi, dtype=x.dtype, device=x.device)
                out.append(clamp(x, lo_t, hi_t))
        return out

    def _prox_batch(self, args, step, in_place):
        if _is_tree(self.lower) or _is_tree(self.upper):  # bounds for one structure: one call per argument
            return None
        return super()._prox_batch(args, step, in_place)

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x, (lo_b, hi_b) in zip(leaves, self._leaf_bounds(leaves, tree)):
            lo, hi = self._bound(lo_b, x), self._bound(hi_b, x)
            ok = ok.to(x.device) & ((x >= _widen(lo, x, -1)) & (x <= _widen(hi, x, 1))).all()
        return indicator(ok, zeros_like_value(leaves).dtype)


def _inf(b: Any) -> bool:
    """``b`` is the number ``+-inf`` (no bound on that side)."""
    return isinstance(b, float) and abs(b) == float("inf")


def _is_tree(h: Any) -> bool:
    return isinstance(h, (dict, list, tuple))


def _per_leaf(h: Any, leaves: list[torch.Tensor], tree: _tree.Tree, name: str, missing: float) -> list[Any]:
    """A box bound for each leaf (:func:`proxfunc._util.leaf_hypers`; ``None`` in a pytree: ``missing``)."""
    if is_scalar_hyper(h):
        return [h] * len(leaves)
    return leaf_hypers(h, leaves, tree, "box", name, missing=missing)


def _bound_pairs(owner: str, lo: Any, hi: Any) -> list[tuple[str, Any, Any]]:
    """``(path, lower, upper)`` for each place where both bounds are given: leaf by leaf for
    pytrees (which must then have one structure), the number or tensor paired with each leaf."""
    if not (_is_tree(lo) or _is_tree(hi)):
        return [("", lo, hi)]
    paths = _tree.leaf_paths(lo if _is_tree(lo) else hi)
    los, lo_spec = pytree.tree_flatten(lo) if _is_tree(lo) else (None, None)
    his, hi_spec = pytree.tree_flatten(hi) if _is_tree(hi) else (None, None)
    if los is not None and his is not None and lo_spec != hi_spec:
        raise ValueError(
            f"{owner}: lower and upper must have the same structure when both are pytrees; lower has the leaves "
            f"{', '.join(_tree.leaf_paths(lo))}, upper {', '.join(_tree.leaf_paths(hi))}"
        )
    n = len(paths)
    return list(zip(paths, los if los is not None else [lo] * n, his if his is not None else [hi] * n))


def _check_order(owner: str, path: str, lo: Any, hi: Any) -> None:
    """``lower <= upper`` entrywise where both are given; two tensors must broadcast together."""
    if lo is None or hi is None:
        return
    both = isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor)
    if both:
        try:
            torch.broadcast_shapes(lo.shape, hi.shape)
        except RuntimeError:
            raise ValueError(
                f"{owner}: lower{path} of shape {tuple(lo.shape)} and upper{path} of shape {tuple(hi.shape)} "
                "do not broadcast together"
            ) from None
    if isinstance(lo, float) and isinstance(hi, float):
        if lo > hi:
            raise ValueError(f"{owner}: lower must be <= upper, got lower{path}={lo} > upper{path}={hi}")
        return
    if traceable(lo, hi):  # values that may not be read: checked where they can be
        return
    with torch.no_grad():
        a = lo.detach() if isinstance(lo, torch.Tensor) else lo
        b = hi.detach() if isinstance(hi, torch.Tensor) else hi
        if both and a.device != b.device:
            b = b.to(a.device)
        bad = torch.as_tensor(a > b)
        if bool(bad.any()):
            at = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
            va = a if isinstance(a, float) else float(a.expand(bad.shape)[at])
            vb = b if isinstance(b, float) else float(b.expand(bad.shape)[at])
            where = f" at index {at}" if at else ""
            raise ValueError(
                f"{owner}: lower must be <= upper entrywise, got lower{path}={va} > upper{path}={vb}{where}"
            )


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
    """Projection onto the max-norm ball ``{z : |z_j| <= radius_j}``: ``clamp(x, -r, r)``.

    ``radius`` may vary over the entries, as a box's bounds do (:class:`box` with
    ``lower = -radius``, ``upper = radius``): a number, a tensor broadcasting to each leaf, or
    a pytree with the structure of ``params``. It is the set whose support function is the
    weighted l1 norm ``sum_j radius_j |y_j|`` (``pf.conjugate(pf.l1(w))`` projects onto
    ``linf_ball(w)``).

    Args:
        radius: radius of the ball, ``>= 0``: a number, a tensor broadcasting to each leaf, or
            a pytree matching ``params``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.linf_ball(1.0)(torch.tensor([3.0, -0.5]))
        tensor([ 1.0000, -0.5000])
        >>> pf.linf_ball(torch.tensor([2.0, 0.1]))(torch.tensor([3.0, -0.5]))
        tensor([ 2.0000, -0.1000])
    """

    _hyper_names = ("radius",)
    _public_name = "linf_ball"
    separable = True

    def __init__(self, radius: Any = 1.0):
        self._set(radius=check_hyper_tree("linf_ball", "radius", radius))

    def _radii(self, leaves, tree) -> list[Any]:
        if is_scalar_hyper(self.radius):
            return [self.radius] * len(leaves)
        return leaf_hypers(self.radius, leaves, tree, "linf_ball", "radius")

    def _prox(self, leaves, step, tree):
        out = []
        for x, r in zip(leaves, self._radii(leaves, tree)):
            if isinstance(r, float):
                out.append(clamp(x, -_in_range(r, x), _in_range(r, x)))
            else:
                rx = r.to(device=x.device, dtype=x.dtype)
                out.append(clamp(x, -rx, rx))
        return out

    def _prox_batch(self, args, step, in_place):
        if _is_tree(self.radius):  # radii for one structure: one call per argument
            return None
        return super()._prox_batch(args, step, in_place)

    def _value(self, leaves, tree):
        ok = torch.ones((), dtype=torch.bool)
        for x, r in zip(leaves, self._radii(leaves, tree)):
            rx = r.to(device=x.device, dtype=x.dtype) if isinstance(r, torch.Tensor) else r
            ok = ok.to(x.device) & (x.abs() <= _widen(rx, x, 1)).all()
        return indicator(ok, zeros_like_value(leaves).dtype)
