"""l1's CPU C kernel (:mod:`proxfunc.kernels.cpu.soft_threshold`): many tensors in one call.

* Values: the same bits (NaN where it has NaN) as the reference
  :func:`proxfunc.norms.soft_threshold`, and the same values as ATen's ``softshrink``, over
  lengths crossing every vector tail, scales 1e-30..1e30, exact zeros of both signs, entries
  at the threshold, NaN and infinities, subnormals; ``t = 0`` is the identity.
* In place gives the same bits as out of place and bumps the version counters; a call split
  over threads (a tensor cut between two blocks) gives the same bits as one call; the C
  functions are typed. Which calls reach the kernel: ``tests/test_dispatch.py``.
"""

from __future__ import annotations

import array
import ctypes
import os
import shutil
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proxfunc.kernels.cpu import _cc
from proxfunc.kernels.cpu import soft_threshold as soft_cpu
from proxfunc.norms import soft_threshold

from .conftest import examples
from .helpers import in_forked_child

CC = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")
DTYPES = [torch.float32, torch.float64]
SPECIALS = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-300, 1.0, -1.0]


@pytest.fixture(autouse=True)
def kernel():
    if CC is None:
        pytest.skip("no C compiler on PATH")
    assert soft_cpu.available(), _cc.why(soft_cpu.SPEC.name)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])


def assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        nan = a.isnan()
        assert torch.equal(nan, b.isnan()), (a, b)  # NaN where the reference has NaN (any payload)
        assert torch.equal(bits(a)[~nan], bits(b)[~nan]), (a, b)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.sampled_from([0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 65, 130]), min_size=1, max_size=5))
    scale = 10.0 ** draw(st.integers(-30, 30))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = float(torch.tensor(scale * draw(st.sampled_from([1e-3, 0.5, 1.0, 2.0])), dtype=dtype))
    leaves = []
    for n in sizes:
        x = torch.randn(n, generator=g, dtype=torch.float64) * scale
        if n:  # entries exactly at +-t, specials at random places
            k = torch.randint(0, n, (min(n, 4),), generator=g)
            x[k] = torch.tensor([t, -t, *SPECIALS][: len(k)], dtype=torch.float64)
            if n > 4:
                x[torch.randint(0, n, (1,), generator=g)] = SPECIALS[draw(st.integers(0, len(SPECIALS) - 1))]
        leaves.append(x.to(dtype))
    return leaves, t


@given(cases())
@settings(max_examples=examples(200), deadline=None)
def test_same_bits_as_the_reference(case):
    leaves, t = case
    want = [soft_threshold(x, t) for x in leaves]
    kept = [x.clone() for x in leaves]
    assert_same_bits(soft_cpu.run(leaves, t), want)
    assert_same_bits(leaves, kept)  # out of place: inputs untouched
    soft_cpu.run(leaves, t, out=leaves)
    assert_same_bits(leaves, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_softshrink_and_shapes(dtype):
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(33, 17, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
    leaves.append(torch.empty(0, 3, dtype=dtype))
    got = soft_cpu.run(leaves, 0.7)
    for y, x in zip(got, leaves):  # equal values; softshrink's zeros keep the input's sign
        assert torch.equal(y, torch.nn.functional.softshrink(x, 0.7))
    assert [y.shape for y in got] == [x.shape for x in leaves]


def test_zero_threshold_is_the_identity():
    x = torch.tensor([-0.0, 0.0, 1.5, float("nan")])
    (y,) = soft_cpu.run([x], 0.0)
    assert y is not x and torch.equal(bits(y), bits(x))
    assert soft_cpu.run([x], 0.0, out=[x])[0] is x


def test_in_place_bumps_the_version_counter():
    x = torch.randn(10)
    v = x._version
    soft_cpu.run([x], 0.1, out=[x])
    assert x._version > v
    with torch.inference_mode():
        y = torch.randn(10)
        soft_cpu.run([y], 0.1, out=[y])  # no version counter: nothing to bump, no error


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_threads_cover_every_entry_once(threads):
    """The C function cuts the concatenated spans into ``threads`` runs (a tensor may be cut
    between two; empty tensors anywhere): written out of place into NaN-filled outputs, every
    entry gets its value, and in place no entry is shrunk twice."""
    g = torch.Generator().manual_seed(3)
    sizes = [0, 5, 1, 40, 3, 0, 17]
    xs = [torch.randn(n, generator=g) for n in sizes]
    outs = [torch.full_like(x, float("nan")) for x in xs]
    fn = soft_cpu._KERNEL.function(soft_cpu._SYMBOLS[torch.float32])
    flat = soft_cpu._flat(
        array.array("q", [x.data_ptr() for x in xs]),
        array.array("q", [y.data_ptr() for y in outs]),
        array.array("q", sizes),
    )
    fn(soft_cpu._array(flat), len(xs), threads, 0.25)
    for x, y in zip(xs, outs):
        assert_same_bits([y], [soft_threshold(x, 0.25)])
    inplace = [x.clone() for x in xs]
    src = array.array("q", [x.data_ptr() for x in inplace])
    fn(soft_cpu._array(soft_cpu._flat(src, src, array.array("q", sizes))), len(xs), threads, 0.25)
    for x, y in zip(xs, inplace):
        assert_same_bits([y], [soft_threshold(x, 0.25)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_call_split_over_threads_gives_the_same_bits(dtype):
    """Above PARALLEL_NUMEL entries and with two torch threads the call runs in blocks on
    the kernel pool; one tensor is cut between the blocks."""
    g = torch.Generator().manual_seed(1)
    big = torch.randn(soft_cpu.PARALLEL_NUMEL + 1001, generator=g, dtype=dtype)
    leaves = [torch.randn(300, generator=g, dtype=dtype), big, torch.randn(7, 3, generator=g, dtype=dtype)]
    want_big = torch.nn.functional.softshrink(big, 0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = soft_cpu.run(leaves, 0.3)
        torch.set_num_threads(2)
        two = soft_cpu.run(leaves, 0.3)
        soft_cpu.run(leaves, 0.3, out=leaves)
    finally:
        torch.set_num_threads(threads)
    assert_same_bits(two, one)
    assert_same_bits(leaves, one)
    assert torch.equal(one[1], want_big)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_runs_a_large_call():
    """OpenMP's threads do not exist in a forked child (a DataLoader worker, say): after the
    parent ran a threaded call, the child's call runs on its own thread instead of waiting
    for them forever."""
    x = torch.randn(4 * soft_cpu.PARALLEL_NUMEL, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (want,) = soft_cpu.run([x], 0.3)  # the OpenMP team exists in this process now
        # compared in numpy: torch's own OpenMP regions may hang in a forked child
        in_forked_child(lambda: soft_cpu.run([x], 0.3)[0].numpy().tobytes() == want.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)


def test_the_c_functions_are_typed():
    fn = soft_cpu._KERNEL.function(soft_cpu._SYMBOLS[torch.float32])
    assert fn.argtypes == [ctypes.POINTER(soft_cpu._Span), ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    assert soft_cpu._KERNEL.function(soft_cpu._SYMBOLS[torch.float64]).argtypes[-1] is ctypes.c_double
    with pytest.raises(ctypes.ArgumentError):
        fn([1, 2, 3], 1, 1, 0.5)  # not a span array
    with pytest.raises(ctypes.ArgumentError):
        fn(soft_cpu._array(array.array("q")), "one", 1, 0.5)


def test_gcc_builds_it_with_openmp():
    """Built by gcc on Linux, a large call runs on torch's OpenMP threads (the -fopenmp build)."""
    real = os.path.basename(os.path.realpath(CC))
    if sys.platform != "linux" or "gcc" not in real:
        pytest.skip(f"the compiler is {real} on {sys.platform}; the OpenMP build is checked with gcc on Linux")
    assert soft_cpu._KERNEL.threaded(), _cc.why(soft_cpu.SPEC.name)
