"""In-place use of proxfunc operators: modules, state_dicts, the seed's API, optimizers.

This is the only part of proxfunc that writes into tensors. Every write happens under
``torch.no_grad()`` and is all-or-nothing: all new values are computed (and checked) before
the first one is copied, so an exception leaves every tensor as it was.

Migrating from ProxGradPyTorch is one import line::

    import proxfunc.compat as pg          # instead of: import proximalGradient as pg
    pg.linf1(model.linear1.weight, model.linear1.bias, reg=0.005)

The drop-ins keep the seed's signatures ``(parameter, bias=None, reg=0.01, lr=0.1)`` and
apply, in place, the exact prox of ``reg * g`` with step ``lr`` to ``parameter`` (and
``bias``, which joins row ``i`` of ``parameter`` in group ``i`` for the group penalties).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _facts
from . import groups as _groups
from . import norms as _norms
from ._base import _PLAIN_TENSORS, Hyper, Prox, _is_compiling, check_step
from ._dist import dtensor_class
from .calculus import partition

__all__ = [
    "apply_",
    "ProxOptimizer",
    "l1",
    "l2",
    "l21",
    "linf",
    "linf1",
    "elasticnet",
    "logbarrier",
]


def _targets(target: Any) -> tuple[Any, list[Any], list[torch.Tensor], _facts.Facts | None]:
    """The pytree of tensors handed to the operator and written into, the keys and the tensors
    written into (two lists, in one order), and the tensors' :class:`proxfunc._facts.Facts`
    when they were asked (else ``None``).

    The tensors themselves, not detached copies: ``apply_`` runs under ``torch.no_grad()``,
    so nothing is recorded, and an operator handing a tensor back unchanged is recognised
    by identity.
    """
    if isinstance(target, nn.Module):
        names, tensors = _named_parameters(target)
        return dict(zip(names, tensors)), names, tensors, None
    if isinstance(target, torch.Tensor):
        return target, [0], [target], None
    if isinstance(target, Mapping):
        values = list(target.values())
        facts = _facts.of(values)
        if facts.floating if facts is not None else _plain_floating(values):
            return dict(target), list(target), values, facts  # a module's or optimizer's parameters
        items = [(k, v) for k, v in target.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        # the operator sees the tree a functional call gets, integer/bool buffers included (it
        # passes them through: the same rule both ways, e.g. for a pytree group_dim)
        tree = {k: v for k, v in target.items() if isinstance(v, torch.Tensor) and not v.is_complex()}
        return tree, [k for k, _ in items], [v for _, v in items], None
    if isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        seq = tuple(target)
        for i, t in enumerate(seq):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"apply_: target[{i}] must be a tensor, got {type(t).__name__}")
        keys = [i for i, t in enumerate(seq) if t is not None]
        return seq, keys, [seq[i] for i in keys], None
    raise TypeError(
        "apply_: target must be an nn.Module, a state_dict (mapping of names to tensors), "
        f"a tensor or a sequence of tensors, got {type(target).__name__}"
    )


def _plain_floating(values: list[Any]) -> bool:
    """Every value a plain floating tensor (``Tensor`` or ``Parameter``)."""
    return set(map(type, values)) <= _PLAIN_TENSORS and all(map(_IS_FLOATING, values))


_MODULE_WALK = (nn.Module.named_parameters, nn.Module.named_modules, nn.Module._named_members)
_WALKABLE: set[type] = set()  # module classes that list parameters and submodules as nn.Module does


def _walkable(cls: type) -> bool:
    ok = (cls.named_parameters, cls.named_modules, cls._named_members) == _MODULE_WALK
    if ok:
        _WALKABLE.add(cls)
    return ok


def _named_parameters(module: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """``module.named_parameters()`` as two lists, names and tensors: the same names, tensors
    and order (pre-order, each tensor once, under its first name), walked directly:
    ``named_parameters()``'s generators cost a large part of an in-place step on a model of
    small layers. Modules that override how they list their parameters or submodules get
    ``named_parameters()`` itself."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", module)]
    pop, push = stack.pop, stack.append
    while stack:
        prefix, m = pop()
        cls = type(m)
        if cls not in _WALKABLE and not _walkable(cls):
            items = list(module.named_parameters())
            return [k for k, _ in items], [p for _, p in items]
        ps = m._parameters
        if ps:
            for k, p in ps.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    names.append(prefix + k)
                    tensors.append(p)
        ms = m._modules
        if ms:
            for k, c in reversed(ms.items()):
                if c is not None:
                    push((prefix + k + ".", c))
    return names, tensors


def _pairs(new: Any, old: Any, where: tuple = ()) -> list[tuple[torch.Tensor, torch.Tensor, tuple]]:
    """(tensor to write into, its new value, where) for every tensor the operator changed.

    A tensor handed back as it was given (left unchanged, or updated in place by a writer)
    has nothing to check or copy.
    """
    if isinstance(old, torch.Tensor):
        return [] if new is old else [(old, new, where)]
    if isinstance(old, Mapping):
        if all(isinstance(d, torch.Tensor) for d in old.values()):  # the common flat dict
            return [(d, new[k], (*where, k)) for k, d in old.items() if new[k] is not d]
        keys = old.keys()
    else:
        keys = [i for i, d in enumerate(old) if d is not None]
    out = []
    for k in keys:
        out += _pairs(new[k], old[k], (*where, k))
    return out


def apply_(op: Prox, target: Any, step: Hyper) -> Any:
    """Apply ``op`` in place: ``target <- op(target, step)``, all-or-nothing.

    ``target`` is an ``nn.Module`` (its ``named_parameters()``, as a dict keyed by name, the
    form :func:`proxfunc.partition` expects), a state_dict (its floating tensors, and its
    integer/bool buffers, which every operator passes through as in a functional call), a tensor,
    or a sequence of tensors (``None`` entries allowed, e.g. a missing bias). Returns
    ``target``. Nothing is written unless every new value was computed and has the shape,
    dtype and device of the tensor it replaces.

    l1, l21 and linf1 update eligible tensors themselves, with no new tensor and no copy
    (plain float32/float64 contiguous tensors of one dtype and device, nothing traced;
    :func:`proxfunc.dispatch.select` decides), alone and inside a ``partition`` (pattern and
    tuple rules): ``softshrink`` into each tensor, the group norms then a multiply, the
    thresholds then a clamp. They run after everything else is computed and checked, with
    the values of ``op(target, step)`` under the same implementation. When two tensors share
    memory (tied weights, overlapping views) every value is computed first and copied (a
    ``ValueError`` when ``op`` gives the shared memory two different values, e.g. a weight and
    its transpose view under ``l21``; an expanded, stride-0 target is refused), so
    nothing is shrunk twice.

    Distributed training: under ``DistributedDataParallel`` every rank holds whole tensors and
    applies the same prox to the same values (replicas stay equal). Under FSDP2
    (``fully_shard``) the parameters are ``DTensor`` shards: the operator computes on the
    DTensors (the reference implementation; a group spanning ranks takes its collectives),
    each new value is laid out as its target (``redistribute`` to the target's placements,
    before anything is written) and copied into each rank's own shard. Every rank must call
    ``apply_`` (as every rank calls ``optimizer.step()``); the result equals one process
    applying the prox to the whole tensors.
    """
    _prepare(op, target, step)()
    return target


def _prepare(op: Prox, target: Any, step: Hyper) -> Callable[[], None]:
    """Every computation and check of ``apply_(op, target, step)``; returns the commit (the copies
    and in-place writers), which cannot fail. :class:`ProxOptimizer` prepares every group before
    it commits any."""
    if not isinstance(op, Prox):
        raise TypeError(f"apply_: op must be a proxfunc operator, got {type(op).__name__}")
    params, keys, tensors, facts = _targets(target)
    if _is_compiling():  # traced: the graph computes the new values and copies them
        with torch.no_grad():
            traced = _pairs(op(params, step), params)

        def commit_traced() -> None:
            with torch.no_grad():
                for d, n, _ in traced:
                    d.copy_(n)

        return commit_traced
    grad = torch.is_grad_enabled()
    _set_grad_enabled(False)  # torch.no_grad(), without its context manager's cost
    try:
        if facts is None:
            facts = _facts.of(tensors)
        contiguous = facts.contiguous if facts is not None else all(map(_CONTIGUOUS, tensors))
        if not contiguous:  # no contiguous tensor overlaps itself
            _refuse_overlapping_elements(list(zip(keys, tensors)))
        # every value a floating tensor: the keys are what a partition would find asking each
        plain = facts is not None and facts.floating and isinstance(params, dict) and len(params) == len(keys)
        pairs, writers = _compute(op, params, step, keys if plain else None)
        # Refuse inference tensors and, when writers would update tensors in place, make sure
        # no two tensors share memory (with tied weights a writer would apply the prox twice):
        # then every value is computed first and copied.
        disjoint = _survey(zip(keys, tensors), overlap=True, tensors=tensors, contiguous=contiguous, facts=facts)
        if not disjoint and writers:
            pairs, writers = _pairs(op(params, step), params), []
        for i, (d, n, where) in enumerate(pairs):
            if type(d) not in _PLAIN_TENSORS or type(n) not in _PLAIN_TENSORS:
                n = _placed(d, n)  # a DTensor value laid out as its target (a collective if it moves)
                pairs[i] = (d, n, where)
            if n is None or n.shape != d.shape or n.dtype != d.dtype or n.device != d.device:
                at = "".join(f"[{k!r}]" for k in where) or "<tensor>"
                raise RuntimeError(f"apply_: {op!r} returned a mismatched value for {at}")  # pragma: no cover
        if not disjoint:
            _check_aliases(op, pairs, list(zip(keys, tensors)))
    finally:
        _set_grad_enabled(grad)

    def commit() -> None:
        # nothing below can fail, so the update is all-or-nothing
        grad = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            for d, n, _ in pairs:
                d.copy_(n)
            for w in writers:
                w()
        finally:
            _set_grad_enabled(grad)

    return commit


def _refuse_overlapping_elements(items: list[tuple[Any, torch.Tensor]]) -> None:
    """``ValueError`` for a target whose elements share memory (an ``expand``-ed, stride-0 tensor):
    no value can be written into it element by element."""
    for k, t in items:
        if type(t) in _PLAIN_TENSORS and t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"apply_: target[{k!r}] has elements that share memory (an expanded, stride-0 tensor); "
                "it cannot be written in place (clone() it first)"
            )


def _check_aliases(op: Prox, pairs: list, items: list[tuple[Any, torch.Tensor]]) -> None:
    """``ValueError`` when two targets share memory (tied weights, a weight and its transpose view)
    and ``op`` gives that memory two different values: which one would be kept depends on the
    order of the copies. Checked by trial: the copies are made, compared and undone."""
    if not pairs:
        return
    # the tensors sharing a storage with another one (real memory: not meta, not empty, not DTensors)
    by_storage: dict[int, list[tuple[Any, torch.Tensor]]] = {}
    for k, t in items:
        if type(t) in _PLAIN_TENSORS and t.numel() and t.device.type != "meta":
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((k, t))
    shared = [kt for group in by_storage.values() if len(group) > 1 for kt in group]
    if not shared:
        return
    ids = {id(t) for _, t in shared}
    saved = [(k, t, t.clone()) for k, t in shared]
    try:
        for d, n, _ in pairs:
            if id(d) in ids:
                d.copy_(n)
        bad = [where for d, n, where in pairs if id(d) in ids and not _same(d, n)]
        changed = {id(d) for d, _, _ in pairs}
        bad += [(k,) for k, t, c in saved if id(t) not in changed and not _same(t, c)]
    finally:
        for _, t, c in saved:
            t.copy_(c)
    if bad:
        at = "".join(f"[{k!r}]" for k in bad[0]) or "<tensor>"
        raise ValueError(
            f"apply_: targets share memory (tied or overlapping views) and {op!r} gives it different values "
            f"(at target{at}); apply the operator to one of the aliased tensors only"
        )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN."""
    if torch.equal(a, b):
        return True
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def _placed(d: torch.Tensor, n: Any) -> torch.Tensor | None:
    """The new value ``n`` for the target ``d``, ready to be copied: ``None`` (refused) unless
    both are DTensors or neither is (a DTensor target takes no plain value: what would be its
    shard?); a DTensor value in another layout (an operator's result placed as its ops left
    it, e.g. ``Replicate`` or ``Partial``) is redistributed to the target's mesh and
    placements before anything is written (local from ``Replicate``, a reduce-scatter from
    ``Partial``), so the copy writes each rank's own shard and cannot fail."""
    if not isinstance(n, torch.Tensor):
        return None
    dt = dtensor_class()
    if dt is None or not isinstance(d, dt):
        return None if dt is not None and isinstance(n, dt) else n
    if not isinstance(n, dt):
        return None
    if n.device_mesh != d.device_mesh or n.placements != d.placements:
        n = n.redistribute(d.device_mesh, d.placements)
    return n


def _compute(op: Prox, params: Any, step: Hyper, names: list[Any] | None = None) -> tuple[list, list]:
    """``(pairs to copy, writers)``: an operator may overwrite the tensors itself.

    The writers (no new tensor, no copy: what :meth:`Prox._prox_batch` prepares in place, for
    the whole target or per rule inside a partition) are handed out here and kept only if
    :func:`_survey` finds no two tensors sharing memory. ``names``: the keys of ``params``
    when every value is a floating tensor (what a partition would find asking each).
    """
    if isinstance(op, partition) and isinstance(params, Mapping):
        changed, writers = op._split(params, step, in_place=True, names=names)
        return [(params[k], v, (k,)) for k, v in changed.items() if v is not params[k]], writers
    writer = op._prox_batch([params], check_step(op._name(), step), True)
    if writer is not None:
        return [], [writer]
    return _pairs(op(params, step), params), []


def _survey(
    items: Iterable[tuple[Any, torch.Tensor]],
    overlap: bool,
    tensors: list[torch.Tensor] | None = None,
    contiguous: bool | None = None,
    facts: _facts.Facts | None = None,
) -> bool:
    """Raise ``ValueError`` for an inference tensor outside inference mode; with ``overlap``,
    return whether no two tensors share a byte of memory (ties, overlapping views).

    Conservative: a non-contiguous tensor claims its whole storage, and (for such targets) an
    empty tensor lying inside another's span counts as an overlap (the caller then computes and
    copies). ``facts``: the tensors' :class:`proxfunc._facts.Facts`, when the caller has them
    (their sizes, and the answer for the data pointers seen last).
    """
    if tensors is None:
        tensors = [t for _, t in items]
    if not torch.is_inference_mode_enabled() and (
        facts.inference if facts is not None else any(map(torch.Tensor.is_inference, tensors))
    ):
        k = next(k for k, t in items if t.is_inference())
        raise ValueError(
            f"apply_: target[{k!r}] is an inference tensor (made under torch.inference_mode()); "
            "it can only be written inside torch.inference_mode()"
        )
    if not overlap or len(tensors) < 2:
        return True
    if contiguous is None:
        contiguous = facts.contiguous if facts is not None else all(map(_CONTIGUOUS, tensors))
    if contiguous:  # each tensor's own bytes, read with C-level map
        starts = list(map(_DATA_PTR, tensors))
        if facts is not None:
            seen = facts.disjoint
            if seen is not None and seen[0] == starts:  # the same sizes at the same places
                return seen[1]
            ends = sorted(map(operator.add, starts, facts.nbytes))
        else:
            ends = sorted(map(operator.add, starts, map(_nbytes, tensors)))
        begins = sorted(starts)
        if begins[0] != 0:
            # Spans [b, e) are disjoint exactly when, both sorted, each end is at most the next
            # begin (at any address, the begins up to it minus the ends up to it count the spans
            # covering it): no pairing of begins with ends needed.
            disjoint = all(map(operator.le, ends[:-1], begins[1:]))
            if facts is not None:
                facts.disjoint = (starts, disjoint)
            return disjoint
        spans = []  # a DTensor or empty tensor among them: its local shard, below
    else:
        spans = sorted(map(_span, tensors))
    if not spans or spans[0][0] == 0:  # a DTensor (its own data_ptr() is 0) or an empty tensor: local shards
        spans = sorted(_span(_local(t)) for t in tensors)
    begins, ends = zip(*spans)
    return all(map(operator.le, ends[:-1], begins[1:]))  # each span ends before the next begins


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the memory this rank writes), any other tensor itself."""
    to_local = getattr(t, "to_local", None) if type(t) not in _PLAIN_TENSORS else None
    return t if to_local is None else to_local()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``t`` may touch: its own for a contiguous tensor, else its whole storage."""
    if t.is_contiguous():
        start = t.data_ptr()
        return start, start + _nbytes(t)
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


_CONTIGUOUS, _DATA_PTR, _IS_FLOATING = torch.Tensor.is_contiguous, torch.Tensor.data_ptr, torch.Tensor.is_floating_point
_set_grad_enabled = torch._C._set_grad_enabled

#: ``t.nbytes`` (torch >= 2.1: one attribute read) or ``numel * element_size`` (torch 2.0).
_nbytes = operator.attrgetter("nbytes") if hasattr(torch.Tensor, "nbytes") else (lambda t: t.numel() * t.element_size())


# ----------------------------------------------------------------- seed drop-ins
def _seed(make: Callable[[], Prox], parameter: torch.Tensor, bias: torch.Tensor | None, lr: Hyper) -> None:
    if not isinstance(parameter, torch.Tensor):
        raise TypeError(f"parameter must be a tensor, got {type(parameter).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    op = make()
    apply_(op, parameter if bias is None else (parameter, bias), lr)


def l1(parameter: torch.Tensor, bias: torch.Tensor | None = None, reg: Hyper = 0.01, lr: Hyper = 0.1) -> None:
    """In place: the prox of ``reg * ||(parameter, bias)||_1`` with step ``lr`` (soft thresholding)."""
    _seed(lambda: _norms.l1(reg), parameter, bias, lr)


def l2(parameter: torch.Tensor, bias: torch.Tensor | None = None, reg: Hyper = 0.01, lr: Hyper = 0.1) -> None:
    """In place: the prox of ``reg * ||(parameter, bias)||_2``, one norm over both tensors."""
    _seed(lambda: _norms.l2(reg), parameter, bias, lr)


def l21(parameter: torch.Tensor, bias: torch.Tensor | None = None, reg: Hyper = 0.01, lr: Hyper = 0.1) -> None:
    """In place: the prox of ``reg * sum_i ||(parameter[i, :], bias[i])||_2`` (rows are groups)."""
    _seed(lambda: _groups.l21(reg), parameter, bias, lr)


def linf(parameter: torch.Tensor, bias: torch.Tensor | None = None, reg: Hyper = 0.01, lr: Hyper = 0.1) -> None:
    """In place: the prox of ``reg * max |(parameter, bias)|`` over both tensors."""
    _seed(lambda: _norms.linf(reg), parameter, bias, lr)


def linf1(parameter: torch.Tensor, bias: torch.Tensor | None = None, reg: Hyper = 0.01, lr: Hyper = 0.1) -> None:
    """In place: the prox of ``reg * sum_i max |(parameter[i, :], bias[i])|`` (rows are groups)."""
    _seed(lambda: _groups.linf1(reg), parameter, bias, lr)


def elasticnet(
    parameter: torch.Tensor,
    bias: torch.Tensor | None = None,
    reg: Hyper = 0.01,
    lr: Hyper = 0.1,
    gamma: Hyper = 1.0,
) -> None:
    """In place: the prox of ``reg * (||z||_1 + gamma/2 ||z||^2)`` on ``(parameter, bias)``."""
    _seed(lambda: _norms.elastic_net(reg, gamma), parameter, bias, lr)


def logbarrier(parameter: torch.Tensor, bias: torch.Tensor | None = None, reg: Hyper = 0.01, lr: Hyper = 0.1) -> None:
    """In place: the prox of ``-reg * sum log z`` on ``(parameter, bias)``."""
    _seed(lambda: _norms.log_barrier(reg), parameter, bias, lr)


# ----------------------------------------------------------------- optimizer wrapper
def _with_prox(group: Mapping[str, Any], op: Any) -> dict[str, Any]:
    """A copy of a param group's dict with ``"prox"`` set to ``op``."""
    out = dict(group)
    out["prox"] = op
    return out


def _zero(lr: Any) -> bool:
    if isinstance(lr, torch.Tensor):
        return bool((lr == 0).all())
    return lr == 0


class ProxOptimizer(torch.optim.Optimizer):
    """Any ``torch.optim`` optimizer followed by a proximal step.

    After the wrapped optimizer's ``step()``, the prox is applied in place with ``step`` equal
    to the **current** ``lr`` of the param group (so learning-rate schedulers apply; attach
    the scheduler to this wrapper or to the inner optimizer, they share ``param_groups``).

    Two ways to say which operator acts on what:

    * ``ProxOptimizer(opt, prox, params=model)``: ``prox`` receives the named parameters of
      ``model`` (or a given ``{name: parameter}`` dict) as a dict, e.g. a
      :func:`proxfunc.partition`. The parameters it changes must share one ``lr``.
    * a ``"prox"`` entry in a param group: ``SGD([{"params": lin.parameters(), "prox":
      pf.l21(1e-3)}], lr=0.1)``; the operator receives that group's parameters as a tuple, in their order.

    ``zero_grad``, ``state_dict``, ``load_state_dict`` and ``add_param_group`` are those of
    the wrapped optimizer; the state dict holds each group's ``"prox"`` as plain data
    (:meth:`proxfunc.Prox.to_state`), so ``torch.load`` reads it with its default
    ``weights_only=True``, and ``load_state_dict`` rebuilds the operators.

    Distributed training: build it like the optimizer, from the wrapped model (after
    ``fully_shard``, whose sharded parameters it then updates; with ``DistributedDataParallel``
    the names carry the ``module.`` prefix, as :func:`proxfunc.autosize.neuron_prox` of the
    wrapped model gives them). Training equals one process on the whole batch (tested on 2
    gloo ranks: ``tests/test_distributed_training.py``).

    Works with every ``torch.optim`` optimizer (``SGD``, ``Adam``, ``AdamW``, ``RMSprop``,
    ``Adagrad``, ...; ``LBFGS`` through ``step(closure)``, the prox then follows the whole
    L-BFGS step) and every learning-rate scheduler (``StepLR``, ``CosineAnnealingLR``,
    ``OneCycleLR``, ``ReduceLROnPlateau``, ...). A group whose current ``lr`` is 0 is left
    unchanged (the prox with a zero step is the identity).

    The prox step is the group's ``lr`` also for adaptive optimizers such as Adam, whose update
    is ``lr * m_hat / (sqrt(v_hat) + eps)``: ``reg`` is then measured against that normalised
    update (see :class:`proxfunc.prox_adam` for the alternative, a step in the loss's units).

    Example (auto-sizing a hidden layer with Adam and a cosine schedule)::

        prox = pf.partition({("0.weight", "0.bias", "2.weight"): pf.l21(2.0, group_dim=(0, 0, 1))})
        opt = ProxOptimizer(torch.optim.Adam(model.parameters(), lr=0.02), prox, params=model)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for x, y in batches:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, prox: Prox | None = None, params: Any = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ProxOptimizer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if prox is not None and not isinstance(prox, Prox):
            raise TypeError(f"ProxOptimizer: prox must be a proxfunc operator, got {type(prox).__name__}")
        if (prox is None) != (params is None):
            raise ValueError(
                "ProxOptimizer: give prox and params together (or neither, using per-group 'prox' entries)"
            )
        for i, g in enumerate(optimizer.param_groups):
            if "prox" in g and not isinstance(g["prox"], Prox):
                raise TypeError(f"ProxOptimizer: param_groups[{i}]['prox'] must be a proxfunc operator")
        named: dict[str, torch.Tensor] | None = None
        if params is not None:
            if isinstance(params, nn.Module):
                named = dict(params.named_parameters())
            elif isinstance(params, Mapping):
                named = dict(params)
            else:
                raise TypeError("ProxOptimizer: params must be an nn.Module or a {name: parameter} mapping")
        self.optimizer = optimizer
        self.prox = prox
        self.named = named
        # Share the wrapped optimizer's groups and state: a scheduler attached here and one
        # attached to the inner optimizer see the same lr.
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ProxOptimizer({self.optimizer!r}, prox={self.prox!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, of plain data and tensors only: a param group's
        ``"prox"`` operator is stored as :meth:`proxfunc.Prox.to_state`, so
        ``torch.load(f)`` (``weights_only=True``) reads it without proxfunc imported."""
        sd = self.optimizer.state_dict()
        groups = sd.get("param_groups")
        if groups is not None and any(isinstance(g.get("prox"), Prox) for g in groups):
            sd = dict(sd)
            sd["param_groups"] = [
                _with_prox(g, g["prox"].to_state()) if isinstance(g.get("prox"), Prox) else g for g in groups
            ]
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` (or of the wrapped optimizer).

        A group's ``"prox"`` is rebuilt from its plain data (:meth:`proxfunc.Prox.from_state`) or
        taken as the operator it is; a saved group without ``"prox"`` keeps this optimizer's
        operator (a plain optimizer's state dict loads into a ``ProxOptimizer``). Nothing changes
        when an entry is not a valid operator (``TypeError``/``ValueError``).
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if groups is None:
            self.optimizer.load_state_dict(state_dict)  # the wrapped optimizer names what is missing
            return
        mine = self.param_groups
        loaded = []
        for i, g in enumerate(groups):
            if isinstance(g, Mapping) and "prox" in g:
                op = g["prox"]
                if op is not None and not isinstance(op, Prox):
                    try:
                        op = Prox.from_state(op)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"ProxOptimizer.load_state_dict: param_groups[{i}]['prox']: {e}") from None
                g = _with_prox(g, op)
            elif isinstance(g, Mapping) and i < len(mine) and "prox" in mine[i]:
                g = _with_prox(g, mine[i]["prox"])
            loaded.append(g)
        sd = dict(state_dict)
        sd["param_groups"] = loaded
        self.optimizer.load_state_dict(sd)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def _lr_of(self, tensors: list[torch.Tensor]) -> Hyper:
        ids = {id(t) for t in tensors}
        lrs = []
        for i, g in enumerate(self.param_groups):
            if any(id(p) in ids for p in g["params"]):
                lrs.append((i, g["lr"]))
        if not lrs:
            raise ValueError("ProxOptimizer: the prox's parameters are in no param group of the optimizer")
        first = lrs[0][1]
        for _, lr in lrs[1:]:
            if (lr != first) if not isinstance(lr, torch.Tensor) else bool((lr != first).any()):
                raise ValueError(
                    f"ProxOptimizer: the prox spans param groups with different lr ({lrs}); "
                    "use a 'prox' entry per param group instead"
                )
        return first

    def prox_step(self) -> None:
        """Apply the proximal step(s) now, with the current learning rates.

        A group whose current ``lr`` is 0 (e.g. the end of ``CosineAnnealingLR`` with
        ``eta_min=0``) is left as it is: the prox with a zero step is the identity. All-or-nothing:
        every group's new values are computed and checked before the first is written (a tensor
        under two operators, a group's ``"prox"`` and the wrapper's ``prox``, gets the second
        applied to the first's result: the first is written before the second is computed).
        """
        commits: list[Callable[[], None]] = []  # every group is computed and checked before any is written
        touched: set[int] = set()

        def prepare(op: Prox, target: Any, tensors: list[torch.Tensor], lr: Hyper) -> None:
            ids = {id(t) for t in tensors}
            if ids & touched:  # a tensor already proxed: this prox composes with that one's result
                for commit in commits:
                    commit()
                commits.clear()
                touched.clear()
            commits.append(_prepare(op, target, lr))
            touched.update(ids)

        for i, g in enumerate(self.param_groups):
            op = g.get("prox")
            if op is not None:
                if not isinstance(op, Prox):
                    raise TypeError(f"ProxOptimizer: param_groups[{i}]['prox'] must be a proxfunc operator")
                if not _zero(g["lr"]):
                    prepare(op, list(g["params"]), list(g["params"]), g["lr"])
        if self.prox is not None and self.named is not None:
            lr = self._lr_of(list(self.named.values()))
            if not _zero(lr):
                prepare(self.prox, self.named, list(self.named.values()), lr)
        for commit in commits:
            commit()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.prox_step()
        return loss
