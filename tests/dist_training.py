"""Rank-side checks for tests/test_distributed_training.py: proxfunc's in-place layer and
auto-sizing under FSDP2 (``fully_shard``) and ``DistributedDataParallel`` equal one process.

One launch runs every case (a launch costs seconds): :func:`worker` runs each case, catches
its exception, and reports one record per case with :func:`tests.distributed.report`; the
test reads them back and names the cases that failed. Every rank runs the same cases in the
same order, so the collectives inside them match.

Training equality: every rank trains its shard (FSDP2) or replica (DDP) on its slice of each
batch; it also trains, alone, a plain copy (same seed) on the whole batch with the same prox,
and a plain copy without the prox. The distributed model's whole parameters must equal the
first (``err``) and differ from the second (``moved``), so a prox that does nothing fails.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import proxfunc as pf
import proxfunc.compat as pg
from proxfunc import autosize
from proxfunc._base import Prox
from tests.distributed import report

D_IN, H1, H2, D_OUT = 6, 9, 7, 3  # odd widths: FSDP2 shards 9 rows as 5 + 4 (padded)
B, STEPS, LR = 4, 5, 0.1  # rows of each rank's slice of a batch; SGD steps; learning rate


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, H1), nn.ReLU(), nn.Linear(H1, H2), nn.Tanh(), nn.Linear(H2, D_OUT))


class Block(nn.Module):
    """A user-defined module (traced through, not a leaf), sharded as a whole by FSDP2."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(x)))


def blocks(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Block(D_IN, H1, 5), Block(5, H2, D_OUT))


MODELS = {"mlp": mlp, "blocks": blocks}


def data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` batches of ``world * B`` rows, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, world * B, D_IN, generator=g), torch.randn(STEPS, world * B, D_OUT, generator=g)


def fsdp(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` on each Linear or Block of the Sequential, then on the root."""
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, (nn.Linear, Block)):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters by plain names (``module.`` of DDP dropped; DTensors gathered)."""
    out = {}
    for k, v in model.named_parameters():
        v = v.detach()
        out[k.removeprefix("module.")] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# How the prox is applied after each SGD step. ``make(model)`` builds the operator (over
# ``dict(model.named_parameters())``) from the model being trained, wrapped or not.
def l1_op(model: nn.Module) -> Prox:
    return pf.l1(0.05)


def l21_neurons(model: nn.Module, reg: float = 0.8) -> Prox:
    return autosize.neuron_prox(model, pf.l21(reg), outgoing=True).prox


def l21_neurons_strong(model: nn.Module) -> Prox:
    """Kills 5 of 9 and 2 of 7 neurons in 5 steps (the autosize case's report and shrink)."""
    return l21_neurons(model, reg=1.3)


def linf1_neurons(model: nn.Module) -> Prox:
    return autosize.neuron_prox(model, pf.linf1(0.3)).prox


def train(model: nn.Module, rows: slice, way: str, make: Callable[[nn.Module], Prox] | None) -> nn.Module:
    """``STEPS`` SGD steps on ``rows`` of each batch, the prox applied ``way``:
    ``"optimizer"`` (ProxOptimizer over the named parameters), ``"group"`` (a ``"prox"`` entry
    in the param group), ``"apply"`` (SGD, then ``apply_`` on the module), ``"state_dict"``
    (SGD, then ``apply_`` on ``model.state_dict()``), ``"seed"`` (SGD, then the seed's drop-in
    ``compat.l21(weight, bias, reg, lr)`` on each hidden layer), ``"none"`` (plain SGD)."""
    xs, ys = data(dist.get_world_size())
    if way == "group":
        opt = pg.ProxOptimizer(torch.optim.SGD([{"params": model.parameters(), "prox": make(model)}], lr=LR))
    elif way == "optimizer":
        opt = pg.ProxOptimizer(torch.optim.SGD(model.parameters(), lr=LR), make(model), params=model)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=LR)
    op = make(model) if way in ("apply", "state_dict") else None
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        if way == "apply":
            pg.apply_(op, model, LR)
        elif way == "state_dict":
            pg.apply_(op, model.state_dict(), LR)
        elif way == "seed":
            inner = getattr(model, "module", model)
            for lin in (inner[0], inner[2]):
                pg.l21(lin.weight, lin.bias, reg=0.8, lr=LR)
    return model


CASES = [  # (name, model, wrapper, way, operator)
    ("fsdp-l1-optimizer", "mlp", "fsdp", "optimizer", l1_op),
    ("fsdp-l1-group", "mlp", "fsdp", "group", l1_op),
    ("fsdp-l1-state_dict", "mlp", "fsdp", "state_dict", l1_op),
    ("fsdp-l21-neurons-optimizer", "mlp", "fsdp", "optimizer", l21_neurons),
    ("fsdp-l21-neurons-apply", "mlp", "fsdp", "apply", l21_neurons),
    ("fsdp-l21-seed", "mlp", "fsdp", "seed", None),
    ("fsdp-linf1-neurons-optimizer", "mlp", "fsdp", "optimizer", linf1_neurons),
    ("fsdp-blocks-l21-neurons-optimizer", "blocks", "fsdp", "optimizer", l21_neurons),
    ("ddp-l1-optimizer", "mlp", "ddp", "optimizer", l1_op),
    ("ddp-l21-neurons-optimizer", "mlp", "ddp", "optimizer", l21_neurons),
    ("ddp-l21-seed", "mlp", "ddp", "seed", None),
]


def training_case(rank: int, world: int, mesh, model: str, wrapper: str, way: str, make) -> dict:
    rows = slice(rank * B, (rank + 1) * B)
    build = MODELS[model]
    wrapped = fsdp(build(), mesh) if wrapper == "fsdp" else ddp(build())
    same_groups = unprefixed(groups_of(wrapped)) == groups_of(build())
    got = full(train(wrapped, rows, way, make))
    want = full(train(build(), slice(None), way, make))
    plain = full(train(build(), slice(None), "none", None))
    return {"err": max_diff(got, want), "moved": max_diff(want, plain), "same_groups": same_groups}


# ------------------------------------------------------------------ autosize
def groups_of(model: nn.Module) -> list:
    plan = autosize.find_neurons(model)
    rows = [(g.name, g.kind, g.producer, g.consumer, g.neurons, g.incoming, g.outgoing, g.chain) for g in plan.groups]
    return [rows, sorted(plan.skipped)]


def unprefixed(groups: list) -> list:
    rows, skipped = groups
    strip = lambda v: v.removeprefix("module.") if isinstance(v, str) else v  # noqa: E731
    fix = lambda v: tuple(strip(x) for x in v) if isinstance(v, tuple) else strip(v)  # noqa: E731
    return [[tuple(fix(v) for v in r) for r in rows], [strip(s) for s in skipped]]


def autosize_case(rank: int, world: int, mesh, wrapper: str) -> dict:
    """Groups, report and shrink of a trained wrapped model against the plain model's."""
    rows = slice(rank * B, (rank + 1) * B)
    wrapped = fsdp(mlp(), mesh) if wrapper == "fsdp" else ddp(mlp())
    same_groups = unprefixed(groups_of(wrapped)) == groups_of(mlp())
    train(wrapped, rows, "optimizer", l21_neurons_strong)
    plain = train(mlp(), slice(None), "optimizer", l21_neurons_strong)
    rep, want = autosize.report(wrapped), autosize.report(plain)
    same_report = [r.__dict__ | {"name": r.name.removeprefix("module.")} for r in rep.rows] == [
        r.__dict__ for r in want.rows
    ]
    x = torch.randn(2 * world * B, D_IN, generator=torch.Generator().manual_seed(2))
    refused, direct = "", None
    if wrapper == "fsdp":
        try:
            autosize.shrink(wrapped, x)
        except TypeError as e:
            refused = str(e)
    else:  # DDP: its module is shrunk
        direct = autosize.shrink(wrapped, x)
        direct = [direct[0].out_features, direct[2].out_features]
    small = autosize.shrink(autosize.gather(wrapped, mlp(seed=5)), x)
    sizes = [small[0].out_features, small[2].out_features]
    with torch.no_grad():
        y = wrapped(x)
        y_small = small(x)
        if wrapper == "fsdp":  # shard the shrunk model again: same outputs
            y_resharded = fsdp(small, mesh)(x)
        else:
            y_resharded = ddp(small)(x)
    return {
        "same_groups": same_groups,
        "same_report": same_report,
        "report": str(rep),
        "alive": [r.alive for r in rep.rows],
        "sizes": sizes,
        "total": [r.total for r in rep.rows],
        "shrink_err": float((y - y_small).abs().max()),
        "reshard_err": float((y - y_resharded).abs().max()),
        "refused": refused,
        "direct_sizes": direct,
    }


# ------------------------------------------------------------------ all-or-nothing
class _Boom(Prox):
    """Fails on 1-d tensors (the biases), after the weights' new values were computed."""

    _public_name = "boom"

    def _prox(self, leaves, step, tree):
        if any(x.dim() == 1 for x in leaves):
            raise ArithmeticError("boom")
        return list(leaves)


class _Gathered(Prox):
    """Hands back a plain (gathered) tensor for a DTensor: a value with no shard to copy."""

    _public_name = "gathered"

    def _prox(self, leaves, step, tree):
        return [x.full_tensor() if hasattr(x, "full_tensor") else x for x in leaves]


class _Replicated(Prox):
    """Halves every tensor and hands it back replicated: a value in another layout than its
    (sharded) target, which ``apply_`` redistributes before copying."""

    _public_name = "replicated"

    def _prox(self, leaves, step, tree):
        from torch.distributed.tensor import Replicate

        return [x.redistribute(x.device_mesh, [Replicate()]) * 0.5 for x in leaves]


def atomic_case(rank: int, world: int, mesh) -> dict:
    model = fsdp(mlp(), mesh)
    before = full(model)
    pg.apply_(_Replicated(), model, 1.0)
    halved = {k: v * 0.5 for k, v in before.items()}
    out = {"replicated_value": "halved" if max_diff(full(model), halved) == 0 else "wrong"}
    before = full(model)
    for name, op, exc in [
        ("failing_op", pf.partition({"*.weight": pf.l1(0.5), "*.bias": _Boom()}), ArithmeticError),
        ("plain_value", pf.partition({"*.weight": pf.l1(0.5), "*.bias": _Gathered()}), RuntimeError),
    ]:
        try:
            pg.apply_(op, model, 1.0)
            out[name] = "no exception"
        except exc:
            out[name] = "unchanged" if max_diff(full(model), before) == 0 else "written"
    return out


def mixed_case(rank: int, world: int, mesh) -> dict:
    """Plain tensors (l1 writes them itself) next to DTensors (computed, copied): the overlap
    survey looks at the DTensors' local shards (their own ``data_ptr()`` is 0)."""
    model = fsdp(mlp(), mesh)
    shards = dict(model.named_parameters())
    torch.manual_seed(3)
    plain = {"p.a": torch.randn(5, 3), "p.b": torch.randn(4)}
    op = pf.partition({"p.*": pf.l1(0.3), "*.weight": pf.l1(0.3), "*.bias": pf.l1(0.3)})  # none mixes kinds
    want = op({**full(model), **plain}, 0.5)
    target = {**shards, **plain}
    pg.apply_(op, target, 0.5)
    got = {**full(model), **plain}
    w = shards["0.weight"]
    return {
        "err": max_diff(got, want),
        "distinct": pg._survey(list(target.items()), overlap=True),
        "alias": pg._survey([("w", w), ("w.detach", w.detach()), ("p.a", plain["p.a"])], overlap=True),
    }


def worker(rank: int, world: int, only: list[str] | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    jobs: list[tuple[str, Callable[..., dict], tuple]] = []
    for name, model, wrapper, way, make in CASES:
        jobs.append((name, lambda *c: training_case(rank, world, mesh, *c), (model, wrapper, way, make)))
    for wrapper in ("fsdp", "ddp"):
        jobs.append((f"autosize-{wrapper}", lambda w: autosize_case(rank, world, mesh, w), (wrapper,)))
    jobs.append(("atomic-fsdp", lambda: atomic_case(rank, world, mesh), ()))
    jobs.append(("mixed-fsdp", lambda: mixed_case(rank, world, mesh), ()))
    for name, job, args in jobs:
        if only and name not in only:
            continue
        try:
            report(case=name, **job(*args))
        except Exception as e:  # noqa: BLE001 - reported, the test names it
            report(case=name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        dist.barrier()  # a case that failed on one rank only must not desynchronise the next
