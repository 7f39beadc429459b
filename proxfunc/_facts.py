"""What the in-place fast paths ask of a list of tensors, read once and remembered.

The in-place layer (:mod:`proxfunc.compat`) writes into the same tensors (a model's
parameters) at every step, and before each write it asks the same questions of all of them:
their types, layouts, dtypes, devices, contiguity, inference flags and sizes. Asked in
Python, each question costs about 0.1 us a tensor (some 5 us for a model of 48 tensors, and
a step asks about fifteen). :func:`of` answers them all from one check instead: torch's
C++ ``TensorGuards`` (the check ``torch.compile`` runs on its inputs at every call), built
from the tensors the answers were read from, compares each tensor's Python type, dispatch
keys (device type, layout, inference and autograd state, ``torch.func`` and Python
wrappers), dtype, device, ``requires_grad``, sizes and strides with the recorded ones, about
0.07 us a tensor. Every answer is a function of those, so it holds for any list of tensors
that passes the check, whichever objects they are: a parameter replaced, resized, given
another dtype or device (``p.data = ...``, ``resize_``, ``set_``), or with ``requires_grad``
toggled, fails the check and is read afresh. Where the data lies (``data_ptr``) is not
among them: callers read it at every call.

:func:`of` remembers the answers for the :data:`SLOTS` lists met last, and answers only for
plain tensors (``Tensor``/``Parameter``, strided, not on the meta device) outside
``torch.compile`` and ``torch.func`` transforms; it returns ``None`` otherwise (and on a
torch without ``TensorGuards`` or a way to tell that no transform is running, or whose guards
fail a self-test of the changes above), and the caller asks its questions itself.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ._base import _is_compiling, _no_transform
from ._dist import PLAIN_TENSORS

__all__ = ["Facts", "of", "SLOTS"]

#: How many lists' answers are remembered.
SLOTS = 64

try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - a torch without dynamo's C++ guards
    _TensorGuards = None


def _guard(ts: list[torch.Tensor]) -> Any:
    """A ``TensorGuards`` of ``ts`` with every size and stride static (``None`` when torch's
    constructor takes other arguments)."""
    try:
        return _TensorGuards(*ts, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except Exception:  # pragma: no cover - another TensorGuards signature
        return None


def _self_test() -> bool:
    """Whether this torch's guards tell apart what the answers depend on (checked once)."""
    x = torch.zeros(4, 3)
    g = _guard([x])
    if g is None or not g.check(x):
        return False  # pragma: no cover
    others = [x.t().contiguous().t(), torch.zeros(12), torch.zeros(4, 3, dtype=torch.float64)]
    others += [torch.zeros(4, 3, requires_grad=True), torch.zeros(4, 3).to_sparse(), torch.zeros(4, 3, device="meta")]
    with torch.inference_mode():
        others.append(torch.zeros(4, 3))
    return not any(g.check(o) for o in others)


_USABLE: list[bool] = []  # [the self-test's answer], once asked

_LAYOUT, _DTYPE, _DEVICE = operator.attrgetter("layout"), operator.attrgetter("dtype"), operator.attrgetter("device")
_IS_META, _IS_CPU = operator.attrgetter("is_meta"), operator.attrgetter("is_cpu")
_REQUIRES_GRAD, _NBYTES = operator.attrgetter("requires_grad"), operator.attrgetter("nbytes")
_NUMEL, _CONTIGUOUS = torch.Tensor.numel, torch.Tensor.is_contiguous
_FLOATING, _INFERENCE = torch.Tensor.is_floating_point, torch.Tensor.is_inference


class Facts:
    """The answers for a list of plain, strided tensors not on the meta device.

    ``disjoint`` is :func:`proxfunc.compat._survey`'s answer for contiguous tensors: the data
    pointers it saw last and whether the tensors' bytes there were disjoint (a function of
    those pointers and :attr:`nbytes`), a tuple replaced whole; ``None`` before.
    """

    __slots__ = (
        "floating",
        "dtypes",
        "devices",
        "cpu",
        "contiguous",
        "inference",
        "requires_grad",
        "numels",
        "nbytes",
        "numel",
        "disjoint",
    )

    def __init__(self, ts: list[torch.Tensor]):
        self.floating: bool = all(map(_FLOATING, ts))  #: every tensor floating
        self.dtypes: frozenset[torch.dtype] = frozenset(map(_DTYPE, ts))
        self.cpu: bool = all(map(_IS_CPU, ts))  #: every tensor on the CPU
        self.devices: frozenset[torch.device] = frozenset(map(_DEVICE, ts))
        self.contiguous: bool = all(map(_CONTIGUOUS, ts))  #: every tensor contiguous
        self.inference: bool = any(map(_INFERENCE, ts))  #: an inference tensor among them
        self.requires_grad: bool = any(map(_REQUIRES_GRAD, ts))  #: a tensor requiring grad among them
        self.numels: tuple[int, ...] = tuple(map(_NUMEL, ts))
        self.nbytes: tuple[int, ...] = tuple(map(_NBYTES, ts))
        self.numel: int = sum(self.numels)  #: entries of all tensors together
        self.disjoint: tuple[list[int], bool] | None = None


#: Remembered answers: ``(len, id of the first tensor, id of the last) -> (guard, facts)``, at
#: most :data:`SLOTS`, the oldest dropped first. The key only finds the candidate; the guard
#: decides (a new tensor at a freed one's address gets its own answers unless its metadata match).
_SEEN: dict[tuple[int, int, int], tuple[Any, Facts]] = {}


def of(ts: list[torch.Tensor]) -> Facts | None:
    """The :class:`Facts` of ``ts`` (a list of tensors, or of anything: then ``None``), the
    remembered ones when their guard passes; ``None`` where they are not kept (see the module
    docstring)."""
    if not ts or _TensorGuards is None or _is_compiling():
        return None
    if not _no_transform():
        return None  # inside a torch.func transform (or a torch that cannot tell)
    key = (len(ts), id(ts[0]), id(ts[-1]))
    got = _SEEN.get(key)
    if got is not None and got[0].check(*ts):
        return got[1]
    if not set(map(type, ts)) <= PLAIN_TENSORS or set(map(_LAYOUT, ts)) != {torch.strided} or any(map(_IS_META, ts)):
        return None
    if not _USABLE:
        _USABLE.append(_self_test())
    guard = _guard(ts) if _USABLE[0] else None
    if guard is None or not guard.check(*ts):
        return None
    facts = Facts(ts)
    _SEEN.pop(key, None)
    _SEEN[key] = (guard, facts)
    while len(_SEEN) > SLOTS:
        try:
            del _SEEN[next(iter(_SEEN))]
        except (KeyError, RuntimeError, StopIteration):  # another thread changed it meanwhile
            break
    return facts
