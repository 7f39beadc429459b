"""Auto-sizing end to end: neuron groups from a module, a live-neuron report, physical shrink.

Auto-sizing (K. Murray and D. Chiang, *Auto-Sizing Neural Networks*, EMNLP 2015; Murray et al.,
*Auto-Sizing the Transformer Network*, WNGT 2019) puts a group regularizer on every hidden
neuron's weights; the proximal step drives whole groups to exactly zero and a neuron whose
incoming weights are all zero no longer depends on its input, so it can be removed.

* :func:`find_neurons` reads a module's graph with :mod:`torch.fx` and follows every channel
  (neuron) of every layer, the way a dependency graph does: a *neuron group* is a set of
  channels that are written by one or more layers (the *producers*: ``Linear``, convolutions,
  Hugging Face's ``Conv1D`` and any module that computes ``x @ W.T + b`` or ``x @ W + b``,
  ``Embedding`` columns), pass through operations acting on each channel alone (activations,
  Hugging Face ``ACT2FN`` modules, dropout, ``BatchNorm``, depthwise convolutions, channel-wise
  pooling, ``flatten`` after a convolution, arithmetic with numbers, sums and products of
  channels of the same group) and are read by one or more layers (the *consumers*). That
  covers the hidden layer of an MLP, feed-forward blocks split across modules (BERT's
  ``intermediate`` -> ``output``), gated MLPs (Llama's ``gate_proj`` row ``i``, ``up_proj``
  row ``i`` and ``down_proj`` column ``i`` joined by a product), the residual stream of a
  ResNet stage (every convolution writing into the sum and every one reading it) and depthwise
  chains (MobileNet: expand row ``i``, ``BatchNorm``, depthwise filter ``i``, ``BatchNorm``,
  project column ``i``). Every other module with parameters is listed in ``skipped`` with the
  reason (a channel that reaches the model's output, a ``LayerNorm``, an attention block, a
  weight shared with another layer...). Parts of a model that torch.fx cannot trace are kept
  whole and analysed on their own; :class:`Neurons` declares a group by hand.
* :func:`neuron_prox` turns that into one operator over ``dict(model.named_parameters())``:
  a :class:`proxfunc.partition` whose tuple rules bind each neuron's incoming weights, biases
  and per-channel parameters (optionally its outgoing weights) under the group operator of your
  choice (``pf.linf1``, ``pf.l21``, any operator taking ``group_dim``). It warns when it finds
  no group or when part of the model could not be traced.
* :func:`report` counts live neurons per group; ``print(report(model))`` shows a table.
* :func:`shrink` returns a new, smaller module with the same outputs (eval mode): dead
  neurons go from every producer, per-channel module and consumer of their group; a neuron
  whose incoming weights are zero but whose bias is not is a constant, folded into the
  consumers' biases when that is exact. The original is never modified; tied parameters stay
  tied (a layer whose weight is shared is never resized).
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

Models with ``BatchNorm`` in a functional loop: pass the buffers with the parameters,
``torch.func.functional_call(model, (params, buffers), x)`` with
``buffers = dict(model.named_buffers())`` (in training mode BatchNorm updates its running
statistics in place, which ``torch.func.grad`` refuses for a captured tensor); the prox takes
``params`` alone. :func:`functional_call` does this and names the pattern when it fails.
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _tree
from ._base import Prox
from .calculus import partition

__all__ = [
    "find_neurons",
    "neuron_prox",
    "report",
    "shrink",
    "gather",
    "functional_call",
    "Neurons",
    "Plan",
    "NeuronGroup",
    "Report",
    "LayerReport",
    "NeuronProx",
]

# --------------------------------------------------------------------------------------------
# Which graph operations keep channels separate (act on each neuron / channel on its own)
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
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
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
    torch.exp,
    torch.erf,
    torch.pow,
    torch.sqrt,
    torch.rsqrt,
    torch.neg,
}
_ACT_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "abs",
    "square",
    "exp",
    "pow",
    "neg",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
# element-wise binary operations: with a number they act on each channel alone; between two
# values carrying channels they join those channels into one group
_BINARY_OPS = {
    operator.add: "add",
    operator.iadd: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.add: "add",
    torch.sub: "sub",
    torch.mul: "mul",
    torch.div: "div",
}
_BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul", "div": "div"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_TRANSFORMER_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


def _fn_name(f: Any) -> str:
    return getattr(f, "__name__", repr(f))


def _is_hf_activation(m: nn.Module) -> bool:
    """A parameterless module of ``transformers.activations`` (``ACT2FN``: ``GELUActivation``,
    ``NewGELUActivation``, ``SiLUActivation``...): element-wise."""
    return type(m).__module__.startswith("transformers.activations") and not any(True for _ in m.parameters())


def _is_channel_norm(m: nn.Module) -> bool:
    """A normalisation across channels (``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and the like)."""
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)):
        return True
    return type(m).__name__.endswith(("LayerNorm", "RMSNorm", "GroupNorm"))  # e.g. LlamaRMSNorm


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV_MODULES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


_PROBED: dict[int, int | None] = {}  # _linear_like of every module of the model being traced


def _linear_like(m: nn.Module) -> int | None:
    """The weight dimension that holds the output features of a module computing ``x @ W.T + b``
    (``0``, ``nn.Linear``) or ``x @ W + b`` (``1``, Hugging Face's ``Conv1D``), else ``None``.

    Modules outside ``torch.nn`` whose only parameters are a 2-D ``weight`` and an optional
    ``bias`` are recognised by what they compute: one forward call on a random input, compared
    with both layouts (a meta or sharded weight cannot be probed: a class named ``Conv1D`` is
    then taken as ``x @ W + b``).
    """
    cls = _original_class(m)
    if issubclass(cls, nn.Linear):
        return 0
    if id(m) in _PROBED:
        return _PROBED[id(m)]
    if cls.__module__.startswith(("torch.", "proxfunc.")) or any(True for _ in m.children()):
        return None
    params = dict(m.named_parameters(recurse=False))
    w, b = params.get("weight"), params.get("bias")
    if w is None or set(params) - {"weight", "bias"} or w.dim() != 2 or (b is not None and b.dim() != 1):
        return None
    if w.is_meta or _is_sharded(w) or (b is not None and (b.is_meta or _is_sharded(b))):
        return 1 if cls.__name__ == "Conv1D" else None
    if not w.is_floating_point():
        return None
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    gen = torch.Generator().manual_seed(0)
    for out_dim in (0, 1):
        if b is not None and b.shape[0] != w.shape[out_dim]:
            continue
        x = torch.randn(3, w.shape[1 - out_dim], generator=gen, dtype=torch.float64).to(w.dtype).to(w.device)
        try:
            with torch.no_grad():
                y = m(x)
                ref = x @ (w.t() if out_dim == 0 else w) + (0 if b is None else b)
        except Exception:  # noqa: BLE001 - any failure: not this layout
            continue
        if isinstance(y, torch.Tensor) and y.shape == ref.shape and torch.allclose(y, ref, rtol=tol, atol=tol):
            return out_dim
    return None


# --------------------------------------------------------------------------------------------
# Neuron groups
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronGroup:
    """One set of neurons (channels) removed together.

    Neuron ``i`` is slice ``i`` along ``incoming_dims`` of every tensor named in ``incoming``
    (the producers' weights and biases, the per-channel parameters of ``BatchNorm`` and
    depthwise convolutions in between) and of every tensor named in ``outgoing`` along
    ``outgoing_dims`` (the consumers' weights; a consumer reached through ``flatten`` owns
    several columns per neuron and is left out of ``outgoing``, as ``group_dim`` cannot express
    it). ``producers`` write the channels, ``consumers`` read them, ``norms`` are the
    per-channel modules in between (``BatchNorm``, depthwise convolutions).

    ``kind``: ``"linear"``/``"conv1d"``/``"conv2d"``/``"conv3d"`` (one producer), ``"gated"``
    (producers joined by a product, e.g. a SwiGLU MLP), ``"residual"`` (several producers
    writing into one sum), ``"depthwise"`` (a chain through a depthwise convolution),
    ``"ffn"`` (the feed-forward block of ``nn.TransformerEncoderLayer``) or ``"manual"``
    (:class:`Neurons`).
    """

    name: str
    kind: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    neurons: int
    incoming: tuple[str, ...]
    incoming_dims: tuple[int, ...]
    outgoing: tuple[str, ...]
    outgoing_dims: tuple[int, ...]
    steps: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    flatten: bool = False
    note: str = ""
    # for shrink: (weight name, neuron dim) of each producer; (module, weight name, dim) of each
    # consumer (every consumer, flattened ones included); buffers sliced with the neurons
    weights_in: tuple[tuple[str, int], ...] = ()
    reads: tuple[tuple[str, str, int], ...] = ()
    buffers: tuple[str, ...] = ()

    @property
    def producer(self) -> str:
        """The first producer."""
        return self.producers[0] if self.producers else ""

    @property
    def consumer(self) -> str:
        """The first consumer."""
        return self.consumers[0] if self.consumers else ""

    @property
    def chain(self) -> str:
        """The per-channel operations between producers and consumers, e.g. ``'relu'``."""
        return " -> ".join(self.steps) or "(none)"

    @property
    def params(self) -> tuple[str, ...]:
        return self.incoming + self.outgoing


@dataclass(frozen=True)
class Neurons:
    """A neuron group declared by hand, for what :func:`find_neurons` cannot see.

    ``incoming``: parameter names (neurons along dim 0) or ``(name, dim)`` pairs: the
    producers' weights and biases and every per-channel parameter; ``outgoing``: the consumers'
    weights as names (neurons along dim 1) or ``(name, dim)`` pairs (several consecutive
    entries per neuron when that dim is a multiple of the neuron count). Names are those of
    ``model.named_parameters()``; a ``BatchNorm`` whose weight is listed has its running
    statistics sliced with it. Automatic groups sharing a parameter with a declared one are
    dropped. Pass them as ``groups=[...]`` to :func:`find_neurons`, :func:`neuron_prox`,
    :func:`report` and :func:`shrink`::

        mlp = autosize.Neurons(incoming=["fc1.weight", "fc1.bias"], outgoing=["fc2.weight"])
        prox, skipped = autosize.neuron_prox(model, pf.l21(0.01), groups=[mlp])

    ``shrink`` removes a neuron whose outgoing slices are all zero, or whose incoming weights
    (tensors of 2 or more dims) are all zero when its constant output can be folded into the
    consumers' biases; the shrunk model's outputs are checked as for automatic groups.
    """

    incoming: Sequence[str | tuple[str, int]]
    outgoing: Sequence[str | tuple[str, int]] = ()
    name: str | None = None


@dataclass
class Plan:
    """The neuron groups of a module (``groups``) and the modules with parameters they do not
    cover (``skipped``: ``{module name: reason}``)."""

    groups: list[NeuronGroup]
    skipped: dict[str, str]
    outputs: set[str] = field(default_factory=set)  # skipped because their channels leave the model
    untraced: dict[str, str] = field(default_factory=dict)  # {module: why torch.fx could not trace it}

    def prox(self, op: Prox | Callable[..., Prox], *, outgoing: bool = False) -> partition:
        """The auto-sizing operator over ``dict(model.named_parameters())``.

        ``op`` is a group operator instance (``pf.linf1(0.005)``; it is rebuilt with the
        right ``group_dim`` for every group) or a factory called as ``op(group_dim=...)``.
        One tuple rule per neuron group: its ``incoming`` tensors (and its ``outgoing`` ones
        with ``outgoing=True``) with their neuron dims as ``group_dim``. Everything else
        passes through unchanged.
        """
        return partition([(names, _make_op(op, dims)) for names, dims in self.rule_names(outgoing=outgoing)])

    def rule_names(self, *, outgoing: bool = False) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
        """The tuple rules :meth:`prox` builds: ``[(names, group_dims), ...]``. A tensor is in
        one rule at most (blocks of a separable sum are disjoint): an outgoing weight that is
        another group's incoming weight is left to that group."""
        claimed = {n for g in self.groups for n in g.incoming}
        out = []
        for g in self.groups:
            names, dims = list(g.incoming), list(g.incoming_dims)
            if outgoing:
                for n, d in zip(g.outgoing, g.outgoing_dims):
                    if n not in claimed:
                        names.append(n)
                        dims.append(d)
                        claimed.add(n)
            out.append((tuple(names), tuple(dims)))
        return out

    def report(self, model: nn.Module, params: Mapping[str, torch.Tensor] | None = None) -> Report:
        """See :func:`report`."""
        return _report(self, model, params)

    def __str__(self) -> str:
        lines = ["neuron groups:"]
        for g in self.groups:
            prod = ", ".join(g.producers)
            cons = ", ".join(g.consumers)
            lines.append(f"  {g.name} ({g.kind}, {g.neurons} neurons): {prod} -> {g.chain} -> {cons}")
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
# Tracing with torch.fx
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


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


class _Tracer(fx.Tracer):
    """torch.fx's tracer that keeps going: a submodule whose ``forward`` cannot be traced
    (data-dependent control flow, iterating a shape...) becomes an opaque leaf of the graph and
    is recorded in ``untraced`` with the error; it is analysed on its own afterwards. Layers,
    normalisations and activations are leaves. It sees through FSDP2: a module that
    ``fully_shard`` made an ``FSDPLinear`` is a leaf as its ``nn.Linear`` was, and a sharded
    module traced through runs its ``forward`` without FSDP's hooks (they would all-gather
    parameters while tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.untraced: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.untraced or isinstance(m, _TRANSFORMER_LAYERS):
            return True
        if _is_hf_activation(m) or _is_channel_norm(m) or _linear_like(m) is not None:
            return True
        cls = _original_class(m)
        if cls is not type(m):
            return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(cls, nn.Sequential)
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if _original_class(m) is not type(m):
            forward = m.forward
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        count = len(self.graph.nodes)
        stack, calls = OrderedDict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure: keep the module whole
            for node in reversed(list(self.graph.nodes)[count:]):
                self.graph.erase_node(node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.untraced[qualname] = _short(e)
            return super().call_module(m, forward, args, kwargs)


def _trace(module: nn.Module) -> tuple[fx.Graph, dict[str, str]]:
    """The graph of ``module.forward`` called with its required positional arguments (at least
    one; the others keep their defaults), and the submodules kept whole."""
    sig = inspect.signature(module.forward)
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if not positional:
        positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:1]
    names = [p.name for p in positional]
    # a root with the module's children and tensors under the same names; its forward has
    # plain positional arguments (fx cannot patch a forward taking **kwargs behind a decorator)
    cls = type("_Root", (nn.Module,), {"forward": None})
    root = cls()
    root._modules = module._modules
    root._parameters = module._parameters
    root._buffers = module._buffers
    namespace: dict[str, Any] = {}
    arglist = ", ".join(names)
    exec(f"def forward(self, {arglist}):\n    return _f({arglist})\n", {"_f": module.forward}, namespace)
    cls.forward = namespace["forward"]
    tracer = _Tracer()
    graph = tracer.trace(root)
    return graph, tracer.untraced


# --------------------------------------------------------------------------------------------
# Following channels through the graph
# --------------------------------------------------------------------------------------------
@dataclass
class _Space:
    """A set of channels that must be removed together (a union-find class)."""

    order: int
    n: int | None = None
    layout: str = "any"  # "last" (Linear-like), "chan1" (convolutions) or "any" (a source)
    producers: list = field(default_factory=list)  # (module, weight, dim, bias or None)
    norms: list = field(default_factory=list)  # per-channel modules (BatchNorm, depthwise conv)
    params: list = field(default_factory=list)  # (name, dim) of per-channel parameters
    buffers: list = field(default_factory=list)  # names of per-channel buffers
    reads: list = field(default_factory=list)  # (module, weight, dim, through flatten)
    steps: list = field(default_factory=list)
    joins: set = field(default_factory=set)
    blocked: str | None = None
    output: bool = False
    source: str | None = None  # what it is when not written by a layer


@dataclass(frozen=True)
class _Val:
    sid: int
    layout: str  # "last", "chan1", "flat" (a convolution's channels after flatten) or "any"


class _Graph:
    """Union-find over channel sets, filled by walking one fx graph."""

    def __init__(self, root: nn.Module, prefix: str, tied: dict[str, str]):
        self.root = root
        self.prefix = prefix
        self.tied = tied
        self.where = f"the module {prefix[:-1]}" if prefix else "the model"
        self.parent: dict[int, int] = {}
        self.spaces: dict[int, _Space] = {}
        self.env: dict[fx.Node, _Val | None] = {}
        self.ffn: list[str] = []
        self.kept: dict[str, str] = {}  # opaque modules holding parameters

    # union-find
    def new(self, **kw: Any) -> int:
        sid = len(self.parent)
        self.parent[sid] = sid
        self.spaces[sid] = _Space(order=sid, **kw)
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def space(self, sid: int) -> _Space:
        return self.spaces[self.find(sid)]

    def block(self, sid: int, reason: str, *, output: bool = False) -> None:
        s = self.space(sid)
        if s.blocked is None:
            s.blocked = reason
        s.output = s.output or output

    def union(self, a: int, b: int, desc: str, join: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.order > sb.order:
            ra, rb, sa, sb = rb, ra, sb, sa
        self.parent[rb] = ra
        for src, dst in ((sa, sb), (sb, sa)):
            if src.source is not None and dst.source is None and dst.blocked is None:
                dst.blocked = f"its output is combined with {src.source} in {desc}"
        if sa.n is not None and sb.n is not None and sa.n != sb.n:
            sa.blocked = sa.blocked or f"{desc} joins {sa.n} and {sb.n} channels (broadcast)"
        sa.n = sa.n if sa.n is not None else sb.n
        if sa.layout == "any":
            sa.layout = sb.layout
        elif sb.layout not in ("any", sa.layout):
            sa.blocked = sa.blocked or f"{desc} joins channels laid out differently"
        sa.producers += sb.producers
        sa.norms += sb.norms
        sa.params += sb.params
        sa.buffers += sb.buffers
        sa.reads += sb.reads
        sa.steps += [s for s in sb.steps if s not in sa.steps]
        sa.joins |= sb.joins | {join}
        sa.blocked = sa.blocked or sb.blocked
        sa.output = sa.output or sb.output
        if sa.source is None or sb.source is None:
            sa.source = None if sa.producers else (sa.source or sb.source)
        return ra

    def val(self, a: Any) -> _Val | None:
        return self.env.get(a) if isinstance(a, fx.Node) else None

    def vals(self, node: fx.Node) -> list[_Val]:
        return [v for v in (self.env.get(n) for n in node.all_input_nodes) if v is not None]

    def opaque(self, node: fx.Node, reason: str, source: str) -> None:
        for v in self.vals(node):
            self.block(v.sid, reason)
        self.env[node] = _Val(self.new(source=source), "any")

    def step(self, node: fx.Node, v: _Val, desc: str, layout: str | None = None) -> None:
        s = self.space(v.sid)
        if desc not in s.steps:
            s.steps.append(desc)
        self.env[node] = _Val(v.sid, layout or v.layout)

    # the walk
    def run(self, graph: fx.Graph, untraced: dict[str, str]) -> None:
        modules = dict(self.root.named_modules())
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op == "placeholder":
                self.env[node] = _Val(self.new(source=f"the input '{node.target}' of {self.where}"), "any")
            elif node.op == "get_attr":
                self.env[node] = _Val(self.new(source=f"the tensor {self.prefix}{node.target}"), "any")
                owner = str(node.target).rpartition(".")[0]
                self.kept.setdefault(
                    self.prefix + owner if owner else self.prefix[:-1],
                    f"its tensor {node.target} is used directly by forward, not through a layer call",
                )
            elif node.op == "output":
                for v in self.vals(node):
                    self.block(v.sid, f"output layer: its outputs leave {self.where}", output=True)
            elif node.op == "call_module":
                self.module(node, modules[node.target], calls[node.target], untraced)
            else:
                self.function(node)

    def _layer_block(self, name: str, m: nn.Module, ncalls: int) -> str | None:
        if ncalls > 1:
            return f"it is called {ncalls} times in forward (shared weights)"
        for attr, _p in m.named_parameters(recurse=False):
            other = self.tied.get(f"{name}.{attr}")
            if other is not None:
                return f"its {attr} is shared with {other} (tied parameters)"
        return None

    def module(self, node: fx.Node, m: nn.Module, ncalls: int, untraced: dict[str, str]) -> None:
        name = self.prefix + str(node.target)
        cls = _original_class(m).__name__
        x = self.val(node.args[0]) if node.args else None
        shared = self._layer_block(name, m, ncalls)
        out_dim = _linear_like(m)
        conv = isinstance(m, _CONV_MODULES)
        if out_dim is not None or isinstance(m, nn.Embedding) or (conv and m.groups == 1):
            if x is not None and not isinstance(m, nn.Embedding):
                wanted = ("chan1", "any") if conv else ("last", "flat", "any")
                if shared:
                    self.block(x.sid, f"it feeds {name}: {shared}")
                elif x.layout not in wanted:
                    self.block(x.sid, f"{name} reads it along another dimension than its channels")
                else:
                    in_dim = 1 - out_dim if out_dim is not None else 1
                    s = self.space(x.sid)
                    s.reads.append((name, f"{name}.weight", in_dim, x.layout == "flat"))
            w = m.weight
            if isinstance(m, nn.Embedding):
                dim, bias, n, layout = 1, None, w.shape[1], "last"
            else:
                dim = out_dim if out_dim is not None else 0
                bias = f"{name}.bias" if getattr(m, "bias", None) is not None else None
                n, layout = w.shape[dim], ("chan1" if conv else "last")
            sid = self.new(n=n, layout=layout, producers=[(name, f"{name}.weight", dim, bias)])
            if shared:
                self.block(sid, shared)
            self.env[node] = _Val(sid, layout)
            return
        if conv:  # grouped convolution
            if x is None:
                self.env[node] = _Val(self.new(source=f"the output of {name}"), "any")
                return
            if not _is_depthwise(m) or shared:
                why = shared or f"grouped convolution (groups={m.groups})"
                self.block(x.sid, f"it feeds {name}: {why}")
                bias = f"{name}.bias" if m.bias is not None else None
                sid = self.new(n=m.out_channels, layout="chan1", producers=[(name, f"{name}.weight", 0, bias)])
                self.block(sid, why)
                self.env[node] = _Val(sid, "chan1")
                return
            self._per_channel(node, x, name, m, cls, ("chan1", "any"))
            return
        if isinstance(m, _BN_MODULES):
            if x is None:
                self.env[node] = None
                return
            if shared:
                self.block(x.sid, f"it goes through {name}: {shared}")
            ok = ("last", "chan1", "any") if isinstance(m, nn.BatchNorm1d) else ("chan1", "any")
            self._per_channel(node, x, name, m, cls, ok)
            return
        if isinstance(m, _DROPOUT_MODULES) or isinstance(m, _ACT_MODULES) or _is_hf_activation(m):
            desc = cls.lower() if isinstance(m, _DROPOUT_MODULES) else cls
            if x is None:
                self.env[node] = None
            else:
                self.step(node, x, desc)
            return
        if isinstance(m, nn.PReLU) and m.num_parameters == 1 and x is not None:
            self.step(node, x, cls)
            return
        if isinstance(m, _POOL_MODULES) and x is not None:
            if x.layout in ("chan1", "any"):
                self.step(node, x, cls)
            else:
                self.opaque(node, f"{cls} after a Linear mixes its neurons with other dims", f"the output of {name}")
            return
        if isinstance(m, nn.Flatten) and x is not None:
            if m.start_dim == 1 and m.end_dim == -1 and x.layout in ("chan1", "any"):
                self.step(node, x, "Flatten", "flat")
            else:
                self.opaque(node, f"{name} flattens dims {m.start_dim}..{m.end_dim}", f"the output of {name}")
            return
        if isinstance(m, _TRANSFORMER_LAYERS):
            self.ffn.append(name)
            why = f"its output goes through the transformer layer {name} ({cls}), which mixes channels"
        elif isinstance(m, _TRANSFORMER_STACKS):  # a leaf for torch.fx: its layers' blocks are groups
            self.ffn += [
                f"{name}.layers.{i}" for i, layer in enumerate(m.layers) if isinstance(layer, _TRANSFORMER_LAYERS)
            ]
            why = f"its output goes through the transformer {name} ({cls}), which mixes channels"
        elif node.target in untraced:
            why = f"its output goes through {name}, which torch.fx could not trace ({untraced[node.target]})"
        elif _is_channel_norm(m):
            why = f"its output goes through {name} ({cls}), which normalises across channels"
        else:
            why = f"its output goes through {name} ({cls}), which is not known to act on each channel alone"
        self.opaque(node, why, f"the output of {name} ({cls})")
        if any(True for _ in m.parameters(recurse=False)) and not _is_channel_norm(m):
            self.kept[name] = f"{cls} is kept whole: auto-sizing does not know how its channels map to its parameters"

    def _per_channel(self, node: fx.Node, x: _Val, name: str, m: nn.Module, cls: str, layouts: tuple) -> None:
        s = self.space(x.sid)
        n = m.out_channels if isinstance(m, _CONV_MODULES) else m.num_features
        if x.layout not in layouts:
            self.block(x.sid, f"{name} ({cls}) acts along another dimension than its channels")
        elif s.n is not None and s.n != n:
            self.block(x.sid, f"{name} ({cls}) has {n} channels, not {s.n}")
        s = self.space(x.sid)
        s.n = n if s.n is None else s.n
        s.norms.append(name)
        s.params += [(f"{name}.{a}", 0) for a in ("weight", "bias") if getattr(m, a, None) is not None]
        s.buffers += [f"{name}.{a}" for a in ("running_mean", "running_var") if getattr(m, a, None) is not None]
        self.step(node, x, cls, "chan1" if x.layout == "any" and not isinstance(m, nn.BatchNorm1d) else None)

    def function(self, node: fx.Node) -> None:
        target = node.target
        args = tuple(node.args)
        method = node.op == "call_method"
        desc = f".{target}()" if method else _fn_name(target)
        first = self.val(args[0]) if args else None
        if (method and target in _META_METHODS) or (target is getattr and len(args) > 1 and args[1] in _META_ATTRS):
            self.env[node] = None
            return
        if target is getattr or target is operator.getitem:
            if first is None:
                self.env[node] = None
            elif self.space(first.sid).blocked is not None or self.space(first.sid).source is not None:
                self.env[node] = first  # a part of an opaque value stays opaque
            else:
                self.opaque(node, f"its output is indexed ({_fn_name(target)})", f"a part of {desc}")
            return
        vals = self.vals(node)
        if not vals:
            self.env[node] = None
            return
        join = _BINARY_METHODS.get(target) if method else _BINARY_OPS.get(target)
        if join is not None and len(args) >= 2 and not node.kwargs.get("alpha"):
            a, b = self.val(args[0]), self.val(args[1])
            if a is not None and b is not None:
                if "flat" in (a.layout, b.layout) and a.layout != b.layout:
                    self.opaque(node, f"{join} of flattened and unflattened channels", f"the output of {desc}")
                    return
                sid = self.union(a.sid, b.sid, join, join)
                layout = a.layout if a.layout != "any" else b.layout
                self.env[node] = _Val(sid, layout)
                return
            v = a if a is not None else b
            other = args[1] if a is not None else args[0]
            if isinstance(other, (int, float)) or (isinstance(other, fx.Node) and self.val(other) is None):
                self.step(node, v, f"{join} {other!r}" if isinstance(other, (int, float)) else f"{join} (number)")
                return
        elif (
            first is not None
            and args
            and (
                (method and target in _ACT_METHODS)
                or (not method and (target in _ACT_FUNCTIONS or target in _DROPOUT_FUNCTIONS))
            )
        ):
            others = [n for n in node.all_input_nodes if n is not args[0] and self.env.get(n) is not None]
            if not others or target in ("to", "type_as"):
                name = "dropout" if target in _DROPOUT_FUNCTIONS else (str(target) if method else _fn_name(target))
                self.step(node, first, name)
                return
        elif first is not None and (target == "flatten" or target is torch.flatten):
            rest, kw = args[1:], dict(node.kwargs)
            start = rest[0] if rest else kw.get("start_dim", 0)
            end = rest[1] if len(rest) > 1 else kw.get("end_dim", -1)
            if start == 1 and end == -1 and first.layout in ("chan1", "any") and len(vals) == 1:
                self.step(node, first, "flatten", "flat")
                return
            self.opaque(node, "its output is flattened other than with start_dim=1", "a flattened value")
            return
        elif first is not None and not method and target in _POOL_FUNCTIONS and len(vals) == 1:
            if first.layout in ("chan1", "any"):
                self.step(node, first, _fn_name(target))
                return
        self.opaque(
            node,
            f"its output goes through {desc}, which is not known to act on each channel alone",
            f"the output of {desc}",
        )

    def groups(self) -> tuple[list[NeuronGroup], dict[str, str], set[str]]:
        groups, reasons, outputs = [], dict(self.kept), set()
        roots = sorted({self.find(s) for s in self.spaces}, key=lambda r: self.spaces[r].order)
        for r in roots:
            s = self.spaces[r]
            if not s.producers:  # per-channel modules on channels no layer writes (e.g. the input)
                for m in s.norms:
                    reasons.setdefault(m, s.blocked or f"its channels come from {s.source or 'no layer'}")
                continue
            why = s.blocked
            if why is None and not s.reads:
                why = "its output is never used"
            if why is not None:
                for p in s.producers:
                    reasons.setdefault(p[0], why)
                    if s.output:
                        outputs.add(p[0])
                for m in s.norms:
                    reasons.setdefault(m, why)
                continue
            groups.append(_group_of(s, self.root, self.prefix))
        return groups, reasons, outputs


def _group_of(s: _Space, root: nn.Module, prefix: str) -> NeuronGroup:
    incoming, dims, weights_in = [], [], []
    for _, w, d, b in s.producers:
        incoming.append(w)
        dims.append(d)
        weights_in.append((w, d))
        if b is not None:
            incoming.append(b)
            dims.append(0)
    for p, d in s.params:
        incoming.append(p)
        dims.append(d)
    outgoing, out_dims, notes = [], [], []
    reads = []
    for m, w, d, flat in s.reads:  # through flatten after global pooling: one column per channel
        size = root.get_submodule(m[len(prefix) :]).weight.shape[d]
        reads.append((m, w, d, flat and size != s.n))
    for m, w, d, flat in reads:
        if flat:
            notes.append(f"outgoing weights of {m} not grouped: flatten between")
        else:
            outgoing.append(w)
            out_dims.append(d)
    first = root.get_submodule(s.producers[0][0][len(prefix) :])
    if any(_is_depthwise(root.get_submodule(m[len(prefix) :])) for m in s.norms):
        kind = "depthwise"
    elif "mul" in s.joins or "div" in s.joins:
        kind = "gated"
    elif len(s.producers) > 1:
        kind = "residual"
    elif isinstance(first, _CONV_MODULES):
        kind = f"conv{first.weight.dim() - 2}d"
    elif isinstance(first, nn.Embedding):
        kind = "embedding"
    else:
        kind = "linear"
    return NeuronGroup(
        name=s.producers[0][0],
        kind=kind,
        producers=tuple(p[0] for p in s.producers),
        consumers=tuple(r[0] for r in s.reads),
        neurons=int(s.n),
        incoming=tuple(incoming),
        incoming_dims=tuple(dims),
        outgoing=tuple(outgoing),
        outgoing_dims=tuple(out_dims),
        steps=tuple(s.steps),
        norms=tuple(s.norms),
        flatten=any(r[3] for r in reads),
        note="; ".join(notes),
        weights_in=tuple(weights_in),
        reads=tuple((m, w, d) for m, w, d, _ in s.reads),
        buffers=tuple(s.buffers),
    )


def _ffn_group(layer: nn.Module, name: str) -> NeuronGroup:
    l1 = layer.linear1
    base = f"{name}." if name else ""
    incoming = [f"{base}linear1.weight"] + ([f"{base}linear1.bias"] if l1.bias is not None else [])
    act = layer.activation
    desc = type(act).__name__ if isinstance(act, nn.Module) else _fn_name(act)
    return NeuronGroup(
        name=f"{base}linear1",
        kind="ffn",
        producers=(f"{base}linear1",),
        consumers=(f"{base}linear2",),
        neurons=l1.out_features,
        incoming=tuple(incoming),
        incoming_dims=(0,) * len(incoming),
        outgoing=(f"{base}linear2.weight",),
        outgoing_dims=(1,),
        steps=(desc, "dropout"),
        weights_in=((f"{base}linear1.weight", 0),),
        reads=((f"{base}linear2", f"{base}linear2.weight", 1),),
    )


def _tied(model: nn.Module, prefix: str) -> dict[str, str]:
    """``{name: another name of the same tensor}`` for every parameter held by several modules."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(prefix + name)
    out = {}
    for names in seen.values():
        for n in names if len(names) > 1 else ():
            out[n] = next(o for o in names if o != n)
    return out


def _analyze(mod: nn.Module, prefix: str, plan: Plan, reasons: dict[str, str], tied: dict[str, str]) -> None:
    if isinstance(mod, _TRANSFORMER_LAYERS):
        plan.groups.append(_ffn_group(mod, prefix[:-1]))
        return
    try:
        graph, untraced = _trace(mod)
    except Exception as e:  # noqa: BLE001 - any tracing failure: look inside instead
        if not isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            plan.untraced[prefix[:-1] or "<model>"] = _short(e)
        for child_name, child in mod.named_children():
            _analyze(child, f"{prefix}{child_name}.", plan, reasons, tied)
        return
    g = _Graph(mod, prefix, tied)
    g.run(graph, untraced)
    groups, why, outputs = g.groups()
    plan.groups += groups
    plan.outputs |= outputs
    for k, v in why.items():
        reasons.setdefault(k, v)
    for name in g.ffn:
        plan.groups.append(_ffn_group(mod.get_submodule(name[len(prefix) :]), name))
    for qualname, msg in untraced.items():
        plan.untraced[prefix + qualname] = msg
    for qualname in untraced:  # the outermost ones; inner ones are found again on their own
        if not any(qualname.startswith(o + ".") for o in untraced):
            _analyze(mod.get_submodule(qualname), f"{prefix}{qualname}.", plan, reasons, tied)


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """``(model.module, "module.")`` for ``DistributedDataParallel``/``DataParallel`` (their
    ``forward`` broadcasts buffers and cannot be traced; the names keep the ``module.``
    prefix, as in ``model.named_parameters()``), else ``(model, "")``."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module."
    return model, ""


def _pairs(items: Sequence[str | tuple[str, int]], default: int, what: str) -> list[tuple[str, int]]:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append((it, default))
        elif isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[0], str) and isinstance(it[1], int):
            out.append((it[0], it[1]))
        else:
            raise TypeError(f"Neurons: {what} takes parameter names or (name, dim) pairs, got {it!r}")
    return out


def _manual_group(model: nn.Module, decl: Neurons, tied: dict[str, str]) -> NeuronGroup:
    if not isinstance(decl, Neurons):
        raise TypeError(f"autosize: groups takes autosize.Neurons declarations, got {type(decl).__name__}")
    params = dict(model.named_parameters())
    inc = _pairs(decl.incoming, 0, "incoming")
    out = _pairs(decl.outgoing, 1, "outgoing")
    if not inc:
        raise ValueError("Neurons: incoming must name at least one parameter")
    n = None
    for what, pairs in (("incoming", inc), ("outgoing", out)):
        for name, d in pairs:
            if name not in params:
                hint = f" (it is {tied[name]}, shared)" if name in tied else ""
                raise ValueError(f"Neurons: {what} names {name!r}, which is no parameter of the model{hint}")
            if name in tied:
                raise ValueError(f"Neurons: {what} names {name!r}, which is shared with {tied[name]} (tied)")
            p = params[name]
            if not -p.dim() <= d < p.dim():
                raise ValueError(f"Neurons: {what} dim {d} is out of range for {name!r} of shape {tuple(p.shape)}")
            size = p.shape[d]
            if what == "incoming":
                n = size if n is None else n
                if size != n:
                    raise ValueError(f"Neurons: incoming {name!r} has {size} entries along dim {d}, not {n}")
            elif size % n:
                raise ValueError(f"Neurons: outgoing {name!r} has {size} entries along dim {d}, not a multiple of {n}")
    inc = [(k, d % params[k].dim()) for k, d in inc]
    out = [(k, d % params[k].dim()) for k, d in out]
    owner = lambda k: k.rpartition(".")[0]  # noqa: E731
    producers = list(dict.fromkeys(owner(k) for k, _ in inc if params[k].dim() >= 2))
    buffers = []
    norms = []
    for k, _ in inc:
        mod = model.get_submodule(owner(k)) if owner(k) else model
        if isinstance(mod, _BN_MODULES) and k.endswith(".weight") and owner(k) not in norms:
            norms.append(owner(k))
            buffers += [f"{owner(k)}.{a}" for a in ("running_mean", "running_var") if getattr(mod, a) is not None]
    return NeuronGroup(
        name=decl.name or (producers[0] if producers else owner(inc[0][0])),
        kind="manual",
        producers=tuple(producers),
        consumers=tuple(dict.fromkeys(owner(k) for k, _ in out)),
        neurons=int(n),
        incoming=tuple(k for k, _ in inc),
        incoming_dims=tuple(d for _, d in inc),
        outgoing=tuple(k for k, d in out if params[k].shape[d] == n),
        outgoing_dims=tuple(d for k, d in out if params[k].shape[d] == n),
        norms=tuple(norms),
        flatten=any(params[k].shape[d] != n for k, d in out),
        weights_in=tuple((k, d) for k, d in inc if params[k].dim() >= 2),
        reads=tuple((owner(k), k, d) for k, d in out),
        buffers=tuple(buffers),
    )


def find_neurons(model: nn.Module, *, groups: Sequence[Neurons] = ()) -> Plan:
    """Find the neuron groups of ``model``: the channels that can be auto-sized.

    Traces ``model.forward`` with :mod:`torch.fx` (called with its required positional
    arguments, at least one; the others keep their defaults). Layers, normalisations,
    Hugging Face activations and ``nn.TransformerEncoderLayer``/``TransformerDecoderLayer``
    are leaves; a submodule that cannot be traced is kept whole (its inputs and outputs are
    opaque) and analysed on its own, and when ``forward`` itself cannot be traced each child
    is; ``plan.untraced`` names them with the error. Every channel is followed through the
    graph (see the module docstring); a group is a set of channels written by one or more
    layers and read by one or more layers, passing through nothing but per-channel
    operations. Feed-forward blocks of the transformer layers are groups too. ``groups``
    adds groups declared by hand (:class:`Neurons`).

    Distributed models give the plain model's groups, with nothing communicated: under
    ``DistributedDataParallel`` those of ``model.module``, named ``module.<name>`` as in
    ``model.named_parameters()``; a model sharded with FSDP2's ``fully_shard`` the same names
    and full sizes (``neurons`` counts the whole layer, not a rank's shard).

    Returns a :class:`Plan`: ``plan.groups`` and ``plan.skipped``, ``{module: reason}`` for
    every module holding parameters that no group covers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"autosize: model must be an nn.Module, got {type(model).__name__}")
    plan = Plan(groups=[], skipped={})
    reasons: dict[str, str] = {}
    inner, prefix = _unwrapped(model)
    tied = _tied(inner, prefix)
    # probe every module before tracing: a module called while fx traces would be traced
    probed = {id(m): _linear_like(m) for m in inner.modules()}
    _PROBED.update(probed)
    try:
        _analyze(inner, prefix, plan, reasons, tied)
    finally:
        for k in probed:
            _PROBED.pop(k, None)
    if groups:
        manual = [_manual_group(model, d, tied) for d in groups]
        taken = {n for g in manual for n in g.params}
        plan.groups = [g for g in plan.groups if not taken & set(g.params)] + manual
    covered = {m for g in plan.groups for m in (*g.producers, *g.norms)}
    covered |= {k.rpartition(".")[0] for g in plan.groups for k in g.incoming}
    ffn_layers = {g.producer.rpartition(".")[0]: g for g in plan.groups if g.kind == "ffn"}
    for name, m in model.named_modules():
        if name in covered or not any(p is not None for p in m._parameters.values()):
            continue
        reason = reasons.get(name)
        if reason is None:
            owner = next((o for o in _ancestors(name) if isinstance(_get(model, o), nn.MultiheadAttention)), None)
            layer = next((o for o in _ancestors(name) if o in ffn_layers), None)
            if owner is not None:
                reason = f"projection inside the attention module {owner or '<root>'} (not a hidden layer)"
                plan.outputs.add(name)
            elif layer is not None and name == ffn_layers[layer].consumer:
                reason = "consumer of a transformer feed-forward block (its outputs leave the block)"
                plan.outputs.add(name)
            elif layer is not None:
                reason = f"inside the transformer layer {layer or '<root>'} (only its feed-forward block is auto-sized)"
            elif isinstance(m, nn.MultiheadAttention):
                reason = "attention module (its projections mix channels across heads)"
            elif _is_channel_norm(m):
                reason = f"{type(m).__name__} normalises across channels"
            else:
                untraced = next((o for o in _ancestors(name) if o in plan.untraced), None)
                if untraced is not None:
                    msg = plan.untraced[untraced]
                    reason = f"inside {untraced or 'the model'}, which torch.fx could not trace ({msg})"
                else:
                    reason = f"{type(m).__name__} is not called by the traced forward"
        plan.skipped[name] = reason
    return plan


def _ancestors(name: str) -> list[str]:
    """``'a.b.c'`` -> ``['a.b', 'a', '']``... and the name itself first."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def neuron_prox(
    model: nn.Module, op: Prox | Callable[..., Prox], *, outgoing: bool = False, groups: Sequence[Neurons] = ()
) -> NeuronProx:
    """The auto-sizing operator of ``model`` and the modules it does not cover.

    Returns ``(prox, skipped)``: ``prox`` is a :class:`proxfunc.partition` over
    ``dict(model.named_parameters())`` with ``prox(params, step)`` equal to

        argmin_z  sum_groups sum_i g(neuron_i(z)) + ||z - params||^2 / (2 * step),

    where ``neuron_i`` is slice ``i`` of the group's incoming tensors (producers' weights and
    biases, ``BatchNorm`` scale/shift, depthwise filters), plus slice ``i`` of the consumers'
    weights when ``outgoing=True`` (unless that weight is itself a group's incoming weight:
    blocks of a separable sum must be disjoint); ``g`` is the group penalty of ``op``
    (``pf.linf1(reg)``, ``pf.l21(reg)``, or any factory ``op(group_dim=...)``). Parameters
    of other layers pass through unchanged. ``skipped`` maps each uncovered module to the
    reason; ``result.plan`` is the :class:`Plan`. ``groups`` adds :class:`Neurons` declared by
    hand. Warns when no group is found (the prox would do nothing) and when part of the
    model could not be traced. Murray & Chiang (2015); Murray et al. (2019).
    """
    plan = find_neurons(model, groups=groups)
    if plan.untraced:
        parts = "; ".join(f"{k}: {v}" for k, v in list(plan.untraced.items())[:6])
        more = f" (and {len(plan.untraced) - 6} more)" if len(plan.untraced) > 6 else ""
        warnings.warn(
            f"autosize: torch.fx could not trace {len(plan.untraced)} part(s) of {type(model).__name__}, kept whole "
            f"and analysed on their own: {parts}{more}",
            stacklevel=2,
        )
    if not plan.groups:
        parts = "; ".join(f"{k}: {v}" for k, v in list(plan.skipped.items())[:6])
        warnings.warn(
            f"autosize: no neuron group found in {type(model).__name__}, so the prox changes nothing "
            f"({parts}); declare groups with autosize.Neurons",
            stacklevel=2,
        )
    return NeuronProx(plan.prox(op, outgoing=outgoing), dict(plan.skipped), plan)


def functional_call(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    args: Any,
    kwargs: dict | None = None,
    *,
    buffers: Mapping[str, torch.Tensor] | None = None,
):
    """``torch.func.functional_call(model, (params, buffers), args, kwargs)``: ``model`` run
    with ``params`` (e.g. the dict a functional auto-sizing loop trains) and ``buffers``
    (default: the model's own).

    A ``BatchNorm`` in training mode updates its running statistics in place; under
    ``torch.func.grad`` (or ``vmap``) the buffers must then be an input of the transformed
    function, not tensors it captures::

        buffers = {k: v.clone() for k, v in model.named_buffers()}
        loss = lambda p, b: F.cross_entropy(autosize.functional_call(model, p, x, buffers=b), y)
        grads = torch.func.grad(loss)(params, buffers)   # buffers updated in place

    The error torch raises otherwise is raised again naming this pattern.
    """
    if buffers is None:
        buffers = {k: v for k, v in model.named_buffers() if k not in params}
    try:
        return torch.func.functional_call(model, (dict(params), dict(buffers)), args, kwargs)
    except RuntimeError as e:
        msg = str(e)
        if "in-place" in msg or "running_mean" in msg or "captured Tensor" in msg:
            raise RuntimeError(
                f"autosize.functional_call: {msg.splitlines()[0]} -- a BatchNorm in training mode updates its "
                "running statistics in place; under torch.func.grad/vmap pass the buffers as an input of the "
                "transformed function: grad(lambda p, b: loss(functional_call(model, p, x, buffers=b)))(params, "
                "buffers), or call model.eval() to use frozen statistics"
            ) from e
        raise


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerReport:
    """One row of a :class:`Report`. The counts that need the values are ``None`` when the
    tensors hold no values (meta device)."""

    name: str
    kind: str
    alive: int | None  # neurons with some nonzero incoming weight and some nonzero outgoing weight
    constant: int | None  # neurons with all incoming weights zero (output independent of the input)
    total: int
    params: int  # parameters of the producers (weights + biases)
    params_alive: int | None  # of those, the ones belonging to live neurons
    sparsity: float | None  # fraction of exactly-zero producer parameters


def _sum(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


@dataclass(frozen=True)
class Report:
    """Live neurons per group. ``str(report)`` is a table; ``report.rows`` the numbers."""

    rows: tuple[LayerReport, ...]

    @property
    def alive(self) -> int | None:
        return _sum(r.alive for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    def __str__(self) -> str:
        q = lambda v: "?" if v is None else str(v)  # noqa: E731
        head = ("layer", "kind", "alive/total", "constant", "params", "params alive", "sparsity")
        body = [
            (r.name, r.kind, f"{q(r.alive)}/{r.total}", q(r.constant), str(r.params), q(r.params_alive))
            + ("?" if r.sparsity is None else f"{100 * r.sparsity:.1f}%",)
            for r in self.rows
        ]
        p, pa = sum(r.params for r in self.rows), _sum(r.params_alive for r in self.rows)
        const = _sum(r.constant for r in self.rows)
        body.append(("total", "", f"{q(self.alive)}/{self.total}", q(const), str(p), q(pa), ""))
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        return "\n".join(lines)

    __repr__ = __str__


def _tensor(model: nn.Module, params: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    """The named tensor's whole value, detached: from ``params`` when it has it, else from
    ``model``. A ``DTensor`` (an FSDP2 shard) is gathered, a collective every rank joins."""
    if params is not None and name in params:
        t = params[name]
    else:
        mod_name, _, attr = name.rpartition(".")
        t = getattr(_get(model, mod_name), attr)
    return None if t is None else _full(t.detach())


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (``full_tensor()``: an all-gather), any other tensor as it is."""
    gather = getattr(t, "full_tensor", None)
    return t if gather is None else gather()


def _per_neuron(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``t`` as ``(n, rest)`` with neuron ``i``'s entries in row ``i`` (several consecutive
    entries along ``dim`` per neuron when ``t.shape[dim]`` is a multiple of ``n``)."""
    return t.movedim(dim, 0).reshape(n, -1)


def _masks(g: NeuronGroup, get: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero_in, zero_out): neurons whose producer weights are all zero, and those whose
    consumer weights are all zero (never, without consumers)."""
    n = g.neurons
    zero_in = None
    for name, d in g.weights_in:
        z = _per_neuron(get(name), d, n).eq(0).all(1)
        zero_in = z if zero_in is None else zero_in & z
    zero_out = None
    for _, name, d in g.reads:
        z = _per_neuron(get(name), d, n).eq(0).all(1)
        zero_out = z if zero_out is None else zero_out & z
    dev = get(g.incoming[0]).device
    false = torch.zeros(n, dtype=torch.bool, device=dev)
    return (false if zero_in is None else zero_in), (false if zero_out is None else zero_out)


def _report(plan: Plan, model: nn.Module, params: Mapping[str, torch.Tensor] | None) -> Report:
    rows = []
    get = lambda name: _tensor(model, params, name)  # noqa: E731
    for g in plan.groups:
        mine = [(k, d) for k, d in zip(g.incoming, g.incoming_dims) if k.rpartition(".")[0] in g.producers]
        tensors = [(get(k), d) for k, d in mine]
        total_p = sum(t.numel() for t, _ in tensors)
        per = sum(t.numel() // g.neurons for t, _ in tensors)
        if any(t.is_meta for t, _ in tensors) or any(get(w).is_meta for _, w, _ in g.reads):
            alive = constant = params_alive = sparsity = None
        else:
            zero_in, zero_out = _masks(g, get)
            a = ~(zero_in | zero_out)
            alive, constant, params_alive = int(a.sum()), int(zero_in.sum()), int(a.sum()) * per
            nz = sum(int(t.ne(0).sum()) for t, _ in tensors)
            sparsity = 1 - nz / total_p if total_p else 0.0
        rows.append(LayerReport(g.name, g.kind, alive, constant, g.neurons, total_p, params_alive, sparsity))
    return Report(tuple(rows))


def report(
    model: nn.Module, params: Mapping[str, torch.Tensor] | None = None, *, groups: Sequence[Neurons] = ()
) -> Report:
    """Live neurons of every neuron group of ``model``.

    ``params`` (e.g. the dict of a functional training loop) overrides the module's own
    parameters by name. Per group: ``alive`` neurons (some nonzero incoming weight and some
    nonzero outgoing weight; the others are removed by :func:`shrink`), ``constant`` neurons
    (all incoming weights zero: their output does not depend on the input), ``total``, the
    producers' parameter count, the part of it on live neurons, and its sparsity (fraction of
    exact zeros). ``print(report(model))`` prints a table. On the meta device (no values) the
    sizes are reported and the counts that need values are ``None`` (``?`` in the table).

    Distributed models: the numbers are those of the whole model on every rank. Under FSDP2
    each sharded weight is gathered (``DTensor.full_tensor()``, one layer at a time), so every
    rank must call ``report`` (as for any collective); under ``DistributedDataParallel`` each
    rank holds the whole model and nothing is communicated.
    """
    return _report(find_neurons(model, groups=groups), model, params)


# --------------------------------------------------------------------------------------------
# Shrink
# --------------------------------------------------------------------------------------------
def _padded(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding keeps a constant map constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    # nn.TransformerEncoderLayer's fused inference path would skip the hooks that record what
    # each consumer reads: with gradients enabled it runs its modules one by one
    fused = any(isinstance(m, _TRANSFORMER_LAYERS) for m in model.modules())
    with torch.set_grad_enabled(fused):
        out = model(*inputs)
    return [t.detach() for t in _tree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _dead_rows(m: nn.Module) -> int:
    """Neurons of a layer with all-zero weights (0 for a module that is not a layer)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.is_meta or _is_sharded(w):
        return 0
    if isinstance(m, nn.Embedding):
        d = 1
    else:
        d = _linear_like(m)
        if d is None:
            if not isinstance(m, _CONV_MODULES):
                return 0
            d = 0
    return int(_per_neuron(w.detach(), d, w.shape[d]).eq(0).all(1).sum())


def _constants(
    g: NeuronGroup, new: nn.Module, weights: dict, seen: dict[str, torch.Tensor]
) -> tuple[list, torch.Tensor, list[str]]:
    """For each consumer of ``g``: (module, per-neuron contribution ``(O, n)`` of a constant
    neuron, or None) and the neurons whose constant can be folded into every consumer."""
    n = g.neurons
    ok = torch.ones(n, dtype=torch.bool)
    out, why = [], []
    for mod_name, wname, d in g.reads:
        m = _get(new, mod_name)
        x = seen.get(mod_name)
        if x is None:
            why.append(f"{mod_name} is not called by forward on example_inputs")
            return [], torch.zeros(n, dtype=torch.bool), why
        w = weights[wname]
        ok = ok.to(w.device)
        lin = _linear_like(m)
        if lin is not None and lin == 1 - d:
            cols = x.reshape(-1, x.shape[-1])  # every row is one position
            r = cols.shape[-1] // n
            c = cols[0]
            uniform = (cols == c).all(0).reshape(n, r).all(1)
            w3 = _per_neuron(w, d, n).reshape(n, r, -1)  # (n, r, O)
            contrib = (w3 * c.reshape(n, r, 1).to(w.dtype)).sum(1).t()  # (O, n)
            if bool((~uniform).any()):
                why.append(f"{int((~uniform).sum())} constant neurons are not constant at the input of {mod_name}")
        elif isinstance(m, _CONV_MODULES) and m.groups == 1 and d == 1:
            xm = x.movedim(1, 0).reshape(n, -1)
            zval = xm[:, 0]
            uniform = (xm == zval[:, None]).all(1)
            padded = (zval != 0) & torch.tensor(_padded(m), device=zval.device)
            contrib = w.sum(tuple(range(2, w.dim()))) * zval.to(w.dtype)  # (O, n)
            if bool((~uniform).any()):
                why.append(f"{int((~uniform).sum())} constant channels are not uniform at the input of {mod_name}")
            if bool((uniform & padded).any()):
                why.append(
                    f"{int((uniform & padded).sum())} constant channels feed the zero-padded {mod_name}, where a "
                    "constant input is not constant at the border"
                )
            uniform = uniform & ~padded
        else:
            why.append(f"a constant neuron cannot be folded into {mod_name} ({type(m).__name__})")
            uniform = torch.zeros(n, dtype=torch.bool, device=w.device)
            contrib = None
        ok = ok & uniform & (torch.isfinite(contrib).all(0) if contrib is not None else uniform)
        if contrib is not None and getattr(m, "bias", None) is None and not isinstance(m, (nn.Linear, *_CONV_MODULES)):
            ok = ok & (contrib == 0).all(0)  # no bias to fold into
        out.append((mod_name, contrib))
    return out, ok, why


def shrink(
    model: nn.Module,
    example_inputs: Any,
    *,
    strict: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    groups: Sequence[Neurons] = (),
):
    """A new, smaller module computing the same function as ``model`` in eval mode.

    For every group found by :func:`find_neurons` (and every :class:`Neurons` in ``groups``),
    neuron ``i`` is removed when

    * its outgoing weights (column(s) ``i`` of every consumer) are all zero: it contributes
      nothing; or
    * its incoming weights (row ``i`` of every producer) are all zero: its value at each
      consumer's input is a constant (the biases through ``BatchNorm`` running statistics,
      activations, pooling, products...), read on ``example_inputs``. Then the consumer's
      output gains ``W_out[:, i] * z_i`` summed over the neuron's columns (for a convolution:
      over its kernel), which is folded into the consumer's bias. This is exact for a
      ``Linear`` consumer and for a convolution without zero padding (or when ``z_i = 0``);
      with zero padding a nonzero constant is not a constant at the border, so the neuron
      cannot be removed exactly.

    Every producer loses rows, every per-channel module (``BatchNorm``: weight, bias, running
    statistics; depthwise convolution: filters) loses entries, every consumer loses columns
    / input channels (``H*W`` columns per channel after ``flatten``). **A group keeps at least
    one neuron**, for ``Linear`` and convolution alike (PyTorch has no empty convolution or
    ``BatchNorm``): when all are removable, the first one with zero outgoing weights (else the
    first) stays, unfolded. Layers whose weights are shared (tied embeddings) are never in a
    group, so ties are kept and the parameter count never grows.

    ``example_inputs`` (a tensor or a tuple of positional inputs) gives the constants and is
    used to check the result: the outputs of the new module must match the original's to
    ``rtol``/``atol`` or ``RuntimeError`` is raised. The returned module is a deep copy in
    **eval mode** (folding through ``BatchNorm`` uses its running statistics; dropout is the
    identity). ``model`` is never modified.

    Refusals: with ``strict=True`` (default), a layer with removable neurons that cannot be
    shrunk exactly (not in any group, or constants that cannot be folded) raises
    ``NotImplementedError`` naming the layer and the reason; with ``strict=False`` those
    neurons are kept and a warning says why.

    Distributed models: under ``DistributedDataParallel`` its ``module`` is shrunk (wrap the
    result again). A model sharded with FSDP2 is refused with ``TypeError``: shrink
    ``gather(model, plain)`` on every rank, a plain module holding the whole state (the same
    result on every rank), then ``fully_shard`` the result; see :func:`gather`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"shrink: model must be an nn.Module, got {type(model).__name__}")
    model = _unwrapped(model)[0]
    if any(_is_sharded(p) for p in model.parameters()):
        raise TypeError(
            "shrink: the model's parameters are sharded (DTensor, e.g. FSDP2's fully_shard); on every "
            "rank, shrink a plain copy holding the whole state, shrink(autosize.gather(model, plain), "
            "example_inputs), then shard the result again"
        )
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    new = copy.deepcopy(model).eval()
    plan = find_neurons(new, groups=groups)
    problems: list[str] = []
    tied_before = {n for n in _tied(new, "")}

    # layers that have dead neurons but are in no group: refuse or warn
    for name, reason in plan.skipped.items():
        if name in plan.outputs:
            continue
        dead = _dead_rows(_get(new, name))
        if dead:
            problems.append(f"{name} has {dead} neurons with zero incoming weights but cannot be shrunk: {reason}")

    tensors = {**dict(new.named_parameters()), **dict(new.named_buffers())}
    weights = {k: v.detach().clone() for k, v in tensors.items()}
    get = weights.__getitem__
    masks = {g.name + str(i): _masks(g, get) for i, g in enumerate(plan.groups)}
    # what every consumer of a group with constant neurons reads, on example_inputs
    wanted = {r[0] for i, g in enumerate(plan.groups) for r in g.reads if bool((masks[g.name + str(i)][0]).any())}
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        _get(new, name).register_forward_pre_hook(lambda mod, args, _n=name: seen.__setitem__(_n, args[0].detach()))
        for name in wanted
    ]
    try:
        ref = _outputs(new, inputs)
    finally:
        for h in hooks:
            h.remove()

    slices: dict[str, dict[int, torch.Tensor]] = {}
    folds: dict[str, torch.Tensor] = {}
    depthwise = {name for name, m in new.named_modules() if _is_depthwise(m)}
    for i, g in enumerate(plan.groups):
        n = g.neurons
        zero_in, zero_out = masks[g.name + str(i)]
        remove = zero_out.clone()
        cand = zero_in & ~zero_out
        contribs: list = []
        take = torch.zeros_like(cand)
        if bool(cand.any()):
            contribs, ok, why = _constants(g, new, weights, seen)
            take = cand & ok.to(cand.device)
            if bool((cand & ~take).any()):
                problems.append(f"{g.name}: " + "; ".join(why or ["constant neurons cannot be folded"]))
        remove |= take
        if bool(remove.all()):  # a group keeps one neuron: a removable one, unfolded
            j = int(torch.nonzero(zero_out)[0]) if bool(zero_out.any()) else 0
            remove[j] = False
            take[j] = False
        if bool(take.any()):
            for mod_name, contrib in contribs:
                f = contrib[:, take].sum(1)
                folds[mod_name] = folds[mod_name] + f if mod_name in folds else f
        keep = torch.nonzero(~remove).flatten()
        if len(keep) == n:
            continue
        for name, d in zip(g.incoming, g.incoming_dims):
            slices.setdefault(name, {})[d] = keep
        for name in g.buffers:
            slices.setdefault(name, {})[0] = keep
        for _, name, d in g.reads:
            r = weights[name].shape[d] // n
            cols = (keep[:, None] * r + torch.arange(r, device=keep.device)).flatten() if r > 1 else keep
            slices.setdefault(name, {})[d] = cols

    if problems:
        msg = "shrink: cannot remove every removable neuron exactly:\n  " + "\n  ".join(problems)
        if strict:
            raise NotImplementedError(msg + "\n(pass strict=False to keep those neurons)")
        warnings.warn(msg + "\n(those neurons are kept)", stacklevel=2)

    touched = set()
    with torch.no_grad():
        for mod_name, f in folds.items():
            m = _get(new, mod_name)
            b = weights.get(f"{mod_name}.bias")
            if b is not None:
                weights[f"{mod_name}.bias"] = b + f.to(b.dtype)
            elif bool((f != 0).any()):  # create a bias only for a nonzero contribution
                weights[f"{mod_name}.bias"] = f.to(m.weight.dtype)
            else:
                continue
            out_dim = _linear_like(m) if not isinstance(m, _CONV_MODULES) else 0
            rows = slices.get(f"{mod_name}.weight", {}).get(out_dim)
            entry = slices.setdefault(f"{mod_name}.bias", {})
            if b is None and rows is not None:
                entry[0] = rows
        for name, dims in slices.items():
            t = weights[name]
            for d, idx in dims.items():
                t = t.index_select(d, idx.to(t.device))
            mod_name, _, attr = name.rpartition(".")
            m = _get(new, mod_name)
            if attr in m._buffers:
                setattr(m, attr, t.clone())
            else:
                _set_param(m, attr, t)
            touched.add(mod_name)
        for mod_name in touched:
            _resize(_get(new, mod_name), mod_name in depthwise)
    if {n for n in _tied(new, "")} != tied_before:  # a group never holds a shared tensor
        raise RuntimeError("shrink: tied parameters were untied (a bug in autosize: please report it)")

    got = _outputs(new, inputs)
    for a, b in zip(ref, got):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(a.abs().max()))):
            err = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(b.shape)} != {tuple(a.shape)}"
            raise RuntimeError(f"shrink: the shrunk model's outputs differ from the original's (max error {err})")
    return new


def _resize(m: nn.Module, depthwise: bool) -> None:
    """Set a resized module's size attributes from its tensors."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape
    elif isinstance(m, _CONV_MODULES):
        if depthwise:
            m.groups = m.in_channels = m.out_channels = w.shape[0]
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, _BN_MODULES):
        t = m.running_mean if m.running_mean is not None else m.weight
        m.num_features = t.shape[0]
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = w.shape
    elif w is not None and w.dim() == 2:
        d = _linear_like(m)
        if hasattr(m, "nf") and hasattr(m, "nx"):  # Hugging Face Conv1D
            m.nx, m.nf = w.shape
        elif d is not None:
            if hasattr(m, "out_features"):
                m.out_features = w.shape[d]
            if hasattr(m, "in_features"):
                m.in_features = w.shape[1 - d]


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
    old = getattr(m, attr, None)
    if value is None:
        if old is not None:
            setattr(m, attr, None)
        return
    rg = old.requires_grad if isinstance(old, nn.Parameter) else True
    setattr(m, attr, nn.Parameter(value.detach().clone().contiguous(), requires_grad=rg))
