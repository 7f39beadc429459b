"""What an operator does with the leaves of ``params`` besides floating tensors, the group
rule across leaves, and the default step.

* integer and bool tensors (buffers: ``num_batches_tracked``, indices, masks) pass through
  unchanged, the same objects, beside the parameters of every operator of ``tests/cases.py``,
  and the result on the parameters is that of the call without them; called functionally
  and in place (``apply_``) on a model's ``state_dict`` the rule is the same;
* a tree with buffers and no parameter, a bare integer tensor and complex leaves are refused;
* ``pf.l21(reg)(dict(model.named_parameters()), step)`` on an MLP (leaves with different
  numbers of groups) raises an error that names the leaves and the two usual intents, and
  both suggestions run;
* ``op(x)`` is ``op(x, 1.0)``, as the docstrings say.
"""

from __future__ import annotations

import pydoc
import re

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import proxfunc as pf
import proxfunc.compat as pg

from .cases import CASES


def _with_group_dim_for(op: pf.Prox, key) -> pf.Prox:
    """``op`` with a pytree group_dim extended by an entry for a new key (a pytree group_dim
    has the structure of params, buffers included)."""
    if "group_dim" in op._hyper_names and isinstance(op.group_dim, dict):
        fields = dict(op._params())
        fields["group_dim"] = {**op.group_dim, key: 0}
        return type(op)(**fields)
    return op


def _add_buffers(params):
    """``params`` with an int64 counter and a bool mask added (a dict: two new keys; a tuple:
    two more entries), and the buffers."""
    n = torch.tensor(7)
    mask = torch.tensor([True, False, True])
    if isinstance(params, dict):
        return {**params, "n": n, "mask": mask}, (n, mask)
    return (*params, n, mask), (n, mask)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_buffers_pass_through_every_operator(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    mixed, (n, mask) = _add_buffers(params)
    if isinstance(params, dict):
        op2 = _with_group_dim_for(_with_group_dim_for(op, "n"), "mask")
    else:
        op2 = op
    before = [x.clone() for x in pytree.tree_leaves(mixed)]
    out = op2(mixed, 0.5)
    want = op(params, 0.5)
    if isinstance(params, dict):
        assert out["n"] is n and out["mask"] is mask
        assert out.keys() == mixed.keys()
        for k in params:
            assert torch.equal(out[k], want[k]), k
    else:
        assert isinstance(out, tuple) and len(out) == len(mixed)
        assert out[-2] is n and out[-1] is mask
        for a, b in zip(out[:-2], want):
            assert torch.equal(a, b)
    assert torch.equal(op2.value(mixed), op.value(params))
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(mixed), before))  # nothing written
    # the same rule in place: buffers untouched, parameters as the functional call gives them
    target = {k: v.clone() for k, v in mixed.items()} if isinstance(mixed, dict) else [x.clone() for x in mixed]
    kept = (target["n"], target["mask"]) if isinstance(target, dict) else (target[-2], target[-1])
    pg.apply_(op2, target, 0.5)
    got = target if isinstance(target, dict) else dict(enumerate(target))
    ref = out if isinstance(out, dict) else dict(enumerate(out))
    for k in got:
        assert torch.equal(got[k], ref[k]), k
    assert torch.equal(kept[0], n) and torch.equal(kept[1], mask)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.linear2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear2(torch.relu(self.bn(self.linear1(x))))


def _bn_net() -> _BNNet:
    net = _BNNet()
    net(torch.randn(8, 4))  # running statistics and num_batches_tracked move
    return net


@pytest.mark.parametrize(
    "op",
    [
        pf.l1(0.1),
        pf.partition({"*": pf.l1(0.1)}),
        pf.partition({"linear*.weight": pf.l21(0.3), "bn.*": pf.l2_ball(0.5)}),
        pf.partition({("linear1.weight", "linear1.bias", "bn.weight", "bn.bias"): pf.linf1(0.2)}),
    ],
    ids=["l1", "partition-all", "partition-patterns", "partition-tuple"],
)
def test_state_dict_functional_and_in_place_agree(op):
    net = _bn_net()
    sd = net.state_dict()
    nbt = sd["bn.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.item() == 1
    snapshot = {k: v.clone() for k, v in sd.items()}
    out = op(sd, 0.5)  # functional: integer buffers pass through, nothing is written
    assert out["bn.num_batches_tracked"] is nbt
    assert all(torch.equal(sd[k], snapshot[k]) for k in sd)
    assert type(out) is type(sd) and list(out) == list(sd)
    pg.apply_(op, sd, 0.5)  # in place: the same values
    for k in sd:
        assert torch.equal(sd[k], out[k]), k
    assert sd["bn.num_batches_tracked"] is nbt and nbt.item() == 1
    assert torch.equal(net.linear1.weight.detach(), out["linear1.weight"])  # the state_dict shares storage


def test_a_rule_that_matches_only_buffers_matches_nothing_both_ways():
    net = _bn_net()
    sd = net.state_dict()
    op = pf.partition({"*.num_batches_tracked": pf.l1(0.1)})
    with pytest.raises(ValueError, match="matches no parameter name"):
        op(sd, 0.5)
    with pytest.raises(ValueError, match="matches no parameter name"):
        pg.apply_(op, sd, 0.5)
    lax = pf.partition({"*.num_batches_tracked": pf.l1(0.1)}, strict=False)
    out = lax(sd, 0.5)
    assert all(out[k] is sd[k] for k in sd)


def test_no_parameter_bare_integer_and_complex_are_refused():
    n = torch.tensor([3, 4])
    for op in (pf.l1(0.1), pf.l21(0.1), pf.simplex(1.0), pf.chain(pf.l1(0.1), pf.nonneg())):
        with pytest.raises(TypeError, match="params must be a floating tensor"):
            op(n, 0.5)
        with pytest.raises(TypeError, match="no floating tensor"):
            op({"n": n, "m": n > 3}, 0.5)
        with pytest.raises(TypeError, match="no floating tensor"):
            op.value((n, None))
        with pytest.raises(TypeError, match=r"params\['z'\] must be a floating tensor"):
            op({"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, 0.5)
    with pytest.raises(TypeError, match="no floating tensor"):
        pf.partition({"*": pf.l1(0.1)})({"n": n}, 0.5)


# ------------------------------------------------------------------ l21 on a model's parameters


def _mlp(widths=(4, 16, 8, 3)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_l21_on_an_mlp_names_the_leaves_and_what_to_use():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    for op in (pf.l21(0.1), pf.linf1(0.1)):
        with pytest.raises(ValueError) as err:
            op(params, 0.5)
        msg = str(err.value)
        assert "different numbers of groups" in msg
        assert "params['0.weight'] has 16 along dim 0" in msg and "params['4.weight'] has 3 along dim 0" in msg
        assert "pf.partition({'*': op})" in msg and "pf.autosize.neuron_prox(model, op)" in msg
        with pytest.raises(ValueError, match="pf.partition"):
            op.value(params)
        with pytest.raises(ValueError, match="pf.partition"):
            pg.apply_(op, model, 0.5)
    # the first suggestion: each tensor's own groups (rows of every weight, entries of biases)
    op = pf.l21(0.1)
    per_tensor = pf.partition({"*": op})(params, 0.5)
    for k, v in params.items():
        assert torch.equal(per_tensor[k], op(v, 0.5)), k
    # the second: neurons, each hidden layer's row i of the weight with entry i of the bias
    prox, skipped = pf.autosize.neuron_prox(model, pf.l21(0.1))
    out = prox(params, 0.5)
    assert out.keys() == params.keys() and list(skipped) == ["4"]  # the output layer keeps its width
    for layer in ("0", "2"):
        want = op((params[f"{layer}.weight"], params[f"{layer}.bias"]), 0.5)
        assert torch.equal(out[f"{layer}.weight"], want[0]) and torch.equal(out[f"{layer}.bias"], want[1])
    assert out["4.weight"] is params["4.weight"]


def test_l21_groups_span_leaves_of_equal_size():
    """The documented rule, also when sizes happen to agree: group i joins slice i of every leaf."""
    w = torch.randn(5, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    op = pf.l21(0.7)
    out = op({"w": w, "b": b}, 0.5)
    norms = torch.sqrt((w * w).sum(1) + b * b)
    scale = (1 - 0.35 / norms).clamp_min(0)
    assert torch.allclose(out["w"], w * scale[:, None], rtol=1e-13, atol=0)
    assert torch.allclose(out["b"], b * scale, rtol=1e-13, atol=0)
    assert torch.allclose(op.value({"w": w, "b": b}), 0.7 * norms.sum(), rtol=1e-13, atol=0)


# ------------------------------------------------------------------ default step


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_default_step_is_one(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    for a, b in zip(pytree.tree_leaves(op(params)), pytree.tree_leaves(op(params, 1.0))):
        assert torch.equal(a, b)


def test_the_default_step_is_documented():
    assert "defaults to ``1.0``" in pf.Prox.__doc__
    assert "defaults to" in pf.Prox.__call__.__doc__ and "1.0" in pf.Prox.__call__.__doc__
    text = pydoc.render_doc(pf.l21, renderer=pydoc.plaintext)
    assert re.search(r"__call__\(self, params.*step.* = 1\.0\)", text)  # help(pf.l21): the signature
    assert "it defaults to ``1.0``" in " ".join(text.replace("|", " ").split())  # and the sentence
