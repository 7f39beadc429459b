"""Optional C kernels for eager CPU paths: compiled once per machine with the system's C
compiler, cached on disk, loaded with :mod:`ctypes`.

Kernels: :mod:`.soft` (l1), :mod:`.l21_rows`, :mod:`.linf1_cpu`. Why: some ATen CPU kernels
spend more time computing than moving memory, or launch one kernel per tensor and step. ATen's
``softshrink`` evaluates two compares, two masked selects and a subtraction per vector and
ran at 2.1x the time of a multiply on a 256x256 float32 tensor (2-core AMD EPYC, AVX-512,
torch 2.13). The same soft threshold written as ``x - min(max(x, -t), t)`` is three vector
instructions (``vmaxps``, ``vminps``, ``vsubps``): one read and one write of memory. ATen
offers no such kernel, and ``torch.utils.cpp_extension`` builds against torch's headers
(tens of seconds); a plain C file needs none of them and compiles in a fraction of a second.

* The compiler is ``$CC`` or the first of ``cc``, ``gcc``, ``clang`` on ``PATH``, with
  ``-O3 -march=native`` (plain ``-O3`` when the compiler refuses ``-march=native``) and no
  fast-math flag: the soft threshold is bit-identical to ATen's expression; the l21 and
  linf1 kernels sum in their own order (the compiler may fuse a multiply and an add into
  an FMA), so their norms and thresholds may differ from ATen's in the last bits.
* The library is cached under ``$PROXFUNC_CACHE_DIR`` (default ``$XDG_CACHE_HOME/proxfunc``,
  else ``~/.cache/proxfunc``), named by a hash of the source, the compiler, the flags and the
  CPU (its model and feature flags: ``-march=native`` code must not meet another CPU); it is
  written to a temporary name and renamed, so concurrent processes never load half a file.
* ``PROXFUNC_CC=0`` switches the kernels off. Without a compiler, or when it fails, the
  callers take their ATen paths; :func:`why` says what happened.

Callers only reach a kernel for concrete, contiguous CPU tensors with nothing to
differentiate and nothing traced, and they bump the version counter of what they overwrite
(:func:`bump`), as an ATen in-place op does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from array import array
from collections.abc import Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch

__all__ = ["Kernel", "library", "why", "bump", "cache_dir", "dense_dtype", "serial", "FLOATS", "SERIAL_NUMEL", "MAX"]

#: The dtypes the C kernels are built for, and the C type of each.
FLOATS = (torch.float32, torch.float64)
_CTYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}
#: The largest finite value of each: a scalar beyond it stays with ATen.
MAX = {d: float(torch.finfo(d).max) for d in FLOATS}
#: The C loops are single-threaded. ATen splits a tensor over threads in chunks of 32768
#: entries, so work of at most this many entries (four chunks) goes to a C kernel whatever
#: torch's thread count (the C loops measured about 2x faster per entry than ATen's kernels,
#: and thread wake-ups cost); larger work only when torch runs one thread (:func:`serial`).
SERIAL_NUMEL = 1 << 17

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_DTYPE, _LAYOUT, _IS_CPU = attrgetter("dtype"), attrgetter("layout"), attrgetter("is_cpu")
_CONTIGUOUS = torch.Tensor.is_contiguous

_LIBS: dict[str, Any] = {}  # name -> ctypes.CDLL, or False when unusable
_WHY: dict[str, str] = {}  # name -> what happened (loaded from / built at / the failure)
_LOCK = threading.Lock()
_FLAG_SETS = (("-O3", "-march=native"), ("-O3",))


class Kernel:
    """A C kernel ``name`` with one function per dtype of :data:`FLOATS`,
    ``void proxfunc_<name>_f32(const int64_t *meta, float x)`` (``_f64``: ``double``): every
    address, length and count in one int64 array, and one scalar."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.signatures = {f"proxfunc_{name}_{sfx}": (None, [ctypes.c_void_p, ct]) for sfx, ct in _CTYPES.values()}

    def available(self) -> bool:
        """Whether the library is built and loaded (it is built at the first call)."""
        return library(self.name, self.source, self.signatures) is not None

    def __call__(self, dtype: torch.dtype, meta: list[int], x: float) -> None:
        """Run the ``dtype`` function (the caller has checked :meth:`available`)."""
        buf = array("q", meta)
        fn = getattr(library(self.name, self.source, self.signatures), f"proxfunc_{self.name}_{_CTYPES[dtype][0]}")
        fn(buf.buffer_info()[0], x)


def library(name: str, source: str, signatures: dict[str, tuple[Any, list[Any]]]) -> Any:
    """The C library ``name`` built from ``source``, its functions typed by ``signatures``
    (``symbol -> (restype, argtypes)``), or ``None`` when it cannot be had (switched off, no
    compiler, a failed build). Built at most once per process, and once per machine."""
    got = _LIBS.get(name)
    if got is None:
        with _LOCK:
            got = _LIBS.get(name)
            if got is None:
                got = _LIBS[name] = _load(name, source, signatures) or False
    return got or None


def why(name: str) -> str:
    """What happened to library ``name``: where it was loaded from, or why it is unused."""
    return _WHY.get(name, "not requested yet")


def bump(tensors: Iterable[torch.Tensor]) -> None:
    """Increment the autograd version counter of tensors written behind ATen's back (as any
    in-place ATen op does), so a tensor saved for a backward pass is still caught as changed.
    Inference tensors have no counter and are skipped."""
    tensors = [t for t in tensors if not t.is_inference()]
    if not tensors:
        return
    try:
        torch._C._increment_version(tensors)
    except TypeError:  # older torch: one tensor per call
        for t in tensors:
            torch._C._increment_version(t)


def dense_dtype(xs: list[torch.Tensor]) -> torch.dtype | None:
    """The one dtype of ``xs`` when every tensor is a plain (not a subclass), strided,
    contiguous CPU tensor of a dtype in :data:`FLOATS`; else ``None``. Asked of all tensors
    at once with C-level ``map`` (~6 us for 48 tensors, against ~35 us one at a time)."""
    dtypes = set(map(_DTYPE, xs))
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    if (
        dtype in FLOATS
        and set(map(type, xs)) <= _PLAIN
        and all(map(_IS_CPU, xs))
        and set(map(_LAYOUT, xs)) == {torch.strided}
        and all(map(_CONTIGUOUS, xs))
    ):
        return dtype
    return None


def serial(numel: int) -> bool:
    """Whether work of ``numel`` entries goes to a single-threaded C kernel (see
    :data:`SERIAL_NUMEL`)."""
    return numel <= SERIAL_NUMEL or torch.get_num_threads() == 1


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring)."""
    env = os.environ.get("PROXFUNC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxfunc"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for cand in ("cc", "gcc", "clang"):
        found = shutil.which(cand)
        if found:
            return found
    return None


@functools.cache  # the CPU does not change under a process; read /proc/cpuinfo once
def _cpu_signature() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for)."""
    sig = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    sig.append(line.strip())
                if line.strip() == "":  # the first processor describes them all
                    break
    except OSError:
        pass
    return "\n".join(sig)


def _load(name: str, source: str, signatures: dict[str, tuple[Any, list[Any]]]) -> Any:
    if os.environ.get("PROXFUNC_CC", "1") == "0":
        _WHY[name] = "switched off (PROXFUNC_CC=0)"
        return None
    if sys.platform == "win32":
        _WHY[name] = "not built on Windows"
        return None
    cc = _compiler()
    if cc is None:
        _WHY[name] = "no C compiler found ($CC, cc, gcc, clang)"
        return None
    try:
        path = _build(name, source, cc)
        lib = ctypes.CDLL(str(path))
        for symbol, (restype, argtypes) in signatures.items():
            fn = getattr(lib, symbol)
            fn.restype, fn.argtypes = restype, argtypes
    except Exception as e:  # a failed build or load: the ATen paths then
        _WHY[name] = f"unusable: {type(e).__name__}: {e}"
        return None
    _WHY[name] = f"loaded from {path}"
    return lib


def _build(name: str, source: str, cc: str) -> Path:
    """Compile ``source`` (once per machine), returning the cached library's path."""
    real = os.path.realpath(cc)
    try:
        stamp = str(os.stat(real).st_mtime_ns)
    except OSError:
        stamp = ""
    last_error = ""
    for flags in _FLAG_SETS:
        key = "\0".join([source, real, stamp, " ".join(flags), _cpu_signature()])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        out = _writable_dir() / f"{name}-{digest}.so"
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(prefix="proxfunc-cc-") as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            part = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(part), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                os.replace(part, out)  # atomic: another process sees all of it or nothing
                return out
            lines = (res.stderr or res.stdout).strip().splitlines()
            errors = [ln.strip() for ln in lines if "error" in ln.lower()]
            last_error = (errors or lines or [f"exit status {res.returncode}"])[0]
            try:
                part.unlink()
            except OSError:
                pass
    raise RuntimeError(f"{os.path.basename(cc)} failed: {last_error}")


def _writable_dir() -> Path:
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"proxfunc-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    d.mkdir(parents=True, exist_ok=True)
    return d
