"""Non-convex operators for pruning: l0, group l0, top-k, group top-k, SCAD, MCP, log-sum.

For a non-convex ``f`` the minimiser of ``f(z) + ||z - x||^2 / (2t)`` may not be unique. Every
operator here returns a **global** minimiser (not a stationary point), and documents how ties are
broken, so results are deterministic. They are not non-expansive and the Moreau identity does
not apply; use them in proximal gradient as hard-thresholding / pruning steps.

Group semantics are those of :mod:`proxfunc.groups`: group ``i`` is the slice ``i`` along
``group_dim`` of every leaf (``group_dim`` an int or a pytree of ints).

References: Blumensath & Davies, *Iterative hard thresholding for compressed sensing*, 2009;
Fan & Li, *Variable selection via nonconcave penalized likelihood*, JASA 2001 (SCAD); Zhang,
*Nearly unbiased variable selection under minimax concave penalty*, Ann. Stat. 2010 (MCP);
Murray & Chiang (2015) for auto-sizing by groups; Parikh & Boyd (2014) section 6.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _tree
from ._base import Hyper, Prox, check_hyper
from ._util import hyper_tensor, indicator, safe_norm, zeros_like_value
from .groups import GroupProx, _check_group_dim
from .norms import Elementwise
from .sets import _hyper_as, check_k, k_sparse, keep_largest

__all__ = ["l0", "group_l0", "top_k", "group_top_k", "scad", "mcp", "log_sum"]


def rows(leaves: list[torch.Tensor], dims: list[int], G: int) -> torch.Tensor:
    """The groups as the rows of one ``(G, N)`` matrix (accumulation dtype)."""
    acc = _tree.common_acc_dtype(leaves)
    return torch.cat([x.to(acc).movedim(d, 0).reshape(G, -1) for x, d in zip(leaves, dims)], dim=1)


def unrows(R: torch.Tensor, leaves: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    sizes = [x.numel() // max(x.shape[d], 1) for x, d in zip(leaves, dims)]
    out = []
    for part, x, d in zip(torch.split(R, sizes, dim=1), leaves, dims):
        shape = (x.shape[d],) + tuple(s for i, s in enumerate(x.shape) if i != d)
        out.append(part.reshape(shape).movedim(0, d).to(x.dtype))
    return out


class l0(Elementwise):  # noqa: N801
    """Prox of the l0 "norm" ``f(z) = reg * nnz(z)``: hard thresholding (a global minimiser).

        op(x, t)_j = x_j   if x_j^2 > 2*reg*t,   else 0.

    At ``|x_j| = sqrt(2*reg*t)`` both ``0`` and ``x_j`` are optimal; the tie is broken towards 0.
    Blumensath & Davies (2009).

    Args:
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l0(0.5)(torch.tensor([0.9, 1.1, -2.0]), 1.0)   # keep x_j iff x_j^2 > 2 * reg * step
        tensor([ 0.0000,  1.1000, -2.0000])
    """

    _hyper_names = ("reg",)
    _public_name = "l0"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("l0", "reg", reg))

    def _prox_leaf(self, x, step):
        xa = x.to(_tree.acc_dtype(x))
        return torch.where(xa * xa > 2.0 * self.reg * step, x, torch.zeros_like(x))

    def _value_leaf(self, x):
        return self.reg * (x != 0).sum().to(_tree.acc_dtype(x))


class group_l0(GroupProx):  # noqa: N801
    """Prox of the group l0 penalty ``f(z) = reg * #{i : group_i(z) != 0}``: drop whole groups.

        op(x, t)_g = x_g   if ||x_g||_2^2 > 2*reg*t,   else 0.

    A global minimiser: for each group, keeping it costs ``reg``, dropping it costs
    ``||x_g||^2 / (2t)``. Ties (equality) drop the group. This is auto-sizing by count: each
    surviving neuron costs ``reg``. Murray & Chiang (2015); Blumensath & Davies (2009).

    Args:
        reg: weight of the penalty, ``>= 0``.
        group_dim: the dim along which each leaf is split into groups: an int for every leaf, or a pytree of
            ints with the structure of ``params``. Group ``i`` is slice ``i`` along it of every leaf; all
            leaves must have the same number of groups.

    Example:
        >>> import torch, proxfunc as pf
        >>> W = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> pf.group_l0(1.0)(W, 1.0)
        tensor([[3., 4.],
                [0., 0.]])
    """

    _public_name = "group_l0"

    def _sq(self, leaves, dims):
        return _tree.total([_tree.reduce_except(x, d, "sumsq") for x, d in zip(leaves, dims)], leaves)

    def _norms(self, leaves, dims):  # group_norms(): the l2 norm of every group (for reports)
        return safe_norm(self._sq(leaves, dims))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        dims, _ = self.groups(leaves, tree)
        keep = self._sq(leaves, dims) > 2.0 * self.reg * step
        return [torch.where(_tree.along(keep, x, d), x, torch.zeros_like(x)) for x, d in zip(leaves, dims)]

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        dims, _ = self.groups(leaves, tree)
        return self.reg * (self._sq(leaves, dims) > 0).sum().to(zeros_like_value(leaves).dtype)


class top_k(k_sparse):  # noqa: N801
    """Keep the ``k`` largest-magnitude entries, of the whole object or of every group.

    ``group_dim=None`` (default): the projection onto ``{nnz(z) <= k}`` over all leaves together
    (the same as :class:`proxfunc.k_sparse`). With ``group_dim`` (int or pytree of ints): the
    projection onto ``{nnz(group_i(z)) <= k for every i}``, e.g. keep the ``k`` largest incoming
    weights of every neuron. A global minimiser; ties in ``|x|`` keep the entry that comes first
    (leaf order, then row-major order inside the group). ``k`` larger than a group raises
    ``ValueError`` naming ``k``.

    Args:
        k: how many entries are kept (of the whole object, or of every group).
        group_dim: ``None`` for the whole object, else as for :class:`l21`: the k largest entries of every
            group are kept.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.top_k(1, group_dim=0)(torch.tensor([[3.0, -4.0], [1.0, 0.5]]))   # the largest entry of each row
        tensor([[ 0., -4.],
                [ 1.,  0.]])
    """

    _hyper_names = ("k", "group_dim")
    _public_name = "top_k"

    def __init__(self, k: int, group_dim: Any = None):
        self._set(k=check_k("top_k", k), group_dim=None if group_dim is None else _check_group_dim("top_k", group_dim))

    def _prox(self, leaves, step, tree):
        if self.group_dim is None:
            return super()._prox(leaves, step, tree)
        if not leaves:
            return []
        dims = _tree.group_dims(self.group_dim, leaves, tree, "top_k")
        G = _tree.group_count(leaves, dims, tree, "top_k")
        if G == 0:  # no groups: every leaf is empty
            return [torch.zeros_like(x) for x in leaves]
        R = rows(leaves, dims, G)
        if self.k > R.shape[1]:
            raise ValueError(f"top_k: k={self.k} is larger than the group size {R.shape[1]}")
        mask = keep_largest(R.abs(), self.k)
        return unrows(torch.where(mask, R, torch.zeros_like(R)), leaves, dims)

    def _value(self, leaves, tree):
        if self.group_dim is None:
            return super()._value(leaves, tree)
        dims = _tree.group_dims(self.group_dim, leaves, tree, "top_k")
        G = _tree.group_count(leaves, dims, tree, "top_k")
        if G == 0:
            return zeros_like_value(leaves)
        R = rows(leaves, dims, G)
        return indicator(((R != 0).sum(dim=1) <= self.k).all(), zeros_like_value(leaves).dtype)


class group_top_k(Prox):  # noqa: N801
    """Keep the ``k`` groups of largest l2 norm, zero the others (keep the k largest neurons).

        op(x) = argmin { ||z - x||^2 : at most k groups of z are non-zero }.

    A global minimiser (the dropped mass ``sum ||x_g||^2`` over dropped groups is minimal). Ties
    in the group norm keep the group with the lower index. ``0 <= k <= number of groups``
    (``ValueError`` naming ``k``). A projection: ``step`` is ignored.

    Args:
        k: how many groups are kept.
        group_dim: the dim along which each leaf is split into groups: an int for every leaf, or a pytree of
            ints with the structure of ``params``. Group ``i`` is slice ``i`` along it of every leaf; all
            leaves must have the same number of groups.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.group_top_k(1)(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        tensor([[3., 4.],
                [0., 0.]])
    """

    _hyper_names = ("k", "group_dim")
    _public_name = "group_top_k"
    is_projection = True

    def __init__(self, k: int, group_dim: Any = 0):
        self._set(k=check_k("group_top_k", k), group_dim=_check_group_dim("group_top_k", group_dim))

    def _sq(self, leaves, tree):
        dims = _tree.group_dims(self.group_dim, leaves, tree, "group_top_k")
        G = _tree.group_count(leaves, dims, tree, "group_top_k")
        if self.k > G:
            raise ValueError(f"group_top_k: k={self.k} is larger than the number of groups {G}")
        # ranked by the squared norms of x / max|x|: the squares neither overflow nor underflow
        m = None
        for x in leaves:
            if x.numel():
                mx = x.detach().abs().amax().to(_tree.acc_dtype(x))
                m = mx if m is None else torch.maximum(m, mx.to(m.dtype))
        if m is not None:
            m = torch.where((m > 0) & (m < float("inf")), m, torch.ones_like(m))
        xs = [x if m is None else x.to(_tree.acc_dtype(x)) / m.to(_tree.acc_dtype(x)) for x in leaves]
        sq = _tree.total([_tree.reduce_except(x, d, "sumsq") for x, d in zip(xs, dims)], leaves)
        return dims, sq

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        dims, sq = self._sq(leaves, tree)
        keep = keep_largest(sq.unsqueeze(0), self.k).squeeze(0)
        return [torch.where(_tree.along(keep, x, d), x, torch.zeros_like(x)) for x, d in zip(leaves, dims)]

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        _, sq = self._sq(leaves, tree)
        return indicator((sq > 0).sum() <= self.k, zeros_like_value(leaves).dtype)


def _t(h, like: torch.Tensor) -> torch.Tensor:
    return hyper_tensor(h, like.dtype, like.device)


def _unit(x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x / c, lam / c, c)`` with ``c = max(|x|, lam)`` per entry (1 where both are 0).

    SCAD's and MCP's objectives are homogeneous of degree 2 in ``(u, x, lam)`` (``a``, ``gamma``
    and the step fixed), so ``prox(x; lam) = c * prox(x / c; lam / c)``: in these units the
    candidates and objectives stay near 1 and neither ``lam**2`` nor ``x**2`` overflows (a huge
    ``reg`` gives 0, not ``a * reg``) or underflows."""
    lam = lam.clamp(max=torch.finfo(lam.dtype).max)  # a reg beyond the dtype's range: its largest value
    c = torch.maximum(x.detach().abs(), lam.detach())
    c = torch.where(c > 0, c, torch.ones_like(c))
    return x / c, lam / c, c


def _best(x: torch.Tensor, cands: list[torch.Tensor], pen, t) -> torch.Tensor:
    """Per entry, the candidate magnitude ``u >= 0`` minimising ``(u - |x|)^2/2 + t*pen(u)``.

    The first candidate wins ties (candidates are listed by increasing magnitude preference).
    """
    ax = x.abs()
    U = torch.stack([torch.broadcast_to(c, ax.shape) for c in cands])
    obj = 0.5 * (U - ax) ** 2 + t * pen(U)
    idx = torch.argmin(obj, dim=0, keepdim=True)
    return torch.sign(x) * torch.gather(U, 0, idx).squeeze(0)


class scad(Elementwise):  # noqa: N801
    """Prox of the SCAD penalty (Fan & Li 2001), a global minimiser for every step.

    ``f(z) = sum_j p(|z_j|)`` with ``lam = reg``, ``a > 2``:
    ``p(u) = lam*u`` for ``u <= lam``; ``(2*a*lam*u - u^2 - lam^2) / (2(a-1))`` for
    ``lam < u <= a*lam``; ``(a+1) lam^2 / 2`` beyond. For ``t = 1`` this is the classic SCAD
    thresholding rule (soft / linear interpolation / identity). For any ``t`` the objective is
    a quadratic on each of the three pieces; the operator evaluates the minimiser of each piece
    (its clipped stationary point when the piece is convex, its end points otherwise) and ``0``,
    and returns the best, so it is exactly the global minimiser. Ties are broken towards the
    smaller magnitude. ``sign(op(x)) = sign(x)``.

    Args:
        reg: weight of the penalty, ``>= 0``.
        a: SCAD's shape parameter, ``> 2``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.scad(1.0)(torch.tensor([0.5, 2.0, 5.0]), 1.0)
        tensor([0., 1., 5.])
    """

    _hyper_names = ("reg", "a")
    _public_name = "scad"

    def __init__(self, reg: Hyper = 1.0, a: Hyper = 3.7):
        a = check_hyper("scad", "a", a, min_value=2.0, strict=True)
        self._set(reg=check_hyper("scad", "reg", reg), a=a)

    def _pen(self, u, lam, a):
        mid = (2 * a * lam * u - u * u - lam * lam) / (2 * (a - 1))
        return torch.where(u <= lam, lam * u, torch.where(u <= a * lam, mid, (a + 1) * lam * lam / 2))

    def _prox_leaf(self, x, step):
        xa = x.to(_tree.acc_dtype(x))
        lam, a, t = (_t(h, xa) for h in (self.reg, self.a, step))
        xa, lam, c = _unit(xa, lam)
        ax = xa.abs()
        c1 = torch.clamp(ax - t * lam, min=torch.zeros_like(ax), max=lam + torch.zeros_like(ax))
        conv = (a - 1) - t
        c2 = (ax * (a - 1) - t * a * lam) / torch.where(conv > 0, conv, torch.ones_like(conv + ax))
        c2 = torch.where(conv > 0, c2, lam + torch.zeros_like(ax)).clamp(min=lam, max=a * lam)
        c3 = torch.maximum(ax, a * lam + torch.zeros_like(ax))
        cands = [torch.zeros_like(ax), c1, lam + 0 * ax, c2, a * lam + 0 * ax, c3]
        return (_best(xa, cands, lambda u: self._pen(u, lam, a), t) * c).to(x.dtype)

    def _value_leaf(self, x):
        xa = x.to(_tree.acc_dtype(x))
        return self._pen(xa.abs(), _hyper_as(self.reg, xa), _hyper_as(self.a, xa)).sum()


class mcp(Elementwise):  # noqa: N801
    """Prox of the minimax concave penalty (Zhang 2010): firm thresholding, a global minimiser.

    ``f(z) = sum_j p(|z_j|)``, ``lam = reg``, ``gamma > 0``: ``p(u) = lam*u - u^2/(2 gamma)`` for
    ``u <= gamma*lam`` and ``gamma lam^2 / 2`` beyond. For ``t < gamma`` this is firm
    thresholding: ``0`` for ``|x| <= t lam``, ``sign(x)(|x| - t lam)/(1 - t/gamma)`` up to
    ``|x| = gamma lam``, ``x`` beyond. For every ``t`` the operator compares the minimisers of both
    pieces (clipped stationary point or end points) and ``0`` and returns the best: the exact
    global minimiser, ties broken towards the smaller magnitude.

    Args:
        reg: weight of the penalty, ``>= 0``.
        gamma: MCP's concavity parameter, ``> 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.mcp(1.0)(torch.tensor([0.5, 2.0, 5.0]), 1.0)
        tensor([0.0000, 1.5000, 5.0000])
    """

    _hyper_names = ("reg", "gamma")
    _public_name = "mcp"

    def __init__(self, reg: Hyper = 1.0, gamma: Hyper = 3.0):
        self._set(reg=check_hyper("mcp", "reg", reg), gamma=check_hyper("mcp", "gamma", gamma, strict=True))

    def _pen(self, u, lam, g):
        return torch.where(u <= g * lam, lam * u - u * u / (2 * g), g * lam * lam / 2)

    def _prox_leaf(self, x, step):
        xa = x.to(_tree.acc_dtype(x))
        lam, g, t = (_t(h, xa) for h in (self.reg, self.gamma, step))
        xa, lam, c = _unit(xa, lam)
        ax = xa.abs()
        conv = 1 - t / g
        c1 = (ax - t * lam) / torch.where(conv > 0, conv, torch.ones_like(conv + ax))
        c1 = torch.where(conv > 0, c1, torch.zeros_like(ax)).clamp(min=0 * ax, max=g * lam + 0 * ax)
        c2 = torch.maximum(ax, g * lam + 0 * ax)
        cands = [torch.zeros_like(ax), c1, g * lam + 0 * ax, c2]
        return (_best(xa, cands, lambda u: self._pen(u, lam, g), t) * c).to(x.dtype)

    def _value_leaf(self, x):
        xa = x.to(_tree.acc_dtype(x))
        return self._pen(xa.abs(), _hyper_as(self.reg, xa), _hyper_as(self.gamma, xa)).sum()


def _log1p_ratio(u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``log(1 + u / e)`` for ``u >= 0``, also where ``u / e`` overflows."""
    big = u > e
    ub = torch.where(big, u, torch.ones_like(u))
    return torch.where(big, torch.log(ub) + torch.log1p(e / ub) - torch.log(e), torch.log1p(u / e))


class log_sum(Elementwise):  # noqa: N801
    """Prox of the log-sum penalty (reweighted l1), a global minimiser.

        f(z) = reg * sum_j log(1 + |z_j| / eps),   reg >= 0, eps > 0

    (Candès, Wakin & Boyd, *Enhancing sparsity by reweighted l1 minimization*, 2008: its
    majorisation gives weights ``reg / (eps + |z_j|)``). With ``a = |x|`` and ``c = reg * t`` the
    candidates are ``0`` and the larger root of ``(u - a)(u + eps) + c = 0``,

        u = ((a - eps) + sqrt((a + eps)^2 - 4c)) / 2    (when (a + eps)^2 >= 4c),

    evaluated without cancellation (from the product of the roots when ``a < eps``) and the
    discriminant as ``(a + eps - 2 sqrt(c)) (a + eps + 2 sqrt(c))``; the one with the smaller
    objective ``(u - a)^2 / 2 + c log(1 + u / eps)`` wins, ties broken towards ``0``. Separable;
    ``op(x) = sign(x) u``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.log_sum(1.0, eps=0.5)(torch.tensor([-3.0, 0.5, 2.0]), 1.0)
        tensor([-2.6861,  0.0000,  1.5000])
    """

    _hyper_names = ("reg", "eps")
    _public_name = "log_sum"

    def __init__(self, reg: Hyper = 1.0, eps: Hyper = 1.0):
        self._set(reg=check_hyper("log_sum", "reg", reg), eps=check_hyper("log_sum", "eps", eps, strict=True))

    def _prox_leaf(self, x, step):
        xa = x.to(_tree.acc_dtype(x))
        lam, e, t = (_t(h, xa) for h in (self.reg, self.eps, step))
        a = xa.abs()
        c = lam * t
        rc = torch.sqrt(c)
        lo, hi = a + e - 2 * rc, a + e + 2 * rc
        real = lo >= 0
        # sqrt of the discriminant as a product of square roots: no overflow near the dtype's max
        s = torch.where(lo == hi, lo, torch.sqrt(torch.where(real, lo, torch.zeros_like(lo))) * torch.sqrt(hi))
        big = a - e > 0
        den = (a - e) - s  # < 0 where a <= eps (unless c = a eps, a root at 0)
        safe_den = torch.where(den < 0, den, -torch.ones_like(den))
        half = 0.5 * ((a - e) + s)
        half = torch.where(torch.isfinite(half), half, 0.5 * (a - e) + 0.5 * s)  # a + s beyond the dtype's max
        root = torch.where(big, half, torch.where(den < 0, 2 * (c - a * e) / safe_den, 0 * a))
        root = torch.where(real, root.clamp_min(0), torch.zeros_like(root))
        return _best(xa, [torch.zeros_like(a), root], lambda u: _log1p_ratio(u, e) * lam, t).to(x.dtype)

    def _value_leaf(self, x):
        xa = x.to(_tree.acc_dtype(x))
        return _hyper_as(self.reg, xa) * torch.log1p(xa.abs() / _hyper_as(self.eps, xa)).sum()
