"""Penalties against their math: gradients (lecture eqs. 5-10), soft-thresholding, proximal sparsity, the ridge
closed form (eq. 13), decoupled decay == AdamW, max-norm projection, and the parameter-selection rule."""

import copy

import pytest
import torch
from torch import nn

from reglab.errors import ConfigError
from reglab.regularization.penalties import (
    L1, L2, ElasticNet, L1Proximal, MaxNorm, WeightDecay, penalized_parameters, soft_threshold, weight_stats,
)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _grads(net, reg=None):
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    net.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    if reg is not None:
        loss = loss + reg.penalty(net)
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("reg, expected", [
    (L2(strength=0.3), lambda w: 2 * 0.3 * w),                                    # g + 2*lambda*w (eq. 8)
    (L1(strength=0.3), lambda w: 0.3 * torch.sign(w)),                            # g + lambda*sgn(w) (eq. 5)
    (ElasticNet(l1_strength=0.2, l2_strength=0.1), lambda w: 0.2 * torch.sign(w) + 0.2 * w),
])
def test_penalty_gradient_is_g_plus_the_formula_on_weights_only(reg, expected):
    net = _net()
    g = _grads(net)
    g_reg = _grads(net, reg)
    params = dict(net.named_parameters())
    for name, p in params.items():
        if p.dim() >= 2:
            torch.testing.assert_close(g_reg[name], g[name] + expected(p.detach()))
        else:  # biases and BatchNorm gamma/beta are not penalized by default
            torch.testing.assert_close(g_reg[name], g[name])


def test_include_bias_penalizes_biases_and_norm_parameters():
    net = _net()
    g = _grads(net)
    g_reg = _grads(net, L2(strength=0.5, include_bias=True))
    for name, p in net.named_parameters():
        torch.testing.assert_close(g_reg[name], g[name] + p.detach())
    assert len(penalized_parameters(net)) == 2 and len(penalized_parameters(net, include_bias=True)) == 6


def test_soft_threshold_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    w, t = torch.randn(1000, generator=g), 0.7
    expected = torch.where(w > t, w - t, torch.where(w < -t, w + t, torch.zeros_like(w)))
    torch.testing.assert_close(soft_threshold(w, t), expected)
    assert (soft_threshold(w, t) == 0).sum() == (w.abs() <= t).sum()


def _sparse_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 20, generator=g)
    w_true = torch.zeros(20)
    w_true[:3] = torch.tensor([2.0, -3.0, 1.5])
    y = x @ w_true + 0.1 * torch.randn(200, generator=g)
    return x, y


def _fit_linear(reg, steps=600, lr=0.05):
    x, y = _sparse_regression()
    torch.manual_seed(0)
    model = nn.Linear(20, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        penalty = reg.penalty(model)
        (loss + penalty if penalty is not None else loss).backward()
        opt.step()
        reg.after_step(model, opt)
    return model.weight.detach().squeeze(0)


def test_l1_proximal_gives_exact_zeros_where_subgradient_l1_does_not():
    prox = _fit_linear(L1Proximal(strength=0.1))
    sub = _fit_linear(L1(strength=0.1))
    assert (prox[3:] == 0).all(), prox  # every irrelevant weight exactly 0
    assert (prox[:3].abs() > 1.0).all()  # the relevant ones survive (shrunk by ~lambda)
    assert (sub[3:] == 0).sum() == 0  # the subgradient oscillates around 0 but never lands on it
    assert sub[3:].abs().max() < 0.05  # ...while being small: it does shrink


def test_l2_reaches_the_ridge_closed_form():
    # Our loss is the MEAN squared error, 1/N ||y - Xw||^2 + lambda ||w||^2, whose minimizer is
    # (X^T X + N lambda I)^-1 X^T y: the lecture's eq. 11-13 (sum of squares) with lambda_lecture = N * lambda.
    x, y = _sparse_regression()
    lam, n = 0.5, len(y)
    closed = torch.linalg.solve(x.T @ x + n * lam * torch.eye(20), x.T @ y)
    torch.manual_seed(0)  # the start (convex: any start converges, but not one left by the tests before)
    model = nn.Linear(20, 1, bias=False)
    reg = L2(strength=lam)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(1), y) + reg.penalty(model)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(model.weight.detach().squeeze(0), closed, atol=1e-4, rtol=1e-4)
    assert closed.norm() < torch.linalg.lstsq(x, y).solution.norm()  # shrinkage


def _train_hooks(net, opt, reg, steps=5):
    torch.manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        penalty = reg.penalty(net) if reg else None
        (loss + penalty if penalty is not None else loss).backward()
        if reg:
            reg.before_step(net, opt)
        opt.step()
        if reg:
            reg.after_step(net, opt)
    return net


def _groups(net, decay):
    return [{"params": [p for p in net.parameters() if p.dim() >= 2], "weight_decay": decay},
            {"params": [p for p in net.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def test_weight_decay_is_adamw_for_adam():
    a, b = _net(), _net()
    _train_hooks(a, torch.optim.Adam(a.parameters(), lr=0.01), WeightDecay(strength=0.1))
    _train_hooks(b, torch.optim.AdamW(_groups(b, 0.1), lr=0.01), None)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_weight_decay_equals_l2_of_half_strength_with_sgd_but_not_with_adam():
    a, b = _net(), _net()
    _train_hooks(a, torch.optim.SGD(a.parameters(), lr=0.1), WeightDecay(strength=0.2))
    _train_hooks(b, torch.optim.SGD(b.parameters(), lr=0.1), L2(strength=0.1))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    a, b = _net(), _net()
    _train_hooks(a, torch.optim.Adam(a.parameters(), lr=0.1), WeightDecay(strength=0.2))
    _train_hooks(b, torch.optim.Adam(b.parameters(), lr=0.1), L2(strength=0.1))
    assert not torch.allclose(a[0].weight, b[0].weight, atol=1e-3)


def test_max_norm_projects_each_hidden_unit_onto_the_ball():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[2].weight[:3] *= 10  # three rows outside the ball
        net[0].weight[0] *= 50  # one output channel of the kernel
        net[4].weight *= 10  # the output layer: not a hidden unit, left alone
    before = copy.deepcopy(net)
    reg = MaxNorm(max_norm=1.0)
    reg.after_step(net, torch.optim.SGD(net.parameters(), lr=0.1))
    for p, q in zip(net.parameters(), before.parameters()):
        if p.dim() < 2 or p is net[4].weight:
            assert torch.equal(p, q)  # biases and the output layer untouched
            continue
        norms, old = p.flatten(1).norm(dim=1), q.flatten(1).norm(dim=1)
        assert (norms <= 1.0 + 1e-6).all()
        inside = old <= 1.0
        assert torch.equal(p[inside], q[inside])  # rows inside the ball are unchanged
        torch.testing.assert_close(norms[~inside], torch.ones_like(norms[~inside]))  # projected onto the sphere
        cos = nn.functional.cosine_similarity(p.flatten(1)[~inside], q.flatten(1)[~inside])
        torch.testing.assert_close(cos, torch.ones_like(cos))  # same direction
    assert (net[4].weight.norm(dim=1) > 1.0).all()
    clipped = sum(int((q.flatten(1).norm(dim=1) > 1.0).sum()) for q in (before[0].weight, before[2].weight))
    assert reg.epoch_metrics()["clipped_frac"].item() == pytest.approx(clipped / (4 + 6))  # hidden rows only
    assert reg.epoch_metrics() == {}  # reset: nothing measured since


def test_max_norm_binds_in_training_on_hidden_units_only():
    """An MLP trained with a large learning rate: after every step each hidden unit's incoming weights have norm
    <= c, rows were clipped (clipped_frac > 0), and the head, whose rows grow past c, is never projected."""
    from reglab.models import MLP

    torch.manual_seed(0)
    net = MLP((10,), 3, width=16, depth=2)
    reg = MaxNorm(max_norm=0.7)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    fractions = []
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        head = net.head.weight.detach().clone()
        reg.after_step(net, opt)
        assert torch.equal(net.head.weight, head)  # the output layer is not constrained
        for layer in net.hidden:
            assert (layer.linear.weight.norm(dim=1) <= 0.7 * (1 + 1e-6)).all()
        fractions.append(reg.epoch_metrics()["clipped_frac"].item())
    assert max(fractions) > 0.5 and fractions[-1] > 0  # it binds, and keeps binding
    assert (net.head.weight.norm(dim=1) > 0.7).any()


def test_weight_stats():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 3.0], [0.0, -4.0]]))
        net[1].weight.copy_(torch.tensor([[0.0, 0.0]]))
    s = weight_stats(net)
    assert s["params/zero_frac"].item() == pytest.approx(4 / 6)
    assert s["params/l1"].item() == pytest.approx(7.0)
    assert s["params/l2"].item() == pytest.approx(5.0)


def test_weight_stats_of_a_population_are_each_members_own():
    from reglab.models import MLP
    from reglab.population import fuse

    nets = []
    for width, seed in [(3, 0), (5, 0), (3, 1), (5, 1)]:  # two width groups, members interleaved
        torch.manual_seed(seed)
        nets.append(MLP((4,), 2, width, 2))
    with torch.no_grad():
        nets[2].hidden[0].linear.weight[:, :2] = 0.0  # one member with exact zeros
    fused = weight_stats(fuse(nets))
    for m, net in enumerate(nets):
        for key, value in weight_stats(net).items():
            assert fused[key].shape == (4,)
            assert fused[key][m].item() == pytest.approx(value.item(), rel=1e-6), (m, key)
    assert fused["params/zero_frac"][2] > 0 and (fused["params/zero_frac"][[0, 1, 3]] == 0).all()


@pytest.mark.parametrize("make", [lambda: L2(strength=-1), lambda: L1(strength="big"),
                                  lambda: ElasticNet(l2_strength=-0.1), lambda: MaxNorm(max_norm=0)])
def test_bad_strengths_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_max_norm_logs_its_clipped_fraction_through_a_run(tmp_root):
    """train/max_norm/clipped_frac reaches the run's metrics (regularizers' epoch_metrics, once per epoch); at the
    catalogue's c it binds within 2 epochs of a width-64 MLP at lr 0.01."""
    from conftest import compose, quick

    from reglab.train import run

    metrics = run(compose(quick(tmp_root, "regularization=[max_norm]", "model.width=64", "optim.lr=0.01",
                                "callbacks.early_stopping=null", "callbacks.checkpoint=null")))
    assert 0 < metrics["train/max_norm/clipped_frac"] <= 1, metrics
