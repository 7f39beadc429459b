"""pf.argmin: the derivative of a solution by implicit differentiation of its fixed point.

Oracles: the lasso's closed-form derivative on its active set, central finite differences of
tightly solved problems, and differentiating the unrolled iterations (fixed step 1/L) started
at the solution. Every torch.func transform that applies: grad, vjp, jacrev, jvp, jacfwd, vmap.
"""

import pytest
import torch
from sklearn.datasets import load_diabetes
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import proxfunc as pf
from proxfunc.implicit import conjugate_gradient
from proxfunc.solvers import proximal_gradient

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return torch.tensor(X), torch.tensor(y / y.std())


def lsq(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean()


def lasso(reg, X, y, **kw):
    return pf.argmin(lsq, torch.zeros(X.shape[1], dtype=D), pf.l1, args=(X, y), prox_args=(reg,), tol=1e-13, **kw)


def lasso_derivative(X, w, sign_weights):
    """d w / d reg on the support S: -(X_S^T X_S / n)^{-1} (sign(w_S) * weights_S); 0 off S."""
    S = w != 0
    out = torch.zeros_like(w)
    out[S] = -torch.linalg.solve(X[:, S].T @ X[:, S] / X.shape[0], sign_weights[S])
    return out


def test_lasso_closed_form_under_every_transform(diabetes):
    X, y = diabetes
    reg = torch.tensor(0.01, dtype=D)
    w = lasso(reg, X, y)
    S = w != 0
    assert S.any() and (~S).any()
    expected = lasso_derivative(X, w, torch.sign(w))
    torch.testing.assert_close(jacrev(lasso)(reg, X, y), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(jacfwd(lasso)(reg, X, y), expected, atol=1e-10, rtol=0)
    _, tangent = jvp(lambda r: lasso(r, X, y), (reg,), (torch.ones((), dtype=D),))
    torch.testing.assert_close(tangent, expected, atol=1e-10, rtol=0)
    c = torch.linspace(-1, 1, 10, dtype=D)
    _, pull = vjp(lambda r: lasso(r, X, y), reg)
    torch.testing.assert_close(pull(c)[0], c @ expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad(lambda r: lasso(r, X, y) @ c)(reg), c @ expected, atol=1e-10, rtol=0)
    # .backward() on a tensor that requires grad
    r = reg.clone().requires_grad_()
    (lasso(r, X, y) @ c).backward()
    torch.testing.assert_close(r.grad, c @ expected, atol=1e-10, rtol=0)
    # off the support the derivative is exactly zero
    assert (jacrev(lasso)(reg, X, y)[~S] == 0).all()


def test_vmap_over_hyperparameters_and_per_example_jacobians(diabetes):
    X, y = diabetes
    regs = torch.tensor([0.003, 0.01, 0.03], dtype=D)
    W = vmap(lasso, in_dims=(0, None, None))(regs, X, y)
    J = vmap(jacrev(lasso), in_dims=(0, None, None))(regs, X, y)
    for i, r in enumerate(regs):
        w = lasso(r, X, y)
        torch.testing.assert_close(W[i], w, atol=1e-12, rtol=0)
        torch.testing.assert_close(J[i], lasso_derivative(X, w, torch.sign(w)), atol=1e-10, rtol=0)


def test_data_derivatives_match_finite_differences(diabetes):
    X, y = diabetes
    reg = 0.01
    c = torch.linspace(-1, 2, 10, dtype=D)

    def loss(X_, y_):
        return lasso(torch.tensor(reg, dtype=D), X_, y_, maxiter=50_000) @ c

    gX, gy = grad(loss, argnums=(0, 1))(X, y)
    eps = 1e-6
    for i, j in [(3, 2), (100, 8), (7, 0)]:
        E = torch.zeros_like(X)
        E[i, j] = eps
        fd = (loss(X + E, y) - loss(X - E, y)) / (2 * eps)
        assert float(gX[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-7)
    for i in [0, 200]:
        E = torch.zeros_like(y)
        E[i] = eps
        fd = (loss(X, y + E) - loss(X, y - E)) / (2 * eps)
        assert float(gy[i]) == pytest.approx(float(fd), rel=1e-6, abs=1e-7)


def test_group_lasso_matches_the_unrolled_solver(diabetes):
    # l21's Jacobian is not a projector (the live groups' block scaling): the symmetric system
    # D - D C D is solved with it. Against back-propagation through 3000 unrolled iterations
    # with the fixed step 1/L, started at the solution (a contraction there, so they agree).
    X, y = diabetes
    Y = torch.stack([y, X[:, 2] / X[:, 2].std(), X[:, 3] / X[:, 3].std()], 1)
    Xf = X[:, [0, 1, 4, 5, 6, 7, 8, 9]]

    def fun(W, X_, Y_):
        return 0.5 * ((X_ @ W - Y_) ** 2).sum() / len(Y_)

    reg = torch.tensor(0.01, dtype=D)
    W0 = torch.zeros(8, 3, dtype=D)
    W = pf.argmin(fun, W0, pf.l21, args=(Xf, Y), prox_args=(reg,), tol=1e-13)
    live = W.norm(dim=1) > 0
    assert live.any() and (~live).any()
    C = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    g_impl = grad(
        lambda r, Y_: (pf.argmin(fun, W0, pf.l21, args=(Xf, Y_), prox_args=(r,), tol=1e-13) * C).sum(), (0, 1)
    )(reg, Y)
    L = float(torch.linalg.matrix_norm(Xf, 2) ** 2 / len(Y))
    r = reg.clone().requires_grad_()
    Yg = Y.clone().requires_grad_()
    res = proximal_gradient(
        lambda W_: fun(W_, Xf, Yg), W.detach(), pf.l21(r), stepsize=1 / L, acceleration=False, tol=0.0, maxiter=3000
    )
    g_unrolled = torch.autograd.grad((res.params * C).sum(), (r, Yg))
    torch.testing.assert_close(g_impl[0], g_unrolled[0], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(g_impl[1], g_unrolled[1], atol=1e-9, rtol=1e-7)


def test_box_bounds_and_pytree_params(diabetes):
    # Derivatives with respect to the box's bounds (clamped entries follow their bound, free ones
    # move through the least-squares coupling) and a dict of parameters with an unpenalised bias.
    X, y = diabetes
    Xs = X * X.shape[0] ** 0.5

    def fun(p, X_, y_):
        return 0.5 * ((X_ @ p["w"] + p["b"] - y_) ** 2).mean()

    def solve(lo, hi):
        prox = lambda lo_, hi_: pf.partition({"w": pf.box(lo_, hi_)})  # noqa: E731
        p0 = {"w": torch.zeros(10, dtype=D), "b": torch.zeros((), dtype=D)}
        return pf.argmin(fun, p0, prox, args=(Xs, y), prox_args=(lo, hi), tol=1e-13, maxiter=50_000)

    lo = torch.full((10,), -0.3, dtype=D)
    hi = torch.full((10,), 0.4, dtype=D)
    p = solve(lo, hi)
    clamped = (p["w"] == -0.3) | (p["w"] == 0.4)
    assert clamped.any() and (~clamped).any()
    c = torch.linspace(-1, 1, 10, dtype=D)

    def loss(lo_, hi_):
        q = solve(lo_, hi_)
        return q["w"] @ c + 3 * q["b"]

    g_lo, g_hi = grad(loss, argnums=(0, 1))(lo, hi)
    eps = 1e-6
    for k in range(10):
        E = torch.zeros(10, dtype=D)
        E[k] = eps
        fd_lo = (loss(lo + E, hi) - loss(lo - E, hi)) / (2 * eps)
        fd_hi = (loss(lo, hi + E) - loss(lo, hi - E)) / (2 * eps)
        assert float(g_lo[k]) == pytest.approx(float(fd_lo), rel=1e-6, abs=1e-8)
        assert float(g_hi[k]) == pytest.approx(float(fd_hi), rel=1e-6, abs=1e-8)


def test_conjugate_gradient_masked_and_eager_agree():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(12, 7, generator=g, dtype=D)
    H = A.T @ A
    b = [torch.randn(7, generator=g, dtype=D)]
    x = conjugate_gradient(lambda v: [H @ v[0]], b, tol=1e-14)
    torch.testing.assert_close(H @ x[0], b[0], atol=1e-10, rtol=0)
    xs = vmap(lambda bb: conjugate_gradient(lambda v: [H @ v[0]], [bb], tol=1e-14)[0])(torch.stack([b[0], 2 * b[0]]))
    torch.testing.assert_close(xs[1], 2 * x[0], atol=1e-10, rtol=0)


def test_argument_errors():
    X = torch.randn(5, 3, dtype=D)
    y = torch.randn(5, dtype=D)
    w0 = torch.zeros(3, dtype=D)
    with pytest.raises(TypeError, match="fun"):
        pf.argmin(None, w0)
    with pytest.raises(TypeError, match="args"):
        pf.argmin(lsq, w0, args=[X, y])
    with pytest.raises(ValueError, match="prox_args"):
        pf.argmin(lsq, w0, pf.l1(0.1), args=(X, y), prox_args=(0.1,))
    with pytest.raises(TypeError, match="operator"):
        pf.argmin(lsq, w0, lambda r: r, args=(X, y), prox_args=(0.1,))
    with pytest.raises(TypeError, match="floating"):
        pf.argmin(lsq, torch.zeros(3, dtype=torch.int64), args=(X, y))
    with pytest.raises(ValueError, match="restart"):
        pf.argmin(lsq, w0, args=(X, y), restart="sometimes")


def test_weighted_lasso_jacobian_with_respect_to_every_weight(diabetes):
    # reg = c (one weight per feature): on the support, d w_S / d c_j = -(X_S^T X_S / n)^{-1}
    # e_j sign(w_j) for j in S; weights of features off the support have no effect.
    X, y = diabetes
    c = torch.linspace(0.005, 0.02, 10, dtype=D)
    w = lasso(c, X, y)
    J = jacrev(lasso)(c, X, y)
    S = w != 0
    assert S.any() and (~S).any()
    n = X.shape[0]
    expected = torch.zeros(10, 10, dtype=D)
    inv = torch.linalg.inv(X[:, S].T @ X[:, S] / n)
    idx = S.nonzero().flatten()
    expected[idx[:, None], idx[None, :]] = -inv * torch.sign(w[S])[None, :]
    torch.testing.assert_close(J, expected, atol=1e-9, rtol=1e-9)


def test_lasso_reg_by_gradient_example_improves_the_validation_loss():
    from examples.lasso_reg_by_gradient import main

    out = main(["--steps", "6", "--grid", "0"])
    assert out["loss"] < 0.85 * out["start_loss"]  # 0.32 -> about 0.27 (the grid's best: 0.263)
    assert out["reg"] < 0.01
