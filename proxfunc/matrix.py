"""Matrix operators on singular values: nuclear norm, nuclear-norm ball, spectral norm, rank-k set.

Every leaf of ``params`` is a stack of matrices ``(..., m, n)`` (the last two dims); a leaf with
fewer than two dims raises ``ValueError`` naming it. The whole object is the block-diagonal
matrix of all these matrices, so (consistently with the rest of proxfunc):

* ``nuclear``: ``f = reg * sum over all matrices of ||Z_b||_*`` (separable: SVT of each matrix);
* ``nuclear_ball``: ``{sum_b ||Z_b||_* <= radius}``, one ball over all matrices together;
* ``spectral``: ``f = reg * max_b ||Z_b||_2``, the dual norm of the nuclear norm;
* ``rank_k``: ``{rank(Z_b) <= k for every b}`` (each matrix on its own; not convex).

For a per-matrix ball or spectral norm, ``torch.vmap`` the operator over the batch dim.
Singular values come from ``torch.linalg.svd`` (float32 for half types).

References: N. Parikh and S. Boyd, *Proximal Algorithms*, 2014, section 6.7; Cai, Candès & Shen,
*A singular value thresholding algorithm for matrix completion*, SIAM J. Optim. 2010; Eckart &
Young (1936).
"""

from __future__ import annotations

import torch

from . import _tree, dispatch
from ._base import Hyper, Prox, check_hyper, is_concrete
from ._util import indicator, zeros_like_value
from .kernels import threshold
from .projections import Projection
from .sets import check_k, set_tol

__all__ = ["nuclear", "nuclear_ball", "spectral", "rank_k", "weighted_nuclear"]


def _check_mats(owner: str, leaves, tree) -> None:
    for x, p in zip(leaves, tree.paths):
        if x.dim() < 2:
            raise ValueError(
                f"{owner}: params{p} must be a matrix or a stack of matrices (..., m, n), got shape {tuple(x.shape)}"
            )


def _svd(x: torch.Tensor):
    """Thin SVD in the accumulation dtype. Only ``s`` stays in the autograd graph (the singular
    vectors are detached; :class:`_SpectralApply` differentiates through them safely)."""
    try:
        U, s, Vh = torch.linalg.svd(x.to(_tree.acc_dtype(x)), full_matrices=False)
    except torch.linalg.LinAlgError as e:  # NaN or inf entries: LAPACK does not converge
        raise ValueError(f"params must be finite (no NaN or inf) for a singular value decomposition: {e}") from None
    return U.detach(), s, Vh.detach()


def _divided_differences(s, fs, slope):
    """``K_s = (f_i - f_j)/(s_i - s_j)``, ``K_a = (f_i + f_j)/(s_i + s_j)`` and ``f_i / s_i``,
    each replaced by its limit (the local slope of ``f``) where the denominator vanishes."""
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    fi, fj = fs.unsqueeze(-1), fs.unsqueeze(-2)
    mean_slope = 0.5 * (slope.unsqueeze(-1) + slope.unsqueeze(-2))
    tol = torch.finfo(s.dtype).eps * 8 * (s.amax(dim=-1, keepdim=True).unsqueeze(-1) + torch.finfo(s.dtype).tiny)
    dif, tot = si - sj, si + sj
    ks = torch.where(dif.abs() > tol, (fi - fj) / torch.where(dif.abs() > tol, dif, torch.ones_like(dif)), mean_slope)
    ka = torch.where(tot > tol, (fi + fj) / torch.where(tot > tol, tot, torch.ones_like(tot)), mean_slope)
    tol1 = tol.squeeze(-1)
    ratio = torch.where(s > tol1, fs / torch.where(s > tol1, s, torch.ones_like(s)), slope)
    return ks, ka, ratio


def _vectors_part(U, s, Vh, fs, slope, D, m, n):
    """The singular-vector part ``L(D)`` of the derivative of ``X -> U diag(f(s)) V^T``.

    ``L`` is self-adjoint, so the same map gives the forward-mode tangent (``D = dX``) and the
    reverse-mode cotangent (``D = G``); see :class:`_SpectralApply`.
    """
    V = Vh.transpose(-1, -2)
    Ut = U.transpose(-1, -2)
    A = Ut @ D @ V
    ks, ka, ratio = _divided_differences(s, fs, slope)
    sym, skew = 0.5 * (A + A.transpose(-1, -2)), 0.5 * (A - A.transpose(-1, -2))
    k = s.shape[-1]
    eye = torch.eye(k, dtype=s.dtype, device=s.device)
    out = U @ ((ks * sym + ka * skew) * (1 - eye)) @ Vh
    if m > k:
        DV = D @ V
        out = out + ((DV - U @ (Ut @ DV)) * ratio.unsqueeze(-2)) @ Vh
    if n > k:
        UtD = Ut @ D
        out = out + (U * ratio.unsqueeze(-2)) @ (UtD - (UtD @ V) @ Vh)
    return out


class _SpectralApply(torch.autograd.Function):
    """``Y = U diag(fs) V^T`` for ``X = U diag(s) V^T``, with derivatives that stay finite.

    ``fs = f(s)`` is computed by the caller in the graph (so derivatives reach ``s``, and through
    ``s`` the input, and any hyperparameter of ``f``); this function adds the part that flows
    through the singular vectors. For ``A = U^T D V`` that part is

        L(D) = U (K_s o sym(A) + K_a o skew(A))_{offdiag} V^T
               + (I - U U^T) D V diag(fs/s) V^T + U diag(fs/s) U^T D (I - V V^T),

    ``K_s = (f_i - f_j)/(s_i - s_j)``, ``K_a = (f_i + f_j)/(s_i + s_j)`` (Lewis & Sendov 2005).
    ``L`` is self-adjoint (``K_s``, ``K_a`` are symmetric and the projections orthogonal), so
    ``backward`` applies it to the output cotangent ``G`` and ``jvp`` to the input tangent ``dX``
    (plus ``U diag(dfs) V^T``): forward and reverse mode agree. At equal (or zero) singular values
    the divided differences take their limit, the local slope of ``f`` given in ``slope`` — where
    PyTorch's SVD derivatives divide by ``s_i^2 - s_j^2 = 0`` and return NaN (zero matrices,
    pruned layers, thresholded ties).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(X, U, s, Vh, fs, slope):
        return (U * fs.unsqueeze(-2)) @ Vh

    @staticmethod
    def setup_context(ctx, inputs, output):
        X, U, s, Vh, fs, slope = inputs
        ctx.save_for_backward(U, s, Vh, fs, slope)
        ctx.save_for_forward(U, s, Vh, fs, slope)
        ctx.shape = X.shape

    @staticmethod
    def backward(ctx, G):
        U, s, Vh, fs, slope = ctx.saved_tensors
        gX = _vectors_part(U, s, Vh, fs, slope, G, ctx.shape[-2], ctx.shape[-1])
        gfs = torch.diagonal(U.transpose(-1, -2) @ G @ Vh.transpose(-1, -2), dim1=-2, dim2=-1)
        return gX, None, None, None, gfs, None

    @staticmethod
    def jvp(ctx, dX, dU, ds, dVh, dfs, dslope):
        # U, Vh are detached by the caller (their tangents are in L); s enters only through fs.
        U, s, Vh, fs, slope = ctx.saved_tensors
        out = torch.zeros(U.shape[:-1] + Vh.shape[-1:], dtype=U.dtype, device=U.device)
        if dX is not None:
            out = out + _vectors_part(U, s, Vh, fs, slope, dX, ctx.shape[-2], ctx.shape[-1])
        if dfs is not None:
            out = out + (U * dfs.unsqueeze(-2)) @ Vh
        return out


def _spectral(x: torch.Tensor, U, s, Vh, fs, slope) -> torch.Tensor:
    """``U diag(fs) Vh`` cast like ``x``, differentiable through the singular vectors safely."""
    xa = x.to(s.dtype)
    return _SpectralApply.apply(xa, U, s, Vh, fs, slope.to(s.dtype)).to(x.dtype)


def _svals(x: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.svdvals(x.to(_tree.acc_dtype(x)))
    except torch.linalg.LinAlgError as e:  # NaN or inf entries: LAPACK does not converge
        raise ValueError(f"params must be finite (no NaN or inf) for a singular value decomposition: {e}") from None


def _joint_tau(svals: list[torch.Tensor], radius, leaves) -> torch.Tensor:
    """The l1-ball threshold of all singular values together (0 inside the ball)."""
    parts = [(s.reshape(-1), None) for s in svals]
    return threshold(parts, radius, traceable=dispatch.reference_only(leaves, radius)).clamp_min(0)


class nuclear(Prox):  # noqa: N801
    """Prox of the nuclear norm (singular value thresholding), batched over matrices.

    ``f(Z) = reg * sum_b ||Z_b||_*`` (sum of singular values of every matrix), and for each
    matrix ``X = U diag(s) V^T``

        op(X, t) = U diag(max(s - reg*t, 0)) V^T.

    Parikh & Boyd (2014) section 6.7.3; Cai, Candès & Shen (2010).

    Args:
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.nuclear(1.0)(torch.diag(torch.tensor([3.0, 0.5])), 1.0)   # singular values 3, 0.5 -> 2, 0
        tensor([[2., 0.],
                [0., 0.]])
    """

    _hyper_names = ("reg",)
    _public_name = "nuclear"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("nuclear", "reg", reg))

    def _prox(self, leaves, step, tree):
        _check_mats(self._name(), leaves, tree)
        out = []
        for x in leaves:
            U, s, Vh = _svd(x)
            t = self.reg * step
            out.append(_spectral(x, U, s, Vh, torch.clamp_min(s - t, 0), s > t))
        return out

    def _value(self, leaves, tree):
        _check_mats(self._name(), leaves, tree)
        if not leaves:
            return zeros_like_value(leaves)
        return self.reg * _tree.total([_svals(x).sum() for x in leaves], leaves)


class nuclear_ball(Projection):  # noqa: N801
    """Projection onto the nuclear-norm ball ``{Z : sum_b ||Z_b||_* <= radius}``, ``radius >= 0``.

        op(X) = X                              if sum_b ||X_b||_* <= radius (unchanged)
        op(X)_b = U_b diag(max(s_b - tau, 0)) V_b^T   otherwise,

    ``tau`` the l1-ball threshold of all singular values of all matrices together
    (``sum max(s - tau, 0) = radius``; sort-free, exact). Parikh & Boyd (2014) section 6.7.

    Args:
        radius: radius of the ball, ``>= 0``, over all matrices together.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.nuclear_ball(1.0)(torch.diag(torch.tensor([3.0, 1.0])))
        tensor([[1., 0.],
                [0., 0.]])
    """

    _hyper_names = ("radius",)
    _public_name = "nuclear_ball"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("nuclear_ball", "radius", radius))

    def _prox(self, leaves, step, tree):
        _check_mats(self._name(), leaves, tree)
        if not leaves:
            return []
        svd = [_svd(x) for x in leaves]
        tau = _joint_tau([s for _, s, _ in svd], self.radius, leaves)
        inside = tau <= 0
        return [
            torch.where(inside, x, _spectral(x, U, s, Vh, torch.clamp_min(s - tau, 0), s > tau))
            for x, (U, s, Vh) in zip(leaves, svd)
        ]

    def _value(self, leaves, tree):
        _check_mats(self._name(), leaves, tree)
        if not leaves:
            return zeros_like_value(leaves)
        n = _tree.total([_svals(x).sum() for x in leaves], leaves)
        tol = set_tol(leaves, sum(x.numel() for x in leaves))
        return indicator(n <= self.radius + tol * (n + abs(self.radius)), n.dtype)


class spectral(Prox):  # noqa: N801
    """Prox of the spectral (operator) norm ``f(Z) = reg * max_b ||Z_b||_2``, via the Moreau identity.

    The dual norm is the nuclear norm, so ``op(X, t) = X - P_{nuclear_ball(reg*t)}(X)``, i.e.

        op(X, t)_b = U_b diag(min(s_b, tau)) V_b^T,

    ``tau`` the l1-ball threshold of all singular values with radius ``reg*t`` (the result is 0
    when ``sum ||X_b||_* <= reg*t``). Parikh & Boyd (2014) sections 2.5 and 6.7.

    Args:
        reg: weight of the penalty, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.spectral(1.0)(torch.diag(torch.tensor([3.0, 1.0])), 1.0)
        tensor([[2., 0.],
                [0., 1.]])
    """

    _hyper_names = ("reg",)
    _public_name = "spectral"

    def __init__(self, reg: Hyper = 1.0):
        self._set(reg=check_hyper("spectral", "reg", reg))

    def _prox(self, leaves, step, tree):
        _check_mats(self._name(), leaves, tree)
        if not leaves:
            return []
        svd = [_svd(x) for x in leaves]
        tau = _joint_tau([s for _, s, _ in svd], self.reg * step, leaves)
        return [_spectral(x, U, s, Vh, torch.minimum(s, tau), s < tau) for x, (U, s, Vh) in zip(leaves, svd)]

    def _value(self, leaves, tree):
        _check_mats(self._name(), leaves, tree)
        if not leaves:
            return zeros_like_value(leaves)
        tops = []
        for x in leaves:
            s = _svals(x)
            tops.append(s.max() if s.numel() else s.new_zeros(()))
        return self.reg * _tree.maximum(tops)


class rank_k(Projection):  # noqa: N801
    """Projection onto the matrices of rank at most ``k`` (each matrix on its own; not convex).

        op(X) = U diag(s_1, ..., s_k, 0, ..., 0) V^T    (truncated SVD),

    a global minimiser of ``||Z - X||_F`` over ``rank(Z) <= k`` (Eckart & Young 1936). When
    ``s_k = s_{k+1}`` the minimiser is not unique; the one returned keeps the singular vectors
    that ``torch.linalg.svd`` lists first. ``0 <= k <= min(m, n)`` (``ValueError`` naming ``k``).

    Args:
        k: the largest rank kept, ``<= min(m, n)``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.rank_k(1)(torch.diag(torch.tensor([3.0, 1.0])))
        tensor([[3., 0.],
                [0., 0.]])
    """

    _hyper_names = ("k",)
    _public_name = "rank_k"

    def __init__(self, k: int):
        self._set(k=check_k("rank_k", k))

    def _check(self, leaves, tree):
        _check_mats(self._name(), leaves, tree)
        for x, p in zip(leaves, tree.paths):
            if self.k > min(x.shape[-2:]):
                raise ValueError(f"rank_k: k={self.k} exceeds min(m, n)={min(x.shape[-2:])} of params{p}")

    def _prox(self, leaves, step, tree):
        self._check(leaves, tree)
        out = []
        for x in leaves:
            U, s, Vh = _svd(x)
            keep = (torch.arange(s.shape[-1], device=s.device) < self.k).expand(s.shape)
            out.append(_spectral(x, U, s, Vh, torch.where(keep, s, torch.zeros_like(s)), keep))
        return out

    def _value(self, leaves, tree):
        self._check(leaves, tree)
        ok = torch.ones((), dtype=torch.bool)
        dtype = zeros_like_value(leaves).dtype
        for x in leaves:
            s = _svals(x)
            if s.shape[-1] > self.k:
                tol = set_tol([x], x.shape[-1] * x.shape[-2]) * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
                ok = ok.to(s.device) & (s[..., self.k :] <= tol).all()
        return indicator(ok, dtype)


class weighted_nuclear(Prox):  # noqa: N801
    """Prox of the weighted nuclear norm, one weight per singular value, batched over matrices.

        f(Z) = sum_b sum_i w_i sigma_i(Z_b)     (sigma_1 >= sigma_2 >= ... of every matrix),

    ``weights`` a non-empty 1-D tensor, ``>= 0`` and **non-decreasing** (``w_1 <= w_2 <= ...``:
    small singular values are penalised more, as in weighted nuclear norm minimisation;
    ``ValueError`` naming ``weights`` otherwise). A matrix with ``min(m, n)`` singular values uses
    the first ``min(m, n)`` weights; if there are fewer weights, the last one applies to the rest.
    Then ``sigma_i - t w_i`` keeps the order of the singular values and

        op(X, t) = U diag(max(sigma_i - t w_i, 0)) V^T

    is a global minimiser (Gu, Zhang, Zuo & Feng, *Weighted nuclear norm minimization with
    application to image denoising*, CVPR 2014, and Gu et al., IJCV 2017). The function is not
    convex unless all weights are equal (then it is :class:`nuclear`).

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.weighted_nuclear(torch.tensor([0.5, 2.0]))(torch.diag(torch.tensor([3.0, 1.0])), 1.0)
        tensor([[2.5000, 0.0000],
                [0.0000, 0.0000]])
    """

    _hyper_names = ("weights",)
    _public_name = "weighted_nuclear"

    def __init__(self, weights: torch.Tensor):
        name = self._public_name
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"{name}: weights must be a floating tensor, got {type(weights).__name__}")
        if weights.layout != torch.strided:
            raise TypeError(f"{name}: weights must be a dense (strided) tensor, got layout {weights.layout}")
        if weights.dim() != 1:
            raise ValueError(f"{name}: weights must be 1-D (one per singular value), got shape {tuple(weights.shape)}")
        if is_concrete(weights):
            w = weights.detach()
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"{name}: weights must be finite and >= 0")
            if w.numel() > 1 and bool((w[1:] < w[:-1]).any()):
                raise ValueError(f"{name}: weights must be non-decreasing (w_1 <= w_2 <= ...)")
        self._set(weights=weights)

    def _w(self, s):
        k, r = s.shape[-1], self.weights.numel()
        if r == 0:
            raise ValueError(f"{self._name()}: weights must have at least one entry")
        w = self.weights.to(device=s.device, dtype=s.dtype)
        if r >= k:
            return w[:k]
        return torch.cat([w, w[-1:].expand(k - r)])  # beyond the given weights: the last one

    def _prox(self, leaves, step, tree):
        _check_mats(self._name(), leaves, tree)
        out = []
        for x in leaves:
            U, s, Vh = _svd(x)
            tw = self._w(s) * step
            out.append(_spectral(x, U, s, Vh, torch.clamp_min(s - tw, 0), s > tw))
        return out

    def _value(self, leaves, tree):
        _check_mats(self._name(), leaves, tree)
        if not leaves:
            return zeros_like_value(leaves)
        parts = []
        for x in leaves:
            s = _svals(x)
            parts.append((s * self._w(s)).sum())
        return _tree.total(parts, leaves)
