"""proxfunc's CPU C kernel (:mod:`proxfunc.kernels.cpu.linf1`) and its builder and loader
(:mod:`proxfunc.kernels.cpu._cc`). Which calls reach the kernel is
:func:`proxfunc.dispatch.select`'s business, tested in ``tests/test_dispatch.py``.

* Values: linf1's prox of row groups (one part, or several such as ``(weight, bias)``) against
  the float64 sort-based threshold, over widths crossing every vector tail, scales 1e-9..1e9,
  ties, all-equal rows, exact zeros and dead groups, ``r = 0``; NaN and infinite entries (in
  the vector loop and in the tail); zero-width parts and zero rows do not touch memory.
* In place gives the same bits as out of place and bumps the version counter; rows split over
  threads give the same bits as one call (in a forked child too); the C functions are typed
  (a wrong argument is a :class:`ctypes.ArgumentError`, not a crash).
* The loader: ``PROXFUNC_CC=0``, no compiler, a failing compiler, a hanging compiler (killed
  with its children after the timeout, without blocking other libraries), the on-disk cache (a
  second process loads without compiling; processes building at once), a truncated or replaced
  cached library (detected by its SHA-256, rebuilt, never loaded: checked in a fresh process),
  and cache directories that are refused (group/other-writable, another user's, a symbolic
  link) or replaced by ``<tmp>/proxfunc-<uid>`` (not creatable).

The kernel needs a C compiler; the tests that need it skip only where none is on ``PATH``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxfunc as pf
from proxfunc import dispatch
from proxfunc.kernels.cpu import _cc
from proxfunc.kernels.cpu import linf1 as linf1_cpu
from proxfunc.kernels.threshold import threshold_sort

from .conftest import examples
from .helpers import in_forked_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")
needs_kernel = pytest.mark.skipif(CC is None, reason="no C compiler on PATH")
DTYPES = [torch.float32, torch.float64]
NAME = linf1_cpu._NAME


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, as integers (compares signs of zeros and NaN payloads)."""
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


@pytest.fixture
def kernel():
    if CC is None:
        pytest.skip("no C compiler on PATH")
    assert linf1_cpu.available(), _cc.why(NAME)


# ------------------------------------------------------------------------------------ values
def linf1_oracle(parts: list[torch.Tensor], r: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The clamp at the float64 sort-based threshold (tau = max(theta, 0)) of every row group."""
    nonempty = [(p.double(), 0) for p in parts if p.numel()]
    tau = threshold_sort(nonempty, r, absolute=True).clamp_min(0)
    outs = []
    for p in parts:
        t = tau.view(-1, *[1] * (p.dim() - 1))
        outs.append(torch.maximum(torch.minimum(p.double(), t), -t))
    return outs, tau


@st.composite
def linf1_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 30))
    widths = draw(st.lists(st.sampled_from([None, 0, 1, 2, 7, 15, 16, 17, 64, 65, 300]), min_size=1, max_size=3))
    if all(w == 0 for w in widths):
        widths.append(None)
    scale = 10.0 ** draw(st.integers(-9, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["gauss", "ties", "equal", "zeros", "few"]))
    parts = []
    for w in widths:
        shape = (rows,) if w is None else (rows, w)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if kind == "ties":
            x = torch.round(x * 2) / 2
        elif kind == "equal":
            x = torch.ones(shape, dtype=torch.float64) * torch.sign(x)
        elif kind == "zeros":
            x[: rows // 2] = 0
        elif kind == "few":
            x = x * (torch.rand(shape, generator=g) < 0.1)
        parts.append((x * scale).to(dtype))
    l1 = float(sum(p.double().abs().reshape(rows, -1).sum(1) for p in parts).mean())
    r = draw(st.sampled_from([0.0, 1e-30, 0.01, 0.5, 0.99, 1.0, 1.01, 2.0, 1e30]))
    r = float(torch.tensor(r * max(l1, 1e-300) if r < 1e29 else 1e30, dtype=dtype))
    return parts, r


@needs_kernel
@given(linf1_cases())
@settings(max_examples=examples(300))
def test_linf1_rows_against_the_sort_reference(case):
    parts, r = case
    before = [p.clone() for p in parts]
    outs = linf1_cpu.run(parts, r)
    want, tau = linf1_oracle(parts, r)
    eps = torch.finfo(parts[0].dtype).eps
    width = sum(p[0].numel() for p in parts)
    big = torch.stack([p.double().abs().reshape(p.shape[0], -1).amax(1) for p in parts if p.numel()]).amax(0)
    tol = (width / 8 + 16) * eps * (big + tau) + 1e-300
    for p, b, y, w in zip(parts, before, outs, want):
        assert torch.equal(bits(p), bits(b)), "wrote into its input"
        assert y.shape == p.shape and y.dtype == p.dtype and y.is_contiguous()
        if p.numel():
            err = (y.double() - w).abs().reshape(p.shape[0], -1).amax(1)
            assert (err <= tol).all(), float((err / tol).max())
    dead = tau == 0  # groups inside the ball die exactly
    for y in outs:
        assert (y.reshape(y.shape[0], -1)[dead] == 0).all()
    assert linf1_cpu.run(parts, r, out=parts) is parts  # in place: the same bits
    assert same_bits(parts, outs)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_linf1_rows_special_groups(dtype, kernel):
    nan, inf = float("nan"), float("inf")
    rows = [[1.0, nan, 3.0] + [1.0] * 17, [1.0, inf, 3.0] + [1.0] * 17, [0.0] * 20, [0.04] * 20, [0.1] * 20]
    w = torch.tensor(rows, dtype=dtype)
    (y,) = linf1_cpu.run([w], 1.0)
    assert torch.isnan(y[0]).all()  # a NaN anywhere in the group (here in the vector loop)
    assert torch.equal(y[1], w[1])  # an infinite entry: nothing is clamped
    assert torch.equal(y[2], torch.zeros(20, dtype=dtype))
    assert torch.equal(y[3], torch.zeros(20, dtype=dtype))  # ||x||_1 = 0.8 <= r: the group dies
    torch.testing.assert_close(y[4], torch.full((20,), 0.05, dtype=dtype))  # all equal: (2 - 1) / 20
    (same,) = linf1_cpu.run([w[1:]], 0.0)  # r = 0: the identity
    assert torch.equal(same, w[1:])
    tail = torch.tensor([[2.0, nan]], dtype=dtype)  # a NaN in the scalar tail
    assert torch.isnan(linf1_cpu.run([tail], 1.0)[0]).all()
    # a group summing more than one lane block (4096 entries a lane): exact counts and sums
    big = torch.ones(1, 3 * 16 * 4096 + 5, dtype=dtype)
    (yb,) = linf1_cpu.run([big], 3.0)
    assert torch.equal(yb, torch.full_like(big, 1 - 3.0 / big.numel()))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_and_bias_parts(dtype, kernel):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(100, 2, generator=g, dtype=dtype)
    b = torch.randn(100, generator=g, dtype=dtype)
    yw, yb = linf1_cpu.run([w, b], 1.5)
    (want_w, want_b), _ = linf1_oracle([w, b], 1.5)
    torch.testing.assert_close(yw.double(), want_w, rtol=0, atol=8 * torch.finfo(dtype).eps)
    torch.testing.assert_close(yb.double(), want_b, rtol=0, atol=8 * torch.finfo(dtype).eps)
    assert (yw == 0).all(1).any() and not (yw == 0).all()  # some neurons die, not all
    # the operator's eager call takes this kernel for (weight, bias)
    assert same_bits(list(pf.linf1(0.015)((w, b), 100.0)), [yw, yb])


@needs_kernel
def test_zero_width_parts_and_zero_rows(kernel):
    for dtype in DTYPES:
        (e,) = linf1_cpu.run([torch.empty(5, 0, dtype=dtype)], 0.1)  # dispatch refuses these;
        assert e.shape == (5, 0)  # the kernel still touches no memory
        (z,) = linf1_cpu.run([torch.empty(0, 5, dtype=dtype)], 0.1)
        assert z.shape == (0, 5)
        x = torch.tensor([[3.0, -1.0], [0.1, 0.2]], dtype=dtype)
        empty, y = linf1_cpu.run([torch.empty(2, 0, dtype=dtype), x], 1.0)
        assert empty.shape == (2, 0)
        assert torch.equal(y, torch.tensor([[2.0, -1.0], [0.0, 0.0]], dtype=dtype))


@needs_kernel
def test_in_place_bumps_the_version_counter(kernel):
    saved = torch.randn(6, 3, requires_grad=True)
    p = torch.nn.Parameter(torch.randn(6, 3))
    z = (saved * p).sum()  # saves p for backward
    v = p._version
    with torch.no_grad():
        expect = linf1_cpu.run([p.detach()], 0.5)
        linf1_cpu.run([p], 0.5, out=[p])
    assert p._version > v
    assert same_bits([p.detach()], expect)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    with torch.inference_mode():  # inference tensors have no counter: written, not bumped
        x = torch.randn(4, 4)
        expect = linf1_cpu.run([x], 0.5)
        linf1_cpu.run([x], 0.5, out=[x])
    assert same_bits([x], expect)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_split_over_threads_give_the_same_bits(dtype, kernel, monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(701, 300, generator=g, dtype=dtype)  # > 2**17 entries, an odd row count
    b = torch.randn(701, generator=g, dtype=dtype)
    w[::5] *= 1e-3  # some groups die
    chunks: list[int] = []  # the thread count of each C call
    real = linf1_cpu._KERNEL

    class Spy:
        def function(self, symbol):
            fn = real.function(symbol)

            def call(parts, nparts, rows, threads, r):
                chunks.append(threads)
                return fn(parts, nparts, rows, threads, r)

            return call

    monkeypatch.setattr(linf1_cpu, "_KERNEL", Spy())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linf1_cpu.run([w, b], 5.0)
        assert chunks == [1]
        torch.set_num_threads(2)
        two = linf1_cpu.run([w, b], 5.0)
        assert chunks == [1, 2]
        assert same_bits(one, two)
        ww, bb = w.clone(), b.clone()
        linf1_cpu.run([ww, bb], 5.0, out=[ww, bb])
        assert same_bits([ww, bb], one)
        torch.set_num_threads(3)  # rows not divisible by 3
        assert same_bits(linf1_cpu.run([w, b], 5.0), one)
        assert chunks == [1, 2, 2, 3]
        wide = torch.randn(1, 1 << 18, generator=g, dtype=dtype)  # one row: one thread
        linf1_cpu.run([wide], 100.0)
        assert chunks == [1, 2, 2, 3, 1]
    finally:
        torch.set_num_threads(threads)
    fn = real.function(linf1_cpu._SYMBOLS[dtype])
    for n in (4, 7, 701, 900):  # more threads than rows included: the team's size decides
        out = [torch.empty_like(w), torch.empty_like(b)]
        parts = (linf1_cpu._Part * 2)(*[(x.data_ptr(), y.data_ptr(), x.numel() // 701) for x, y in zip([w, b], out)])
        fn(parts, 2, 701, n, 5.0)
        assert same_bits(out, one)
    (want_w, _), _ = linf1_oracle([w, b], 5.0)
    torch.testing.assert_close(one[0].double(), want_w, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-12)


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_splits_rows_over_threads(kernel):
    """The parent's OpenMP threads do not exist in a forked child (a DataLoader worker, say):
    the child runs the call on its own thread instead of waiting for them forever."""
    x = torch.randn(701, 300, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = linf1_cpu.run([x], 5.0)  # the OpenMP team exists in this process now
        # compared in numpy: torch's OpenMP regions may hang in a forked child
        in_forked_child(lambda: linf1_cpu.run([x], 5.0)[0].numpy().tobytes() == want[0].numpy().tobytes())
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_c_functions_are_typed(kernel):
    fn = linf1_cpu._KERNEL.function("proxfunc_linf1_rows_f32")
    part, i64 = ctypes.POINTER(linf1_cpu._Part), ctypes.c_int64
    assert fn.argtypes == [part, i64, i64, i64, ctypes.c_float]
    x = torch.randn(3, 4)
    with pytest.raises(ctypes.ArgumentError):
        fn(x.data_ptr(), 1, 3, 1, 0.5)  # an address where the part array belongs
    with pytest.raises(ctypes.ArgumentError):
        fn((linf1_cpu._Part * 1)((x.data_ptr(), x.data_ptr(), 4)), 1, 3, 1, "0.5")


# ------------------------------------------------------------------------------------ loader
# Imports the kernel's modules only, not proxfunc's __init__ (which imports torch._dynamo: a
# second and a half a process).
LINF1_CHECK = f"""
import sys, types
pkg = types.ModuleType("proxfunc")
pkg.__path__ = [{os.path.join(ROOT, "proxfunc")!r}]
sys.modules["proxfunc"] = pkg
import torch
from proxfunc.kernels.cpu import _cc, linf1
assert linf1.available(), _cc.why("linf1_rows")
(y,) = linf1.run([torch.tensor([[3.0, -1.0, 0.5], [0.1, 0.2, 0.0]])], 1.0)
assert y.tolist() == [[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]], y.tolist()
print(_cc.why("linf1_rows"))
"""


def _subprocess(cache: Path, code: str = LINF1_CHECK, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PROXFUNC_CACHE_DIR": str(cache), "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Forget the loaded libraries for this test (restored afterwards); the cache in a new
    directory ``tmp_path/cache``."""
    monkeypatch.setattr(_cc, "_LIBS", {})
    monkeypatch.setattr(_cc, "_WHY", {})
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROXFUNC_CACHE_DIR", str(cache))
    monkeypatch.delenv("PROXFUNC_CC", raising=False)
    return cache


def _libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"{NAME}-*.so"))


def _build_unloaded() -> Path:
    """Build the kernel's library into the cache without loading it here: the tests that damage
    the file must not write into a file mapped into this process (that is a SIGBUS here)."""
    path, note = _cc._build(_cc._cache(), NAME, linf1_cpu._KERNEL.source, _cc._compiler())
    assert note == "built and "
    return path


def _linf1_still_right():
    """The operator's eager calls take ATen's path when the kernel is unavailable."""
    x = torch.randn(30, 7, dtype=torch.float64)
    with dispatch.implementation("reference"):
        want = pf.linf1(0.2)(x, 1.0)
    assert dispatch.select([x], 0.2, kernel=linf1_cpu.SPEC, dims=[0]).impl == "aten"
    torch.testing.assert_close(pf.linf1(0.2)(x, 1.0), want)


def test_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("PROXFUNC_CC", "0")
    assert not linf1_cpu.available()
    assert "PROXFUNC_CC=0" in _cc.why(NAME)
    assert not fresh.exists()
    _linf1_still_right()


def test_no_compiler(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert not linf1_cpu.available()
    assert "no C compiler" in _cc.why(NAME)
    _linf1_still_right()


def test_failing_compiler(fresh, monkeypatch, tmp_path):
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\necho 'badcc: error: cannot compile' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    assert not linf1_cpu.available()
    assert "badcc: error: cannot compile" in _cc.why(NAME)
    assert not list(fresh.glob("*.tmp")), "a failed build left a partial file"
    _linf1_still_right()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_hanging_compiler_is_killed_with_its_children(fresh, monkeypatch, tmp_path):
    """A compiler that hangs on one library is killed (its process group) after the timeout;
    another library builds meanwhile without waiting for it."""
    pids = tmp_path / "pids"
    hang = tmp_path / "hangcc"
    real = f'exec {CC} "$@"' if CC else "exit 1"
    hang.write_text(f'#!/bin/sh\ncase "$*" in *hang.c*) sleep 300 & echo "$$ $!" > {pids}; wait ;; *) {real} ;; esac\n')
    hang.chmod(0o755)
    monkeypatch.setenv("CC", str(hang))
    monkeypatch.setattr(_cc, "COMPILE_TIMEOUT_S", 1.5)
    result: list = []
    start = time.monotonic()
    t = threading.Thread(target=lambda: result.append(_cc.library("hang", "void hang(void) {}\n", {})))
    t.start()
    while not pids.exists() and time.monotonic() - start < 10:
        time.sleep(0.02)
    if CC:  # another library loads while "hang" is compiling
        assert _cc.library("quick", "int quick(void) { return 7; }\n", {"quick": (ctypes.c_int, [])}).quick() == 7
        assert time.monotonic() - start < 1.5
    t.join(20)
    elapsed = time.monotonic() - start
    assert not t.is_alive() and result == [None]
    assert 1.4 < elapsed < 6, elapsed
    assert "timed out after 1.5 s" in _cc.why("hang")
    deadline = time.monotonic() + 5
    procs = [int(p) for p in pids.read_text().split()]
    while any(map(_alive, procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, procs)), "the compiler or its child still runs"
    assert not list(fresh.glob("hang-*"))


@needs_kernel
def test_cache_is_reused_without_compiling(fresh, monkeypatch):
    assert linf1_cpu.available()
    (built,) = _libraries(fresh)
    assert _cc.why(NAME) == f"built and loaded from {built}"
    assert stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700

    def no_compiling(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(_cc, "_LIBS", {})
    monkeypatch.setattr(_cc.subprocess, "Popen", no_compiling)
    assert linf1_cpu.available()
    assert _cc.why(NAME) == f"loaded from {built}"
    (y,) = linf1_cpu.run([torch.tensor([[3.0, -1.0]])], 1.0)
    assert y.tolist() == [[2.0, -1.0]]


@needs_kernel
def test_processes_building_at_once(tmp_path):
    env = {**os.environ, "PROXFUNC_CACHE_DIR": str(tmp_path), "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-c", LINF1_CHECK]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert len(_libraries(tmp_path)) >= 1
    assert not list(tmp_path.glob("*.tmp"))


@needs_kernel
def test_truncated_cached_library_is_rebuilt(fresh):
    built = _build_unloaded()
    assert _libraries(fresh) == [built]
    data = built.read_bytes()
    built.write_bytes(data[: len(data) // 2])  # e.g. a crash before the data reached the disk
    res = _subprocess(fresh)
    assert res.returncode == 0, res.stderr  # no SIGBUS, no failed load: rebuilt
    assert "do not match its SHA-256" in res.stdout and "built and loaded" in res.stdout
    assert built.read_bytes() == data  # the build is deterministic: the same file again
    built.write_bytes(b"")  # empty: in this process too
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_cc, "_LIBS", {})
        assert linf1_cpu.available()
    assert "do not match its SHA-256" in _cc.why(NAME) and "built and loaded" in _cc.why(NAME)
    assert built.read_bytes() == data


@needs_kernel
def test_replaced_cached_library_is_not_loaded(fresh, tmp_path):
    """A library with the right symbols and other code, under the cached name: its hash
    differs from the name, so it is deleted and the kernel rebuilt (checked in a fresh process,
    which would otherwise load it)."""
    built = _build_unloaded()
    assert _libraries(fresh) == [built]
    evil = tmp_path / "evil.c"
    evil.write_text(
        "#include <stdint.h>\n"
        "typedef struct { const void *src; void *dst; int64_t cols; } part_t;\n"
        "void proxfunc_linf1_rows_f32(const part_t *p, int64_t np, int64_t rows, float r) {\n"
        "  for (int64_t q = 0; q < np; ++q) for (int64_t i = 0; i < rows * p[q].cols; ++i)\n"
        "    ((float *)p[q].dst)[i] = 42; }\n"
        "void proxfunc_linf1_rows_f64(const part_t *p, int64_t np, int64_t rows, double r) {}\n"
    )
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(tmp_path / "evil.so"), str(evil)], check=True)
    shutil.copy(tmp_path / "evil.so", built)
    res = _subprocess(fresh)
    assert res.returncode == 0, res.stderr  # the values are the kernel's, not 42
    assert "do not match its SHA-256" in res.stdout and f"built and loaded from {built}" in res.stdout


@needs_kernel
def test_group_or_other_writable_cache_is_refused(fresh):
    fresh.mkdir()
    fresh.chmod(0o777)
    assert not linf1_cpu.available()
    assert "refused" in _cc.why(NAME) and "writable by group or others (mode 0o777)" in _cc.why(NAME)
    assert not list(fresh.iterdir()), "wrote into a refused directory"
    _linf1_still_right()


@needs_kernel
def test_cache_owned_by_another_user_is_refused(fresh, monkeypatch):
    fresh.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(fresh, 12345, -1)
    else:
        monkeypatch.setattr(os, "getuid", lambda: os.lstat(fresh).st_uid + 1)
    assert not linf1_cpu.available()
    assert "refused" in _cc.why(NAME) and "is owned by uid" in _cc.why(NAME)
    assert not list(fresh.iterdir())


@needs_kernel
def test_symlinked_cache_is_refused(fresh, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    fresh.symlink_to(real)
    assert not linf1_cpu.available()
    assert "is a symbolic link" in _cc.why(NAME)
    assert not list(real.iterdir())


@needs_kernel
def test_fallback_to_a_private_temporary_directory(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PROXFUNC_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    fallback = tmp / f"proxfunc-{os.getuid()}"
    fallback.mkdir(mode=0o777)  # made by someone else's process, say: refused
    fallback.chmod(0o777)
    assert not linf1_cpu.available()
    assert "no usable cache directory" in _cc.why(NAME) and "writable by group or others" in _cc.why(NAME)
    fallback.rmdir()  # missing: created 0700 and used
    monkeypatch.setattr(_cc, "_LIBS", {})
    assert linf1_cpu.available(), _cc.why(NAME)
    assert stat.S_IMODE(os.lstat(fallback).st_mode) == 0o700
    assert _cc.why(NAME).startswith(f"built and loaded from {fallback}")
