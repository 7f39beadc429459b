"""proxfunc benchmarks: each implementation of an operator side by side, as ratios to ``clone``.

Run from the repository root:  ``python -m benchmarks``  (or ``python benchmarks/run.py``).
Options: ``--rounds N`` (default 7), ``--no-compile``, ``--size N`` (default 4096),
``--threads N`` (``0`` or ``default``: torch's default thread count, the default),
``--device D`` (default ``cpu``; ``cuda`` for a GPU).

Tables:

* **implementations side by side**: l1, l21, linf1 and linf1 of a layer's ``(weight, bias)``
  on an NxN float32 matrix, on a 24-layer width-256 MLP's parameters (through
  ``pf.partition``) and on the seed's xor-sized call (``Linear(2 -> 100)``), each computed by
  the ``reference``, ``aten`` and ``auto`` implementations (``pf.dispatch.implementation``)
  and by ``torch.compile(fullgraph=True)`` of the operator call, as ratios to a ``clone`` of
  the same tensors; with a Python-float step and a 0-d tensor step.
* **whole-model step**: the in-place prox step against ``torch.optim.SGD(foreach=True).step()``.
* **xor-sized call latency** against the SGD step on the same two tensors.

On a GPU every timing synchronizes before and after a batch of calls and reports the mean
call of the batch (device work is asynchronous; a sync per call would time the sync).

Every entry is timed in the same run, interleaved round by round (each round times every
entry once, each timing the median of a few calls), and the tables report medians over the
rounds: the machine may be shared, so absolute numbers are noisy but ratios measured side by
side are meaningful.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

import proxfunc as pf
from proxfunc.compat import ProxOptimizer, apply_

IMPLS = ("reference", "aten", "auto")


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


def cpu_name():
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads_arg(s):
    """``--threads``: a positive count, or ``0`` / ``default`` for torch's default."""
    if s.lower() == "default":
        return 0
    n = int(s)
    if n < 0:
        raise argparse.ArgumentTypeError("--threads must be >= 0 (0: torch's default)")
    return n


_FRESH = itertools.count(1)


def fresh(fn):
    """``fn`` as a function of its own: dynamo keeps compiled code per code object and its
    automatic-dynamic state per (file, line, name), so each compiled entry gets a code object
    with a name and line of its own: its first call compiles from scratch, as in a new program,
    and no entry's guards or recompiles touch another's."""
    i = next(_FRESH)
    code = fn.__code__.replace(co_name=f"bench_entry_{i}", co_firstlineno=fn.__code__.co_firstlineno + 100000 * i)
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def clone_all(a):
    """A ``clone`` of every tensor of ``a`` (a tensor, a tuple of them or a name->tensor dict)."""
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, dict):
        return {k: v.clone() for k, v in a.items()}
    return [v.clone() for v in a]


def with_impl(impl, op, a, s):
    def call():
        with pf.dispatch.implementation(impl):
            return op(a, s)

    return call


# ---------------------------------------------------------------- implementations side by side
def side_by_side_cases(n, dev):
    """``[(case, [(row, op, operand, clone key, compiled by default)], {clone key: tensors},
    step, reps)]``; ``compiled by default``: the step kinds whose compiled call the default
    run times (``--compile-all``: every one)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g).to(dev)
    xb = torch.randn(n, generator=g).to(dev)
    # Thresholds t = reg * step that leave part of every row alive (a realistic prox step).
    s = 0.1
    both = ("float", "tensor")
    matrix = [
        ("l1", pf.l1(0.5 / s), x, "x", both),
        ("l21", pf.l21(0.5 * n**0.5 / s), x, "x", both),
        ("linf1", pf.linf1(5.0 / s), x, "x", both),
        ("linf1 (W, b)", pf.linf1(5.0 / s), (x, xb), "(x, b)", both),
    ]
    model = mlp(device=dev)
    params = {k: v.detach() for k, v in model.named_parameters()}
    layers = sorted({k.split(".")[0] for k in params}, key=int)
    pairs = [(f"{i}.weight", f"{i}.bias") for i in layers]
    weights = {k: v for k, v in params.items() if k.endswith("weight")}
    # A cold compile of linf1 over the 24 layers takes minutes on a small CPU (inductor's
    # scheduler and C++ build of 24 unrolled thresholds): the default run compiles one of them.
    per_layer_l21 = pf.partition({p: pf.l21(1e-3) for p in pairs})
    per_layer_linf1 = pf.partition({p: pf.linf1(0.005) for p in pairs})
    mrows = [
        ('l1, partition({"*": l1})', pf.partition({"*": pf.l1(1e-3)}), params, "all", both),
        ("l21, (weight, bias) per layer", per_layer_l21, params, "all", both),
        ('linf1, "*.weight"', pf.partition({"*.weight": pf.linf1(0.005)}), weights, "weights", ()),
        ("linf1, (weight, bias) per layer", per_layer_linf1, params, "all", ("tensor",)),
    ]
    w, b = torch.randn(100, 2, generator=g).to(dev), torch.randn(100, generator=g).to(dev)
    xor = [
        ("l1 (W, b)", pf.l1(0.005), (w, b), "(W, b)", both),
        ("l21 (W, b)", pf.l21(0.005), (w, b), "(W, b)", both),
        ("linf1 W", pf.linf1(0.005), w, "W", both),
        ("linf1 (W, b)", pf.linf1(0.005), (w, b), "(W, b)", both),
    ]
    return [
        (f"{n}x{n} float32", matrix, {"x": x, "(x, b)": (x, xb)}, s, 3),
        ("MLP 24 x Linear(256, 256)", mrows, {"all": params, "weights": weights}, s, 20),
        ("xor: Linear(2 -> 100)", xor, {"(W, b)": (w, b), "W": w}, s, 200),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over them)")
    ap.add_argument("--size", type=int, default=4096, help="the matrix is size x size float32")
    ap.add_argument("--threads", type=threads_arg, default=0, help="a count; 0 or 'default': torch's default")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument(
        "--compile-all", action="store_true", help="also compile the MLP linf1 entries left out by default (minutes)"
    )
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if gpu else None
    compile_on = not args.no_compile
    cache_dir = None
    if compile_on and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A cold start: no kernels or graphs cached on disk by an earlier run.
        cache_dir = tempfile.mkdtemp(prefix="proxfunc-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    if compile_on:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False  # each entry compiles its own graph
    try:
        run(args, dev, gpu, sync, compile_on, default_threads)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)


def run(args, dev, gpu, sync, compile_on, default_threads):
    t_start = time.perf_counter()
    tables: dict[str, dict] = {}
    reps: dict[str, int] = {}
    layout = []  # (case, [(row, clone key, step kind)])
    cold: dict[tuple, float] = {}
    warmup_s = None
    if compile_on:  # the first compile of the process pays for importing inductor: not a row's
        t0 = time.perf_counter()
        torch.compile(lambda a: a + 1, fullgraph=True)(torch.ones(4, device=dev))
        warmup_s = time.perf_counter() - t0

    for case, rows, clones, s, r in side_by_side_cases(args.size, dev):
        steps = {"float": s, "tensor": torch.tensor(s, device=dev)}
        entries = {}
        for key, a in clones.items():
            entries[("clone", key)] = lambda a=a: clone_all(a)
        spec = []
        for row, op, a, key, compiled_by_default in rows:
            for kind, st in steps.items():
                for impl in IMPLS:
                    entries[(row, kind, impl)] = with_impl(impl, op, a, st)
                if compile_on and (args.compile_all or kind in compiled_by_default):
                    f = torch.compile(fresh(lambda a, s, op=op: op(a, s)), fullgraph=True)
                    t0 = time.perf_counter()
                    f(a, st)
                    if sync:
                        sync()
                    cold[(case, row, kind)] = time.perf_counter() - t0
                    entries[(row, kind, "compiled")] = lambda f=f, a=a, st=st: f(a, st)
                spec.append((row, key, kind))
        tables[case] = entries
        reps[case] = r
        layout.append((case, spec))

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
    lr = torch.tensor(1e-3, device=dev)
    model_rows = {
        "SGD(foreach).step()": lambda: sgd.step(),
        "clone of every parameter (allocation floor)": lambda: [v.clone() for v in params.values()],
        "prox l1, functional": lambda: prox_model(params, 1e-3),
        "prox l1, in place (apply_ on the module)": lambda: apply_(prox_model, model, 1e-3),
        "prox l1, in place (apply_ on the name->parameter dict)": lambda: apply_(prox_model, named, 1e-3),
        "prox l1, in place (apply_ on the dict), lr a 0-d tensor": lambda: apply_(prox_model, named, lr),
        "prox l1, in place (apply_ on the dict), impl='aten' (ATen, no kernel)": with_impl(
            "aten", lambda p, s: apply_(prox_model, p, s), named, 1e-3
        ),
        "bare softshrink(p, out=p) loop (ATen kernel floor, no checks)": lambda: [
            shrink(v, 1e-7, out=v) for v in params.values()
        ],
        "prox l21 on weights, functional": lambda: prox_l21(params, 1e-3),
        "prox l21 on weights, in place (apply_ on the dict)": lambda: apply_(prox_l21, named, 1e-3),
        "l21 on weights, one call per weight (no batching)": lambda: [
            weight_l21(v, 1e-3) for k, v in params.items() if k.endswith("weight")
        ],
        "ProxOptimizer(SGD).step(): SGD step + in-place l1 prox": lambda: prox_sgd.step(),
    }
    if compile_on:  # the in-place step traced by inductor
        c_apply = torch.compile(fresh(lambda p, s: apply_(prox_model, p, s)), fullgraph=True)
        model_rows["prox l1, in place, compiled (torch.compile of apply_, lr a 0-d tensor)"] = lambda: c_apply(
            named, lr
        )
    tables["model"], reps["model"] = model_rows, 50

    # the seed's xor example: Linear(2 -> 100) weight + bias, 20000 prox calls in the seed
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(100, 2, generator=g).to(dev), torch.randn(100, generator=g).to(dev)
    wp, bp = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    wp.grad, bp.grad = torch.randn_like(wp), torch.randn_like(bp)
    sgd_small = torch.optim.SGD([wp, bp], lr=1e-3, foreach=True)
    xlinf1 = pf.linf1(0.005)
    import proxfunc.compat as pg

    xor_rows = {
        "SGD(foreach).step() on (100x2, 100)": lambda: sgd_small.step(),
        "linf1(0.005)((W, b), 0.1)": lambda: xlinf1((w, b), 0.1),
        "compat.linf1(W, b, reg=0.005, lr=0.1), in place": lambda: pg.linf1(wp, bp, reg=0.005, lr=0.1),
    }
    tables["xor"], reps["xor"] = xor_rows, 200
    if gpu:  # batches long enough that launch queues, not host syncs, set the pace
        reps = {k: max(v, 20) for k, v in reps.items()}

    # Warm up (two calls), and time an entry slower than 0.2 s once per round (the table
    # reports the median over rounds either way): the eager references at 4096x4096.
    n_reps = {}
    for name, tab in tables.items():
        for key, f in tab.items():
            f()
            t = timeit(f, 1, sync)
            n_reps[(name, key)] = reps[name] if gpu else max(1, min(reps[name], int(0.2 / max(t, 1e-9))))
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for name, tab in tables.items():
            for key, f in tab.items():
                times.setdefault((name, key), []).append(timeit(f, n_reps[(name, key)], sync))
    med = {k: statistics.median(v) for k, v in times.items()}

    # ------------------------------------------------------------------------------ report
    where = torch.cuda.get_device_name(dev) if gpu else cpu_name()
    nthreads = torch.get_num_threads()
    tdesc = f"{nthreads} (torch's default)" if nthreads == default_threads and not args.threads else str(nthreads)
    # Markdown that pastes under a README heading: a plain header line, #### sections.
    print(
        f"proxfunc benchmarks: torch {torch.__version__}, {where}, cpus={os.cpu_count()}, "
        f"threads={tdesc}, device={dev.type}, rounds={args.rounds}"
    )
    print("\nRatios to an eager `clone` of the same tensors; `aten/auto`: the kernel's gain;")
    print("`compile s`: the compiled call's first call (cold start).")
    cols = "| operator | step | clone | reference | aten | auto | compiled | aten/auto | compile s |"
    for case, spec in layout:
        print(f"\n#### {case}\n")
        print(cols)
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for row, key, kind in spec:
            c = med[(case, ("clone", key))]
            cell = f"{c * 1e3:.1f} ms" if c >= 1e-3 else f"{c * 1e6:.1f} us"
            out = [row, kind, cell]
            for impl in (*IMPLS, "compiled"):
                k = (case, (row, kind, impl))
                out.append(f"{med[k] / c:.2f}" if k in med else "-")
            out.append(f"{med[(case, (row, kind, 'aten'))] / med[(case, (row, kind, 'auto'))]:.2f}")
            out.append(f"{cold[(case, row, kind)]:.1f}" if (case, row, kind) in cold else "-")
            print("| " + " | ".join(out) + " |")
    print("\n#### whole-model step: 24 x Linear(256, 256), 48 tensors, 1.58M parameters\n")
    print("| step | ms | / SGD step |")
    print("|---|---:|---:|")
    base = med[("model", "SGD(foreach).step()")]
    for name in model_rows:
        m = med[("model", name)]
        print(f"| {name} | {m * 1e3:.3f} | {m / base:.2f} |")
    print("\n#### xor-sized call latency: Linear(2 -> 100), weight 100x2 + bias\n")
    print("| call | us | / SGD step |")
    print("|---|---:|---:|")
    base = med[("xor", "SGD(foreach).step() on (100x2, 100)")]
    for name in xor_rows:
        m = med[("xor", name)]
        print(f"| {name} | {m * 1e6:.1f} | {m / base:.2f} |")
    tail = f"\nTotal {time.perf_counter() - t_start:.0f} s"
    if warmup_s is not None:
        tail += f"; the process's first compile (inductor start-up, in no row) {warmup_s:.1f} s"
    print(tail + ".")


if __name__ == "__main__":
    main()
