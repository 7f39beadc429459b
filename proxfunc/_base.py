"""The operator type and argument validation shared by every proximal operator.

An operator is an immutable value ``op`` with

* ``op(params, step)``: ``argmin_z f(z) + ||z - params||^2 / (2 * step)`` for a tensor or
  any pytree of tensors (``torch.utils._pytree``), returned as a new tree of the same
  structure, shapes, dtypes and devices; ``params`` is never written to;
* ``op.value(params)``: ``f(params)`` as a 0-d tensor (``inf`` outside a constraint set).

Subclasses implement ``_prox(leaves, step, tree)`` and ``_value(leaves, tree)`` on the
flattened leaves; this module owns flattening, validation of ``step`` and of the
hyperparameters, equality, hashing and ``repr``.

This is the lowest layer of proxfunc: it imports nothing from the rest of the package
except :mod:`proxfunc._tree` and :mod:`proxfunc._dist` (DTensor leaves: see there).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from . import _dist, _tree

__all__ = ["Prox", "Hyper", "is_concrete", "check_hyper", "check_step"]

Hyper = float | torch.Tensor

_PLAIN_TENSORS = _dist.PLAIN_TENSORS


def _compiling_probe() -> Any:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling
    from torch import _dynamo  # torch < 2.3

    return _dynamo.is_compiling


# Looked up once: dynamo constant-folds a call of this function, where torch 2.1's dynamo
# could not trace the lookup itself (it refused ``module is not None``).
_compiling = _compiling_probe()


def _is_compiling() -> bool:
    return bool(_compiling())


def is_concrete(t: torch.Tensor) -> bool:
    """True when ``t`` holds real values that may be read on the host.

    False while tracing with ``torch.compile``, for fake/meta tensors, for tensors
    wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``...), where reading
    a value would break the graph or is not allowed, and for DTensors (a rank's local
    values are a shard, or a partial sum, not the tensor's).
    """
    if _is_compiling() or t.device.type == "meta":
        return False
    if _dist.is_dtensor(t):  # a rank holds a shard: its local values are not the tensor's
        return False
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.is_functorch_wrapped_tensor(t):
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return True
    return not is_fake(t)


def check_hyper(
    owner: str,
    name: str,
    value: Any,
    *,
    min_value: float | None = 0.0,
    strict: bool = False,
    allow_inf: bool = False,
    scalar: bool = True,
) -> Hyper:
    """Validate one hyperparameter; return it as a Python float or a floating tensor.

    ``min_value``/``strict`` bound it below (``>= min_value``, or ``> min_value`` when
    ``strict``); ``None`` disables the bound. NaN is always refused; ``inf`` unless
    ``allow_inf``. Tensors are checked by value only when their values are concrete
    (not under ``torch.compile`` tracing or inside a ``torch.func`` transform), so a
    hyperparameter may be a batched or grad-tracking tensor. ``scalar`` requires 0-d.
    """
    where = f"{owner}: {name}"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{where} must be a real number or a floating tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{where} must be a floating tensor, got dtype {value.dtype}")
        if scalar and value.dim() != 0:
            raise ValueError(f"{where} must be a 0-d tensor, got shape {tuple(value.shape)}")
        if not is_concrete(value):
            return value
        if value.dim() == 0:  # one read on the host, then the checks of a number
            _check_number(where, float(value.detach()), min_value, strict, allow_inf)
            return value
        with torch.no_grad():
            v = value.detach()
            if bool(torch.isnan(v).any()):
                raise ValueError(f"{where} must not be NaN")
            if not allow_inf and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{where} must be finite")
            if min_value is not None:
                bad = (v <= min_value) if strict else (v < min_value)
                if bool(bad.any()):
                    op = ">" if strict else ">="
                    raise ValueError(f"{where} must be {op} {min_value}, got {_short(v)}")
        return value
    f = float(value)
    _check_number(where, f, min_value, strict, allow_inf)
    return f


def _check_number(where: str, f: float, min_value: float | None, strict: bool, allow_inf: bool) -> None:
    # comparisons, not math.isnan/isinf: traced with a changing value, a float is symbolic
    if f != f:
        raise ValueError(f"{where} must not be NaN")
    if not allow_inf and abs(f) == math.inf:
        raise ValueError(f"{where} must be finite, got {f}")
    if min_value is not None and (f <= min_value if strict else f < min_value):
        op = ">" if strict else ">="
        raise ValueError(f"{where} must be {op} {min_value}, got {f}")


def check_step(owner: str, step: Any) -> Hyper:
    """Validate the prox step: a positive finite float, or a positive 0-d floating tensor."""
    return check_hyper(owner, "step", step, min_value=0.0, strict=True)


def _short(t: torch.Tensor) -> str:
    return repr(t.item()) if t.numel() == 1 else f"tensor of shape {tuple(t.shape)}"


def _key(v: Any) -> Any:
    # Tensors compare and hash by identity (their values may change in place); everything
    # else by value. This keeps operators usable as dict keys and as torch.compile constants.
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v))
    if isinstance(v, list):
        return tuple(_key(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _key(x)) for k, x in v.items()))
    if isinstance(v, tuple):
        return tuple(_key(x) for x in v)
    return v


class Prox:
    """Base class of every proximal operator.

    ``op(params, step)`` returns ``argmin_z f(z) + ||z - params||^2 / (2 * step)`` and
    ``op.value(params)`` returns ``f(params)``. Instances are immutable; two operators
    are equal when they are of the same type with equal hyperparameters (tensor
    hyperparameters compare by identity).

    Subclass contract: set ``_hyper_names`` to the names of the hyperparameters (stored as
    attributes of the same names, in ``__init__`` via :meth:`_set`) and implement
    ``_prox(leaves, step, tree)`` and ``_value(leaves, tree)``. ``leaves`` is the list of
    validated floating tensors, ``tree`` a :class:`proxfunc._tree.Tree` (structure, leaf
    paths) and ``step`` a validated float or 0-d tensor.
    """

    _hyper_names: ClassVar[tuple[str, ...]] = ()
    #: Projections (prox of an indicator) ignore ``step``.
    is_projection: ClassVar[bool] = False
    #: The prox acts on each element separately (leaf structure does not matter).
    separable: ClassVar[bool] = False

    # ------------------------------------------------------------------ public API
    def __call__(self, params: Any, step: Hyper = 1.0) -> Any:
        """``argmin_z f(z) + ||z - params||^2 / (2 * step)``, a new pytree shaped like ``params``.

        Args:
            params: a tensor or any pytree of floating tensors (``None`` leaves pass through);
                never written to.
            step: the prox step, a positive float or a positive 0-d floating tensor. It is
                ``1.0`` when left out: ``op(x)`` is ``op(x, 1.0)``; in a training loop pass the
                learning rate. Projections validate it and ignore it.

        Returns:
            The same structure, shapes, dtypes and devices as ``params``.

        Example:
            >>> import torch, proxfunc as pf
            >>> x = torch.tensor([3.0, -0.5])
            >>> pf.l1(1.0)(x)                 # step 1.0
            tensor([2., -0.])
            >>> pf.l1(1.0)(x, 0.1)
            tensor([ 2.9000, -0.4000])
        """
        step = check_step(self._name(), step)
        leaves, tree = _tree.flatten(params, self._name())
        if _dist.classify(leaves, self._name(), lambda: tree.paths):
            return tree.unflatten(_dist.restore(_on_dtensors(lambda: self._prox(leaves, step, tree)), leaves))
        out = self._prox(leaves, step, tree)
        return tree.unflatten(out)

    def value(self, params: Any) -> torch.Tensor:
        """``f(params)`` as a 0-d tensor (``inf`` outside the domain or constraint set).

        On DTensor leaves: a Replicate 0-d DTensor, the same number on every rank.
        """
        leaves, tree = _tree.flatten(params, self._name())
        if _dist.classify(leaves, self._name(), lambda: tree.paths):
            return _dist.replicated(_on_dtensors(lambda: self._value(leaves, tree)))
        return self._value(leaves, tree)

    # ----------------------------------------------------------- subclass hooks
    def _prox(self, leaves: list[torch.Tensor], step: Hyper, tree: _tree.Tree) -> list[torch.Tensor]:
        raise NotImplementedError

    def _value(self, leaves: list[torch.Tensor], tree: _tree.Tree) -> torch.Tensor:
        raise NotImplementedError

    def _prox_batch(self, args: list[Any], step: Hyper, in_place: bool) -> Callable[[], Any] | None:
        """The one hook for several arguments at once and for writing in place.

        Returns a prepared computation of ``[self(a, step) for a in args]`` (each argument a
        tensor or a pytree of tensors, taken on its own: the tensors of a
        :func:`proxfunc.partition` pattern rule, or the one target of
        :func:`proxfunc.compat.apply_`), or ``None`` when the operator has none for these
        arguments; callers then call ``self(a, step)`` for each, and the in-place layer copies
        the results into the tensors.

        ``in_place=False``: calling it returns the list of new values. ``in_place=True``:
        calling it overwrites the arguments' tensors with their new values and returns
        nothing; every check is made when it is prepared, so calling it cannot fail (the
        in-place layer prepares everything before it writes anything). ``step`` is validated.
        Which implementation runs is decided by :func:`proxfunc.dispatch.select`.

        By default a separable operator prox-es a list of floating tensors in one call (its
        prox of the list is the list of its proxes).
        """
        if in_place or not self.separable or len(args) < 2:
            return None
        if not all(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args):
            return None
        return lambda: list(self(list(args), step))

    def _leaves_of(self, args: list[Any]) -> list[torch.Tensor]:
        """The floating tensors of every argument, with the checks of a call on each."""
        if all(type(a) in _PLAIN_TENSORS for a in args) and all(map(torch.Tensor.is_floating_point, args)):
            return list(args)  # a pattern rule's tensors: nothing to flatten or refuse
        out: list[torch.Tensor] = []
        for a in args:
            out += _tree.flatten(a, self._name())[0]
        return out

    # ---------------------------------------------------------------- plumbing
    def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_cache"):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"{type(self).__name__} is immutable; make a new operator instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _name(self) -> str:
        return getattr(self, "_public_name", type(self).__name__)

    def _params(self) -> tuple[tuple[str, Any], ...]:
        return tuple((k, getattr(self, k)) for k in self._hyper_names)

    def __repr__(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                if v.numel() == 1 and is_concrete(v):
                    return f"tensor({v.item():g})"
                return f"tensor(shape={tuple(v.shape)})"
            if isinstance(v, float):
                return f"{v:g}"
            return repr(v)

        args = ", ".join(f"{k}={fmt(v)}" for k, v in self._params())
        return f"{self._name()}({args})"

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return _key(self._params()) == _key(other._params())  # type: ignore[union-attr]

    def __hash__(self) -> int:
        try:
            params = self._params()
        except AttributeError:  # not initialised yet: torch 2.11's dynamo hashes a new object
            return hash(type(self))  # before tracing its __init__ (an operator made in a compiled step)
        return hash((type(self), _key(params)))

    def __reduce__(self):  # pickling (optimizer state_dicts may hold operators)
        return (_rebuild, (type(self), dict(self._params())))


def _on_dtensors(fn: Callable[[], Any]) -> Any:
    """``fn()`` on DTensor leaves: through :func:`proxfunc._dist.call` eagerly; traced, as it is
    (the caller scopes implicit replication there, if the operator needs it)."""
    return fn() if _is_compiling() else _dist.call(fn)


def _rebuild(cls: type, fields: dict[str, Any]) -> Prox:
    # ``_hyper_names`` are the constructor's keyword arguments by convention.
    return cls(**fields)
