"""Distributed tensors (``DTensor``): what an operator call does when its leaves are sharded.

Every operator computes on DTensors with its one reference implementation (pure torch ops,
:mod:`proxfunc.dispatch`); DTensor's sharding propagation inserts the collectives the math
needs (an all-reduce of the partial sums behind a norm, an all-gather before a sort). This
module adds what a call needs around that math:

* :func:`classify`: the leaves are all DTensors on one device mesh, or none is one. A mix
  raises ``TypeError`` naming the plain leaves (a plain tensor next to a sharded one has no
  defined global meaning: it could be one rank's shard or the whole tensor).
* :func:`call` (with :func:`constants_replicated`): inside an operator call, the plain tensors
  the math meets (hyperparameters such as ``hyperplane``'s ``a`` or ``quadratic``'s
  factorisation, and constants built from shapes such as ``arange``) are the same on every
  rank, so DTensor may treat them as replicated (DTensor's ``implicit_replication``, scoped to
  the call and restored after it); and a torch 2.13 sharding-cache bug is worked around.
* :func:`flattenable`: a leaf sharded unevenly (7 rows on 2 ranks), which DTensor cannot
  flatten, replicated first where an operator takes all leaves as one vector.
* :func:`restore` and :func:`replicated`: every output leaf gets the placements of its input
  leaf back (a sort or an SVD computes on replicated values; a Partial result is reduced), and
  ``value()`` is a Replicate 0-d DTensor: the same number on every rank.

Nothing here reads a value on the host; the lowest layer with :mod:`proxfunc._tree`, it imports
only torch (DTensor's module only once the caller has imported it: no DTensor can exist before).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "dtensor_class",
    "is_dtensor",
    "classify",
    "constants_replicated",
    "restore",
    "replicated",
    "flattenable",
    "call",
]

#: The plain tensor types: any other type is a subclass (DTensor, fake, functional tensors).
PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")  # torch >= 2.4, older


def dtensor_class() -> type | None:
    """DTensor's class once its module is imported (``None`` before: then no DTensor exists)."""
    for name in _MODULES:
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def is_dtensor(t: Any) -> bool:
    if type(t) in PLAIN_TENSORS:
        return False
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def classify(leaves: list[torch.Tensor], owner: str, paths: Callable[[], list[str]]) -> bool:
    """``True`` when every leaf is a DTensor (all on one device mesh), ``False`` when none is.

    Plain leaves and other tensor subclasses give ``False`` at the cost of one type check.
    A mix raises ``TypeError``, leaves on several meshes ``ValueError``, each naming the
    leaves (``paths()`` gives their paths, computed only then).
    """
    if set(map(type, leaves)) <= PLAIN_TENSORS:
        return False
    cls = dtensor_class()
    if cls is None:
        return False
    flags = [isinstance(x, cls) for x in leaves]
    if not any(flags):
        return False
    if not all(flags):
        names = paths()
        plain = ", ".join(f"params{p}" for p, f in zip(names, flags) if not f)
        dist = ", ".join(f"params{p}" for p, f in zip(names, flags) if f)
        raise TypeError(
            f"{owner}: params mixes DTensor leaves ({dist}) with plain tensors ({plain}); a plain tensor "
            "has no defined place among sharded ones. Make every leaf a DTensor (distribute_tensor, or "
            "DTensor.from_local(t, mesh, [Replicate()]) for a tensor every rank holds in full), or call "
            "the operator on the plain and the distributed leaves separately"
        )
    meshes = {x.device_mesh for x in leaves}
    if len(meshes) > 1:
        names = paths()
        desc = ", ".join(f"params{p} on {x.device_mesh}" for p, x in zip(names, leaves))
        raise ValueError(f"{owner}: the DTensor leaves of one call must share one device mesh; got {desc}")
    return True


@contextlib.contextmanager
def constants_replicated() -> Iterator[None]:
    """Within the block, DTensor treats plain tensors as replicated (restored on exit, nests)."""
    cls = dtensor_class()
    dispatcher = getattr(cls, "_op_dispatcher", None)
    if dispatcher is None or not hasattr(dispatcher, "_allow_implicit_replication"):
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():
            yield
        return
    before = dispatcher._allow_implicit_replication
    dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        dispatcher._allow_implicit_replication = before


def call(fn: Callable[[], Any]) -> Any:
    """``fn()`` (an operator's pure computation on DTensors) with plain tensors replicated, run
    once more after clearing DTensor's sharding caches if torch 2.13's cache bug tripped it.

    That bug: DTensor caches an op's sharding plan under a key in which a Python number and a
    0-d tensor in the same argument are equal, and the plan keeps the number. When an op
    needs a redistribution (a Partial sum or max beside the scalar, ``s - radius``), the plan
    made for ``s - 1.5`` then fails on a later ``s - tensor(1.5)`` with ``'float' object has
    no attribute 'mesh'``, before any communication of that op, at the same op on every rank
    (each rank runs the same ops, so its caches hold the same plans). ``fn`` writes nothing,
    so the rerun is safe; both the C++ and the Python caches are cleared.
    """
    with constants_replicated():
        try:
            return fn()
        except AttributeError as e:
            if "object has no attribute 'mesh'" not in str(e):
                raise
        _clear_sharding_caches()
        return fn()


def _clear_sharding_caches() -> None:
    clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear is not None:
        clear()
    dispatcher = getattr(dtensor_class(), "_op_dispatcher", None)
    cache = getattr(getattr(dispatcher, "sharding_propagator", None), "propagate_op_sharding", None)
    if hasattr(cache, "cache_clear"):
        cache.cache_clear()


def restore(outs: list[Any], leaves: list[torch.Tensor]) -> list[Any]:
    """Each output leaf with its input leaf's mesh and placements (redistributed where not)."""
    res = []
    for y, x in zip(outs, leaves):
        if is_dtensor(y) and (y.placements != x.placements or y.device_mesh != x.device_mesh):
            y = y.redistribute(x.device_mesh, x.placements)
        res.append(y)
    return res


def replicated(v: Any) -> Any:
    """A DTensor value with every placement Replicate (a Partial sum or max reduced)."""
    if not is_dtensor(v) or all(p.is_replicate() for p in v.placements):
        return v
    return v.redistribute(v.device_mesh, [_replicate()] * v.device_mesh.ndim)


def flattenable(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for a DTensor sharded unevenly (a dim of a size its mesh dim does not divide,
    7 rows on 2 ranks), ``x`` replicated on those mesh dims: DTensor refuses to flatten an
    uneven shard (an all-gather of that one tensor)."""
    if type(x) in PLAIN_TENSORS or not is_dtensor(x):
        return x
    mesh = x.device_mesh
    placements = list(x.placements)
    even = [
        p if not p.is_shard() or x.shape[p.dim] % mesh.size(i) == 0 else _replicate() for i, p in enumerate(placements)
    ]
    return x if even == placements else x.redistribute(mesh, even)


def _replicate() -> Any:
    """DTensor's ``Replicate()`` placement, from the module DTensor was imported from."""
    for name in _MODULES:
        cls = getattr(sys.modules.get(name), "Replicate", None)
        if cls is not None:
            return cls()
    from torch.distributed.tensor import Replicate

    return Replicate()
