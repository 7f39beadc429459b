"""Hypothesis fuzz of every public operator (tests/cases.py) with bad and extreme inputs (issue 20).

Runs in a child process, so an interpreter crash (a kernel's SIGSEGV or SIGBUS) fails the test
instead of killing the run. For each drawn case, input class, dtype and step: no crash; either a
``ValueError``/``TypeError`` naming the operator, or a result of the input's structure, shapes and
dtypes that (for finite inputs at the extremes of the dtype's range) agrees with the float64
reference; the input is never changed, and ``apply_`` leaves its target unchanged after an error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("plain", "nan", "inf", "huge", "max", "tiny", "subnormal", "zero", "neg_zero", "empty", "no_cols")
#: Operators whose answer is a difference of input-sized numbers (x - t*v, a shift along a
#: normal): an absolute error of the input's size times eps is all a float can give.
CANCELLING = ("add_linear", "add_quadratic", "hyperplane", "halfspace", "affine", "moreau_env", "precompose")
EXTREME = ("huge", "max", "tiny", "subnormal")
STEPS = (0.7, 1e-30, 1e30, 0.0, -1.0, float("nan"), float("inf"), "int_tensor", "vec_tensor")


def _scaled(params, kind: str, dtype: torch.dtype):
    fi = torch.finfo(dtype)
    leaves, spec = pytree.tree_flatten(params)
    n = sum(x.numel() for x in leaves)
    out = []
    for x in leaves:
        x = x.clone()
        if kind == "nan" and x.numel():
            x.view(-1)[0] = float("nan")
        elif kind == "inf" and x.numel():
            x.view(-1)[0] = float("inf")
        elif kind == "huge":  # the squared norm overflows, the norm does not
            x = (x / x.abs().amax().clamp_min(1e-30) * (fi.max / 4 / n**0.5)).to(dtype)
        elif kind == "max":  # entries up to half the largest finite value: even the norm overflows
            x = (x.double() / x.double().abs().amax() * (fi.max / 2)).to(dtype)
        elif kind == "tiny":  # the squares underflow
            x = (x.double() / x.double().abs().amax() * fi.tiny * 64).to(dtype)
        elif kind == "subnormal":  # entries below the smallest normal number
            x = (x.double() / x.double().abs().amax() * fi.tiny * fi.eps * 64).to(dtype)
        elif kind == "zero":
            x = torch.zeros_like(x)
        elif kind == "neg_zero":
            x = -torch.zeros_like(x)
        elif kind == "empty":  # no rows (no groups along dim 0)
            x = x[:0]
        elif kind == "no_cols":  # groups with no entries (an nn.Linear(0, n) weight)
            x = x[..., :0] if x.dim() > 1 else x
        out.append(x)
    return pytree.tree_unflatten(out, spec)


def _same_tree(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return sa == sb and all(
        torch.equal(x, y) or (torch.isnan(x).any() and x.nan_to_num().equal(y.nan_to_num())) for x, y in zip(la, lb)
    )


def _check_one(case, kind: str, dtype: torch.dtype, step) -> None:
    import proxfunc as pf
    import proxfunc.compat as pc

    op = case.make_op()
    params = _scaled(case.make_params(dtype), kind, dtype)
    if step == "int_tensor":
        step = torch.tensor(1)
    elif step == "vec_tensor":
        step = torch.ones(2)
    before = pytree.tree_map(torch.clone, params)
    try:
        out = op(params, step)
    except (ValueError, TypeError) as e:
        assert op._name() in str(e) or "step" in str(e) or "params" in str(e), f"{case.name}: unclear error {e!r}"
        assert _same_tree(params, before), f"{case.name}: input changed"
        target = pytree.tree_map(torch.clone, params)
        try:
            pc.apply_(op, target, step)
        except (ValueError, TypeError):
            assert _same_tree(target, before), f"{case.name}: apply_ changed its target after an error"
        return
    except NotImplementedError:
        return
    assert _same_tree(params, before), f"{case.name}: input changed"
    lo, so = pytree.tree_flatten(out)
    li, si = pytree.tree_flatten(params)
    assert so == si and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(lo, li)), case.name
    target = pytree.tree_map(torch.clone, params)
    pc.apply_(op, target, step)  # in place: the values of the pure call
    for a, b in zip(pytree.tree_flatten(target)[0], lo):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{case.name} apply_: {m}")
    if kind in EXTREME and isinstance(step, float) and 0 < step < float("inf"):
        # float64 reference on the same values, in units of the input's scale (the operators are
        # compared where both are meaningful: a dtype's extremes lie well inside float64's range)
        ref = op(pytree.tree_map(lambda x: x.double(), params), step)
        scale = max(float(x.double().abs().max()) for x in li) or 1.0
        for a, r in zip(lo, pytree.tree_flatten(ref)[0]):
            if not torch.isfinite(r).all():
                continue
            rr = r.to(dtype).double()  # the reference rounded to the dtype (beyond its range: +-inf)
            d = torch.where(a.double() == rr, 0.0, (a.double() - rr).abs())
            err = float(d.max()) if a.numel() else 0.0
            tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-4)
            # relative to the answer's own size (a projection onto a small set from far away is
            # small); ops that subtract nearly equal numbers by definition get the input's scale
            size = float(r.abs().max()) if r.numel() else 0.0
            if case.name in CANCELLING:
                size = max(size, scale)
            assert err <= tol * size + 2 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps, (
                f"{case.name} {kind} {dtype} step={step}: off the float64 reference by {err:g} (scale {scale:g})"
            )
    assert pf is not None


def _bad_hyper(i: int):
    """The i-th bad or edge hyperparameter value (built here: tensors are not made at import)."""
    import numpy as np

    values = [
        float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e39, 1e-45, 1e308, True, "x", 1j, None,
        np.int64(2), np.float32(0.5), torch.tensor(float("nan")), torch.tensor(1), torch.tensor([0.1, 0.2]),
        torch.tensor(0.1, device="meta"), torch.tensor([0.1]).to_sparse(), torch.tensor(0.5, dtype=torch.float16),
    ]  # fmt: skip
    return values[i % len(values)]


N_BAD_HYPER = 20


def _check_hyper(case, name_index: int, bad_index: int) -> None:
    """One hyperparameter of the case's operator replaced by a bad value: the constructor refuses it
    (``ValueError``/``TypeError`` naming the operator) or the operator works or refuses clearly."""
    good = case.make_op()
    fields = dict(good._params())
    if not fields:
        return
    name = sorted(fields)[name_index % len(fields)]
    fields[name] = _bad_hyper(bad_index)
    try:
        op = type(good)(**fields)
    except (ValueError, TypeError) as e:
        assert good._name() in str(e) or name in str(e), f"{case.name}({name}=...): unclear error {e!r}"
        return
    params = case.make_params(torch.float32)
    before = pytree.tree_map(torch.clone, params)
    try:
        out = op(params, 0.5)
    except (ValueError, TypeError, NotImplementedError) as e:
        # the operator's or an inner operator's message ("l1: step must be finite" from precompose)
        assert re.match(r"^\w+: ", str(e)) or isinstance(e, NotImplementedError), f"{case.name}: unclear error {e!r}"
    else:
        lo, so = pytree.tree_flatten(out)
        li, si = pytree.tree_flatten(params)
        assert so == si and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(lo, li)), case.name
    assert _same_tree(params, before), f"{case.name}: input changed"


def _main() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.cases import CASES

    @settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1500")),
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.sampled_from(CASES),
        st.sampled_from(KINDS),
        st.sampled_from((torch.float32, torch.float64, torch.float16, torch.bfloat16)),
        st.sampled_from(STEPS),
    )
    def run(case, kind, dtype, step):
        _check_one(case, kind, dtype, step)

    run()

    @settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1500")) // 2,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(CASES), st.integers(0, 7), st.integers(0, N_BAD_HYPER - 1))
    def run_hyper(case, name_index, bad_index):
        _check_hyper(case, name_index, bad_index)

    run_hyper()
    # every operator at least once with every input class, whatever hypothesis drew
    for case in CASES:
        for kind in KINDS:
            _check_one(case, kind, torch.float32, 0.7)
        for bad in range(N_BAD_HYPER):
            _check_hyper(case, 0, bad)


def test_fuzz_every_operator_in_a_child_process():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", "import tests.test_fuzz as m; m._main()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
