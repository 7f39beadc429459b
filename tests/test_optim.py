"""Proximal steps in training loops: functional prox_sgd / prox_adam, and ProxOptimizer with
every torch.optim optimizer and learning-rate scheduler.

Oracles: torch.optim's own SGD/Adam/AdamW followed by the prox (for the functional steps), the
closed form of soft thresholding with the scheduler's lr (for the schedulers), scale invariance
(for the Adam prox-step choices), and a pruned network that computes the same function as the
auto-sized one.
"""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad

import proxfunc as pf
from proxfunc.compat import ProxOptimizer
from tests.conftest import requires_compile

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def _mlp(seed=0, dtype=torch.float32, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)


NEURONS = ("0.weight", "0.bias", "2.weight")


def _neuron_prox(reg):
    # neuron i = (W1[i, :], b1[i], W2[:, i]) -- the auto-sizing group of Murray & Chiang (2015)
    return pf.partition({NEURONS: pf.l21(reg, group_dim=(0, 0, 1))})


def _loss_fn(model):
    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return loss


# ------------------------------------------------------------------- functional prox_sgd / adam
def _lockstep(model, opt, ref, ref_opt, X, y, steps):
    """Run a functional prox optimizer on ``model``'s parameters and ``ref_opt`` (torch.optim +
    prox, in place) on ``ref`` for the same steps; return the functional params and state."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = opt.init(params)
    loss = _loss_fn(model)
    for _ in range(steps):
        g = grad(loss)(params, X, y)
        params, state = opt.step(params, g, state)
        ref_opt.zero_grad()
        F.cross_entropy(ref(X), y).backward()
        ref_opt.step()
    return params, state


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3)],
    ids=["plain", "momentum", "nesterov_wd"],
)
def test_prox_sgd_matches_torch_sgd_then_prox(digits, kw):
    X, y = digits
    X, y = X[:128].to(D), y[:128]
    model = _mlp(dtype=D)
    prox = _neuron_prox(0.05)
    ref = copy.deepcopy(model)
    ref_opt = ProxOptimizer(torch.optim.SGD(ref.parameters(), lr=0.2, **kw), prox, params=ref)
    opt = pf.prox_sgd(prox, lr=0.2, **kw)
    params, state = _lockstep(model, opt, ref, ref_opt, X, y, steps=6)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(params[k], v.detach(), rtol=1e-10, atol=1e-12)
    assert int(state.count) == 6


@pytest.mark.parametrize("decoupled", [False, True])
def test_prox_adam_matches_torch_adam_then_prox(digits, decoupled):
    X, y = digits
    X, y = X[:128].to(D), y[:128]
    model = _mlp(dtype=D)
    prox = _neuron_prox(20.0)
    ref = copy.deepcopy(model)
    inner = (torch.optim.AdamW if decoupled else torch.optim.Adam)(ref.parameters(), lr=0.01, weight_decay=1e-2)
    ref_opt = ProxOptimizer(inner, prox, params=ref)
    opt = pf.prox_adam(prox, lr=0.01, weight_decay=1e-2, decoupled_weight_decay=decoupled)
    params, state = _lockstep(model, opt, ref, ref_opt, X, y, steps=6)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(params[k], v.detach(), rtol=1e-9, atol=1e-11)
    assert (pf.l21(1.0, group_dim=(0, 0, 1)).group_norms(tuple(params[k] for k in NEURONS)) == 0).any()


@pytest.mark.parametrize("prox_step", ["lr", "scaled"])
def test_prox_adam_step_choice_scale_invariance(digits, prox_step):
    # Adam's update is invariant to scaling the loss by c. With prox_step="lr" the prox is too
    # (reg unchanged); with "scaled" the prox step scales by 1/c, so reg must scale by c.
    X, y = digits
    X, y = X[:128].to(D), y[:128]
    model = _mlp(dtype=D)
    loss = _loss_fn(model)
    c = 50.0

    def run(scale, reg):
        opt = pf.prox_adam(pf.l1(reg), lr=0.02, prox_step=prox_step, eps=1e-200)  # eps ~ 0: exact invariance
        p = {k: v.detach().clone() for k, v in model.named_parameters()}
        s = opt.init(p)
        for _ in range(8):
            g = grad(lambda q: scale * loss(q, X, y))(p)
            p, s = opt.step(p, g, s)
        return p

    base = run(1.0, 0.01)
    same = run(c, 0.01 if prox_step == "lr" else 0.01 * c)
    other = run(c, 0.01 * c if prox_step == "lr" else 0.01)
    for k in base:
        torch.testing.assert_close(same[k], base[k], rtol=1e-8, atol=1e-10)
    assert max(float((other[k] - base[k]).abs().max()) for k in base) > 1e-4
    zeros = sum(int((v == 0).sum()) for v in base.values())
    assert zeros > 0  # the prox does act


def test_prox_adam_scaled_is_exact_prox_for_uniform_preconditioner():
    # With a gradient of equal magnitude in every entry, sqrt(v_hat) is uniform, Adam's metric
    # is a multiple of the identity and "scaled" is the exact proximal gradient step
    # x - lr*u  ->  soft_threshold(., reg * lr / mean(sqrt(v_hat)+eps)).
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D)
    g = torch.tensor([2.0, -2.0, 2.0, -2.0], dtype=D)
    opt = pf.prox_adam(pf.l1(1.0), lr=0.1, prox_step="scaled", eps=0.0)
    new, _ = opt.step(x, g, opt.init(x))
    # first step: m_hat = g, v_hat = g^2 -> u = sign(g); step = 0.1 / 2
    expected = pf.l1(1.0)(x - 0.1 * torch.sign(g), 0.05)
    torch.testing.assert_close(new, expected)


_COMPILED = {}


def _compiled_adam_step(model, opt):
    if "adam" not in _COMPILED:
        loss = _loss_fn(model)

        @torch.compile(fullgraph=True)
        def train_step(params, state, x, y, lr):
            g = grad(loss)(params, x, y)
            return opt.step(params, g, state, lr=lr)

        _COMPILED["adam"] = train_step
    return _COMPILED["adam"]


@requires_compile
def test_compiled_train_step_matches_eager(digits):
    X, y = digits
    X, y = X[:256], y[:256]
    model = _mlp(hidden=8)
    opt = pf.prox_adam(_neuron_prox(0.02), lr=0.01, prox_step="scaled")
    step = _compiled_adam_step(model, opt)
    loss = _loss_fn(model)
    p_c = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e = {k: v.clone() for k, v in p_c.items()}
    s_c, s_e = opt.init(p_c), opt.init(p_e)  # init also fills partition's name cache (eager)
    sched = [0.01, 0.02, 0.015, 0.005]  # a changing lr as a 0-d tensor: no recompilation
    for lr in sched:
        p_c, s_c = step(p_c, s_c, X, y, torch.tensor(lr))
        p_e, s_e = opt.step(p_e, grad(loss)(p_e, X, y), s_e, lr=torch.tensor(lr))
    for k in p_e:
        torch.testing.assert_close(p_c[k], p_e[k], rtol=1e-4, atol=1e-5)
    # the SGD step traces too (dynamo only, no second inductor compile)
    sgd = pf.prox_sgd(_neuron_prox(0.02), lr=0.1, momentum=0.9)
    traced = torch.compile(lambda p, s, g: sgd.step(p, g, s), fullgraph=True, backend="eager")
    g = grad(loss)(p_e, X, y)
    s0 = sgd.init(p_e)
    a, _ = traced(p_e, s0, g)
    b, _ = sgd.step(p_e, g, s0)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_functional_step_argument_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="lr"):
        pf.prox_sgd(pf.l1(), lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        pf.prox_sgd(pf.l1(), nesterov=True)
    with pytest.raises(ValueError, match="prox_step"):
        pf.prox_adam(pf.l1(), prox_step="diagonal")
    with pytest.raises(ValueError, match="betas"):
        pf.prox_adam(pf.l1(), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="prox"):
        pf.prox_sgd(lambda p, t: p)
    with pytest.raises(TypeError, match="schedule"):
        pf.prox_sgd(pf.l1()).step(x, x, pf.prox_sgd(pf.l1()).init(x), lr=lambda k: 0.1)


# ------------------------------------------------------------ ProxOptimizer and torch.optim
def _all_optimizers():
    out = []
    for name, cls in sorted(vars(torch.optim).items()):
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            out.append(name)
    return out


OPTIMIZERS = _all_optimizers()


def test_optimizer_list_is_complete():
    assert {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LBFGS", "SparseAdam"} <= set(OPTIMIZERS)


class _Net(nn.Module):
    def __init__(self, sparse=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 6, sparse=sparse)
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, idx):
        return self.out(torch.tanh(self.lin(self.emb(idx).mean(1)))).squeeze(-1)


def _make_opt(name, params):
    cls = getattr(torch.optim, name)
    kwargs = {"lr": 0.05}
    if "lr" not in inspect.signature(cls.__init__).parameters:
        kwargs = {}
    return cls(params, **kwargs)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_prox_optimizer_with_every_torch_optimizer(name):
    # ProxOptimizer(opt) == opt.step() followed by the prox with the group's lr, for every optimizer.
    sparse = name == "SparseAdam"
    idx = torch.randint(0, 12, (16, 3), generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, generator=torch.Generator().manual_seed(2))
    prox = pf.partition({("lin.weight", "lin.bias"): pf.l21(0.3), "emb.weight": pf.l1(2.0)})
    net, ref = _Net(sparse), _Net(sparse)
    ref.load_state_dict(net.state_dict())

    def groups(m):
        if name == "Muon":  # Muon takes 2-d parameters only
            return [p for p in m.parameters() if p.dim() == 2]
        if name == "SparseAdam":  # sparse gradients only: the embedding
            return [m.emb.weight]
        return m.parameters()

    opt = ProxOptimizer(_make_opt(name, groups(net)), prox, params=net)
    ref_opt = _make_opt(name, groups(ref))

    def closure_for(model, o):
        def closure():
            o.zero_grad()
            loss = F.mse_loss(model(idx), target)
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        if name == "LBFGS":
            opt.step(closure_for(net, opt))
            ref_opt.step(closure_for(ref, ref_opt))
        else:
            closure_for(net, opt)()
            opt.step()
            closure_for(ref, ref_opt)()
            ref_opt.step()
        with torch.no_grad():
            params = dict(ref.named_parameters())
            lr = ref_opt.param_groups[0]["lr"]
            new = prox({k: v.detach() for k, v in params.items()}, lr)
            for k, v in params.items():
                v.copy_(new[k])
    for (k, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=f"{name}: {k}")
    if name != "Muon":
        assert (net.emb.weight == 0).any(), "the prox acted"


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),  # reaches lr = 0
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.4, total_steps=8),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.3, step_size_up=2, cycle_momentum=False),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=5, power=2.0),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.7)],
        milestones=[2],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("inner", ["SGD", "Adam"])
def test_prox_uses_the_schedulers_current_lr(sched, inner):
    # Zero gradients: the optimizer's own update is exactly 0, so each step is soft thresholding
    # with threshold reg * lr, where lr is the group's lr at the time of the step.
    w = nn.Parameter(torch.linspace(-3, 3, 13, dtype=D))
    reg = 0.5
    base = getattr(torch.optim, inner)([w], lr=0.1)
    opt = ProxOptimizer(base, pf.partition({"w": pf.l1(reg)}), params={"w": w})
    scheduler = SCHEDULERS[sched](opt)
    expected = w.detach().clone()
    lrs = []
    for _ in range(8):
        opt.zero_grad()
        (0.0 * w.sum()).backward()
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        expected = torch.sign(expected) * torch.clamp(expected.abs() - reg * lr, min=0)
        opt.step()
        scheduler.step(1.0) if sched == "ReduceLROnPlateau" else scheduler.step()
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
    assert len(set(lrs)) > 1, "the schedule changed the lr"
    assert base.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_per_group_prox_with_different_lrs_and_schedules():
    a = nn.Parameter(torch.tensor([[3.0, 4.0], [0.1, 0.1]], dtype=D))
    b = nn.Parameter(torch.tensor([2.0, -2.0, 0.05], dtype=D))
    inner = torch.optim.SGD(
        [{"params": [a], "prox": pf.l21(1.0), "lr": 0.5}, {"params": [b], "prox": pf.l1(1.0)}], lr=0.1
    )
    opt = ProxOptimizer(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda k: 2.0**-k, lambda k: 1.0 + k])
    ea, eb = a.detach().clone(), b.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (0.0 * (a.sum() + b.sum())).backward()
        la, lb = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        ea = pf.l21(1.0)(ea, la)
        eb = pf.l1(1.0)(eb, lb)
        opt.step()
        sched.step()
        torch.testing.assert_close(a.detach(), ea)
        torch.testing.assert_close(b.detach(), eb)
    assert (a[1] == 0).all() and a[0].norm() > 0  # group 1 died, group 0 shrank
    # state_dict round trip keeps the per-group operators
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["prox"] == pf.l21(1.0)


def test_autosizing_with_adam_and_cosine_schedule(digits):
    # Auto-sizing (Murray & Chiang 2015): group lasso over neurons during ordinary training with
    # Adam and a cosine learning-rate schedule; some hidden neurons die (exactly zero groups).
    X, y = digits
    model = _mlp(seed=3, hidden=32)
    prox = _neuron_prox(2.0)
    steps = 120
    opt = ProxOptimizer(torch.optim.Adam(model.parameters(), lr=0.02), prox, params=model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    W1, b1, W2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    dead = (W1 == 0).all(1) & (b1 == 0) & (W2 == 0).all(0)
    norms = pf.l21(1.0, group_dim=(0, 0, 1)).group_norms((W1, b1, W2))
    assert torch.equal(dead, norms == 0)
    assert 0 < int(dead.sum()) < 32, int(dead.sum())
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
    # the dead neurons can be removed: a smaller network computes the same function
    alive = ~dead
    small = nn.Sequential(nn.Linear(64, int(alive.sum())), nn.ReLU(), nn.Linear(int(alive.sum()), 10))
    with torch.no_grad():
        small[0].weight.copy_(W1[alive])
        small[0].bias.copy_(b1[alive])
        small[2].weight.copy_(W2[:, alive])
        small[2].bias.copy_(model[2].bias)
        torch.testing.assert_close(small(X), model(X), rtol=1e-5, atol=1e-5)
