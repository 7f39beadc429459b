"""Auto-sizing end to end: neuron groups from a module, a live-neuron report, physical shrink.

Auto-sizing (K. Murray and D. Chiang, *Auto-Sizing Neural Networks*, EMNLP 2015; Murray et al.,
*Auto-Sizing the Transformer Network*, WNGT 2019) puts a group regularizer on every hidden
neuron's weights; the proximal step drives whole groups to exactly zero and a neuron whose
incoming weights are all zero no longer depends on its input, so it can be removed.

* :func:`find_neurons` reads a module's graph with :mod:`torch.fx` and finds every hidden
  layer: a ``Linear``/``Conv2d`` (the *producer*) whose output reaches exactly one
  ``Linear``/``Conv2d`` (the *consumer*) through element-wise operations only (activations,
  dropout, ``BatchNorm1d/2d``, channel-wise pooling, and ``flatten`` between a ``Conv2d`` and a
  ``Linear``); ``nn.TransformerEncoderLayer``/``TransformerDecoderLayer`` feed-forward blocks
  (``linear1 -> activation -> linear2``) are found by module type. Layers it cannot cover are
  listed with the reason.
* :func:`neuron_prox` turns that into one operator over ``dict(model.named_parameters())``:
  a :class:`proxfunc.partition` whose tuple rules bind each neuron's incoming weights, bias
  (and ``BatchNorm`` scale/shift), optionally its outgoing weights, under the group operator
  of your choice (``pf.linf1``, ``pf.l21``, any operator taking ``group_dim``).
* :func:`report` counts live neurons per layer; ``print(report(model))`` shows a table.
* :func:`shrink` returns a new, smaller module with the same outputs (eval mode): dead
  neurons/channels go, with the matching columns / input channels / ``BatchNorm`` entries
  downstream; a neuron whose incoming weights are zero but whose bias is not is a constant,
  and its contribution ``consumer(activation(bias))`` is folded into the consumer's bias when
  that is exact (so activations with ``f(0) != 0`` are handled). The original is never modified.
* Distributed models: ``DistributedDataParallel`` and FSDP2 (``fully_shard``) models give the
  plain model's groups and report (whole layers: sharded weights are gathered, so every rank
  calls :func:`report`); a sharded model is shrunk as a plain copy, :func:`gather`, then
  sharded again (``examples/fsdp_autosize.py``).

Example::

    import proxfunc as pf
    from proxfunc import autosize

    prox, skipped = autosize.neuron_prox(model, pf.linf1(0.005))
    params = {k: v.detach() for k, v in model.named_parameters()}
    ...                                   # params = prox(params - lr * grad, lr) every batch
    print(autosize.report(model, params))
    small = autosize.shrink(model, example_inputs)   # same outputs, fewer neurons
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _tree
from ._base import Prox
from .calculus import partition

__all__ = ["find_neurons", "neuron_prox", "report", "shrink", "gather", "Plan", "NeuronGroup", "Report", "NeuronProx"]

# --------------------------------------------------------------------------------------------
# Which graph operations keep neurons separate (act on each neuron / channel on its own)
# --------------------------------------------------------------------------------------------
_ACT_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Identity,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ACT_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    torch.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    torch.clamp,
    torch.clip,
    torch.clamp_min,
    torch.clamp_max,
    torch.abs,
    torch.square,
}
_ACT_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip", "clamp_min", "clamp_max", "abs", "square", "contiguous"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _fn_name(f: Any) -> str:
    return getattr(f, "__name__", repr(f))


@dataclass(frozen=True)
class _Step:
    """One operation between a producer and its consumer, replayable on a constant tensor."""

    kind: str  # "module", "function", "method", "identity", "attr" (a callable attribute)
    target: Any  # module qualified name / function / method name / attribute path
    desc: str
    args: tuple = ()
    kwargs: tuple = ()
    node_pos: int = 0  # position of the chain value among args

    def apply(self, x: torch.Tensor, root: nn.Module) -> torch.Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "module":
            return root.get_submodule(self.target)(x)
        if self.kind == "attr":
            owner, _, attr = self.target.rpartition(".")
            return getattr(root.get_submodule(owner), attr)(x)
        args = list(self.args)
        args[self.node_pos] = x
        kwargs = dict(self.kwargs)
        if self.kind == "method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


@dataclass(frozen=True)
class NeuronGroup:
    """One hidden layer's neurons: rows of ``producer`` feeding columns of ``consumer``.

    ``incoming`` are the names of the parameters holding each neuron's incoming weights, bias
    and ``BatchNorm`` scale/shift (neurons along dim 0 of each); ``outgoing`` is the consumer's
    weight (neurons along dim 1), or ``None`` when ``flatten`` lies in between (a neuron then
    owns ``H*W`` columns, which ``group_dim`` cannot express). :meth:`Plan.rule_names` also
    leaves it out when it is another group's incoming weight.
    """

    name: str
    kind: str  # "linear", "conv2d" or "ffn"
    producer: str
    consumer: str
    neurons: int
    incoming: tuple[str, ...]
    outgoing: str | None
    steps: tuple[_Step, ...]
    norms: tuple[str, ...]  # BatchNorm modules between producer and consumer
    flatten: bool  # a Conv2d producer feeding a Linear consumer through flatten
    note: str = ""

    @property
    def chain(self) -> str:
        """The operations between producer and consumer, e.g. ``'relu'``."""
        return " -> ".join(s.desc for s in self.steps) or "(none)"


@dataclass
class Plan:
    """The hidden layers of a module (``groups``) and the layers not covered (``skipped``)."""

    groups: list[NeuronGroup]
    skipped: dict[str, str]
    outputs: set[str] = field(default_factory=set)  # skipped because they are output layers

    def prox(self, op: Prox | Callable[..., Prox], *, outgoing: bool = False) -> partition:
        """The auto-sizing operator over ``dict(model.named_parameters())``.

        ``op`` is a group operator instance (``pf.linf1(0.005)``; it is rebuilt with the
        right ``group_dim`` for every layer) or a factory called as ``op(group_dim=...)``.
        One tuple rule per neuron group: ``(W_in, b_in[, bn.weight, bn.bias][, W_out])`` with
        ``group_dim = (0, 0[, 0, 0][, 1])``; neuron ``i`` is row ``i`` of the incoming
        tensors (and column ``i`` of the outgoing weight when ``outgoing=True``).
        Everything else passes through unchanged.
        """
        rules = []
        for names, dims in self.rule_names(outgoing=outgoing):
            rules.append((names, _make_op(op, dims)))
        return partition(rules)

    def rule_names(self, *, outgoing: bool = False) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
        """The tuple rules :meth:`prox` builds: ``[(names, group_dims), ...]``."""
        claimed = {n for g in self.groups for n in g.incoming}
        out = []
        for g in self.groups:
            names, dims = list(g.incoming), [0] * len(g.incoming)
            if outgoing and g.outgoing is not None and g.outgoing not in claimed:
                names.append(g.outgoing)
                dims.append(1)
                claimed.add(g.outgoing)
            out.append((tuple(names), tuple(dims)))
        return out

    def report(self, model: nn.Module, params: Mapping[str, torch.Tensor] | None = None) -> Report:
        """See :func:`report`."""
        return _report(self, model, params)

    def __str__(self) -> str:
        lines = ["neuron groups:"]
        for g in self.groups:
            lines.append(f"  {g.name} ({g.kind}, {g.neurons} neurons) -> {g.chain} -> {g.consumer}")
        if self.skipped:
            lines.append("not covered:")
            lines += [f"  {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


class NeuronProx(tuple):
    """``(prox, skipped)``: what :func:`neuron_prox` returns; ``.plan`` holds the groups."""

    plan: Plan

    def __new__(cls, prox: partition, skipped: dict[str, str], plan: Plan):
        self = super().__new__(cls, (prox, skipped))
        self.plan = plan
        return self

    @property
    def prox(self) -> partition:
        return self[0]

    @property
    def skipped(self) -> dict[str, str]:
        return self[1]


def _make_op(op: Any, dims: tuple[int, ...]) -> Prox:
    if isinstance(op, Prox):
        if "group_dim" not in op._hyper_names:
            raise TypeError(
                f"autosize: the operator {op!r} has no group_dim; use a group operator such as "
                "pf.linf1 or pf.l21, or pass a factory called as op(group_dim=...)"
            )
        fields = dict(op._params())
        fields["group_dim"] = dims
        return type(op)(**fields)
    if callable(op):
        made = op(group_dim=dims)
        if not isinstance(made, Prox):
            raise TypeError(f"autosize: op(group_dim=...) must return a proxfunc operator, got {type(made).__name__}")
        return made
    raise TypeError(f"autosize: op must be a proxfunc group operator or a factory, got {type(op).__name__}")


# --------------------------------------------------------------------------------------------
# Graph analysis with torch.fx
# --------------------------------------------------------------------------------------------
def _fsdp_module_type() -> type | None:
    """FSDP2's ``FSDPModule`` (the base ``fully_shard`` adds to a module's class), or ``None``
    where this torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6, or built without torch.distributed
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _original_class(m: nn.Module) -> type:
    """The class of ``m`` before ``fully_shard`` swapped it for ``FSDP<class>``: the first class
    of its MRO that is not an FSDP2 wrapper."""
    cls = type(m)
    fsdp = _fsdp_module_type() if cls.__name__.startswith("FSDP") else None
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, fsdp))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, seeing through FSDP2: a module that ``fully_shard`` made an
    ``FSDPLinear`` is a leaf as its ``nn.Linear`` was (its class is defined by FSDP, outside
    ``torch.nn``), and a sharded module traced through runs its ``forward`` without FSDP's
    hooks (they would all-gather parameters while tracing)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _TRANSFORMER_LAYERS):
            return True
        cls = _original_class(m)
        if cls is not type(m):
            return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(cls, nn.Sequential)
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if _original_class(m) is not type(m):
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)


def _step_of(node: fx.Node, cur: fx.Node, modules: dict[str, nn.Module], prefix: str) -> tuple[_Step | None, str]:
    """Classify ``node`` (a user of ``cur``): a neuron-wise step, or ``None`` and why not."""
    extra = [n for n in node.all_input_nodes if n is not cur]
    if extra:
        return None, f"its output is combined with another value in {_describe(node)}"
    if node.op == "call_module":
        m = modules[node.target]
        name = prefix + str(node.target)
        if isinstance(m, _DROPOUT_MODULES):
            return _Step("identity", name, type(m).__name__.lower()), ""
        if isinstance(m, nn.PReLU) and m.num_parameters == 1 or isinstance(m, _ACT_MODULES):
            return _Step("module", name, type(m).__name__), ""
        if isinstance(m, _BN_MODULES):
            return _Step("module", name, type(m).__name__), "bn"
        if isinstance(m, _POOL_MODULES):
            return _Step("module", name, type(m).__name__), "pool"
        if isinstance(m, nn.Flatten):
            if m.start_dim == 1 and m.end_dim == -1:
                return _Step("module", name, "Flatten"), "flatten"
            return None, f"{name} flattens dims {m.start_dim}..{m.end_dim} (only start_dim=1 is supported)"
        return None, f"its output goes through {name} ({_original_class(m).__name__}), which is not element-wise"
    if node.op not in ("call_function", "call_method"):
        return None, f"its output goes to {_describe(node)}"
    args = tuple(node.args)
    if not args or args[0] is not cur:
        return None, f"its output is not the first argument of {_describe(node)}"
    kwargs = tuple(sorted(node.kwargs.items()))
    target = node.target
    if node.op == "call_method":
        kind = "method"
        if target == "flatten":
            if _flatten_ok(args[1:], dict(kwargs)):
                return _Step(kind, target, "flatten", args, kwargs), "flatten"
            return None, "its output is flattened other than with start_dim=1"
        if target in _ACT_METHODS:
            return _Step(kind, target, str(target), args, kwargs), ""
        return None, f"its output goes through the method .{target}(), which is not known to be element-wise"
    kind = "function"
    if target in _DROPOUT_FUNCTIONS:
        return _Step("identity", target, _fn_name(target)), ""
    if target is torch.flatten:
        if _flatten_ok(args[1:], dict(kwargs)):
            return _Step(kind, target, "flatten", args, kwargs), "flatten"
        return None, "its output is flattened other than with start_dim=1"
    if target in _ACT_FUNCTIONS:
        return _Step(kind, target, _fn_name(target), args, kwargs), ""
    if target in _POOL_FUNCTIONS:
        return _Step(kind, target, _fn_name(target), args, kwargs), "pool"
    if target in _SCALAR_OPS and len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs:
        return _Step(kind, target, f"{_fn_name(target)} {args[1]!r}", args, kwargs), ""
    return None, f"its output goes through {_fn_name(target)}, which is not known to be element-wise"


def _flatten_ok(rest: tuple, kwargs: dict) -> bool:
    start = rest[0] if rest else kwargs.get("start_dim", 0)
    end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the model's output"
    if node.op == "call_function":
        return _fn_name(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op} {node.target}"


def _analyze_graph(root: nn.Module, prefix: str, plan: Plan, reasons: dict[str, str]) -> None:
    graph = _Tracer().trace(root)
    modules = dict(root.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        name = prefix + str(node.target)
        if calls[node.target] > 1:
            reasons[name] = f"it is called {calls[node.target]} times in forward (shared weights)"
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            reasons[name] = f"grouped convolution (groups={mod.groups})"
            continue
        steps: list[_Step] = []
        norms: list[str] = []
        flat = False
        cur = node
        why = ""
        consumer = None
        while True:
            users = list(cur.users)
            if len(users) != 1:
                why = f"the output of {_describe(cur) if cur is not node else name} is used {len(users)} times"
                if len(users) == 0:
                    why = "its output is never used"
                break
            u = users[0]
            if u.op == "output":
                where = f"the module {prefix[:-1]}" if prefix else "the model"
                why = (
                    f"output layer: its outputs leave {where}" if cur is node else f"its neurons feed {where}'s output"
                )
                if cur is node:
                    plan.outputs.add(name)
                break
            if u.op == "call_module" and isinstance(modules[u.target], (nn.Linear, nn.Conv2d)):
                cm = modules[u.target]
                cname = prefix + str(u.target)
                if len(u.all_input_nodes) != 1 or u.args[0] is not cur:
                    why = f"{cname} takes other inputs too"
                elif calls[u.target] > 1:
                    why = f"its consumer {cname} is called {calls[u.target]} times (shared weights)"
                elif isinstance(cm, nn.Conv2d) and (not isinstance(mod, nn.Conv2d) or cm.groups != 1):
                    why = f"consumer {cname} is a grouped convolution or does not follow a Conv2d"
                elif isinstance(cm, nn.Linear) and isinstance(mod, nn.Conv2d) and not flat:
                    why = f"a Conv2d feeds the Linear {cname} without flatten(start_dim=1)"
                else:
                    consumer = cname
                break
            step, tag = _step_of(u, cur, modules, prefix)
            if step is None:
                why = tag
                break
            if tag == "bn":
                if flat:
                    step, why = None, "BatchNorm after flatten"
                    break
                norms.append(step.target)
            if tag in ("flatten", "pool") and not isinstance(mod, nn.Conv2d):
                why = f"{step.desc} after a Linear mixes neurons with other dims"
                break
            if tag == "flatten":
                flat = True
            if tag == "pool" and flat:
                why = "pooling after flatten"
                break
            steps.append(step)
            cur = u
        if consumer is None:
            reasons[name] = why
            continue
        incoming = [f"{name}.weight"] + ([f"{name}.bias"] if mod.bias is not None else [])
        for bn_name in norms:
            bn = root.get_submodule(bn_name[len(prefix) :])
            if bn.affine:
                incoming += [f"{bn_name}.weight", f"{bn_name}.bias"]
        note = "outgoing weights not grouped: flatten between" if flat else ""
        n = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        plan.groups.append(
            NeuronGroup(
                name=name,
                kind="linear" if isinstance(mod, nn.Linear) else "conv2d",
                producer=name,
                consumer=consumer,
                neurons=n,
                incoming=tuple(incoming),
                outgoing=None if flat else f"{consumer}.weight",
                steps=tuple(steps),
                norms=tuple(norms),
                flatten=flat,
                note=note,
            )
        )


def _ffn_group(layer: nn.Module, name: str) -> NeuronGroup:
    l1 = layer.linear1
    base = f"{name}." if name else ""
    incoming = [f"{base}linear1.weight"] + ([f"{base}linear1.bias"] if l1.bias is not None else [])
    act = layer.activation
    desc = type(act).__name__ if isinstance(act, nn.Module) else _fn_name(act)
    steps = (_Step("attr", f"{base}activation", desc), _Step("identity", f"{base}dropout", "dropout"))
    return NeuronGroup(
        name=f"{base}linear1",
        kind="ffn",
        producer=f"{base}linear1",
        consumer=f"{base}linear2",
        neurons=l1.out_features,
        incoming=tuple(incoming),
        outgoing=f"{base}linear2.weight",
        steps=steps,
        norms=(),
        flatten=False,
    )


def _analyze(mod: nn.Module, prefix: str, plan: Plan, reasons: dict[str, str]) -> None:
    if isinstance(mod, _TRANSFORMER_LAYERS):
        plan.groups.append(_ffn_group(mod, prefix[:-1]))
        return
    try:
        _analyze_graph(mod, prefix, plan, reasons)
    except Exception as e:  # noqa: BLE001 - any tracing failure: look inside instead
        where = prefix[:-1] or "the model"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        for sub_name, sub in mod.named_modules(prefix=prefix[:-1]):
            if isinstance(sub, (nn.Linear, nn.Conv2d)):
                reasons.setdefault(sub_name, f"torch.fx could not trace {where}: {msg[:120]}")
        for child_name, child in mod.named_children():
            _analyze(child, f"{prefix}{child_name}.", plan, reasons)
        return
    # transformer layers are leaves of the trace: their FFN blocks are found by type
    for sub_name, sub in mod.named_modules(prefix=prefix[:-1]):
        if isinstance(sub, _TRANSFORMER_LAYERS):
            plan.groups.append(_ffn_group(sub, sub_name))


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """``(model.module, "module.")`` for ``DistributedDataParallel``/``DataParallel`` (their
    ``forward`` broadcasts buffers and cannot be traced; the names keep the ``module.``
    prefix, as in ``model.named_parameters()``), else ``(model, "")``."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module."
    return model, ""


def find_neurons(model: nn.Module) -> Plan:
    """Find the hidden layers of ``model`` whose neurons can be auto-sized.

    Traces ``model.forward`` with :func:`torch.fx.symbolic_trace` (transformer layers are kept
    as leaves; when the whole model cannot be traced, each child is traced on its own). A
    hidden layer is a ``Linear`` or ``Conv2d`` called once whose output reaches exactly one
    ``Linear``/``Conv2d`` through operations that act on each neuron (channel) on its own:
    activations (modules, ``torch``/``F`` functions, ``.relu()``/``.clamp()``... methods),
    dropout, arithmetic with a Python number, and, after a ``Conv2d``, ``BatchNorm2d``,
    channel-wise pooling and ``flatten(start_dim=1)``. Feed-forward blocks of
    ``nn.TransformerEncoderLayer``/``TransformerDecoderLayer`` are neuron groups too.

    Distributed models give the plain model's groups, with nothing communicated: under
    ``DistributedDataParallel`` those of ``model.module``, named ``module.<name>`` as in
    ``model.named_parameters()``; a model sharded with FSDP2's ``fully_shard`` (any modules)
    the same names and full sizes (``neurons`` counts the whole layer, not a rank's shard).

    Returns a :class:`Plan`: ``plan.groups`` and ``plan.skipped`` (``{layer name: reason}``
    for every other ``Linear``/``Conv2d``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"autosize: model must be an nn.Module, got {type(model).__name__}")
    plan = Plan(groups=[], skipped={})
    reasons: dict[str, str] = {}
    inner, prefix = _unwrapped(model)
    _analyze(inner, prefix, plan, reasons)
    covered = {g.producer for g in plan.groups}
    ffn_consumers = {g.consumer for g in plan.groups if g.kind == "ffn"}
    mha = {
        f"{a}.{b}" if a else b: a or "<root>"
        for a, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for b, _ in m.named_modules()
        if b
    }
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in covered:
            if name in mha:
                reason = f"projection inside the attention module {mha[name]} (not a hidden layer)"
                plan.outputs.add(name)
            elif name in ffn_consumers:
                reason = "consumer of a transformer feed-forward block (its outputs leave the block)"
                plan.outputs.add(name)
            else:
                reason = reasons.get(name, "not reached as a hidden layer by the traced forward")
            plan.skipped[name] = reason
    return plan


def neuron_prox(model: nn.Module, op: Prox | Callable[..., Prox], *, outgoing: bool = False) -> NeuronProx:
    """The auto-sizing operator of ``model`` and the layers it does not cover.

    Returns ``(prox, skipped)``: ``prox`` is a :class:`proxfunc.partition` over
    ``dict(model.named_parameters())`` with ``prox(params, step)`` equal to

        argmin_z  sum_layers sum_i g(neuron_i(z)) + ||z - params||^2 / (2 * step),

    where ``neuron_i`` is row ``i`` of the layer's incoming weight and bias (and of the
    ``BatchNorm`` scale/shift after a ``Conv2d``), plus column ``i`` of the next layer's weight
    when ``outgoing=True`` (unless that weight is itself a group's incoming weight: blocks of a
    separable sum must be disjoint); ``g`` is the group penalty of ``op`` (``pf.linf1(reg)``,
    ``pf.l21(reg)``, or any factory ``op(group_dim=...)``). Parameters of other layers pass
    through unchanged. ``skipped`` maps each uncovered ``Linear``/``Conv2d`` to the reason;
    ``result.plan`` is the :class:`Plan`. Murray & Chiang (2015); Murray et al. (2019).
    """
    plan = find_neurons(model)
    return NeuronProx(plan.prox(op, outgoing=outgoing), dict(plan.skipped), plan)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerReport:
    """One row of a :class:`Report`."""

    name: str
    kind: str
    alive: int  # neurons with some nonzero incoming weight and some nonzero outgoing weight
    constant: int  # neurons with all incoming weights zero (output independent of the input)
    total: int
    params: int  # parameters of the producer (weight + bias)
    params_alive: int  # of those, the ones belonging to live neurons
    sparsity: float  # fraction of exactly-zero producer parameters


@dataclass(frozen=True)
class Report:
    """Live neurons per layer. ``str(report)`` is a table; ``report.rows`` the numbers."""

    rows: tuple[LayerReport, ...]

    @property
    def alive(self) -> int:
        return sum(r.alive for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    def __str__(self) -> str:
        head = ("layer", "kind", "alive/total", "constant", "params", "params alive", "sparsity")
        body = [
            (r.name, r.kind, f"{r.alive}/{r.total}", str(r.constant), str(r.params), str(r.params_alive))
            + (f"{100 * r.sparsity:.1f}%",)
            for r in self.rows
        ]
        p, pa = sum(r.params for r in self.rows), sum(r.params_alive for r in self.rows)
        body.append(
            ("total", "", f"{self.alive}/{self.total}", str(sum(r.constant for r in self.rows)), str(p), str(pa), "")
        )
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        return "\n".join(lines)

    __repr__ = __str__


def _tensor(model: nn.Module, params: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    """The named parameter's whole value, detached: from ``params`` when it has it, else from
    ``model``. A ``DTensor`` (an FSDP2 shard) is gathered, a collective every rank joins."""
    if params is not None and name in params:
        t = params[name]
    else:
        mod_name, _, attr = name.rpartition(".")
        t = getattr(model.get_submodule(mod_name), attr)
    return None if t is None else _full(t.detach())


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (``full_tensor()``: an all-gather), any other tensor as it is."""
    gather = getattr(t, "full_tensor", None)
    return t if gather is None else gather()


def _neuron_masks(g: NeuronGroup, w: torch.Tensor, wc: torch.Tensor):
    """(zero_in, zero_out, r): per-neuron masks from the producer's weight ``w`` and the
    consumer's ``wc``; r = consumer columns per neuron."""
    zero_in = w.reshape(g.neurons, -1).eq(0).all(1)
    out_dim = wc.shape[0]
    wc3 = wc.reshape(out_dim, g.neurons, -1)  # (O, n, columns per neuron or kernel entries)
    zero_out = wc3.eq(0).all(-1).all(0)
    return zero_in, zero_out, wc3.shape[-1]


def _report(plan: Plan, model: nn.Module, params: Mapping[str, torch.Tensor] | None) -> Report:
    rows = []
    for g in plan.groups:
        w = _tensor(model, params, f"{g.producer}.weight")
        b = _tensor(model, params, f"{g.producer}.bias")
        zero_in, zero_out, _ = _neuron_masks(g, w, _tensor(model, params, f"{g.consumer}.weight"))
        alive = ~(zero_in | zero_out)
        per = w[0].numel() + (1 if b is not None else 0)
        nz = int(w.ne(0).sum()) + (int(b.ne(0).sum()) if b is not None else 0)
        total_p = w.numel() + (b.numel() if b is not None else 0)
        rows.append(
            LayerReport(
                name=g.name,
                kind=g.kind,
                alive=int(alive.sum()),
                constant=int(zero_in.sum()),
                total=g.neurons,
                params=total_p,
                params_alive=int(alive.sum()) * per,
                sparsity=1 - nz / total_p if total_p else 0.0,
            )
        )
    return Report(tuple(rows))


def report(model: nn.Module, params: Mapping[str, torch.Tensor] | None = None) -> Report:
    """Live neurons of every hidden layer of ``model``.

    ``params`` (e.g. the dict of a functional training loop) overrides the module's own
    parameters by name. Per layer: ``alive`` neurons (some nonzero incoming weight and some
    nonzero outgoing weight; the others are removed by :func:`shrink`), ``constant`` neurons
    (all incoming weights zero: their output does not depend on the input), ``total``, the
    producer's parameter count, the part of it on live neurons, and its sparsity (fraction of
    exact zeros). ``print(report(model))`` prints a table.

    Distributed models: the numbers are those of the whole model on every rank. Under FSDP2
    each sharded weight is gathered (``DTensor.full_tensor()``, one layer at a time), so every
    rank must call ``report`` (as for any collective); under ``DistributedDataParallel`` each
    rank holds the whole model and nothing is communicated.
    """
    return _report(find_neurons(model), model, params)


# --------------------------------------------------------------------------------------------
# Shrink
# --------------------------------------------------------------------------------------------
def _run_steps(steps: tuple[_Step, ...], x: torch.Tensor, root: nn.Module) -> torch.Tensor:
    for s in steps:
        x = s.apply(x, root)
    return x


def _padded(conv: nn.Conv2d) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding keeps a constant map constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in _tree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def shrink(model: nn.Module, example_inputs: Any, *, strict: bool = True, rtol: float = 1e-4, atol: float = 1e-5):
    """A new, smaller module computing the same function as ``model`` in eval mode.

    For every hidden layer found by :func:`find_neurons`, neuron ``i`` is removed when

    * its outgoing weights (consumer column(s) ``i``) are all zero: it contributes nothing; or
    * its incoming weights are all zero: its output is the constant ``z_i = chain(b_i)`` (the
      bias through ``BatchNorm`` running statistics, the activation, pooling...). Then
      ``consumer(x)`` gains ``W_out[:, i] * z_i`` summed over the neuron's columns (for a
      ``Conv2d`` consumer: over its kernel), which is folded into the consumer's bias. This is
      exact for a ``Linear`` consumer and for a ``Conv2d`` consumer without zero padding (or
      when ``z_i = 0``); with zero padding a nonzero constant is not a constant at the border,
      so the neuron cannot be removed exactly.

    The producer loses rows, ``BatchNorm`` in between loses entries (weight, bias, running
    statistics), the consumer loses columns/input channels (``H*W`` columns per channel after
    ``flatten``). A ``Conv2d`` keeps at least one channel (PyTorch has no empty convolution).

    ``example_inputs`` (a tensor or a tuple of positional inputs) gives the shapes between
    layers and is used to check the result: the outputs of the new module must match the
    original's to ``rtol``/``atol`` or ``RuntimeError`` is raised. The returned module is a
    deep copy in **eval mode** (folding through ``BatchNorm`` uses its running statistics;
    dropout is the identity). ``model`` is never modified.

    Refusals: with ``strict=True`` (default), a hidden layer that has removable neurons but
    cannot be shrunk exactly (not covered by :func:`find_neurons`, or constants that cannot be
    folded) raises ``NotImplementedError`` naming the layer and the reason; with
    ``strict=False`` those neurons are kept and a warning says why.

    Distributed models: under ``DistributedDataParallel`` its ``module`` is shrunk (wrap the
    result again). A model sharded with FSDP2 is refused with ``TypeError``: shrink
    ``gather(model, plain)`` on every rank, a plain module holding the whole state (the same
    result on every rank), then ``fully_shard`` the result; see :func:`gather`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"shrink: model must be an nn.Module, got {type(model).__name__}")
    model = _unwrapped(model)[0]
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        raise TypeError(
            "shrink: the model's parameters are sharded (DTensor, e.g. FSDP2's fully_shard); on every "
            "rank, shrink a plain copy holding the whole state, shrink(autosize.gather(model, plain), "
            "example_inputs), then shard the result again"
        )
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    new = copy.deepcopy(model).eval()
    plan = find_neurons(new)
    problems: list[str] = []

    # layers that have zero rows but are not covered: refuse or warn
    for name, reason in plan.skipped.items():
        if name in plan.outputs:
            continue
        w = new.get_submodule(name).weight.detach()
        dead = int(w.reshape(w.shape[0], -1).eq(0).all(1).sum())
        if dead:
            problems.append(f"{name} has {dead} neurons with zero incoming weights but cannot be shrunk: {reason}")

    # shapes of every Conv2d producer output (for replaying the chain on constant maps; the
    # steps after a Linear act on each entry alone, so one row (1, n) is enough there)
    shapes: dict[str, torch.Size] = {}
    hooks = []
    for g in plan.groups:
        if g.kind != "conv2d":
            continue
        m = new.get_submodule(g.producer)
        hooks.append(m.register_forward_hook(lambda mod, a, out, _n=g.producer: shapes.__setitem__(_n, out.shape)))
    try:
        ref = _outputs(new, inputs)
    finally:
        for h in hooks:
            h.remove()

    weights = {}
    biases: dict[str, torch.Tensor | None] = {}
    for g in plan.groups:
        for n in (g.producer, g.consumer):
            m = new.get_submodule(n)
            weights[n] = m.weight.detach().clone()
            biases[n] = None if m.bias is None else m.bias.detach().clone()
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    bn_keep: dict[str, torch.Tensor] = {}

    for g in plan.groups:
        n = g.neurons
        if g.kind == "conv2d" and g.producer not in shapes:
            problems.append(f"{g.name} is not called by forward on example_inputs")
            continue
        wp, bp, wc = weights[g.producer], biases[g.producer], weights[g.consumer]
        zero_in = wp.reshape(n, -1).eq(0).all(1)
        wc3 = wc.reshape(wc.shape[0], n, -1)
        zero_out = wc3.eq(0).all(-1).all(0)
        remove = zero_out.clone()
        cand = zero_in & ~zero_out
        fold = None
        if bool(cand.any()):
            shape = [1, *shapes[g.producer][1:]] if g.kind == "conv2d" else [1, n]
            pre = bp if bp is not None else torch.zeros(n, dtype=wp.dtype, device=wp.device)
            view = [1, n] + [1] * (len(shape) - 2)
            x0 = pre.reshape(view).expand(shape).contiguous()
            reason = ""
            try:
                with torch.no_grad():
                    z = _run_steps(g.steps, x0, new)
            except Exception as e:  # noqa: BLE001
                z, reason = None, f"replaying {g.chain} on the constant failed ({e})"
            if z is not None:
                if g.kind == "conv2d":
                    z3 = z.reshape(n, -1)  # (n, H*W): the consumer's input channels, or flattened columns
                else:
                    z3 = z.reshape(-1, n)[0][:, None]  # (n, 1): one value per neuron
                cons = new.get_submodule(g.consumer)
                if isinstance(cons, nn.Conv2d):
                    uniform = (z3 == z3[:, :1]).all(1)
                    zval = z3[:, 0]
                    padded = (zval != 0) & torch.tensor(_padded(cons))
                    ok = uniform & ~padded
                    contrib = wc3.sum(-1) * zval  # (O, n)
                    why = []
                    if bool((cand & ~uniform).any()):
                        why.append(f"{int((cand & ~uniform).sum())} constant channels are not uniform after {g.chain}")
                    if bool((cand & uniform & padded).any()):
                        why.append(
                            f"{int((cand & uniform & padded).sum())} constant channels feed the zero-padded "
                            f"{g.consumer}, where a constant input is not constant at the border"
                        )
                    reason = "; ".join(why)
                    ok = ok & torch.isfinite(zval)
                else:
                    contrib = (wc3 * z3.unsqueeze(0)).sum(-1)  # (O, n)
                    ok = torch.isfinite(z3).all(1)
                take = cand & ok
                if bool(take.any()):
                    fold = contrib[:, take].sum(1)
                    remove |= take
            if reason:
                problems.append(f"{g.name}: {reason}")
        if g.kind == "conv2d" and bool(remove.all()):
            # keep one channel (PyTorch has no empty Conv2d): prefer one that needs no fold
            j = int(torch.nonzero(zero_out)[0]) if bool(zero_out.any()) else 0
            if not bool(zero_out[j]) and fold is not None:
                fold = fold - contrib[:, j]
            remove[j] = False
        if fold is not None:
            bc = biases[g.consumer]
            if bc is not None:
                biases[g.consumer] = bc + fold.to(bc.dtype)
            elif bool((fold != 0).any()):  # create a bias only for a nonzero contribution
                biases[g.consumer] = fold.to(wc.dtype)
        keep = torch.nonzero(~remove).flatten()
        rows[g.producer] = keep
        for bn in g.norms:
            bn_keep[bn] = keep
        r = wc3.shape[-1] if isinstance(new.get_submodule(g.consumer), nn.Linear) else 1
        cols[g.consumer] = (keep[:, None] * r + torch.arange(r, device=keep.device)).flatten() if r > 1 else keep

    if problems:
        msg = "shrink: cannot remove every removable neuron exactly:\n  " + "\n  ".join(problems)
        if strict:
            raise NotImplementedError(msg + "\n(pass strict=False to keep those neurons)")
        warnings.warn(msg + "\n(those neurons are kept)", stacklevel=2)

    with torch.no_grad():
        for name in weights:
            m = new.get_submodule(name)
            w, b = weights[name], biases[name]
            if name in rows:
                w = w[rows[name]]
                b = None if b is None else b[rows[name]]
            if name in cols:
                w = w[:, cols[name]]
            _set_param(m, "weight", w)
            _set_param(m, "bias", b)
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = w.shape[0], w.shape[1]
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1]
        for name, keep in bn_keep.items():
            bn = new.get_submodule(name)
            for attr in ("weight", "bias"):
                t = getattr(bn, attr)
                if t is not None:
                    _set_param(bn, attr, t.detach()[keep])
            for attr in ("running_mean", "running_var"):
                t = getattr(bn, attr)
                if t is not None:
                    setattr(bn, attr, t[keep].clone())
            bn.num_features = len(keep)

    got = _outputs(new, inputs)
    for a, b in zip(ref, got):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(a.abs().max()))):
            err = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(b.shape)} != {tuple(a.shape)}"
            raise RuntimeError(f"shrink: the shrunk model's outputs differ from the original's (max error {err})")
    return new


def gather(model: nn.Module, into: nn.Module) -> nn.Module:
    """``into`` holding the whole state of the distributed ``model``, for :func:`shrink`.

    ``model`` is sharded with FSDP2's ``fully_shard`` (each ``DTensor`` parameter is gathered
    with ``full_tensor()``: a collective, so every rank calls ``gather``) or wrapped by
    ``DistributedDataParallel`` (its ``module``'s state, nothing communicated). ``into`` is a
    plain module of the same architecture, e.g. made by the same constructor; on the meta
    device its tensors are replaced by the gathered ones (no memory spent twice). Returns
    ``into``, the same on every rank. Shrinking a sharded model, on every rank::

        small = autosize.shrink(autosize.gather(model, make_model()), example_inputs)
        for block in small.blocks:  # shard again, as the original was
            fully_shard(block)
        fully_shard(small)
    """
    inner, _ = _unwrapped(model)
    state = {k: _full(v.detach()) for k, v in inner.state_dict().items()}
    meta = any(t.is_meta for t in into.state_dict().values())
    into.load_state_dict(state, **({"assign": True} if meta else {}))
    return into


def _set_param(m: nn.Module, attr: str, value: torch.Tensor | None) -> None:
    old = getattr(m, attr)
    if value is None:
        if old is not None:
            setattr(m, attr, None)
        return
    rg = old.requires_grad if isinstance(old, nn.Parameter) else True
    setattr(m, attr, nn.Parameter(value.detach().clone().contiguous(), requires_grad=rg))
