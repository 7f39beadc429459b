"""proxfunc's proximal gradient against scikit-learn's coordinate descent, at the same objective.

Run from the repository root:  ``python -m benchmarks.solvers``  (``--threads 1`` for one torch
and BLAS thread; ``--threads 0``, the default, keeps torch's default count; ``--rounds N``;
``--no-compile`` leaves out the compiled whole-solve rows).

Problems (float64):

* **diabetes Lasso**: scikit-learn's diabetes data (442 x 10), target divided by its standard
  deviation, ``alpha = 0.01``, no intercept.
* **dense Lasso 5000 x 500**: ``make_regression(5000, 500, n_informative=50, noise=10)``,
  target standardised, ``alpha = 0.05``.
* **MultiTaskLasso 5000 x 500 x 5 tasks**: ``make_regression(..., n_targets=5)``, ``alpha = 0.05``.

scikit-learn runs at ``tol=1e-8`` (its duality-gap rule) and its objective ``F_sk`` is computed
once. Each proxfunc row then takes the loosest ``tol`` in ``1e-4, 1e-5, ..., 1e-13`` whose
solution reaches ``F <= F_sk + 1e-12 * |F_sk|`` (the same objective or better; ``gap`` is
``F - F_sk``), and that configuration is timed. Rows: FISTA and ISTA with the line search on an
autograd ``fun`` (``0.5 * mean((X w - y)^2)``), FISTA and ISTA with ``value_and_grad`` (the
gradient ``X^T (X w - y) / n`` written out, with a contiguous copy of ``X^T``; FISTA's line
search evaluates ``fun`` at its trial point, so it pays for a gradient it does not use, ISTA
uses it), FISTA with ``quadratic=True`` (one evaluation of ``fun`` and its gradient an
iteration: the gradient at the extrapolated point is combined from the last two), and
``run_compiled`` (the whole loop as one ``while_loop``
graph; its compile time is printed, not counted), and ``pf.least_squares`` (working sets: an
active-set solve for l1, FISTA and Newton on the support for l21, on the Gram matrix of a few
columns of ``X``; ``its`` are its working-set solves, each followed by a pass over ``X``).
Times are the best of ``--rounds`` runs, interleaved with scikit-learn's in the same process;
``ratio`` is the row's time over scikit-learn's time measured in the same run. ``its``: iterations (FISTA against ISTA).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

if __package__ in (None, ""):  # python benchmarks/solvers.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from sklearn.datasets import load_diabetes, make_regression
from sklearn.linear_model import Lasso, MultiTaskLasso

import proxfunc as pf

TOLS = [10.0**-k for k in range(4, 14)]


def problems():
    X, y = load_diabetes(return_X_y=True)
    yield "diabetes Lasso 442x10", X, y / y.std(), 0.01, False
    X, y = make_regression(5000, 500, n_informative=50, noise=10.0, random_state=0)
    yield "dense Lasso 5000x500", X, (y - y.mean()) / y.std(), 0.05, False
    X, Y = make_regression(5000, 500, n_informative=50, n_targets=5, noise=10.0, random_state=1)
    yield "MultiTaskLasso 5000x500x5", X, (Y - Y.mean(0)) / Y.std(0), 0.05, True


def objective(X, Y, W, alpha, multi):
    R = X @ W - Y
    pen = np.sqrt((W * W).sum(axis=1)).sum() if multi else np.abs(W).sum()
    return 0.5 * (R * R).sum() / X.shape[0] + alpha * pen


def sklearn_fit(X, Y, alpha, multi):
    model = (MultiTaskLasso if multi else Lasso)(alpha=alpha, tol=1e-8, fit_intercept=False, max_iter=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, Y)
    return model.coef_.T


def variants(Xt, Yt, alpha, multi, compile_on):
    n = Xt.shape[0]
    prox = pf.l21(alpha) if multi else pf.l1(alpha)
    start = torch.zeros((Xt.shape[1], Yt.shape[1]) if multi else Xt.shape[1], dtype=Xt.dtype)

    def fun(w):
        r = Xt @ w - Yt
        return 0.5 * (r * r).sum() / n

    XT = Xt.T.contiguous()  # X^T @ r with a contiguous X^T: BLAS's fast layout

    def value_and_grad(w):
        r = Xt @ w - Yt
        return 0.5 * (r * r).sum() / n, XT @ r / n

    def run(**kw):
        return lambda tol: pf.proximal_gradient(fun, start, prox, tol=tol, maxiter=100_000, **kw)

    out = {
        "pf FISTA": run(),
        "pf ISTA": run(acceleration=False),
        "pf FISTA value_and_grad": lambda tol: pf.proximal_gradient(
            value_and_grad, start, prox, tol=tol, maxiter=100_000, value_and_grad=True
        ),
        "pf ISTA value_and_grad": lambda tol: pf.proximal_gradient(
            value_and_grad, start, prox, tol=tol, maxiter=100_000, value_and_grad=True, acceleration=False
        ),
        "pf FISTA quadratic": run(quadratic=True),
        "pf FISTA quadratic v_and_g": lambda tol: pf.proximal_gradient(
            value_and_grad, start, prox, tol=tol, maxiter=100_000, value_and_grad=True, quadratic=True
        ),
        "pf least_squares": lambda tol: pf.least_squares(Xt, Yt, prox, tol=tol),
    }
    if compile_on:
        solver = pf.ProximalGradient(lambda w, X_, Y_: 0.5 * ((X_ @ w - Y_) ** 2).sum() / n, prox)
        out["pf FISTA run_compiled"] = lambda tol: solver.run_compiled(start, Xt, Yt, tol=tol, maxiter=100_000)
    return out


def timed(fn, *args):
    """Seconds one call ``fn(*args)`` takes."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=5, help="timed runs of each row (best is kept)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the run_compiled rows")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"{'problem':28s} {'solver':26s} {'tol':>7s} {'its':>6s} {'time ms':>9s} {'ratio':>7s} {'gap':>10s}")
    for name, X, Y, alpha, multi in problems():
        Xt, Yt = torch.tensor(X), torch.tensor(Y)
        W_sk = sklearn_fit(X, Y, alpha, multi)
        F_sk = objective(X, Y, W_sk, alpha, multi)
        rows = variants(Xt, Yt, alpha, multi, not args.no_compile)
        chosen = {}
        for label, solve in rows.items():
            t0 = time.perf_counter()
            solve(1e-4)  # first call: a compile for run_compiled
            first = time.perf_counter() - t0
            for tol in TOLS:
                res = solve(tol)
                F = objective(X, Y, res.params.numpy(), alpha, multi)
                if F <= F_sk + 1e-12 * abs(F_sk) or tol == TOLS[-1]:
                    chosen[label] = (tol, res.iterations, F - F_sk, first)
                    break
        times = {k: [] for k in ["sklearn", *rows]}
        for _ in range(args.rounds):  # interleaved: every row once a round
            times["sklearn"].append(timed(sklearn_fit, X, Y, alpha, multi))
            for label, solve in rows.items():
                tol = chosen[label][0]
                times[label].append(timed(solve, tol))
        t_sk = min(times["sklearn"])
        print(f"{name:28s} {'sklearn (tol 1e-8)':26s} {'':>7s} {'':>6s} {t_sk * 1e3:9.2f} {1.0:7.2f} {0.0:10.1e}")
        for label in rows:
            tol, its, gap, first = chosen[label]
            t = min(times[label])
            note = f"  (first call {first:.1f} s)" if "compiled" in label else ""
            print(f"{'':28s} {label:26s} {tol:7.0e} {its:6d} {t * 1e3:9.2f} {t / t_sk:7.2f} {gap:10.1e}{note}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
