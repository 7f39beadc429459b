"""Independent reference implementations for the proxfunc tests (numpy / scipy, float64).

Nothing here imports proxfunc. Three kinds of oracle:

* ``num_*``: the prox / projection found by a generic numerical solver (scipy.optimize) on a
  smooth reformulation of ``argmin_z f(z) + ||z - x||^2 / (2 t)`` (split ``z = u - v`` for l1,
  epigraph variables for the norms, explicit constraints for the sets);
* ``proj_*``: Euclidean projections onto the balls that are the conjugate domains
  (linf ball, l2 ball, l1 ball by sorting, per-group balls), written from the textbook
  formulas, for the Moreau identity ``x = prox_{t f}(x) + t * P_C(x / t)``;
* ``obj_*``: the objectives themselves, for perturbation tests.

Groups are handled as the rows of a 2-D array: :func:`group_matrix` builds row ``i`` from the
slice ``i`` along each leaf's group dim (concatenated), :func:`ungroup` undoes it.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

# ----------------------------------------------------------------------------- groups


def group_matrix(leaves: list[np.ndarray], dims: list[int | None]) -> np.ndarray:
    """Row ``i`` = concatenation of ``leaf.take(i, axis=d).ravel()`` over leaves (d=None: one group)."""
    rows = []
    for a, d in zip(leaves, dims):
        if d is None:
            rows.append(a.reshape(1, -1))
        else:
            w = a.size // a.shape[d] if a.shape[d] else 0
            block = np.zeros((a.shape[d], w))
            for i in range(a.shape[d]):
                block[i] = np.take(a, i, axis=d).ravel()
            rows.append(block)
    return np.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]


def ungroup(M: np.ndarray, like: list[np.ndarray], dims: list[int | None]) -> list[np.ndarray]:
    out, col = [], 0
    for a, d in zip(like, dims):
        b = np.empty_like(a)
        if d is None:
            b[...] = M[0, col : col + a.size].reshape(a.shape)
            col += a.size
        else:
            w = a.size // a.shape[d] if a.shape[d] else 0
            for i in range(a.shape[d]):
                idx = [slice(None)] * a.ndim
                idx[d] = i
                b[tuple(idx)] = M[i, col : col + w].reshape(np.take(a, i, axis=d).shape)
            col += w
        out.append(b)
    return out


# ------------------------------------------------------------------- objectives


def obj_l1(z, reg):
    return reg * np.abs(z).sum()


def obj_l2(z, reg):
    return reg * np.sqrt((z * z).sum())


def obj_linf(z, reg):
    return reg * (np.abs(z).max() if z.size else 0.0)


def obj_elastic(z, reg, gamma):
    return reg * (np.abs(z).sum() + 0.5 * gamma * (z * z).sum())


def obj_logbarrier(z, reg):
    return -reg * np.log(z).sum() if np.all(z > 0) else np.inf


def obj_l21(M, reg):
    return reg * np.sqrt((M * M).sum(axis=1)).sum()


def obj_linf1(M, reg):
    return reg * (np.abs(M).max(axis=1).sum() if M.shape[1] else 0.0)


def prox_objective(f, z, x, t):
    return f(z) + ((z - x) ** 2).sum() / (2 * t)


# ------------------------------------------------------------ numerical proxes

_TIGHT = {"ftol": 1e-15, "maxiter": 2000}


def num_l1(x, reg, t, gamma=0.0):
    """argmin reg*(|z|_1 + gamma/2 |z|^2) + |z-x|^2/(2t) via z = u - v, u, v >= 0 (L-BFGS-B)."""
    x = np.asarray(x, float).ravel()
    n = x.size
    if n == 0:
        return x.copy()

    def fg(w):
        u, v = w[:n], w[n:]
        z = u - v
        r = z - x
        val = reg * (u.sum() + v.sum()) + 0.5 * reg * gamma * (z @ z) + (r @ r) / (2 * t)
        gz = reg * gamma * z + r / t
        return val, np.concatenate([reg + gz, reg - gz])

    w0 = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)])
    res = optimize.minimize(
        fg, w0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * n), options={"ftol": 1e-16, "gtol": 1e-14}
    )
    return res.x[:n] - res.x[n:]


def _slsqp(fun, jac, w0, cons, bounds=None):
    res = optimize.minimize(fun, w0, jac=jac, method="SLSQP", constraints=cons, bounds=bounds, options=_TIGHT)
    return res.x


def _epigraph_objective(X, r):
    """``r * sum_i s_i + |Z - X|^2 / 2`` and its gradient over ``w = (vec Z, s)``, ``X`` of shape
    (G, m): the smooth objective of the group-norm proxes with one epigraph variable per group."""
    G, m = X.shape

    def fun(w):
        Z, s = w[: G * m].reshape(G, m), w[G * m :]
        return r * s.sum() + ((Z - X) ** 2).sum() / 2

    def jac(w):
        Z = w[: G * m].reshape(G, m)
        return np.concatenate([(Z - X).ravel(), np.full(G, r)])

    return fun, jac


def num_group_l2(M, reg, t):
    """Rows are groups: argmin reg*sum_i |z_i|_2 + |Z-M|^2/(2t) with epigraph s_i >= |z_i|_2 (SLSQP).

    The unsquared cone constraint started at (M, |M_i|) converges to ~1e-9 even when a group's
    solution is tiny (the squared form s_i^2 >= |z_i|^2 degenerates there); SLSQP is restarted
    from its own answer a few times.
    """
    M = np.asarray(M, float)
    G, m = M.shape
    if G == 0 or m == 0:
        return M.copy()
    sc = max(np.abs(M).max(), reg * t, 1e-300)  # solve on a unit scale
    X, r = M / sc, reg * t / sc

    fun, jac = _epigraph_objective(X, r)

    def con(w):
        Z, s = w[: G * m].reshape(G, m), w[G * m :]
        return s - np.sqrt((Z * Z).sum(axis=1) + 1e-300)

    def con_jac(w):
        Z = w[: G * m].reshape(G, m)
        n = np.maximum(np.sqrt((Z * Z).sum(axis=1)), 1e-300)
        J = np.zeros((G, G * m + G))
        for i in range(G):
            J[i, i * m : (i + 1) * m] = -Z[i] / n[i]
            J[i, G * m + i] = 1.0
        return J

    w = np.concatenate([X.ravel(), np.sqrt((X * X).sum(axis=1))])
    for _ in range(3):
        w = _slsqp(fun, jac, w, [{"type": "ineq", "fun": con, "jac": con_jac}])
    return w[: G * m].reshape(G, m) * sc


def num_l2(x, reg, t):
    x = np.asarray(x, float)
    return num_group_l2(x.reshape(1, -1), reg, t).reshape(x.shape)


def num_group_linf(M, reg, t):
    """Rows are groups: argmin reg*sum_i max|z_i| + |Z-M|^2/(2t) with -s_i <= z_ij <= s_i."""
    M = np.asarray(M, float)
    G, m = M.shape
    if G == 0 or m == 0:
        return M.copy()
    sc = max(np.abs(M).max(), reg * t, 1e-300)
    X, r = M / sc, reg * t / sc

    fun, jac = _epigraph_objective(X, r)

    # s_i - z_ij >= 0 and s_i + z_ij >= 0 (linear)
    A = np.zeros((2 * G * m, G * m + G))
    for i in range(G):
        for j in range(m):
            k = i * m + j
            A[2 * k, k], A[2 * k, G * m + i] = -1, 1
            A[2 * k + 1, k], A[2 * k + 1, G * m + i] = 1, 1
    cons = [{"type": "ineq", "fun": lambda w: A @ w, "jac": lambda w: A}]
    w0 = np.concatenate([X.ravel(), np.abs(X).max(axis=1)])
    w = _slsqp(fun, jac, w0, cons)
    return w[: G * m].reshape(G, m) * sc


def num_linf(x, reg, t):
    x = np.asarray(x, float)
    return num_group_linf(x.reshape(1, -1), reg, t).reshape(x.shape)


def num_logbarrier(x, reg, t):
    """Entrywise root of the optimality condition z - x - reg*t/z = 0 on z > 0 (brentq)."""
    x = np.asarray(x, float)
    out = np.empty_like(x)
    c = reg * t
    for k, xi in np.ndenumerate(x):
        g = lambda z, xi=xi: z * z - xi * z - c  # noqa: E731 - z*(z - x - c/z)
        hi = max(abs(xi), 1.0) + np.sqrt(c) + 1.0
        out[k] = optimize.brentq(g, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    return out


# -------------------------------------------------------- numerical projections


def num_proj(kind: str, x, **kw):
    """argmin_{z in C} |z - x|^2 by SLSQP / L-BFGS-B; C named by ``kind``."""
    x = np.asarray(x, float).ravel()
    n = x.size
    if n == 0:
        return x.copy()

    def fun(z):
        return 0.5 * ((z - x) ** 2).sum()

    def jac(z):
        return z - x

    if kind == "box":
        lo, hi = kw["lower"], kw["upper"]
        b = [(None if lo == -np.inf else lo, None if hi == np.inf else hi)] * n
        res = optimize.minimize(
            fun, np.zeros(n), jac=jac, method="L-BFGS-B", bounds=b, options={"ftol": 1e-16, "gtol": 1e-14}
        )
        return res.x
    if kind == "nonneg":
        return num_proj("box", x, lower=0.0, upper=np.inf)
    if kind == "linf_ball":
        r = kw["radius"]
        return num_proj("box", x, lower=-r, upper=r)
    if kind == "simplex":
        r = kw["radius"]
        cons = [{"type": "eq", "fun": lambda z: z.sum() - r, "jac": lambda z: np.ones((1, n))}]
        return _slsqp(fun, jac, np.full(n, r / n), cons, [(0, None)] * n)
    if kind == "l1_ball":
        r = kw["radius"]

        def f2(w):
            return 0.5 * ((w[:n] - w[n:] - x) ** 2).sum()

        def j2(w):
            g = w[:n] - w[n:] - x
            return np.concatenate([g, -g])

        cons = [{"type": "ineq", "fun": lambda w: r - w.sum(), "jac": lambda w: -np.ones((1, 2 * n))}]
        w = _slsqp(f2, j2, np.zeros(2 * n), cons, [(0, None)] * (2 * n))
        return w[:n] - w[n:]
    if kind == "l2_ball":
        r = kw["radius"]
        cons = [{"type": "ineq", "fun": lambda z: r * r - z @ z, "jac": lambda z: -2 * z[None, :]}]
        return _slsqp(fun, jac, np.zeros(n), cons)
    raise ValueError(kind)


# --------------------------------------- conjugate-domain projections (Moreau)


def proj_linf_ball(x, r):
    return np.clip(x, -r, r)


def proj_l2_ball(x, r):
    n = np.sqrt((x * x).sum())
    return x if n <= r else x * (r / n)


def proj_l1_ball_sort(x, r):
    """Duchi et al. (2008), Figure 1: sort |x| descending, find rho, threshold theta."""
    x = np.asarray(x, float)
    a = np.abs(x).ravel()
    if a.sum() <= r:
        return x.copy()
    if r == 0:
        return np.zeros_like(x)
    u = np.sort(a)[::-1]
    css = np.cumsum(u)
    j = np.arange(1, u.size + 1)
    rho = np.nonzero(u - (css - r) / j > 0)[0][-1]
    theta = (css[rho] - r) / (rho + 1)
    return np.sign(x) * np.maximum(np.abs(x) - theta, 0)


def proj_simplex_sort(x, r):
    x = np.asarray(x, float).ravel()
    u = np.sort(x)[::-1]
    css = np.cumsum(u)
    j = np.arange(1, u.size + 1)
    rho = np.nonzero(u - (css - r) / j > 0)[0][-1]
    theta = (css[rho] - r) / (rho + 1)
    return np.maximum(x - theta, 0)


def proj_rows(M, r, proj):
    return np.stack([proj(row, r) for row in M]) if M.shape[0] else M.copy()


def prox_elastic_conj(v, reg, gamma, s):
    """prox of s * f* at v, f = reg*(|z| + gamma/2 z^2): f*(w) = max(|w| - reg, 0)^2 / (2 reg gamma)."""
    if reg == 0:  # f = 0, f* = indicator of {0}
        return np.zeros_like(v)
    if gamma == 0:
        return proj_linf_ball(v, reg)
    a = s / (reg * gamma)
    w = np.sign(v) * (reg + (np.abs(v) - reg) / (1 + a))
    return np.where(np.abs(v) <= reg, v, w)


def prox_logbarrier_conj(v, reg, s):
    """prox of s * f* at v, f = -reg*sum log z: f*(w) = -reg - reg*log(-w/reg) on w < 0.

    Optimality: -s*reg/w + w - v = 0 with w < 0, so w = (v - sqrt(v^2 + 4 s reg)) / 2.
    """
    return (v - np.sqrt(v * v + 4 * s * reg)) / 2


# ------------------------------------------------------------- test inputs

MODES = ("normal", "zeros", "ties", "equal_rows", "wide")


def make_array(rng: np.random.Generator, shape, scale: float, mode: str) -> np.ndarray:
    """Random float64 array with a structure that stresses thresholding code.

    ``zeros``: about half the entries exactly 0 (and sometimes a whole first row);
    ``ties``: values from {-1, -1/2, 0, 1/2, 1}; ``equal_rows``: each row constant up to sign;
    ``wide``: magnitudes spread over six orders.
    """
    shape = tuple(shape)
    x = rng.standard_normal(shape)
    if mode == "zeros":
        x = np.where(rng.random(shape) < 0.5, 0.0, x)
        if len(shape) and shape[0] and rng.random() < 0.5:
            x[0] = 0.0
    elif mode == "ties":
        x = rng.choice(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), size=shape)
    elif mode == "equal_rows":
        if len(shape) >= 1 and shape[0]:
            row = rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))
            x = np.broadcast_to(row, shape) * rng.choice(np.array([-1.0, 1.0]), size=shape)
    elif mode == "wide":
        x = x * 10.0 ** rng.uniform(-3, 3, size=shape)
    return np.ascontiguousarray(x * scale)


def num_sparse_group(M, r1, r2, t):
    """argmin r1*|Z|_1 + r2*sum_i |z_i|_2 + |Z-M|^2/(2t) with epigraphs p_ij >= |z_ij| (linear) and
    s_i >= |z_i|_2 (cone), by SLSQP restarted from its own answer until the objective settles."""
    M = np.asarray(M, float)
    G, m = M.shape
    if M.size == 0:
        return M.copy()
    sc = max(np.abs(M).max(), (r1 + r2) * t, 1e-300)
    X, a, b = M / sc, r1 * t / sc, r2 * t / sc
    n = G * m

    def split(w):
        return w[:n].reshape(G, m), w[n : 2 * n], w[2 * n :]

    def fun(w):
        Z, p, s = split(w)
        return a * p.sum() + b * s.sum() + ((Z - X) ** 2).sum() / 2

    def jac(w):
        Z, p, s = split(w)
        return np.concatenate([(Z - X).ravel(), np.full(n, a), np.full(G, b)])

    A = np.zeros((2 * n, 2 * n + G))  # p - z >= 0, p + z >= 0
    for k in range(n):
        A[2 * k, k], A[2 * k, n + k] = -1, 1
        A[2 * k + 1, k], A[2 * k + 1, n + k] = 1, 1

    def cone(w):
        Z, p, s = split(w)
        return s - np.sqrt((Z * Z).sum(axis=1) + 1e-300)

    def cone_jac(w):
        Z, p, s = split(w)
        nz = np.maximum(np.sqrt((Z * Z).sum(axis=1)), 1e-300)
        J = np.zeros((G, 2 * n + G))
        for i in range(G):
            J[i, i * m : (i + 1) * m] = -Z[i] / nz[i]
            J[i, 2 * n + i] = 1.0
        return J

    cons = [
        {"type": "ineq", "fun": lambda w: A @ w, "jac": lambda w: A},
        {"type": "ineq", "fun": cone, "jac": cone_jac},
    ]
    w = np.concatenate([X.ravel(), np.abs(X).ravel(), np.sqrt((X * X).sum(axis=1))])
    last = np.inf
    for _ in range(10):
        w = _slsqp(fun, jac, w, cons)
        f = fun(w)
        if f >= last - 1e-15:
            break
        last = f
    return split(w)[0] * sc


def num_scalar(f, x, t, lo=-np.inf, hi=np.inf):
    """Entrywise argmin_{lo <= z <= hi} f(z) + (z - x)^2/(2t) by bounded Brent (brute force in 1-D)."""
    x = np.asarray(x, float)
    out = np.empty_like(x)
    for k, xi in np.ndenumerate(x):
        a = max(lo, xi - 10 * (abs(xi) + 1))
        b = min(hi, xi + 10 * (abs(xi) + 1))
        res = optimize.minimize_scalar(
            lambda z, xi=xi: f(z) + (z - xi) ** 2 / (2 * t), bounds=(a, b), method="bounded", options={"xatol": 1e-13}
        )
        z = res.x
        for cand in (a, b, 0.0):  # the kinks and the bounds, where Brent may stop short
            if a <= cand <= b and f(cand) + (cand - xi) ** 2 / (2 * t) < f(z) + (z - xi) ** 2 / (2 * t):
                z = cand
        out[k] = z
    return out
