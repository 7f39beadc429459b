"""Group penalties: l21 (group lasso) and linf1, the auto-sizing regularizers.

Group semantics: group ``i`` is the slice ``i`` along ``group_dim`` of **every** leaf of
``params``. ``group_dim`` is an int (same dim for all leaves) or a pytree of ints with the
structure of ``params``::

    W1, b1, W2 = lin1.weight, lin1.bias, lin2.weight        # (H, D), (H,), (O, H)
    pf.l21(0.01)((W1, b1), step)                           # neuron i = (W1[i, :], b1[i])
    pf.l21(0.01, group_dim=(0, 0, 1))((W1, b1, W2), step)  # neuron i = (W1[i, :], b1[i], W2[:, i])

Leaves whose sizes along their group dims differ raise ``ValueError`` naming them.
Zero groups are safe: no NaN or Inf in the value, the output or the gradients.

References: Parikh & Boyd (2014) section 6.5.4; K. Murray and D. Chiang, *Auto-Sizing Neural
Networks: With Applications to n-gram Language Models*, EMNLP 2015 (l21 and linf1 for
auto-sizing); Murray et al., *Auto-Sizing the Transformer Network*, WNGT 2019.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import _tree
from ._base import Hyper, Prox, check_hyper, check_step
from ._util import block_scale, block_scale_, eager_nograd, safe_norm, traceable, zeros_like_value
from .kernels import threshold
from .kernels.l21_rows import l21_rows
from .kernels.linf1_cpu import linf1_rows_cpu
from .kernels.linf1_rows import linf1_rows
from .kernels.scale import mul_along, scaled
from .norms import _clamp_sym, _writable

__all__ = ["l21", "linf1", "GroupProx"]


def _check_group_dim(owner: str, group_dim: Any) -> Any:
    leaves, _ = pytree.tree_flatten(group_dim)
    for d in leaves:
        if d is not None and (isinstance(d, bool) or not isinstance(d, int)):
            raise TypeError(f"{owner}: group_dim must be an int or a pytree of ints, got {group_dim!r}")
    return group_dim


class GroupProx(Prox):
    """Base of operators with ``f(z) = reg * sum_i g(group_i(z))``."""

    _fields = ("reg", "group_dim")

    def __init__(self, reg: Hyper = 1.0, group_dim: Any = 0):
        name = self._name()
        self._set(reg=check_hyper(name, "reg", reg), group_dim=_check_group_dim(name, group_dim))

    def groups(self, leaves: list[torch.Tensor], tree: _tree.Tree) -> tuple[list[int], int]:
        """The group dim of each leaf and the number of groups (validated)."""
        dims = _tree.group_dims(self.group_dim, leaves, tree, self._name())
        return dims, _tree.group_count(leaves, dims, tree, self._name())

    def _tree_plan(self, params: Any, step: Hyper) -> tuple[list[torch.Tensor], list[int], Hyper] | None:
        """``(leaves, group dims, threshold)`` for an in-place writer over one argument, after
        the checks of a call; ``None`` unless the leaves are float32/float64 tensors of one
        dtype, contiguous, eager, with nothing to differentiate and a float step."""
        leaves, tree = _tree.flatten(params, self._name())
        if not isinstance(step, float) or not leaves or not _writable(leaves):
            return None
        if not all(x.dtype == leaves[0].dtype for x in leaves):
            return None
        t = self.reg * step
        if not eager_nograd(t, leaves):
            return None
        dims, _ = self.groups(leaves, tree)
        return leaves, dims, t

    def group_norms(self, params: Any) -> torch.Tensor:
        """``g(group_i)`` for every group ``i``, a vector of length G (the per-neuron norms)."""
        leaves, tree = _tree.flatten(params, self._name())
        dims, _ = self.groups(leaves, tree)
        return self._norms(leaves, dims)

    def _norms(self, leaves: list[torch.Tensor], dims: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        dims, _ = self.groups(leaves, tree)
        return self.reg * self._norms(leaves, dims).sum()


class l21(GroupProx):  # noqa: N801
    """Prox of the group lasso (l2,1) norm: block soft thresholding of every group.

    ``f(z) = reg * sum_i ||group_i(z)||_2``, and for each group ``g``

        op(x, t)_g = max(1 - reg*t / ||x_g||_2, 0) * x_g.

    One reduction (the squared norm of each group, summed over leaves) and one scale.
    The seed's ``l21(weight, bias)`` is ``pf.l21(reg)((weight, bias), lr)``.
    Parikh & Boyd (2014) section 6.5.4; Murray & Chiang (2015).
    """

    _public_name = "l21"

    def _sq(self, leaves, dims):
        return _tree.total([_tree.reduce_except(x, d, "sumsq") for x, d in zip(leaves, dims)], leaves)

    def _norms(self, leaves, dims):
        return safe_norm(self._sq(leaves, dims))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        dims, _ = self.groups(leaves, tree)
        t = self.reg * step
        if eager_nograd(t, leaves):
            return _l21_fast(leaves, dims, t)
        n = self._norms(leaves, dims)
        scale = block_scale(n, t)
        return [scaled(x, scale, d) for x, d in zip(leaves, dims)]

    def _prox_each(self, args, step):
        # Eager, nothing to differentiate, tensors of one dtype and device, one int
        # group_dim: each tensor's norms, then one scale computation for all of them.
        plan = self._each_plan(args, step) if len(args) >= 2 else None
        if plan is None:
            return super()._prox_each(args, step)
        return _l21_each(args, *plan)

    def _writer_tree(self, params, step):
        # One argument, e.g. a layer's (weight, bias): the joint norms, then each tensor is
        # scaled in place with the arithmetic of _l21_fast.
        plan = self._tree_plan(params, step)
        return None if plan is None else partial(_l21_fast, *plan, True)

    def _writer(self, leaves, step):
        # In a partition pattern batch (each tensor its own groups): scale in place, the
        # same arithmetic as _l21_each (float32/float64, contiguous, float step).
        if not isinstance(step, float) or not _writable(leaves):
            return None
        plan = self._each_plan(leaves, step)
        return None if plan is None else partial(_l21_each, leaves, *plan, True)

    def _each_plan(self, args, step) -> tuple[list[int], Hyper] | None:
        """``(group dim of each tensor, threshold)`` when each argument can go through one
        batched call (after the checks of a call on each alone), else ``None``."""
        if not (args and isinstance(self.group_dim, int) and all(isinstance(a, torch.Tensor) for a in args)):
            return None
        step = check_step(self._name(), step)
        t = self.reg * step
        first = args[0]
        if not (all(a.dtype == first.dtype and a.device == first.device for a in args) and eager_nograd(t, args)):
            return None
        dims = []
        gd = self.group_dim
        for a in args:  # the checks of a call on each tensor alone
            nd = a.dim()
            if a.is_floating_point() and -nd <= gd < nd:  # what they check, for one tensor
                dims.append(gd % nd)
                continue
            leaves, tree = _tree.flatten(a, self._name())  # raises what a call raises
            dims.append(self.groups(leaves, tree)[0][0])
        return dims, t


def _l21_fast(leaves: list[torch.Tensor], dims: list[int], t: Hyper, in_place: bool = False) -> list[torch.Tensor]:
    """l21 in one norm kernel per leaf + one scale: ``scale = max(1 - t / ||x_g||, 0)``.

    Same values as the differentiable path (:func:`proxfunc._util.block_scale_`). With
    ``in_place`` (leaves of one float32/float64 dtype) the leaves are scaled in place.
    """
    if _rows(leaves, dims):  # CPU: norms and scale in one C call, row by row
        done = l21_rows([leaves], t, in_place)
        if done is not None:
            return done[0]
    norms = [_group_norm(x, d) for x, d in zip(leaves, dims)]
    if len(norms) == 1:
        n = norms[0]
    else:
        dtype = _tree.common_dtype(norms)
        n = torch.linalg.vector_norm(torch.stack([m.to(dtype) for m in norms]), 2, dim=0)
    return _apply_scales(leaves, [block_scale_(n, t)] * len(leaves), dims, in_place)


def _l21_each(args: list[torch.Tensor], dims: list[int], t: Hyper, in_place: bool = False) -> list[torch.Tensor]:
    """``[_l21_fast([x], [d], t) for x, d in ...]`` with one scale computation for all tensors
    (same dtype and device): a model's weights cost one norm and one scale kernel each.
    ``in_place`` (float32/float64 tensors, the in-place layer) multiplies them in place."""
    if _rows(args, dims):  # CPU: every tensor's norms and scale in one C call
        done = l21_rows([[a] for a in args], t, in_place)
        if done is not None:
            return [y for (y,) in done]
    norms = [_group_norm(x, d) for x, d in zip(args, dims)]
    scales = block_scale_(torch.cat(norms), t).split([m.numel() for m in norms])
    return _apply_scales(args, scales, dims, in_place)


def _rows(leaves: list[torch.Tensor], dims: list[int]) -> bool:
    """CPU tensors whose groups are their slices along dim 0 (what :func:`l21_rows` takes)."""
    return leaves[0].is_cpu and all(d == 0 or d == -x.dim() for x, d in zip(leaves, dims))


def _group_norm(x: torch.Tensor, d: int) -> torch.Tensor:
    """``||x_g||_2`` of every slice ``g`` of ``x`` along ``d``, in the accumulation dtype."""
    acc = _tree.acc_dtype(x)
    if x.dim() == 1:
        return _tree.cast(x, acc).abs()
    other = [i for i in range(x.dim()) if i != d]
    return torch.linalg.vector_norm(x, 2, dim=other, dtype=acc)


def _apply_scales(
    leaves: list[torch.Tensor], scales: list[torch.Tensor], dims: list[int], in_place: bool
) -> list[torch.Tensor]:
    """Each leaf times its per-group scale along its group dim: new tensors, or (``in_place``,
    leaves of the scale's float32/float64 dtype) multiplied in place. One vectorized pass per
    large CUDA tensor (:func:`proxfunc.kernels.scale.mul_along`), bit-identical to ATen's."""
    if in_place:
        return [mul_along(x, s, d, out=x) for x, s, d in zip(leaves, scales, dims)]
    return [mul_along(x, s, d) for x, s, d in zip(leaves, scales, dims)]


class linf1(GroupProx):
    """Prox of the l(inf,1) norm: the sum over groups of each group's max-abs entry.

    ``f(z) = reg * sum_i ||group_i(z)||_inf``. By the Moreau identity each group is

        op(x, t)_g = x_g - P_{||.||_1 <= reg*t}(x_g) = clamp(x_g, -tau_g, tau_g),

    where ``tau_g`` is the threshold of the projection of ``x_g`` onto the l1 ball of radius
    ``reg*t`` (0 when ``||x_g||_1 <= reg*t``: the whole group is zeroed, the neuron dies).
    The thresholds of all groups are found together without sorting (Michelot's fixed point,
    exact; see :mod:`proxfunc.kernels.threshold`). Murray & Chiang (2015) introduced linf1
    for auto-sizing; Parikh & Boyd (2014) sections 2.5, 6.5.2 and 6.5.4; Duchi et al. (2008).
    """

    _public_name = "linf1"

    def _norms(self, leaves, dims):
        return _tree.maximum([_tree.reduce_except(x, d, "amax_abs") for x, d in zip(leaves, dims)])

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        dims, _ = self.groups(leaves, tree)
        t = self.reg * step
        if (leaves[0].is_cuda or leaves[0].is_cpu) and eager_nograd(t, leaves):
            # one fused, sort-free pass per row group: Triton on CUDA, C on the CPU
            ys = (linf1_rows if leaves[0].is_cuda else linf1_rows_cpu)(leaves, dims, t)
            if ys is not None:
                return ys
        parts = [(_tree.cast(x, _tree.acc_dtype(x)), d) for x, d in zip(leaves, dims)]
        tau = threshold(parts, t, traceable=traceable(t, *leaves), absolute=True).clamp_min(0)
        return [_clamp_sym(x, tau, d) for x, d in zip(leaves, dims)]

    def _writer_tree(self, params, step):
        # One argument, e.g. a layer's (weight, bias): the thresholds from the old values,
        # then each tensor clamped in place (the same clamp as _prox).
        plan = self._tree_plan(params, step)
        return None if plan is None else partial(_linf1_in_place, *plan)


def _linf1_in_place(leaves: list[torch.Tensor], dims: list[int], t: Hyper) -> None:
    if (linf1_rows if leaves[0].is_cuda else linf1_rows_cpu)(leaves, dims, t, out=leaves) is not None:
        return
    tau = threshold(list(zip(leaves, dims)), t, traceable=False, absolute=True).clamp_min(0)
    for x, d in zip(leaves, dims):
        _clamp_sym(x, tau, d, out=x)
