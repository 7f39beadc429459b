"""proxfunc benchmarks: ratios against the memory floor (clone) and straightforward references.

Run from the repository root:  ``python -m benchmarks``  (or ``python benchmarks/run.py``).
Options: ``--rounds N`` (default 7), ``--no-compile``, ``--size N`` (default 4096),
``--threads N`` (default: torch's default), ``--device D`` (default ``cpu``; ``cuda`` for a GPU).

On a GPU every timing synchronizes before and after a batch of calls and reports the mean
call of the batch (device work is asynchronous; a sync per call would time the sync).

Every row is timed in the same run, interleaved round by round (each round times every
entry once, each timing the median of a few calls), and the table reports medians over the
rounds: the machine may be shared, so absolute numbers are noisy but ratios measured side by
side are meaningful.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

import proxfunc as pf
import proxfunc.kernels.threshold  # noqa: F401
from proxfunc.compat import ProxOptimizer, apply_
from proxfunc.kernels import soft

K = sys.modules["proxfunc.kernels.threshold"]


# ------------------------------------------------------------------------------ references
def soft_unfused(x, t):
    """sign(x) * max(|x| - t, 0) as four separate kernels."""
    return torch.sign(x) * torch.relu(torch.abs(x) - t)


def l21_unfused(x, t):
    n = torch.sqrt((x * x).sum(1, keepdim=True))
    return x * torch.where(n > t, 1 - t / n.clamp_min(1e-30), torch.zeros_like(n))


def linf1_sort(x, t):
    tau = K.threshold_sort([(x, 0)], t, absolute=True).clamp_min(0)
    return torch.clamp(x, -tau[:, None], tau[:, None])


def l1_ball_sort(x, r):
    tau = K.threshold_sort([(x.reshape(-1), None)], r, absolute=True).clamp_min(0)
    return x - torch.clamp(x, -tau, tau)


# --------------------------------------------------------------------------------- timing
def timeit(fn, reps, sync=None):
    """Median of ``reps`` single calls; with ``sync`` (a GPU), the mean of one synced batch."""
    if sync is not None:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def mlp(layers=24, width=256, device="cpu"):
    """The benchmark MLP, with small random gradients in place (as after a backward pass)."""
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*mods).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if gpu else None

    n = args.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g).to(dev)
    # Hyperparameters that leave part of every row alive (a realistic prox step).
    t_l1, t_l21, t_linf1, r_ball = 0.5, 0.5 * n**0.5, 5.0, 0.1 * n * n

    l1, l21, linf1, ball = pf.l1(t_l1), pf.l21(t_l21), pf.linf1(t_linf1), pf.l1_ball(r_ball)
    x_inplace = x.clone()
    big: dict[str, object] = {
        "clone": lambda: x.clone(),
        "l1": lambda: l1(x, 1.0),
        "l1 ref (unfused)": lambda: soft_unfused(x, t_l1),
        "l21": lambda: l21(x, 1.0),
        "l21 ref (unfused)": lambda: l21_unfused(x, t_l21),
        # in place on a copy: no output to allocate (l21's cost does not depend on the values)
        "l21 in place (compat.apply_)": lambda: apply_(l21, x_inplace, 1.0),
        "linf1": lambda: linf1(x, 1.0),
        "linf1 ref (sort)": lambda: linf1_sort(x, t_linf1),
        "l1_ball": lambda: ball(x, 1.0),
        "l1_ball ref (sort)": lambda: l1_ball_sort(x, r_ball),
    }
    compiled: dict[str, object] = {}
    if not args.no_compile:

        def comp(f):
            return torch.compile(f, fullgraph=True)

        step = torch.tensor(1.0, device=dev)
        cc = comp(lambda a: a.clone())
        c_l1, c_l21, c_linf1, c_ball = (comp(lambda a, s, op=op: op(a, s)) for op in (l1, l21, linf1, ball))
        c_l1_ref = comp(lambda a: soft_unfused(a, t_l1))
        c_l21_ref = comp(lambda a: l21_unfused(a, t_l21))
        c_linf1_ref = comp(lambda a: linf1_sort(a, t_linf1))
        compiled = {
            "clone": lambda: cc(x),
            "l1": lambda: c_l1(x, step),
            "l1 ref (unfused)": lambda: c_l1_ref(x),
            "l21": lambda: c_l21(x, step),
            "l21 ref (unfused)": lambda: c_l21_ref(x),
            "linf1": lambda: c_linf1(x, step),
            "linf1 ref (sort)": lambda: c_linf1_ref(x),
            "l1_ball": lambda: c_ball(x, step),
        }
        t0 = time.perf_counter()
        for f in compiled.values():
            f()
        if sync:
            sync()
        print(f"# compiled {len(compiled)} functions in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    # whole-model prox step vs SGD(foreach=True).step()
    model = mlp(device=dev)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    prox_model = pf.partition({"*": pf.l1(1e-4)})
    prox_l21 = pf.partition({"*.weight": pf.l21(1e-4)})

    named = dict(model.named_parameters())  # what ProxOptimizer holds
    weight_l21 = pf.l21(1e-4)
    model2 = mlp(device=dev)
    prox_sgd = ProxOptimizer(torch.optim.SGD(model2.parameters(), lr=1e-3, foreach=True), prox_model, params=model2)
    shrink = torch._C._nn.softshrink
    model_rows = {
        "SGD(foreach).step()": lambda: sgd.step(),
        "clone of every parameter (allocation floor)": lambda: [v.clone() for v in params.values()],
        "prox l1, functional": lambda: prox_model(params, 1e-3),
        "prox l1, in place (apply_ on the module)": lambda: apply_(prox_model, model, 1e-3),
        "prox l1, in place (apply_ on the name->parameter dict)": lambda: apply_(prox_model, named, 1e-3),
        "bare softshrink(p, out=p) loop (ATen kernel floor, no checks)": lambda: [
            shrink(v, 1e-7, out=v) for v in params.values()
        ],
        "bare C soft-threshold call on all tensors (kernel floor, no checks)": lambda: soft.shrink_(
            list(params.values()), 1e-7
        ),
        "prox l21 on weights, functional": lambda: prox_l21(params, 1e-3),
        "prox l21 on weights, in place (apply_ on the name->parameter dict)": lambda: apply_(prox_l21, named, 1e-3),
        "l21 on weights, one call per weight (no batching)": lambda: [
            weight_l21(v, 1e-3) for k, v in params.items() if k.endswith("weight")
        ],
        "ProxOptimizer(SGD).step(): SGD step + in-place l1 prox": lambda: prox_sgd.step(),
    }
    if not args.no_compile:  # the in-place step traced by inductor: one kernel over every tensor
        c_apply = torch.compile(lambda p, s: apply_(prox_model, p, s), fullgraph=True)
        lr = torch.tensor(1e-3, device=dev)
        row = "prox l1, in place, compiled (torch.compile of apply_, lr a 0-d tensor)"
        model_rows[row] = lambda: c_apply(named, lr)

    # the seed xor example: Linear(2 -> 100) weight + bias, 20000 calls in the seed
    w, b = torch.randn(100, 2, device=dev), torch.randn(100, device=dev)
    wp, bp = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    wp.grad, bp.grad = torch.randn_like(wp), torch.randn_like(bp)
    sgd_small = torch.optim.SGD([wp, bp], lr=1e-3, foreach=True)
    xl21, xlinf1 = pf.l21(0.005), pf.linf1(0.005)
    import proxfunc.compat as pg

    xor_rows = {
        "SGD(foreach).step() on (100x2, 100)": lambda: sgd_small.step(),
        "l21((W, b), lr)": lambda: xl21((w, b), 0.1),
        "linf1((W, b), lr)": lambda: xlinf1((w, b), 0.1),
        "compat.linf1(W, b) in place": lambda: pg.linf1(wp, bp, reg=0.005, lr=0.1),
    }

    tables = {"eager": big, "compiled": compiled, "model": model_rows, "xor": xor_rows}
    reps = {"eager": 3, "compiled": 3, "model": 20, "xor": 200}
    if gpu:  # batches long enough that launch queues, not host syncs, set the pace
        reps = {"eager": 20, "compiled": 20, "model": 50, "xor": 200}
    times: dict[tuple[str, str], list[float]] = {}
    for f_tab in tables.values():  # warm up
        for f in f_tab.values():
            f()
    for _ in range(args.rounds):
        for tab, rows in tables.items():
            for name, f in rows.items():
                times.setdefault((tab, name), []).append(timeit(f, reps[tab], sync))
    med = {k: statistics.median(v) for k, v in times.items()}

    where = torch.cuda.get_device_name(dev) if gpu else platform.processor() or platform.machine()
    print(
        f"# proxfunc benchmarks  torch {torch.__version__}  {where}  "
        f"threads={torch.get_num_threads()}  cpus={os.cpu_count()}  rounds={args.rounds}"
    )
    print(f"\n## {n}x{n} float32 (time in ms; ratios to clone in the same mode)\n")
    digits = 3 if gpu else 1
    print("| operator | eager ms | eager / clone | compiled ms | compiled / clone |")
    print("|---|---:|---:|---:|---:|")
    for name in big:
        e = med[("eager", name)]
        row = f"| {name} | {e * 1e3:.{digits}f} | {e / med[('eager', 'clone')]:.2f} |"
        if ("compiled", name) in med:
            c = med[("compiled", name)]
            row += f" {c * 1e3:.{digits}f} | {c / med[('compiled', 'clone')]:.2f} |"
        else:
            row += " - | - |"
        print(row)
    print("\n## whole-model prox step, 24-layer width-256 MLP (48 tensors, 1.58M parameters)\n")
    print("| step | ms | / SGD step |")
    print("|---|---:|---:|")
    base = med[("model", "SGD(foreach).step()")]
    for name in model_rows:
        m = med[("model", name)]
        print(f"| {name} | {m * 1e3:.3f} | {m / base:.2f} |")
    print("\n## xor-sized call latency (Linear(2 -> 100): weight 100x2 + bias)\n")
    print("| call | us | / SGD step |")
    print("|---|---:|---:|")
    base = med[("xor", "SGD(foreach).step() on (100x2, 100)")]
    for name in xor_rows:
        m = med[("xor", name)]
        print(f"| {name} | {m * 1e6:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
