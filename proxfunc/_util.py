"""Small numerical helpers shared by the operator families (no operator lives here)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._base import Hyper, _is_compiling, is_concrete
from ._tree import Tree, acc_dtype, cast, common_acc_dtype, leaf_paths, total
from .dispatch import _eager

__all__ = [
    "clamp",
    "safe_norm",
    "scaled_norm",
    "norm_parts",
    "block_scale",
    "block_scale_",
    "traceable",
    "indicator",
    "feasible_tol",
    "zeros_like_value",
    "leaf_hypers",
    "weighted_sum",
]


def _half_clamp_on_cpu() -> bool:
    try:
        torch.clamp(torch.zeros(1, dtype=torch.float16), -1.0, 1.0)
    except RuntimeError:  # torch 2.0: "clamp_scalar_cpu" not implemented for 'Half'
        return False
    return True


_HALF_CLAMP = _half_clamp_on_cpu()


def clamp(x: torch.Tensor, lo: float | torch.Tensor | None, hi: float | torch.Tensor | None) -> torch.Tensor:
    """``torch.clamp(x, lo, hi)``; where torch has no float16 clamp on the CPU (2.0), the same
    by ``maximum`` / ``minimum`` with the bounds rounded to float16, as clamp rounds them."""
    if _HALF_CLAMP or x.dtype != torch.float16 or x.device.type != "cpu":
        return torch.clamp(x, lo, hi)
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def hyper_tensor(h: Hyper, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A hyperparameter or step as a 0-d tensor of ``dtype`` on ``device``. A Python number
    goes through ``torch.full``, which a trace keeps symbolic (``torch.as_tensor`` of a
    changing float recompiles for every value)."""
    if isinstance(h, torch.Tensor):
        return h.to(dtype=dtype, device=device)
    if not _is_compiling() and isinstance(h, float) and abs(h) > _finfo(dtype)[1]:
        h = h * float("inf")  # beyond the dtype's range: rounds to +-inf, as a tensor's cast does
    return torch.full((), h, dtype=dtype, device=device)


def safe_norm(sq: torch.Tensor) -> torch.Tensor:
    """``sqrt(sq)`` with a zero (not NaN) gradient where ``sq == 0``."""
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def norm_parts(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, nu)`` with ``||xs||_2 = m * nu`` over every entry of ``xs``, without overflow or
    underflow: ``m = max |x|`` (1 where that is 0, the largest finite value where it is inf) and
    ``nu = ||x / m||`` in ``[1, sqrt(n)]`` (0 for all-zero ``xs``), 0-d tensors of the
    accumulation dtype (as LAPACK's ``nrm2`` scales).
    ``x / m / nu`` is then the direction of ``x`` even where ``m * nu`` overflows. ``m`` is a
    constant for autograd (the norm is homogeneous: the gradient is exact), and ``nu`` has a
    zero gradient at 0."""
    dt = common_acc_dtype(xs)
    big = torch.finfo(dt).max  # torch.finfo: dynamo folds it (the _finfo cache would be guarded)
    m = None
    for x in xs:
        if x.numel():
            a = cast(x.detach().abs().amax(), dt)
            m = a if m is None else torch.maximum(m, a)
    if m is None:
        z = torch.zeros((), dtype=dt, device=xs[0].device)
        return z + 1, z
    # 0 -> 1 (then x / m = 0), inf -> max (then x / m = inf where x is)
    safe = torch.where(m > 0, m.clamp(max=big), torch.ones_like(m))
    sq = total([cast(x, dt).div(safe).square().sum() for x in xs if x.numel()], xs)
    return safe, safe_norm(sq)


def scaled_norm(xs: list[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm over every entry of ``xs`` (:func:`norm_parts`' ``m * nu``), a 0-d tensor
    of their accumulation dtype: right where the sum of squares over- or underflows (float32
    entries near ``1e30`` or ``1e-30``); ``inf`` only where the norm itself is beyond the dtype's
    range or an entry is ``inf``."""
    m, nu = norm_parts(xs)
    return m * nu


def block_scale(n: torch.Tensor, t: Hyper) -> torch.Tensor:
    """``max(1 - t / n, 0)``, the block soft-thresholding factor of a group with norm ``n >= 0``.

    Computed as ``(n - t) / n``: near the kink (``n`` close to ``t``) the subtraction is
    exact (Sterbenz), so a small factor is as accurate as the norm itself (exactly rounded
    for one-entry groups), where ``1 - t / n`` adds an absolute error of ``eps``, a large
    relative error for a small factor. Differentiable and traceable; a zero group gets 0
    with finite gradients, and ``n = inf`` gets ``(max - t) / max`` (about 1), not NaN.
    """
    # torch.finfo, not the _finfo cache: dynamo folds it to a constant (a dict would be guarded)
    safe = torch.where(n > 0, n, torch.ones_like(n)).clamp_max(torch.finfo(n.dtype).max)
    return torch.where(n > t, (safe - t) / safe, torch.zeros_like(n))


def block_scale_(n: torch.Tensor, t: Hyper) -> torch.Tensor:
    """:func:`block_scale` in three kernels, reusing ``n`` (eager, nothing to differentiate).

    Equal to :func:`block_scale` where ``n > t`` (the same ``(n - t) / n``) and 0 elsewhere
    (possibly ``-0.0``).
    """
    tiny, big = _finfo(n.dtype)
    m = n.clamp_(tiny, big)
    return torch.sub(m, t).div_(m).clamp_min_(0)


_FINFO: dict[torch.dtype, tuple[float, float]] = {}


def _finfo(dtype: torch.dtype) -> tuple[float, float]:
    """``(tiny, max)`` of a floating dtype (``torch.finfo`` is a few microseconds per call)."""
    got = _FINFO.get(dtype)
    if got is None:
        fi = torch.finfo(dtype)
        got = _FINFO[dtype] = (float(fi.tiny), float(fi.max))
    return got


def traceable(*tensors: object) -> bool:
    """True when some tensor is being traced or transformed (no host reads allowed)."""
    if _is_compiling():
        return True
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    # the common eager case first (plain dense tensors, asked of all at once): dispatch's test
    if _eager(ts):
        return False
    return not all(map(is_concrete, ts))


def indicator(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``ok`` holds, ``inf`` elsewhere (a 0-d tensor of ``dtype``)."""
    zero = torch.zeros((), dtype=dtype, device=ok.device)
    return torch.where(ok, zero, torch.full((), float("inf"), dtype=dtype, device=ok.device))


def feasible_tol(x: torch.Tensor | list[torch.Tensor], n: int) -> float:
    """Relative tolerance for a feasibility test on a reduction over ``n`` entries.

    The accumulation error (``eps`` of the accumulation dtype times ``8 + 2n``), plus, for
    float16/bfloat16 leaves, the final rounding of every entry to the leaf dtype (a relative
    ``eps/2`` each): a projection computed in float32 and stored in half precision is feasible
    only up to that rounding. ``x`` may be a list of leaves (the least precise one counts).
    """
    xs = x if isinstance(x, list) else [x]
    tol = max(float(torch.finfo(acc_dtype(t)).eps) for t in xs) * (8 + 2 * n)
    low = [float(torch.finfo(t.dtype).eps) for t in xs if t.dtype != acc_dtype(t)]
    return tol + (2 * max(low) if low else 0.0)


def zeros_like_value(leaves: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d zero in the value dtype of ``leaves`` (float32 for half types)."""
    if not leaves:
        return torch.zeros(())
    return torch.zeros((), dtype=common_acc_dtype(leaves), device=leaves[0].device)


_REQUIRED: Any = object()


def leaf_hypers(
    value: Any, leaves: list[torch.Tensor], tree: Tree, owner: str, name: str, missing: Any = _REQUIRED
) -> list[Any]:
    """The value of a hyperparameter (see :func:`proxfunc._base.check_hyper_tree`) for each leaf.

    A number or tensor applies to every leaf; a tensor must broadcast to the leaf's shape. A
    pytree gives one value per leaf and must have the structure of ``params``; a ``None`` in it
    stands for ``missing`` where that is given (a box's unbounded side), and is refused
    otherwise. ``ValueError`` naming ``name`` (and the leaf) otherwise.
    """
    if isinstance(value, (dict, list, tuple)):
        vals, spec = pytree.tree_flatten(value)
        if spec != tree.spec and not _same_up_to_sequences(spec, tree.spec):
            raise ValueError(
                f"{owner}: {name} must be a number, a tensor or a pytree with the structure of params; "
                f"{name} has the leaves {_paths(value)}, params {_paths(tree._params)}"
            )
        per = [vals[i] for i in tree.slots]
    else:
        per = [value] * len(leaves)
    for i, (v, x) in enumerate(zip(per, leaves)):
        if v is None:
            if missing is not _REQUIRED:
                per[i] = missing
                continue
            raise ValueError(f"{owner}: {name} has no value for the leaf {tree.paths[i]}")
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            try:
                ok = torch.broadcast_shapes(v.shape, x.shape) == x.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{owner}: {name} of shape {tuple(v.shape)} does not broadcast to the leaf "
                    f"{tree.paths[i]} of shape {tuple(x.shape)}"
                )
    return per


def _same_up_to_sequences(a: pytree.TreeSpec, b: pytree.TreeSpec) -> bool:
    """Two structures equal but for lists against tuples (a param group's list of tensors reaches
    an operator as a tuple: list-structured hyperparameters still match it)."""
    seq = (list, tuple)
    if not (a.type is b.type or (a.type in seq and b.type in seq)):
        return False
    if a.type not in seq and a.context != b.context:
        return False
    ca, cb = _children(a), _children(b)
    return len(ca) == len(cb) and all(x == y or _same_up_to_sequences(x, y) for x, y in zip(ca, cb))


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    children = getattr(spec, "children", None)  # torch >= 2.10; children_specs before
    return list(children()) if callable(children) else list(spec.children_specs)


def _paths(t: Any, most: int = 6) -> str:
    """The leaf paths of a pytree for an error message (the first ``most`` of them)."""
    ps = [p or "<root>" for p in leaf_paths(t)]
    return ", ".join(ps[:most]) + (f", ... ({len(ps)} leaves)" if len(ps) > most else "")


def weighted_sum(h: Hyper, terms: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(h * terms)``: ``h * total`` for a number or 0-d ``h`` (``total`` = ``terms.sum()``
    when given), else the entrywise weighted sum in ``terms``' dtype."""
    if isinstance(h, torch.Tensor) and h.dim() > 0:
        return (h.to(device=terms.device, dtype=terms.dtype) * terms).sum()
    return h * (terms.sum() if total is None else total)
