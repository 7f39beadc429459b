"""pf.least_squares (working sets) against scikit-learn, scipy, numpy and the optimality conditions.

Oracles: scikit-learn's coordinate descent (Lasso, ElasticNet, MultiTaskLasso at tol 1e-12),
the weighted problems through the change of variables ``v_j = c_j w_j`` (a weighted lasso is
the plain lasso of ``X_j / c_j``), numpy's lstsq, scipy's bounded least squares, each
solution's KKT conditions checked independently of the solver, and the closed-form derivative
of the lasso on its support.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear
from sklearn.datasets import load_diabetes, make_regression
from sklearn.linear_model import ElasticNet, Lasso, MultiTaskLasso

import proxfunc as pf

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _sk(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y).coef_.T


def _objective(X, Y, W, pen):
    R = X @ W - Y
    return 0.5 * float((R * R).sum()) / X.shape[0] + pen


def _lasso_kkt(X, y, w, lam, mu=0.0):
    """Largest violation of ``0 in X^T (X w - y) / n + mu w + lam * subgradient |w|``, and the
    scale ``||X^T y||_inf / n`` (independent of the solver's own check)."""
    n = X.shape[0]
    g = X.T @ (X @ w - y) / n + mu * w
    lam = torch.as_tensor(lam, dtype=X.dtype).expand_as(w)
    on = w != 0
    v = torch.where(on, (g + lam * w.sign()).abs(), (g.abs() - lam).clamp_min(0))
    return float(v.max()), float((X.T @ y / n).abs().max())


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return X, y / y.std()


@pytest.fixture(scope="module")
def wide():
    X, y = make_regression(60, 200, n_informative=8, noise=1.0, random_state=3)
    return X, (y - y.mean()) / y.std()


@pytest.fixture(scope="module")
def multitask():
    X, Y = make_regression(300, 80, n_informative=10, n_targets=4, noise=5.0, random_state=4)
    return X, (Y - Y.mean(0)) / Y.std(0)


@pytest.mark.parametrize("alpha", [1e-4, 0.01, 0.3, 10.0])
def test_lasso_matches_sklearn_and_kkt(diabetes, alpha):
    X, y = diabetes
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(alpha))
    w_sk = _sk(Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=10**6), X, y)
    assert res.converged and res.method == "active set"
    np.testing.assert_allclose(res.params.numpy(), w_sk, rtol=1e-7, atol=1e-9)
    viol, scale = _lasso_kkt(torch.tensor(X), torch.tensor(y), res.params, alpha)
    assert viol <= 1e-12 * scale
    F = _objective(X, y, res.params.numpy(), alpha * np.abs(res.params.numpy()).sum())
    assert res.value == pytest.approx(F, rel=1e-14)
    assert F <= _objective(X, y, w_sk, alpha * np.abs(w_sk).sum()) + 1e-15 * abs(F)


def test_lasso_zero_solution_above_lambda_max(diabetes):
    X, y = diabetes
    lam_max = float(np.abs(X.T @ y).max() / X.shape[0])
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(lam_max * 1.001))
    assert res.converged and res.iterations == 0 and not res.params.any()
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(lam_max * 0.99))
    assert res.converged and int((res.params != 0).sum()) == 1


def test_error_is_that_of_the_returned_solution(wide):
    """Stopped by maxiter, the result's error and value are those of the params it returns."""
    X, y = map(torch.tensor, wide)
    for maxiter in (1, 2, 100):
        res = pf.least_squares(X, y, pf.l1(0.005), maxiter=maxiter)
        viol, scale = _lasso_kkt(X, y, res.params, 0.005)
        assert res.error == pytest.approx(viol / scale, rel=1e-9, abs=1e-15)
        assert res.iterations <= maxiter and res.converged == (res.error <= 1e-10)
        assert res.value == pytest.approx(
            float(0.5 * ((X @ res.params - y) ** 2).mean() + 0.005 * res.params.abs().sum())
        )


def test_wide_underdetermined_lasso(wide):
    """n < p: the Gram matrix of a large working set is singular; the solution is still the
    lasso's (unique for data in general position)."""
    X, y = wide
    for alpha in (0.005, 0.05):
        res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(alpha))
        w_sk = _sk(Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=10**6), X, y)
        assert res.converged
        viol, scale = _lasso_kkt(torch.tensor(X), torch.tensor(y), res.params, alpha)
        assert viol <= 1e-11 * scale
        F = _objective(X, y, res.params.numpy(), alpha * np.abs(res.params.numpy()).sum())
        F_sk = _objective(X, y, w_sk, alpha * np.abs(w_sk).sum())
        assert F <= F_sk + 1e-12 * abs(F_sk)
        np.testing.assert_allclose(res.params.numpy(), w_sk, atol=1e-6)


def test_duplicated_and_zero_columns(diabetes):
    """Ties (two equal columns: a singular Gram matrix, many minimisers) and a zero column:
    the objective is sklearn's and no NaN appears."""
    X, y = diabetes
    X2 = np.hstack([X, X[:, :3], np.zeros((X.shape[0], 1))])
    res = pf.least_squares(torch.tensor(X2), torch.tensor(y), pf.l1(0.01))
    w_sk = _sk(Lasso(alpha=0.01, fit_intercept=False, tol=1e-14, max_iter=10**6), X2, y)
    assert res.converged and torch.isfinite(res.params).all() and res.params[-1] == 0
    F = _objective(X2, y, res.params.numpy(), 0.01 * np.abs(res.params.numpy()).sum())
    F_sk = _objective(X2, y, w_sk, 0.01 * np.abs(w_sk).sum())
    assert F <= F_sk + 1e-13 * abs(F_sk)


def test_zero_target_and_init_untouched(diabetes):
    X, _ = diabetes
    Xt = torch.tensor(X)
    init = torch.ones(10, dtype=D)
    res = pf.least_squares(Xt, torch.zeros(X.shape[0], dtype=D), pf.l1(0.1), init=init)
    assert torch.equal(init, torch.ones(10, dtype=D)) and torch.equal(Xt, torch.tensor(X))
    assert res.converged and not res.params.any() and torch.isfinite(torch.tensor(res.error))


def test_weighted_lasso_by_change_of_variables(diabetes):
    """reg_j * |w_j| is the lasso of X_j / c_j in v_j = c_j w_j (c = reg / alpha); an unpenalised
    feature (reg_j = 0) is checked by the KKT conditions."""
    X, y = diabetes
    c = np.linspace(0.5, 2.0, X.shape[1])
    alpha = 0.01
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(torch.tensor(alpha * c)))
    v_sk = _sk(Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=10**6), X / c, y)
    np.testing.assert_allclose(res.params.numpy(), v_sk / c, rtol=1e-7, atol=1e-9)
    reg = torch.full((10,), 0.05, dtype=D)
    reg[2] = 0.0
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(reg))
    viol, scale = _lasso_kkt(torch.tensor(X), torch.tensor(y), res.params, reg)
    assert res.converged and viol <= 1e-12 * scale and res.params[2] != 0


@pytest.mark.parametrize("l1_ratio", [0.2, 0.7, 1.0])
def test_elastic_net_matches_sklearn(diabetes, l1_ratio):
    X, y = diabetes
    alpha = 0.02
    reg, gamma = alpha * l1_ratio, (1 - l1_ratio) / l1_ratio
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.elastic_net(reg, gamma))
    w_sk = _sk(ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14, max_iter=10**6), X, y)
    assert res.converged
    np.testing.assert_allclose(res.params.numpy(), w_sk, rtol=1e-7, atol=1e-9)
    viol, scale = _lasso_kkt(torch.tensor(X), torch.tensor(y), res.params, reg, reg * gamma)
    assert viol <= 1e-12 * scale


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_multitask_lasso_matches_sklearn(multitask, alpha):
    X, Y = multitask
    res = pf.least_squares(torch.tensor(X), torch.tensor(Y), pf.l21(alpha))
    W_sk = _sk(MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=10**6), X, Y)
    assert res.converged and res.method == "group newton" and res.params.shape == (80, 4)
    np.testing.assert_allclose(res.params.numpy(), W_sk, rtol=1e-6, atol=1e-9)
    # optimality of every row: ||G_j + alpha W_j / ||W_j|| || = 0 on the support, ||G_j|| <= alpha off it
    W = res.params
    G = torch.tensor(X).T @ (torch.tensor(X) @ W - torch.tensor(Y)) / X.shape[0]
    norms = W.norm(dim=1)
    on = norms > 0
    assert float((G[on] + alpha * W[on] / norms[on, None]).norm(dim=1).max()) <= 1e-11
    assert float(G[~on].norm(dim=1).max()) <= alpha * (1 + 1e-12)


def test_multitask_group_weights_by_change_of_variables(multitask):
    X, Y = multitask
    c = np.linspace(0.5, 1.5, X.shape[1])
    res = pf.least_squares(torch.tensor(X), torch.tensor(Y), pf.l21(torch.tensor(0.05 * c)))
    V = _sk(MultiTaskLasso(alpha=0.05, fit_intercept=False, tol=1e-14, max_iter=10**6), X / c, Y)
    np.testing.assert_allclose(res.params.numpy(), V / c[:, None], rtol=1e-6, atol=1e-9)


def test_several_targets_with_l1_are_independent_lassos(multitask):
    X, Y = multitask
    res = pf.least_squares(torch.tensor(X), torch.tensor(Y), pf.l1(0.05))
    W_sk = _sk(Lasso(alpha=0.05, fit_intercept=False, tol=1e-14, max_iter=10**6), X, Y)
    assert res.converged and res.method == "active set"
    np.testing.assert_allclose(res.params.numpy(), W_sk, rtol=1e-7, atol=1e-9)


def test_no_penalty_is_least_squares(diabetes):
    X, y = diabetes
    res = pf.least_squares(torch.tensor(X), torch.tensor(y))
    np.testing.assert_allclose(res.params.numpy(), np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-10)
    assert res.method == "lstsq" and res.converged


def test_other_operators_fall_back_to_proximal_gradient(diabetes):
    """Box-constrained least squares: scipy's lsq_linear is the oracle."""
    X, y = diabetes
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.box(-0.3, 0.4), tol=1e-12)
    ref = lsq_linear(X / np.sqrt(X.shape[0]), y / np.sqrt(X.shape[0]), bounds=(-0.3, 0.4), tol=1e-14).x
    assert res.method == "proximal gradient" and res.converged
    np.testing.assert_allclose(res.params.numpy(), ref, atol=1e-8)


def test_intercept_matches_sklearn(diabetes, multitask):
    """fit_intercept=True on data far from centred: scikit-learn's fit_intercept=True."""
    X, y = diabetes
    X, y = X + np.linspace(-2.0, 5.0, X.shape[1]), y + 3.0
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(0.01), fit_intercept=True)
    sk = Lasso(alpha=0.01, tol=1e-14, max_iter=10**6).fit(X, y)
    assert res.converged and res.intercept.shape == ()
    np.testing.assert_allclose(res.params.numpy(), sk.coef_, rtol=1e-7, atol=1e-9)
    assert float(res.intercept) == pytest.approx(sk.intercept_, rel=1e-10)
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.elastic_net(0.01, 1.0), fit_intercept=True)
    sk = ElasticNet(alpha=0.02, l1_ratio=0.5, tol=1e-14, max_iter=10**6).fit(X, y)
    np.testing.assert_allclose(res.params.numpy(), sk.coef_, rtol=1e-7, atol=1e-9)
    assert float(res.intercept) == pytest.approx(sk.intercept_, rel=1e-10)
    X2, Y2 = multitask
    X2, Y2 = X2 + 3.0, Y2 + np.arange(4.0)
    res = pf.least_squares(torch.tensor(X2), torch.tensor(Y2), pf.l21(0.05), fit_intercept=True)
    sk = MultiTaskLasso(alpha=0.05, tol=1e-14, max_iter=10**6).fit(X2, Y2)
    np.testing.assert_allclose(res.params.numpy(), sk.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.intercept.numpy(), sk.intercept_, rtol=1e-9, atol=1e-12)
    # the objective reported is that of X w + b
    r = X2 @ res.params.numpy() + res.intercept.numpy() - Y2
    pen = 0.05 * np.sqrt((res.params.numpy() ** 2).sum(1)).sum()
    assert res.value == pytest.approx(0.5 * (r * r).sum() / X2.shape[0] + pen, rel=1e-12)


def test_intercept_without_penalty_and_in_the_fallback(diabetes):
    X, y = diabetes
    X, y = X + 2.0, y - 1.0
    ones = np.hstack([X, np.ones((X.shape[0], 1))])
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), fit_intercept=True)
    ref = np.linalg.lstsq(ones, y, rcond=None)[0]
    np.testing.assert_allclose(res.params.numpy(), ref[:-1], rtol=1e-9)
    assert float(res.intercept) == pytest.approx(ref[-1], rel=1e-9)
    res = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.box(-0.3, 0.4), fit_intercept=True, tol=1e-12)
    lo, hi = np.r_[np.full(10, -0.3), -np.inf], np.r_[np.full(10, 0.4), np.inf]
    ref = lsq_linear(ones, y, bounds=(lo, hi), tol=1e-14).x
    assert res.method == "proximal gradient"
    np.testing.assert_allclose(res.params.numpy(), ref[:-1], atol=1e-8)
    assert float(res.intercept) == pytest.approx(ref[-1], abs=1e-8)


def test_warm_start_from_a_nearby_reg(diabetes):
    X, y = map(torch.tensor, diabetes)
    cold = pf.least_squares(X, y, pf.l1(0.011))
    warm = pf.least_squares(X, y, pf.l1(0.011), init=pf.least_squares(X, y, pf.l1(0.01)).params)
    torch.testing.assert_close(warm.params, cold.params, rtol=1e-12, atol=1e-14)
    assert warm.converged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(diabetes, dtype):
    X, y = diabetes
    ref = pf.least_squares(torch.tensor(X), torch.tensor(y), pf.l1(0.01)).params
    res = pf.least_squares(torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype), pf.l1(0.01))
    assert res.params.dtype == dtype and res.converged
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res.params.to(D), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_derivative_through_argmin_started_at_the_solution(diabetes):
    """d w / d reg on the support is -(X_S^T X_S / n)^{-1} sign(w_S) (the lasso's closed form);
    pf.argmin started at least_squares' solution gives it."""
    X, y = map(torch.tensor, diabetes)
    w = pf.least_squares(X, y, pf.l1(0.01)).params
    fun = lambda v, X_, y_: 0.5 * ((X_ @ v - y_) ** 2).mean()  # noqa: E731
    solve = lambda r: pf.argmin(fun, w, pf.l1, args=(X, y), prox_args=(r,))  # noqa: E731
    jac = torch.func.jacrev(solve)(torch.tensor(0.01, dtype=D))
    S = w != 0
    XS = X[:, S]
    expected = -torch.linalg.solve(XS.T @ XS / X.shape[0], w[S].sign())
    torch.testing.assert_close(jac[S], expected, rtol=1e-8, atol=1e-10)
    assert not jac[~S].any()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(5, 40),
    p=st.integers(1, 30),
    frac=st.sampled_from([0.001, 0.05, 0.3, 0.9]),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_kkt_at_every_scale(n, p, frac, scale, seed):
    """Random shapes (wide and tall), data scaled by 1e-6..1e6 with reg scaled alike: the
    solution satisfies its KKT conditions to the problem's scale, and scaling y and reg by s
    scales the solution by s."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=D)
    y = torch.randn(n, generator=g, dtype=D)
    lam_max = float((X.T @ y).abs().max()) / n
    reg = frac * lam_max
    base = pf.least_squares(X, y, pf.l1(reg))
    res = pf.least_squares(X, scale * y, pf.l1(scale * reg))
    assert base.converged and res.converged
    viol, s = _lasso_kkt(X, scale * y, res.params, scale * reg)
    assert viol <= 1e-10 * s
    atol = 1e-9 * scale * float(base.params.abs().max() + 1)
    torch.testing.assert_close(res.params, scale * base.params, rtol=1e-8, atol=atol)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda X, y: pf.least_squares(X[0], y, pf.l1(0.1)), ValueError, "X must be 2-d"),
        (lambda X, y: pf.least_squares(X, y[:-1], pf.l1(0.1)), ValueError, "y must have"),
        (lambda X, y: pf.least_squares(X, y.float(), pf.l1(0.1)), TypeError, "y must have X's dtype"),
        (lambda X, y: pf.least_squares(X.long(), y, pf.l1(0.1)), TypeError, "X must be a floating tensor"),
        (lambda X, y: pf.least_squares(X, y, pf.l1(0.1), tol=0.0), ValueError, "tol"),
        (lambda X, y: pf.least_squares(X, y, pf.l1(0.1), maxiter=0), ValueError, "maxiter"),
        (lambda X, y: pf.least_squares(X, y, "l1"), TypeError, "prox"),
        (lambda X, y: pf.least_squares(X, y, pf.l1(0.1), fit_intercept=1), TypeError, "fit_intercept"),
        (lambda X, y: pf.least_squares(X, y, pf.l1(0.1), init=torch.zeros(3, dtype=D)), ValueError, "init"),
        (lambda X, y: pf.least_squares(X, y, pf.l1(torch.ones(3, dtype=D))), ValueError, "reg"),
    ],
)
def test_bad_input(diabetes, call, err, match):
    X, y = map(torch.tensor, diabetes)
    X0, y0 = X.clone(), y.clone()
    with pytest.raises(err, match=match):
        call(X, y)
    assert torch.equal(X, X0) and torch.equal(y, y0)


def test_transformed_inputs_are_refused(diabetes):
    X, y = map(torch.tensor, diabetes)
    with pytest.raises(TypeError, match="plain tensors"):
        torch.func.vmap(lambda yy: pf.least_squares(X, yy, pf.l1(0.1)).params)(y[None].expand(2, -1))
