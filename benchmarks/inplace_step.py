"""The in-place l1 step on a model's parameters against the SGD step, many short rounds.

Run from the repository root:  ``python -m benchmarks.inplace_step``  (``--threads 1`` for one
torch thread; ``--rounds N``, ``--calls N``).

The model is the benchmark MLP (24 x ``Linear(256, 256)`` + ReLU: 48 tensors, 1.58M
parameters, gradients set). Rows: ``torch.optim.SGD(foreach=True).step()``;
``compat.apply_(pf.partition({"*": pf.l1(1e-4)}), target, lr)`` on the name->parameter dict
with a Python-float lr and with a 0-d tensor lr, on the module, and on the dict under
``impl="aten"`` (ATen's ``softshrink`` per tensor in place of the C kernel, the same checks);
and the bare ``softshrink(p, out=p)`` loop (ATen's kernel with no checks). Each round times
every row once (the mean of ``--calls`` calls), interleaved; a row's time is its best round.
``/ SGD``: the row over the SGD step; ``aten / row``: the C kernel's gain on the whole step
(the ``impl="aten"`` row over this row: the same checks and dispatch around both).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

if __package__ in (None, ""):  # python benchmarks/inplace_step.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import proxfunc as pf
from proxfunc import compat, dispatch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()) for _ in range(24)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    params = dict(model.named_parameters())
    op = pf.partition({"*": pf.l1(1e-4)})
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    lr_tensor = torch.tensor(0.1)
    softshrink_out = torch.ops.aten.softshrink.out

    def aten():
        with dispatch.implementation("aten"):
            compat.apply_(op, params, 0.1)

    rows = {
        "SGD(foreach).step()": sgd.step,
        "apply_ on the dict, float lr": lambda: compat.apply_(op, params, 0.1),
        "apply_ on the dict, 0-d tensor lr": lambda: compat.apply_(op, params, lr_tensor),
        "apply_ on the module, float lr": lambda: compat.apply_(op, model, 0.1),
        "apply_ on the dict, impl='aten'": aten,
        "bare softshrink(p, out=p) loop": lambda: [softshrink_out(p, 1e-5, out=p) for p in params.values()],
    }
    times = {k: [] for k in rows}
    with torch.no_grad():
        for _ in range(args.rounds):
            for label, fn in rows.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[label].append((time.perf_counter() - t0) / args.calls)
    best = {k: min(v) for k, v in times.items()}
    sgd_t, aten_t = best["SGD(foreach).step()"], best["apply_ on the dict, impl='aten'"]
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, rounds {args.rounds} x {args.calls} calls"
    )
    print(f"{'step':40s} {'us':>8s} {'/ SGD':>7s} {'aten / row':>11s}")
    for label, t in best.items():
        print(f"{label:40s} {t * 1e6:8.1f} {t / sgd_t:7.2f} {aten_t / t:11.2f}")


if __name__ == "__main__":
    main()
