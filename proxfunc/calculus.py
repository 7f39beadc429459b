"""Operators built from operators: identity, chain, and partition of a model's parameters.

References: Parikh & Boyd (2014) section 2.2 (separable sums) and section 2.3 (composition).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ._base import Hyper, Prox, _is_compiling, check_hyper, check_step, is_concrete
from ._tree import acc_dtype, flatten, parameter_keys, total
from ._util import feasible_tol, indicator, safe_norm, zeros_like_value

__all__ = [
    "identity",
    "chain",
    "partition",
    "scale",
    "precompose",
    "add_linear",
    "add_quadratic",
    "conjugate",
    "moreau_env",
]


class identity(Prox):  # noqa: N801
    """The prox of ``f = 0``: ``op(x, t) = x``. The same tensors come back (nothing is copied).

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.identity()(torch.tensor([1.0, -2.0]), 0.1)
        tensor([ 1., -2.])
    """

    _public_name = "identity"
    separable = True

    def _prox(self, leaves, step, tree):
        return list(leaves)

    def _value(self, leaves, tree):
        return zeros_like_value(leaves)


def _as_op(owner: str, what: str, op: Any) -> Prox:
    if not isinstance(op, Prox):
        raise TypeError(f"{owner}: {what} must be a proxfunc operator, got {type(op).__name__}")
    return op


class chain(Prox):  # noqa: N801
    """Apply operators one after the other: ``chain(a, b)(x, t) = b(a(x, t), t)``.

    ``value`` is ``sum_k ops[k].value``. The composition is the exact prox of that sum only
    for known pairs, for example (Parikh & Boyd 2014 section 2.3; Friedman et al. 2010):

    * ``chain(l1(r1), l21(r2))`` — the sparse group lasso ``r1*||z||_1 + r2*sum_i ||z_i||_2``;
    * ``chain(l1(r), nonneg())`` and ``chain(elastic_net(...), box(...))`` (separable terms);
    * any operator followed by a projection onto a set it maps into itself.

    In general it is a splitting heuristic, not the prox of the sum.

    Args:
        *ops: the operators, applied in this order with the same step.

    Example:
        >>> import torch, proxfunc as pf
        >>> op = pf.chain(pf.l1(0.5), pf.nonneg())
        >>> op(torch.tensor([-2.0, 0.3, 1.0]), 1.0)
        tensor([0.0000, 0.0000, 0.5000])
    """

    _hyper_names = ("ops",)
    _public_name = "chain"

    def __init__(self, *ops: Prox):
        for i, op in enumerate(ops):
            _as_op("chain", f"ops[{i}]", op)
        self._set(ops=tuple(ops))

    def __call__(self, params: Any, step: Hyper = 1.0) -> Any:
        check_step("chain", step)
        flatten(params, "chain")  # validate once, with the chain's name
        for op in self.ops:
            params = op(params, step)
        return params

    def value(self, params: Any) -> torch.Tensor:
        leaves, _ = flatten(params, "chain")
        if not self.ops:
            return zeros_like_value(leaves)
        return total([op.value(params) for op in self.ops], leaves)

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(op) for op in self.ops) + ")"


Key = str | tuple[str, ...]


class partition(Prox):  # noqa: N801
    """One operator for a whole model: a separable sum over named parameters.

    ``params`` is a mapping from names to tensors, e.g. ``dict(model.named_parameters())`` or
    a ``state_dict``. ``rules`` maps keys to operators:

    * a **string** is a glob pattern (``fnmatch``, ``*`` also matches dots) over the names;
      the operator is applied to **each** matching tensor on its own;
    * a **tuple** of names (or patterns that each match exactly one name) binds those tensors
      into **one** argument, in that order: ``op((t1, t2, ...), step)``, so one group can span
      several tensors (``group_dim`` then lines up with the tuple).

    All the tensors that one operator's pattern rules match are handed to it as one batch
    (:meth:`Prox._prox_batch`), with the result of one call per tensor: a separable operator
    makes a single call, l21 computes every tensor's group norms and then one scale for all.

    Parameters no rule matches pass through unchanged (the same tensors), and so do integer and
    bool tensors (buffers such as a ``state_dict``'s ``num_batches_tracked``), which no rule
    matches, called functionally or in place (:func:`proxfunc.compat.apply_`). With
    ``strict=True`` (default) a rule that matches nothing, or a tuple entry that does not match
    exactly one name, raises ``ValueError``; a name claimed by two rules always does (the
    blocks of a separable sum must be disjoint). ``value`` is the sum of the rules' values.

    A name claimed by two rules raises (neuron i = row i of the weight and bias)::

        prox = pf.partition({
            ("linear1.weight", "linear1.bias"): pf.linf1(0.005),
            "*.weight": pf.l2(1e-4),          # error: linear1.weight is claimed twice
        })

    Parikh & Boyd (2014) section 2.1 (separable sum).

    Args:
        rules: a mapping (or pairs) from a glob pattern or a tuple of names to an operator.
        strict: refuse rules that match nothing (default ``True``).

    Example:
        >>> import torch, proxfunc as pf
        >>> params = {'w': torch.tensor([3.0, -0.2]), 'b': torch.tensor([0.1])}
        >>> pf.partition({'w': pf.l1(0.5)})(params, 1.0)   # 'b' passes through
        {'w': tensor([2.5000, -0.0000]), 'b': tensor([0.1000])}
    """

    _one_device = False  # each rule checks its own tensors (model-parallel layers)
    _hyper_names = ("rules", "strict")
    _public_name = "partition"

    def __init__(self, rules: Mapping[Key, Prox] | Iterable[tuple[Key, Prox]], *, strict: bool = True):
        listed = isinstance(rules, Iterable) and not isinstance(rules, (str, bytes, torch.Tensor))
        if not isinstance(rules, Mapping) and not listed:
            raise TypeError(
                f"partition: rules must be a mapping of keys to operators or an iterable of (key, operator) pairs, "
                f"got {type(rules).__name__}"
            )
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        checked = []
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"partition: rules[{i}] must be a (key, operator) pair, got {item!r}")
            key, op = item
            if isinstance(key, str):
                pass
            elif isinstance(key, tuple) and key and all(isinstance(k, str) for k in key):
                pass
            else:
                raise TypeError(f"partition: rule key {key!r} must be a name pattern or a non-empty tuple of them")
            checked.append((key, _as_op("partition", f"rule {key!r}", op)))
        if not isinstance(strict, bool):
            raise TypeError("partition: strict must be a bool")
        self._set(rules=tuple(checked), strict=strict)

    # ------------------------------------------------------------------ resolution
    def resolve(self, names: Iterable[str]) -> list[tuple[Key, tuple[str, ...], Prox]]:
        """Which names each rule takes: ``[(key, names, op), ...]`` for a given name list.

        A string rule yields one entry per matched name (its tensor alone); a tuple rule
        yields one entry holding all of its names (one joint argument).
        """
        return self._cached("_cache_resolve", tuple(names), self._resolve)

    def _resolve(self, names: tuple[str, ...]) -> list[tuple[Key, tuple[str, ...], Prox]]:
        for k in names:
            if not isinstance(k, str):
                raise TypeError(f"partition: params keys must be strings, got {k!r}")
        keys = tuple(key for key, _ in self.rules)
        # A pure function of (rule keys, strict, names), evaluated once at trace time under
        # torch.compile (the glob matching is plain Python that dynamo need not trace).
        idx = _resolve_plan(keys, self.strict, names)
        return [(self.rules[i][0], group, self.rules[i][1]) for i, group in idx]

    def _layout(self, names: Iterable[str]) -> list[tuple[Prox, list[tuple[str, ...]], bool]]:
        """``resolve`` arranged for a call: ``[(op, name groups, joint)]``.

        The rules of one operator form one batch for :meth:`Prox._prox_batch` (equal operators
        count as one, unless they hold tensor hyperparameters, whose values may change in place:
        then only the same object does), which may share work across them (a separable operator
        makes one call; l21 one scale computation), functional or in place: its pattern rules' tensors
        each an argument (``joint=False``, groups of one name), and apart from those its tuple
        rules, each rule's tensors one argument (``joint=True``).
        """
        return self._cached("_cache_layout", tuple(names), self._arrange)

    def _arrange(self, names: tuple[str, ...]) -> list[tuple[Prox, list[tuple[str, ...]], bool]]:
        batches: dict[Any, tuple[Prox, list[tuple[str, ...]], bool]] = {}
        by_value = not _is_compiling()  # traced: by identity (no operator hashing in the graph)
        for key, group, op in self.resolve(names):
            joint = not isinstance(key, str)
            batches.setdefault((op._batch_key() if by_value else id(op), joint), (op, [], joint))[1].append(group)
        return list(batches.values())

    def _cached(self, slot: str, names: tuple[str, ...], compute: Callable[[tuple[str, ...]], Any]) -> Any:
        """``compute(names)``, remembered for the last ``names`` seen (a training loop passes the
        same keys every step). Not stored while tracing: there the result is a graph constant."""
        cache = self.__dict__.get(slot)
        if cache is not None and cache[0] == names:
            return cache[1]
        value = compute(names)
        if not _is_compiling():
            object.__setattr__(self, slot, (names, value))
        return value

    def _mapping(self, params: Any) -> Mapping[str, Any]:
        if not isinstance(params, Mapping):
            raise TypeError(
                "partition: params must be a mapping from parameter names to tensors "
                f"(e.g. dict(model.named_parameters())), got {type(params).__name__}"
            )
        return params

    # --------------------------------------------------------------------- operator
    def __call__(self, params: Any, step: Hyper = 1.0) -> Any:
        changed, _ = self._split(params, step, in_place=False)
        out = dict(params)
        out.update(changed)
        if type(params) is dict:
            return out
        try:
            return type(params)(out)
        except TypeError:
            return out

    def _split(
        self, params: Any, step: Hyper, in_place: bool, names: list[str] | None = None
    ) -> tuple[dict[str, Any], list[Any]]:
        """``(new values of the names some rule covers, writers)``; no writers unless ``in_place``.

        Each batch of :meth:`_layout` goes to its operator's :meth:`Prox._prox_batch` once. With
        ``in_place`` (the in-place layer, :func:`proxfunc.compat.apply_`) what it prepares
        writes those tensors itself and is returned among the writers, called after every new
        value was computed; otherwise, and where it prepares nothing, the new values are computed.
        ``names``: the keys of ``params`` when the caller knows every value is a floating tensor.
        """
        step = check_step("partition", step)
        params = self._mapping(params)
        changed: dict[str, Any] = {}
        writers: list[Any] = []
        if names is None:
            names = parameter_keys(params, "partition")
        for op, groups, joint in self._layout(names):
            args = [tuple(params[n] for n in g) if joint else params[g[0]] for g in groups]
            run = op._prox_batch(args, step, in_place) if in_place or len(args) > 1 else None
            if run is not None and in_place:
                writers.append(run)
                continue
            outs = run() if run is not None else [op(a, step) for a in args]
            for g, v in zip(groups, outs):
                changed.update(zip(g, v) if joint else [(g[0], v)])
        return changed, writers

    def value(self, params: Any) -> torch.Tensor:
        params = self._mapping(params)
        vals = []
        for key, names, op in self.resolve(parameter_keys(params, "partition")):
            arg = params[names[0]] if isinstance(key, str) else tuple(params[n] for n in names)
            vals.append(op.value(arg))
        tensors = [v for v in params.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return total(vals, tensors) if vals else zeros_like_value(tensors)

    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {op!r}" for k, op in self.rules)
        extra = "" if self.strict else ", strict=False"
        return f"partition({{{body}}}{extra})"

    def __hash__(self) -> int:
        return hash((partition, self.rules, self.strict))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, partition):
            return NotImplemented
        return self.rules == other.rules and self.strict == other.strict


def _constant(fn):
    """``torch.compiler.assume_constant_result(fn)``: traced, a call of ``fn`` on constants is
    run once and its result put in the graph. The decorator's marker is set directly, because
    calling it imports ``torch._dynamo`` (about a second) with ``import proxfunc``;
    ``tests/test_compile.py`` checks that the decorator sets this marker and nothing else."""
    fn._dynamo_marked_constant = True
    return fn


@_constant
def _resolve_plan(
    keys: tuple[Key, ...], strict: bool, names: tuple[str, ...]
) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """``partition.resolve`` on plain data: ``((rule index, names), ...)``."""
    owner: dict[str, Key] = {}
    plan: list[tuple[int, tuple[str, ...]]] = []

    def claim(name: str, key: Key) -> None:
        if name in owner:
            raise ValueError(
                f"partition: parameter {name!r} is matched by two rules, {owner[name]!r} and {key!r}; "
                "the rules of a partition must be disjoint"
            )
        owner[name] = key

    for i, key in enumerate(keys):
        if isinstance(key, str):
            hits = [n for n in names if fnmatch.fnmatchcase(n, key)]
            if not hits and strict:
                raise ValueError(f"partition: pattern {key!r} matches no parameter name; {_known(names)}")
            for n in hits:
                claim(n, key)
                plan.append((i, (n,)))
        else:
            group: list[str] = []
            for pat in key:
                hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
                if len(hits) != 1:
                    if not strict and not hits:
                        group = []
                        break
                    what = "matches no parameter name" if not hits else f"matches {len(hits)} names {hits}"
                    raise ValueError(
                        f"partition: {pat!r} in rule {key!r} {what}; each entry of a tuple rule "
                        f"must match exactly one parameter; {_known(names)}"
                    )
                group.append(hits[0])
            if group:
                for n in group:
                    claim(n, key)
                plan.append((i, tuple(group)))
    return tuple(plan)


def _known(names: tuple[str, ...]) -> str:
    shown = ", ".join(repr(n) for n in names[:8])
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"known names: {shown}{more}" if names else "params is empty"


# =============================================================================================
# Calculus rules (Parikh & Boyd 2014, section 2.2): operators built from operators.
# =============================================================================================


def _apply(op: Prox, leaves: list[torch.Tensor], step: Hyper, tree: Any) -> list[torch.Tensor]:
    """``op`` on the tree rebuilt from ``leaves``; the result's tensor leaves."""
    return flatten(op(tree.unflatten(leaves), step), op._name())[0]


def _val(op: Prox, leaves: list[torch.Tensor], tree: Any) -> torch.Tensor:
    return op.value(tree.unflatten(leaves))


def _tree_arg(owner: str, name: str, v: Any, leaves: list[torch.Tensor], tree: Any) -> list[Any]:
    """A float / 0-d tensor (broadcast to every leaf) or a pytree with the structure of params."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)] * len(leaves)
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        return [v] * len(leaves)
    vl, _ = flatten(v, owner)
    if len(vl) != len(leaves):
        raise ValueError(f"{owner}: {name} must be a number or a pytree with the structure of params")
    for a, x, p in zip(vl, leaves, tree.paths):
        if a.shape != x.shape:
            raise ValueError(f"{owner}: {name}{p} has shape {tuple(a.shape)}, params{p} has {tuple(x.shape)}")
    return vl


def _check_arg(owner: str, name: str, v: Any) -> Any:
    if isinstance(v, bool):
        raise TypeError(f"{owner}: {name} must be a number, a tensor or a pytree of tensors")
    if isinstance(v, (int, float)):
        return check_hyper(owner, name, float(v), min_value=None)
    if isinstance(v, complex):
        raise TypeError(f"{owner}: {name} must be real, got complex")
    for path, leaf in _leaves_with_paths(v):
        where = f"{owner}: {name}{path}"
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where} must be a number or a floating tensor, got {type(leaf).__name__}")
        if not leaf.is_floating_point():
            raise TypeError(f"{where} must be a floating tensor, got dtype {leaf.dtype}")
        if leaf.layout != torch.strided:
            raise TypeError(f"{where} must be a dense (strided) tensor, got layout {leaf.layout}")
        if is_concrete(leaf) and not _is_compiling() and not bool(torch.isfinite(leaf.detach()).all()):
            raise ValueError(f"{where} must be finite (no NaN or inf)")
    return v


def _leaves_with_paths(v: Any) -> list[tuple[str, Any]]:
    from torch.utils import _pytree as pytree

    if isinstance(v, torch.Tensor):
        return [("", v)]
    leaves, _ = pytree.tree_flatten(v)
    return [(f"[{i}]", x) for i, x in enumerate(leaves) if x is not None]


def _cast(v: Any, x: torch.Tensor) -> Any:
    return v.to(device=x.device, dtype=x.dtype) if isinstance(v, torch.Tensor) else v


def _dot(a: list[Any], b: list[torch.Tensor]) -> torch.Tensor:
    parts = []
    for u, x in zip(a, b):
        xa = x.to(acc_dtype(x))
        parts.append((xa * _cast(u, xa)).sum())
    return total(parts, b)


class scale(Prox):  # noqa: N801
    """Prox of ``g = a * f`` for ``a > 0``: ``op(x, t) = f.prox(x, a*t)``; ``value = a * f.value``.

    Parikh & Boyd (2014) section 2.2 (postcomposition).

    Args:
        op: the operator of ``f``.
        a: the factor, ``> 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.scale(pf.l1(1.0), 2.0)(torch.tensor([3.0, -1.0]), 1.0)
        tensor([1., -0.])
    """

    _hyper_names = ("op", "a")
    _public_name = "scale"

    def __init__(self, op: Prox, a: Hyper = 1.0):
        self._set(op=_as_op("scale", "op", op), a=check_hyper("scale", "a", a, strict=True))
        object.__setattr__(self, "is_projection", op.is_projection)
        object.__setattr__(self, "separable", op.separable)

    def _prox(self, leaves, step, tree):
        return _apply(self.op, leaves, self.a * step, tree)

    def _value(self, leaves, tree):
        return self.a * _val(self.op, leaves, tree)


class precompose(Prox):  # noqa: N801
    """Prox of ``g(z) = f(alpha * z + b)``, ``alpha != 0`` a scalar:

        op(x, t) = (f.prox(alpha*x + b, alpha^2 * t) - b) / alpha.

    ``b`` is a number (added to every entry) or a pytree with the structure of ``params``.
    ``value(z) = f.value(alpha*z + b)``. Parikh & Boyd (2014) section 2.2 (precomposition).

    Args:
        op: the operator of ``f``.
        alpha: the scale of the argument, ``!= 0``.
        b: the shift, a number or a pytree like ``params``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.precompose(pf.l1(1.0), 2.0)(torch.tensor([3.0, -1.0]), 1.0)
        tensor([1., -0.])
    """

    _hyper_names = ("op", "alpha", "b")
    _public_name = "precompose"

    def __init__(self, op: Prox, alpha: Hyper = 1.0, b: Any = 0.0):
        alpha = check_hyper("precompose", "alpha", alpha, min_value=None)
        if (isinstance(alpha, float) and alpha == 0.0) or (
            isinstance(alpha, torch.Tensor) and is_concrete(alpha) and bool(alpha.detach() == 0)
        ):
            raise ValueError("precompose: alpha must be non-zero")
        self._set(op=_as_op("precompose", "op", op), alpha=alpha, b=_check_arg("precompose", "b", b))

    def _inner(self, leaves, tree):
        bl = _tree_arg("precompose", "b", self.b, leaves, tree)
        return bl, [(self.alpha * x.to(acc_dtype(x)) + _cast(c, x.to(acc_dtype(x)))) for x, c in zip(leaves, bl)]

    def _prox(self, leaves, step, tree):
        bl, inner = self._inner(leaves, tree)
        p = _apply(self.op, inner, self.alpha * self.alpha * step, tree)
        return [
            ((q.to(acc_dtype(x)) - _cast(c, q.to(acc_dtype(x)))) / self.alpha).to(x.dtype)
            for q, c, x in zip(p, bl, leaves)
        ]

    def _value(self, leaves, tree):
        return _val(self.op, self._inner(leaves, tree)[1], tree)


class add_linear(Prox):  # noqa: N801
    """Prox of ``g(z) = f(z) + <v, z>``: ``op(x, t) = f.prox(x - t*v, t)``.

    ``v`` is a number (every entry) or a pytree with the structure of ``params``.
    Parikh & Boyd (2014) section 2.2 (affine addition).

    Args:
        op: the operator of ``f``.
        v: the linear term, a number or a pytree like ``params``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.add_linear(pf.l1(1.0), torch.tensor([1.0, 1.0]))(torch.tensor([3.0, -1.0]), 1.0)
        tensor([ 1., -1.])
    """

    _hyper_names = ("op", "v")
    _public_name = "add_linear"

    def __init__(self, op: Prox, v: Any = 0.0):
        self._set(op=_as_op("add_linear", "op", op), v=_check_arg("add_linear", "v", v))

    def _prox(self, leaves, step, tree):
        vl = _tree_arg("add_linear", "v", self.v, leaves, tree)
        shifted = [(x.to(acc_dtype(x)) - step * _cast(u, x.to(acc_dtype(x)))).to(x.dtype) for x, u in zip(leaves, vl)]
        return _apply(self.op, shifted, step, tree)

    def _value(self, leaves, tree):
        vl = _tree_arg("add_linear", "v", self.v, leaves, tree)
        return _val(self.op, leaves, tree) + _dot(vl, leaves)


class add_quadratic(Prox):  # noqa: N801
    """Prox of ``g(z) = f(z) + rho/2 * ||z - v||^2``, ``rho >= 0``:

        op(x, t) = f.prox((x + t*rho*v) / (1 + t*rho), t / (1 + t*rho)).

    ``v`` is a number or a pytree with the structure of ``params`` (default 0).
    Parikh & Boyd (2014) section 2.2 (regularization).

    Args:
        op: the operator of ``f``.
        rho: the weight of the quadratic, ``>= 0``.
        v: its centre, a number or a pytree like ``params``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.add_quadratic(pf.l1(1.0), 1.0)(torch.tensor([3.0, -1.0]), 1.0)
        tensor([1., -0.])
    """

    _hyper_names = ("op", "rho", "v")
    _public_name = "add_quadratic"

    def __init__(self, op: Prox, rho: Hyper = 1.0, v: Any = 0.0):
        self._set(
            op=_as_op("add_quadratic", "op", op),
            rho=check_hyper("add_quadratic", "rho", rho),
            v=_check_arg("add_quadratic", "v", v),
        )

    def _prox(self, leaves, step, tree):
        vl = _tree_arg("add_quadratic", "v", self.v, leaves, tree)
        d = 1.0 + step * self.rho
        moved = []
        for x, u in zip(leaves, vl):
            xa = x.to(acc_dtype(x))
            moved.append(((xa + step * self.rho * _cast(u, xa)) / d).to(x.dtype))
        return _apply(self.op, moved, step / d, tree)

    def _value(self, leaves, tree):
        vl = _tree_arg("add_quadratic", "v", self.v, leaves, tree)
        sq = []
        for x, u in zip(leaves, vl):
            xa = x.to(acc_dtype(x))
            sq.append(((xa - _cast(u, xa)) ** 2).sum())
        return _val(self.op, leaves, tree) + 0.5 * self.rho * total(sq, leaves)


class conjugate(Prox):  # noqa: N801
    """Prox of the convex conjugate ``f*(y) = sup_z <y, z> - f(z)``, by the Moreau identity:

        op(x, t) = x - t * f.prox(x / t, 1 / t).

    Exact for every closed convex ``f``. ``value`` uses the closed form of ``f*`` for the operators
    whose conjugate is known (norms <-> dual-norm balls, elastic net, log barrier, ridge, Huber,
    quadratic (``1/2 (y-b)^T A^+ (y-b) - c`` on the range of a positive semidefinite ``A``,
    ``+inf`` off it), negative entropy, max entry, sum of k largest, nuclear <-> spectral, box and
    simplex (support functions), nonneg / PSD / SOC cones (polar cones),
    l21, linf1, scale, conjugate, and the support functions of the affine sets: hyperplane
    ``{<a, z> = b}`` -> ``b s`` if ``y = s a``, halfspace -> the same with ``s >= 0``, affine
    ``{A z = b}`` -> ``<lam, b>`` if ``y = A^T lam`` (``lam`` least squares), box ∩ hyperplane ->
    ``min_mu b mu + sum_j max((y_j - mu a_j) lower_j, (y_j - mu a_j) upper_j)`` (LP duality, exact
    at the breakpoints ``mu = y_j / a_j``); index_l21 / index_linf1 -> every group's l2 / l1 norm
    ``<= reg`` and ``y = 0`` on free entries; sparse group lasso -> ``||soft(y_i, reg_l1)||_2 <=
    reg_group`` for every group, the infimal convolution of the two dual balls); membership in a
    domain is tested with the same relative tolerances as the sets' own ``value`` (``+inf``
    outside). For others it raises ``NotImplementedError`` (the prox still works).

    Where ``f*`` is the indicator of a norm ball (``l1``, ``l2``, ``linf``, ``l21``, ``nuclear``,
    ``spectral``: the balls of ``linf``, ``l2``, ``l1``, every group's ``l2``, every matrix's
    spectral norm and the joint nuclear norm, of radius ``reg``), of the polar cone of ``nonneg``,
    or Huber's ``|y|^2 / (2 reg)`` on ``|y| <= reg delta`` (and ``scale`` of any of these), the
    prox is computed directly: the same point as the Moreau identity, without its
    cancellation (``x - t * f.prox(x/t, 1/t)`` carries an absolute error of about
    ``eps * |x|``, which exceeds a tight membership test when ``|x|`` is far larger than ``reg``).
    Membership in a norm ball (and the other ``<=`` tests of the domains above) has a relative
    tolerance of ``max(8 * (8 + 2n) * eps, sqrt(eps))`` (``eps`` of the accumulation dtype), so a
    dual point built by hand as ``y = (x - f.prox(x, t)) / t``, whose absolute error is about
    ``eps * |x| / t``, is accepted while ``|x| / t`` stays below about ``|y| / sqrt(eps)``
    (``6.7e7 |y|`` in float64, ``2.9e3 |y|`` in float32); beyond that the rounding of ``y`` itself
    exceeds the tolerance, and ``conjugate(f)(x / t, 1 / t)`` gives the same ``y`` exactly feasible
    for the norm balls.
    ``conjugate(conjugate(f))`` behaves as ``f``. Parikh & Boyd (2014) sections 2.5 and 3.2.

    Args:
        op: the operator of ``f``.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.conjugate(pf.l1(1.0))(torch.tensor([3.0, -0.5]), 1.0)   # projection onto the linf ball
        tensor([ 1.0000, -0.5000])
    """

    _hyper_names = ("op",)
    _public_name = "conjugate"

    def __init__(self, op: Prox):
        self._set(op=_as_op("conjugate", "op", op))

    def _prox(self, leaves, step, tree):
        exact = _dual_prox(self.op, leaves, step, tree)
        if exact is not None:
            return exact
        ball = _DUAL_BALL.get(type(self.op))
        if ball is not None:  # a norm's conjugate is its dual ball: projected directly, no cancellation
            return _apply(ball(self.op), leaves, step, tree)
        inv = 1.0 / step
        scaled = [(x.to(acc_dtype(x)) * inv).to(x.dtype) for x in leaves]
        p = _apply(self.op, scaled, inv, tree)
        return [(x.to(acc_dtype(x)) - step * q.to(acc_dtype(x))).to(x.dtype) for x, q in zip(leaves, p)]

    def _value(self, leaves, tree):
        fn = _CONJ.get(type(self.op))
        if fn is None:
            raise NotImplementedError(
                f"conjugate: no closed form of the conjugate of {self.op!r} is registered; its prox is exact"
            )
        return fn(self.op, leaves, tree)


class moreau_env(Prox):  # noqa: N801
    """The Moreau envelope ``M(z) = min_u f(u) + ||u - z||^2 / (2*mu)`` as an operator, ``mu > 0``.

    * ``value(z) = f(p) + ||p - z||^2 / (2 mu)`` with ``p = f.prox(z, mu)``;
    * ``grad(z) = (z - p) / mu`` (``M`` is smooth with a ``1/mu``-Lipschitz gradient);
    * ``op(x, t) = x + t/(mu + t) * (f.prox(x, mu + t) - x)``, the prox of ``t*M``.

    Parikh & Boyd (2014) sections 1.2, 3.1 and 2.2 (prox of the envelope).

    Args:
        op: the operator of ``f``.
        mu: the smoothing parameter, ``> 0``.

    Example:
        >>> import torch, proxfunc as pf
        >>> env = pf.moreau_env(pf.l1(1.0), mu=1.0)
        >>> env.value(torch.tensor([3.0, 0.5]))   # Huber
        tensor(2.6250)
        >>> env.grad(torch.tensor([3.0, 0.5]))
        tensor([1.0000, 0.5000])
    """

    _hyper_names = ("op", "mu")
    _public_name = "moreau_env"

    def __init__(self, op: Prox, mu: Hyper = 1.0):
        self._set(op=_as_op("moreau_env", "op", op), mu=check_hyper("moreau_env", "mu", mu, strict=True))

    def _prox(self, leaves, step, tree):
        p = _apply(self.op, leaves, self.mu + step, tree)
        c = step / (self.mu + step)
        return [
            (x.to(acc_dtype(x)) + c * (q.to(acc_dtype(x)) - x.to(acc_dtype(x)))).to(x.dtype) for x, q in zip(leaves, p)
        ]

    def _value(self, leaves, tree):
        p = _apply(self.op, leaves, self.mu, tree)
        fp = _val(self.op, p, tree)
        sq = [((q.to(acc_dtype(x)) - x.to(acc_dtype(x))) ** 2).sum() for x, q in zip(leaves, p)]
        return fp + total(sq, leaves) / (2 * self.mu)

    def grad(self, params: Any) -> Any:
        """``grad M(params) = (params - f.prox(params, mu)) / mu``, a tree like ``params``."""
        leaves, tree = flatten(params, "moreau_env")
        p = _apply(self.op, leaves, self.mu, tree)
        g = [((x.to(acc_dtype(x)) - q.to(acc_dtype(x))) / self.mu).to(x.dtype) for x, q in zip(leaves, p)]
        return tree.unflatten(g)


# ------------------------------------------------------------------ closed-form conjugates
def _flatv(leaves):
    from .sets import flat

    return flat(leaves)


def _ind(ok: torch.Tensor, dtype) -> torch.Tensor:
    return indicator(ok, dtype)


def _le(a: torch.Tensor, r: Any, leaves: list[torch.Tensor]) -> torch.Tensor:
    from .sets import set_tol

    # generous (8x, and at least sqrt(eps)): the argument is often a difference x - prox(x),
    # rounded relative to x, which may be far larger than a and r (see conjugate's docstring)
    tol = 8 * (set_tol(leaves, sum(x.numel() for x in leaves)) if leaves else feasible_tol(a, 1))
    tol = max(tol, torch.finfo(a.dtype).eps ** 0.5)
    return a <= r + tol * (a.abs() + abs(r))


def _conj_table() -> dict[type, Any]:
    from . import groups, index_groups, matrix, norms, projections, sets, smooth

    def c_l1(op, leaves, tree):
        v = _flatv(leaves)
        return _ind(_le(v.abs().max() if v.numel() else v.new_zeros(()), op.reg, leaves), v.dtype)

    def c_l2(op, leaves, tree):
        v = _flatv(leaves)
        return _ind(_le(v.norm(), op.reg, leaves), v.dtype)

    def c_linf(op, leaves, tree):
        v = _flatv(leaves)
        return _ind(_le(v.abs().sum(), op.reg, leaves), v.dtype)

    def c_ridge(op, leaves, tree):
        v = _flatv(leaves)
        return (v * v).sum() / (2 * op.reg)

    def c_huber(op, leaves, tree):
        v = _flatv(leaves)
        ok = _le(v.abs().max() if v.numel() else v.new_zeros(()), op.reg * op.delta, leaves)
        return torch.where(ok, (v * v).sum() / (2 * op.reg), torch.full((), float("inf"), dtype=v.dtype))

    def c_quadratic(op, leaves, tree):  # 1/2 y^T A^+ y - c for y = v - b in range(A), else inf
        v = _flatv(leaves)
        if v.numel() != op.A.shape[0]:
            raise ValueError(f"quadratic: A is {tuple(op.A.shape)} but params has {v.numel()} entries")
        y = v - (op.b.reshape(-1).to(v) if op.b is not None else 0)
        if op.A.requires_grad:  # differentiable in A
            A = op.A.to(v)
            w, Q = torch.linalg.eigh(0.5 * (A + A.T))
        else:
            w, Q = op._cache_w.to(v), op._cache_Q.to(v)
        n = max(v.numel(), 1)
        wmax = w.abs().max() if w.numel() else v.new_zeros(())
        keep = w > n * torch.finfo(torch.float64).eps * wmax  # A's range (the pseudo-inverse's cut-off)
        cy = Q.T @ y
        zero = torch.zeros_like(cy)
        null = torch.where(keep, zero, cy)
        tol = max(8 * set_tol(leaves, v.numel()), torch.finfo(v.dtype).eps ** 0.5)
        ok = safe_norm((null * null).sum()) <= tol * safe_norm((y * y).sum())
        ws = torch.where(keep, w, torch.ones_like(w))
        val = 0.5 * torch.where(keep, cy * cy / ws, zero).sum()
        val = val if op.c is None else val - _hyper_as(op.c, y)
        return torch.where(ok, val, torch.full_like(val, float("inf")))

    def c_negent(op, leaves, tree):
        v = _flatv(leaves)
        return op.reg * torch.exp(v / op.reg - 1).sum()

    from .sets import _hyper_as, set_tol

    def c_max(op, leaves, tree):  # indicator of reg * simplex
        v = _flatv(leaves)
        tol = set_tol(leaves, v.numel())
        ok = (v >= 0).all() & ((v.sum() - op.reg).abs() <= tol * (v.abs().sum() + op.reg))
        return _ind(ok, v.dtype)

    def c_sumk(op, leaves, tree):  # indicator of {0 <= y <= reg, sum y = k reg}
        v = _flatv(leaves)
        tol = set_tol(leaves, v.numel())
        ok = (
            (v >= 0).all()
            & _le(v.max(), op.reg, leaves)
            & ((v.sum() - op.k * op.reg).abs() <= tol * (v.abs().sum() + op.k * op.reg))
        )
        return _ind(ok, v.dtype)

    def c_nuclear(op, leaves, tree):
        return _ind(_le(matrix.spectral(1.0)._value(leaves, tree), op.reg, leaves), zeros_like_value(leaves).dtype)

    def c_spectral(op, leaves, tree):
        return _ind(_le(matrix.nuclear(1.0)._value(leaves, tree), op.reg, leaves), zeros_like_value(leaves).dtype)

    def c_l1_ball(op, leaves, tree):
        return op.radius * norms.linf(1.0)._value(leaves, tree)

    def c_l2_ball(op, leaves, tree):
        return op.radius * norms.l2(1.0)._value(leaves, tree)

    def c_linf_ball(op, leaves, tree):
        return norms.l1(op.radius)._value(leaves, tree)  # sum_j radius_j |y_j|, radii per entry or per leaf

    def c_nonneg(op, leaves, tree):
        v = _flatv(leaves)
        return _ind((v <= 0).all(), v.dtype)

    def c_l21(op, leaves, tree):
        dims, _ = op.groups(leaves, tree)
        n = groups.l21(1.0, group_dim=op.group_dim)._norms(leaves, dims)
        return _ind(_le(n.max() if n.numel() else n.new_zeros(()), op.reg, leaves), n.dtype)

    def c_linf1(op, leaves, tree):
        dims, _ = op.groups(leaves, tree)
        n = _tree_total_abs(leaves, dims)
        return _ind(_le(n.max() if n.numel() else n.new_zeros(()), op.reg, leaves), n.dtype)

    def c_scale(op, leaves, tree):  # (a f)*(y) = a f*(y / a)
        inner = conjugate(op.op)
        return op.a * _val(inner, [(x.to(acc_dtype(x)) / op.a).to(x.dtype) for x in leaves], tree)

    def c_conj(op, leaves, tree):
        return _val(op.op, leaves, tree)

    def c_identity(op, leaves, tree):  # f = 0: f* = indicator of {0}
        v = _flatv(leaves)
        return _ind((v == 0).all(), v.dtype)

    def c_elastic(op, leaves, tree):  # sum (|y| - reg)_+^2 / (2 reg gamma); gamma = 0: ind(|y| <= reg)
        v = _flatv(leaves)
        ex = torch.clamp_min(v.abs() - op.reg, 0)
        if isinstance(op.gamma, float) and op.gamma == 0.0:
            return _ind(_le(v.abs().max() if v.numel() else v.new_zeros(()), op.reg, leaves), v.dtype)
        return (ex * ex).sum() / (2 * op.reg * op.gamma)

    def c_log_barrier(op, leaves, tree):  # sum -reg + reg log(reg) - reg log(-y), y < 0
        v = _flatv(leaves)
        neg = v < 0
        val = (-op.reg + op.reg * torch.log(torch.as_tensor(op.reg, dtype=v.dtype))) * v.numel()
        val = val - op.reg * torch.log(torch.where(neg, -v, torch.ones_like(v))).sum()
        return torch.where(neg.all(), val, torch.full_like(val, float("inf")))

    def c_box(op, leaves, tree):  # support function: sum max(lower*y, upper*y)
        parts = []
        for x, (lo_b, hi_b) in zip(leaves, op._leaf_bounds(leaves, tree)):
            xa = x.to(acc_dtype(x))
            lo, hi = op._bound(lo_b, xa), op._bound(hi_b, xa)
            lo_t = torch.as_tensor(lo, dtype=xa.dtype, device=xa.device)
            hi_t = torch.as_tensor(hi, dtype=xa.dtype, device=xa.device)
            # 0 * inf = nan: an entry y_j = 0 contributes 0 whatever the bound
            a = torch.where(xa > 0, xa * hi_t, torch.where(xa < 0, xa * lo_t, torch.zeros_like(xa)))
            parts.append(a.sum())
        return total(parts, leaves)

    def c_simplex(op, leaves, tree):
        return op.radius * _flatv(leaves).max()

    def c_nuclear_ball(op, leaves, tree):
        return op.radius * matrix.spectral(1.0)._value(leaves, tree)

    def c_psd(op, leaves, tree):  # polar cone in the space of all matrices: {Y : sym(Y) NSD}
        sets.psd()._check(leaves, tree)
        ok = torch.ones((), dtype=torch.bool)
        for x in leaves:
            xa = x.to(acc_dtype(x))
            n = x.shape[-1]
            lam = torch.linalg.eigvalsh(0.5 * (xa + xa.transpose(-1, -2)))
            scale = n * xa.abs().amax(dim=(-1, -2)).unsqueeze(-1)  # the whole Y, skew part included
            ok = ok.to(x.device) & (lam <= set_tol([x], n * n) * n * scale).all()
        return _ind(ok, zeros_like_value(leaves).dtype)

    def c_soc(op, leaves, tree):  # polar cone of the (self-dual) SOC is -SOC
        return sets.soc()._value([(-x) for x in leaves], tree)

    def c_hyperplane(op, leaves, tree):  # support of {<a, z> = b}: b s if y = s a, else inf
        v, a, b, s, perp = _line(op, leaves)
        return torch.where(perp, b * s, torch.full_like(s, float("inf")))

    def c_halfspace(op, leaves, tree):  # support of {<a, z> <= b}: b s if y = s a with s >= 0
        v, a, b, s, perp = _line(op, leaves)
        tol = 8 * set_tol(leaves, v.numel())
        ok = perp & (s * torch.dot(a, a) >= -tol * a.norm() * v.norm())
        return torch.where(ok, b * s.clamp_min(0), torch.full_like(s, float("inf")))

    def c_affine(op, leaves, tree):  # support of {A z = b}: <y, A^+ b> if y is in the row space of A
        v = _flatv(leaves)
        A = op.A.to(device=v.device, dtype=v.dtype)
        if A.shape[1] != v.numel():
            raise ValueError(f"affine: A has {A.shape[1]} columns but params has {v.numel()} entries")
        b = op.b.reshape(-1).to(device=v.device, dtype=v.dtype)
        if op.A.requires_grad:
            Ap = torch.linalg.pinv(A)  # (n, m); differentiable in A
            row = v - Ap @ (A @ v)
        else:
            V = op._cache_V.to(device=v.device, dtype=v.dtype)
            Ap = V @ op._cache_W.to(device=v.device, dtype=v.dtype)
            row = v - V @ (V.T @ v)
        tol = 8 * set_tol(leaves, v.numel()) * (1 + op._cache_cond)
        ok = row.norm() <= tol * v.norm()
        val = torch.dot(v, Ap @ b)  # = <lam, b> with lam = (A^+)^T y, the least-squares A^T lam = y
        return torch.where(ok, val, torch.full_like(val, float("inf")))

    def c_box_hyperplane(op, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        v = _flatv(leaves)
        a, lo, hi, b = op._data(v, leaves, tree)
        return _box_hyperplane_support(v, a, lo, hi, b)

    def c_index_l21(op, leaves, tree):  # ball of the dual norm per group; free entries: {0}
        if not leaves:
            return zeros_like_value(leaves)
        v, member, gidx = op._v(leaves)
        n = op._norms(v, member, gidx)
        ok = _le(n.max() if n.numel() else n.new_zeros(()), op.reg, leaves) & (member | (v == 0)).all()
        return _ind(ok, v.dtype)

    def c_index_linf1(op, leaves, tree):
        if not leaves:
            return zeros_like_value(leaves)
        v, member, gidx = op._v(leaves)
        n = torch.zeros(max(op._cache_G, 1), dtype=v.dtype, device=v.device)  # G = 0: all entries free
        n = n.index_add(0, gidx, torch.where(member, v.abs(), torch.zeros_like(v)))
        ok = _le(n.max() if n.numel() else n.new_zeros(()), op.reg, leaves) & (member | (v == 0)).all()
        return _ind(ok, v.dtype)

    def c_sparse_group_lasso(op, leaves, tree):  # {u + w : |u| <= reg_l1, ||w_i|| <= reg_group}
        if not leaves:
            return zeros_like_value(leaves)
        _, grp = op._cache_ops
        dims, _ = grp.groups(leaves, tree)
        soft = []
        for x in leaves:
            xa = x.to(acc_dtype(x))
            soft.append(torch.sign(xa) * torch.clamp_min(xa.abs() - op.reg_l1, 0))
        n = grp._norms(soft, dims)
        return _ind(_le(n.max() if n.numel() else n.new_zeros(()), op.reg_group, leaves), n.dtype)

    return {
        sets.hyperplane: c_hyperplane,
        sets.halfspace: c_halfspace,
        sets.affine: c_affine,
        sets.box_hyperplane: c_box_hyperplane,
        index_groups.index_l21: c_index_l21,
        index_groups.index_linf1: c_index_linf1,
        index_groups.sparse_group_lasso: c_sparse_group_lasso,
        norms.elastic_net: c_elastic,
        norms.log_barrier: c_log_barrier,
        projections.box: c_box,
        projections.simplex: c_simplex,
        matrix.nuclear_ball: c_nuclear_ball,
        sets.psd: c_psd,
        sets.soc: c_soc,
        norms.l1: c_l1,
        norms.l2: c_l2,
        norms.linf: c_linf,
        smooth.ridge: c_ridge,
        smooth.huber: c_huber,
        smooth.quadratic: c_quadratic,
        smooth.neg_entropy: c_negent,
        smooth.max_entry: c_max,
        smooth.sum_largest: c_sumk,
        matrix.nuclear: c_nuclear,
        matrix.spectral: c_spectral,
        projections.l1_ball: c_l1_ball,
        projections.l2_ball: c_l2_ball,
        projections.linf_ball: c_linf_ball,
        projections.nonneg: c_nonneg,
        groups.l21: c_l21,
        groups.linf1: c_linf1,
        scale: c_scale,
        conjugate: c_conj,
        identity: c_identity,
    }


def _dual_prox(op: Prox, leaves: list[torch.Tensor], step: Hyper, tree: Any) -> list[torch.Tensor] | None:
    """The prox of ``f*`` computed directly where ``f*`` is an indicator (of a dual-norm ball or
    a polar cone) or Huber's conjugate, for scalar hyperparameters; ``None`` otherwise (the Moreau
    identity is used). The same point as ``x - t f.prox(x/t, 1/t)``, without its cancellation."""
    from . import groups, matrix, norms, projections, smooth

    kind = type(op)
    if kind is projections.nonneg:  # polar cone: y <= 0
        return [torch.clamp_max(x, 0) for x in leaves]
    if kind is scale and _scalar(op.a):  # (a f)*(y) = a f*(y / a): prox_{t (a f)*}(x) = a prox_{(t/a) f*}(x / a)
        inner = _dual_prox(op.op, [(x.to(acc_dtype(x)) / op.a).to(x.dtype) for x in leaves], step / op.a, tree)
        return None if inner is None else [(q.to(acc_dtype(q)) * op.a).to(q.dtype) for q in inner]
    reg = getattr(op, "reg", None)
    if not _scalar(reg):
        return None
    if kind is norms.l1:
        return _apply(projections.box(-reg, reg), leaves, 1.0, tree)
    if kind is norms.l2:
        return _apply(projections.l2_ball(reg), leaves, 1.0, tree)
    if kind is norms.linf:
        return _apply(projections.l1_ball(reg), leaves, 1.0, tree)
    if kind is matrix.spectral:
        return _apply(matrix.nuclear_ball(reg), leaves, 1.0, tree)
    if kind is matrix.nuclear:  # every matrix's spectral norm <= reg: clip its singular values
        matrix._check_mats("conjugate", leaves, tree)
        out = []
        for x in leaves:
            U, s, Vh = matrix._svd(x)
            out.append(matrix._spectral(x, U, s, Vh, torch.clamp_max(s, reg), s < reg))
        return out
    if kind is groups.l21 and leaves:  # every group's l2 norm <= reg: y = x * min(n, reg) / n
        dims, _ = op.groups(leaves, tree)
        n = op._norms(leaves, dims)
        f = torch.where(n > reg, reg / torch.where(n > reg, n, torch.ones_like(n)), torch.ones_like(n))
        return [groups._scaled(x, f, d) for x, d in zip(leaves, dims)]
    if kind is smooth.huber and _scalar(op.delta):  # |y|^2 / (2 reg) on |y| <= reg delta
        out = []
        for x in leaves:
            xa = x.to(acc_dtype(x))
            bound = op.reg * op.delta
            out.append(torch.clamp(xa * (op.reg / (op.reg + step)), -bound, bound).to(x.dtype))
        return out
    return None


def _scalar(h: Any) -> bool:
    return isinstance(h, float) or (isinstance(h, torch.Tensor) and h.dim() == 0)


def _line(op, leaves):
    """``y`` flattened, ``a``, ``b``, ``s = <a, y> / ||a||^2`` and whether ``y = s a`` (relative tolerance)."""
    from .sets import _check_numel, _hyper_as, set_tol

    v = _flatv(leaves)
    a = _check_numel(op._name(), "a", op.a, v.numel()).to(device=v.device, dtype=v.dtype)
    b = torch.as_tensor(_hyper_as(op.b, v), dtype=v.dtype, device=v.device)
    s = torch.dot(a, v) / torch.dot(a, a)
    tol = 8 * set_tol(leaves, v.numel())
    return v, a, b, s, (v - s * a).norm() <= tol * v.norm()


def _box_hyperplane_support(v, a, lo, hi, b):
    """``sup {<v, z> : lo <= z <= hi, <a, z> = b}`` (``a > 0``), by LP duality:

        min_mu  b mu + sum_j max((v_j - mu a_j) lo_j, (v_j - mu a_j) hi_j),

    a convex piecewise-linear function of ``mu`` whose minimum lies at a breakpoint
    ``mu_j = v_j / a_j``; all breakpoints are evaluated at once from sorted prefix/suffix sums
    (O(n log n), exact up to rounding). An infinite bound makes the objective ``inf`` on one side
    of its breakpoint: it is kept out of the sums and checked by comparison instead (breakpoints that
    differ by rounding only count as equal: the support is then finite, as for an exact tie).
    """
    mu = v / a
    mus, order = torch.sort(mu)
    ys, as_, ls, us = v[order], a[order], lo[order], hi[order]
    linf, uinf = torch.isinf(ls), torch.isinf(us)
    zero = torch.zeros_like(ls)
    lf, uf = torch.where(linf, zero, ls), torch.where(uinf, zero, us)
    acc = torch.promote_types(v.dtype, torch.float64) if v.device.type != "mps" else v.dtype

    def excl_prefix(t):
        c = torch.cumsum(t.to(acc), 0)
        return c - t.to(acc)

    def excl_suffix(t):
        c = torch.flip(torch.cumsum(torch.flip(t.to(acc), (0,)), 0), (0,))
        return c - t.to(acc)

    m = mus.to(acc)
    low = excl_prefix(ys * lf) - m * excl_prefix(as_ * lf)  # breakpoints below mu: (y_j - mu a_j) lo_j
    high = excl_suffix(ys * uf) - m * excl_suffix(as_ * uf)  # breakpoints above mu: (y_j - mu a_j) hi_j
    g = b.to(acc) * m + low + high
    big = torch.full_like(mus, float("inf"))
    m_lo = torch.where(linf, mus, big).min()  # entries with lo = -inf forbid mu > their breakpoint
    m_hi = torch.where(uinf, mus, -big).max()  # entries with hi = +inf forbid mu < their breakpoint
    # breakpoints equal up to rounding count as ties (y parallel to a on those entries), as in set tests
    tol = 8 * feasible_tol(v, v.numel())
    ok = (mus <= m_lo + tol * m_lo.abs()) & (mus >= m_hi - tol * m_hi.abs())
    g = torch.where(ok, g, torch.full_like(g, float("inf")))
    return g.min().to(v.dtype)


def _tree_total_abs(leaves, dims):
    from ._tree import reduce_except

    return total([reduce_except(x, d, "abssum") for x, d in zip(leaves, dims)], leaves)


def _dual_ball_table() -> dict[type, Any]:
    """Norms whose conjugate is the indicator of the dual-norm ball of radius ``reg``: their
    conjugate's prox is that projection (Moreau's ``x - t prox(x / t)`` cancels at large ``|x|``)."""
    from . import norms, projections

    return {
        norms.l2: lambda op: projections.l2_ball(op.reg),
        norms.l1: lambda op: projections.linf_ball(op.reg),
        norms.linf: lambda op: projections.l1_ball(op.reg),
    }


_DUAL_BALL: dict[type, Any] = _dual_ball_table()

#: Filled at import: a plain dict that dynamo reads as a constant. (A dict subclass filling
#: itself on first ``get`` looked empty to torch 2.11's dynamo when the first lookup was traced.)
_CONJ: dict[type, Any] = _conj_table()
