"""Every registered operator runs on its example input and keeps the pytree contract."""

import pytest
import torch

from tests.cases import CASES
from tests.helpers import pytree


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_runs_and_keeps_structure(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    before = [t.clone() for t in pytree.tree_leaves(params)]
    out = op(params, 0.7)
    leaves_in, spec_in = pytree.tree_flatten(params)
    leaves_out, spec_out = pytree.tree_flatten(out)
    assert spec_in == spec_out
    for a, b, c in zip(leaves_in, leaves_out, before):
        assert b.shape == a.shape and b.dtype == a.dtype and b.device == a.device
        assert torch.equal(a, c)  # the input is untouched
        assert torch.isfinite(b).all()
    v = op.value(out)
    assert v.dim() == 0
