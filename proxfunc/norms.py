"""Norms and separable penalties: l1, l2, linf, elastic net, log barrier.

Every operator here follows the contract of :class:`proxfunc.Prox`:
``op(params, step) = argmin_z f(z) + ||z - params||^2 / (2 * step)`` with ``f`` defined on
the **whole object** given (all leaves of the pytree together).

References: N. Parikh and S. Boyd, *Proximal Algorithms*, Foundations and Trends in
Optimization 1(3), 2014 (section numbers below refer to it).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from . import _facts, _tree, dispatch
from ._base import Hyper, Prox, check_hyper, check_hyper_tree, is_scalar_hyper
from ._util import block_scale, hyper_tensor, leaf_hypers, scaled_norm, weighted_sum, zeros_like_value
from .kernels import threshold
from .kernels.cpu import soft_threshold as soft_threshold_cpu

__all__ = ["l1", "l2", "linf", "elastic_net", "log_barrier", "Elementwise", "soft_threshold"]


_softshrink = torch._C._nn.softshrink  # F.softshrink without the Python wrapper, for ``out=``


def soft_threshold(x: torch.Tensor, t: Hyper) -> torch.Tensor:
    """``sign(x) * max(|x| - t, 0)``, the reference soft threshold (``t >= 0``, a float or a
    tensor broadcasting against ``x``).

    Written ``relu(x - t) - relu(-x - t)``: ``x - t``, ``x + t`` (as ``-(-x - t)``, exact) or
    ``+0``, NaN kept: the same bits as the CPU kernel, and the same values as ATen's
    ``softshrink`` for ``t > 0`` (the eager path for small calls, whose zeros keep the sign
    of the input, ``-0.0``, which compares equal);
    at the kinks ``|x| = t`` the gradient is 0 (a subgradient). Inductor compiles ``relu``
    to one vector ``max`` (its ``clamp`` checks NaN with two more instructions each way).
    Computed in float32 for float16/bfloat16 inputs and rounded once at the end.
    """
    acc = _tree.acc_dtype(x)
    xa = _tree.cast(x, acc)
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=acc)
    return _tree.cast(torch.relu(xa - t) - torch.relu(-xa - t), x.dtype)


def _soft_threshold_aten(leaves: list[torch.Tensor], t: float, out: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """:func:`soft_threshold` of every leaf by ATen's ``softshrink`` (a float ``t >= 0``; into
    ``out``, e.g. the leaves themselves, when given). On CUDA, two or more float32/float64
    tensors go through multi-tensor kernels: ``x - clamp(x, -t, t)``, the same bits."""
    if t == 0:
        return leaves if out is not None else [x.clone() for x in leaves]
    if _foreach(leaves):
        clamped = torch._foreach_clamp_max(leaves, t)
        torch._foreach_clamp_min_(clamped, -t)
        if out is None:
            return list(torch._foreach_sub(leaves, clamped))
        torch._foreach_sub_(out, clamped)
        return out
    if out is not None:
        for x, y in zip(leaves, out):
            _softshrink(x, t, out=y)
        return out
    return [_softshrink(x, t) if x.dtype not in _tree.LOW_DTYPES else _low_softshrink(x, t) for x in leaves]


#: l1's hand-written kernels by device type (:mod:`proxfunc.kernels.cpu.soft_threshold`).
_SOFT_KERNELS = {"cpu": soft_threshold_cpu.SPEC}

#: Device types whose ``_foreach`` kernels l1 uses (one launch for many tensors).
_FOREACH_DEVICES = ("cuda",)


def _foreach(leaves: list[torch.Tensor]) -> bool:
    """Two or more float32/float64 tensors of one dtype and device of :data:`_FOREACH_DEVICES`."""
    if len(leaves) < 2 or leaves[0].device.type not in _FOREACH_DEVICES:
        return False
    first = leaves[0]
    return first.dtype in (torch.float32, torch.float64) and all(
        x.dtype == first.dtype and x.device == first.device for x in leaves
    )


def _low_softshrink(x: torch.Tensor, t: float) -> torch.Tensor:
    """``softshrink`` of a float16/bfloat16 tensor computed in float32, rounded once."""
    return _softshrink(x.float(), t).to(x.dtype)


class Elementwise(Prox):
    """A separable ``f(z) = sum_j g(z_j)``: the prox acts on each entry on its own.

    Hyperparameters listed in ``_entry_hypers`` may vary over the entries (weighted
    penalties): each is a number, a tensor broadcasting to every leaf, or a pytree with the
    structure of ``params`` (one number or tensor per leaf). ``_prox_leaf`` and
    ``_value_leaf`` then see, for each leaf, an operator holding that leaf's values.
    """

    separable = True
    #: Hyperparameters that may be a tensor or a pytree (validated by ``check_hyper_tree``).
    _entry_hypers: tuple[str, ...] = ()

    def _per_leaf(self, leaves, tree) -> list[Elementwise] | None:
        """One operator per leaf holding its hyperparameter values; ``None`` when every
        hyperparameter is one number for all entries (the common case)."""
        if all(is_scalar_hyper(getattr(self, k)) for k in self._entry_hypers):
            return None
        per = {k: leaf_hypers(getattr(self, k), leaves, tree, self._name(), k) for k in self._entry_hypers}
        ops = []
        for i in range(len(leaves)):
            op = object.__new__(type(self))
            op._set(**{k: getattr(self, k) for k in self._hyper_names})
            op._set(**{k: v[i] for k, v in per.items()})
            ops.append(op)
        return ops

    def _prox(self, leaves, step, tree):
        ops = self._per_leaf(leaves, tree)
        if ops is not None:
            return [op._prox_leaf(x, step) for op, x in zip(ops, leaves)]
        return [self._prox_leaf(x, step) for x in leaves]

    def _value(self, leaves, tree):
        ops = self._per_leaf(leaves, tree)
        if ops is not None:
            parts = [op._value_leaf(x) for op, x in zip(ops, leaves)]
        else:
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

    Args:
        reg: weight of the norm, ``>= 0`` (float or 0-d tensor); the threshold is ``reg * step``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l1(0.5)(torch.tensor([-2.0, 0.3, 1.0]), 1.0)
        tensor([-1.5000,  0.0000,  0.5000])
    """

    _hyper_names = ("reg",)
    _entry_hypers = ("reg",)
    _public_name = "l1"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper_tree("l1", "reg", reg))

    def _prox(self, leaves, step, tree):
        if not is_scalar_hyper(self.reg):  # weights per entry or per leaf
            return super()._prox(leaves, step, tree)
        t = self.reg * step
        impl, tf = dispatch.select(leaves, t, kernel=_SOFT_KERNELS.get(leaves[0].device.type) if leaves else None)
        if impl == dispatch.REFERENCE:
            return [soft_threshold(x, t) for x in leaves]
        if impl == dispatch.KERNEL:
            return soft_threshold_cpu.run(leaves, tf)
        return _soft_threshold_aten(leaves, tf, None)

    def _prox_batch(self, args, step, in_place):
        if not is_scalar_hyper(self.reg):
            return None
        if not in_place:
            return super()._prox_batch(args, step, in_place)
        # a partition's pattern rule hands the same tensors (a model's parameters) every step:
        # their facts are remembered (proxfunc._facts), and shared with select
        facts = _facts.of(args)
        if facts is not None and facts.floating:
            leaves = list(args)
        else:
            leaves, facts = self._leaves_of(args), None
        kernel = _SOFT_KERNELS.get(leaves[0].device.type) if leaves else None
        t = dispatch.host_product(self.reg, step)  # a float for a step select would read on the host
        impl, tf = dispatch.select(leaves, t, in_place=True, kernel=kernel, facts=facts)
        if impl == dispatch.REFERENCE:
            return None
        if impl == dispatch.KERNEL:
            return partial(soft_threshold_cpu.run, leaves, tf, leaves)
        return partial(_soft_threshold_aten, leaves, tf, leaves)

    def _prox_leaf(self, x, step):
        return soft_threshold(x, self.reg * step)

    def _value_leaf(self, x):
        if not is_scalar_hyper(self.reg):
            return weighted_sum(self.reg, _tree.cast(x, _tree.acc_dtype(x)).abs())
        return self.reg * _tree.reduce_except(x, None, "abssum")[0]


class elastic_net(Elementwise):  # noqa: N801
    """Prox of the elastic net penalty.

    ``f(z) = reg * (||z||_1 + gamma/2 * ||z||_2^2)``, and

        op(x, t) = soft_threshold(x, reg*t) / (1 + reg*gamma*t).

    Parikh & Boyd (2014), section 6.5.3 (Zou & Hastie 2005). ``gamma >= 0``; ``gamma = 0`` is l1.

    Args:
        reg: overall weight, ``>= 0``.
        gamma: weight of the squared term relative to the l1 term, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.elastic_net(0.5, gamma=1.0)(torch.tensor([-2.0, 0.3, 1.0]), 1.0)
        tensor([-1.0000,  0.0000,  0.3333])
    """

    _hyper_names = ("reg", "gamma")
    _entry_hypers = ("reg", "gamma")
    _public_name = "elastic_net"

    def __init__(self, reg: Hyper = 1.0, gamma: Hyper = 1.0):
        self._set(
            reg=check_hyper_tree("elastic_net", "reg", reg), gamma=check_hyper_tree("elastic_net", "gamma", gamma)
        )

    def _prox_leaf(self, x, step):
        t = self.reg * step
        shrink = 1.0 + t * self.gamma
        y = soft_threshold(x, t).to(_tree.acc_dtype(x))
        return (y / shrink).to(x.dtype)

    def _value_leaf(self, x):
        if not (is_scalar_hyper(self.reg) and is_scalar_hyper(self.gamma)):
            xa = _tree.cast(x, _tree.acc_dtype(x))
            g = self.gamma.to(xa) if isinstance(self.gamma, torch.Tensor) else self.gamma
            return weighted_sum(self.reg, xa.abs() + 0.5 * g * xa * xa)
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

    Args:
        reg: weight of the barrier, ``> 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.log_barrier(1.0)(torch.tensor([-1.0, 0.0, 2.0]), 1.0)
        tensor([0.6180, 1.0000, 2.4142])
    """

    _hyper_names = ("reg",)
    _public_name = "log_barrier"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("log_barrier", "reg", reg, strict=True))

    def _prox_leaf(self, x, step):
        acc = _tree.acc_dtype(x)
        xa = x.to(acc)
        rt = self.reg * step
        # sqrt(4 rt) of a Python number before the cast: 4 rt alone may be beyond the dtype's range
        if isinstance(rt, float):
            c = hyper_tensor(math.sqrt(4.0 * rt), acc, x.device)
        else:
            c = torch.sqrt(hyper_tensor(4.0 * rt, acc, x.device))
        h = torch.hypot(xa, c)  # sqrt(x^2 + 4rt) without overflow
        neg = xa < 0
        denom = torch.where(neg, 0.5 * h - 0.5 * xa, torch.ones_like(xa))  # (h - x) / 2: h - x may overflow
        # 2 rt / (h - x) as (c / denom) * (c / 4): 2 rt alone may be beyond the dtype's range
        z = torch.where(neg, (c / denom) * (0.25 * c), 0.5 * xa + 0.5 * h)  # halves first: x + h may overflow
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

    Args:
        reg: weight of the norm, ``>= 0``; one norm over all leaves together.

    Example:
        >>> import torch, proxfunc as pf
        >>> x = torch.tensor([3.0, 4.0])
        >>> pf.l2(1.0)(x, 1.0)   # one norm over all leaves: x * (1 - 1/5)
        tensor([2.4000, 3.2000])
    """

    _hyper_names = ("reg",)
    _public_name = "l2"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("l2", "reg", reg))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        n = scaled_norm(list(leaves))  # the squares neither overflow nor underflow
        t = self.reg * step
        scale = block_scale(n, t)
        return [_tree.cast(_tree.cast(x, scale.dtype) * scale, x.dtype) for x in leaves]

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        return self.reg * scaled_norm(list(leaves))


class linf(Prox):
    """Prox of the max-norm of the whole object.

    ``f(z) = reg * max_j |z_j|`` over all entries of all leaves. By the Moreau identity
    ``op(x, t) = x - P_{||.||_1 <= reg*t}(x) = clamp(x, -tau, tau)``, where ``tau`` is the
    threshold of the projection onto the l1 ball of radius ``reg*t`` (``tau = max|x|``, the
    identity, when ``reg*t = 0``). Parikh & Boyd (2014), sections 2.5 and 6.5.2; the l1-ball
    threshold is found without sorting (see :mod:`proxfunc.kernels.threshold`).

    Args:
        reg: weight of the norm, ``>= 0``; one max over all leaves together.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.linf(1.0)(torch.tensor([3.0, -1.0, 0.5]), 1.0)
        tensor([ 2.0000, -1.0000,  0.5000])
    """

    _hyper_names = ("reg",)
    _public_name = "linf"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("linf", "reg", reg))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        impl, t = dispatch.select(leaves, self.reg * step)
        parts = [(_tree.cast(x, _tree.acc_dtype(x)), None) for x in leaves]
        tau = threshold(parts, t, traceable=impl == dispatch.REFERENCE, absolute=True).clamp_min(0)
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
