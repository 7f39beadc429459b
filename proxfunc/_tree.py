"""Pytree helpers over ``torch.utils._pytree``: flattening with validation, and groups.

Group semantics (the contract of every group operator): group ``i`` is the slice ``i``
along ``group_dim`` of **every** leaf. ``group_dim`` is an int (the same dim of every
leaf, negative values counting from the end) or a pytree of ints with the structure of
``params``. All leaves must have the same size along their group dims; otherwise a
``ValueError`` names each leaf's size and the two usual intents (each tensor's own groups:
``pf.partition({'*': op})``; neurons across layers: ``pf.autosize.neuron_prox``).

``None`` leaves are allowed anywhere in ``params`` (a layer without bias) and come back
as ``None``; they take part in no group and in no norm.

Integer and bool tensors are buffers, not parameters (a BatchNorm's ``num_batches_tracked`` in
a ``state_dict``, an index or a mask): as leaves of ``params`` they come back unchanged (the
same tensor objects) and, like ``None``, take part in no group and no norm. ``params`` that is
itself such a tensor, or holds such tensors and no floating one, is refused (``TypeError``:
there is nothing to take the prox of), as are complex tensors and non-tensor leaves anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "Tree",
    "flatten",
    "is_buffer",
    "parameter_keys",
    "group_dims",
    "group_count",
    "reduce_except",
    "along",
    "acc_dtype",
    "common_dtype",
    "common_acc_dtype",
    "maximum",
    "total",
]

#: Leaf dtypes computed in float32 and rounded once at the end.
LOW_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------- torch.utils._pytree
# torch 2.0/2.1 have tree_flatten / tree_unflatten and a one-tree tree_map only; the rest
# (tree_leaves, tree_structure, several trees in tree_map, paths) is built on those there.
def tree_leaves(tree: Any) -> list[Any]:
    return pytree.tree_flatten(tree)[0]


def tree_structure(tree: Any) -> pytree.TreeSpec:
    return pytree.tree_flatten(tree)[1]


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` over the leaves of ``tree`` and of each tree in ``rest`` (same structure)."""
    if not rest:
        return pytree.tree_map(fn, tree)
    leaves, spec = pytree.tree_flatten(tree)
    others = []
    for r in rest:
        r_leaves, r_spec = pytree.tree_flatten(r)
        if r_spec != spec:
            raise ValueError(f"tree_map: trees of different structures: {spec} and {r_spec}")
        others.append(r_leaves)
    return pytree.tree_unflatten([fn(*xs) for xs in zip(leaves, *others)], spec)


def leaf_paths(tree: Any) -> list[str]:
    """The path of every leaf as ``keystr`` writes it (``['w']``, ``[0]``, ``.field``), in
    ``tree_flatten``'s order."""
    if hasattr(pytree, "tree_flatten_with_path"):
        return [pytree.keystr(k) for k, _ in pytree.tree_flatten_with_path(tree)[0]]
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        kind = pytree._get_node_type(node)
        if kind not in pytree.SUPPORTED_NODES:
            out.append(prefix)
            return
        children, context = pytree.SUPPORTED_NODES[kind].flatten_fn(node)
        if isinstance(node, dict):
            keys = [f"[{k!r}]" for k in context]
        elif isinstance(node, tuple) and hasattr(node, "_fields"):
            keys = [f".{f}" for f in node._fields]
        else:
            keys = [f"[{i}]" for i in range(len(children))]
        for k, child in zip(keys, children):
            walk(child, prefix + k)

    walk(tree, "")
    return out


class Tree:
    """Structure of a flattened ``params`` tree: spec, positions of ``None`` leaves, paths."""

    __slots__ = ("_spec", "slots", "n_all", "_params", "_seq", "_kept")

    def __init__(
        self,
        spec: pytree.TreeSpec | None,
        slots: list[int],
        n_all: int,
        params: Any,
        seq: type | None = None,
        kept: list[tuple[int, torch.Tensor]] | None = None,
    ):
        self._spec = spec  # spec of the full tree (None leaves included); computed on demand
        self.slots = slots  # positions of the floating tensor leaves among all leaves
        self.n_all = n_all
        self._params = params
        self._seq = seq  # list or tuple: a flat sequence of tensors, rebuilt without pytree
        self._kept = kept  # (position, tensor) of the buffers (integer/bool tensors) passed through

    @property
    def spec(self) -> pytree.TreeSpec:
        if self._spec is None:
            self._spec = tree_structure(self._params)
        return self._spec

    def unflatten(self, leaves: list[torch.Tensor]) -> Any:
        if self._seq is not None:
            return self._seq(leaves)
        if len(self.slots) == self.n_all:
            return pytree.tree_unflatten(list(leaves), self.spec)
        full: list[Any] = [None] * self.n_all
        for i, leaf in zip(self.slots, leaves):
            full[i] = leaf
        for i, leaf in self._kept or ():
            full[i] = leaf
        return pytree.tree_unflatten(full, self.spec)

    @property
    def paths(self) -> list[str]:
        """Readable paths of the tensor leaves, e.g. ``['linear1.weight']`` or ``[0]``."""
        names = [k or "<root>" for k in leaf_paths(self._params)]
        return [names[i] for i in self.slots]


def is_buffer(x: Any) -> bool:
    """True for an integer or bool tensor: a buffer (a counter, an index, a mask), never a
    parameter; operators pass such leaves through unchanged."""
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex())


_IS_FLOATING = torch.Tensor.is_floating_point


def parameter_keys(params: Any, owner: str) -> list[Any]:
    """The keys of the mapping ``params`` whose values are not buffers (:func:`is_buffer`);
    ``TypeError`` when it holds buffers and nothing else (as :func:`flatten`)."""
    try:  # the common case, every value a floating tensor, asked with C-level map
        if all(map(_IS_FLOATING, params.values())):
            return list(params)
    except TypeError:  # a value that is not a tensor: the general rule below
        pass
    keys = [k for k, v in params.items() if not is_buffer(v)]
    if not keys and params:
        k = next(iter(params))
        raise _no_parameter(owner, f"[{k!r}]", params[k])
    return keys


def flatten(params: Any, owner: str) -> tuple[list[torch.Tensor], Tree]:
    """Flatten ``params`` into its floating tensor leaves, checking every other leaf.

    ``None`` leaves and buffers (integer/bool tensors, :func:`is_buffer`) are passed through
    (the tree rebuilds them in place); a non-tensor or complex leaf, ``params`` itself a
    non-floating tensor, or buffers with no floating tensor beside them raise ``TypeError``
    naming a path.
    """
    if isinstance(params, torch.Tensor):  # the common fast path
        _check_leaf(params, owner, "params")
        return [params], Tree(_LEAF_SPEC, [0], 1, params)
    kind = type(params)
    if kind is list or kind is tuple:  # a flat sequence of tensors (a layer's (weight, bias)): no pytree walk
        if all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in params):
            n = len(params)
            return list(params), Tree(None, list(range(n)), n, params, seq=kind)
    all_leaves, spec = pytree.tree_flatten(params)
    leaves: list[torch.Tensor] = []
    slots: list[int] = []
    kept: list[tuple[int, torch.Tensor]] = []
    for i, leaf in enumerate(all_leaves):
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            if is_buffer(leaf):
                kept.append((i, leaf))
                continue
            path = _path_of(params, i)
            _check_leaf(leaf, owner, f"params{path}")
        leaves.append(leaf)
        slots.append(i)
    if kept and not leaves:
        i, leaf = kept[0]
        raise _no_parameter(owner, _path_of(params, i), leaf)
    return leaves, Tree(spec, slots, len(all_leaves), params, kept=kept)


def _no_parameter(owner: str, path: str, leaf: torch.Tensor) -> TypeError:
    return TypeError(
        f"{owner}: params holds no floating tensor, only integer/bool tensors (params{path} has dtype "
        f"{leaf.dtype}); such buffers pass through unchanged beside parameters, but there must be a "
        "parameter to take the prox of"
    )


_LEAF_SPEC = pytree.tree_flatten(torch.empty(0))[1]


def _path_of(params: Any, i: int) -> str:
    return leaf_paths(params)[i]


def _check_leaf(leaf: Any, owner: str, where: str) -> None:
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{owner}: {where} must be a tensor (or None), got {type(leaf).__name__}")
    if not leaf.is_floating_point():
        raise TypeError(f"{owner}: {where} must be a floating tensor, got dtype {leaf.dtype}")


def group_dims(group_dim: Any, leaves: list[torch.Tensor], tree: Tree, owner: str) -> list[int]:
    """Normalise ``group_dim`` (int or pytree of ints matching params) to one dim per leaf."""
    if isinstance(group_dim, int) and not isinstance(group_dim, bool):
        dims = [group_dim] * len(leaves)
    else:
        gd_all, gd_spec = pytree.tree_flatten(group_dim)
        if gd_spec != tree.spec:
            raise ValueError(
                f"{owner}: group_dim must be an int or a pytree of ints with the structure of "
                f"params; got structure {gd_spec} for params of structure {tree.spec}"
            )
        dims = [gd_all[i] for i in tree.slots]
        for d, path in zip(dims, tree.paths):
            if isinstance(d, bool) or not isinstance(d, int):
                raise TypeError(f"{owner}: group_dim{path} must be an int, got {type(d).__name__}")
    out = []
    for d, leaf, k in zip(dims, leaves, range(len(leaves))):
        nd = leaf.dim()
        if not -nd <= d < nd:
            path = tree.paths[k]
            raise ValueError(
                f"{owner}: group_dim {d} is out of range for leaf params{path} with shape {tuple(leaf.shape)}"
            )
        out.append(d % nd)
    return out


def group_count(leaves: list[torch.Tensor], dims: list[int], tree: Tree, owner: str) -> int:
    """The number of groups; every leaf must have that size along its group dim."""
    sizes = [leaf.shape[d] for leaf, d in zip(leaves, dims)]
    if not sizes:
        return 0
    if any(s != sizes[0] for s in sizes):
        desc = ", ".join(f"params{p} has {s} along dim {d}" for p, s, d in zip(tree.paths, sizes, dims))
        raise ValueError(
            f"{owner}: leaves have different numbers of groups: {desc}. Group i is slice i along group_dim "
            "of every leaf, one group across all of them. For the groups of each tensor on its own (the rows "
            "of every weight, each entry of a bias) use pf.partition({'*': op}); for the neurons of each "
            "hidden layer (row i of its weight with entry i of its bias; with outgoing=True also column i of "
            "the next weight) use pf.autosize.neuron_prox(model, op); or give group_dim as a pytree of ints"
        )
    return int(sizes[0])


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` already has that dtype (``to`` returns
    ``t`` itself then; skipping saves about a microsecond per call on small inputs)."""
    return t if t.dtype == dtype else t.to(dtype)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for float16/bfloat16 leaves, the leaf's dtype otherwise."""
    return torch.float32 if t.dtype in LOW_DTYPES else t.dtype


def common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtypes of a non-empty list of tensors promoted together."""
    return _promoted([x.dtype for x in tensors])


def common_acc_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """The accumulation dtypes of a non-empty list of leaves promoted together."""
    return _promoted([acc_dtype(x) for x in leaves])


def _promoted(dtypes: list[torch.dtype]) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def reduce_except(t: torch.Tensor, d: int | None, fn: str) -> torch.Tensor:
    """Reduce ``t`` over every dim except ``d`` (``d=None``: over all dims, one group).

    ``fn`` is ``"sum"``, ``"sumsq"``, ``"abssum"`` or ``"amax_abs"``. The result has one entry
    per group (shape ``(t.shape[d],)``, or ``(1,)``), in the accumulation dtype. Empty
    groups reduce to 0.
    """
    x = cast(t, acc_dtype(t))
    if fn == "sumsq":
        x = x * x
    elif fn in ("abssum", "amax_abs"):
        x = x.abs()
    if d is None:  # the whole tensor: a full reduction (no flattening view: a DTensor sharded
        # unevenly, 7 rows on 2 ranks, has none), shaped (1,)
        if fn == "amax_abs":
            return x.amax().reshape(1) if x.numel() else x.new_zeros(1)
        return x.sum().reshape(1)
    dims = [i for i in range(x.dim()) if i != d]
    if not dims:
        return x
    if fn == "amax_abs":
        if x.numel() == 0:
            return x.new_zeros(x.shape[d])
        return x.amax(dim=dims)
    return x.sum(dim=dims)


def along(v: torch.Tensor, t: torch.Tensor, d: int | None) -> torch.Tensor:
    """View the per-group vector ``v`` so that it broadcasts along dim ``d`` of ``t``."""
    if d is None:
        return v.reshape(())
    shape = [1] * t.dim()
    shape[d] = -1
    return v.reshape(shape)


def maximum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise maximum of a non-empty list of tensors, in their promoted dtype."""
    dtype = common_dtype(parts)
    out = cast(parts[0], dtype)
    for p in parts[1:]:
        out = torch.maximum(out, cast(p, dtype))
    return out


def total(parts: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    """Sum 0-d (or per-group) partial results of several leaves in a common dtype."""
    if not parts:
        dtype = torch.get_default_dtype()
        return torch.zeros((), dtype=dtype)
    dtype = common_dtype(parts)
    out = cast(parts[0], dtype)
    for p in parts[1:]:
        out = out + cast(p, dtype)
    return out
