"""proximal_gradient (ISTA/FISTA) against scikit-learn and scipy on real bundled data.

Oracles: scikit-learn's coordinate descent / SAGA solvers (tolerances tightened), scipy's
NNLS, the lasso's KKT conditions, and the sufficient-decrease inequality itself.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls
from sklearn.datasets import load_diabetes, load_digits
from sklearn.linear_model import ElasticNet, Lasso, LogisticRegression, MultiTaskLasso

import proxfunc as pf
from proxfunc.solvers import ProximalGradient, proximal_gradient
from tests.conftest import requires_compile

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return X, y / y.std()


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def _least_squares(X, Y):
    Xt, Yt = torch.tensor(X, dtype=D), torch.tensor(Y, dtype=D)

    def fun(p):
        r = Xt @ p["w"] + p["b"] - Yt
        return 0.5 * (r * r).sum() / Xt.shape[0]

    return fun


def _start(p, tasks=None):
    shape = (p,) if tasks is None else (p, tasks)
    return {"w": torch.zeros(shape, dtype=D), "b": torch.zeros(shape[1:], dtype=D)}


def _quiet_fit(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y)


# ----------------------------------------------------------------------- scikit-learn oracles
@pytest.mark.parametrize("alpha", [0.003, 0.03])
def test_lasso_matches_sklearn(diabetes, alpha):
    # sklearn: ||y - Xw - b||^2 / (2n) + alpha ||w||_1, intercept unpenalised (pf.partition)
    X, y = diabetes
    sk = _quiet_fit(Lasso(alpha=alpha, tol=1e-14, max_iter=200_000), X, y)
    res = proximal_gradient(
        _least_squares(X, y), _start(10), pf.partition({"w": pf.l1(alpha)}), tol=1e-10, maxiter=20_000
    )
    assert res.converged
    np.testing.assert_allclose(res.params["w"].numpy(), sk.coef_, atol=1e-5)
    assert abs(res.params["b"].item() - sk.intercept_) < 1e-5
    assert res.params["w"].dtype == D and res.params["b"].shape == ()
    # exact zeros where sklearn has them (soft thresholding gives exact zeros)
    assert np.array_equal(res.params["w"].numpy() == 0, sk.coef_ == 0)


def test_lasso_kkt(diabetes):
    # Independent of sklearn: X^T r / n = alpha sign(w) on the support, |.| <= alpha off it.
    X, y = diabetes
    alpha = 0.01
    res = proximal_gradient(
        _least_squares(X, y), _start(10), pf.partition({"w": pf.l1(alpha)}), tol=1e-11, maxiter=20_000
    )
    w, b = res.params["w"], res.params["b"]
    Xt, yt = torch.tensor(X), torch.tensor(y)
    corr = Xt.T @ (yt - Xt @ w - b) / len(y)
    on = w != 0
    assert on.any() and (~on).any()
    torch.testing.assert_close(corr[on], alpha * torch.sign(w[on]), atol=1e-8, rtol=0)
    assert (corr[~on].abs() <= alpha + 1e-8).all()
    assert abs(float((yt - Xt @ w - b).mean())) < 1e-8  # unpenalised intercept: residuals sum to 0


def test_elastic_net_matches_sklearn(diabetes):
    # sklearn: ||.||^2/(2n) + alpha*l1_ratio*||w||_1 + alpha*(1-l1_ratio)/2*||w||^2
    #   = reg*(||w||_1 + gamma/2 ||w||^2) with reg = alpha*l1_ratio, gamma = (1-l1_ratio)/l1_ratio
    X, y = diabetes
    alpha, rho = 0.005, 0.4
    sk = _quiet_fit(ElasticNet(alpha=alpha, l1_ratio=rho, tol=1e-14, max_iter=200_000), X, y)
    prox = pf.partition({"w": pf.elastic_net(alpha * rho, (1 - rho) / rho)})
    res = proximal_gradient(_least_squares(X, y), _start(10), prox, tol=1e-10, maxiter=20_000)
    assert res.converged
    np.testing.assert_allclose(res.params["w"].numpy(), sk.coef_, atol=1e-5)
    assert abs(res.params["b"].item() - sk.intercept_) < 1e-5


def test_multitask_lasso_matches_sklearn(diabetes):
    # Real multi-task data: predict the target, bmi and blood pressure from the other 8 columns.
    # sklearn: ||Y - XW - b||_F^2 / (2n) + alpha * sum_j ||W[j, :]||_2  (W is features x tasks)
    X, y = diabetes
    feats = [0, 1, 4, 5, 6, 7, 8, 9]
    Y = np.stack([y, X[:, 2] / X[:, 2].std(), X[:, 3] / X[:, 3].std()], axis=1)
    Xf = X[:, feats]
    alpha = 0.01
    sk = _quiet_fit(MultiTaskLasso(alpha=alpha, tol=1e-14, max_iter=200_000), Xf, Y)
    prox = pf.partition({"w": pf.l21(alpha, group_dim=0)})
    res = proximal_gradient(_least_squares(Xf, Y), _start(8, 3), prox, tol=1e-10, maxiter=50_000)
    assert res.converged
    np.testing.assert_allclose(res.params["w"].numpy(), sk.coef_.T, atol=1e-5)
    np.testing.assert_allclose(res.params["b"].numpy(), sk.intercept_, atol=1e-5)
    dead = (res.params["w"] == 0).all(dim=1)
    assert dead.any() and not dead.all()  # whole feature rows removed, as group lasso should
    assert np.array_equal(dead.numpy(), (sk.coef_ == 0).all(axis=0))


def test_l1_logistic_regression_matches_sklearn(digits):
    # sklearn (saga, unpenalised intercept): ||w||_1 + C * sum_i log(1 + exp(-s_i (x_i w + b))).
    # Divided by C*n: mean logistic loss + (1/(C n)) ||w||_1 -- the same minimiser.
    X, labels = digits
    yb = (labels >= 5).astype(float)
    n, C = len(X), 0.05
    sk = _quiet_fit(LogisticRegression(penalty="l1", C=C, solver="saga", tol=1e-13, max_iter=100_000), X, yb)
    Xt, s = torch.tensor(X), torch.tensor(2 * yb - 1)

    def fun(p):
        return F.softplus(-s * (Xt @ p["w"] + p["b"])).mean()

    res = proximal_gradient(fun, _start(64), pf.partition({"w": pf.l1(1 / (C * n))}), tol=1e-10, maxiter=20_000)
    assert res.converged
    np.testing.assert_allclose(res.params["w"].numpy(), sk.coef_[0], atol=1e-5)
    assert abs(res.params["b"].item() - sk.intercept_[0]) < 1e-5
    assert 0 < int((res.params["w"] != 0).sum()) < 64


def test_nonnegative_least_squares_matches_scipy(diabetes):
    # A projection as the prox: min ||Xw - y||^2/2 s.t. w >= 0, against scipy's NNLS.
    X, y = diabetes
    Xt, yt = torch.tensor(X), torch.tensor(y)
    res = proximal_gradient(
        lambda w: 0.5 * ((Xt @ w - yt) ** 2).sum(), torch.zeros(10, dtype=D), pf.nonneg(), tol=1e-9, maxiter=20_000
    )
    w_ref, _ = nnls(X, y)
    np.testing.assert_allclose(res.params.numpy(), w_ref, atol=1e-6)
    assert (res.params >= 0).all()


# ------------------------------------------------------------------- algorithmic properties
def _digits_lasso(digits):
    X, labels = digits
    Xt = torch.tensor(X)
    yt = torch.tensor(labels, dtype=D)
    yt = (yt - yt.mean()) / yt.std()
    return (lambda w: 0.5 * ((Xt @ w - yt) ** 2).mean()), Xt


def test_fista_needs_markedly_fewer_iterations_than_ista(digits):
    # digits: pixel features are strongly correlated, cond(X^T X) ~ 1e7 on its range.
    fun, Xt = _digits_lasso(digits)
    L = float(torch.linalg.matrix_norm(Xt, ord=2) ** 2 / Xt.shape[0])
    w0, prox, tol = torch.zeros(64, dtype=D), pf.l1(1e-3), 1e-4
    fista = proximal_gradient(fun, w0, prox, stepsize=1 / L, tol=tol, maxiter=20_000)
    assert fista.converged
    ratio = 6
    ista = proximal_gradient(
        fun, w0, prox, stepsize=1 / L, acceleration=False, tol=tol, maxiter=ratio * fista.iterations
    )
    assert not ista.converged, (fista.iterations, ista.iterations, ista.error)
    assert ista.value > fista.value
    # the same with line search (both sides grow their steps)
    fista_ls = proximal_gradient(fun, w0, prox, tol=tol, maxiter=20_000)
    ista_ls = proximal_gradient(fun, w0, prox, acceleration=False, tol=tol, maxiter=ratio * fista_ls.iterations)
    assert fista_ls.converged and not ista_ls.converged


def test_adaptive_restart_speeds_up_fista(digits):
    # O'Donoghue & Candes (2015): restarting the momentum recovers linear convergence on
    # (locally) strongly convex problems; plain FISTA oscillates.
    fun, Xt = _digits_lasso(digits)
    L = float(torch.linalg.matrix_norm(Xt, ord=2) ** 2 / Xt.shape[0])
    w0, prox = torch.zeros(64, dtype=D), pf.l1(1e-3)
    its = {}
    for restart in (None, "gradient", "function"):
        res = proximal_gradient(fun, w0, prox, stepsize=1 / L, restart=restart, tol=1e-4, maxiter=5000, history=True)
        assert res.converged
        assert any(res.history["restarted"]) == (restart is not None)
        its[restart] = res.iterations
    assert its["gradient"] * 1.5 < its[None] and its["function"] * 1.5 < its[None], its


@pytest.mark.parametrize("acceleration", [False, True])
def test_line_search_respects_sufficient_decrease(digits, acceleration):
    fun, _ = _digits_lasso(digits)
    prox = pf.l1(1e-3)
    res = proximal_gradient(
        fun, torch.zeros(64, dtype=D), prox, acceleration=acceleration, tol=1e-8, maxiter=3000, history=True
    )
    h = res.history
    smooth, bound = np.array(h["smooth"]), np.array(h["bound"])
    assert len(smooth) == res.iterations
    # fun(x_{k+1}) <= fun(y_k) + <g, x_{k+1} - y_k> + ||x_{k+1} - y_k||^2 / (2 s_k)   (up to rounding)
    assert np.all(smooth <= bound + 64 * np.finfo(float).eps * np.abs(bound))
    steps = np.array(h["stepsize"])
    assert np.all(steps > 0)
    assert np.any(np.diff(steps) > 0), "the step is grown again after successes"
    assert np.any(np.diff(steps) < 0), "and shrunk when the test fails"
    # the recorded value is fun + g at the returned iterate
    assert math.isclose(res.value, float(fun(res.params) + prox.value(res.params)), rel_tol=1e-12)
    if not acceleration:
        # ISTA with sufficient decrease is a descent method on F = fun + g (Beck & Teboulle 2009, Lemma 2.3)
        vals = np.array(h["value"])
        assert np.all(np.diff(vals) <= 64 * np.finfo(float).eps * np.abs(vals[1:]))
    else:
        assert any(h["restarted"])  # gradient restart fires on this ill-conditioned problem


def test_line_search_shrinks_a_too_large_first_step(diabetes):
    X, y = diabetes
    fun = _least_squares(X, y)
    res = proximal_gradient(
        fun, _start(10), pf.partition({"w": pf.l1(0.01)}), init_stepsize=1e3, maxiter=5, history=True
    )
    assert res.history["trials"][0] > 1
    assert res.history["smooth"][0] <= res.history["bound"][0] + 1e-12


@pytest.mark.parametrize("restart", [None, "gradient", "function"])
def test_restart_variants_agree(diabetes, restart):
    X, y = diabetes
    prox = pf.partition({"w": pf.l1(0.01)})
    res = proximal_gradient(
        _least_squares(X, y), _start(10), prox, restart=restart, tol=1e-8, maxiter=20_000, history=True
    )
    ref = _quiet_fit(Lasso(alpha=0.01, tol=1e-14, max_iter=200_000), X, y)
    assert res.converged
    np.testing.assert_allclose(res.params["w"].numpy(), ref.coef_, atol=1e-5)
    if restart is None:
        assert not any(res.history["restarted"])


def test_fixed_and_scheduled_steps(digits):
    fun, Xt = _digits_lasso(digits)
    L = float(torch.linalg.matrix_norm(Xt, ord=2) ** 2 / Xt.shape[0])
    w0, prox = torch.zeros(64, dtype=D), pf.l1(1e-2)
    ref = proximal_gradient(fun, w0, prox, tol=1e-9, maxiter=20_000)
    seen = []

    def schedule(k):
        seen.append(k)
        return 1.0 / L if k > 3 else 0.5 / L

    res = proximal_gradient(fun, w0, prox, stepsize=schedule, tol=1e-9, maxiter=20_000, history=True)
    assert res.converged
    torch.testing.assert_close(res.params, ref.params, atol=1e-7, rtol=0)
    assert all(isinstance(k, int) for k in seen) and seen[:3] == [0, 0, 1]
    assert res.history["stepsize"][:3] == pytest.approx([0.5 / L] * 3)
    assert set(res.history["trials"]) == {1}  # no line search with a given step
    fixed = proximal_gradient(fun, w0, prox, stepsize=1 / L, tol=1e-9, maxiter=20_000)
    torch.testing.assert_close(fixed.params, ref.params, atol=1e-7, rtol=0)


def test_pytree_params_and_none_prox():
    # params as a nested pytree; prox=None is plain gradient descent on a strongly convex quadratic
    target = {"a": torch.tensor([1.0, -2.0], dtype=D), "b": [torch.tensor(3.0, dtype=D)]}

    def fun(p):
        return ((p["a"] - target["a"]) ** 2).sum() + ((p["b"][0] - target["b"][0]) ** 2)

    p0 = {"a": torch.zeros(2, dtype=D), "b": [torch.zeros((), dtype=D)]}
    res = proximal_gradient(fun, p0, None, tol=1e-10, maxiter=1000)
    torch.testing.assert_close(res.params, target)
    assert p0["a"].abs().sum() == 0  # the start is not modified
    assert res.value == pytest.approx(0.0, abs=1e-18)


def test_float32_params_keep_dtype(diabetes):
    X, y = diabetes
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    res = proximal_gradient(lambda w: 0.5 * ((Xt @ w - yt) ** 2).mean(), torch.zeros(10), pf.l1(0.01), tol=1e-4)
    assert res.params.dtype == torch.float32 and res.converged
    assert res.state.value.dtype == torch.float32


def test_init_update_loop_equals_run(diabetes):
    X, y = diabetes
    fun = _least_squares(X, y)
    solver = ProximalGradient(fun, pf.partition({"w": pf.l1(0.01)}))
    state = solver.init(_start(10))
    for _ in range(25):
        state = solver.update(state)
    res = proximal_gradient(fun, _start(10), pf.partition({"w": pf.l1(0.01)}), maxiter=25, tol=0.0)
    assert int(state.iteration) == res.iterations == 25
    torch.testing.assert_close(state.params, res.params, atol=0, rtol=0)
    # args are passed through to fun
    Xt, yt = torch.tensor(X), torch.tensor(y)
    solver2 = ProximalGradient(lambda w, A, b: 0.5 * ((A @ w - b) ** 2).mean(), pf.l1(0.01))
    r2 = solver2.run(torch.zeros(10, dtype=D), Xt, yt, tol=1e-9, maxiter=20_000)
    r3 = proximal_gradient(
        lambda w: 0.5 * ((Xt @ w - yt) ** 2).mean(), torch.zeros(10, dtype=D), pf.l1(0.01), tol=1e-9, maxiter=20_000
    )
    torch.testing.assert_close(r2.params, r3.params)


@requires_compile
def test_compiled_update_matches_eager():
    # One iteration (line search included: masked trials under tracing) compiled and driven by a
    # loop. backend="eager" traces with dynamo (the code path taken under torch.compile) without
    # paying for inductor code generation; test_optim compiles a train step with inductor.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 8, generator=g, dtype=D) @ torch.diag(torch.logspace(0, 2, 8, dtype=D))
    b = torch.randn(30, generator=g, dtype=D)

    def fun(w, A, b):
        return 0.5 * ((A @ w - b) ** 2).mean()

    solver = ProximalGradient(fun, pf.l1(0.1), maxls=6, init_stepsize=1.0)
    step = torch.compile(solver.update, fullgraph=True, backend="eager")
    s_eager = s_comp = solver.init(torch.zeros(8, dtype=D), A, b)
    for _ in range(40):
        s_eager = solver.update(s_eager, A, b)
        s_comp = step(s_comp, A, b)
    torch.testing.assert_close(s_comp.params, s_eager.params, atol=1e-10, rtol=0)
    torch.testing.assert_close(s_comp.stepsize, s_eager.stepsize)
    assert int(s_comp.trials) == int(s_eager.trials)


def test_argument_errors():
    fun = lambda w: (w**2).sum()  # noqa: E731
    w = torch.zeros(3)
    with pytest.raises(ValueError, match="stepsize"):
        proximal_gradient(fun, w, pf.l1(), stepsize=-1.0)
    with pytest.raises(ValueError, match="restart"):
        proximal_gradient(fun, w, pf.l1(), restart="sometimes")
    with pytest.raises(ValueError, match="decrease_factor"):
        proximal_gradient(fun, w, pf.l1(), decrease_factor=1.5)
    with pytest.raises(ValueError, match="increase_factor"):
        proximal_gradient(fun, w, pf.l1(), increase_factor=0.5)
    with pytest.raises(ValueError, match="maxiter"):
        proximal_gradient(fun, w, pf.l1(), maxiter=-1)
    with pytest.raises(TypeError, match="prox"):
        proximal_gradient(fun, w, lambda x, t: x)
    with pytest.raises(TypeError, match="floating"):
        proximal_gradient(fun, torch.zeros(3, dtype=torch.int64), pf.l1())
    with pytest.raises(TypeError, match="scalar"):
        proximal_gradient(lambda w: w * 2, w, pf.l1())


def test_unrolled_derivative_matches_implicit_function_theorem(diabetes):
    # The iterates are differentiable: d w*/d reg through the unrolled FISTA iterations equals the
    # implicit derivative on the support S, -(X_S^T X_S / n)^{-1} sign(w_S) (zero off S).
    X, y = diabetes
    Xt, yt = torch.tensor(X), torch.tensor(y)
    reg = torch.tensor(0.01, dtype=D, requires_grad=True)
    res = proximal_gradient(
        lambda w: 0.5 * ((Xt @ w - yt) ** 2).mean(), torch.zeros(10, dtype=D), pf.l1(reg), tol=1e-10, maxiter=20_000
    )
    w = res.params
    assert w.requires_grad and res.converged
    S = w.detach() != 0
    assert S.any() and (~S).any()
    jac = torch.stack([torch.autograd.grad(w[i], reg, retain_graph=True)[0] for i in range(10)])
    XS = Xt[:, S]
    expected = torch.zeros(10, dtype=D)
    expected[S] = -torch.linalg.solve(XS.T @ XS / len(yt), torch.sign(w.detach()[S]))
    torch.testing.assert_close(jac, expected, rtol=1e-4, atol=1e-6)


_OPS = {
    "l1": lambda: pf.l1(0.3),
    "l2": lambda: pf.l2(0.5),
    "l21": lambda: pf.l21(0.4, group_dim=0),
    "elastic_net": lambda: pf.elastic_net(0.2, 0.5),
    "nonneg": lambda: pf.nonneg(),
    "box": lambda: pf.box(-0.2, 0.3),
    "l1_ball": lambda: pf.l1_ball(1.0),
}


@settings(max_examples=20, deadline=None)
@given(
    op_name=st.sampled_from(sorted(_OPS)),
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(6, 12),
    acceleration=st.booleans(),
    restart=st.sampled_from([None, "gradient", "function"]),
)
def test_solution_beats_nearby_points(op_name, seed, rows, acceleration, restart):
    # Definition of a minimiser of the convex F = fun + g: no point near it (feasible or not) has a
    # lower objective, and the returned value is F at the returned point.
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, 4, 3, generator=g, dtype=D)
    b = torch.randn(rows, 3, generator=g, dtype=D)
    op = _OPS[op_name]()

    def fun(p):
        # a small ridge term keeps it strongly convex, so ISTA converges linearly too
        r = torch.einsum("rij,ij->r", A, p["w"]) - b[:, 0]
        return 0.5 * (r**2).mean() + 0.05 * (p["w"] ** 2).sum() + 0.1 * (p["v"] ** 2).sum()

    p0 = {"w": torch.zeros(4, 3, dtype=D), "v": torch.ones(3, dtype=D)}
    prox = pf.partition({"w": op, "v": pf.l1(0.05)})
    res = proximal_gradient(fun, p0, prox, acceleration=acceleration, restart=restart, tol=1e-9, maxiter=5000)
    assert res.converged
    F_star = float(fun(res.params) + prox.value(res.params))
    assert math.isclose(res.value, F_star, rel_tol=1e-12, abs_tol=1e-14)
    for _ in range(20):
        z = {k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=D) for k, v in res.params.items()}
        assert float(fun(z) + prox.value(z)) >= F_star - 1e-9
