"""Proxes without a closed form, by iteration: sums of proxes and intersections of sets (Dykstra-type
algorithms), the Birkhoff polytope (dual block coordinate ascent) and 2-D total variation (fast
gradient projection, FGP).

:class:`sum_of` computes ``prox_{t (f + g)}(x)`` from the proxes of ``f`` and ``g`` alone, by the
Dykstra-like proximal algorithm (Bauschke & Combettes 2008; Combettes & Pesquet 2011):

    x_0 = x,  p = q = 0
    repeat:  y = prox_{t g}(x_n + p);  p = x_n + p - y;  x_{n+1} = prox_{t f}(y + q);  q = y + q - x_{n+1}

which converges to the exact prox of the sum for closed convex ``f, g``; for more terms it nests,
``f_1 + (f_2 + ... + f_m)``. For indicators it is Dykstra's cyclic projection algorithm (any number
of sets, Boyle & Dykstra 1986), whose limit is the projection onto the intersection (not merely a
point of it). It stops after ``iters`` iterations or, eagerly, once every prox of a cycle returns
the cycle's output and the previous output to within ``tol * (||x_n|| + ||x_0||)``, or, when
every term is an indicator, ``tol * ||x_n|| + 16 eps ||x_0||`` (relative to the output, the
sets' scale, down to the rounding of iterates computed from points of the input's size; tested
every 4 cycles, a host read; traced or under ``torch.func`` transforms the full ``iters`` run,
with no host reads). ``tol`` is raised to ``16 eps`` of the computing dtype where it is finer.
Both rules are relative, so the accuracy does not depend on the scale: with the input, the
weights and the sets scaled by ``s`` (``1e-6`` to ``1e6``), the output is ``s`` times the unscaled
one to ``1e-6 (||x|| + s)`` in float64 and ``1e-5 (||x|| + s)`` in float32
(``tests/test_scale.py``). Tests compare the output to closed forms and scipy at the default
``tol = 1e-10`` (agreement to about ``1e-6`` relative or better: the iteration converges
linearly for polyhedral sets, more slowly in degenerate cases).

References: P. L. Combettes and J.-C. Pesquet, *Proximal splitting methods in signal processing*,
2011; H. H. Bauschke and P. L. Combettes, *A Dykstra-like algorithm for two monotone operators*,
Pacific J. Optim. 2008; R. L. Dykstra, 1983; Boyle & Dykstra, 1986; A. Beck and M. Teboulle,
*Fast gradient-based algorithms for constrained total variation image denoising and deblurring
problems*, IEEE Trans. Image Process. 2009; A. Chambolle, 2004.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _tree
from ._base import Hyper, Prox, check_hyper
from ._util import indicator, traceable, zeros_like_value
from .projections import Projection

__all__ = ["sum_of", "intersection", "birkhoff", "tv2d"]


def _check_iters(owner: str, iters: Any) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"{owner}: iters must be an int, got {type(iters).__name__}")
    if iters < 1:
        raise ValueError(f"{owner}: iters must be >= 1, got {iters}")
    return iters


def _norm(leaves: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(_tree.total([(x.to(_tree.acc_dtype(x)) ** 2).sum() for x in leaves], leaves))


def _cyclic_dykstra(proxes, leaves, iters: int, tol: float, offsets=None, sets: bool = False):
    """The iteration of the module docstring on lists of leaves; ``proxes`` are functions of a list
    of leaves (each already given its step). ``offsets`` (a warm start: one list of leaves per
    prox, the increments ``p_i``) replace the zero start. Returns the output and the final
    increments, the next call's warm start."""
    m = len(proxes)
    acc = [x.to(_tree.acc_dtype(x)) for x in leaves]
    x = acc
    if offsets is None:
        inc = [[torch.zeros_like(a) for a in acc] for _ in range(m)]
    else:
        if len(offsets) != m or any(len(u) != len(acc) for u in offsets):
            raise ValueError("sum_of: state must come from a call on params of the same structure")
        inc = [[u[j].to(a) for j, a in enumerate(acc)] for u in offsets]
        # the iteration keeps x_n + sum_i p_i = x (what makes its limit the prox at x): start there
        x = [a - sum(u[j] for u in inc) for j, a in enumerate(acc)]
    eager = not traceable(*leaves)
    eps = torch.finfo(acc[0].dtype).eps
    tol = max(tol, 16 * eps)  # no finer than the dtype resolves
    # functions: relative to the input and output, tol * (||z|| + ||x||); sets: relative to the
    # output (the sets' scale), tol * ||z||, with the input's rounding as a floor: every iterate
    # is computed from x_n + p_i, of the size of x, to about eps * ||x||
    n0 = _norm(acc) * (16 * eps / tol if sets else 1.0)
    for it in range(iters):
        outs = []
        cur = x
        for i, prox in enumerate(proxes):
            arg = [c + q for c, q in zip(cur, inc[i])]
            out = prox(arg)
            inc[i] = [a - o for a, o in zip(arg, out)]
            outs.append(out)
            cur = out
        if eager and it % 4 == 3:  # at the fixed point every prox in the cycle returns the output
            gap = torch.stack([_norm([a - b for a, b in zip(o, cur)]) for o in outs + [x]]).max()
            if bool(gap <= tol * (_norm(cur) + n0)):
                x = cur
                break
        x = cur
    return [v.to(t.dtype) for v, t in zip(x, leaves)], inc


class sum_of(Prox):  # noqa: N801
    """Prox of a sum ``f = f_1 + ... + f_m`` of operators, by the Dykstra-like algorithm.

        op(x, t) = argmin_z sum_i f_i(z) + ||z - x||^2 / (2t),

    computed from ``f_i.prox`` only (module docstring: the iteration, its stopping rule and
    accuracy), for closed convex ``f_i`` on the same params. ``iters`` (default 500) bounds the
    iterations, ``tol`` (default ``1e-10``, raised to ``16 eps`` of the dtype) is the relative
    stopping tolerance. ``value(z) = sum_i f_i(z)``, where every indicator among the ``f_i`` (a
    projection) counts ``z`` as a member when its projection moves ``z`` by at most
    ``feas_tol * ||z||`` (default ``sqrt(tol)``; relative, so a set of any scale is tested at its
    own scale, and ``0`` is a member only of sets that contain it): the output of the last prox of a cycle
    lies in its set, the others only up to the iteration's accuracy. Warm starts:
    :meth:`solve`. Use a closed form where one exists
    (``elastic_net``, ``fused_lasso``, ``sparse_group_lasso``).

    Example:
        >>> import torch, proxfunc as pf
        >>> op = pf.sum_of(pf.l1(0.5), pf.nonneg())
        >>> z = op(torch.tensor([-2.0, 0.3, 1.0], dtype=torch.float64), 1.0)
        >>> torch.allclose(z, torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64), atol=1e-9)
        True
    """

    _hyper_names = ("ops", "iters", "tol", "feas_tol")
    _public_name = "sum_of"

    def __init__(self, *ops: Prox, iters: int = 500, tol: float = 1e-10, feas_tol: float | None = None):
        name = self._public_name
        if not ops:
            raise ValueError(f"{name}: ops must name at least one operator")
        for i, op in enumerate(ops):
            if not isinstance(op, Prox):
                raise TypeError(f"{name}: ops[{i}] must be a proxfunc operator, got {type(op).__name__}")
        tol = check_hyper(name, "tol", tol, strict=True)
        if isinstance(tol, torch.Tensor):
            raise TypeError(f"{name}: tol must be a float")
        feas = tol**0.5 if feas_tol is None else check_hyper(name, "feas_tol", feas_tol, strict=True)
        self._set(ops=tuple(ops), iters=_check_iters(name, iters), tol=tol, feas_tol=feas)

    def _prox(self, leaves, step, tree):
        return self._solve(leaves, step, tree, None)[0]

    def _solve(self, leaves, step, tree, state):
        if not leaves:
            return [], state
        sets = all(op.is_projection for op in self.ops)
        ops = self.ops
        if len(ops) > 2 and not sets:  # Dykstra-like is for two functions: f_1 + (f_2 + ... + f_m)
            ops = (ops[0], sum_of(*ops[1:], iters=self.iters, tol=self.tol, feas_tol=self.feas_tol))

        def make(op):
            return lambda ls: _tree.flatten(op(tree.unflatten(ls), step), self._name())[0]

        return _cyclic_dykstra([make(op) for op in ops], leaves, self.iters, self.tol, state, sets)

    def __reduce__(self):  # ops are positional
        return (_rebuild_sum, (type(self), self.ops, {"iters": self.iters, "tol": self.tol, "feas_tol": self.feas_tol}))

    def solve(self, params: Any, step: Hyper = 1.0, state: Any = None) -> tuple[Any, Any]:
        """``(op(params, step), state)`` with a warm start: pass the ``state`` of the previous
        call (on params of the same structure, e.g. the previous iterate of an outer solver) and
        the iteration starts from its auxiliary variables (the increments of each prox, scaled duals),
        usually converging in far fewer iterations. ``state=None`` is the cold start of
        ``op(params, step)``. The result is the same prox (the limit does not depend on the start).
        """
        from ._base import check_step

        step = check_step(self._name(), step)
        leaves, tree = _tree.flatten(params, self._name())
        out, new_state = self._solve(leaves, step, tree, state)
        return tree.unflatten(out), new_state

    def _value(self, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        total = zeros_like_value(leaves)
        p = tree.unflatten(leaves)
        for op in self.ops:
            if op.is_projection:
                q = _tree.flatten(op(p, 1.0), self._name())[0]
                d = _norm([a.to(_tree.acc_dtype(a)) - b.to(_tree.acc_dtype(b)) for a, b in zip(leaves, q)])
                total = total + indicator(d <= self.feas_tol * _norm(leaves), total.dtype)
            else:
                total = total + op.value(p).to(total.dtype)
        return total


def _rebuild_sum(cls, ops, kw):
    return cls(*ops, **kw)


class intersection(sum_of):  # noqa: N801
    """Projection onto the intersection of closed convex sets ``C_1 ∩ ... ∩ C_m`` (Dykstra).

    ``sets`` are projections (operators with ``is_projection``); the algorithm is
    :class:`sum_of`'s, which for indicators is Dykstra's cyclic projection algorithm: its limit
    is the projection onto the intersection (not merely a point of it). ``value(z)`` is ``0`` when
    every set's projection moves ``z`` by at most ``feas_tol * ||z||``.

    Example:
        >>> import torch, proxfunc as pf
        >>> op = pf.intersection(pf.nonneg(), pf.l2_ball(1.0))
        >>> z = op(torch.tensor([3.0, -1.0, 4.0], dtype=torch.float64))
        >>> torch.allclose(z, torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64), atol=1e-9)
        True
    """

    _public_name = "intersection"
    is_projection = True

    def __init__(self, *sets: Prox, iters: int = 500, tol: float = 1e-10, feas_tol: float | None = None):
        for i, s in enumerate(sets):
            if isinstance(s, Prox) and not s.is_projection:
                raise TypeError(f"intersection: sets[{i}] must be a projection, got {s!r}")
        super().__init__(*sets, iters=iters, tol=tol, feas_tol=feas_tol)


# ----------------------------------------------------------------------------- Birkhoff polytope
def _simplex_theta(V: torch.Tensor) -> torch.Tensor:
    """The unit-simplex threshold of every row (last dim) of ``V``: ``sum_j max(V_j - theta, 0) = 1``
    (sort-based, exact; Duchi et al. 2008, Condat 2016)."""
    u = torch.sort(V, dim=-1, descending=True).values
    css = torch.cumsum(u, dim=-1) - 1
    k = torch.arange(1, V.shape[-1] + 1, device=V.device, dtype=V.dtype)
    rho = (u - css / k > 0).sum(dim=-1, keepdim=True).clamp_min(1)  # the support size (>= 1)
    return css.gather(-1, rho - 1) / rho.to(V.dtype)


_PHASE_TOL = 1e-3  # birkhoff: the row sums' accuracy in the phases before the last


class birkhoff(Projection):  # noqa: N801
    """Projection onto the Birkhoff polytope (doubly stochastic matrices), batched.

        op(X) = argmin { ||Z - X||_F : Z >= 0, Z 1 = 1, Z^T 1 = 1 }

    for every square matrix ``X`` (the last two dims of every leaf, each matrix on its own). The
    solution is ``Z = max(X - a 1^T - 1 b^T, 0)`` for the maximisers ``a, b`` of the concave dual;
    exact block coordinate ascent alternates ``a_i`` = the unit-simplex threshold of row ``i`` of
    ``X - 1 b^T`` (then every row of ``Z`` sums to 1) and ``b_j`` = that of column ``j`` of
    ``X - a 1^T`` (then every column does). It stops when, after a column step, every row sum is
    within ``tol + 4 n eps max|X|`` of 1 (tested every 4 iterations, a host read; traced, after
    ``iters`` iterations, default 1000): ``tol`` (default ``1e-10``; at least ``16 eps``) plus the
    rounding of the entries ``X - a - b``, whose absolute error is about ``eps max|X|``. The
    output is entrywise ``>= 0`` exactly, its columns sum to 1 up to rounding and its rows to within that
    tolerance, at every scale of ``X``. Computed in float64 for float32 and lower inputs
    (``eps`` is float64's). ``value`` is ``0`` when every entry is ``>= 0`` and every row and
    column sum is within ``feas_tol`` (default ``sqrt(tol)``) of 1. Not Sinkhorn's scaling, which
    is not the Euclidean projection.

    Scale: each iteration moves the dual variables by about the scale of ``Z`` (1), so on its own
    the iteration needs a number of steps in proportion to ``max|X| / n`` once ``X`` is far outside
    the polytope (its projection near a permutation matrix). Eagerly, an input with
    ``max|X| > 4n`` is therefore solved as ``X / 2^k, X / 2^(k-1), ..., X`` (``2^k`` about
    ``max|X| / (4n)``), each phase starting from the previous phase's dual variables doubled and
    stopping at row sums within ``1e-3`` (the last at the tolerance above), ``iters`` bounding
    each phase: a few tens of iterations per phase at any scale (``X`` of ``1e9`` takes about 30
    phases). Traced, the iteration runs from zero duals for ``iters`` iterations; with ``iters``
    exhausted the output is nonnegative with exact column sums and ``value`` reports the row
    sums' miss.

    Example:
        >>> import torch, proxfunc as pf
        >>> Z = pf.birkhoff()(torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.2, 0.4], [0.0, 0.6, 0.1]]))
        >>> Z.sum(dim=0), Z.sum(dim=1), bool((Z >= 0).all())
        (tensor([1., 1., 1.]), tensor([1., 1., 1.]), True)
    """

    _hyper_names = ("iters", "tol", "feas_tol")
    _public_name = "birkhoff"

    def __init__(self, iters: int = 1000, tol: float = 1e-10, feas_tol: float | None = None):
        tol = check_hyper("birkhoff", "tol", tol, strict=True)
        feas = tol**0.5 if feas_tol is None else check_hyper("birkhoff", "feas_tol", feas_tol, strict=True)
        self._set(iters=_check_iters("birkhoff", iters), tol=tol, feas_tol=feas)

    def _check(self, leaves, tree):
        for x, p in zip(leaves, tree.paths):
            if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
                raise ValueError(f"birkhoff: params{p} must be square matrices (..., n, n), got shape {tuple(x.shape)}")

    def _prox(self, leaves, step, tree):
        self._check(leaves, tree)
        out = []
        for x in leaves:
            if x.numel() == 0:
                out.append(x.clone())
                continue
            X = x.to(torch.float64) if x.device.type != "mps" else x.to(torch.float32)
            eager = not traceable(x)
            n, eps = X.shape[-1], torch.finfo(X.dtype).eps
            tol = max(self.tol, 16 * eps)
            phases = 0
            if eager:  # one host read: the input's scale
                big = float(X.abs().amax())
                if math.isfinite(big):
                    # the entries X - a - b carry a rounding error of about eps * max|X|
                    tol += 4 * n * eps * big
                    phases = math.ceil(math.log2(big / (4 * n))) if big > 4 * n else 0
            a = torch.zeros_like(X[..., :, :1])  # (..., n, 1)
            b = torch.zeros_like(X[..., :1, :])  # (..., 1, n)
            for k in range(phases, -1, -1):  # X / 2^k, the duals of the previous phase doubled
                Xk = X * 2.0**-k if k else X
                a, b = (2 * a, 2 * b) if k < phases else (a, b)
                ktol = tol if k == 0 else max(tol, _PHASE_TOL)
                for it in range(self.iters):
                    a = _simplex_theta(Xk - b)  # (..., n, 1): rows
                    b = _simplex_theta((Xk - a).transpose(-1, -2)).transpose(-1, -2)  # columns
                    if eager and it % 4 == 3:
                        rows = torch.clamp_min(Xk - a - b, 0).sum(dim=-1)
                        if bool(((rows - 1).abs() <= ktol).all()):
                            break
            out.append(torch.clamp_min(X - a - b, 0).to(x.dtype))
        return out

    def _value(self, leaves, tree):
        self._check(leaves, tree)
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            xa = x.to(_tree.acc_dtype(x))
            tol = self.feas_tol + 2 * x.shape[-1] * float(torch.finfo(x.dtype).eps)  # the sums' rounding
            ok = ok.to(x.device) & (xa >= 0).all()
            ok = ok & ((xa.sum(dim=-1) - 1).abs() <= tol).all()
            ok = ok & ((xa.sum(dim=-2) - 1).abs() <= tol).all()
        return indicator(ok, zeros_like_value(leaves).dtype)


# ----------------------------------------------------------------------------- 2-D total variation
def _grad2(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along H and W, zero on the last row / column (Neumann)."""
    gy = torch.cat([z[..., 1:, :] - z[..., :-1, :], torch.zeros_like(z[..., :1, :])], dim=-2)
    gx = torch.cat([z[..., :, 1:] - z[..., :, :-1], torch.zeros_like(z[..., :, :1])], dim=-1)
    return gy, gx


def _grad2_adj(py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_grad2` (minus the discrete divergence)."""
    py = torch.cat([py[..., :-1, :], torch.zeros_like(py[..., :1, :])], dim=-2)
    px = torch.cat([px[..., :, :-1], torch.zeros_like(px[..., :, :1])], dim=-1)
    zy, zx = torch.zeros_like(py[..., :1, :]), torch.zeros_like(px[..., :, :1])
    dy = torch.cat([zy, py], dim=-2)[..., :-1, :] - py
    dx = torch.cat([zx, px], dim=-1)[..., :, :-1] - px
    return dy + dx


def _tv2(gy: torch.Tensor, gx: torch.Tensor, isotropic: bool) -> torch.Tensor:
    """Per-image TV from the differences (summed over the last two dims)."""
    if isotropic:
        sq = gy * gy + gx * gx
        pos = sq > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq)).sum(
            (-1, -2)
        )
    return (gy.abs() + gx.abs()).sum((-1, -2))


def _project_dual(py, px, isotropic: bool):
    if isotropic:  # every pixel's (py, px) in the unit disc
        n = torch.sqrt(py * py + px * px).clamp_min(1)
        return py / n, px / n
    return py.clamp(-1, 1), px.clamp(-1, 1)


class tv2d(Prox):  # noqa: N801
    """Prox of 2-D total variation of images (isotropic or anisotropic), by FGP with a duality-gap stop.

        f(Z) = reg * sum_{i,j} ||(D_y Z, D_x Z)_{ij}||   (isotropic: the l2 norm per pixel;
                                                           anisotropic: |D_y Z| + |D_x Z|)

    with forward differences ``D_y Z[i, j] = Z[i+1, j] - Z[i, j]`` and ``D_x`` likewise (zero on the
    last row / column), over the last two dims of every leaf (``(..., H, W)``, every image on its
    own). ``op(x, t)`` solves the dual ``min_{|p_ij| <= 1} ||x - lam D^T p||^2 / 2`` (``lam =
    reg * t``; unit discs or boxes) by the fast gradient projection of Beck & Teboulle (2009)
    with step ``1 / (8 lam^2)`` and returns ``z = x - lam D^T p``. Accuracy: the duality gap
    ``lam * (TV(z) - <D z, p>)`` bounds ``||z - z*||^2 / 2`` (strong convexity), and the iteration
    stops (eagerly, tested every 10 iterations, a host read) once
    ``gap <= (tol * (||x|| + lam))^2 / 2``, so ``||z - z*|| <= tol * (||x|| + lam)`` for every
    image; otherwise (traced, ``torch.func``) after ``iters`` iterations (default 1000). Default
    ``tol = 1e-6``. The bound is relative to ``||x|| + lam``, so it holds at every scale: with
    ``x`` and ``reg`` scaled by ``s`` the output is ``s`` times the unscaled one to that accuracy.
    Warm start: ``z, state = op.solve(x, t, state)`` returns the dual ``p`` to
    pass to the next call (e.g. the next outer iteration of a solver). ``reg >= 0`` float or 0-d
    tensor.

    Example:
        >>> import torch, proxfunc as pf
        >>> X = torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> Z = pf.tv2d(0.5, isotropic=False, tol=1e-10)(X, 1.0)  # the three zeros share two jumps
        >>> torch.allclose(Z, torch.tensor([[1 / 3, 1 / 3], [1 / 3, 3.0]], dtype=torch.float64), atol=1e-8)
        True
    """

    _hyper_names = ("reg", "isotropic", "iters", "tol")
    _public_name = "tv2d"

    def __init__(self, reg: Hyper = 1.0, isotropic: bool = True, iters: int = 1000, tol: float = 1e-6):
        if not isinstance(isotropic, bool):
            raise TypeError(f"tv2d: isotropic must be a bool, got {type(isotropic).__name__}")
        tol = check_hyper("tv2d", "tol", tol, strict=True)
        self._set(reg=check_hyper("tv2d", "reg", reg), isotropic=isotropic, iters=_check_iters("tv2d", iters), tol=tol)

    def _check(self, leaves, tree):
        for x, p in zip(leaves, tree.paths):
            if x.dim() < 2:
                raise ValueError(f"tv2d: params{p} must be images (..., H, W), got shape {tuple(x.shape)}")

    def _solve(self, leaves, step, tree, state):
        self._check(leaves, tree)
        if state is not None and (len(state) != len(leaves)):
            raise ValueError("tv2d: state must come from a call on params of the same structure")
        out, new_state = [], []
        for i, x in enumerate(leaves):
            xa = x.to(_tree.acc_dtype(x))
            lam = self.reg * step
            lam_t = lam.to(xa) if isinstance(lam, torch.Tensor) else torch.full((), float(lam), dtype=xa.dtype)
            lam_t = lam_t.to(xa.device)
            safe = torch.where(lam_t > 0, lam_t, torch.ones_like(lam_t))
            if state is None:
                py, px = torch.zeros_like(xa), torch.zeros_like(xa)
            else:
                py, px = (s.to(xa) for s in state[i])
            qy, qx, tk = py, px, 1.0
            eager = not traceable(x, lam_t)
            tol = max(self.tol, 16 * torch.finfo(xa.dtype).eps)
            bound = 0.5 * (tol * (xa.flatten(-2).norm(dim=-1) + lam_t)) ** 2
            for it in range(self.iters):
                z = xa - lam_t * _grad2_adj(qy, qx)
                gy, gx = _grad2(z)
                ny, nx = _project_dual(qy + gy / (8 * safe), qx + gx / (8 * safe), self.isotropic)
                tn = (1 + (1 + 4 * tk * tk) ** 0.5) / 2
                qy = ny + ((tk - 1) / tn) * (ny - py)
                qx = nx + ((tk - 1) / tn) * (nx - px)
                py, px, tk = ny, nx, tn
                if eager and it % 10 == 9:
                    z = xa - lam_t * _grad2_adj(py, px)
                    gy, gx = _grad2(z)
                    gap = lam_t * (_tv2(gy, gx, self.isotropic) - (gy * py + gx * px).sum((-1, -2)))
                    if bool((gap <= bound).all()):
                        break
            z = xa - lam_t * _grad2_adj(py, px)
            out.append(torch.where(lam_t > 0, z, xa).to(x.dtype))
            new_state.append((py, px))
        return out, new_state

    def _prox(self, leaves, step, tree):
        return self._solve(leaves, step, tree, None)[0]

    def solve(self, params: Any, step: Hyper = 1.0, state: Any = None) -> tuple[Any, Any]:
        """``(op(params, step), state)``: ``state`` (the dual variables, one pair per leaf) from the
        previous call warm-starts the iteration; ``None`` is the cold start of ``op(params, step)``."""
        from ._base import check_step

        step = check_step(self._name(), step)
        leaves, tree = _tree.flatten(params, self._name())
        out, new_state = self._solve(leaves, step, tree, state)
        return tree.unflatten(out), new_state

    def _value(self, leaves, tree):
        self._check(leaves, tree)
        if not leaves:
            return zeros_like_value(leaves)
        parts = []
        for x in leaves:
            gy, gx = _grad2(x.to(_tree.acc_dtype(x)))
            parts.append(_tv2(gy, gx, self.isotropic).sum())
        return self.reg * _tree.total(parts, leaves)
