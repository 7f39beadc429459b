"""Auto-sizing convolutional networks: the residual stream of a ResNet stage (with a
downsample), MobileNetV2's inverted residuals (expand -> BN -> ReLU6 -> depthwise -> BN ->
ReLU6 -> project), on small models defined here, and on torchvision's ResNet-18 and
MobileNetV2 when torchvision can be imported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import proxfunc as pf
from proxfunc import autosize
from proxfunc.compat import ProxOptimizer


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


# ------------------------------------------------------------------ small ResNet
class BasicBlock(nn.Module):  # torchvision's, in small
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 12, 2), BasicBlock(12, 12))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------ small MobileNetV2
class InvertedResidual(nn.Module):  # torchvision's, in small
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        last = nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.features = nn.Sequential(
            stem,
            InvertedResidual(8, 6, 1, 1),
            InvertedResidual(6, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            last,
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------ helpers
def plant(model: nn.Module, g: autosize.NeuronGroup, dead_in: list[int], dead_out: list[int]) -> None:
    """Neurons ``dead_in``: every incoming slice zero (producer rows, BatchNorm scale and shift,
    depthwise filters), as the prox leaves them; ``dead_out``: every consumer column zero."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in zip(g.incoming, g.incoming_dims):
            params[name].index_fill_(d, torch.tensor(dead_in, dtype=torch.long), 0.0)
        for _, name, d in g.reads:
            w = params[name]
            r = w.shape[d] // g.neurons
            cols = [i * r + k for i in dead_out for k in range(r)]
            w.index_fill_(d, torch.tensor(cols, dtype=torch.long), 0.0)


def width(model: nn.Module, g: autosize.NeuronGroup) -> int:
    name, d = g.weights_in[0]
    return dict(model.named_parameters())[name].shape[d]


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=1e-4, atol=1e-5)


def check_model(model: nn.Module, x: torch.Tensor, convs_in_groups: set[str]) -> autosize.Plan:
    """Every conv listed is in a group; every module with parameters is in a group or skipped
    with a reason; planted dead neurons are removed; outputs equal; fewer parameters."""
    model.eval()
    plan = autosize.find_neurons(model)
    covered = {m for g in plan.groups for m in (*g.producers, *g.norms)}
    assert convs_in_groups <= covered, convs_in_groups - covered
    holders = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert holders <= covered | set(plan.skipped), holders - covered - set(plan.skipped)
    assert all(plan.skipped.values())
    for g in plan.groups:
        plant(model, g, dead_in=[0], dead_out=[g.neurons - 1] if g.neurons > 2 else [])
    before = sum(p.numel() for p in model.parameters())
    small = autosize.shrink(model, x)
    for g in plan.groups:
        assert width(small, g) == g.neurons - (2 if g.neurons > 2 else 1), g.name
    assert sum(p.numel() for p in small.parameters()) < before
    assert_same(model, small, torch.randn(2, *x.shape[1:]))
    return plan


# ------------------------------------------------------------------ tests
def test_resnet_residual_stream_and_blocks():
    torch.manual_seed(0)
    net = TinyResNet()
    randomise_bn(net)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    plan = check_model(net, torch.randn(2, 3, 16, 16), convs)
    kinds = [g.kind for g in plan.groups]
    assert kinds.count("conv2d") == 4 and kinds.count("residual") == 2
    stage1, stage2 = [g for g in plan.groups if g.kind == "residual"]
    assert stage1.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert set(stage1.consumers) == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert set(stage2.producers) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    assert set(stage2.consumers) == {"layer2.1.conv1", "fc"}
    assert "fc.weight" in stage2.outgoing  # one column per channel after global pooling
    assert set(stage1.norms) == {"bn1", "layer1.0.bn2", "layer1.1.bn2"}
    assert plan.skipped == {"fc": "output layer: its outputs leave the model"}


def test_resnet_constant_into_zero_padded_conv_is_refused():
    torch.manual_seed(1)
    net = TinyResNet().eval()
    randomise_bn(net, 1)
    with torch.no_grad():
        net.layer1[0].conv1.weight[2] = 0
        net.layer1[0].bn1.bias[2] = 5.0  # relu(bn(0)) > 0: a constant into the zero-padded conv2
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(NotImplementedError, match="zero-padded layer1.0.conv2"):
        autosize.shrink(net, x)
    with pytest.warns(UserWarning, match="zero-padded"):
        kept = autosize.shrink(net, x, strict=False)
    assert kept.layer1[0].conv1.out_channels == 8
    assert_same(net, kept, torch.randn(2, 3, 16, 16))


def test_mobilenet_depthwise_chains():
    torch.manual_seed(2)
    net = TinyMobileNetV2()
    randomise_bn(net, 2)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    plan = check_model(net, torch.randn(2, 3, 16, 16), convs)
    by = {g.name: g for g in plan.groups}
    assert by["features.0.0"].kind == "depthwise"  # stem -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project
    assert by["features.0.0"].norms == ("features.0.1", "features.1.conv.0", "features.1.conv.1")
    assert by["features.0.0"].consumers == ("features.1.conv.3",)
    assert by["features.2.conv.0"].kind == by["features.3.conv.0"].kind == "depthwise"
    assert "features.2.conv.3.weight" in by["features.2.conv.0"].incoming  # dw filters are incoming
    assert by["features.2.conv.6"].kind == "residual"  # the 12 channels shared by the residual pair
    assert set(by["features.2.conv.6"].consumers) == {"features.3.conv.0", "features.4.0"}
    assert set(plan.skipped) == {"classifier.1"}


def test_mobilenet_constant_through_depthwise_is_folded():
    torch.manual_seed(3)
    net = TinyMobileNetV2().eval()
    randomise_bn(net, 3)
    with torch.no_grad():  # expand row and its BN zero: the depthwise sees 0, its BN makes a constant
        net.features[2].conv[0].weight[[1, 5]] = 0
        net.features[2].conv[1].weight[[1, 5]] = 0
        net.features[2].conv[1].bias[[1, 5]] = 0
    small = autosize.shrink(net, torch.randn(1, 3, 16, 16))
    assert small.features[2].conv[3].groups == small.features[2].conv[3].out_channels == 22
    assert small.features[2].conv[6].in_channels == 22
    assert small.features[2].conv[6].bias is not None  # the constants, folded
    assert_same(net, small, torch.randn(3, 3, 16, 16))


def test_conv_prox_training_shrinks_mobilenet():
    torch.manual_seed(4)
    net = TinyMobileNetV2()
    prox, skipped = autosize.neuron_prox(net, pf.l21(3.0))
    opt = ProxOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), prox, params=net)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    rep = autosize.report(net)
    assert rep.alive < rep.total
    small = autosize.shrink(net.eval(), x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    assert_same(net, small, x)


# ------------------------------------------------------------------ torchvision (optional)
def _torchvision():
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        pytest.skip(f"torchvision cannot be imported here: {type(e).__name__}: {str(e)[:200]}")
    return torchvision


def test_torchvision_resnet18():
    tv = _torchvision()
    torch.manual_seed(5)
    net = tv.models.resnet18(num_classes=10)
    randomise_bn(net, 5)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    plan = check_model(net, torch.randn(1, 3, 64, 64), convs)
    kinds = [g.kind for g in plan.groups]
    assert kinds.count("conv2d") == 8 and kinds.count("residual") == 4


def test_torchvision_mobilenet_v2():
    tv = _torchvision()
    torch.manual_seed(6)
    net = tv.models.mobilenet_v2(num_classes=10)
    randomise_bn(net, 6)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    plan = check_model(net, torch.randn(1, 3, 64, 64), convs)
    assert sum(g.kind == "depthwise" for g in plan.groups) == 17
