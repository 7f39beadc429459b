"""Operators built from operators: identity, chain, and partition of a model's parameters.

References: Parikh & Boyd (2014) section 2.2 (separable sums) and section 2.3 (composition).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._base import Hyper, Prox, _is_compiling, check_step
from ._tree import flatten, total
from ._util import zeros_like_value

__all__ = ["identity", "chain", "partition"]


class identity(Prox):  # noqa: N801
    """The prox of ``f = 0``: ``op(x, t) = x``. The same tensors come back (nothing is copied)."""

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
    """

    _fields = ("ops",)
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

    def __reduce__(self):
        return (chain, self.ops)


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

    Parameters no rule matches pass through unchanged (the same tensors). With
    ``strict=True`` (default) a rule that matches nothing, or a tuple entry that does not match
    exactly one name, raises ``ValueError``; a name claimed by two rules always does (the
    blocks of a separable sum must be disjoint). ``value`` is the sum of the rules' values.

    Example (the auto-sizing rule of the seed, neuron i = row i of the weight and bias)::

        prox = pf.partition({
            ("linear1.weight", "linear1.bias"): pf.linf1(0.005),
            "*.weight": pf.l2(1e-4),          # error: linear1.weight is claimed twice
        })

    Parikh & Boyd (2014) section 2.1 (separable sum).
    """

    _fields = ("rules", "strict")
    _public_name = "partition"

    def __init__(self, rules: Mapping[Key, Prox] | Iterable[tuple[Key, Prox]], *, strict: bool = True):
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

    def __reduce__(self):
        return (_rebuild_partition, (self.rules, self.strict))

    # ------------------------------------------------------------------ resolution
    def resolve(self, names: Iterable[str]) -> list[tuple[Key, tuple[str, ...], Prox]]:
        """Which names each rule takes: ``[(key, names, op), ...]`` for a given name list.

        A string rule yields one entry per matched name (its tensor alone); a tuple rule
        yields one entry holding all of its names (one joint argument).
        """
        names = tuple(names)
        cache = self.__dict__.get("_cache_resolve")
        if cache is not None and cache[0] == names:
            return cache[1]
        keys = tuple(key for key, _ in self.rules)
        # A pure function of (rule keys, strict, names), evaluated once at trace time under
        # torch.compile (the glob matching is plain Python that dynamo need not trace).
        idx = _resolve_plan(keys, self.strict, names)
        plan = [(self.rules[i][0], group, self.rules[i][1]) for i, group in idx]
        if not _compiling():
            object.__setattr__(self, "_cache_resolve", (names, plan))
        return plan

    def _mapping(self, params: Any) -> Mapping[str, Any]:
        if not isinstance(params, Mapping):
            raise TypeError(
                "partition: params must be a mapping from parameter names to tensors "
                f"(e.g. dict(model.named_parameters())), got {type(params).__name__}"
            )
        for k in params:
            if not isinstance(k, str):
                raise TypeError(f"partition: params keys must be strings, got {k!r}")
        return params

    # --------------------------------------------------------------------- operator
    def __call__(self, params: Any, step: Hyper = 1.0) -> Any:
        step = check_step("partition", step)
        params = self._mapping(params)
        out = dict(params)
        # A separable operator gives the same result on each tensor alone or on all of them
        # together, so the tensors a pattern rule matches go through one call (one
        # validation and one batched loop instead of one operator call per tensor).
        batches: dict[int, tuple[Prox, list[str]]] = {}
        for key, names, op in self.resolve(params.keys()):
            if isinstance(key, str):
                v = params[names[0]]
                if op.separable and isinstance(v, torch.Tensor) and v.is_floating_point():
                    batches.setdefault(id(op), (op, []))[1].append(names[0])
                else:
                    out[names[0]] = op(v, step)
            else:
                new = op(tuple(params[n] for n in names), step)
                for n, v in zip(names, new):
                    out[n] = v
        for op, names in batches.values():
            new = op([params[n] for n in names], step) if len(names) > 1 else [op(params[names[0]], step)]
            for n, v in zip(names, new):
                out[n] = v
        if type(params) is dict:
            return out
        try:
            return type(params)(out)
        except TypeError:
            return out

    def value(self, params: Any) -> torch.Tensor:
        params = self._mapping(params)
        vals = []
        for key, names, op in self.resolve(params.keys()):
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
    compiler = getattr(torch, "compiler", None)  # torch >= 2.1
    return compiler.assume_constant_result(fn) if hasattr(compiler, "assume_constant_result") else fn


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


def _compiling() -> bool:
    return _is_compiling()


def _rebuild_partition(rules, strict):
    return partition(rules, strict=strict)


def _known(names: tuple[str, ...]) -> str:
    shown = ", ".join(repr(n) for n in names[:8])
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"known names: {shown}{more}" if names else "params is empty"
