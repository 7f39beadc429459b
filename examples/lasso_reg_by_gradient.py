"""Choosing a lasso's regularisation by gradient descent on a validation loss.

The lasso on scikit-learn's diabetes data (442 patients, 10 features, standardised target),
split into 60 training patients (few enough for the penalty to matter) and 382 for
validation. For a regularisation ``reg`` the training lasso

    w*(reg) = argmin_w ||X_train w + b - y_train||^2 / (2 n) + reg ||w||_1

is solved by :func:`proxfunc.argmin`, and the validation loss ``||X_val w*(reg) + b* - y_val||^2
/ (2 m)`` is differentiated with respect to ``reg`` through the solution by implicit
differentiation (no back-propagation through the solver's iterations). Gradient descent on
``log reg`` (Adam) then finds the regularisation that predicts the validation patients best,
which the script checks against a grid of 25 values (Bertrand et al., ICML 2020, do this at
scale). Start below the value that zeroes every feature: there the solution, and so the
validation loss, does not depend on ``reg`` and the gradient is 0.

Run: ``PYTHONPATH=. python examples/lasso_reg_by_gradient.py [--steps 30] [--lr 0.3]``
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_diabetes

import proxfunc as pf


def data(seed: int = 0):
    X, y = load_diabetes(return_X_y=True)
    X, y = torch.tensor(X), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], (y[perm] - y.mean()) / y.std()
    n_train = 60
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def train_loss(p, X, y):
    return 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()


def fit(reg: torch.Tensor, train) -> dict:
    """The training lasso's solution (intercept unpenalised), differentiable in ``reg``."""
    X, y = train
    start = {"w": torch.zeros(X.shape[1], dtype=X.dtype), "b": torch.zeros((), dtype=X.dtype)}
    return pf.argmin(
        train_loss,
        start,
        lambda r: pf.partition({"w": pf.l1(r)}),
        args=(X, y),
        prox_args=(reg,),
        tol=1e-9,
    )


def validation_loss(log_reg: torch.Tensor, train, val) -> torch.Tensor:
    return train_loss(fit(log_reg.exp(), train), *val)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.2, help="Adam's step on log(reg)")
    ap.add_argument("--grid", type=int, default=25, help="grid values to check against (0: none)")
    ap.add_argument("--start", type=float, default=0.01, help="the first reg")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train, val = data(args.seed)

    log_reg = torch.tensor(math.log(args.start), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_reg], lr=args.lr)
    for step in range(args.steps):
        opt.zero_grad()
        loss = validation_loss(log_reg, train, val)
        loss.backward()
        if step % 5 == 0 or step == args.steps - 1:
            alive = int((fit(log_reg.detach().exp(), train)["w"] != 0).sum())
            print(
                f"step {step:3d}  reg {log_reg.exp().item():.5f}  validation loss {loss.item():.6f}  features {alive}"
            )
        opt.step()
    reg = log_reg.detach().exp()
    found = validation_loss(log_reg.detach(), train, val).item()

    print(f"gradient descent: reg {reg.item():.5f}, validation loss {found:.6f}")
    out = {"reg": reg.item(), "loss": found}
    if args.grid:
        grid = torch.logspace(-4, -1, args.grid, dtype=torch.float64)
        with torch.no_grad():
            losses = torch.stack([validation_loss(r.log(), train, val) for r in grid])
        best = int(losses.argmin())
        print(f"grid of {args.grid}:       reg {grid[best].item():.5f}, validation loss {losses[best].item():.6f}")
        out.update(grid_reg=grid[best].item(), grid_loss=losses[best].item())
    out["start_loss"] = validation_loss(torch.tensor(math.log(args.start), dtype=torch.float64), train, val).item()
    return out


if __name__ == "__main__":
    main()
