"""Rank workers for ``tests/test_distributed.py``: every operator on DTensors against the full tensor.

``worker`` runs on every gloo rank (``tests/distributed.py`` launches it) and reports one record
per check; the test module reads them back and names the failing cases. One launch checks:

* ``kind="case"``: every operator of ``tests/cases.py`` on DTensors placed ``Shard(0)``,
  ``Shard(1)`` (leaves of two dims or more; 1-d leaves ``Shard(0)``), ``Replicate`` and sharded
  unevenly (leading dims of 7, 5 or 3 on 2 ranks; :func:`uneven_params`), against the same
  operator on the full tensors: the values (float64 to 1e-10, float32 to 1e-5), the output
  leaves' placements (those of the input leaves), and ``value()`` (a Replicate DTensor, the
  value of the full tensors; the test compares the ranks' numbers). The calls run under
  :class:`NoHostReads`.
* ``kind="large"``: the water-filling operators on 9000 entries (above the eager 4096).
* ``kind="tensor_hyper"``: 0-d tensor hyperparameters, after the same operator with floats.
* ``kind="tensor_step"``: a 0-d tensor step (its one host read is of the plain step).
* ``kind="selftest"``: :class:`NoHostReads` catches ``float()`` of a DTensor and a boolean mask.
* ``kind="mixed"``: plain and DTensor leaves in one call raise ``TypeError`` naming them.
* ``kind="compile"``: ``torch.compile(fullgraph=True)`` of a prox step equals eager.
"""

from __future__ import annotations

import time
import traceback

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import proxfunc as pf
from tests.cases import CASES, Case, layer, mat, mats, named, neuron_tree, sq_mats
from tests.distributed import report

aten = torch.ops.aten

PLACEMENTS = ("shard0", "shard1", "replicate", "uneven", "mesh2d")

#: Operators whose hyperparameters fix the number of entries at 30 (``layer``'s 6x4 + 6).
NEEDS_30 = {"quadratic", "hyperplane", "halfspace", "affine", "index_l21", "index_linf1"}

#: Cases also run with a 0-d tensor step (after their float-step runs, in one process: the order
#: in which torch 2.13's DTensor sharding cache confused a number with a tensor; see
#: ``proxfunc._dist.replicate_like``): every threshold, norm and calculus rule that takes the step.
TENSOR_STEP = {"l1", "l2", "linf", "l21", "linf1", "max_entry", "spectral", "add_quadratic", "conjugate", "mcp"}

#: Cases also run in float32 (on ``shard1``): the thresholds, norms and spectral operators,
#: whose sums are where float32 rounding would show (each new dtype costs DTensor's sharding
#: propagation a first, uncached pass per op: the whole matrix in float32 took 8 s more).
FLOAT32 = {"l2", "linf", "l21", "linf1", "simplex", "l1_ball", "max_entry", "nuclear_ball", "index_linf1", "psd"}

#: Host reads: an op whose result is a Python number, or whose shape depends on the values.
HOST_READS = {
    aten._local_scalar_dense,
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten.bincount,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.repeat_interleave,
}


class HostRead(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Fails on every host read (:data:`HOST_READS`) of any tensor while it is active.

    A dispatch mode sees each op before DTensor does, with the DTensor arguments themselves:
    ``float(dt)`` is ``aten._local_scalar_dense`` of a DTensor (DTensor reads the local shard's
    number: each rank a different one), ``dt[dt > 0]`` an ``aten.nonzero`` or ``index`` with a
    bool mask. Strict: a read of a plain tensor fails too, so ``dt.to_local().item()`` is caught
    (an operator call with a float step reads nothing at all).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_READS:
            raise HostRead(f"host read during the operator call: {func}")
        if func.overloadpacket is aten.index:
            for i in args[1] if len(args) > 1 else ():
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    raise HostRead(f"boolean-mask indexing during the operator call: {func}")
        return func(*args, **kwargs)


def uneven_params(case: Case, dtype: torch.dtype):
    """Like ``case.make_params`` with leading dims that 2 ranks split unevenly (7, 5 or 3)."""
    fn = case.make_params
    if fn is layer:
        if case.name in NEEDS_30:
            return mat(dtype, (5, 6))
        return (mat(dtype, (7, 4)), mat(dtype, (7,), 1))
    if fn is neuron_tree:
        return {"w1": mat(dtype, (7, 4)), "b1": mat(dtype, (7,), 1), "w2": mat(dtype, (3, 7), 2)}
    if fn is named:
        return {
            "linear1.weight": mat(dtype, (7, 4)),
            "linear1.bias": mat(dtype, (7,), 1),
            "linear2.weight": mat(dtype, (3, 7), 2),
            "linear2.bias": mat(dtype, (3,), 3),
        }
    if fn is mats:
        return (mat(dtype, (3, 4, 3)), mat(dtype, (5, 5), 1))
    if fn is sq_mats:
        return (mat(dtype, (3, 3, 3)), mat(dtype, (5, 5), 1))
    raise AssertionError(f"no uneven parameters for {case.name}")


def placements_for(kind: str, x: torch.Tensor):
    """The placements of one leaf: ``kind`` where the leaf has the dims for it."""
    from torch.distributed.tensor import Replicate, Shard

    if kind == "mesh2d":  # mesh (1, world): rows over a mesh dim of one rank, columns over the rest
        if x.dim() >= 2:
            return [Shard(0), Shard(1)]
        return [Replicate(), Shard(0)] if x.dim() else [Replicate(), Replicate()]
    if kind == "replicate" or x.dim() == 0:
        return [Replicate()]
    if kind == "shard1" and x.dim() >= 2:
        return [Shard(1)]
    return [Shard(0)]


def distribute(params, kind: str, meshes: dict):
    from torch.distributed.tensor import distribute_tensor

    mesh = meshes["2d" if kind == "mesh2d" else "1d"]
    return pytree.tree_map(lambda x: distribute_tensor(x, mesh, placements_for(kind, x)), params)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.double(), b.double()
    same_inf = torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)])
    fa, fb = a[torch.isfinite(a)], b[torch.isfinite(b)]
    return bool(same_inf) and fa.shape == fb.shape and bool(torch.allclose(fa, fb, rtol=tol, atol=tol))


def check_case(case: Case, kind: str, dtype: torch.dtype, meshes: dict, step, strict: bool = True) -> dict:
    """One operator on one placement: the problems found (empty: it passed) and the value."""
    from torch.distributed.tensor import DTensor

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    op = case.make_op()
    params = uneven_params(case, dtype) if kind == "uneven" else case.make_params(dtype)
    dparams = distribute(params, kind, meshes)
    problems: list[str] = []
    ref = op(params, step)
    mode = NoHostReads() if strict else None
    if mode is not None:
        with mode:
            out = op(dparams, step)
    else:
        out = op(dparams, step)
    d_in, _ = pytree.tree_flatten(dparams)
    d_out, spec_out = pytree.tree_flatten(out)
    r_out, spec_ref = pytree.tree_flatten(ref)
    if spec_out != spec_ref:
        problems.append(f"structure {spec_out} != {spec_ref}")
    for i, (x, y, r) in enumerate(zip(d_in, d_out, r_out)):
        if not isinstance(y, DTensor):
            problems.append(f"leaf {i}: a {type(y).__name__}, not a DTensor")
            continue
        if tuple(y.placements) != tuple(x.placements):
            problems.append(f"leaf {i}: placements {y.placements} != input {x.placements}")
        if y.to_local().shape != x.to_local().shape:
            problems.append(f"leaf {i}: local shape {tuple(y.to_local().shape)} != {tuple(x.to_local().shape)}")
        full = y.full_tensor()
        if not _close(full, r, tol):
            err = (full.double() - r.double()).abs().max().item() if full.shape == r.shape else "shape"
            problems.append(f"leaf {i}: differs from the full tensor's result (max abs diff {err})")
    try:
        vr = op.value(params)
    except NotImplementedError:
        vr = None
    value = None
    if vr is not None:
        if mode is not None:
            with NoHostReads():
                v = op.value(dparams)
        else:
            v = op.value(dparams)
        if isinstance(v, DTensor):
            if not all(p.is_replicate() for p in v.placements):
                problems.append(f"value: placements {v.placements}, not Replicate")
            v = v.to_local()
        value = float(v)
        if not _close(v.to(vr.dtype).reshape(()), vr.reshape(()), tol):
            problems.append(f"value {value!r} != full tensor's {float(vr)!r}")
    return {"problems": problems, "value": repr(value)}


def _selftest(mesh) -> list[str]:
    """The mode must catch the host reads it exists for."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x = distribute_tensor(mat(torch.float64, (6, 4)), mesh, [Shard(0)])
    missed = []
    for name, fn in (
        ("float(sum)", lambda: float(x.sum())),
        ("bool(any)", lambda: bool((x > 0).any())),
        ("mask index", lambda: x[x > 0]),
        ("to_local().item()", lambda: x.to_local().sum().item()),
    ):
        try:
            with NoHostReads():
                fn()
        except HostRead:
            continue
        except Exception as e:  # noqa: BLE001 - DTensor refused it another way: still no read
            missed.append(f"{name}: raised {type(e).__name__} before the mode saw a read: {e}")
            continue
        missed.append(f"{name}: not caught")
    return missed


def _mixed(mesh) -> list[str]:
    from torch.distributed.tensor import Shard, distribute_tensor

    W, b = layer(torch.float64)
    dW = distribute_tensor(W, mesh, [Shard(0)])
    problems = []
    for op in (pf.l21(0.5), pf.l1(0.3), pf.l2(0.5)):
        for call in ("prox", "value"):
            try:
                op((dW, b), 0.3) if call == "prox" else op.value((dW, b))
            except TypeError as e:
                msg = str(e)
                if "DTensor" not in msg or "params[1]" not in msg or op._name() not in msg:
                    problems.append(f"{op!r}.{call}: unclear message: {msg}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{op!r}.{call}: {type(e).__name__} instead of TypeError: {e}")
            else:
                problems.append(f"{op!r}.{call}: mixed leaves were accepted")
    return problems


def _compile(mesh, backend: str) -> list[str]:
    from torch.distributed.tensor import Shard, distribute_tensor

    W, b = layer(torch.float64)
    args = (distribute_tensor(W, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)]))

    def step(W, b):
        z = pf.l21(0.3)((W, b), 0.3)
        return pf.linf1(0.4)(z, 0.3)

    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend=backend)(*args)
    problems = []
    for e, c in zip(eager, compiled):
        if tuple(c.placements) != tuple(e.placements):
            problems.append(f"placements {c.placements} != eager {e.placements}")
        if not torch.allclose(c.full_tensor(), e.full_tensor(), rtol=1e-12, atol=1e-12):
            problems.append("compiled values differ from eager")
    return problems


def _error(e: Exception) -> str:
    """The exception and the innermost proxfunc line that raised it (the full trace is long)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/proxfunc/" in f.filename]
    at = f" at {frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return f"{type(e).__name__}: {str(e)[:600]}{at}"


def _large(meshes) -> list[str]:
    """Above the eager path's 4096 entries (where its fixed point reads the host): the water-filling
    operators on 9000-entry DTensors (rows of 72, 125 groups) against the full tensors."""
    big = Case("big", lambda: None, lambda dtype: (mat(dtype, (125, 72), 5), mat(dtype, (125,), 6)))
    problems = []
    for name, make in (
        ("linf", lambda: pf.linf(0.05)),
        ("linf1", lambda: pf.linf1(0.05)),
        ("l1_ball", lambda: pf.l1_ball(30.0)),
        ("simplex", lambda: pf.simplex(3.0)),
        ("max_entry", lambda: pf.max_entry(0.5)),
    ):
        case = Case(name, make, big.make_params)
        for kind in ("shard0", "shard1"):
            problems += [f"{name} {kind}: {p}" for p in check_case(case, kind, torch.float64, meshes, 0.3)["problems"]]
    return problems


def _tensor_hyper(meshes) -> list[str]:
    """0-d tensor hyperparameters, each after the same operator with a float (the order in which
    torch 2.13's DTensor sharding cache confused the two; see ``threshold_unrolled``)."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    pairs = [
        ("l1_ball", pf.l1_ball(1.5), pf.l1_ball(t(1.5))),
        ("simplex", pf.simplex(2.0), pf.simplex(t(2.0))),
        ("l2_ball", pf.l2_ball(1.0), pf.l2_ball(t(1.0))),
        ("linf_ball", pf.linf_ball(0.5), pf.linf_ball(t(0.5))),
        ("l1_sphere", pf.l1_sphere(2.5), pf.l1_sphere(t(2.5))),
        ("l2_sphere", pf.l2_sphere(1.5), pf.l2_sphere(t(1.5))),
        ("box", pf.box(-0.5, 0.7), pf.box(t(-0.5), t(0.7))),
        ("linf", pf.linf(0.4), pf.linf(t(0.4))),
        ("l21", pf.l21(0.5), pf.l21(t(0.5))),
        ("linf1", pf.linf1(0.4), pf.linf1(t(0.4))),
        ("huber", pf.huber(0.8, 0.5), pf.huber(t(0.8), t(0.5))),
        ("nuclear_ball", pf.nuclear_ball(2.0), pf.nuclear_ball(t(2.0))),
    ]
    problems = []
    for name, a, b in pairs:
        for op in (a, b):
            src = next(c for c in CASES if c.name == name)
            case = Case(name, lambda op=op: op, src.make_params)
            for kind in ("shard0", "shard1"):
                found = check_case(case, kind, torch.float64, meshes, 0.3)["problems"]
                problems += [f"{op!r} {kind}: {p}" for p in found]
    return problems


def _run(kind_name: str, fn, **fields) -> None:
    t0 = time.perf_counter()
    try:
        problems = fn()
    except Exception as e:  # noqa: BLE001 - reported, and the other checks still run
        problems = [_error(e)]
    report(kind=kind_name, problems=problems, seconds=round(time.perf_counter() - t0, 3), **fields)


def worker(rank: int, world: int, compile: str | None = "aot_eager", only: list[str] | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    meshes = {"1d": mesh, "2d": init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))}
    _run("selftest", lambda: _selftest(mesh))
    _run("mixed", lambda: _mixed(mesh))
    for case in CASES:
        if only and case.name not in only:
            continue
        for kind in PLACEMENTS:
            dtypes = (torch.float64, torch.float32) if kind == "shard1" and case.name in FLOAT32 else (torch.float64,)
            for dtype in dtypes:
                t0 = time.perf_counter()
                try:
                    res = check_case(case, kind, dtype, meshes, 0.3)
                except Exception as e:  # noqa: BLE001
                    res = {"problems": [_error(e)], "value": None}
                report(
                    kind="case",
                    name=case.name,
                    placement=kind,
                    dtype=str(dtype),
                    seconds=round(time.perf_counter() - t0, 3),
                    **res,
                )
        if case.name in TENSOR_STEP:
            step = torch.tensor(0.3, dtype=torch.float64)
            _run(
                "tensor_step",
                lambda case=case, step=step: check_case(case, "shard0", torch.float64, meshes, step, strict=False)[
                    "problems"
                ],
                name=case.name,
            )
    _run("large", lambda: _large(meshes))
    _run("tensor_hyper", lambda: _tensor_hyper(meshes))
    if compile:
        _run("compile", lambda: _compile(mesh, compile), backend=compile)
