"""Building and loading proxfunc's C kernels: compiled once per machine with the system's C
compiler, cached on disk, verified, and loaded with :mod:`ctypes`.

Two kernels are built with it: :mod:`.linf1` (linf1's row groups) and
:mod:`.soft_threshold` (l1 of many tensors in one call). A plain C file needs no
torch headers, so it compiles in a fraction of a second, where ``torch.utils.cpp_extension``
takes tens of seconds.

* **Compiler**: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``, with
  ``-O3 -march=native`` (plain ``-O3`` when the compiler refuses ``-march=native``) and no
  fast-math flag; a source that tests ``_OPENMP`` is tried with ``-fopenmp`` first (on
  Linux its ``libgomp.so.1`` resolves to the copy torch has loaded, so its threads are
  torch's) and must compile without it too. The compiler runs in its own process group;
  after :data:`COMPILE_TIMEOUT_S` seconds the whole group is killed and the kernel is not
  used.
* **Cache directory**: ``$PROXFUNC_CACHE_DIR``, else ``$XDG_CACHE_HOME/proxfunc``, else
  ``~/.cache/proxfunc`` (:func:`cache_dir`), created with mode 0700. Code is only loaded from
  a directory that is not a symbolic link, is owned by the current user and is not writable
  by group or others; any other directory is refused (the kernel is not used, :func:`why` says
  why). When the directory cannot be created or written, ``<tmp>/proxfunc-<uid>`` is used
  under the same checks.
* **Cached files** are named ``<name>-<key>-<sha256>.so``: ``key`` hashes the source, the
  compiler (its path and modification time), the flags and the CPU (model and feature flags:
  ``-march=native`` code must not meet another CPU); ``sha256`` is the SHA-256 of the library's
  bytes. Before :class:`ctypes.CDLL` sees a file, its bytes are read and hashed; a file whose
  hash differs from its name (truncated, overwritten) is deleted and the library is rebuilt.
  A library is written under a temporary name, synced and renamed, never written in place, so
  concurrent processes see all of it or nothing and a loaded file never changes under them.
* ``PROXFUNC_CC=0`` switches the kernels off. Without a compiler, or when the build or the
  load fails, :meth:`Kernel.available` is ``False`` and the callers take their ATen paths.

Which calls reach a kernel is decided by :func:`proxfunc.dispatch.select` from the kernel's
:class:`~proxfunc.dispatch.KernelSpec`; a kernel that writes into tensors bumps their version
counters (:func:`bump`), as an ATen in-place op does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import os
import platform
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Kernel",
    "per_dtype",
    "threads_for",
    "library",
    "why",
    "bump",
    "cache_dir",
    "COMPILE_TIMEOUT_S",
    "C_SCALARS",
]

#: Seconds the compiler may run before its process group is killed.
COMPILE_TIMEOUT_S = 30.0

#: ``symbol -> (restype, argtypes)`` of a library's functions.
Signatures = dict[str, tuple[Any, list[Any]]]

_LIBS: dict[str, Any] = {}  # name -> ctypes.CDLL, or False when unusable
_WHY: dict[str, str] = {}  # name -> what happened (where it was loaded from, or the failure)
_LOCKS: dict[str, threading.Lock] = {}  # name -> held while that library is built or loaded
_LOCK = threading.Lock()  # guards _LOCKS only
_FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
_OPENMP = "-fopenmp"
_HEX = frozenset("0123456789abcdef")


_forked = False  # in a forked child (threads_for)


def _after_fork_in_child() -> None:
    """A forked child starts with no thread building (a lock held by another thread of the
    parent at the fork would never be released in the child), and runs kernels on one thread."""
    global _LOCK, _LOCKS, _forked
    _LOCK, _LOCKS, _forked = threading.Lock(), {}, True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Kernel:
    """The C library ``name`` built from ``source``, its functions typed by ``signatures``
    (``symbol -> (restype, argtypes)``, set on the loaded functions: a call with arguments of
    other types raises :class:`ctypes.ArgumentError` instead of reaching the C code)."""

    def __init__(self, name: str, source: str, signatures: Signatures, openmp: str | None = None):
        self.name, self.source, self.signatures, self.openmp = name, source, dict(signatures), openmp

    def available(self) -> bool:
        """Whether the library is built and loaded (it is built at the first call)."""
        return library(self.name, self.source, self.signatures) is not None

    def function(self, symbol: str) -> Any:
        """The typed function ``symbol`` (the caller has checked :meth:`available`)."""
        return getattr(library(self.name, self.source, self.signatures), symbol)

    def why(self) -> str:
        """What happened to the library (see :func:`why`)."""
        return why(self.name)

    def threaded(self) -> bool:
        """Whether the loaded library was built with OpenMP (its ``threads`` argument then
        splits a call over that many of torch's OpenMP threads; otherwise it is ignored)."""
        return self.openmp is not None and self.available() and bool(self.function(self.openmp)())


#: The C scalar type of each dtype the kernels take.
C_SCALARS = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def per_dtype(name: str, source: str, symbol: str, argtypes: list[Any]) -> tuple[Kernel, dict[torch.dtype, str]]:
    """A library whose functions ``<symbol>_f32`` and ``<symbol>_f64`` take ``argtypes`` then a
    scalar of their dtype and return nothing: the :class:`Kernel` and ``{dtype: symbol}``.
    A source that tests ``_OPENMP`` gets ``int <symbol>_openmp(void)``, which says whether
    it was built with OpenMP (:meth:`Kernel.threaded`)."""
    symbols = {torch.float32: f"{symbol}_f32", torch.float64: f"{symbol}_f64"}
    signatures = {symbols[d]: (None, [*argtypes, c]) for d, c in C_SCALARS.items()}
    openmp = None
    if "_OPENMP" in source:
        openmp = f"{symbol}_openmp"
        source += _OPENMP_PROBE.replace("NAME", openmp)
        signatures[openmp] = (ctypes.c_int, [])
    return Kernel(name, source, signatures, openmp), symbols


_OPENMP_PROBE = """
int NAME(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""


def threads_for(numel: int, parallel_numel: int) -> int:
    """The threads a kernel call of ``numel`` entries runs on: torch's thread count above
    ``parallel_numel``, else one; one in a forked child (GNU OpenMP's threads do not survive
    a fork: a parallel region there would wait for them forever)."""
    return torch.get_num_threads() if numel > parallel_numel and not _forked else 1


def library(name: str, source: str, signatures: Signatures) -> Any:
    """The C library ``name`` built from ``source``, its functions typed by ``signatures``,
    or ``None`` when it cannot be had (switched off, no compiler, a refused cache directory, a
    failed build or load). Built at most once per process, and once per machine. Only the
    thread building ``name`` holds ``name``'s lock: other libraries load meanwhile."""
    got = _LIBS.get(name)
    if got is None:
        with _LOCK:
            lock = _LOCKS.setdefault(name, threading.Lock())
        with lock:
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
    tensors = list(tensors)
    try:
        torch._C._increment_version(tensors)  # inference tensors: a no-op where torch takes a list
    except (TypeError, RuntimeError):  # older torch: one tensor per call, inference tensors refused
        for t in tensors:
            if not t.is_inference():
                torch._C._increment_version(t)


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring)."""
    env = os.environ.get("PROXFUNC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxfunc"


class _Refused(Exception):
    """A cache directory or file that code must not be loaded from."""


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


def _load(name: str, source: str, signatures: Signatures) -> Any:
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
        directory = _cache()
        path, note = _build(directory, name, source, cc)
        lib = ctypes.CDLL(str(path))
        for symbol, (restype, argtypes) in signatures.items():
            fn = getattr(lib, symbol)
            fn.restype, fn.argtypes = restype, argtypes
    except _Refused as e:
        _WHY[name] = f"refused: {e}"
        return None
    except Exception as e:  # a failed build or load: the ATen paths then
        _WHY[name] = f"unusable: {type(e).__name__}: {e}"
        return None
    _WHY[name] = f"{note}loaded from {path}"
    return lib


# ------------------------------------------------------------------------- the cache directory
def _private(d: Path, parents: bool) -> Path:
    """``d``, created with mode 0700 when missing; raises :class:`_Refused` unless it is a real
    directory (not a symbolic link) owned by this user and not writable by group or others,
    and :class:`OSError` when it cannot be created."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        if parents:
            d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # another process made it meanwhile: checked below
            pass
        st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode):
        raise _Refused(f"cache directory {d} is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"cache directory {d} is not a directory")
    uid = os.getuid()
    if st.st_uid != uid:
        raise _Refused(f"cache directory {d} is owned by uid {st.st_uid}, not by this user (uid {uid})")
    if st.st_mode & 0o022:
        raise _Refused(f"cache directory {d} is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o})")
    return d


def _cache() -> Path:
    """The configured cache directory, or ``<tmp>/proxfunc-<uid>`` when that one cannot be
    created or written; either must pass :func:`_private`."""
    d = cache_dir()
    try:
        _private(d, parents=True)
        if os.access(d, os.W_OK | os.X_OK):
            return d
        problem = "not writable"
    except OSError as e:
        problem = f"{type(e).__name__}: {e}"
    fallback = Path(tempfile.gettempdir()) / f"proxfunc-{os.getuid()}"
    try:
        _private(fallback, parents=False)
    except _Refused as e:
        raise _Refused(f"no usable cache directory ({d}: {problem}; {e})") from None
    except OSError as e:
        raise _Refused(f"no usable cache directory ({d}: {problem}; {fallback}: {e})") from None
    if not os.access(fallback, os.W_OK | os.X_OK):
        raise _Refused(f"no usable cache directory ({d}: {problem}; {fallback}: not writable)")
    return fallback


# ---------------------------------------------------------------------------- the cached files
def _sha256_of(path: Path) -> str | None:
    """The SHA-256 of the regular file ``path`` (not followed if a symbolic link) when it is
    owned by this user and not writable by group or others; ``None`` otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def _cached(directory: Path, prefix: str) -> tuple[Path | None, str]:
    """A file ``<prefix><sha256>.so`` in ``directory`` whose bytes hash to its name, and a note
    on the files that did not (they are deleted: truncated or overwritten)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None, ""
    bad = []
    for fname in names:
        digest = fname[len(prefix) : -3]
        if not (fname.startswith(prefix) and fname.endswith(".so") and len(digest) == 64 and set(digest) <= _HEX):
            continue
        path = directory / fname
        got = _sha256_of(path)
        if got is not None and hmac.compare_digest(got, digest):
            return path, ""
        bad.append(fname)
        try:
            path.unlink()
        except OSError:
            pass
    return None, (f"deleted {', '.join(bad)} (its bytes do not match its SHA-256); " if bad else "")


def _store(directory: Path, prefix: str, data: bytes) -> Path:
    """Write ``data`` as ``<prefix><sha256>.so`` in ``directory``: to a temporary name, synced,
    then renamed (atomic: a concurrent reader sees all of it or no file)."""
    final = directory / f"{prefix}{hashlib.sha256(data).hexdigest()}.so"
    part = directory / f"{prefix[:-1]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags, 0o700)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, final)
    except BaseException:
        try:
            part.unlink()
        except OSError:
            pass
        raise
    return final


def _build(directory: Path, name: str, source: str, cc: str) -> tuple[Path, str]:
    """The verified library built from ``source`` in ``directory`` (compiled when no valid
    cached copy exists), and a note on what was found there."""
    real = os.path.realpath(cc)
    try:
        stamp = str(os.stat(real).st_mtime_ns)
    except OSError:
        stamp = ""
    last_error, notes = "", ""
    for flags in _flag_sets(source):
        key = "\0".join([source, real, stamp, " ".join(flags), _cpu_signature()])
        prefix = f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}-"
        found, note = _cached(directory, prefix)
        notes += note
        if found is not None:
            return found, notes
        data, last_error = _compile(cc, flags, name, source)
        if data is None:
            continue  # e.g. -march=native refused: the next flags
        path = _store(directory, prefix, data)
        if _sha256_of(path) != path.name[len(prefix) : -3]:
            raise _Refused(f"{path} changed between its write and its load")
        return path, f"{notes}built and "
    raise RuntimeError(f"{os.path.basename(cc)} failed: {last_error}")


def _flag_sets(source: str) -> list[tuple[str, ...]]:
    """The flags to try, in order: a source that tests ``_OPENMP`` is tried with ``-fopenmp``
    first (on Linux its ``libgomp.so.1`` is the one torch has loaded, so its threads are
    torch's), then without (it must then compile as serial code)."""
    if "_OPENMP" not in source:
        return list(_FLAG_SETS)
    return [(*f, _OPENMP) for f in _FLAG_SETS] + list(_FLAG_SETS)


def _compile(cc: str, flags: tuple[str, ...], name: str, source: str) -> tuple[bytes | None, str]:
    """The bytes of the library ``cc`` builds from ``source`` with ``flags``, or ``None`` and
    the compiler's first error line. Raises :class:`RuntimeError` when it runs past
    :data:`COMPILE_TIMEOUT_S` (its process group killed)."""
    with tempfile.TemporaryDirectory(prefix="proxfunc-cc-") as tmp:
        src, lib = f"{name}.c", f"{name}.so"  # relative: the output does not name the temp dir
        Path(tmp, src).write_text(source)
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", lib, src]
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with its children
        )
        try:
            out, _ = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RuntimeError(f"{os.path.basename(cc)} timed out after {COMPILE_TIMEOUT_S:g} s (killed)") from None
        except BaseException:
            _kill_group(proc)
            raise
        if proc.returncode != 0:
            lines = out.decode(errors="replace").strip().splitlines()
            errors = [ln.strip() for ln in lines if "error" in ln.lower()]
            return None, (errors or lines or [f"exit status {proc.returncode}"])[0]
        return Path(tmp, lib).read_bytes(), ""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s process group (the compiler and whatever it started) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a child left the group and holds the pipe open
        if proc.stdout is not None:
            proc.stdout.close()
        proc.kill()
        proc.wait()
