"""Which implementation computes an operator: the one place that decides.

Every operator's math exists once, as its **reference** implementation: pure torch ops, no
host read and no write into its inputs. The reference is what runs under ``torch.func``
transforms (``grad``, ``vmap``, ``jvp``), under ``torch.compile``, on tensor subclasses such as
``DTensor``, on meta and fake tensors, and whenever something is to be differentiated.

An eager call on plain tensors with nothing to differentiate may take a faster
implementation that computes the same values:

``"aten"``
    eager ATen kernels the reference cannot use: a threshold iterated to convergence with its
    stopping test read on the host, a Python-float threshold passed straight to a kernel
    (``softshrink``), multi-tensor (``_foreach``) kernels on CUDA, and writes into new outputs
    or, for the in-place layer (:mod:`proxfunc.compat`), into the parameters themselves.
``"kernel"``
    a hand-written kernel for a layout it covers (linf1's row groups: C on the CPU,
    Triton on CUDA; l1's soft threshold of many tensors in one C call on the CPU, from
    ``min_numel`` entries in all; :mod:`proxfunc.kernels`). A kernel is kept only where
    ``benchmarks/`` shows it at least 1.5x faster than the ``"aten"`` implementation on its
    work (the README there gives each kernel's gain on whole calls and steps too).

:func:`select` is the decision, for every operator: it knows every condition (tensor type,
device, dtype, layout, grad mode, tracing, the threshold's type) and nothing else does.
Users choose with :func:`implementation` (or the ``PROXFUNC_IMPL`` environment variable)::

    with pf.dispatch.implementation("reference"):    # rule out every fast path
        new = op(params, step)

``"auto"`` (the default) takes a kernel where one applies, else ``"aten"`` where it applies,
else the reference; ``"aten"`` rules out the hand-written kernels; ``"reference"`` rules out
both. The fast implementations are tested against the reference for every operator, layout,
dtype and step type (``tests/test_dispatch.py``).

A 0-d tensor threshold (``reg * step`` with a tensor ``step``) on the CPU is read once on the
host, so it takes the same fast paths as a Python float; on other devices it keeps the
reference, which needs no synchronisation. l1's in-place step computes that threshold on the
host (:func:`host_product`: the float the 0-d tensor product holds, bit for bit), and its
questions about the tensors (types, layout, dtypes, contiguity, sizes) are answered from
what was read of them at an earlier step when a C++ check of their metadata passes
(:mod:`proxfunc._facts`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple

import torch

from . import _facts
from ._base import _PLAIN_TENSORS, _is_compiling, is_concrete

__all__ = ["IMPLEMENTATIONS", "implementation", "current", "select", "reference_only", "Choice", "KernelSpec"]

#: The choices :func:`implementation` accepts.
IMPLEMENTATIONS = ("auto", "aten", "reference")

REFERENCE, ATEN, KERNEL = "reference", "aten", "kernel"


def _from_env() -> str:
    impl = os.environ.get("PROXFUNC_IMPL", "auto") or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"PROXFUNC_IMPL must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return impl


_DEFAULT = _from_env()  # a str: immutable, as a ContextVar default must be
_CHOICE: contextvars.ContextVar[str] = contextvars.ContextVar("proxfunc_impl", default=_DEFAULT)


def current() -> str:
    """The implementation in force: ``"auto"``, ``"aten"`` or ``"reference"``."""
    return _CHOICE.get()


@contextlib.contextmanager
def implementation(impl: str) -> Iterator[None]:
    """Within the block, operators use at most ``impl`` (see the module docstring).

    Scoped to the current thread (and ``asyncio`` task); nests; restored on exit.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    token = _CHOICE.set(impl)
    try:
        yield
    finally:
        _CHOICE.reset(token)


@dataclass(frozen=True)
class KernelSpec:
    """What a hand-written kernel takes, declared as data for :func:`select`.

    ``layout="rows"``: the prox of one argument whose groups are the slices along dim 0 of
    each of its tensors ("row groups": a weight, or a layer's ``(weight, bias)``), at most
    ``max_parts`` tensors and ``max_group`` entries a group. ``layout="entries"``: a
    separable prox of any number of tensors, entry by entry (``max_parts`` and ``max_group``
    unused). Either way the tensors are contiguous, of one dtype in ``dtypes``, on ``device``.
    """

    name: str
    device: str  #: ``"cpu"`` or ``"cuda"``
    dtypes: tuple[torch.dtype, ...]
    max_parts: int  #: tensors in one argument (``"rows"``)
    max_group: int  #: entries in one group, all parts together (``"rows"``)
    available: Callable[[], bool]  #: built and loadable (asked last: it may build)
    layout: str = "rows"  #: ``"rows"`` or ``"entries"``
    #: fewest entries (all tensors together) a call must have: below it a kernel's fixed cost
    #: (the :mod:`ctypes` call and its argument array) exceeds what it saves
    min_numel: int = 0


class Choice(NamedTuple):
    """What :func:`select` decided: the implementation and the threshold to give it (a Python
    float for ``"aten"`` and ``"kernel"``; as given for ``"reference"``)."""

    impl: str
    t: Any


_FAST_DTYPES = frozenset((torch.float32, torch.float64))
_functorch = getattr(torch._C, "_functorch", None)
_IS_WRAPPED = getattr(_functorch, "is_functorch_wrapped_tensor", None)
_REQUIRES_GRAD, _DTYPE, _LAYOUT = attrgetter("requires_grad"), attrgetter("dtype"), attrgetter("layout")
_IS_META = attrgetter("is_meta")
_current_level = getattr(_functorch, "maybe_current_level", None)
_CONTIGUOUS = torch.Tensor.is_contiguous
_DEVICE, _IS_CPU = attrgetter("device"), attrgetter("is_cpu")
_CPU = frozenset((torch.device("cpu"),))
_NUMEL = torch.Tensor.numel


def _eager(ts: list[torch.Tensor], meta: bool = True) -> bool:
    """Plain ``Tensor``/``Parameter`` objects holding real values: not a subclass (``DTensor``,
    fake tensors), not a ``torch.func`` wrapper, strided, not on the meta device (unless
    ``meta=False``: the caller asks it of the devices). Asked of all tensors at once with
    C-level ``map`` (a model's tensors in a few microseconds). Fake and functional tensors
    are subclasses."""
    if not set(map(type, ts)) <= _PLAIN_TENSORS or set(map(_LAYOUT, ts)) != {torch.strided}:
        return False
    if meta and any(map(_IS_META, ts)):
        return False
    if _IS_WRAPPED is None or (_current_level is not None and _current_level() is None):
        return True  # no torch.func transform is running: nothing is wrapped
    return not any(map(_IS_WRAPPED, ts))


_F32 = struct.Struct("f")
#: The smallest normal magnitude of the dtypes :func:`host_product` computes in.
_NORMAL = {torch.float32: 2.0**-126, torch.float64: 2.0**-1022}


def host_product(reg: Any, step: Any) -> Any:
    """``reg * step``, the threshold of a scalar ``reg`` and a step: for a Python float ``reg``
    and a 0-d float32/float64 ``step`` that :func:`select` reads on the host (a plain tensor
    on the CPU holding real values, outside transforms, nothing to differentiate), the Python
    float ``float(reg * step)`` is, computed on the host without making the 0-d tensor: ATen
    multiplies in the step's dtype, ``reg`` rounded to it and the product rounded once (for
    float32: the exact product of two float32 values, a double, rounded to float32). Anything
    else, subnormal values included (``torch.set_flush_denormal`` changes ATen's product
    there), gets ``reg * step`` itself.

    For callers whose ``"reference"`` choice recomputes from ``step`` (the in-place layer's
    writers): the reference implementations compute with the tensor."""
    if type(reg) is not float or type(step) not in _PLAIN_TENSORS:
        return reg * step
    dtype = step.dtype
    tiny = _NORMAL.get(dtype)
    if tiny is None or step.dim() != 0 or not step.is_cpu or (torch.is_grad_enabled() and step.requires_grad):
        return reg * step
    if not is_concrete(step):
        return reg * step
    s = float(step)
    if dtype is torch.float32:
        try:
            r = _F32.unpack(_F32.pack(reg))[0]
            x = _F32.unpack(_F32.pack(r * s))[0]
        except OverflowError:  # beyond float32: ATen's product is inf (the reference's case)
            return reg * step
    else:
        r, x = reg, reg * s
    if not (tiny <= abs(s) < math.inf and tiny <= abs(r) < math.inf and tiny <= abs(x) < math.inf):
        return reg * step
    return x


def _float_threshold(t: Any) -> float | None:
    """``t`` as a Python float when it can be read for free: a float, or a concrete 0-d CPU
    tensor (checked by the caller's :func:`_eager`); ``None`` otherwise."""
    if isinstance(t, float):
        return t
    if isinstance(t, torch.Tensor) and t.dim() == 0 and t.device.type == "cpu":
        return float(t)
    return None


def select(
    leaves: list[torch.Tensor],
    t: Any,
    *,
    in_place: bool = False,
    kernel: KernelSpec | None = None,
    dims: list[int] | None = None,
    facts: _facts.Facts | None = None,
) -> Choice:
    """The implementation of an operator on ``leaves`` with threshold ``t`` (its ``reg *
    step``, a float or a tensor), and ``t`` as that implementation takes it.

    ``in_place``: the in-place layer asks whether the operator may write into ``leaves``
    itself (float32/float64, contiguous, one dtype and device); ``"reference"`` then means
    "compute the new values and copy them". ``kernel`` and ``dims`` (each leaf's group dim):
    a kernel that could compute this call, taken when its declared layout holds. ``facts``
    (with ``in_place``): :func:`proxfunc._facts.of` ``(leaves)``, when the caller has asked it.
    """
    if _is_compiling():
        return Choice(REFERENCE, t)
    choice = _CHOICE.get()
    if choice == REFERENCE or not leaves:
        return Choice(REFERENCE, t)
    # The in-place layer asks about the same tensors (a model's parameters) at every step: their
    # facts are remembered (_facts.of: one C++ check of their metadata); otherwise read here.
    if not in_place:
        facts = None
    elif facts is None:
        facts = _facts.of(leaves)
    if facts is None:
        ts = [*leaves, t] if isinstance(t, torch.Tensor) else leaves
        if not _eager(ts, meta=False):
            return Choice(REFERENCE, t)
        if all(map(_IS_CPU, leaves)):  # the common case, without building a device object a leaf
            devices = _CPU
        else:  # a tensor t is on the CPU (_float_threshold) or refused
            devices = set(map(_DEVICE, leaves))
            if any(d.type == "meta" for d in devices):
                return Choice(REFERENCE, t)
        if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, ts)):
            return Choice(REFERENCE, t)
    else:  # plain, strided, not meta, outside transforms: only t is left to ask
        if isinstance(t, torch.Tensor) and not _eager([t], meta=False):
            return Choice(REFERENCE, t)
        devices = _CPU if facts.cpu else facts.devices
        if torch.is_grad_enabled() and (facts.requires_grad or (isinstance(t, torch.Tensor) and t.requires_grad)):
            return Choice(REFERENCE, t)
    tf = _float_threshold(t)
    if tf is None or not tf >= 0:
        return Choice(REFERENCE, t)
    dtypes = set(map(_DTYPE, leaves)) if facts is None else facts.dtypes
    if not all(tf <= _largest(d) for d in dtypes):  # ATen refuses it; the reference's answer
        return Choice(REFERENCE, t)
    first = leaves[0]
    same = len(dtypes) == 1 and len(devices) == 1
    if facts is None:
        contiguous = in_place and same and first.dtype in _FAST_DTYPES and all(map(_CONTIGUOUS, leaves))
    else:
        contiguous = same and facts.contiguous and first.dtype in _FAST_DTYPES
    if in_place and not contiguous:
        return Choice(REFERENCE, t)
    if choice == "auto" and kernel is not None and same and _fits(kernel, leaves, dims, contiguous, facts):
        return Choice(KERNEL, tf)
    return Choice(ATEN, tf)


def reference_only(leaves: list[torch.Tensor], t: Any) -> bool:
    """Whether :func:`select` takes the reference for ``leaves`` and ``t``: the question of
    operators whose one fast path is ATen's eager threshold or bisection (host reads)."""
    return select(leaves, t).impl == REFERENCE


_LARGEST: dict[torch.dtype, float] = {}


def _largest(dtype: torch.dtype) -> float:
    """The largest finite value of a floating ``dtype`` (a threshold above it: the reference)."""
    got = _LARGEST.get(dtype)
    if got is None:
        got = _LARGEST[dtype] = float(torch.finfo(dtype).max) if dtype.is_floating_point else float("inf")
    return got


def _fits(
    spec: KernelSpec, leaves: list[torch.Tensor], dims: list[int] | None, contiguous: bool, facts: Any = None
) -> bool:
    """The layout ``spec`` declares (the caller has checked one dtype and device, and
    ``contiguous``, when true, of every leaf): contiguous tensors of a dtype it takes on its
    device; for row groups (``dims``, each leaf's group dim, all 0) at most ``max_parts``
    tensors with one row count and ``max_group`` entries a group. ``facts``: the leaves'
    remembered :class:`proxfunc._facts.Facts`, when the caller has them."""
    first = leaves[0]
    if first.device.type != spec.device or first.dtype not in spec.dtypes:
        return False
    if spec.layout == "entries":
        if spec.min_numel and (sum(map(_NUMEL, leaves)) if facts is None else facts.numel) < spec.min_numel:
            return False
        return (contiguous or all(map(_CONTIGUOUS, leaves))) and spec.available()
    if dims is None or len(leaves) > spec.max_parts:
        return False
    rows = first.shape[0] if first.dim() else 0
    if rows == 0:
        return False
    width = 0
    for x, d in zip(leaves, dims):
        if x.dim() == 0 or d % x.dim() != 0 or x.shape[0] != rows or not x.is_contiguous():
            return False
        width += x.numel() // rows
    return 0 < width <= spec.max_group and spec.available()
