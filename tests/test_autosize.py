"""Auto-sizing: neuron groups from modules (torch.fx), the operator, the report, exact shrink."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import proxfunc as pf
from proxfunc import autosize
from proxfunc.compat import apply_

torch.set_default_dtype(torch.float32)

ACTS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,  # f(0) = 0.5: dead neurons are constants, folded
    "gelu": nn.GELU,
    "softplus": nn.Softplus,  # f(0) = log 2
    "elu": nn.ELU,
}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert ya.shape == yb.shape
    scale = max(1.0, float(ya.abs().max()))
    assert float((ya - yb).abs().max()) <= tol * scale, float((ya - yb).abs().max())


# ------------------------------------------------------------------------ random MLPs
@st.composite
def mlp_case(draw):
    d_in = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    d_out = draw(st.integers(1, 4))
    act = draw(st.sampled_from(sorted(ACTS)))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    dead_in = [draw(st.sets(st.integers(0, w - 1), max_size=w)) for w in widths]
    dead_out = [draw(st.sets(st.integers(0, w - 1), max_size=w)) for w in widths]
    zero_bias = [draw(st.sets(st.integers(0, w - 1), max_size=w)) for w in widths]
    return d_in, widths, d_out, act, bias, seed, dead_in, dead_out, zero_bias


def build_mlp(d_in, widths, d_out, act, bias, seed, dead_in, dead_out, zero_bias):
    torch.manual_seed(seed)
    sizes = [d_in, *widths, d_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias or i == len(sizes) - 2))
        if i < len(widths):
            layers.append(ACTS[act]())
    model = nn.Sequential(*layers)
    lin = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for k in range(len(widths)):
            for i in dead_in[k]:
                lin[k].weight[i] = 0
                if lin[k].bias is not None and i in zero_bias[k]:
                    lin[k].bias[i] = 0
            for i in dead_out[k]:
                lin[k + 1].weight[:, i] = 0
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_case())
def test_shrink_random_mlp_exact(case):
    d_in, widths, d_out, act, bias, seed, dead_in, dead_out, zero_bias = case
    model = build_mlp(*case)
    before = state(model)
    x = torch.randn(16, d_in, generator=torch.Generator().manual_seed(seed))
    small = autosize.shrink(model, x)
    assert same_state(before, state(model)), "the original model was modified"
    assert small is not model
    # neuron j of hidden layer k is removed iff its incoming weights (row j of W_k) or its outgoing
    # weights (column j of W_{k+1}) are all zero; a dead row of W_{k+1} also zeroes a column entry
    orig = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    new_widths = [int((~((orig[k] == 0).all(1) | (orig[k + 1] == 0).all(0))).sum()) for k in range(len(widths))]
    for k, w in enumerate(widths):  # the drawn dead sets are removed (at least)
        assert new_widths[k] <= w - len(dead_in[k] | dead_out[k])
    # a layer keeps one neuron at least (the documented rule, for Linear and convolutions alike)
    new_widths = [max(1, w) for w in new_widths]
    lin = [m for m in small if isinstance(m, nn.Linear)]
    assert [m.out_features for m in lin[:-1]] == new_widths
    sizes = [d_in, *new_widths, d_out]
    # a layer gains a bias only when a constant neuron is folded into it
    expected = 0
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        expected += a * b + (b if lin[i].bias is not None else 0)
    assert sum(p.numel() for p in small.parameters()) == expected
    for i, m in enumerate(lin):
        had_bias = bias or i == len(lin) - 1
        if not had_bias and m.bias is not None:
            # gained a bias: a constant neuron with a nonzero contribution was folded into it; a
            # neuron is constant when its incoming weights are zero, or when all its inputs died
            assert i > 0 and (any(dead_in[:i]) or any(dead_out[:i]))
            assert m.bias.numel() == 0 or bool((m.bias != 0).any())  # (a layer left with no neurons)
    # same function on fresh inputs, not only the example inputs
    x2 = torch.randn(32, d_in, generator=torch.Generator().manual_seed(seed + 1)) * 3
    assert_same_function(model, small, x2)


def test_constant_neuron_is_folded_exactly():
    # sigmoid(0) = 0.5: a neuron with zero weights and zero bias still outputs 0.5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0.0
        model[0].weight[2] = 0
        model[0].bias[2] = -1.5
    small = autosize.shrink(model, torch.randn(5, 3))
    assert small[0].out_features == 2 and small[2].in_features == 2
    w2 = model[2].weight.detach()
    want = model[2].bias.detach() + 0.5 * w2[:, 1] + torch.sigmoid(torch.tensor(-1.5)) * w2[:, 2]
    torch.testing.assert_close(small[2].bias.detach(), want)
    torch.testing.assert_close(small[2].weight.detach(), w2[:, [0, 3]])
    assert_same_function(model, small, torch.randn(50, 3) * 5)


def test_fold_creates_bias_when_consumer_has_none():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight[0] = 0
    small = autosize.shrink(model, torch.randn(4, 3))
    assert small[2].bias is not None and model[2].bias is None
    torch.testing.assert_close(small[2].bias.detach(), F.softplus(model[0].bias[0]).detach() * model[2].weight[:, 0])
    assert_same_function(model, small, torch.randn(20, 3))


# ------------------------------------------------------------------ user modules (fx)
class TwoLayerNet(nn.Module):  # the seed README's network
    def __init__(self, d_in=2, h=10, d_out=1):
        super().__init__()
        self.linear1 = nn.Linear(d_in, h)
        self.linear2 = nn.Linear(h, d_out)

    def forward(self, x):
        return self.linear2(self.linear1(x).clamp(min=0))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(5, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = F.gelu(self.a(x))
        h = torch.tanh(self.b(self.drop(h)) * 2.0)
        return self.c(h)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x)) + x  # a's neurons are mixed with the input: not a hidden layer
        return self.out(torch.relu(self.b(h)))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.a(torch.relu(self.a(x)))))


def test_find_neurons_user_modules():
    plan = autosize.find_neurons(TwoLayerNet())
    assert [(g.producer, g.consumer, g.chain) for g in plan.groups] == [("linear1", "linear2", "clamp")]
    assert "output layer" in plan.skipped["linear2"]

    plan = autosize.find_neurons(FunctionalNet())
    assert [(g.producer, g.consumer) for g in plan.groups] == [("a", "b"), ("b", "c")]
    assert plan.groups[0].chain == "gelu -> dropout"
    assert plan.groups[1].chain == "mul 2.0 -> tanh"

    plan = autosize.find_neurons(Residual())
    assert [g.producer for g in plan.groups] == ["b"]
    assert plan.skipped["a"] == "its output is combined with the input 'x' of the model in add"

    plan = autosize.find_neurons(Shared())
    assert plan.groups == []
    assert "called 2 times" in plan.skipped["a"]


def test_shrink_user_module_and_refusal():
    torch.manual_seed(3)
    net = FunctionalNet()
    with torch.no_grad():
        net.a.weight[[0, 4]] = 0
        net.c.weight[:, 2] = 0
    small = autosize.shrink(net, torch.randn(8, 4))
    assert (small.a.out_features, small.b.in_features, small.b.out_features, small.c.in_features) == (4, 4, 4, 4)
    assert_same_function(net, small, torch.randn(30, 4))

    res = Residual()
    with torch.no_grad():
        res.a.weight[1] = 0
    with pytest.raises(NotImplementedError, match="a has 1 neurons"):
        autosize.shrink(res, torch.randn(3, 4))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        kept = autosize.shrink(res, torch.randn(3, 4), strict=False)
    assert any("cannot be shrunk" in str(x.message) for x in w)
    assert kept.a.out_features == 4
    assert_same_function(res, kept, torch.randn(10, 4))


# ------------------------------------------------------------------ conv + batch norm
class ConvNet(nn.Module):
    def __init__(self, pad2=0):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=pad2)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2 if pad2 == 0 else 6 * 3 * 3, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = self.pool(torch.sigmoid(self.bn2(self.c2(h))))
        return self.fc(torch.flatten(h, 1))


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


def test_conv_bn_shrink_exact():
    torch.manual_seed(0)
    net = ConvNet()
    randomise_bn(net)
    with torch.no_grad():
        net.c1.weight[[1, 6]] = 0  # constants through BN (running stats) + relu, folded into c2 (no padding)
        net.c2.weight[:, 3] = 0  # channel 3 of c1 unused downstream
        net.c2.weight[[0, 4]] = 0  # constants through BN + sigmoid + maxpool, folded into fc columns
        net.fc.weight[:, 5 * 4 : 6 * 4] = 0  # channel 5 of c2: all its 2*2 flattened columns are zero
    net.train()  # shrink works in eval mode whatever the mode of the original
    before = state(net)
    x = torch.randn(4, 3, 8, 8)
    small = autosize.shrink(net, x)
    assert net.training and same_state(before, state(net))
    assert not small.training
    assert (small.c1.out_channels, small.bn1.num_features, small.c2.in_channels) == (5, 5, 5)
    assert (small.c2.out_channels, small.bn2.num_features, small.fc.in_features) == (3, 3, 12)
    keep = torch.tensor([0, 2, 4, 5, 7])
    torch.testing.assert_close(small.bn1.running_mean, net.bn1.running_mean[keep])
    torch.testing.assert_close(small.bn1.running_var, net.bn1.running_var[keep])
    torch.testing.assert_close(small.bn1.weight.detach(), net.bn1.weight.detach()[keep])
    assert_same_function(net, small, torch.randn(6, 3, 8, 8) * 2)


def test_conv_zero_padding_constant_is_refused_or_kept():
    torch.manual_seed(1)
    net = ConvNet(pad2=1)
    randomise_bn(net, 1)
    with torch.no_grad():
        net.c1.weight[2] = 0  # constant channel into a zero-padded conv: not a constant at the border
        net.c2.weight[:, 5] = 0  # unused channel: removable
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(NotImplementedError, match="zero-padded"):
        autosize.shrink(net, x)
    with pytest.warns(UserWarning, match="zero-padded"):
        small = autosize.shrink(net, x, strict=False)
    assert small.c1.out_channels == 7  # channel 5 removed, channel 2 kept
    assert_same_function(net, small, torch.randn(3, 3, 8, 8))


class GAPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.gap(self.features(x)).flatten(1))


def test_conv_global_pool_and_all_channels_dead():
    torch.manual_seed(2)
    net = GAPNet()
    with torch.no_grad():
        net.features[2].weight.zero_()  # every channel of the second conv is a constant
    small = autosize.shrink(net, torch.randn(2, 1, 6, 6))
    assert small.features[2].out_channels == 1  # PyTorch has no empty Conv2d: one channel stays
    assert_same_function(net, small, torch.randn(3, 1, 6, 6))


# ------------------------------------------------------------------ transformer FFN
@pytest.mark.parametrize("batch_first,activation", [(True, "gelu"), (False, "relu")])
def test_transformer_ffn_shrink(batch_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 24, dropout=0.1, batch_first=batch_first, activation=activation)
    with torch.no_grad():
        layer.linear1.weight[:7] = 0  # bias nonzero: constants act(b) folded into linear2.bias
        layer.linear2.weight[:, 20:] = 0
    plan = autosize.find_neurons(layer)
    assert [(g.producer, g.consumer, g.kind) for g in plan.groups] == [("linear1", "linear2", "ffn")]
    assert "attention" in plan.skipped["self_attn.out_proj"]
    x = torch.randn(3, 5, 8)
    small = autosize.shrink(layer, x)
    assert small.linear1.out_features == 13 and small.linear2.in_features == 13
    assert_same_function(layer, small, torch.randn(2, 6, 8))

    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    plan = autosize.find_neurons(enc)
    assert [g.producer for g in plan.groups] == ["layers.0.linear1", "layers.1.linear1"]
    small = autosize.shrink(enc, x)
    assert [m.linear1.out_features for m in small.layers] == [13, 13]
    assert_same_function(enc, small, torch.randn(2, 6, 8))


# ------------------------------------------------------------------ the operator
def block_soft(parts, dims, t):
    """Independent l21 prox: scale every group by max(0, 1 - t / ||group||_2)."""
    sq = sum((p.movedim(d, 0).reshape(p.shape[d], -1) ** 2).sum(1) for p, d in zip(parts, dims))
    scale = torch.clamp(1 - t / sq.sqrt(), min=0)
    out = []
    for p, d in zip(parts, dims):
        shape = [1] * p.dim()
        shape[d] = -1
        out.append(p * scale.reshape(shape))
    return out


@pytest.mark.parametrize("outgoing", [False, True])
def test_neuron_prox_is_group_lasso_over_neurons(outgoing):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    prox, skipped = autosize.neuron_prox(model, pf.l21(0.3), outgoing=outgoing)
    assert isinstance(prox, pf.Prox) and set(skipped) == {"4"}
    p = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = prox(p, 0.5)
    w0, b0 = block_soft([p["0.weight"], p["0.bias"]], [0, 0], 0.15)
    torch.testing.assert_close(out["0.weight"], w0)
    torch.testing.assert_close(out["0.bias"], b0)
    if outgoing:  # 2.weight is layer 2's incoming weight: only the last layer's columns join a group
        w2, b2, w4 = block_soft([p["2.weight"], p["2.bias"], p["4.weight"]], [0, 0, 1], 0.15)
        torch.testing.assert_close(out["4.weight"], w4)
    else:
        w2, b2 = block_soft([p["2.weight"], p["2.bias"]], [0, 0], 0.15)
        assert out["4.weight"] is p["4.weight"]
    torch.testing.assert_close(out["2.weight"], w2)
    assert out["4.bias"] is p["4.bias"]
    # the same operator in place through compat
    apply_(prox, model, 0.5)
    torch.testing.assert_close(model[0].weight.detach(), w0)


def test_neuron_prox_accepts_factories_and_refuses_non_group_ops():
    model = TwoLayerNet()
    a, _ = autosize.neuron_prox(model, lambda group_dim: pf.linf1(0.1, group_dim=group_dim))
    b, _ = autosize.neuron_prox(model, pf.linf1(0.1))
    p = dict(model.named_parameters())
    torch.testing.assert_close(a(p, 0.2)["linear1.weight"], b(p, 0.2)["linear1.weight"])
    with pytest.raises(TypeError, match="group_dim"):
        autosize.neuron_prox(model, pf.l1(0.1))
    with pytest.raises(TypeError, match="must return"):
        autosize.neuron_prox(model, lambda group_dim: 3)


def test_prox_training_kills_neurons_then_shrink_matches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    prox, _ = autosize.neuron_prox(model, pf.linf1(0.5))
    x = torch.randn(64, 4)
    y = x[:, :1] * 2
    p = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.func.grad(lambda q: F.mse_loss(torch.func.functional_call(model, q, (x,)), y))
    for _ in range(200):
        gr = g(p)
        p = prox({k: p[k] - 0.05 * gr[k] for k in p}, 0.05)
    trained = copy.deepcopy(model)
    trained.load_state_dict(p, strict=False)
    rep = autosize.report(model, p)
    small = autosize.shrink(trained, x)
    assert rep.rows[0].alive == small[0].out_features < 16
    assert_same_function(trained, small, torch.randn(20, 4))


# ------------------------------------------------------------------ report
def test_report_numbers_and_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[[0, 1]] = 0  # 2 constants
        model[0].bias[0] = 0
        model[2].weight[:, 4] = 0  # neuron 4 of layer 0 unused
        model[2].weight[1] = 0
        model[2].bias[1] = 0  # layer 2 neuron 1: all 4 incoming + bias zero
    rep = autosize.report(model)
    r0, r2 = rep.rows
    assert (r0.name, r0.alive, r0.constant, r0.total) == ("0", 2, 2, 5)
    assert r0.params == 20 and r0.params_alive == 2 * 4
    assert r0.sparsity == pytest.approx(7 / 20)  # 6 weights + 1 bias are zero
    assert (r2.name, r2.alive, r2.constant, r2.total) == ("2", 3, 1, 4)
    assert r2.params == 24 and r2.params_alive == 3 * 6
    # zeros of layer 2: its row 1 (5 weights + bias) and the rest of column 4 (3 more)
    assert r2.sparsity == pytest.approx(9 / 24)
    assert (rep.alive, rep.total) == (5, 9)
    text = str(rep)
    assert text.splitlines()[0].split() == [
        "layer",
        "kind",
        "alive/total",
        "constant",
        "params",
        "params",
        "alive",
        "sparsity",
    ]
    assert "2/5" in text and "3/4" in text and "5/9" in text and "35.0%" in text
    # params of a functional loop override the module's own
    p = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    assert autosize.report(model, p).alive == 0


def test_find_neurons_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        autosize.find_neurons({"w": torch.zeros(2)})


class AvgPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)  # count_include_pad: borders see zeros
        self.c2 = nn.Conv2d(4, 3, 3)

    def forward(self, x):
        return self.c2(self.pool(F.relu(self.c1(x))))


def test_constant_made_non_uniform_by_padded_pooling_is_refused():
    torch.manual_seed(4)
    net = AvgPoolNet()
    with torch.no_grad():
        net.c1.weight[1] = 0
        net.c1.bias[1] = 0.7  # relu(0.7) = 0.7, but the padded average is smaller at the border
    with pytest.raises(NotImplementedError, match="not uniform"):
        autosize.shrink(net, torch.randn(1, 2, 7, 7))
    with torch.no_grad():
        net.c1.bias[1] = -0.7  # relu(-0.7) = 0: a dead channel, removed
    small = autosize.shrink(net, torch.randn(1, 2, 7, 7))
    assert small.c1.out_channels == 3 and small.c2.in_channels == 3
    assert_same_function(net, small, torch.randn(2, 2, 9, 9))


def test_linear_batchnorm1d_mlp():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ELU(), nn.Linear(6, 2))
    randomise_bn(model, 5)
    plan = autosize.find_neurons(model)
    assert plan.groups[0].incoming == ("0.weight", "0.bias", "1.weight", "1.bias")
    with torch.no_grad():
        model[0].weight[[2, 3]] = 0
    small = autosize.shrink(model, torch.randn(5, 4))
    assert small[0].out_features == small[1].num_features == small[3].in_features == 4
    assert_same_function(model, small, torch.randn(7, 4))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace forward, but it can trace the child."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 3))

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_to_its_children():
    torch.manual_seed(6)
    net = Untraceable()
    plan = autosize.find_neurons(net)
    assert [(g.producer, g.consumer) for g in plan.groups] == [("body.0", "body.2")]
    assert plan.skipped == {"body.2": "output layer: its outputs leave the module body"}
    with torch.no_grad():
        net.body[0].weight[[0, 5]] = 0
    small = autosize.shrink(net, torch.randn(3, 4))
    assert small.body[0].out_features == 6
    assert_same_function(net, small, torch.randn(10, 4))
    assert_same_function(net, small, -torch.rand(10, 4))
