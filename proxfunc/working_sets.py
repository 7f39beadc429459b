"""Penalised least squares solved on working sets: :func:`least_squares`.

:func:`least_squares` minimises

    F(w) = ||X w - y||^2 / (2 n) + g(w),        n = X.shape[0],

scikit-learn's scaling of ``Lasso``, ``ElasticNet`` and ``MultiTaskLasso``, for a vector ``y``
(``w`` has ``p = X.shape[1]`` entries) or a matrix ``Y`` of ``T`` targets (``W`` is ``p x T``),
with an unpenalised intercept when asked (``fit_intercept=True``).
Sparse solutions touch few columns of ``X``, so the solver works on a **working set** of
features (the approach of Johnson & Guestrin's BLITZ and Massias et al.'s CELER/skglm): each
outer iteration computes the gradient ``X^T (X w - y) / n`` of every feature (one pass over
``X``), ranks the features by how far each is from its optimality condition, adds the worst
to the working set, and solves the problem restricted to the working set exactly, on that
set's Gram matrix ``X_W^T X_W / n`` (computed once per feature and kept). It stops when every
feature's optimality residual is at most ``tol`` times ``||X^T y||_inf / n`` (the smallest
``reg`` of the lasso whose solution is zero: the problem's natural scale).

The restricted problems, by penalty:

* ``pf.l1(reg)`` and ``pf.elastic_net(reg, gamma)``, ``reg``/``gamma`` numbers or tensors
  broadcastable to ``w`` (a weighted or adaptive lasso): an active-set method with sign
  constraints (the feature-sign search of Lee et al., 2007): guess the sign of every active
  coefficient, solve the linear system of that sign pattern, and move to the best point of the
  segment towards it where a coefficient changes sign. Every step decreases ``F``, sign
  patterns are finite, and the last step is a linear solve on the support: the solution is
  exact to the rounding of that solve. Several targets are solved one column at a time.
* ``pf.l21(reg, group_dim=0)`` on a ``p x T`` matrix (one group per row of ``W``, i.e. per
  feature: the multi-task lasso; ``reg`` a number or one weight per group): FISTA with the
  exact step ``1 / lambda_max`` and adaptive restart on the Gram matrix until the support
  settles, then Newton's method on the support (the penalty is smooth there), checked against
  the optimality condition of every row.
* ``None``: ``g = 0``, the minimum-norm least-squares solution (``torch.linalg.lstsq``).
* Any other operator: :func:`proxfunc.proximal_gradient` with the gradient written out
  (``value_and_grad=True, quadratic=True``).

The solution is not differentiated through (the working sets are decisions taken on the
host); to differentiate it, start :func:`proxfunc.argmin` at it, which then converges at
once and differentiates implicitly.

References: T. Johnson and C. Guestrin, *Blitz: A Principled Meta-Algorithm for Scaling Sparse
Optimization*, ICML 2015; M. Massias, A. Gramfort and J. Salmon, *Celer: a Fast Solver for the
Lasso with Dual Extrapolation*, ICML 2018; H. Lee, A. Battle, R. Raina and A. Ng, *Efficient
sparse coding algorithms*, NeurIPS 2007.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._base import Prox, check_hyper, is_concrete
from ._tree import acc_dtype
from ._util import block_scale
from .groups import l21
from .norms import elastic_net, l1, soft_threshold
from .solvers import proximal_gradient

__all__ = ["least_squares", "LeastSquaresResult"]


@dataclass
class LeastSquaresResult:
    """What :func:`least_squares` returns.

    Attributes:
        params: the solution ``w`` (shape ``(p,)`` for a vector ``y``, ``(p, T)`` for ``T``
            targets; the dtype of ``X``).
        iterations: working-set solves (each followed by a pass over ``X`` that checks every
            feature), proximal gradient iterations for the fallback.
        error: the largest optimality residual of a feature (its distance from satisfying
            ``0 in grad_j + subgradient_j``) over ``||X^T y||_inf / n``; the fallback reports the
            gradient-mapping norm over the same scale.
        value: ``F(w)`` (a Python float).
        converged: ``error <= max(tol, 50 eps)`` (``eps`` of the computing dtype).
        method: ``"active set"``, ``"group newton"``, ``"lstsq"`` or ``"proximal gradient"``.
        working_set: the features of the last working set, in the order they were added (a
            1-d int64 tensor; every feature for ``"lstsq"`` and ``"proximal gradient"``).
        intercept: with ``fit_intercept=True``, ``b`` (0-d for a vector ``y``, ``T`` entries
            for ``T`` targets; the dtype of ``X``); ``None`` otherwise.
    """

    params: torch.Tensor
    iterations: int
    error: float
    value: float
    converged: bool
    method: str
    working_set: torch.Tensor
    intercept: torch.Tensor | None = None


# ----------------------------------------------------------------------------- penalties
def _weights(owner: str, name: str, value: Any, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A hyperparameter as a tensor of ``shape`` in ``like``'s dtype and device, checked."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(t, shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{owner}: prox's {name} of shape {tuple(t.shape)} does not broadcast to params of shape {tuple(shape)}"
        ) from None


def _structure(prox: Prox | None, wshape: torch.Size, like: torch.Tensor):
    """``(kind, lam, mu)``: ``"elementwise"`` (``lam |w| + mu w^2 / 2`` per entry, ``lam`` and
    ``mu`` of ``w``'s shape as ``(p, T)``), ``"rows"`` (``lam_j ||W_j||``, ``lam`` of ``p``) or
    ``None`` (use the fallback)."""
    shape2 = wshape if len(wshape) == 2 else torch.Size((wshape[0], 1))
    kind = type(prox)
    if kind in (l1, elastic_net):
        reg, gamma = prox.reg, getattr(prox, "gamma", 0.0)
        if not all(isinstance(v, (int, float)) or isinstance(v, torch.Tensor) for v in (reg, gamma)):
            return None, None, None  # a pytree of weights: not a single tensor's
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in (reg, gamma)):
            return None, None, None
        lam = _weights("least_squares", "reg", reg, wshape, like).reshape(shape2)
        mu = lam * _weights("least_squares", "gamma", gamma, wshape, like).reshape(shape2)
        return "elementwise", lam, mu
    if kind is l21 and type(prox.group_dim) is int and len(wshape) == 2 and prox.group_dim in (0, -2):
        reg = prox.reg
        if isinstance(reg, torch.Tensor) and reg.requires_grad:
            return None, None, None
        lam = _weights("least_squares", "reg", prox._reg(wshape[0]), torch.Size((wshape[0],)), like)
        return "rows", lam, None
    return None, None, None


def _violation(kind: str, W: torch.Tensor, G: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor | None):
    """Each feature's distance from its optimality condition (``G`` the smooth gradient)."""
    return _score(kind, W, G, lam, mu).clamp_min(0)


def _score(kind: str, W: torch.Tensor, G: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor | None):
    """Each feature's optimality residual where positive; for a zero feature that satisfies its
    condition, the (negative) margin ``|g_j| - lam_j`` by which it does: how close it is to
    entering the solution."""
    if kind == "elementwise":
        return _entry_score(W, G + mu * W, lam).amax(dim=1)
    norms = W.norm(dim=1, keepdim=True)
    alive = norms > 0
    moved = torch.where(alive, G + lam[:, None] * W / torch.where(alive, norms, 1), G)
    vn = moved.norm(dim=1)
    return torch.where(alive[:, 0], vn, vn - lam)


def _entry_score(w: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """:func:`_score` of each entry of an elementwise penalty (``g``: the gradient of the smooth
    part, ``mu w`` included)."""
    return torch.where(w != 0, (g + lam * w.sign()).abs(), g.abs() - lam)


# ------------------------------------------------------------------- restricted problems
def _objective_rows(V: torch.Tensor, Q: torch.Tensor, c: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor):
    """``0.5 v^T Q v - c^T v + sum(lam |v| + mu v^2 / 2)`` for each row ``v`` of ``V``."""
    return 0.5 * ((V @ Q) * V).sum(1) - V @ c + V.abs() @ lam + 0.5 * (V * V) @ mu


def _solve_spd(Q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Q^{-1} b`` for a symmetric positive semidefinite ``Q`` (a minimum-norm solution when
    ``Q`` is singular)."""
    L, info = torch.linalg.cholesky_ex(Q)
    if int(info) == 0:
        return torch.cholesky_solve(b[:, None], L)[:, 0]
    return torch.linalg.lstsq(Q.cpu(), b.cpu()[:, None], driver="gelsd").solution[:, 0].to(Q.device)


def _feature_sign(Q, c, lam, mu, x, tol_abs, max_steps):
    """Minimise ``0.5 x^T Q x - c^T x + sum(lam |x| + mu x^2 / 2)`` from ``x`` by the
    feature-sign search; returns ``(x, converged)``."""
    Qm = Q + torch.diag(mu)
    F = _objective_rows(x[None], Q, c, lam, mu)[0]
    for _ in range(max_steps):
        g = Qm @ x - c
        nz = x != 0
        viol = _entry_score(x, g, lam).clamp_min(0)
        worst = int(viol.argmax())
        if float(viol[worst]) <= tol_abs:
            return x, True
        enter = ~nz & (g.abs() > lam)
        moved = False
        for single in (False, True):
            if single:  # the plain feature-sign step: the worst zero coefficient enters alone
                if not bool(enter.any()):
                    break
                one = torch.zeros_like(enter)
                one[int(torch.where(enter, viol, -1).argmax())] = True
                enter = one
            theta = torch.where(nz, x.sign(), torch.where(enter, -g.sign(), 0))
            A = torch.nonzero(theta).flatten()
            z = torch.zeros_like(x)
            z[A] = _solve_spd(Qm[A][:, A], c[A] - lam[A] * theta[A])
            # candidates: z, and the points of the segment where a coefficient of x crosses zero
            d = z - x
            cross = torch.nonzero(nz & (x * z <= 0) & (d != 0)).flatten()
            s = torch.cat([-x[cross] / d[cross], x.new_ones(1)])
            V = x[None] + s[:, None] * d[None]
            V[torch.arange(cross.numel(), device=x.device), cross] = 0.0  # exactly at its crossing
            vals = _objective_rows(V, Q, c, lam, mu)
            best = int(vals.argmin())
            if float(vals[best]) < float(F):
                x, F, moved = V[best], vals[best], True
                break
        if not moved:  # no strict decrease left (a singular sign system, or rounding)
            return x, False
    return x, False


def _group_value(W, Q, C, lam):
    return 0.5 * ((Q @ W) * W).sum() - (C * W).sum() + lam @ W.norm(dim=1)


def _group_newton(Q, C, lam, W, tol_abs, steps=30):
    """Newton's method on the support of ``W`` (rows with a nonzero norm), where the penalty is
    smooth; returns the polished ``W`` or ``None`` when a row would leave the support."""
    S = torch.nonzero(W.norm(dim=1) > 0).flatten()
    if S.numel() == 0:
        return W
    k, T = S.numel(), W.shape[1]
    QS, CS, lS = Q[S][:, S], C[S], lam[S]
    X = W[S].clone()
    eye = torch.eye(T, dtype=W.dtype, device=W.device)
    base = torch.kron(QS, eye)
    F = _group_value(X, QS, CS, lS)
    for _ in range(steps):
        nrm = X.norm(dim=1, keepdim=True)
        U = X / nrm
        grad = QS @ X - CS + lS[:, None] * U
        if float(grad.abs().max()) <= tol_abs:
            out = torch.zeros_like(W)
            out[S] = X
            return out
        H = base.clone()
        blocks = (lS[:, None, None] / nrm[:, :, None]) * (eye - U[:, :, None] * U[:, None, :])
        H += torch.block_diag(*blocks)
        d = -_solve_spd(H, grad.reshape(-1)).reshape(k, T)
        t = 1.0
        while t > 1e-10:
            Xn = X + t * d
            if bool((Xn.norm(dim=1) > 0).all()):
                Fn = _group_value(Xn, QS, CS, lS)
                if float(Fn) <= float(F):
                    break
            t *= 0.5
        else:
            return None
        if bool((Xn.norm(dim=1) < 1e-3 * nrm[:, 0]).any()):
            return None  # a row heads to zero: the support is not settled
        X, F = Xn, Fn
    return None


def _polish(kind, Q, C, lam, mu, W, tol_abs):
    """The exact solution from ``W`` once its support is right (``None`` when it is not):
    feature-sign steps on each column, or Newton on the support of the rows."""
    if kind == "rows":
        out = _group_newton(Q, C, lam, W, tol_abs)
    else:
        cols = [_feature_sign(Q, C[:, j], lam[:, j], mu[:, j], W[:, j], tol_abs, 8) for j in range(W.shape[1])]
        out = torch.stack([x for x, _ in cols], 1)
    if out is None or float(_violation(kind, out, Q @ out - C, lam, mu).max()) > tol_abs:
        return None
    return out


def _gram_fista(kind, Q, C, lam, mu, W, tol_abs, max_steps):
    """Minimise ``0.5 tr(W^T Q W) - tr(C^T W) + g(W)`` from ``W`` (``g`` the elementwise or
    rows penalty): FISTA with step ``1 / lambda_max(Q)`` and gradient restart (it converges
    for any positive semidefinite ``Q``), finished by :func:`_polish` once the support has held
    for 8 iterations; returns ``(W, steps)``."""
    L = float(torch.linalg.eigvalsh(Q)[-1])
    if L <= 0:
        return torch.zeros_like(W), 0
    s = 1.0 / L
    t_lam = lam * s

    def prox(V):
        if kind == "rows":  # l21's block soft threshold of each row
            return V * block_scale(V.norm(dim=1), t_lam)[:, None]
        return soft_threshold(V, t_lam) / (1 + mu * s)

    def live(V):
        return V.norm(dim=1) > 0 if kind == "rows" else V != 0

    Y, Xk, mom = W, W, 1.0
    support, held = live(W), 0
    for step in range(1, max_steps + 1):
        Xn = prox(Y - s * (Q @ Y - C))
        if float(((Y - Xn) * (Xn - Xk)).sum()) > 0:  # gradient restart (O'Donoghue & Candes)
            mom, Y = 1.0, Xk
            continue
        m2 = 0.5 * (1 + math.sqrt(1 + 4 * mom * mom))
        Y = Xn + ((mom - 1) / m2) * (Xn - Xk)
        Xk, mom = Xn, m2
        now = live(Xk)
        held = held + 1 if bool((now == support).all()) else 0
        support = now
        if held and held % 8 == 0:
            polished = _polish(kind, Q, C, lam, mu, Xk, tol_abs)
            if polished is not None:
                return polished, step
        if step % 8 == 0 and float(_violation(kind, Xk, Q @ Xk - C, lam, mu).max()) <= tol_abs:
            return Xk, step
    return Xk, max_steps


# ------------------------------------------------------------------------------ the solver
def _check(X: Any, y: Any, init: Any, tol: Any, maxiter: Any) -> float:
    """The arguments' checks; returns ``tol`` as a float."""
    owner = "least_squares"
    for name, t in (("X", X), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{owner}: {name} must be a floating tensor, got {type(t).__name__}")
    if X.dim() != 2:
        raise ValueError(f"{owner}: X must be 2-d (samples x features), got shape {tuple(X.shape)}")
    if y.dim() not in (1, 2) or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"{owner}: y must have X.shape[0] = {X.shape[0]} rows (1-d, or 2-d with one column per target), "
            f"got shape {tuple(y.shape)}"
        )
    if y.dtype != X.dtype or y.device != X.device:
        raise TypeError(f"{owner}: y must have X's dtype and device, got {y.dtype} on {y.device}")
    if not (is_concrete(X) and is_concrete(y)):
        raise TypeError(
            f"{owner}: X and y must be plain tensors (the working sets are chosen on the host); "
            "use proxfunc.argmin under a transform or torch.compile"
        )
    if init is not None:
        shape = (X.shape[1],) + tuple(y.shape[1:])
        if not isinstance(init, torch.Tensor) or not init.is_floating_point() or tuple(init.shape) != shape:
            raise ValueError(f"{owner}: init must be a tensor of shape {shape}, got {getattr(init, 'shape', init)!r}")
    tol = float(check_hyper(owner, "tol", tol, strict=True))
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"{owner}: maxiter must be a positive int, got {maxiter!r}")
    return tol


def least_squares(
    X: torch.Tensor,
    y: torch.Tensor,
    prox: Prox | None = None,
    *,
    init: torch.Tensor | None = None,
    fit_intercept: bool = False,
    tol: float = 1e-10,
    maxiter: int = 100,
) -> LeastSquaresResult:
    """Minimise ``||X w + b - y||^2 / (2 n) + g(w)`` (``n = X.shape[0]``; ``b = 0`` unless
    ``fit_intercept``) on working sets.

    Args:
        X: the design matrix, ``n x p``, float32 or float64 (float16/bfloat16 are solved in
            float32 and the solution rounded), a plain tensor on any device.
        y: the targets: ``n`` (``w`` has ``p`` entries) or ``n x T`` (``W`` is ``p x T``).
        prox: the penalty ``g``: ``pf.l1`` or ``pf.elastic_net`` (numbers, or tensors of
            weights broadcastable to ``w``), ``pf.l21(reg, group_dim=0)`` for ``T`` targets (the
            multi-task lasso; ``reg`` a number or one weight per feature), ``None`` (``g = 0``),
            or any other operator (solved by :func:`proxfunc.proximal_gradient`).
        init: the starting point (zeros by default); a good one (the solution at a nearby
            ``reg``, along a regularisation path) saves passes over ``X``.
        fit_intercept: also fit an unpenalised intercept ``b`` (one per target), as
            scikit-learn's ``fit_intercept=True``: the problem is solved on centred data, the
            centring applied to the working set's columns and to each pass over ``X`` (``X``
            itself is not copied), and ``b = mean(y) - mean(X) w``.
        tol: stop when every feature's optimality residual is at most ``tol`` times
            ``||X^T y||_inf / n``; the floor is 50 rounding units of the computing dtype.
        maxiter: the most working-set solves; the fallback's iteration
            limit is ``1000 * maxiter``.

    Returns:
        a :class:`LeastSquaresResult` (``.params``, ``.intercept``, ``.iterations``, ``.error``,
        ``.value``, ``.converged``, ``.method``, ``.working_set``).

    Example (a weighted lasso: the first feature unpenalised)::

        X, y = torch.randn(200, 50, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
        reg = torch.full((50,), 0.1, dtype=torch.float64)
        reg[0] = 0.0
        res = pf.least_squares(X, y, pf.l1(reg))
        res.params, res.converged
    """
    tol = _check(X, y, init, tol, maxiter)
    if not isinstance(fit_intercept, bool):
        raise TypeError(f"least_squares: fit_intercept must be a bool, got {type(fit_intercept).__name__}")
    dtype = acc_dtype(X)
    Xc, Yc = X.to(dtype), y.to(dtype)
    vector = Yc.dim() == 1
    Y = Yc[:, None] if vector else Yc
    n, p = Xc.shape
    # with an intercept the problem is that of the centred data; X is centred implicitly
    xmean = Xc.mean(0) if fit_intercept else None
    ymean = Y.mean(0) if fit_intercept else None
    if fit_intercept:
        Y = Y - ymean
    wshape = torch.Size((p,) + tuple(y.shape[1:]))
    W = torch.zeros((p, Y.shape[1]), dtype=dtype, device=X.device)
    if init is not None:
        W = init.detach().to(dtype).reshape(p, -1).clone()
    tol_eff = max(tol, 50 * torch.finfo(dtype).eps)

    def done(W2, R, iterations, err, method, ws):
        w = W2[:, 0] if vector else W2
        value = 0.5 * float((R * R).sum()) / n + (0.0 if prox is None else float(prox.value(w)))
        b = None
        if fit_intercept:
            b = ymean - xmean @ W2
            b = (b[0] if vector else b).to(X.dtype)
        return LeastSquaresResult(w.to(X.dtype), iterations, err, value, err <= tol_eff, method, ws, b)

    def xt(R):  # X^T R / n (centred X), one pass over X (R^T X: the layout BLAS reads X in order)
        out = (R[:, 0] @ Xc)[:, None] if R.shape[1] == 1 else (R.T @ Xc).T
        if fit_intercept:
            out = out - xmean[:, None] * R.sum(0)
        return out / n

    def columns(idx):  # the (centred) columns idx of X
        cols = Xc.index_select(1, idx)
        return cols - xmean[idx] if fit_intercept else cols

    XtY = xt(Y)
    scale = float(XtY.abs().max()) if p else 0.0
    if scale == 0:
        scale = 1.0
    everything = torch.arange(p, device=X.device)
    if prox is None:
        Xs = Xc - xmean if fit_intercept else Xc
        W = torch.linalg.lstsq(Xs.cpu(), Y.cpu(), driver="gelsd").solution.to(X.device)
        R = Xs @ W - Y
        return done(W, R, 1, float(xt(R).abs().max()) / scale, "lstsq", everything)
    if not isinstance(prox, Prox):
        raise TypeError(f"least_squares: prox must be a proxfunc operator or None, got {type(prox).__name__}")
    kind, lam, mu = _structure(prox, wshape, Xc)
    if kind is None:
        Xs = Xc - xmean if fit_intercept else Xc
        return _fallback(Xs, Y, prox, W, vector, tol_eff * scale, maxiter, scale, done, everything)

    ws = torch.zeros(0, dtype=torch.long, device=X.device)  # the working set, in order of entry
    Xws = Xc[:, :0]  # its columns of X
    gram = torch.zeros((0, 0), dtype=dtype, device=X.device)  # and their Gram matrix / n
    support = torch.nonzero((W != 0).any(dim=1)).flatten()
    R = columns(support) @ W[support] - Y if support.numel() else -Y
    iterations, stalled = 0, False
    while True:  # each round: check every feature (a pass over X), then solve on the working set
        G = xt(R) if support.numel() else -XtY
        score = _score(kind, W, G, lam, mu)
        err = max(float(score.max()), 0.0) / scale if p else 0.0
        if err <= tol_eff or iterations == maxiter:
            break
        # while features outside the working set violate their conditions, it grows by the worst
        # of them and then the zero features closest to entering (largest margin): at least
        # doubling the support, and at least 64 features
        outside = torch.ones(p, dtype=torch.bool, device=X.device)
        outside[ws] = False
        cand = torch.where(outside, score, -math.inf)
        violators = int((cand > tol_eff * scale).sum())
        grow = min(max(64, 2 * support.numel()), p - ws.numel()) if violators else 0
        if not grow and stalled:
            break  # the working set's problem is solved to rounding and nothing is left to add
        stalled = not grow
        if grow:
            new = torch.topk(cand, grow).indices.sort().values  # ascending: a gather in memory order
            Xnew = columns(new)
            cross = Xws.T @ Xnew / n
            gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, Xnew.T @ Xnew / n], 1)], 0)
            ws, Xws = torch.cat([ws, new]), torch.cat([Xws, Xnew], 1)
        C = XtY[ws]
        Wws = W[ws]
        inner_tol = 0.1 * tol_eff * scale
        lw, mw = lam[ws], None if mu is None else mu[ws]
        solved = None
        if kind == "elementwise":
            cols = [
                _feature_sign(gram, C[:, j], lw[:, j], mw[:, j], Wws[:, j], inner_tol, 50 + 10 * ws.numel())
                for j in range(Y.shape[1])
            ]
            if all(ok for _, ok in cols):
                solved = torch.stack([x for x, _ in cols], 1)
            else:  # a singular sign system (more active features than samples, ties): FISTA first
                Wws = torch.stack([x for x, _ in cols], 1)
        if solved is None:
            solved, _ = _gram_fista(kind, gram, C, lw, mw, Wws, inner_tol, 100_000)
        Wws = solved
        W = torch.zeros_like(W)
        W[ws] = Wws
        R = Xws @ Wws - Y
        support = ws  # nonzero rows lie in the working set
        iterations += 1
    method = "active set" if kind == "elementwise" else "group newton"
    return done(W, R, iterations, err, method, ws)


def _fallback(Xc, Y, prox, W, vector, tol_abs, maxiter, scale, done, everything):
    n = Xc.shape[0]
    XT = Xc.T.contiguous()

    def value_and_grad(w):
        w2 = w[:, None] if vector else w
        r = Xc @ w2 - Y
        g = XT @ r / n
        return 0.5 * (r * r).sum() / n, g[:, 0] if vector else g

    start = W[:, 0] if vector else W
    res = proximal_gradient(
        value_and_grad, start, prox, value_and_grad=True, quadratic=True, tol=tol_abs, maxiter=1000 * maxiter
    )
    w = res.params[:, None] if vector else res.params
    return done(w, Xc @ w - Y, res.iterations, res.error / scale, "proximal gradient", everything)
