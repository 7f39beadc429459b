"""Auto-sizing the seed's xor network, functionally: ``functional_call`` + ``torch.func.grad``.

The seed (ProxGradPyTorch) trains a 2-100-1 ReLU network on xor with SGD and, after every
step, applies ``pg.linf1(model.linear1.weight, model.linear1.bias, reg=0.005)`` (with the
seed's default prox step ``lr=0.1``). Here the same proximal gradient method is written as a
pure function of the parameters: a gradient step, then one proxfunc operator for the whole
model, a partition that binds ``linear1.weight`` and ``linear1.bias`` into one group argument
so that neuron ``i`` is ``(W1[i, :], b1[i])`` (Murray & Chiang 2015).

Only ``reg * step`` enters the prox (``f = reg * g``, step ``t``), so using the gradient step
``lr = 0.01`` as the prox step with ``reg = 0.05`` is exactly the seed's ``reg = 0.005`` at
``lr = 0.1``.

Run: ``PYTHONPATH=. python examples/xor.py [--epochs 5000] [--seed 0]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import proxfunc as pf


class TwoLayerNet(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.linear1 = torch.nn.Linear(d_in, hidden)
        self.linear2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x).clamp(min=0))


def neurons(params: dict[str, torch.Tensor]) -> int:
    """Hidden neurons with a nonzero incoming weight (the seed's count)."""
    return int(params["linear1.weight"].nonzero()[:, 0].unique().numel())


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=None, help="torch.manual_seed (default: unseeded, like the seed)")
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--reg", type=float, default=0.05, help="linf1 weight; reg*lr = 5e-4 as in the seed")
    args = ap.parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    model = TwoLayerNet(2, args.hidden, 1)
    inputs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[0.0], [1.0], [1.0], [0.0]])

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    prox = pf.partition({("linear1.weight", "linear1.bias"): pf.linf1(args.reg)})
    print("H initially (linear1.weight):", neurons(params))

    def loss_fn(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y, reduction="sum")

    grad_fn = grad(loss_fn)

    def train_step(p, x, y, lr):
        g = grad_fn(p, x, y)
        p = {k: p[k] - lr * g[k] for k in p}
        return prox(p, lr)  # the proximal step: pure, returns new tensors

    for _ in range(args.epochs):
        for x, y in zip(inputs, targets):  # one sample at a time, like the seed
            params = train_step(params, x.unsqueeze(0), y.unsqueeze(0), args.lr)

    remaining = neurons(params)
    print("H remaining (linear1.weight):", remaining)
    with torch.no_grad():
        pred = functional_call(model, params, (inputs,))
    print("Final results:")
    for x, y, p in zip(inputs, targets, pred):
        print("Input:", x.tolist(), "Target:", y.item(), "Predicted:", round(p.item(), 4))
    return {"initial": args.hidden, "remaining": remaining, "pred": pred.squeeze(1), "targets": targets.squeeze(1)}


if __name__ == "__main__":
    main()
