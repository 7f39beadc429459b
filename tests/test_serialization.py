"""Operators as values: equality by value, cheap hashing, and serialisation that
``torch.load`` reads with its default ``weights_only=True``.

* every operator of ``tests/cases.py`` survives pickle, ``copy``, ``deepcopy``, ``torch.save`` /
  ``torch.load(weights_only=True)`` and ``to_state`` / ``from_state`` as an equal operator with
  an equal hash that computes the same values;
* ``to_state`` is plain data (no global at all in its checkpoint), an operator's checkpoint
  needs exactly one allowed global, which builds nothing but operator classes;
* tensor hyperparameters compare by value (dtype, shape, device, entries), hashing reads no
  tensor values, and partition batches equal operators into one call;
* ``ProxOptimizer.state_dict()`` is plain data: saved, loaded with ``weights_only=True`` and
  loaded back, training continues identically.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import proxfunc as pf
from proxfunc.compat import ProxOptimizer

from .cases import CASES

PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _load(obj):
    return torch.load(_saved(obj), weights_only=True)


def _unsafe_globals(obj) -> list[str]:
    return torch.serialization.get_unsafe_globals_in_checkpoint(_saved(obj))


def _assert_plain(v, where="state"):
    if isinstance(v, dict):
        for k, x in v.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _assert_plain(x, f"{where}[{k!r}]")
    elif isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            _assert_plain(x, f"{where}[{i}]")
    else:
        assert type(v) in PLAIN or isinstance(v, torch.Tensor), f"{where} is a {type(v).__name__}"


def _same_values(a: pf.Prox, b: pf.Prox, params) -> None:
    for x, y in zip(pytree.tree_leaves(a(params, 0.5)), pytree.tree_leaves(b(params, 0.5))):
        assert torch.equal(x, y)
    assert torch.equal(a.value(params), b.value(params))


def _tensors(op: pf.Prox) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(op.to_state()) if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------ every operator


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_operator_round_trips_equal(case):
    op = case.make_op()
    params = case.make_params(torch.float64)
    copies = {
        "pickle": pickle.loads(pickle.dumps(op)),
        "copy": copy.copy(op),
        "deepcopy": copy.deepcopy(op),
        "torch.load": _load(op),
        "from_state": pf.Prox.from_state(op.to_state()),
        "from_state(saved)": pf.Prox.from_state(_load(op.to_state())),
        "class.from_state": type(op).from_state(op.to_state()),
    }
    for how, back in copies.items():
        assert type(back) is type(op), how
        assert back == op and op == back and hash(back) == hash(op), how
        assert not (back != op), how
        assert repr(back) == repr(op), how
        _same_values(back, op, params)
    # deepcopy and loading copy tensor hyperparameters: the copies are new tensors, still equal
    mine = _tensors(op)
    for how in ("deepcopy", "torch.load", "from_state(saved)"):
        for a, b in zip(mine, _tensors(copies[how])):
            assert a is not b and torch.equal(a, b), how


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_is_plain_data_and_an_operator_needs_one_allowed_global(case):
    op = case.make_op()
    state = op.to_state()
    _assert_plain(state)
    assert _unsafe_globals(state) == []  # loads with weights_only=True, no allowed global needed
    assert _unsafe_globals(op) == []  # import proxfunc allowed the one global it needs
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        assert _unsafe_globals(op) == ["proxfunc._base._from_state"]
    finally:
        torch.serialization.add_safe_globals(allowed)
    assert _unsafe_globals(op) == []


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_operator_in_a_prox_optimizer_state_dict(case):
    """A param group's operator is saved as plain data and loaded back equal."""
    op = case.make_op()
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = ProxOptimizer(torch.optim.SGD([{"params": [w], "prox": op}], lr=0.1))
    sd = opt.state_dict()
    _assert_plain(sd)
    assert _unsafe_globals(sd) == []
    assert opt.param_groups[0]["prox"] is op  # the live group keeps its operator
    opt2 = ProxOptimizer(torch.optim.SGD([{"params": [w], "prox": pf.identity()}], lr=0.5))
    opt2.load_state_dict(_load(sd))
    assert opt2.param_groups[0]["prox"] == op and type(opt2.param_groups[0]["prox"]) is type(op)
    assert opt2.param_groups[0]["lr"] == 0.1


# ------------------------------------------------------------------ equality and hashing


def test_tensor_hyperparameters_compare_by_value():
    t = torch.tensor(0.5)
    assert pf.l21(t) == pf.l21(t.clone()) and hash(pf.l21(t)) == hash(pf.l21(t.clone()))
    assert pf.l21(t) == pf.l21(torch.tensor(0.5, requires_grad=True))  # values, not autograd state
    assert pf.l21(t) != pf.l21(torch.tensor(0.25))
    assert pf.l21(t) != pf.l21(t.double())  # the dtype the computation runs in differs
    assert pf.l21(t) != pf.l21(0.5)  # a float and a tensor are different hyperparameters
    assert pf.box(torch.zeros(3), 1.0) != pf.box(torch.zeros(4), 1.0)
    a = torch.linspace(-1, 1, 30, dtype=torch.float64)
    assert pf.hyperplane(a, 0.3) == pf.hyperplane(a.clone(), 0.3)
    b = a.clone()
    b[7] += 1e-12
    assert pf.hyperplane(a, 0.3) != pf.hyperplane(b, 0.3)
    idx = torch.tensor([0, 1, 1, -1])
    assert pf.index_l21(idx, 0.5) == pf.index_l21(idx.clone(), 0.5)
    assert pf.index_l21(idx, 0.5) != pf.index_l21(torch.tensor([0, 1, 0, -1]), 0.5)
    # nested: operators inside operators compare by value too
    assert pf.chain(pf.l1(t), pf.nonneg()) == pf.chain(pf.l1(t.clone()), pf.nonneg())
    assert pf.partition({"w": pf.l1(t)}) == pf.partition({"w": pf.l1(t.clone())})
    assert pf.scale(pf.l1(t), 2.0) != pf.scale(pf.l1(torch.tensor(0.1)), 2.0)
    assert len({pf.l21(t), pf.l21(t.clone()), pf.l21(torch.tensor(0.5))}) == 1


def test_equality_follows_in_place_changes_and_hash_stays():
    t = torch.tensor(0.5)
    op, other = pf.l1(t), pf.l1(torch.tensor(0.5))
    h = hash(op)
    assert op == other
    with torch.no_grad():
        t.fill_(0.25)  # a schedule that changes reg in place
    assert hash(op) == h and op != other and op == pf.l1(torch.tensor(0.25))
    assert op == op


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_hash_reads_no_tensor_and_equality_reads_only_when_needed():
    A = torch.randn(30, 30, dtype=torch.float64)
    op = pf.quadratic(A @ A.T, torch.ones(30, dtype=torch.float64))
    same = pf.quadratic(op.A.clone(), op.b.clone())
    with _Recorder() as rec:
        hash(op)
        hash(same)
        assert op == op  # the same object: nothing read
        assert pf.l21(0.5) == pf.l21(0.5) and pf.l21(0.5, group_dim=1) != pf.l21(0.5)
    assert rec.ops == []
    with _Recorder() as rec:
        assert op == same
    assert rec.ops == ["aten.equal.default"] * 2  # one comparison per tensor hyperparameter
    # tensors whose values may not be read (meta) hash, and equal only themselves
    m = pf.l1(torch.tensor(0.5, device="meta"))
    m2 = pf.l1(torch.tensor(0.5, device="meta"))
    assert hash(m) == hash(m2) and m == m and m != m2


def test_partition_batches_equal_operators_and_tensor_ones_by_identity():
    """Equal operators in several rules form one batch of _layout, arranged once per key set;
    operators holding tensors batch only with themselves: the tensors' values may change in
    place after the layout was arranged (a schedule of reg), and each rule keeps its own."""
    names = ["a.weight", "b.weight", "c.weight", "d.weight"]
    p = pf.partition({"a.*": pf.l21(0.3), "b.*": pf.l21(0.3), "c.*": pf.l21(0.7), "d.*": pf.l21(0.3, group_dim=1)})
    layout = p._layout(names)
    assert sorted(len(groups) for _, groups, _ in layout) == [1, 1, 2]
    assert p._layout(names) is layout  # cached: no comparison on later calls
    reg_a, reg_b = torch.tensor(0.3), torch.tensor(0.3)
    shared = pf.l21(torch.tensor(0.5))
    q = pf.partition({"a.*": pf.l21(reg_a), "b.*": pf.l21(reg_b), "c.*": shared, "d.*": shared})
    assert q.rules[0][1] == q.rules[1][1]  # equal by value...
    assert sorted(len(groups) for _, groups, _ in q._layout(names)) == [1, 1, 2]  # ...batched apart
    params = {n: torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    q(params, 0.5)
    with torch.no_grad():
        reg_b.fill_(0.9)  # after the layout was arranged
    out = q(params, 0.5)
    assert torch.equal(out["a.weight"], pf.l21(0.3)(params["a.weight"], 0.5))
    assert torch.equal(out["b.weight"], pf.l21(0.9)(params["b.weight"], 0.5))
    assert torch.equal(out["d.weight"], pf.l21(0.5)(params["d.weight"], 0.5))


# ------------------------------------------------------------------ from_state is strict


class ScaledL1(pf.Prox):
    """A user's own operator: reg * ||x||_1 with a per-entry weight tensor."""

    _hyper_names = ("weight",)

    def __init__(self, weight):
        self._set(weight=weight)

    def _prox(self, leaves, step, tree):
        return [torch.sign(x) * (x.abs() - self.weight * step).clamp_min(0) for x in leaves]

    def _value(self, leaves, tree):
        return sum((self.weight * x.abs()).sum() for x in leaves)


def test_a_user_subclass_round_trips_with_weights_only():
    op = ScaledL1(torch.tensor([0.1, 0.2, 0.3]))
    back = _load(op)
    assert type(back) is ScaledL1 and back == op
    assert op.to_state()["__prox__"] == f"{__name__}.ScaledL1"
    assert pf.chain(op, pf.nonneg()) == _load(pf.chain(op, pf.nonneg()))


def test_from_state_builds_nothing_but_operators():
    with pytest.raises(ValueError, match="unknown operator 'os.system'"):
        pf.Prox.from_state({"__prox__": "os.system", "hyper": {}})
    with pytest.raises(ValueError, match="unknown operator"):
        pf.Prox.from_state({"__prox__": 3, "hyper": {}})
    with pytest.raises(ValueError, match=r"l1 takes hyperparameters \['reg'\]"):
        pf.Prox.from_state({"__prox__": "l1", "hyper": {"reg": 0.1, "cmd": "rm"}})
    with pytest.raises(ValueError, match="made by Prox.to_state"):
        pf.Prox.from_state({"reg": 0.1})
    with pytest.raises(ValueError, match="made by Prox.to_state"):
        pf.Prox.from_state("l1")
    with pytest.raises(TypeError, match="describes a l2"):
        pf.l1.from_state(pf.l2(0.1).to_state())
    with pytest.raises(ValueError, match="reg"):  # the constructor validates the values
        pf.Prox.from_state({"__prox__": "l1", "hyper": {"reg": -1.0}})
    # a checkpoint made to call the allowed global on something else is refused on load
    evil = _saved({"__prox__": "builtins.eval", "hyper": {}})
    from proxfunc._base import _from_state

    class Evil:
        def __reduce__(self):
            return (_from_state, ({"__prox__": "builtins.eval", "hyper": {"source": "1"}},))

    with pytest.raises(Exception, match="unknown operator"):
        torch.load(_saved(Evil()), weights_only=True)
    assert torch.load(evil, weights_only=True) == {"__prox__": "builtins.eval", "hyper": {}}  # plain data


# ------------------------------------------------------------------ ProxOptimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear1 = nn.Linear(4, 6)
        self.linear2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


def _step(net, opt, seed):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()


def _make(net, reg):
    groups = [
        {"params": [net.linear1.weight, net.linear1.bias], "prox": pf.l21(reg)},
        {"params": [net.linear2.weight], "prox": pf.chain(pf.l1(0.01), pf.linf_ball(torch.tensor(2.0)))},
        {"params": [net.linear2.bias]},
    ]
    return ProxOptimizer(torch.optim.Adam(groups, lr=0.05))


def test_prox_optimizer_state_dict_loads_with_weights_only_and_resumes():
    net = _Net()
    opt = _make(net, torch.tensor(0.2))
    for s in range(3):
        _step(net, opt, s)
    sd = opt.state_dict()
    _assert_plain(sd)
    assert _unsafe_globals(sd) == []
    net2 = copy.deepcopy(net)
    opt2 = _make(net2, 0.9)  # other operators: the state dict's replace them
    opt2.load_state_dict(_load(sd))
    for g, g2 in zip(opt.param_groups, opt2.param_groups):
        assert g.get("prox") == g2.get("prox") and ("prox" in g) == ("prox" in g2)
    for s in range(3, 6):
        _step(net, opt, s)
        _step(net2, opt2, s)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    # the inner optimizer's own state dict (operators as objects) loads too, with weights_only
    opt3 = _make(copy.deepcopy(net), 0.9)
    opt3.load_state_dict(_load(opt.optimizer.state_dict()))
    assert [g.get("prox") for g in opt3.param_groups] == [g.get("prox") for g in opt.param_groups]


def test_prox_optimizer_keeps_its_operators_for_a_plain_state_dict_and_refuses_bad_ones():
    net = _Net()
    opt = _make(net, 0.2)
    _step(net, opt, 0)
    # the same groups in a plain optimizer, without operators
    plain = torch.optim.Adam([{"params": g["params"]} for g in opt.param_groups], lr=0.01)
    mine = [g.get("prox") for g in opt.param_groups]
    opt.load_state_dict(_load(plain.state_dict()))
    assert [g.get("prox") for g in opt.param_groups] == mine and opt.param_groups[0]["lr"] == 0.01
    # a group whose "prox" is None stays None
    opt.param_groups[2]["prox"] = None
    sd = opt.state_dict()
    assert sd["param_groups"][2]["prox"] is None
    opt.load_state_dict(_load(sd))
    assert opt.param_groups[2]["prox"] is None
    del opt.param_groups[2]["prox"]
    # a bad operator entry: an error naming the group, and nothing changed
    sd = opt.state_dict()
    sd["param_groups"][1]["prox"] = {"__prox__": "nope", "hyper": {}}
    sd["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['prox'\].*unknown operator 'nope'"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.01 and [g.get("prox") for g in opt.param_groups] == mine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_hyperparameters():
    reg = torch.tensor(0.5, device="cuda")
    op = pf.l21(reg)
    with _Recorder() as rec:
        hash(op)
    assert rec.ops == []
    assert op == pf.l21(reg.clone()) and op != pf.l21(reg.cpu()) and hash(op) != hash(pf.l21(reg.cpu()))
    back = _load(op)
    assert back == op and back.reg.device == reg.device
    cpu = torch.load(_saved(op), weights_only=True, map_location="cpu")
    assert cpu == pf.l21(torch.tensor(0.5)) and cpu != op
    x = torch.randn(6, 4, device="cuda")
    assert torch.equal(back(x, 0.5), op(x, 0.5))
