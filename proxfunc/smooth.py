"""Smooth terms and order-statistic norms: ridge, quadratic, Huber, negative entropy,
sum of the k largest entries, max entry.

Every operator follows the contract of :class:`proxfunc.Prox`:
``op(params, step) = argmin_z f(z) + ||z - params||^2 / (2 * step)``. Separable ones act on
each entry; the others take the **whole object** (all leaves flattened in pytree order and
concatenated into one vector ``z``).

References: N. Parikh and S. Boyd, *Proximal Algorithms*, 2014 (sections cited per operator).
"""

from __future__ import annotations

import math

import torch

from . import _tree, dispatch
from ._base import Hyper, Prox, check_hyper, check_hyper_tree
from ._util import hyper_tensor, weighted_sum, zeros_like_value
from .kernels import threshold
from .norms import Elementwise
from .sets import _hyper_as, _vec, check_k, flat, knapsack_lambda, unflat

__all__ = ["ridge", "quadratic", "huber", "neg_entropy", "sum_largest", "max_entry"]


class ridge(Elementwise):  # noqa: N801
    """Prox of the ridge (squared l2) penalty ``f(z) = reg/2 * ||z||_2^2``.

        op(x, t) = x / (1 + reg*t).

    Separable. Parikh & Boyd (2014) section 6.1.1 (``A = reg*I``).

    Args:
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.ridge(1.0)(torch.tensor([2.0, -4.0]), 1.0)
        tensor([ 1., -2.])
    """

    _hyper_names = ("reg",)
    _entry_hypers = ("reg",)
    _public_name = "ridge"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper_tree("ridge", "reg", reg))

    def _prox_leaf(self, x, step):
        acc = _tree.acc_dtype(x)
        return (x.to(acc) / (1.0 + _hyper_as(self.reg, x.to(acc)) * step)).to(x.dtype)

    def _value_leaf(self, x):
        if isinstance(self.reg, torch.Tensor) and self.reg.dim() > 0:
            xa = x.to(_tree.acc_dtype(x))
            return 0.5 * weighted_sum(self.reg, xa * xa)
        return 0.5 * self.reg * _tree.reduce_except(x, None, "sumsq")[0]


class quadratic(Prox):  # noqa: N801
    """Prox of a convex quadratic ``f(z) = 1/2 z^T A z + b^T z + c`` on the whole object.

        op(x, t) = (I + t A)^{-1} (x - t b).

    ``A`` is a symmetric positive semidefinite ``(n, n)`` tensor (``n`` = number of entries of
    ``params``; ``ValueError`` naming ``A`` otherwise; singular ``A`` is allowed), ``b`` an
    optional tensor with ``n`` entries and ``c`` an optional constant (a float or 0-d tensor;
    ``None`` is 0; it changes ``value`` only). The conjugate is ``f*(y) = 1/2 (y - b)^T A^+ (y - b) - c`` for
    ``y - b`` in the range of ``A`` and ``+inf`` elsewhere (see :func:`proxfunc.conjugate`).
    ``A = Q diag(w) Q^T`` is factorised **once, at construction**, so every step costs
    two matrix-vector products: ``op(x, t) = Q diag(1 / (1 + t w)) Q^T (x - t b)``.
    Parikh & Boyd (2014) section 6.1.1.

    Args:
        A: symmetric positive semidefinite ``(n, n)`` tensor, ``n`` the number of entries of ``params``.
        b: the linear term, ``n`` entries (default none).

    Example:
        >>> import torch, proxfunc as pf
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> pf.quadratic(A)(torch.tensor([3.0, 2.0]), 1.0)   # (I + t A)^-1 x
        tensor([1., 1.])
    """

    _hyper_names = ("A", "b", "c")
    _public_name = "quadratic"

    def __init__(self, A: torch.Tensor, b: torch.Tensor | None = None, c: Hyper | None = None):
        A = _vec("quadratic", "A", A)
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"quadratic: A must be a square matrix, got shape {tuple(A.shape)}")
        if b is not None:
            b = _vec("quadratic", "b", b)
            if b.numel() != A.shape[0]:
                raise ValueError(f"quadratic: b must have {A.shape[0]} entries, got {b.numel()}")
        with torch.no_grad():
            Ad = A.detach().double()
            scale = float(Ad.abs().max()) if Ad.numel() else 0.0
            if float((Ad - Ad.T).abs().max() if Ad.numel() else 0.0) > 1e-10 * (1 + scale):
                raise ValueError("quadratic: A must be symmetric")
            w, Q = torch.linalg.eigh(0.5 * (Ad + Ad.T))
            # a PSD matrix rounded to A's dtype may have eigenvalues down to about -n eps |A|
            neg_tol = max(1e-10, 8 * max(A.shape[0], 1) * torch.finfo(A.dtype).eps) * (1 + scale)
            if w.numel() and float(w.min()) < -neg_tol:
                raise ValueError(f"quadratic: A must be positive semidefinite, smallest eigenvalue {float(w.min()):g}")
        self._set(
            A=A,
            b=b,
            c=None if c is None else check_hyper("quadratic", "c", c, min_value=None),
            _cache_w=w.clamp_min(0),
            _cache_Q=Q,
        )

    def _check_n(self, v):
        if v.numel() != self.A.shape[0]:
            raise ValueError(f"quadratic: A is {tuple(self.A.shape)} but params has {v.numel()} entries")

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        self._check_n(v)
        if self.b is not None:
            v = v - step * self.b.reshape(-1).to(v)
        if self.A.requires_grad:
            A = self.A.to(v)  # differentiable path in A (hyperparameter learning)
            eye = torch.eye(v.numel(), dtype=v.dtype, device=v.device)
            return unflat(torch.linalg.solve(eye + step * 0.5 * (A + A.T), v), leaves)
        w = self._cache_w.to(v)
        Q = self._cache_Q.to(v)
        return unflat(Q @ ((Q.T @ v) / (1.0 + step * w)), leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        self._check_n(v)
        val = 0.5 * v @ (self.A.to(v) @ v)
        if self.b is not None:
            val = val + self.b.reshape(-1).to(v) @ v
        return val if self.c is None else val + _hyper_as(self.c, val)


class huber(Elementwise):  # noqa: N801
    """Prox of the Huber function ``f(z) = reg * sum_j h(z_j)``, the true prox in both regimes.

    ``h(u) = u^2 / 2`` for ``|u| <= delta`` and ``delta * (|u| - delta/2)`` otherwise, and

        op(x, t) = x / (1 + reg*t)              if |x| <= delta * (1 + reg*t)
        op(x, t) = x - reg*t*delta*sign(x)      otherwise.

    ``reg >= 0``, ``delta > 0``. Parikh & Boyd (2014) section 6.5.2 (with their ``rho = reg*t``).

    Args:
        reg: weight of the penalty, ``>= 0``.
        delta: where the quadratic becomes linear, ``> 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.huber(1.0, 1.0)(torch.tensor([0.5, 4.0]), 1.0)
        tensor([0.2500, 3.0000])
    """

    _hyper_names = ("reg", "delta")
    _entry_hypers = ("reg", "delta")
    _public_name = "huber"

    def __init__(self, reg: Hyper = 1.0, delta: Hyper = 1.0):
        self._set(
            reg=check_hyper_tree("huber", "reg", reg), delta=check_hyper_tree("huber", "delta", delta, strict=True)
        )

    def _prox_leaf(self, x, step):
        xa = x.to(_tree.acc_dtype(x))
        rt = _hyper_as(self.reg, xa) * step
        d = _hyper_as(self.delta, xa)
        quad = xa / (1.0 + rt)
        lin = xa - rt * d * torch.sign(xa)
        return torch.where(xa.abs() <= d * (1.0 + rt), quad, lin).to(x.dtype)

    def _value_leaf(self, x):
        xa = x.to(_tree.acc_dtype(x)).abs()
        d = _hyper_as(self.delta, xa)
        h = torch.where(xa <= d, 0.5 * xa * xa, d * (xa - 0.5 * d))
        return weighted_sum(self.reg, h)


class neg_entropy(Elementwise):  # noqa: N801
    """Prox of the negative entropy ``f(z) = reg * sum_j z_j log z_j`` on ``z >= 0`` (``0 log 0 = 0``).

    With ``c = reg*t > 0`` the optimality condition ``z - x + c (log z + 1) = 0`` gives

        op(x, t) = c * W(exp(x/c - 1) / c),

    ``W`` the Lambert W function. It is evaluated without overflow through ``v = log W``:
    ``v + exp(v) = L``, ``L = x/c - 1 - log c``, solved by Newton's method from a start right of
    the root (``v0 = log L`` for ``L > 1``, else ``L``) where the convex increasing residual makes
    the iterates decrease monotonically (no overshoot); 40 fixed steps reach float64 precision.
    Results below the smallest positive float round to 0. ``reg > 0``; ``value`` is ``inf`` if any
    entry is negative. Parikh & Boyd (2014) section 6.1 (entropy), Corless et al. (1996).

    Args:
        reg: weight of the penalty, ``> 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.neg_entropy(1.0)(torch.tensor([1.0, 2.0]), 1.0)
        tensor([0.5671, 1.0000])
    """

    _hyper_names = ("reg",)
    _public_name = "neg_entropy"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("neg_entropy", "reg", reg, strict=True))

    def _prox_leaf(self, x, step):
        acc = _tree.acc_dtype(x)
        xa = x.to(acc)
        rt = self.reg * step
        if isinstance(rt, float) and rt > torch.finfo(acc).max:  # c beyond the dtype: in logarithms,
            # z = exp(v + log c) with v + e^v = x / c - 1 - log c (x / c scaled through 2**64)
            logc = math.log(rt)
            L = (xa * 2.0**-64) * (2.0**64 / rt) - 1.0 - logc
            v = L - torch.log1p(torch.exp(L))  # L is below -88 here: e^v = e^L to rounding
            for _ in range(3):
                ev = torch.exp(v)
                v = v - (v + ev - L) / (1.0 + ev)
            return torch.exp(v + logc).to(x.dtype)
        c = hyper_tensor(rt, acc, x.device)
        L = xa / c - 1.0 - torch.log(c)
        # x / c beyond the dtype's range: z = x - c (1 + log z) with z = x to rounding
        # (-inf: z = c W(e^L) underflows to 0)
        over, under = L == float("inf"), L == float("-inf")
        L = torch.where(over | under, torch.ones_like(L), L)
        big = L > 1.0
        v = torch.where(big, torch.log(torch.where(big, L, torch.ones_like(L))), L)
        for _ in range(40):
            ev = torch.exp(v)
            v = v - (v + ev - L) / (1.0 + ev)
        xo = torch.where(over, xa, torch.ones_like(xa))
        z = torch.where(over, xo - c * (1.0 + torch.log(xo)), c * torch.exp(v))
        return torch.where(under, torch.zeros_like(z), z).to(x.dtype)

    def _value_leaf(self, x):
        xa = x.to(_tree.acc_dtype(x))
        ok = (xa >= 0).all()
        val = torch.special.xlogy(xa.clamp_min(0), xa.clamp_min(0)).sum()
        return torch.where(ok, self.reg * val, torch.full_like(val, float("inf")))


class sum_largest(Prox):  # noqa: N801
    """Prox of the sum of the k largest entries, ``f(z) = reg * sum_{i<=k} z_[i]`` (whole object).

    ``f`` is the support function of ``reg * C``, ``C = {y : 0 <= y <= 1, sum y = k}``, so by the
    Moreau identity

        op(x, t) = x - P_{t*reg*C}(x),

    the projection onto a box ∩ hyperplane (capped simplex), computed by bisection with an exact
    finish (:func:`proxfunc.sets.knapsack_lambda`). ``1 <= k <= numel`` (``ValueError`` naming ``k``
    otherwise). ``k = 1`` is :class:`max_entry`. Parikh & Boyd (2014) sections 2.5 and 6.4.

    Args:
        k: how many of the largest entries are summed, ``>= 0``.
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.sum_largest(1, 1.0)(torch.tensor([3.0, 1.0, 0.5]), 1.0)
        tensor([2.0000, 1.0000, 0.5000])
    """

    _hyper_names = ("k", "reg")
    _public_name = "sum_largest"

    def __init__(self, k: int = 1, reg: Hyper = 1.0):
        k = check_k("sum_largest", k)
        if k < 1:
            raise ValueError("sum_largest: k must be >= 1")
        self._set(k=k, reg=check_hyper("sum_largest", "reg", reg))

    def _check(self, v):
        if self.k > v.numel():
            raise ValueError(f"sum_largest: k={self.k} is larger than the number of entries {v.numel()}")

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        self._check(v)
        cap = hyper_tensor(self.reg * step, v.dtype, v.device)
        ones = torch.ones_like(v)
        lam = knapsack_lambda(v, ones, torch.zeros_like(v), cap * ones, self.k * cap)
        y = torch.clamp(v - lam, torch.zeros_like(v), cap * ones)
        return unflat(v - y, leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        self._check(v)
        return self.reg * torch.topk(v, self.k).values.sum()


class max_entry(Prox):  # noqa: N801
    """Prox of the largest entry ``f(z) = reg * max_j z_j`` (whole object; not the max-abs).

    ``f`` is the support function of ``reg`` times the unit simplex, so by the Moreau identity

        op(x, t) = x - P_{simplex(reg*t)}(x) = min(x, theta),

    ``theta`` the simplex threshold of ``x`` with radius ``reg*t`` (sort-free, exact, from
    :mod:`proxfunc.kernels.threshold`). Parikh & Boyd (2014) sections 2.5 and 6.4.1.

    Args:
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.max_entry(1.0)(torch.tensor([3.0, 1.0, 0.5]), 1.0)
        tensor([2.0000, 1.0000, 0.5000])
    """

    _hyper_names = ("reg",)
    _public_name = "max_entry"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("max_entry", "reg", reg))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        r = self.reg * step
        theta = threshold([(v, None)], r, traceable=dispatch.reference_only(leaves, r))
        return unflat(torch.minimum(v, theta), leaves)

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        return self.reg * flat(leaves).max()
