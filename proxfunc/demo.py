"""``python -m proxfunc.demo``: auto-size an MLP end to end and shrink it.

Trains an MLP on scikit-learn's bundled handwritten digits (``load_digits``, no download) with
a functional ``torch.func`` loop (``functional_call`` + ``grad``, a proximal step with the
auto-sizing operator of :func:`proxfunc.autosize.neuron_prox` after every batch), then
physically removes the dead neurons with :func:`proxfunc.autosize.shrink` and prints a table:
neurons and parameters per layer before -> after, test accuracy of the regularised, the shrunk
(identical predictions) and an unregularised model of the same architecture, and the inference
latency of the shrunk vs the original model measured in the same run.

``--task xor`` reproduces the seed README's example (a 2-100-1 network on xor, ``linf1`` with
``reg=0.005`` after every SGD step, 5000 epochs). Run ``python -m proxfunc.demo --help``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import proxfunc as pf

from . import autosize

PROXES: dict[str, Callable[..., pf.Prox]] = {"linf1": pf.linf1, "l21": pf.l21}
for _name in ("group_l0", "l0_group", "group_l1"):  # operators other branches may add
    if hasattr(pf, _name):
        PROXES[_name] = getattr(pf, _name)

DEFAULTS = {
    "digits": {
        "prox": "l21",
        "epochs": 40,
        "lr": 0.3,
        "reg": 0.007,
        "hidden": "128,128",
        "batch_size": 32,
        "prox_step": None,
    },
    "xor": {
        "prox": "linf1",
        "epochs": 5000,
        "lr": 0.01,
        "reg": 0.005,
        "hidden": "100",
        "batch_size": 1,
        "prox_step": 0.1,
    },
}


class TwoLayerNet(nn.Module):
    """The seed README's xor network: ``linear2(relu(linear1(x)))`` with ``clamp(min=0)``."""

    def __init__(self, d_in: int, h: int, d_out: int):
        super().__init__()
        self.linear1 = nn.Linear(d_in, h)
        self.linear2 = nn.Linear(h, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x).clamp(min=0))


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with the given layer widths."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m proxfunc.demo",
        description=(
            "Auto-size a neural network with proximal group regularisation (Murray & Chiang 2015), "
            "then physically shrink it and compare accuracy and latency."
        ),
        epilog="Defaults depend on --task and are given as (digits: ..., xor: ...).",
    )
    p.add_argument(
        "--task",
        choices=sorted(DEFAULTS),
        default="digits",
        help="digits (default): an MLP on sklearn's bundled digits; xor: the seed README's example",
    )
    p.add_argument(
        "--prox",
        choices=sorted(PROXES),
        default=None,
        help="group operator over each neuron's weights (digits: l21, xor: linf1 as in the seed)",
    )
    p.add_argument("--reg", type=float, default=None, help="regularisation strength (digits: 0.007, xor: 0.005)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (digits: 40, xor: 5000)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (digits: 0.3, xor: 0.01)")
    p.add_argument(
        "--hidden", type=str, default=None, help="hidden widths, comma separated (digits: 128,128; xor: 100)"
    )
    p.add_argument(
        "--prox-step",
        type=float,
        default=None,
        help="step of the prox (default: the learning rate; xor: 0.1, the seed's pg.linf1 default lr)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (digits: 32, xor: 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed: initialisation, split and batch order (default: 0)"
    )
    p.add_argument("--outgoing", action="store_true", help="also put each neuron's outgoing weights in its group")
    p.add_argument("--compile", action="store_true", help="compile the training step with torch.compile")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of live neurons per layer against epoch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during the run (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.prox_step is None:
        args.prox_step = args.lr
    if args.reg < 0 or args.lr <= 0 or args.prox_step <= 0 or args.epochs < 0 or args.batch_size < 1:
        p.error("need --reg >= 0, --lr > 0, --prox-step > 0, --epochs >= 0 and --batch-size >= 1")
    try:
        args.hidden_sizes = [int(h) for h in str(args.hidden).split(",") if h.strip()]
    except ValueError:
        p.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        p.error("--hidden needs at least one positive width")
    if args.task == "xor" and len(args.hidden_sizes) != 1:
        p.error("--task xor uses the seed's two-layer network: give one hidden width")
    return args


def load_task(args: argparse.Namespace):
    """(model, train (X, y), test (X, y), loss function, accuracy function)."""
    if args.task == "xor":
        x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
        model = TwoLayerNet(2, args.hidden_sizes[0], 1)

        def loss(out, target):
            return F.mse_loss(out, target, reduction="sum")

        def accuracy(out, target):
            return float(((out - target).abs() < 0.5).float().mean())

        return model, (x, y), (x, y), loss, accuracy
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=args.seed, stratify=y)
    model = mlp([x.shape[1], *args.hidden_sizes, 10])

    def accuracy(out, target):
        return float((out.argmax(-1) == target).float().mean())

    return model, (xtr, ytr), (xte, yte), F.cross_entropy, accuracy


def train(
    model: nn.Module,
    prox: pf.Prox,
    data: tuple[torch.Tensor, torch.Tensor],
    loss: Callable,
    args: argparse.Namespace,
    *,
    desc: str,
    track: Callable[[dict], list[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Proximal SGD, functionally: ``p <- prox(p - lr * grad(loss)(p), t)`` every batch (``t = lr`` by default)."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lr, t = args.lr, args.prox_step

    def loss_fn(p, x, y):
        return loss(functional_call(model, p, (x,)), y)

    def step(p, x, y):
        g = grad(loss_fn)(p, x, y)
        return prox({k: p[k] - lr * g[k] for k in p}, t)

    if args.compile:
        step = torch.compile(step)
    x, y = data
    n = x.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    history = [track(params)] if track else []
    bar = _progress(range(args.epochs), desc, args.no_progress)
    for _ in bar:
        order = torch.randperm(n, generator=gen) if args.task != "xor" else torch.arange(n)
        for i in range(0, n, args.batch_size):
            idx = order[i : i + args.batch_size]
            params = step(params, x[idx], y[idx])
        if track:
            history.append(track(params))
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"live neurons {sum(history[-1])}")
    return params, history


def _progress(it, desc: str, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return it
    return tqdm(it, desc=desc, disable=disable, leave=False, unit="epoch", file=sys.stderr)


def with_params(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(params, strict=False)
    return m.eval()


def latency(model: nn.Module, x: torch.Tensor, repeats: int = 300) -> float:
    """Median seconds of one forward pass over ``x`` (inference mode, after a warm-up)."""
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; print the table; return the numbers (used by the tests)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny matmuls: threads only add overhead on a shared machine
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, train_data, test_data, loss, accuracy = load_task(args)
    base_model = copy.deepcopy(model)  # same initialisation for the unregularised run
    factory = PROXES[args.prox]
    prox, skipped = autosize.neuron_prox(
        model, lambda group_dim: factory(args.reg, group_dim=group_dim), outgoing=args.outgoing
    )
    plan = autosize.find_neurons(model)

    def live(params):
        return [r.alive for r in plan.report(model, params).rows]

    t0 = time.perf_counter()
    params, history = train(model, prox, train_data, loss, args, desc=f"{args.prox} reg={args.reg:g}", track=live)
    t_reg = time.perf_counter() - t0
    base_params, _ = train(base_model, pf.identity(), train_data, loss, args, desc="unregularised")
    t_total = time.perf_counter() - t0

    regularised = with_params(model, params)
    unregularised = with_params(base_model, base_params)
    xte, yte = test_data
    small = autosize.shrink(regularised, xte)
    with torch.no_grad():
        out_reg, out_small, out_base = regularised(xte), small(xte), unregularised(xte)
    acc_reg, acc_small, acc_base = accuracy(out_reg, yte), accuracy(out_small, yte), accuracy(out_base, yte)
    if args.task == "xor":
        same = bool(torch.equal((out_reg - yte).abs() < 0.5, (out_small - yte).abs() < 0.5))
    else:
        same = bool(torch.equal(out_reg.argmax(-1), out_small.argmax(-1)))
    max_diff = float((out_reg - out_small).abs().max())
    lat_orig, lat_small = latency(regularised, xte), latency(small, xte)

    rows = [["layer", "neurons before -> after", "params before -> after"]]
    before_layers, after_layers = dict(_layers(regularised)), dict(_layers(small))
    for name, m in before_layers.items():
        s = after_layers[name]
        kind = "output" if name in plan.skipped else type(m).__name__
        rows.append([f"{name} ({kind})", f"{_width(m)} -> {_width(s)}", f"{_nparams(m)} -> {_nparams(s)}"])
    p_before = sum(p.numel() for p in regularised.parameters())
    p_after = sum(p.numel() for p in small.parameters())
    hidden_before = sum(g.neurons for g in plan.groups)
    hidden_after = sum(_width(after_layers[g.producer]) for g in plan.groups)
    rows.append(["total (hidden neurons)", f"{hidden_before} -> {hidden_after}", f"{p_before} -> {p_after}"])

    ntr, nte = train_data[0].shape[0], xte.shape[0]
    arch = "-".join(str(s) for s in [train_data[0].shape[1], *args.hidden_sizes, out_reg.shape[-1]])
    pct = (lambda a: f"{100 * a:.1f}%") if args.task == "digits" else (lambda a: f"{round(a * 4)}/4")
    lines = [
        f"proxfunc auto-sizing demo: task {args.task} ({ntr} train / {nte} test), network {arch}, "
        f"{args.prox}(reg={args.reg:g}) prox every batch (step {args.prox_step:g}), {args.epochs} epochs, "
        f"lr {args.lr:g}, seed {args.seed}",
        "",
        table(rows),
        "",
        "test accuracy",
        f"  regularised (before shrink)        {pct(acc_reg):>6}",
        f"  shrunk                             {pct(acc_small):>6}  "
        f"(same predictions: {'yes' if same else 'NO'}, max |output diff| {max_diff:.1e})",
        f"  unregularised, same architecture   {pct(acc_base):>6}",
        "",
        f"inference latency (batch of {nte}, median of 300 runs): original {lat_orig * 1e6:.1f} us, "
        f"shrunk {lat_small * 1e6:.1f} us ({lat_orig / lat_small:.2f}x)",
        f"training time: {t_reg:.1f} s regularised + {t_total - t_reg:.1f} s unregularised"
        + (" (compiled step)" if args.compile else ""),
    ]
    if args.plot:
        plot(history, [g.name for g in plan.groups], args.plot, title=f"{args.task}: {args.prox}(reg={args.reg:g})")
        lines.append(f"wrote {args.plot}")
    text = "\n".join(lines)
    print(text)
    return {
        "text": text,
        "acc_regularised": acc_reg,
        "acc_shrunk": acc_small,
        "acc_unregularised": acc_base,
        "same_predictions": same,
        "max_diff": max_diff,
        "params_before": p_before,
        "params_after": p_after,
        "hidden_before": hidden_before,
        "hidden_after": hidden_after,
        "history": history,
        "latency": (lat_orig, lat_small),
        "skipped": skipped,
        "model": regularised,
        "shrunk": small,
    }


def plot(history: list[list[int]], names: list[str], path: str, title: str = "") -> None:
    """PNG of live neurons per layer (one line each) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    epochs = list(range(len(history)))
    for j, name in enumerate(names):
        ax.plot(epochs, [h[j] for h in history], marker="." if len(epochs) <= 60 else None, label=f"layer {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("live neurons")
    ax.set_ylim(bottom=0)
    ax.set_title(f"auto-sizing: live neurons per layer ({title})" if title else "auto-sizing: live neurons per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
