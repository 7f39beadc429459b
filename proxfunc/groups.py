"""Group penalties: l21 (group lasso) and linf1, the auto-sizing regularizers.

Group semantics: group ``i`` is the slice ``i`` along ``group_dim`` of **every** leaf of
``params``. ``group_dim`` is an int (same dim for all leaves) or a pytree of ints with the
structure of ``params``::

    W1, b1, W2 = lin1.weight, lin1.bias, lin2.weight        # (H, D), (H,), (O, H)
    pf.l21(0.01)((W1, b1), step)                           # neuron i = (W1[i, :], b1[i])
    pf.l21(0.01, group_dim=(0, 0, 1))((W1, b1, W2), step)  # neuron i = (W1[i, :], b1[i], W2[:, i])

Leaves whose sizes along their group dims differ raise ``ValueError`` naming them, as
``pf.l21(reg)(dict(model.named_parameters()), step)`` does for an MLP (layers of different
widths): one operator on a whole model needs to be told which tensors form groups together.
``pf.partition({"*": pf.l21(reg)})`` gives each tensor its own groups (the rows of every
weight, each entry of a bias); ``pf.autosize.neuron_prox(model, pf.l21(reg))`` gives the
neurons of each hidden layer (row ``i`` of its weight with entry ``i`` of its bias, and with
``outgoing=True`` column ``i`` of the next weight). When the sizes happen to agree, the
groups of one call still span all the leaves.
Zero groups are safe: no NaN or Inf in the value, the output or the gradients.

References: Parikh & Boyd (2014) section 6.5.4; K. Murray and D. Chiang, *Auto-Sizing Neural
Networks: With Applications to n-gram Language Models*, EMNLP 2015 (l21 and linf1 for
auto-sizing); Murray et al., *Auto-Sizing the Transformer Network*, WNGT 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import _tree, dispatch
from ._base import _PLAIN_TENSORS, Hyper, Prox, check_hyper, is_scalar_hyper
from ._util import block_scale, block_scale_, safe_norm, weighted_sum, zeros_like_value
from .kernels import threshold
from .kernels.cpu import linf1 as linf1_cpu
from .kernels.cuda import linf1 as linf1_cuda
from .norms import _clamp_sym

__all__ = ["l21", "linf1", "GroupProx"]

#: linf1's hand-written kernels by device type (row groups; see :mod:`proxfunc.kernels`).
_LINF1_KERNELS = {"cpu": linf1_cpu, "cuda": linf1_cuda}

Parts = list[tuple[list[torch.Tensor], list[int]]]


def _check_group_dim(owner: str, group_dim: Any) -> Any:
    leaves, _ = pytree.tree_flatten(group_dim)
    for d in leaves:
        if d is not None and (isinstance(d, bool) or not isinstance(d, int)):
            raise TypeError(f"{owner}: group_dim must be an int or a pytree of ints, got {group_dim!r}")
    return group_dim


class GroupProx(Prox):
    """Base of operators with ``f(z) = reg * sum_i g(group_i(z))``."""

    _hyper_names = ("reg", "group_dim")

    def __init__(self, reg: Hyper = 1.0, group_dim: Any = 0):
        name = self._name()
        reg = check_hyper(name, "reg", reg, scalar=False)
        if isinstance(reg, torch.Tensor) and reg.dim() > 1:
            raise ValueError(
                f"{name}: reg must be a number or a vector of one weight per group, got shape {tuple(reg.shape)}"
            )
        self._set(reg=reg, group_dim=_check_group_dim(name, group_dim))

    def _reg(self, count: int) -> Hyper:
        """``reg``, checked against the number of groups when it is a vector of weights."""
        reg = self.reg
        if isinstance(reg, torch.Tensor) and reg.dim() == 1 and reg.shape[0] not in (1, count):
            raise ValueError(f"{self._name()}: reg has {reg.shape[0]} weights but params has {count} groups")
        return reg

    def groups(self, leaves: list[torch.Tensor], tree: _tree.Tree) -> tuple[list[int], int]:
        """The group dim of each leaf and the number of groups (validated)."""
        dims = _tree.group_dims(self.group_dim, leaves, tree, self._name())
        return dims, _tree.group_count(leaves, dims, tree, self._name())

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
        dims, count = self.groups(leaves, tree)
        return weighted_sum(self._reg(count), self._norms(leaves, dims))

    def _parts(self, args: list[Any]) -> tuple[Parts, list[_tree.Tree | None]]:
        """Each argument's floating tensors and their group dims, with the checks of a call,
        and the structures that rebuild each argument from its new leaves."""
        gd = self.group_dim
        if type(gd) is int and all(type(a) in _PLAIN_TENSORS and a.is_floating_point() for a in args):
            if all(-a.dim() <= gd < a.dim() for a in args):  # a pattern rule's tensors, each its groups
                return [([a], [gd % a.dim()]) for a in args], [None] * len(args)
        parts, trees = [], []
        for a in args:
            leaves, tree = _tree.flatten(a, self._name())
            parts.append((leaves, self.groups(leaves, tree)[0] if leaves else []))
            trees.append(tree)
        return parts, trees


def _rebuilt(trees: list[_tree.Tree | None], run: Callable[[], list[list[torch.Tensor]]]) -> Callable[[], list[Any]]:
    """``run``'s new leaves of each argument, put back into the argument's structure (``None``:
    the argument is one tensor)."""
    return lambda: [out[0] if tree is None else tree.unflatten(out) for tree, out in zip(trees, run())]


class l21(GroupProx):  # noqa: N801
    """Prox of the group lasso (l2,1) norm: block soft thresholding of every group.

    ``f(z) = reg * sum_i ||group_i(z)||_2``, and for each group ``g``

        op(x, t)_g = max(1 - reg*t / ||x_g||_2, 0) * x_g.

    One reduction (the squared norm of each group, summed over leaves) and one scale.
    The seed's ``l21(weight, bias)`` is ``pf.l21(reg)((weight, bias), lr)``.
    Parikh & Boyd (2014) section 6.5.4; Murray & Chiang (2015).

    Args:
        reg: weight of the penalty, ``>= 0``; a group dies when its l2 norm is ``<= reg * step``.
        group_dim: the dim along which each leaf is split into groups: an int for every leaf, or a
            pytree of ints with the structure of ``params`` (negative dims count from the end). Group ``i`` is
            slice ``i`` along it of every leaf; all leaves must have the same number of groups.

    Example:
        >>> import torch, proxfunc as pf
        >>> W, b = torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.zeros(2)
        >>> pf.l21(1.0)((W, b), 1.0)   # group i = (W[i, :], b[i])
        (tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]]), tensor([0., 0.]))
    """

    _public_name = "l21"

    def _sq(self, leaves, dims):
        return _tree.total([_tree.reduce_except(x, d, "sumsq") for x, d in zip(leaves, dims)], leaves)

    def _norms(self, leaves, dims):
        return safe_norm(self._sq(leaves, dims))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        dims, count = self.groups(leaves, tree)
        impl, t = dispatch.select(leaves, self._reg(count) * step)
        if impl == dispatch.REFERENCE:
            norms = self._norms(leaves, dims)
            if isinstance(t, torch.Tensor):
                t = t.to(device=norms.device, dtype=norms.dtype)
            scale = block_scale(norms, t)
            return [_scaled(x, scale, d) for x, d in zip(leaves, dims)]
        return _l21_aten([(leaves, dims)], t, False)[0]

    def _prox_batch(self, args, step, in_place):
        if not is_scalar_hyper(self.reg):
            return None
        parts, trees = self._parts(args)
        leaves = [x for xs, _ in parts for x in xs]
        impl, t = dispatch.select(leaves, self.reg * step, in_place=in_place)
        if impl == dispatch.REFERENCE or not all(xs for xs, _ in parts):
            return None
        run = partial(_l21_aten, parts, t, in_place)
        return run if in_place else _rebuilt(trees, run)


def _scaled(x: torch.Tensor, s: torch.Tensor, d: int | None) -> torch.Tensor:
    """``x * s`` with ``s`` along dim ``d`` of ``x``, computed in ``s.dtype``, rounded to ``x.dtype``."""
    return _tree.cast(_tree.cast(x, s.dtype) * _tree.along(s, x, d), x.dtype)


def _l21_aten(parts: Parts, t: float, in_place: bool) -> list[list[torch.Tensor]] | None:
    """l21 of each argument ``(leaves, dims)`` of ``parts`` with eager ATen kernels: one norm
    kernel per tensor, one scale computation for all arguments of one dtype and device
    (reusing the norms' memory, :func:`proxfunc._util.block_scale_`), one multiply per
    tensor, into the tensors themselves with ``in_place`` (float32/float64)."""
    norms = [_joint_norm(xs, ds) for xs, ds in parts]
    if len({(n.dtype, n.device) for n in norms}) == 1:
        scales = block_scale_(torch.cat(norms), t).split([n.numel() for n in norms])
    else:
        scales = [block_scale_(n, t) for n in norms]
    if in_place:
        for (xs, ds), s in zip(parts, scales):
            for x, d in zip(xs, ds):
                x.mul_(_tree.along(s, x, d))
        return None
    return [[_scaled(x, s, d) for x, d in zip(xs, ds)] for (xs, ds), s in zip(parts, scales)]


def _joint_norm(leaves: list[torch.Tensor], dims: list[int]) -> torch.Tensor:
    """The l2 norm of every group over all of ``leaves``, in their accumulation dtype."""
    norms = [_group_norm(x, d) for x, d in zip(leaves, dims)]
    if len(norms) == 1:
        return norms[0]
    dtype = _tree.common_dtype(norms)
    return torch.linalg.vector_norm(torch.stack([m.to(dtype) for m in norms]), 2, dim=0)


def _group_norm(x: torch.Tensor, d: int) -> torch.Tensor:
    """``||x_g||_2`` of every slice ``g`` of ``x`` along ``d``, in the accumulation dtype."""
    acc = _tree.acc_dtype(x)
    if x.dim() == 1:
        return _tree.cast(x, acc).abs()
    other = [i for i in range(x.dim()) if i != d]
    return torch.linalg.vector_norm(x, 2, dim=other, dtype=acc)


class linf1(GroupProx):
    """Prox of the l(inf,1) norm: the sum over groups of each group's max-abs entry.

    ``f(z) = reg * sum_i ||group_i(z)||_inf``. By the Moreau identity each group is

        op(x, t)_g = x_g - P_{||.||_1 <= reg*t}(x_g) = clamp(x_g, -tau_g, tau_g),

    where ``tau_g`` is the threshold of the projection of ``x_g`` onto the l1 ball of radius
    ``reg*t`` (0 when ``||x_g||_1 <= reg*t``: the whole group is zeroed, the neuron dies).
    The thresholds of all groups are found together without sorting (Michelot's fixed point,
    exact; see :mod:`proxfunc.kernels.threshold`). Murray & Chiang (2015) introduced linf1
    for auto-sizing; Parikh & Boyd (2014) sections 2.5, 6.5.2 and 6.5.4; Duchi et al. (2008).

    Args:
        reg: weight of the penalty, ``>= 0``; a group dies when its l1 norm is ``<= reg * step``.
        group_dim: the dim along which each leaf is split into groups: an int for every leaf, or a
            pytree of ints with the structure of ``params`` (negative dims count from the end). Group ``i`` is
            slice ``i`` along it of every leaf; all leaves must have the same number of groups.

    Example:
        >>> import torch, proxfunc as pf
        >>> W = torch.tensor([[3.0, -1.0], [0.3, 0.4]])
        >>> pf.linf1(1.0)(W, 1.0)   # the second row has ||.||_1 <= 1: it dies
        tensor([[ 2., -1.],
                [ 0.,  0.]])
    """

    _public_name = "linf1"

    def _norms(self, leaves, dims):
        return _tree.maximum([_tree.reduce_except(x, d, "amax_abs") for x, d in zip(leaves, dims)])

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        dims, count = self.groups(leaves, tree)
        if not is_scalar_hyper(self._reg(count)):  # a weight per group: the reference
            t = self.reg * step
            parts = [(_tree.cast(x, _tree.acc_dtype(x)), d) for x, d in zip(leaves, dims)]
            t = t.to(device=parts[0][0].device, dtype=parts[0][0].dtype).expand(count)
            tau = threshold(parts, t, traceable=True, absolute=True).clamp_min(0)
            return [_clamp_sym(x, tau, d) for x, d in zip(leaves, dims)]
        impl, t = self._select(leaves, dims, step, False)
        return _linf1(leaves, dims, impl, t, None)

    def _prox_batch(self, args, step, in_place):
        if not is_scalar_hyper(self.reg):
            return None
        parts, trees = self._parts(args)
        plan = []
        for leaves, dims in parts:  # each argument its own kernel call (or ATen's threshold)
            impl, t = self._select(leaves, dims, step, in_place)
            if impl == dispatch.REFERENCE or not leaves:
                return None
            plan.append((leaves, dims, impl, t))
        run = partial(_linf1_all, plan, in_place)
        return run if in_place else _rebuilt(trees, run)

    def _select(self, leaves, dims, step, in_place) -> dispatch.Choice:
        kernels = _LINF1_KERNELS.get(leaves[0].device.type) if leaves else None
        spec = kernels.SPEC if kernels is not None else None
        return dispatch.select(leaves, self.reg * step, in_place=in_place, kernel=spec, dims=dims)


def _linf1_all(plan: list, in_place: bool) -> list[list[torch.Tensor]] | None:
    outs = [_linf1(xs, ds, impl, t, xs if in_place else None) for xs, ds, impl, t in plan]
    return None if in_place else outs


def _linf1(
    leaves: list[torch.Tensor], dims: list[int], impl: str, t: Hyper, out: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """linf1's prox of one argument by ``impl`` (into ``out`` when given: the ``"aten"`` and
    ``"kernel"`` implementations, float32/float64 tensors for ATen)."""
    if impl == dispatch.KERNEL:
        done = _LINF1_KERNELS[leaves[0].device.type].run(leaves, t, out)
        if done is not None:  # None: a CUDA launch failed and switched the kernel off
            return done
    parts = [(_tree.cast(x, _tree.acc_dtype(x)), d) for x, d in zip(leaves, dims)]
    tau = threshold(parts, t, traceable=impl == dispatch.REFERENCE, absolute=True).clamp_min(0)
    if out is None:
        return [_clamp_sym(x, tau, d) for x, d in zip(leaves, dims)]
    return [_clamp_sym(x, tau, d, out=y) for x, d, y in zip(leaves, dims, out)]
