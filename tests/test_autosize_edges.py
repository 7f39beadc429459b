"""Auto-sizing's edges: shared and tied weights, BatchNorm in functional loops, meta tensors,
the keep-one-neuron rule, groups declared by hand, and nothing silent (warnings, reasons)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import proxfunc as pf
from proxfunc import autosize
from proxfunc.compat import ProxOptimizer, apply_


class SharedTwo(nn.Module):
    """One weight used by two Linears."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


class TiedLM(nn.Module):
    """An output layer tied to the input embedding."""

    def __init__(self, vocab=20, d=8, h=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.fc2(torch.relu(self.fc1(self.emb(ids)))))


def test_shared_weight_is_skipped_and_every_api_accepts_the_prox():
    torch.manual_seed(0)
    model = SharedTwo()
    plan = autosize.find_neurons(model)
    assert plan.groups == []
    assert "shared with b.weight" in plan.skipped["a"] and "shared with a.weight" in plan.skipped["b"]
    with pytest.warns(UserWarning, match="no neuron group found in SharedTwo"):
        prox, _ = autosize.neuron_prox(model, pf.l21(0.1), outgoing=True)
    x = torch.randn(3, 4)
    params = dict(model.named_parameters())
    y = torch.func.functional_call(model, prox(params, 0.1), (x,))
    torch.testing.assert_close(y, model(x))  # no group: the prox is the identity
    apply_(prox, model, 0.1)
    opt = ProxOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), prox, params=model)
    model(x).sum().backward()
    opt.step()
    assert model.a.weight is model.b.weight


def test_shrink_keeps_tied_output_layer_and_never_grows():
    torch.manual_seed(1)
    model = TiedLM()
    plan = autosize.find_neurons(model)
    assert [g.name for g in plan.groups] == ["fc1"]
    assert "tied" in plan.skipped["emb"] and "tied" in plan.skipped["out"]
    with torch.no_grad():
        model.fc1.weight[[1, 2]] = 0
        model.fc1.bias[[1, 2]] = 0
    ids = torch.randint(0, 20, (2, 5))
    small = autosize.shrink(model, ids)
    assert small.out.weight is small.emb.weight
    assert sum(p.numel() for p in model.parameters()) == 440
    assert sum(p.numel() for p in small.parameters()) == 440 - 2 * (8 + 1) - 2 * 8
    torch.testing.assert_close(small(ids), model(ids))


def test_batchnorm_functional_loop_pattern_and_error():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    prox, _ = autosize.neuron_prox(model, pf.l21(0.01))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 3, 5, 5), torch.randint(0, 2, (5,))

    def loss(p, b):
        return F.cross_entropy(autosize.functional_call(model, p, (x,), buffers=b), y)

    with pytest.raises(RuntimeError, match=r"pass the buffers as an input.*functional_call\(model, p, x, buffers=b\)"):
        torch.func.grad(lambda p: loss(p, None))(params)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    grads = torch.func.grad(loss)(params, buffers)
    assert not torch.equal(buffers["1.running_mean"], model.get_buffer("1.running_mean"))  # updated
    params = prox({k: params[k] - 0.1 * grads[k] for k in params}, 0.1)
    assert set(params) == set(grads)


def test_report_on_meta_tensors():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rep = autosize.report(model)
    (row,) = rep.rows
    assert (row.total, row.params) == (8, 40)
    assert (row.alive, row.constant, row.params_alive, row.sparsity) == (None, None, None, None)
    assert rep.alive is None and rep.total == 8
    assert "?/8" in str(rep)


def test_all_dead_layer_keeps_one_neuron_for_linear_and_conv():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    with torch.no_grad():
        mlp[0].weight.zero_()
        mlp[0].bias.zero_()
    small = autosize.shrink(mlp, torch.randn(4, 3))
    assert small[0].out_features == small[2].in_features == 1
    conv = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        conv[2].weight.zero_()
    small = autosize.shrink(conv, torch.randn(2, 1, 4, 4))
    assert small[0].out_channels == small[2].in_channels == 1
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(small(x), conv(x))


class Einsum(nn.Module):
    """A second layer written as an einsum: auto-sizing cannot see it, a declaration can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        return torch.einsum("bh,oh->bo", torch.relu(self.a(x)), self.w)


def test_manual_group_declaration():
    torch.manual_seed(4)
    model = Einsum()
    assert autosize.find_neurons(model).groups == []
    decl = autosize.Neurons(incoming=["a.weight", "a.bias"], outgoing=[("w", 1)], name="hidden")
    plan = autosize.find_neurons(model, groups=[decl])
    (g,) = plan.groups
    assert (g.name, g.kind, g.neurons, g.producers, g.consumers) == ("hidden", "manual", 6, ("a",), ("",))
    assert plan.rule_names(outgoing=True) == [(("a.weight", "a.bias", "w"), (0, 0, 1))]
    prox, skipped = autosize.neuron_prox(model, pf.l21(100.0), outgoing=True, groups=[decl])
    assert "a" not in skipped
    out = prox(dict(model.named_parameters()), 1.0)
    assert bool((out["w"] == 0).all()) and bool((out["a.weight"] == 0).all())
    with torch.no_grad():
        model.w[:, [1, 4]] = 0  # unused neurons
    small = autosize.shrink(model, torch.randn(5, 4), groups=[decl])
    assert small.a.out_features == 4 and small.w.shape == (3, 4)
    x = torch.randn(7, 4)
    torch.testing.assert_close(small(x), model(x))
    rep = autosize.report(model, groups=[decl])
    assert rep.rows[0].alive == 4
    with torch.no_grad():  # a constant neuron: no module to fold it into, refused
        model.a.weight[0] = 0
    with pytest.raises(NotImplementedError, match="cannot be folded"):
        autosize.shrink(model, torch.randn(5, 4), groups=[decl])


def test_manual_group_validation():
    model = Einsum()
    with pytest.raises(ValueError, match="'nope.weight', which is no parameter"):
        autosize.find_neurons(model, groups=[autosize.Neurons(incoming=["nope.weight"])])
    with pytest.raises(ValueError, match="has 4 entries along dim 1, not 6"):
        autosize.find_neurons(model, groups=[autosize.Neurons(incoming=["a.bias", ("a.weight", 1)])])
    with pytest.raises(TypeError, match="autosize.Neurons"):
        autosize.find_neurons(model, groups=[("a.weight",)])
    tied = SharedTwo()
    with pytest.raises(ValueError, match="shared"):
        autosize.find_neurons(tied, groups=[autosize.Neurons(incoming=["a.weight", "a.bias"])])


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.a = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.b(self.norm(torch.relu(self.a(h))))


def test_nothing_silent_unknown_layers_and_tracing_failures():
    plan = autosize.find_neurons(WithLSTM())
    assert plan.groups == []
    assert set(plan.skipped) == {"rnn", "a", "norm", "b"}
    assert "LayerNorm" in plan.skipped["a"] and "normalises across channels" in plan.skipped["norm"]
    assert "LSTM" in plan.skipped["rnn"]

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 3))

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else self.body(-x)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prox, skipped = autosize.neuron_prox(Untraceable(), pf.l21(0.1))
    assert any("could not trace 1 part(s) of Untraceable" in str(x.message) for x in w)
    assert prox.rules  # the body's group is still found


class ResMLP(nn.Module):
    """A residual stream of Linears: ``h = h + block(h)``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.w1 = nn.Linear(8, 12, bias=False)
        self.w3 = nn.Linear(8, 12, bias=False)
        self.w2 = nn.Linear(12, 8, bias=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.w2(F.silu(self.w1(h)) * self.w3(h)))


def test_linear_residual_stream_and_gated_mlp():
    torch.manual_seed(5)
    model = ResMLP()
    plan = autosize.find_neurons(model)
    stream = next(g for g in plan.groups if g.kind == "residual")
    assert stream.producers == ("inp", "blocks.0.2", "blocks.1.2")
    assert stream.consumers == ("blocks.0.0", "blocks.1.0", "head")
    assert [g.name for g in plan.groups if g.kind == "linear"] == ["blocks.0.0", "blocks.1.0"]
    assert plan.skipped == {"head": "output layer: its outputs leave the model"}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in ("inp", "blocks.0.2", "blocks.1.2"):  # stream channel 1: written by nobody
            params[f"{name}.weight"][1] = 0
            params[f"{name}.bias"][1] = 0
        for name in ("blocks.0.0", "blocks.1.0", "head"):  # stream channel 6: read by nobody
            params[f"{name}.weight"][:, 6] = 0
    small = autosize.shrink(model, torch.randn(4, 3))
    assert small.inp.out_features == small.head.in_features == 6
    assert [b[2].out_features for b in small.blocks] == [6, 6]
    x = torch.randn(9, 3)
    torch.testing.assert_close(small(x), model(x))

    model = SwiGLU()
    plan = autosize.find_neurons(model)
    gated = next(g for g in plan.groups if g.kind == "gated")
    assert (gated.producers, gated.consumers) == (("w1", "w3"), ("w2",))
    assert (gated.incoming, gated.outgoing, gated.outgoing_dims) == (("w1.weight", "w3.weight"), ("w2.weight",), (1,))
    # w2.weight is the incoming weight of the next group (w2 -> head): a tensor is in one rule only
    assert plan.rule_names(outgoing=True)[1] == (("w1.weight", "w3.weight"), (0, 0))
    with torch.no_grad():
        model.w3.weight[[0, 5]] = 0  # silu(.) * 0: dead through the product...
        model.w1.weight[[0, 5]] = 0  # ...and removable once both rows are zero
        model.w2.weight[:, 7] = 0
    small = autosize.shrink(model, torch.randn(4, 3))
    assert small.w1.out_features == small.w3.out_features == small.w2.in_features == 9
    torch.testing.assert_close(small(x), model(x))


def test_transformer_encoder_stack_is_traced_as_a_leaf_and_its_blocks_are_groups():
    """nn.TransformerEncoder stays a leaf for torch.fx; each layer's feed-forward block is a group,
    also when the model uses one of its own tensors directly (a learned position table)."""
    import torch
    from torch import nn

    from proxfunc import autosize

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.pos = nn.Parameter(torch.randn(8, 16))
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x) + self.pos).mean(1))

    torch.manual_seed(0)
    model = Model()
    plan = autosize.find_neurons(model)
    assert sorted(g.producer for g in plan.groups) == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    with torch.no_grad():
        model.encoder.layers[0].linear1.weight[:20] = 0
        model.encoder.layers[0].linear1.bias[:20] = 0
    x = torch.randn(5, 8, 8)
    small = autosize.shrink(model, (x,))
    model.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert small.encoder.layers[0].linear1.out_features == 12
