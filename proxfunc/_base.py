"""The operator type and argument validation shared by every proximal operator.

An operator is an immutable value ``op`` with

* ``op(params, step=1.0)``: ``argmin_z f(z) + ||z - params||^2 / (2 * step)`` for a tensor or
  any pytree of tensors (``torch.utils._pytree``), returned as a new tree of the same
  structure, shapes, dtypes and devices; ``params`` is never written to;
* ``op.value(params)``: ``f(params)`` as a 0-d tensor (``inf`` outside a constraint set).

Subclasses implement ``_prox(leaves, step, tree)`` and ``_value(leaves, tree)`` on the
flattened leaves; this module owns flattening, validation of ``step`` and of the
hyperparameters, equality, hashing, ``repr`` and serialisation (``to_state``/``from_state``,
pickling, ``torch.load(weights_only=True)``).

This is the lowest layer of proxfunc: it imports nothing from the rest of the package
except :mod:`proxfunc._tree` and :mod:`proxfunc._dist` (DTensor leaves: see there).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from . import _dist, _tree

__all__ = ["Prox", "Hyper", "is_concrete", "check_hyper", "check_hyper_tree", "is_scalar_hyper", "check_step"]

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


_functorch_c = getattr(torch._C, "_functorch", None)
_level = getattr(_functorch_c, "maybe_current_level", None)
_is_functional = getattr(torch, "_is_functional_tensor", lambda t: True)  # unknown: the long way


def _no_transform() -> bool:
    """No ``torch.func`` transform is running (unknown on a torch without the probe: False)."""
    return _level is not None and _level() is None


def is_concrete(t: torch.Tensor) -> bool:
    """True when ``t`` holds real values that may be read on the host.

    False while tracing with ``torch.compile``, for fake/meta tensors, for tensors
    wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``...), where reading
    a value would break the graph or is not allowed, and for DTensors (a rank's local
    values are a shard, or a partial sum, not the tensor's).
    """
    if _is_compiling() or t.is_meta:
        return False
    if type(t) in _PLAIN_TENSORS and _no_transform() and not _is_functional(t):
        return True  # a plain tensor outside every torch.func transform: no wrapper, not fake
    if _dist.is_dtensor(t):  # a rank holds a shard: its local values are not the tensor's
        return False
    if _functorch_c is not None and _functorch_c.is_functorch_wrapped_tensor(t):
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
    if type(value) is float:  # the common case, without the checks of other types
        _check_number(f"{owner}: {name}", value, min_value, strict, allow_inf)
        return value
    where = f"{owner}: {name}"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{where} must be a real number or a floating tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where} must be a dense (strided) tensor, got layout {value.layout}")
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


def check_hyper_tree(owner: str, name: str, value: Any, **kw: Any) -> Any:
    """Validate a hyperparameter that may vary over the entries of ``params``.

    A Python number or a floating tensor of any shape (it must broadcast against each leaf it
    applies to; checked at the call), or a pytree (dict, list, tuple) of those with the
    structure of ``params`` (one value per leaf). Each value is checked as by
    :func:`check_hyper` (``kw``: its bounds); the validated value or tree is returned.
    """
    if isinstance(value, (dict, list, tuple)):
        leaves, spec = pytree.tree_flatten(value)
        if not leaves:
            raise ValueError(f"{owner}: {name} is an empty pytree")
        out = [None if v is None else check_hyper(owner, name, v, scalar=False, **kw) for v in leaves]
        return pytree.tree_unflatten(out, spec)
    return check_hyper(owner, name, value, scalar=False, **kw)


def is_scalar_hyper(value: Any) -> bool:
    """A Python number or a 0-d tensor: one value for every entry."""
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


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
    # The hash key of a hyperparameter. A tensor contributes its metadata only (dtype, shape,
    # device), never its values: hashing reads nothing from a device, and stays the same when
    # the values change in place. Everything else contributes its value.
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), v.device)
    if isinstance(v, list):
        return tuple(_key(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _key(x)) for k, x in v.items()))
    if isinstance(v, tuple):
        return tuple(_key(x) for x in v)
    return v


def _holds_tensor(v: Any) -> bool:
    """A tensor among the hyperparameters ``v`` (operators inside included)."""
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, Prox):
        return _holds_tensor(v._params())
    if isinstance(v, (tuple, list)):
        return any(map(_holds_tensor, v))
    if isinstance(v, dict):
        return any(map(_holds_tensor, v.values()))
    return False


def _same(a: Any, b: Any) -> bool:
    """Hyperparameters ``a`` and ``b`` are equal: tensors by value (same dtype, shape and
    device, equal entries; a tensor whose values may not be read, traced or a DTensor, only
    equals itself), containers entry by entry, everything else by ``==``."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if not (is_concrete(a) and is_concrete(b)):
            return False
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


class Prox:
    """Base class of every proximal operator.

    ``op(params, step=1.0)`` returns ``argmin_z f(z) + ||z - params||^2 / (2 * step)`` and
    ``op.value(params)`` returns ``f(params)``. ``step`` defaults to ``1.0``: ``op(x)`` is
    the prox of ``f`` itself; pass the step of your method (the learning rate of a
    proximal-gradient step) explicitly.

    ``params`` is a floating tensor or any pytree of them (``torch.utils._pytree``: dicts,
    lists, tuples, named tuples, e.g. ``dict(model.named_parameters())`` or a
    ``state_dict``). ``None`` leaves (a layer without bias) and buffers (integer and bool
    tensors, e.g. a ``state_dict``'s ``num_batches_tracked``) come back unchanged, the same
    objects, and take part in no group, norm or value; the in-place layer
    (:func:`proxfunc.compat.apply_`) and :func:`proxfunc.partition` (whose rules match no
    buffer) follow the same rule. ``params`` that is itself an integer or bool tensor, or
    holds such tensors and no floating one, and complex or non-tensor leaves raise
    ``TypeError``.

    Instances are immutable values. Two operators are equal when they are of the same type
    with equal hyperparameters; tensor hyperparameters are equal when they have the same
    dtype, shape and device and equal values (compared when ``==`` is evaluated: one read of
    each tensor, so comparing operators with CUDA tensor hyperparameters synchronises; a
    traced or DTensor hyperparameter equals only itself). ``hash`` reads no tensor values
    (tensors contribute dtype, shape and device), so hashing is cheap and stays valid when a
    tensor hyperparameter changes in place; equal operators hash equal.

    Serialisation: ``pickle``, ``copy.deepcopy`` and ``torch.save`` store an operator as
    plain data (:meth:`to_state`) and rebuild it through its constructor, as an equal
    operator (tensor hyperparameters become copies). ``torch.load(f)`` with its default
    ``weights_only=True`` loads operators: ``import proxfunc`` registers one allowed global
    (with ``torch.serialization.add_safe_globals``, torch >= 2.4), a function that builds
    only subclasses of :class:`Prox` defined in the process, from plain data and tensors.
    For a state dict without any allowed global, store ``op.to_state()`` and rebuild with
    :meth:`Prox.from_state` (:class:`proxfunc.compat.ProxOptimizer` does so for its
    param groups' operators)::

        import io, torch, proxfunc as pf

        op = pf.chain(pf.l1(0.1), pf.l21(torch.tensor(0.5)))
        buf = io.BytesIO()
        torch.save(op, buf)
        buf.seek(0)
        assert torch.load(buf) == op
        assert pf.Prox.from_state(op.to_state()) == op

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
            params: a tensor or any pytree of floating tensors; never written to. ``None``
                leaves and integer/bool tensor leaves (buffers such as ``num_batches_tracked``)
                come back as they are.
            step: the prox step, a positive float or a positive 0-d floating tensor; it
                defaults to ``1.0``: ``op(x)`` is ``op(x, 1.0)``; in a training loop pass the
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
        if leaves:
            self._check_placement(leaves, tree, step)
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

    #: Every leaf must be on one device (False: the operator splits its leaves among operators
    #: that check their own, as :func:`proxfunc.partition` does for model-parallel layers).
    _one_device: ClassVar[bool] = True

    def _check_placement(self, leaves: list[torch.Tensor], tree: _tree.Tree, step: Hyper) -> None:
        """Clear errors for what ATen would refuse with its own message: a sparse (or other
        non-strided) leaf, leaves on several devices (a non-separable operator), a sparse tensor
        step or hyperparameter, and one on the meta device with real leaves."""
        dev = leaves[0].device
        for i, x in enumerate(leaves):
            if x.layout != torch.strided:
                where = f"{self._name()}: params{tree.paths[i]}"
                raise TypeError(f"{where} must be a dense (strided) tensor, got {x.layout}")
            if x.device != dev and self._one_device and not self.separable:
                raise ValueError(
                    f"{self._name()}: params{tree.paths[i]} is on {x.device} but params{tree.paths[0]} on {dev}; "
                    "every tensor of one call must be on the same device"
                )
        named = [("step", step), *self._params()] if isinstance(step, torch.Tensor) else self._params()
        for name, h in named:
            if isinstance(h, torch.Tensor):
                if h.layout != torch.strided:
                    raise TypeError(f"{self._name()}: {name} must be a dense (strided) tensor, got {h.layout}")
                if h.device.type == "meta" and dev.type != "meta":  # no values to compute with
                    raise ValueError(f"{self._name()}: {name} is on {h.device} but params on {dev}")

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
        if set(map(type, args)) <= _PLAIN_TENSORS and all(map(torch.Tensor.is_floating_point, args)):
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
            if isinstance(v, dict):  # a pytree hyperparameter: its values, formatted
                return "{" + ", ".join(f"{k!r}: {fmt(x)}" for k, x in v.items()) + "}"
            if isinstance(v, (list, tuple)) and any(isinstance(x, (torch.Tensor, float)) for x in v):
                inner = ", ".join(fmt(x) for x in v)
                return f"[{inner}]" if isinstance(v, list) else f"({inner})"
            return repr(v)

        args = ", ".join(f"{k}={fmt(v)}" for k, v in self._params())
        return f"{self._name()}({args})"

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return self is other or _same(self._params(), other._params())  # type: ignore[union-attr]

    def _batch_key(self) -> Any:
        """The key under which operators share one computation (:func:`proxfunc.partition` makes
        one batch of the rules of equal operators, arranged once per key set): the operator
        itself, equal by value, when no hyperparameter is a tensor; otherwise its identity, since
        a tensor's values may change in place after the batches were arranged."""
        holds = self.__dict__.get("_cache_holds_tensor")
        if holds is None:
            holds = _holds_tensor(self._params())
            object.__setattr__(self, "_cache_holds_tensor", holds)
        return ("id", id(self)) if holds else self

    def __hash__(self) -> int:
        try:
            params = self._params()
        except AttributeError:  # not initialised yet: torch 2.11's dynamo hashes a new object
            return hash(type(self))  # before tracing its __init__ (an operator made in a compiled step)
        return hash((type(self), _key(params)))

    # ----------------------------------------------------------- serialisation
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[_state_name(cls)] = cls

    def to_state(self) -> dict[str, Any]:
        """The operator as plain data: ``{"__prox__": name, "hyper": {hyperparameter: value}}``.

        ``name`` is the public name of a proxfunc operator (``"l21"``) or ``module.qualname`` of
        another subclass; values are numbers, strings, bools, ``None``, tensors, and tuples,
        lists and dicts of them; an operator inside (``chain``, ``partition``, ``scale``...) is
        itself such a dict. ``torch.load(..., weights_only=True)`` reads it without any allowed
        global. :meth:`from_state` builds the operator back.
        """
        return {"__prox__": _state_name(type(self)), "hyper": {k: _encode(v) for k, v in self._params()}}

    @classmethod
    def from_state(cls, state: Any) -> Prox:
        """The operator that :meth:`to_state` described (an equal one).

        Only operator classes can be built: the ones of proxfunc and any subclass of
        :class:`Prox` defined in this process (define or import it before loading), from
        hyperparameters that are plain data and tensors, through the class's constructor (which
        validates them). Called on a subclass, the result must be an instance of it.
        """
        op = _decode(state)
        if not isinstance(op, Prox):
            raise ValueError(f"Prox.from_state: state must be a dict made by Prox.to_state, got {type(state).__name__}")
        if not isinstance(op, cls):
            raise TypeError(f"{cls.__name__}.from_state: state describes a {type(op).__name__}")
        return op

    def __reduce__(self):
        # pickle, copy, deepcopy and torch.save: plain data rebuilt by one allowed global
        return (_from_state, (self.to_state(),))


def _on_dtensors(fn: Callable[[], Any]) -> Any:
    """``fn()`` on DTensor leaves: through :func:`proxfunc._dist.call` eagerly; traced, as it is
    (the caller scopes implicit replication there, if the operator needs it)."""
    return fn() if _is_compiling() else _dist.call(fn)


# ------------------------------------------------------------------------- serialisation
#: Every subclass of Prox by its state name (:func:`_state_name`), filled as classes are defined.
_REGISTRY: dict[str, type] = {}
_STATE_KEYS = frozenset(("__prox__", "hyper"))


def _state_name(cls: type) -> str:
    public = cls.__dict__.get("_public_name")
    if public is not None and cls.__module__.split(".")[0] == "proxfunc":
        return public
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(v: Any) -> Any:
    if isinstance(v, Prox):
        return v.to_state()
    if isinstance(v, (tuple, list)):
        return type(v)(_encode(x) for x in v)
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


def _decode(v: Any) -> Any:
    if type(v) is dict and v.keys() == _STATE_KEYS:
        return _build(v["__prox__"], v["hyper"])
    if isinstance(v, (tuple, list)):
        return type(v)(_decode(x) for x in v)
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    return v


def _build(name: Any, hyper: Any) -> Prox:
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"Prox.from_state: unknown operator {name!r}; an operator class must be defined (its module "
            "imported) before an operator of it is loaded"
        )
    if not isinstance(hyper, dict) or set(hyper) != set(cls._hyper_names):
        got = sorted(hyper) if isinstance(hyper, dict) else type(hyper).__name__
        raise ValueError(f"Prox.from_state: {name} takes hyperparameters {list(cls._hyper_names)}, got {got}")
    fields = {k: _decode(x) for k, x in hyper.items()}
    args: list[Any] = []
    star = _star_arg(cls)  # ``chain(*ops)``: a hyperparameter taken as the positional arguments
    if star is not None:
        args = list(fields.pop(star))
    return cls(*args, **fields)


def _star_arg(cls: type) -> str | None:
    """The name of ``cls.__init__``'s ``*args`` when it is one of the hyperparameters."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a constructor without a signature
        return None
    star = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    return star if star in cls._hyper_names else None


def _from_state(state: dict[str, Any]) -> Prox:
    """Unpickling an operator: :meth:`Prox.from_state` (allowed for ``torch.load(weights_only=True)``)."""
    return Prox.from_state(state)


def _allow_in_weights_only_load() -> None:
    """Let ``torch.load(..., weights_only=True)`` rebuild operators: one allowed global, which
    builds nothing but operator classes (torch >= 2.4; older torch loads them with
    ``weights_only=False``)."""
    add = getattr(getattr(torch, "serialization", None), "add_safe_globals", None)
    if add is not None:
        add([_from_state])


_allow_in_weights_only_load()
