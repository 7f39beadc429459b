"""Group norms over arbitrary index groups, and the sparse group lasso.

``index_l21`` and ``index_linf1`` take a group-index tensor ``index`` (integers) with one entry
per entry of ``params`` (all leaves flattened in pytree order and concatenated): entry ``j``
belongs to group ``index[j]``; ``index[j] = -1`` leaves it in no group (unpenalised, passed
through). Groups need not be contiguous and may differ in size. Groups along a dim are covered
by :class:`proxfunc.l21` / :class:`proxfunc.linf1` with ``group_dim``.

References: Parikh & Boyd (2014) section 6.5.4; Yuan & Lin (2006) group lasso; Simon, Friedman,
Hastie & Tibshirani, *A sparse-group lasso*, JCGS 2013; Murray & Chiang (2015).
"""

from __future__ import annotations

from typing import Any

import torch

from . import dispatch
from ._base import Hyper, Prox, check_hyper, is_concrete
from ._util import block_scale, safe_norm, zeros_like_value
from .groups import _check_group_dim, l21
from .kernels import threshold
from .norms import l1
from .sets import flat, unflat

__all__ = ["index_l21", "index_linf1", "sparse_group_lasso"]


def _dense_groups(idx: torch.Tensor) -> torch.Tensor:
    """Group ids relabelled ``0, 1, ...`` in increasing order of ``index`` (``-1`` entries share
    one id of their own), with fixed shapes and no host read: the traceable construction."""
    key, order = torch.sort(idx, stable=True)
    new = torch.cat([torch.ones_like(key[:1], dtype=torch.bool), key[1:] != key[:-1]])
    dense = torch.cumsum(new.to(torch.int64), 0) - 1
    return torch.zeros_like(idx).scatter(0, order, dense)


def _segment_tau(a: torch.Tensor, gidx: torch.Tensor, t) -> torch.Tensor:
    """Per-group l1-ball threshold ``max(theta_g, 0)`` of ``a >= 0`` with radius ``t``, one slot per entry.

    The sort method (Held et al. 1974; Duchi et al. 2008) on segments, fixed shapes, no host
    read: sort by group, and inside a group by decreasing ``a``; with ``S_k`` the sum of the
    ``k`` largest entries of a group, ``theta_g = max_k (S_k - t) / k`` (Condat 2016). The
    segmented sums are differences of one cumulative sum, accumulated in float64 (CPU/CUDA).
    """
    n = a.numel()
    o1 = torch.sort(a, descending=True, stable=True).indices
    order = o1[torch.sort(gidx[o1], stable=True).indices]
    u, g = a[order], gidx[order]
    acc = a.dtype if a.device.type == "mps" else torch.promote_types(a.dtype, torch.float64)
    cs = torch.cumsum(u.to(acc), 0)
    pos = torch.arange(n, device=a.device)
    start = torch.cat([torch.ones_like(g[:1], dtype=torch.bool), g[1:] != g[:-1]])
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    seg = cs - (cs[first] - u[first].to(acc))
    cand = ((seg - t) / (pos - first + 1).to(acc)).to(a.dtype)
    return torch.zeros(n, dtype=a.dtype, device=a.device).scatter_reduce(0, g, cand, reduce="amax")


class _IndexGroups(Prox):
    _hyper_names = ("index", "reg")

    def __init__(self, index: torch.Tensor, reg: Hyper = 1.0):
        name = self._name()
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex():
            raise TypeError(f"{name}: index must be an integer tensor")
        idx = index.reshape(-1).to(torch.int64)
        self._set(index=index, reg=check_hyper(name, "reg", reg))
        member = idx >= 0
        if not is_concrete(idx):
            # Built inside torch.compile (or a torch.func transform): read nothing from the host.
            # Groups are relabelled densely into idx.numel() slots (empty slots are zero groups)
            # and index_linf1 uses the sort-based threshold, whose shapes need no group size.
            # An index entry < -1 is not checked here (it would need a host read); it acts as -1.
            G = idx.numel()
            self._set(_cache_G=G, _cache_M=None, _cache_member=member, _cache_gidx=_dense_groups(idx))
            return
        if idx.numel() and int(idx.min()) < -1:
            raise ValueError(f"{name}: index entries must be >= -1 (-1 = in no group), got {int(idx.min())}")
        G = int(idx.max()) + 1 if idx.numel() else 0
        gidx = torch.where(member, idx, torch.zeros_like(idx))
        # Dense (G, M) layout: position of every member entry inside its group.
        order = torch.sort(torch.where(member, idx, torch.full_like(idx, G)), stable=True).indices
        counts = torch.bincount(idx[member], minlength=G) if G else torch.zeros(0, dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.empty_like(idx)
        sorted_g = torch.where(member, idx, torch.full_like(idx, G))[order]
        rank = torch.arange(idx.numel()) - torch.cat([starts, torch.tensor([int(counts.sum())])])[sorted_g]
        pos[order] = rank
        M = int(counts.max()) if G else 0
        self._set(_cache_G=G, _cache_M=M, _cache_member=member, _cache_gidx=gidx, _cache_pos=pos)

    def _v(self, leaves):
        v = flat(leaves)
        if v.numel() != self._cache_member.numel():
            raise ValueError(
                f"{self._name()}: index has {self._cache_member.numel()} entries but params has {v.numel()}"
            )
        dev = v.device
        return v, self._cache_member.to(dev), self._cache_gidx.to(dev)


class index_l21(_IndexGroups):  # noqa: N801
    """Prox of the group lasso over arbitrary index groups.

    ``f(z) = reg * sum_g ||z_{index == g}||_2``, and for every group ``g``

        op(x, t)_g = max(1 - reg*t / ||x_g||_2, 0) * x_g;

    entries with ``index = -1`` are unchanged. Zero groups are safe (no NaN in value, output or
    gradient). Parikh & Boyd (2014) section 6.5.4.

    Args:
        index: an integer tensor with one entry per entry of ``params``: the group of each entry, ``-1`` for
            none.
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> index = torch.tensor([0, 1, 0, -1])   # -1: in no group
        >>> pf.index_l21(index, 1.0)(torch.tensor([3.0, 0.5, 4.0, 7.0]), 1.0)
        tensor([2.4000, 0.0000, 3.2000, 7.0000])
    """

    _public_name = "index_l21"

    def _norms(self, v, member, gidx):
        # one slot at least: with every entry free (G = 0) gidx is all zeros and must index something
        sq = torch.zeros(max(self._cache_G, 1), dtype=v.dtype, device=v.device)
        sq = sq.index_add(0, gidx, torch.where(member, v * v, torch.zeros_like(v)))
        return safe_norm(sq)

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v, member, gidx = self._v(leaves)
        n = self._norms(v, member, gidx)
        t = self.reg * step
        scale = block_scale(n, t)
        out = torch.where(member, v * scale[gidx], v)
        return unflat(out, leaves)

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        v, member, gidx = self._v(leaves)
        return self.reg * self._norms(v, member, gidx).sum()


class index_linf1(_IndexGroups):  # noqa: N801
    """Prox of the sum of group max-norms over arbitrary index groups.

    ``f(z) = reg * sum_g ||z_{index == g}||_inf``. By the Moreau identity each group is

        op(x, t)_g = clamp(x_g, -tau_g, tau_g),

    ``tau_g`` the threshold of the projection of ``x_g`` onto the l1 ball of radius ``reg*t``
    (0 when ``||x_g||_1 <= reg*t``), found for all groups at once on a zero-padded ``(G, M)``
    layout built at construction (padding zeros never change a non-negative threshold).
    Entries with ``index = -1`` are unchanged. Murray & Chiang (2015); Parikh & Boyd (2014) 6.5.

    Args:
        index: an integer tensor with one entry per entry of ``params``: the group of each entry, ``-1`` for
            none.
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> index = torch.tensor([0, 0, 1])
        >>> pf.index_linf1(index, 1.0)(torch.tensor([3.0, -1.0, 0.5]), 1.0)
        tensor([ 2., -1.,  0.])
    """

    _public_name = "index_linf1"

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v, member, gidx = self._v(leaves)
        G, M = self._cache_G, self._cache_M
        if G == 0:
            return unflat(v, leaves)
        t = self.reg * step
        if M is None:
            tb = _segment_tau(torch.where(member, v.abs(), torch.zeros_like(v)), gidx, t)[gidx]
            return unflat(torch.where(member, torch.clamp(v, -tb, tb), v), leaves)
        reference = dispatch.reference_only(leaves, t)
        tau = threshold([(self._padded(v, member, gidx), 0)], t, traceable=reference).clamp_min(0)
        tb = tau[gidx]
        return unflat(torch.where(member, torch.clamp(v, -tb, tb), v), leaves)

    def _padded(self, v: torch.Tensor, member: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
        """``|v|`` on the zero-padded ``(G, M)`` layout: row ``g`` holds group ``g``'s entries."""
        G, M = self._cache_G, self._cache_M
        pos = self._cache_pos.to(v.device)
        lin = torch.where(member, gidx * M + pos, torch.full_like(pos, G * M))
        P = torch.zeros(G * M + 1, dtype=v.dtype, device=v.device).index_put((lin,), v.abs())[: G * M]
        return P.reshape(G, M)

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        v, member, gidx = self._v(leaves)
        if self._cache_G == 0:  # all entries free
            return self.reg * v.new_zeros(())
        if self._cache_M is not None:  # the padded layout: a row max (DTensor has no scatter_reduce)
            return self.reg * self._padded(v, member, gidx).amax(dim=1).sum()
        m = torch.zeros(self._cache_G, dtype=v.dtype, device=v.device)  # built traced: no layout
        m = m.scatter_reduce(0, gidx, torch.where(member, v.abs(), torch.zeros_like(v)), reduce="amax")
        return self.reg * m.sum()


class sparse_group_lasso(Prox):  # noqa: N801
    """Prox of the sparse group lasso ``f(z) = reg_l1 * ||z||_1 + reg_group * sum_i ||group_i(z)||_2``.

    Exact composition (Simon et al. 2013; Parikh & Boyd 2014 section 6.5.4): soft-threshold
    every entry, then block-soft-threshold every group,

        op(x, t) = l21(reg_group)(l1(reg_l1)(x, t), t).

    Groups follow ``group_dim`` (an int or a pytree of ints), as in :class:`proxfunc.l21`.

    Args:
        reg_l1: weight of the l1 term, ``>= 0``.
        reg_group: weight of the group term, ``>= 0``.
        group_dim: the dim along which each leaf is split into groups: an int for every leaf, or a pytree of
            ints with the structure of ``params``. Group ``i`` is slice ``i`` along it of every leaf; all
            leaves must have the same number of groups.

    Example:
        >>> import torch, proxfunc as pf
        >>> W = torch.tensor([[3.0, 0.5], [0.3, 0.4]])
        >>> pf.sparse_group_lasso(0.5, 1.0)(W, 1.0)
        tensor([[1.5000, 0.0000],
                [0.0000, 0.0000]])
    """

    _hyper_names = ("reg_l1", "reg_group", "group_dim")
    _public_name = "sparse_group_lasso"

    def __init__(self, reg_l1: Hyper = 1.0, reg_group: Hyper = 1.0, group_dim: Any = 0):
        name = "sparse_group_lasso"
        self._set(
            reg_l1=check_hyper(name, "reg_l1", reg_l1),
            reg_group=check_hyper(name, "reg_group", reg_group),
            group_dim=_check_group_dim(name, group_dim),
        )
        self._set(_cache_ops=(l1(self.reg_l1), l21(self.reg_group, group_dim=group_dim)))

    def _prox(self, leaves, step, tree):
        a, b = self._cache_ops
        return b._prox(a._prox(leaves, step, tree), step, tree)

    def _value(self, leaves, tree):
        a, b = self._cache_ops
        return a._value(leaves, tree) + b._value(leaves, tree)
