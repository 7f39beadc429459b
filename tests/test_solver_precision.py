"""proximal_gradient converges to machine precision, and its line search never outgrows what it certifies.

Oracles: the lasso's closed form on its support (a linear solve, iterated to a fixed support),
scikit-learn's MultiTaskLasso at dual-gap tolerance 1e-16 with the group lasso's KKT conditions,
scipy's bounded-variable least squares (BVLS, an active-set method that ends on an exact linear
solve), and for the line search the exact curvature ``d^T H d`` of a quadratic.
"""

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear
from sklearn.datasets import load_diabetes
from sklearn.linear_model import MultiTaskLasso

import proxfunc as pf
from proxfunc.solvers import ProximalGradient, proximal_gradient
from tests.conftest import requires_compile

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

ALGOS = [
    pytest.param(dict(acceleration=True), id="fista"),
    pytest.param(dict(acceleration=True, restart="function"), id="fista-function-restart"),
    pytest.param(dict(acceleration=False), id="ista"),
]


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return torch.tensor(X), torch.tensor(y / y.std())


def _lasso_closed_form(X, y, alpha, w):
    """The lasso solution with the support and signs of ``w``: on S, (X_S^T X_S / n) w_S =
    X_S^T y / n - alpha sign(w_S); checked to be a solution by the KKT conditions."""
    n = X.shape[0]
    S = w != 0
    XS = X[:, S]
    wS = torch.linalg.solve(XS.T @ XS / n, XS.T @ y / n - alpha * torch.sign(w[S]))
    out = torch.zeros_like(w)
    out[S] = wS
    corr = X.T @ (y - X @ out) / n
    assert (torch.sign(wS) == torch.sign(w[S])).all()
    assert (corr[~S].abs() < alpha).all()  # strictly inside: the support is the solution's
    return out


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("alpha", [0.003, 0.01])
def test_lasso_reaches_closed_form(diabetes, algo, alpha):
    X, y = diabetes
    res = proximal_gradient(
        lambda w: 0.5 * ((X @ w - y) ** 2).mean(),
        torch.zeros(10, dtype=D),
        pf.l1(alpha),
        tol=1e-14,
        maxiter=5000,
        **algo,
    )
    assert res.converged, (res.iterations, res.error)
    ref = _lasso_closed_form(X, y, alpha, res.params)
    torch.testing.assert_close(res.params, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("algo", ALGOS)
def test_group_lasso_reaches_sklearn_and_kkt(diabetes, algo):
    X, y = diabetes
    Xn = X.numpy()
    feats = [0, 1, 4, 5, 6, 7, 8, 9]
    Y = np.stack([y.numpy(), Xn[:, 2] / Xn[:, 2].std(), Xn[:, 3] / Xn[:, 3].std()], axis=1)
    Xf = Xn[:, feats]
    alpha = 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = MultiTaskLasso(alpha=alpha, tol=1e-16, max_iter=1_000_000, fit_intercept=False).fit(Xf, Y)
    Xt, Yt = torch.tensor(Xf), torch.tensor(Y)
    res = proximal_gradient(
        lambda W: 0.5 * ((Xt @ W - Yt) ** 2).sum() / len(Yt),
        torch.zeros(8, 3, dtype=D),
        pf.l21(alpha),
        tol=1e-14,
        maxiter=5000,
        **algo,
    )
    assert res.converged
    W = res.params
    np.testing.assert_allclose(W.numpy(), sk.coef_.T, atol=1e-10, rtol=0)
    # KKT: X_g^T r / n = alpha W_g / ||W_g|| on live rows, ||X_g^T r / n|| <= alpha on dead ones
    C = Xt.T @ (Yt - Xt @ W) / len(Yt)
    norms = W.norm(dim=1)
    live = norms > 0
    assert live.any() and (~live).any()
    torch.testing.assert_close(C[live], alpha * W[live] / norms[live, None], atol=1e-12, rtol=0)
    assert (C[~live].norm(dim=1) <= alpha).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_box_constrained_least_squares_reaches_bvls(diabetes, algo):
    X, y = diabetes
    Xs = X * X.shape[0] ** 0.5  # unit-variance columns: some bounds are active, some not
    lo, hi = -0.3, 0.4
    ref = lsq_linear(Xs.numpy(), y.numpy(), bounds=(lo, hi), method="bvls", tol=1e-15).x
    res = proximal_gradient(
        lambda w: 0.5 * ((Xs @ w - y) ** 2).mean(),
        torch.zeros(10, dtype=D),
        pf.box(lo, hi),
        tol=1e-14,
        maxiter=5000,
        **algo,
    )
    assert res.converged
    w = res.params.numpy()
    free = (w > lo) & (w < hi)
    assert 0 < free.sum() < 10
    np.testing.assert_allclose(w, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("acceleration", [True, False])
def test_line_search_steps_are_certified_by_the_exact_curvature(diabetes, acceleration):
    # For a quadratic fun the sufficient-decrease test is exactly d^T H d <= ||d||^2 / s.
    # Every accepted step satisfies it (to rounding), and iterating far past convergence the
    # step does not grow and the iterates do not leave the solution.
    X, y = diabetes
    n = X.shape[0]
    H = X.T @ X / n
    solver = ProximalGradient(lambda w: 0.5 * ((X @ w - y) ** 2).mean(), pf.l1(0.01), acceleration=acceleration)
    state = solver.init(torch.zeros(10, dtype=D))
    steps, errors = [], []
    for _ in range(600):  # about 10 times the iterations to convergence
        y_k = state.y
        state = solver.update(state)
        d = state.params - y_k
        dd = float(d @ d)
        if dd > 0:
            assert float(d @ H @ d) <= dd / float(state.stepsize) * (1 + 1e-9) + 1e-300
        steps.append(float(state.stepsize))
        errors.append(float(state.error))
    assert max(errors[-300:]) < 1e-13
    assert len(set(steps[-300:])) == 1  # no growth once the tests are decided by rounding
    ref = _lasso_closed_form(X, y, 0.01, state.params)
    torch.testing.assert_close(state.params, ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize("acceleration", [True, False])
def test_unrolled_iterations_from_the_solution_give_the_implicit_derivative(diabetes, acceleration):
    # Started at the solution, the unrolled line-search iterations form a non-expansive map, so
    # d w / d reg through them is the implicit derivative -(X_S^T X_S / n)^{-1} sign(w_S).
    X, y = diabetes
    n = X.shape[0]
    fun = lambda w: 0.5 * ((X @ w - y) ** 2).mean()  # noqa: E731
    w_star = proximal_gradient(fun, torch.zeros(10, dtype=D), pf.l1(0.01), tol=1e-14, maxiter=5000).params
    reg = torch.tensor(0.01, dtype=D, requires_grad=True)
    L = float(torch.linalg.matrix_norm(X, 2) ** 2 / n)
    res = proximal_gradient(
        fun, w_star, pf.l1(reg), acceleration=acceleration, init_stepsize=1 / L, tol=0.0, maxiter=1000
    )
    w = res.params
    S = w_star != 0
    jac = torch.stack([torch.autograd.grad(w[i], reg, retain_graph=True)[0] for i in range(10)])
    expected = torch.zeros(10, dtype=D)
    expected[S] = -torch.linalg.solve(X[:, S].T @ X[:, S] / n, torch.sign(w_star[S]))
    torch.testing.assert_close(jac, expected, rtol=1e-7, atol=1e-9)


def test_value_and_grad_option_matches_autograd(diabetes):
    # fun returning (value, grad) runs no autograd and gives the same iterates
    X, y = diabetes
    n = X.shape[0]

    def vg(w):
        r = X @ w - y
        return 0.5 * (r @ r) / n, X.T @ r / n

    a = proximal_gradient(vg, torch.zeros(10, dtype=D), pf.l1(0.01), tol=1e-12, value_and_grad=True)
    b = proximal_gradient(lambda w: vg(w)[0], torch.zeros(10, dtype=D), pf.l1(0.01), tol=1e-12)
    assert a.iterations == b.iterations
    torch.testing.assert_close(a.params, b.params, atol=1e-14, rtol=0)
    assert a.value == pytest.approx(b.value, rel=1e-14)


@requires_compile
@pytest.mark.parametrize(
    "kw", [dict(), dict(acceleration=False), dict(restart="function"), dict(stepsize=100.0)], ids=repr
)
def test_run_compiled_reaches_the_same_solution(diabetes, kw):
    # The whole loop as one while_loop graph (backend="eager": dynamo's trace, no code generation
    # in the test); its spread line search (one trial an iteration) reaches the same solution.
    X, y = diabetes
    solver = ProximalGradient(lambda w, X_, y_: 0.5 * ((X_ @ w - y_) ** 2).mean(), pf.l1(0.01), **kw)
    res = solver.run_compiled(torch.zeros(10, dtype=D), X, y, tol=1e-13, maxiter=3000, backend="eager")
    assert res.converged, (res.iterations, res.error)
    ref = _lasso_closed_form(X, y, 0.01, res.params)
    torch.testing.assert_close(res.params, ref, atol=1e-10, rtol=0)
    eager = solver.run(torch.zeros(10, dtype=D), X, y, tol=1e-13, maxiter=3000)
    assert res.value == pytest.approx(eager.value, rel=1e-14)
    if "stepsize" not in kw:  # trials: all line-search trials of the loop
        assert int(res.state.trials) >= res.iterations
    # a second call with other data reuses the loop
    res2 = solver.run_compiled(torch.zeros(10, dtype=D), X, 2 * y, tol=1e-13, maxiter=3000, backend="eager")
    torch.testing.assert_close(res2.params, _lasso_closed_form(X, 2 * y, 0.01, res2.params), atol=1e-10, rtol=0)


@pytest.mark.parametrize("value_and_grad", [False, True])
def test_quadratic_fista_takes_the_same_iterates_with_one_evaluation(diabetes, value_and_grad):
    # quadratic=True: FISTA's gradient and value at the extrapolated point come from those at the
    # last two iterates (exact for a quadratic), so an iteration evaluates fun once.
    X, y = diabetes
    n = X.shape[0]
    calls = []

    def fun(w):
        calls.append(1)
        r = X @ w - y
        return (0.5 * (r @ r) / n, X.T @ r / n) if value_and_grad else 0.5 * (r @ r) / n

    kw = dict(tol=1e-14, maxiter=5000, value_and_grad=value_and_grad)
    plain = proximal_gradient(fun, torch.zeros(10, dtype=D), pf.l1(0.01), **kw)
    n_plain = len(calls)
    calls.clear()
    quad = proximal_gradient(fun, torch.zeros(10, dtype=D), pf.l1(0.01), quadratic=True, **kw)
    assert quad.converged
    assert abs(quad.iterations - plain.iterations) <= 2
    assert len(calls) <= quad.iterations + 40 < n_plain  # about one evaluation an iteration (+ trials)
    torch.testing.assert_close(quad.params, _lasso_closed_form(X, y, 0.01, quad.params), atol=1e-10, rtol=0)
    # init/update gives the same iterates as run
    solver = ProximalGradient(fun, pf.l1(0.01), quadratic=True, value_and_grad=value_and_grad)
    state = solver.init(torch.zeros(10, dtype=D))
    for _ in range(30):
        state = solver.update(state)
    res = solver.run(torch.zeros(10, dtype=D), maxiter=30, tol=0.0)
    torch.testing.assert_close(state.params, res.params, atol=0, rtol=0)
    assert state.grad_params is not None
