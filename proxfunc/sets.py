"""More Euclidean projections: affine sets, cones, spheres, box ∩ hyperplane, sparse sets.

For a closed set ``C`` the operator is ``op(x, step) = argmin_{z in C} ||z - x||^2`` (``step`` is
validated and ignored) and ``op.value(z)`` is ``0`` on ``C`` and ``inf`` elsewhere (with a
relative tolerance of a few ulps per entry, relative to the magnitudes of ``z`` and of the set's
own data). The projections onto sets cut out by equations (:class:`hyperplane`,
:class:`halfspace`, :class:`affine`, :class:`box_hyperplane`) end with one refinement step: the
residual of the rounded output is measured and projected out again, so the output satisfies the
equations to the scale of the output and the set, not of the input ``x`` (a closed-form step
``x - lam * a`` loses about ``eps * |x|`` to cancellation when ``|x|`` is far larger than the
set). ``value`` therefore accepts every output of its own operator, for inputs of any magnitude.

Unless a docstring says otherwise the set is taken over the **whole object**: all leaves of the
pytree, flattened in pytree order and concatenated, form one vector ``z`` (vector hyperparameters
such as ``a`` are flattened the same way and must have ``numel(z)`` entries). :class:`psd` acts
on every matrix (the last two dims of every leaf).

Three sets here are not convex (:class:`l2_sphere`, :class:`l1_sphere`, :class:`k_sparse`); their
operator returns a nearest point (a global minimiser), with the tie-breaking rule documented.

References: N. Parikh and S. Boyd, *Proximal Algorithms*, 2014, sections 6.2 and 6.3; Helgason,
Kennington & Lall (1980) and Kiwiel (2008) for the box ∩ hyperplane (continuous quadratic knapsack).
"""

from __future__ import annotations

import numbers

import torch

from . import _tree, dispatch
from ._base import Hyper, check_hyper, check_hyper_tree, is_concrete
from ._dist import flattenable
from ._util import feasible_tol, indicator, leaf_hypers, norm_parts, scaled_norm, traceable, zeros_like_value
from .kernels import threshold
from .projections import Projection, _bound_pairs, _check_order, l1_ball, simplex

__all__ = [
    "hyperplane",
    "halfspace",
    "affine",
    "soc",
    "psd",
    "l2_sphere",
    "l1_sphere",
    "box_hyperplane",
    "k_sparse",
    "sparse_simplex",
    "sparse_l1_ball",
]


# ----------------------------------------------------------------------------- helpers
def flat(leaves: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """All leaves flattened and concatenated into one vector (in the accumulation dtype)."""
    dtype = dtype or _tree.common_acc_dtype(leaves)
    if len(leaves) == 1:
        return flattenable(leaves[0]).to(dtype).reshape(-1)
    return torch.cat([flattenable(x).to(dtype).reshape(-1) for x in leaves])


def unflat(v: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a vector made by :func:`flat` back into tensors shaped (and typed) like ``leaves``."""
    if len(leaves) == 1:
        return [v.reshape(leaves[0].shape).to(leaves[0].dtype)]
    parts = torch.split(v, [x.numel() for x in leaves])
    return [p.reshape(x.shape).to(x.dtype) for p, x in zip(parts, leaves)]


def set_tol(leaves: list[torch.Tensor], n: int) -> float:
    """Relative feasibility tolerance of a set test on ``leaves`` (``n`` entries reduced).

    :func:`proxfunc._util.feasible_tol` covers the rounding of the test itself (in the
    accumulation dtype); a float16/bfloat16 leaf also carries the rounding of the point to its own
    dtype (``eps/2`` relative per entry, at most ``eps/2 * sqrt(n)`` for spectral quantities).
    """
    if not leaves:
        return 0.0
    tol = feasible_tol(list(leaves), n)
    low = [float(torch.finfo(x.dtype).eps) for x in leaves if x.dtype != _tree.acc_dtype(x)]
    return max(tol, 4 * max(low) * (1 + n**0.5)) if low else tol


def _vec(owner: str, name: str, a, *, nonzero: bool = False) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating tensor, got {type(a).__name__}")
    if a.layout != torch.strided:
        raise TypeError(f"{owner}: {name} must be a dense (strided) tensor, got layout {a.layout}")
    if is_concrete(a):
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"{owner}: {name} must be finite")
        if nonzero and not bool((a != 0).any()):
            raise ValueError(f"{owner}: {name} must not be zero")
    return a


def _pow2_scale(v: torch.Tensor) -> torch.Tensor:
    """A power of two ``s`` (0-d, ``v``'s dtype) with ``max |v / s| < 2`` where ``max |v| > 1``, else 1.

    Projections onto affine sets are equivariant, ``P_{b}(x) = s P_{b/s}(x / s)``: in these units
    ``<a, x>`` cannot overflow at the top of the dtype's range, and dividing by a power of two is
    exact, so results elsewhere are bit for bit those of the unscaled formula."""
    m = v.detach().abs().amax() if v.numel() else v.new_zeros(())
    big = (m > 1) & (m < float("inf"))
    return torch.exp2(torch.floor(torch.log2(torch.where(big, m, torch.ones_like(m)))))


def _hyper_as(h, like: torch.Tensor):
    return h.to(device=like.device, dtype=like.dtype) if isinstance(h, torch.Tensor) else h


def _check_numel(owner: str, name: str, a: torch.Tensor, n: int) -> torch.Tensor:
    if a.numel() != n:
        raise ValueError(f"{owner}: {name} has {a.numel()} entries but params has {n} (all leaves flattened)")
    return a.reshape(-1)


def check_k(owner: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # numpy integers are integers
        raise TypeError(f"{owner}: k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"{owner}: k must be >= 0, got {k}")
    return k


# ----------------------------------------------------------------------------- hyperplanes
class hyperplane(Projection):  # noqa: N801
    """Projection onto the hyperplane ``{z : <a, z> = b}``, ``a != 0``.

        op(x) = x - (<a, x> - b) / ||a||^2 * a,

    followed by one refinement step (the same formula applied to the rounded output), so that
    ``<a, op(x)> = b`` holds to a few ulps of ``|a| . |op(x)| + |b|`` however large ``x`` is.
    ``a`` is a tensor with as many entries as ``params`` (all leaves flattened in order).
    Parikh & Boyd (2014) section 6.2.1.

    Args:
        a: the normal, a nonzero tensor with one entry per entry of ``params``.
        b: the offset.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.hyperplane(torch.tensor([1.0, 1.0]), 1.0)(torch.tensor([2.0, 0.0]))
        tensor([ 1.5000, -0.5000])
    """

    _hyper_names = ("a", "b")
    _public_name = "hyperplane"

    def __init__(self, a: torch.Tensor, b: Hyper = 0.0):
        self._set(a=_vec("hyperplane", "a", a, nonzero=True), b=check_hyper("hyperplane", "b", b, min_value=None))

    def _gap(self, v, s=None):
        """``(a, <a, v> - b)``; with ``s``, for ``v / s`` and ``b / s``."""
        a = _check_numel(self._name(), "a", self.a, v.numel()).to(device=v.device, dtype=v.dtype)
        b = _hyper_as(self.b, v)
        return a, torch.dot(a, v) - (b if s is None else b / s)

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        s = _pow2_scale(v)
        v = v / s
        a, gap = self._gap(v, s)
        aa = torch.dot(a, a)
        z = v - (gap / aa) * a
        _, gap2 = self._gap(z, s)  # refinement: the residual left by cancellation in v - lam * a
        return unflat((z - (gap2 / aa) * a) * s, leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        a, gap = self._gap(v)
        tol = set_tol(leaves, v.numel())
        scale = a.abs() @ v.abs() + abs(_hyper_as(self.b, v))
        return indicator(gap.abs() <= tol * scale, v.dtype)


class halfspace(hyperplane):  # noqa: N801
    """Projection onto the halfspace ``{z : <a, z> <= b}``, ``a != 0``.

        op(x) = x - max(<a, x> - b, 0) / ||a||^2 * a   (points inside come back unchanged),

    with the refinement step of :class:`hyperplane` on points outside (the rounded output is
    moved again by ``max(<a, z> - b, 0) / ||a||^2 * a``). Parikh & Boyd (2014) section 6.2.1.

    Args:
        a: the normal, a nonzero tensor with one entry per entry of ``params``.
        b: the offset.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.halfspace(torch.tensor([1.0, 1.0]), 1.0)(torch.tensor([2.0, 1.0]))
        tensor([1., 0.])
    """

    _public_name = "halfspace"

    def __init__(self, a: torch.Tensor, b: Hyper = 0.0):
        self._set(a=_vec("halfspace", "a", a, nonzero=True), b=check_hyper("halfspace", "b", b, min_value=None))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        s = _pow2_scale(v)
        v = v / s
        a, gap = self._gap(v, s)
        aa = torch.dot(a, a)
        z = v - (gap.clamp_min(0) / aa) * a
        _, gap2 = self._gap(z, s)  # refinement, as for the hyperplane
        z = z - (gap2.clamp_min(0) / aa) * a
        return unflat(torch.where(gap > 0, z, v) * s, leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        a, gap = self._gap(v)
        tol = set_tol(leaves, v.numel())
        return indicator(gap <= tol * (a.abs() @ v.abs() + abs(_hyper_as(self.b, v))), v.dtype)


class affine(Projection):  # noqa: N801
    """Projection onto the affine set ``{z : A z = b}``.

        op(x) = x - A^+ (A x - b),

    followed by one refinement step (``z - A^+ (A z - b)`` on the rounded output ``z``, so the
    residual is relative to ``|A| |z| + |b|``, not to ``|x|``), with the pseudo-inverse ``A^+``
    factorised **once, at construction** (a thin SVD of ``A``, singular values below
    ``max(m, n) * eps * s_max`` treated as zero, so rank-deficient ``A`` is fine). ``A`` is
    ``(m, n)`` with ``n`` = the number of entries of ``params``; ``b`` has ``m`` entries and must
    lie in the range of ``A`` (``ValueError`` naming ``b`` otherwise: the set would be empty).
    Parikh & Boyd (2014) section 6.2.1.

    Args:
        A: the ``(m, n)`` matrix, ``n`` the number of entries of ``params``.
        b: the right-hand side, ``m`` entries, in the range of ``A``.

    Example:
        >>> import torch, proxfunc as pf
        >>> A, b = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1.0])
        >>> pf.affine(A, b)(torch.tensor([2.0, 0.0, 5.0]))
        tensor([ 1.5000, -0.5000,  5.0000])
    """

    _hyper_names = ("A", "b")
    _public_name = "affine"

    def __init__(self, A: torch.Tensor, b: torch.Tensor):
        A = _vec("affine", "A", A)
        b = _vec("affine", "b", b)
        if A.dim() != 2:
            raise ValueError(f"affine: A must be a matrix (m, n), got shape {tuple(A.shape)}")
        if b.numel() != A.shape[0]:
            raise ValueError(f"affine: b must have {A.shape[0]} entries (rows of A), got {b.numel()}")
        self._set(A=A, b=b)
        with torch.no_grad():
            Ad = A.detach().double()
            U, s, Vh = torch.linalg.svd(Ad, full_matrices=False)
            tol = max(A.shape) * torch.finfo(torch.float64).eps * (s.max() if s.numel() else 0.0)
            keep = s > tol
            cond = float(s[0] / s[keep][-1]) if bool(keep.any()) else 1.0
            V = Vh[keep].T  # (n, r)
            W = U[:, keep].T / s[keep].unsqueeze(1)  # (r, m) = S^-1 U^T
            bd = b.detach().double().reshape(-1)
            resid = bd - U[:, keep] @ (U[:, keep].T @ bd)
            if float(resid.norm()) > 1e-9 * (1.0 + float(bd.norm())):
                raise ValueError("affine: b is not in the range of A; the set {z : A z = b} is empty")
        self._set(_cache_V=V, _cache_W=W, _cache_cond=cond)

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        n = v.numel()
        if self.A.shape[1] != n:
            raise ValueError(f"affine: A has {self.A.shape[1]} columns but params has {n} entries")
        A = self.A.to(device=v.device, dtype=v.dtype)
        sc = _pow2_scale(v)
        v = v / sc
        b = self.b.reshape(-1).to(device=v.device, dtype=v.dtype) / sc
        if self.A.requires_grad:  # hyperparameter learning in A: differentiate the pseudo-inverse
            P = torch.linalg.pinv(A)

            def step_(u):
                return u - P @ (A @ u - b)
        else:
            V = self._cache_V.to(device=v.device, dtype=v.dtype)
            W = self._cache_W.to(device=v.device, dtype=v.dtype)

            def step_(u):
                return u - V @ (W @ (A @ u - b))

        return unflat(step_(step_(v)) * sc, leaves)  # the second step refines the rounded first

    def _value(self, leaves, tree):
        v = flat(leaves)
        A = self.A.to(device=v.device, dtype=v.dtype)
        b = self.b.reshape(-1).to(device=v.device, dtype=v.dtype)
        r = (A @ v - b).abs()
        tol = set_tol(leaves, v.numel()) * (1 + self._cache_cond)  # a projection's residual grows with cond(A)
        return indicator((r <= tol * (A.abs() @ v.abs() + b.abs()) + tol).all(), v.dtype)


# ----------------------------------------------------------------------------- cones
class soc(Projection):  # noqa: N801
    """Projection onto the second-order (Lorentz) cone ``{(y, s) : ||y||_2 <= s}``.

    The whole object is ``(y, s)`` with ``s`` its **last** entry (all leaves flattened in pytree
    order), so ``pf.soc()((y, s))`` with a one-element ``s`` is the natural call. With
    ``x = (y, s)``:

        op(x) = x                                  if ||y|| <= s
        op(x) = 0                                  if ||y|| <= -s
        op(x) = (s + ||y||) / (2||y||) * (y, ||y||)  otherwise.

    Parikh & Boyd (2014) section 6.3.2.

    Example:
        >>> import torch, proxfunc as pf
        >>> y, s = torch.tensor([3.0, 4.0]), torch.tensor(1.0)
        >>> pf.soc()((y, s))
        (tensor([1.8000, 2.4000]), tensor(3.))
    """

    _public_name = "soc"

    def _parts(self, leaves):
        v = flat(leaves)
        if v.numel() < 1:
            raise ValueError("soc: params must have at least one entry (the cone's s)")
        return v, v[:-1], v[-1]

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v, y, s = self._parts(leaves)
        m, nu = norm_parts([y]) if y.numel() else (v.new_ones(()), v.new_zeros(()))
        m, nu = m.to(v.dtype), nu.to(v.dtype)
        ny = m * nu  # ||y||, inf only where it is beyond the dtype's range
        inside = ny <= s
        polar = ny <= -s
        c = (s / m) / (2 * torch.where(nu > 0, nu, torch.ones_like(nu))) + 0.5  # (s + ny) / (2 ny), no overflow
        proj = torch.cat([c * y, (c * nu * m).reshape(1)])  # c ||y||: finite where ||y|| alone overflows
        out = torch.where(inside, v, torch.where(polar, torch.zeros_like(v), proj))
        return unflat(out, leaves)

    def _value(self, leaves, tree):
        v, y, s = self._parts(leaves)
        ny = scaled_norm([y]).to(v.dtype) if y.numel() else torch.zeros((), dtype=v.dtype, device=v.device)
        tol = set_tol(leaves, v.numel())
        return indicator(ny <= s + tol * (ny + s.abs()), v.dtype)


def _eig_vectors_part(Q, lam, flam, slope, D):
    """``Q (K o sym(Q^T D Q))_{offdiag} Q^T``, ``K_ij = (f_i - f_j)/(lam_i - lam_j)``, with the
    limit ``(f'_i + f'_j)/2`` where the eigenvalues tie. Self-adjoint in ``D``."""
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    tiny = torch.finfo(lam.dtype).tiny
    tol = torch.finfo(lam.dtype).eps * 8 * (lam.abs().amax(dim=-1, keepdim=True).unsqueeze(-1) + tiny)
    dif = li - lj
    gap = dif.abs() > tol
    dd = (flam.unsqueeze(-1) - flam.unsqueeze(-2)) / torch.where(gap, dif, torch.ones_like(dif))
    K = torch.where(gap, dd, 0.5 * (slope.unsqueeze(-1) + slope.unsqueeze(-2)))
    Qt = Q.transpose(-1, -2)
    A = Qt @ D @ Q
    A = 0.5 * (A + A.transpose(-1, -2))
    eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
    return Q @ (K * A * (1 - eye)) @ Qt


class _EighApply(torch.autograd.Function):
    """``Y = Q diag(f(lam)) Q^T`` for symmetric ``S = Q diag(lam) Q^T``, with derivatives that stay finite.

    ``flam = f(lam)`` is computed by the caller in the graph (derivatives reach ``lam`` and
    through eigh's eigenvalue derivative ``S``); this function adds the part through the
    eigenvectors, ``L(D) = Q (K o sym(Q^T D Q))_{offdiag} Q^T`` with the divided differences
    ``K_ij = (f_i - f_j)/(lam_i - lam_j)`` (Daleckii-Krein; Lewis 1996). ``L`` is self-adjoint, so
    ``backward`` applies it to the cotangent and ``jvp`` to the tangent. Where eigenvalues tie
    ``K`` takes its limit, the local slope ``slope`` of ``f``; PyTorch's eigh derivatives divide by
    ``lam_i - lam_j = 0`` there and return NaN (zero matrices, repeated eigenvalues).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(S, Q, lam, flam, slope):
        return (Q * flam.unsqueeze(-2)) @ Q.transpose(-1, -2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        S, Q, lam, flam, slope = inputs
        ctx.save_for_backward(Q, lam, flam, slope)
        ctx.save_for_forward(Q, lam, flam, slope)

    @staticmethod
    def backward(ctx, G):
        Q, lam, flam, slope = ctx.saved_tensors
        gS = _eig_vectors_part(Q, lam, flam, slope, G)
        gflam = torch.diagonal(Q.transpose(-1, -2) @ G @ Q, dim1=-2, dim2=-1)
        return gS, None, None, gflam, None

    @staticmethod
    def jvp(ctx, dS, dQ, dlam, dflam, dslope):
        Q, lam, flam, slope = ctx.saved_tensors
        out = torch.zeros_like(Q)
        if dS is not None:
            out = out + _eig_vectors_part(Q, lam, flam, slope, dS)
        if dflam is not None:
            out = out + (Q * dflam.unsqueeze(-2)) @ Q.transpose(-1, -2)
        return out


class psd(Projection):  # noqa: N801
    """Projection onto the cone of symmetric positive semidefinite matrices, batched.

    Every leaf is a stack of square matrices ``(..., n, n)``; each matrix ``X`` is projected on
    its own (the set is a product of PSD cones) in the Frobenius norm:

        op(X) = Q max(L, 0) Q^T   where  (X + X^T)/2 = Q L Q^T  (torch.linalg.eigh).

    Non-symmetric input is allowed: the nearest PSD matrix to ``X`` is that of its symmetric part
    (the skew part is orthogonal to every symmetric matrix). ``value`` is ``0`` when every matrix
    is symmetric and PSD up to a relative tolerance. Leaves that are not square matrices raise
    ``ValueError`` naming the leaf. Parikh & Boyd (2014) section 6.3.3; Higham (1988).

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.psd()(torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
        tensor([[1., 0.],
                [0., 0.]])
    """

    _public_name = "psd"

    def _check(self, leaves, tree):
        for x, p in zip(leaves, tree.paths):
            if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
                raise ValueError(f"psd: params{p} must be square matrices (..., n, n), got shape {tuple(x.shape)}")

    def _prox(self, leaves, step, tree):
        self._check(leaves, tree)
        out = []
        for x in leaves:
            xa = x.to(_tree.acc_dtype(x))
            s = 0.5 * (xa + xa.transpose(-1, -2))
            try:
                lam, Q = torch.linalg.eigh(s)
            except torch.linalg.LinAlgError as e:  # NaN or inf entries: LAPACK does not converge
                raise ValueError(f"psd: params must be finite (no NaN or inf): {e}") from None
            # Only the eigenvalues stay in eigh's graph; _EighApply differentiates through Q.
            p = _EighApply.apply(s, Q.detach(), lam, lam.clamp_min(0), (lam > 0).to(lam.dtype))
            out.append((0.5 * (p + p.transpose(-1, -2))).to(x.dtype))
        return out

    def _value(self, leaves, tree):
        self._check(leaves, tree)
        ok = torch.ones((), dtype=torch.bool)
        dtype = zeros_like_value(leaves).dtype
        for x in leaves:
            xa = x.to(_tree.acc_dtype(x))
            n = x.shape[-1]
            # eigh's error is ~eps * n * ||X||: measure against the Frobenius norm, times n
            tol = set_tol([x], n * n) * n
            # n * max|x| bounds the Frobenius norm without squaring (no underflow for tiny X)
            scale = n * xa.abs().amax(dim=(-1, -2), keepdim=True) if xa.numel() else xa.new_zeros(())
            sym = ((xa - xa.transpose(-1, -2)).abs() <= tol * scale).all()
            lam = torch.linalg.eigvalsh(0.5 * (xa + xa.transpose(-1, -2)))
            pos = (lam >= -tol * scale.squeeze(-1)).all() if lam.numel() else torch.ones((), dtype=torch.bool)
            ok = ok.to(x.device) & sym & pos
        return indicator(ok, dtype)


# ----------------------------------------------------------------------------- spheres
class l2_sphere(Projection):  # noqa: N801
    """Projection onto the Euclidean sphere ``{z : ||z||_2 = radius}``, ``radius >= 0`` (not convex).

        op(x) = radius * x / ||x||_2        (the unique nearest point when x != 0).

    At ``x = 0`` every point of the sphere is nearest; the tie is broken by returning
    ``radius * e_1`` (the first entry of the first leaf). Parikh & Boyd (2014) section 6.2.

    Args:
        radius: radius of the sphere, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l2_sphere(1.0)(torch.tensor([0.0, 2.0]))
        tensor([0., 1.])
    """

    _hyper_names = ("radius",)
    _public_name = "l2_sphere"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("l2_sphere", "radius", radius))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        m, nu = norm_parts([v])  # v / m / nu: the direction of v without overflow or underflow
        r = _hyper_as(self.radius, m)
        # e_1 without a write into a tensor (a DTensor shard holds no entry 0 on most ranks)
        e1 = (torch.arange(v.numel(), device=v.device) == 0).to(m.dtype)
        d = torch.where(nu > 0, nu, torch.ones_like(nu))
        out = torch.where(nu > 0, v.to(m.dtype) / m / d * r, e1 * r).to(v.dtype)
        return unflat(out, leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        n = scaled_norm([v]).to(v.dtype)
        tol = set_tol(leaves, v.numel())
        return indicator((n - self.radius).abs() <= tol * (n + abs(self.radius)), v.dtype)


class l1_sphere(Projection):  # noqa: N801
    """Projection onto the l1 sphere ``{z : ||z||_1 = radius}``, ``radius >= 0`` (not convex).

        op(x) = P_{l1 ball}(x)                          if ||x||_1 >= radius,
        op(x) = x + c * s,  c = (radius - ||x||_1) / n   otherwise,

    with ``s = sign(x)`` (``+1`` where ``x = 0``) and ``n`` the number of entries. Outside the
    ball the nearest point of the ball lies on the sphere. Inside, every ``z`` on the sphere
    has ``||z - x||_2 >= (||z||_1 - ||x||_1) / sqrt(n) = c sqrt(n)`` (triangle + Cauchy-Schwarz
    inequalities), with equality exactly at ``x + c s``: a global minimiser, unique unless ``x``
    has zeros, where the tie (either sign) is broken towards ``+``. The l1-ball threshold is the
    sort-free one of :mod:`proxfunc.kernels.threshold`.

    Args:
        radius: radius of the sphere, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.l1_sphere(1.0)(torch.tensor([0.25, -0.25]))
        tensor([ 0.5000, -0.5000])
    """

    _hyper_names = ("radius",)
    _public_name = "l1_sphere"

    def __init__(self, radius: Hyper = 1.0):
        self._set(radius=check_hyper("l1_sphere", "radius", radius))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        r = _hyper_as(self.radius, v)
        a = v.abs()
        tau = threshold([(a, None)], r, traceable=dispatch.reference_only(leaves, r)).clamp_min(0)
        ball = v - torch.clamp(v, -tau, tau)
        c = (r - a.sum()) / max(v.numel(), 1)
        sgn = torch.where(v < 0, -torch.ones_like(v), torch.ones_like(v))
        out = torch.where(a.sum() >= r, ball, v + c * sgn)
        out = torch.where(torch.as_tensor(r) == 0, torch.zeros_like(out), out)  # the sphere is {0}
        return unflat(out, leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        s = v.abs().sum()
        tol = set_tol(leaves, v.numel())
        return indicator((s - self.radius).abs() <= tol * (s + abs(self.radius)), v.dtype)


# ----------------------------------------------------------------------------- box ∩ hyperplane
def knapsack_lambda(x, a, lo, hi, b, iters: int | None = None):
    """The multiplier ``lam`` with ``<a, clamp(x - lam*a, lo, hi)> = b`` (``a > 0``).

    ``g(lam) = <a, clamp(x - lam a, lo, hi)>`` is continuous, piecewise linear and non-increasing;
    bisection over the bracket of its breakpoints keeps ``g(l) >= b >= g(h)``. Once no breakpoint
    lies strictly inside the bracket, ``g`` is linear on it and the free set at the midpoint gives
    ``lam`` in closed form (the exact finish). Eagerly (when :func:`proxfunc.dispatch.select`
    allows host reads) the bisection stops as soon as the active pattern is the same at both
    ends of the bracket; otherwise (the reference: tracing, ``torch.func``, gradients, DTensors)
    the exact sort-based :func:`knapsack_lambda_sort` is used instead (or, with an
    explicit ``iters``, that many steps). float32 inputs are solved in float64.
    """
    if x.dtype == torch.float32:  # sums over n terms decide the root: accumulate in float64
        args = (t.to(torch.float64) for t in (x, a, lo, hi, torch.as_tensor(b, device=x.device)))
        return knapsack_lambda(*args, iters=iters).to(x.dtype)
    bl = (x - hi) / a  # below bl: clamp at hi
    bh = (x - lo) / a  # above bh: clamp at lo
    # the bisection's early stop reads the bracket on the host: an "aten"-class implementation
    ts = [t for t in (x, a, lo, hi, b) if isinstance(t, torch.Tensor)]
    eager = not dispatch.reference_only(ts, 0.0)
    if not eager and iters is None:
        return knapsack_lambda_sort(x, a, lo, hi, b)
    lo_l = bl.min()
    hi_l = bh.max()
    if iters is None:
        iters = 64

    def g(lam):
        return (a * torch.clamp(x - lam * a, lo, hi)).sum()

    def pattern(lam):
        return (bl < lam).to(torch.int8) + (bh < lam).to(torch.int8)

    for i in range(iters if not eager else 4 * iters):
        mid = 0.5 * (lo_l + hi_l)
        up = g(mid) >= b
        lo_l = torch.where(up, mid, lo_l)
        hi_l = torch.where(up, hi_l, mid)
        if eager and i % 8 == 7 and bool(torch.equal(pattern(lo_l), pattern(hi_l))):
            break
    mid = 0.5 * (lo_l + hi_l)
    z = x - mid * a
    free = (z > lo) & (z < hi)
    fixed = torch.where(z <= lo, lo + torch.zeros_like(x), hi + torch.zeros_like(x))
    af2 = torch.where(free, a * a, torch.zeros_like(a)).sum()
    num = torch.where(free, a * x, torch.zeros_like(x)).sum() + torch.where(free, 0, a * fixed).sum() - b
    lam = torch.where(af2 > 0, num / torch.where(af2 > 0, af2, torch.ones_like(af2)), mid)
    return torch.clamp(lam, lo_l, hi_l)


def knapsack_lambda_sort(x, a, lo, hi, b):
    """The same multiplier as :func:`knapsack_lambda`, exactly, by sorting the ``2n`` breakpoints.

    Fixed shapes and no data-dependent control flow (used under ``torch.compile`` and
    ``torch.func`` transforms, where it compiles far faster than an unrolled bisection). Passing
    the breakpoint ``(x_i - hi_i)/a_i`` frees entry ``i`` (intercept ``+a_i (x_i - hi_i)``, slope
    ``-a_i^2``); passing ``(x_i - lo_i)/a_i`` pins it at ``lo_i`` (intercept ``+a_i (lo_i - x_i)``,
    slope ``+a_i^2``). Cumulative sums give ``g = C_k + S_k lam`` on every segment; the segment
    where ``g`` crosses ``b`` gives ``lam = (b - C_k) / S_k``.
    """
    if x.dtype == torch.float32:  # cumulative sums over 2n terms: accumulate in float64
        lam = knapsack_lambda_sort(*(t.to(torch.float64) for t in (x, a, lo, hi, torch.as_tensor(b, device=x.device))))
        return lam.to(x.dtype)
    n = x.numel()
    p = torch.cat([(x - hi) / a, (x - lo) / a])
    dC = torch.cat([a * (x - hi), a * (lo - x)])
    dS = torch.cat([-a * a, a * a])
    p, order = torch.sort(p)
    C = (a * hi).sum() + torch.cumsum(dC[order], 0)
    S = torch.cumsum(dS[order], 0)
    gk = C + S * p
    idx = torch.arange(2 * n, device=x.device)
    k = torch.where(gk >= b, idx, torch.zeros_like(idx)).max().reshape(1)
    Ck, Sk, pk = (t.gather(0, k)[0] for t in (C, S, p))  # gather: no data-dependent indexing
    lam = torch.where(Sk < 0, (b - Ck) / torch.where(Sk < 0, Sk, -torch.ones_like(Sk)), pk)
    hi_p = p.gather(0, torch.clamp(k + 1, max=2 * n - 1))[0]
    return torch.clamp(lam, pk, torch.maximum(hi_p, pk))


class box_hyperplane(Projection):  # noqa: N801
    """Projection onto ``{z : lower <= z <= upper, <a, z> = b}`` (box ∩ hyperplane), by bisection.

        op(x) = clamp(x - lam * a, lower, upper),   lam such that <a, op(x)> = b,

    the continuous quadratic knapsack problem. ``a`` defaults to all ones (the capped simplex
    ``sum z = b``); a given ``a`` must be entrywise ``> 0`` with one entry per entry of ``params``.
    ``lower``/``upper`` are finite numbers, tensors with one entry per entry of ``params`` (all
    leaves flattened) or 0-d, or pytrees with the structure of ``params`` holding one number or
    tensor broadcasting to each leaf (as :class:`proxfunc.box` takes them); ``lower <= upper``
    entrywise. The set must be non-empty: ``<a, lower> <= b <= <a, upper>`` (checked at each call
    when the values are concrete; ``ValueError`` naming ``b``). ``lam`` is found by bisection on the
    breakpoints' bracket followed by an exact closed-form finish (see :func:`knapsack_lambda`).
    Parikh & Boyd (2014) section 6.2.4; Helgason et al. (1980); Kiwiel (2008).

    Args:
        lower: lower bound (a number, a tensor, or a pytree matching ``params``).
        upper: upper bound, likewise; ``lower <= upper`` entrywise.
        b: the value of ``<a, z>``.
        a: positive weights, one per entry (default ones).

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.box_hyperplane(0.0, 1.0, 1.0)(torch.tensor([0.9, 0.8, -0.5]))   # capped simplex
        tensor([0.5500, 0.4500, 0.0000])
    """

    _hyper_names = ("lower", "upper", "b", "a")
    _public_name = "box_hyperplane"

    def __init__(self, lower: Hyper = 0.0, upper: Hyper = 1.0, b: Hyper = 1.0, a: torch.Tensor | None = None):
        name = "box_hyperplane"
        lo = check_hyper_tree(name, "lower", lower, min_value=None)
        hi = check_hyper_tree(name, "upper", upper, min_value=None)
        for path, lo_p, hi_p in _bound_pairs(name, lo, hi):
            if isinstance(lo_p, torch.Tensor) and isinstance(hi_p, torch.Tensor) and not path:
                if lo_p.dim() and hi_p.dim() and lo_p.numel() == hi_p.numel():
                    lo_p, hi_p = lo_p.reshape(-1), hi_p.reshape(-1)  # both one entry per entry of params
            _check_order(name, path, lo_p, hi_p)
        bb = check_hyper(name, "b", b, min_value=None)
        if a is not None:
            a = _vec(name, "a", a)
            if is_concrete(a) and not bool((a > 0).all()):
                raise ValueError(f"{name}: a must be > 0 entrywise")
        self._set(lower=lo, upper=hi, b=bb, a=a)

    def _data(self, v, leaves, tree):
        n = v.numel()
        a = torch.ones_like(v) if self.a is None else _check_numel(self._name(), "a", self.a, n).to(v)
        lo = self._flat_bound("lower", self.lower, v, leaves, tree)
        hi = self._flat_bound("upper", self.upper, v, leaves, tree)
        b = torch.as_tensor(_hyper_as(self.b, v), dtype=v.dtype, device=v.device)
        return a, lo, hi, b

    def _flat_bound(self, name, h, v, leaves, tree) -> torch.Tensor:
        """A bound as a vector like ``v`` (:func:`flat` of the leaves): a pytree's values
        broadcast to their leaves and concatenated, a tensor's ``n`` entries, a number repeated."""
        n = v.numel()
        if isinstance(h, (dict, list, tuple)):
            per = leaf_hypers(h, leaves, tree, self._name(), name)
            parts = [
                torch.as_tensor(_hyper_as(p, v), dtype=v.dtype, device=v.device).expand(x.shape).reshape(-1)
                for p, x in zip(per, leaves)
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        if isinstance(h, torch.Tensor) and h.dim() and h.numel() != n:
            raise ValueError(
                f"box_hyperplane: {name} has {h.numel()} entries but params has {n} (all leaves flattened)"
            )
        return torch.as_tensor(_hyper_as(h, v), dtype=v.dtype, device=v.device).reshape(-1).expand(v.shape)

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        a, lo, hi, b = self._data(v, leaves, tree)
        if not traceable(v, a, lo, hi, b):
            smin, smax = float((a * lo).sum()), float((a * hi).sum())
            tol = feasible_tol(v, v.numel()) * (abs(smin) + abs(smax))
            if not smin - tol <= float(b.detach()) <= smax + tol:
                raise ValueError(
                    f"box_hyperplane: b={float(b.detach())} is outside [<a, lower>, <a, upper>] = [{smin}, {smax}]"
                )
        lam = knapsack_lambda(v, a, lo, hi, b)
        z = torch.clamp(v - lam * a, lo, hi)
        # refinement: the residual of <a, z> = b left by cancellation in v - lam * a goes back
        # onto the free entries (those strictly inside the box), then the box again
        free = (z > lo) & (z < hi)
        af2 = torch.where(free, a * a, torch.zeros_like(a)).sum()
        r = (a * z).sum() - b
        dz = torch.where(free, a, torch.zeros_like(a)) * (r / torch.where(af2 > 0, af2, torch.ones_like(af2)))
        return unflat(torch.clamp(z - dz, lo, hi), leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        a, lo, hi, b = self._data(v, leaves, tree)
        tol = set_tol(leaves, v.numel())
        inbox = ((v >= lo - tol * lo.abs()) & (v <= hi + tol * hi.abs())).all()
        on = ((a * v).sum() - b).abs() <= tol * ((a * v).abs().sum() + b.abs())
        return indicator(inbox & on, v.dtype)


# ----------------------------------------------------------------------------- sparse sets
def keep_largest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of each row of ``score`` (ties: lower index wins)."""
    n = score.shape[-1]
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    order = torch.sort(-score, dim=-1, stable=True).indices
    rank = torch.argsort(order, dim=-1)  # the inverse permutation: the rank of every entry
    return rank < k


class k_sparse(Projection):  # noqa: N801
    """Projection onto the k-sparse vectors ``{z : nnz(z) <= k}`` (not convex): keep the top k.

        op(x) = x on the k entries of largest |x_j| (over all leaves together), 0 elsewhere.

    This is a global minimiser of ``||z - x||^2`` over the set (the discarded mass
    ``sum_{j not kept} x_j^2`` is as small as possible). Ties in ``|x_j|`` are broken towards the
    entry that comes first (pytree order, then row-major order), so the result is deterministic.
    ``k`` is an int ``>= 0``; a ``k`` larger than the number of entries raises ``ValueError``.
    Parikh & Boyd (2014) section 6.2 (projection onto a non-convex set); Blumensath & Davies
    (2009), iterative hard thresholding.

    Args:
        k: how many entries may be nonzero, ``>= 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.k_sparse(1)(torch.tensor([3.0, -4.0, 1.0]))
        tensor([ 0., -4.,  0.])
    """

    _hyper_names = ("k",)
    _public_name = "k_sparse"

    def __init__(self, k: int):
        self._set(k=check_k(self._name(), k))

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        if self.k > v.numel():
            raise ValueError(f"{self._name()}: k={self.k} is larger than the number of entries {v.numel()}")
        mask = keep_largest(v.abs().unsqueeze(0), self.k).squeeze(0)
        return unflat(torch.where(mask, v, torch.zeros_like(v)), leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        return indicator((v != 0).sum() <= self.k, v.dtype)


class sparse_simplex(Projection):  # noqa: N801
    """Projection onto the k-sparse simplex ``{z : z >= 0, sum z = radius, nnz(z) <= k}`` (not convex).

        op(x) = P_simplex(radius)(x restricted to S),  S = the k largest entries of x (by value),

    zero off ``S``: a global minimiser (Kyrillidis, Becker, Cevher & Koch, *Sparse projections
    onto the simplex*, ICML 2013, the greedy selection is optimal for the simplex). Ties in
    ``x`` are broken towards the entry that comes first (as :class:`k_sparse`). Whole object;
    ``k >= 1`` an int (``ValueError`` if larger than the number of entries), ``radius > 0``.
    The simplex projection is :class:`proxfunc.simplex`'s (entries off ``S`` are replaced by a
    value below its threshold, so they come out as exact zeros).

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.sparse_simplex(2)(torch.tensor([0.5, 0.1, 0.4, 0.3]))
        tensor([0.5500, 0.0000, 0.4500, 0.0000])
    """

    _hyper_names = ("k", "radius")
    _public_name = "sparse_simplex"

    def __init__(self, k: int, radius: Hyper = 1.0):
        k = check_k(self._public_name, k)
        if k < 1:
            raise ValueError(f"{self._public_name}: k must be >= 1, got {k}")
        self._set(k=k, radius=check_hyper(self._public_name, "radius", radius, strict=True))

    def _mask(self, v, score):
        if self.k > v.numel():
            raise ValueError(f"{self._name()}: k={self.k} is larger than the number of entries {v.numel()}")
        return keep_largest(score.unsqueeze(0), self.k).squeeze(0)

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        mask = self._mask(v, v)
        r = _hyper_as(self.radius, v)
        top = torch.where(mask, v, torch.full_like(v, -torch.inf)).max()
        fill = top - r - (top.abs() + r + 1)  # below the simplex threshold (>= top - r): exact zeros
        z = simplex(self.radius)(torch.where(mask, v, fill), 1.0)
        return unflat(torch.where(mask, z, torch.zeros_like(z)), leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        ok = (v != 0).sum() <= self.k
        return indicator(ok, v.dtype) + simplex(self.radius)._value([v], tree)


class sparse_l1_ball(sparse_simplex):  # noqa: N801
    """Projection onto the k-sparse l1 ball ``{z : ||z||_1 <= radius, nnz(z) <= k}`` (not convex).

        op(x) = P_{l1 ball}(radius)(x restricted to S),  S = the k entries of largest |x|,

    zero off ``S``: a global minimiser (Kyrillidis et al. 2013: on ``S`` the l1 projection
    soft-thresholds, and the largest magnitudes keep the most mass; checked against all supports
    in the tests). Ties as :class:`k_sparse`; ``k >= 1``, ``radius > 0``; whole object.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.sparse_l1_ball(2, 1.0)(torch.tensor([2.0, -0.1, -1.5, 0.3]))
        tensor([ 0.7500,  0.0000, -0.2500,  0.0000])
    """

    _public_name = "sparse_l1_ball"

    def _prox(self, leaves, step, tree):
        if not leaves:
            return []
        v = flat(leaves)
        mask = self._mask(v, v.abs())
        z = l1_ball(self.radius)(torch.where(mask, v, torch.zeros_like(v)), 1.0)
        return unflat(torch.where(mask, z, torch.zeros_like(z)), leaves)

    def _value(self, leaves, tree):
        v = flat(leaves)
        ok = (v != 0).sum() <= self.k
        return indicator(ok, v.dtype) + l1_ball(self.radius)._value([v], tree)
