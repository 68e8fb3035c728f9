"""The dropout family against the lecture's formulas (keep_prob = p = probability of keeping), seeded, with
statistical tolerances of ~5 standard errors; and where the regularizers put the modules."""

import pytest
import torch
from torch import nn

from reglab.errors import ConfigError
from reglab.models import MLP, ResNet18
from reglab.regularization.dropout import (
    ClassicDropout, ClassicDropoutRegularizer, DropConnectLinear, DropConnectRegularizer, DropoutRegularizer,
    GaussianDropout, GaussianDropoutRegularizer, InvertedDropout, SpatialDropout, SpatialDropoutRegularizer,
)

X = torch.tensor([0.2, 0.5, 0.8, 0.3])  # the lecture's example, p = 0.5
N = 20_000


def _tol(p, n):  # 5 standard errors of a Bernoulli(p) mean over n draws
    return 5 * (p * (1 - p) / n) ** 0.5


def test_lecture_example_classic_dropout():
    drop = ClassicDropout(keep_prob=0.5)
    drop.eval()
    torch.testing.assert_close(drop(X), torch.tensor([0.1, 0.25, 0.4, 0.15]))
    drop.train()
    torch.manual_seed(0)
    out = drop(X.expand(N, 4))
    assert ((out == 0) | (out == X)).all()  # every output is 0 or the input: no rescaling
    kept = (out != 0).float().mean(0)
    assert ((kept - 0.5).abs() < _tol(0.5, N)).all()
    # E[train output] = p * x = the eval output: the two phases agree in expectation.
    torch.testing.assert_close(out.mean(0), 0.5 * X, atol=0.01, rtol=0)


@pytest.mark.parametrize("p", [0.5, 0.8])
def test_inverted_dropout(p):
    drop = InvertedDropout(keep_prob=p)
    torch.manual_seed(0)
    out = drop(X.expand(N, 4))
    assert torch.isclose(out, torch.zeros(())).logical_or(torch.isclose(out, X / p)).all()  # m * a / p
    kept = (out != 0).float().mean(0)
    assert ((kept - p).abs() < _tol(p, N)).all()
    torch.testing.assert_close(out.mean(0), X, atol=0.02, rtol=0)  # training mean ~ x
    drop.eval()
    assert torch.equal(drop(X), X)  # identity in evaluation


def test_keep_prob_is_one_minus_torch_dropout_p():
    x = torch.randn(64, 32)
    torch.manual_seed(0)
    ours = InvertedDropout(keep_prob=0.8)(x)
    torch.manual_seed(0)
    theirs = nn.Dropout(p=0.2)(x)
    assert torch.equal(ours, theirs)


def test_gaussian_dropout_has_mean_one_and_variance_q_over_p():
    p = 0.6
    drop = GaussianDropout(keep_prob=p)
    torch.manual_seed(0)
    mult = drop(torch.ones(200_000))
    assert abs(mult.mean().item() - 1.0) < 0.01
    assert abs(mult.var().item() - (1 - p) / p) < 0.01
    assert (mult != 1).all()  # continuous noise, not a mask
    drop.eval()
    assert torch.equal(drop(X), X)


def test_spatial_dropout_zeroes_whole_channels():
    p = 0.7
    drop = SpatialDropout(keep_prob=p)
    torch.manual_seed(0)
    x = torch.rand(400, 16, 5, 5) + 0.1  # no zeros in the input
    out = drop(x)
    zero = (out == 0).flatten(2)
    assert (zero.all(2) | ~zero.any(2)).all()  # each (sample, channel) map is all zero or all kept
    kept = ~zero.all(2)
    torch.testing.assert_close(out[kept], (x / p)[kept])
    assert abs(kept.float().mean().item() - p) < _tol(p, kept.numel())
    drop.eval()
    assert torch.equal(drop(x), x)
    with pytest.raises(ValueError, match="feature maps"):
        drop.train()(torch.ones(4, 3))


def test_dropconnect_masks_weights_not_units():
    p = 0.5
    torch.manual_seed(0)
    layer = DropConnectLinear(40, 30, keep_prob=p)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(30, 40) + 0.1)  # no zero weights
    eye = torch.eye(40)  # row j of the output reads column j of the masked weight: y_j = W~[:, j] + b
    masked = (layer(eye) - layer.bias).T  # (30, 40) = R * W
    zero = masked.abs() < 1e-6
    assert zero.any() and not zero.all()
    torch.testing.assert_close(masked[~zero], layer.weight.detach()[~zero])
    # A zeroed weight, not a zeroed unit: no output row or input column is wholly dropped.
    assert not zero.all(1).any() and not zero.all(0).any()
    assert abs(1 - zero.float().mean().item() - p) < _tol(p, zero.numel())
    # Gradient reaches only the kept weights.
    layer.zero_grad()
    torch.manual_seed(1)
    layer(torch.ones(1, 40)).sum().backward()
    dropped = layer.weight.grad == 0
    assert 0.3 < dropped.float().mean() < 0.7
    layer.eval()  # mean network: y = (p W) x + b
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), x @ (p * layer.weight).T + layer.bias)


def test_print_model_shows_the_rates():
    net = MLP((1, 8, 8), 10, width=8, depth=1)
    for reg in (DropoutRegularizer(keep_prob=0.5, input_keep_prob=0.8), DropConnectRegularizer(keep_prob=0.7)):
        reg.name = "x"
        reg.attach(net)
    text = str(net)
    assert "InvertedDropout(keep_prob=0.8)" in text and "InvertedDropout(keep_prob=0.5)" in text
    assert "DropConnectLinear(in_features=64, out_features=8, bias=True, keep_prob=0.7)" in text
    assert repr(ClassicDropout(0.5)) == "ClassicDropout(keep_prob=0.5)"
    assert repr(GaussianDropout(0.9)) == "GaussianDropout(keep_prob=0.9)"


def _attach(reg, net, name="dropout"):
    reg.name = name
    reg.attach(net)
    return net


def test_mlp_placement():
    net = _attach(DropoutRegularizer(keep_prob=0.5, input_keep_prob=0.8, layers=[1]), MLP((6,), 2, width=4, depth=3))
    assert isinstance(net.input_dropout, InvertedDropout) and net.input_dropout.keep_prob == 0.8
    assert [type(h.dropout).__name__ for h in net.hidden] == ["Identity", "InvertedDropout", "Identity"]
    net = _attach(ClassicDropoutRegularizer(keep_prob=0.5), MLP((6,), 2, width=4, depth=2))
    assert isinstance(net.input_dropout, nn.Identity)  # input_keep_prob defaults to 1: no input dropout
    assert all(isinstance(h.dropout, ClassicDropout) for h in net.hidden)
    net = _attach(DropConnectRegularizer(keep_prob=0.5, layers=[0], head=False), MLP((6,), 2, width=4, depth=2))
    assert [type(h.linear).__name__ for h in net.hidden] == ["DropConnectLinear", "Linear"]
    assert type(net.head) is nn.Linear


def test_dropconnect_keeps_the_parameters():
    net = MLP((6,), 2, width=4, depth=1)
    w = net.hidden[0].linear.weight
    _attach(DropConnectRegularizer(), net)
    assert net.hidden[0].linear.weight is w


def test_resnet_placement():
    net = _attach(GaussianDropoutRegularizer(keep_prob=0.8, stages=[2]), ResNet18((1, 8, 8), 3, width=2))
    assert [type(d).__name__ for d in net.stage_dropout] == ["Identity", "Identity", "GaussianDropout", "Identity"]
    assert isinstance(net.head_dropout, GaussianDropout)
    net = _attach(SpatialDropoutRegularizer(keep_prob=0.9), ResNet18((1, 8, 8), 3, width=2), "spatial_dropout")
    assert all(isinstance(d, SpatialDropout) for d in net.stage_dropout)
    net.train()(torch.randn(4, 1, 8, 8)).sum().backward()
    net = _attach(DropConnectRegularizer(), ResNet18((1, 8, 8), 3, width=2), "dropconnect")
    assert isinstance(net.head, DropConnectLinear)


@pytest.mark.parametrize("make, net, match", [
    (lambda: SpatialDropoutRegularizer(), lambda: MLP((6,), 2, width=4), "has none"),
    (lambda: DropoutRegularizer(input_keep_prob=0.8), lambda: ResNet18((1, 8, 8), 3, width=2), "input_keep_prob"),
    (lambda: DropoutRegularizer(stages=[1]), lambda: MLP((6,), 2, width=4), "stages"),
    (lambda: DropoutRegularizer(layers=[5]), lambda: MLP((6,), 2, width=4), r"layers=\[5\]"),
    (lambda: SpatialDropoutRegularizer(stages=[4]), lambda: ResNet18((1, 8, 8), 3, width=2), "stage"),
    (lambda: DropConnectRegularizer(head=False), lambda: ResNet18((1, 8, 8), 3, width=2), "nothing"),
])
def test_inapplicable_placement_is_a_config_error(make, net, match):
    with pytest.raises(ConfigError, match=match):
        _attach(make(), net())


def test_two_dropouts_in_one_slot_is_a_config_error():
    net = _attach(DropoutRegularizer(), MLP((6,), 2, width=4))
    with pytest.raises(ConfigError, match="already holds"):
        _attach(GaussianDropoutRegularizer(), net, "gaussian_dropout")


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, True, "half"])
def test_keep_prob_outside_0_1_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="keep_prob"):
        InvertedDropout(bad)
    with pytest.raises(ConfigError, match="keep_prob"):
        DropoutRegularizer(keep_prob=bad)


def test_dropconnect_per_example_draws_a_mask_per_sample_with_keep_prob_scaling():
    """mask=per_example (Wan et al.): every sample its own R_n, so identical inputs give different outputs, each
    y_n[o] = b_o + r_no0 * W_o0 on input e_0; per_batch shares one R. E[y] = (p W) x + b, the eval output."""
    p, n = 0.5, 4000
    torch.manual_seed(0)
    layer = DropConnectLinear(20, 10, keep_prob=p, mask="per_example")
    with torch.no_grad():
        layer.weight.copy_(torch.rand(10, 20) + 0.1)  # no zero weights
    e0 = torch.zeros(n, 20)
    e0[:, 0] = 1.0
    read = (layer(e0) - layer.bias).detach()  # (n, 10): r_no0 * W_o0
    kept = read.abs() > 1e-6
    torch.testing.assert_close(read[kept], layer.weight.detach()[:, 0].expand(n, 10)[kept])
    assert len({tuple(row.tolist()) for row in kept[:50]}) > 40  # 2^10 patterns: 50 samples share almost none
    assert abs(kept.float().mean().item() - p) < _tol(p, kept.numel())
    shared = DropConnectLinear(20, 10, keep_prob=p)
    with torch.no_grad():
        shared.weight.copy_(layer.weight)
    out = shared(e0[:50])
    assert (out == out[0]).all()  # per_batch: one R for the whole batch
    # E over masks of y = (R * W) x + b is (p W) x + b, the mean network evaluation uses: within 5 standard errors.
    x = torch.randn(20)
    y = layer(x.expand(n, 20)).detach()
    expected = layer.eval()(x[None])[0].detach()
    se = (p * (1 - p) * (layer.weight.detach() ** 2 @ x ** 2) / n).sqrt()
    assert ((y.mean(0) - expected).abs() < 5 * se).all()
    # The gradient of each sample reaches only its own kept weights: summed over the batch it is (n, out, in) masks
    # times x, so a weight kept by no sample gets none.
    layer.train().zero_grad()
    layer(torch.ones(3, 20)).sum().backward()
    assert ((layer.weight.grad == 0) | (layer.weight.grad == layer.weight.grad.round())).all()  # 0..3 per weight
    assert (layer.weight.grad > 1).any()  # some weights were kept by two or three samples


def test_dropconnect_gaussian_inference_matches_the_masks_moments():
    """Wan et al.'s moment matching on a small layer: E[u] = p W v + b and Var[u] = p(1-p)(W*W)(v*v) against a
    Monte-Carlo over per-example masks; the Gaussian average of ReLU(u) against its closed form
    mu Phi(mu/s) + s phi(mu/s) and against the masks' own average, which the mean network relu(E[u]) misses."""
    p, n = 0.6, 4000
    torch.manual_seed(0)
    layer = DropConnectLinear(200, 8, keep_prob=p, mask="per_example", inference="gaussian", samples=20_000)
    v = torch.randn(200)
    mean, var = (t[0].detach() for t in layer.moments(v[None]))
    u = layer.train()(v.expand(n, 200)).detach()  # n draws of R
    se = (var / n).sqrt()
    assert ((u.mean(0) - mean).abs() < 5 * se).all()
    torch.testing.assert_close(u.var(0), var, rtol=5 * (2 / n) ** 0.5, atol=0)  # sample variance's SE ~ sqrt(2/n)
    normal = torch.distributions.Normal(0.0, 1.0)
    s = var.sqrt()
    closed = mean * normal.cdf(mean / s) + s * normal.log_prob(mean / s).exp()
    layer.eval()
    average = layer.gaussian_average(v[None], torch.relu)[0].detach()
    assert ((average - closed).abs() < 5 * s / 20_000 ** 0.5).all()
    masks_average = torch.relu(u).mean(0)
    assert ((masks_average - closed).abs() < 0.05 * s + 5 * s / n ** 0.5).all()  # Gaussian approximation, fan-in 200
    assert ((torch.relu(mean) - masks_average).abs() > 0.1 * s).any()  # what the mean network gets wrong


def test_dropconnect_gaussian_inference_in_the_mlp():
    """inference=gaussian: a hidden layer's evaluation averages norm and activation over sampled u; the head (no
    activation after it) keeps the exact mean (p W) x + b; training is unchanged."""
    torch.manual_seed(0)
    net = MLP((12,), 3, width=16, depth=1)
    mean_net = MLP((12,), 3, width=16, depth=1)
    mean_net.load_state_dict(net.state_dict())
    _attach(DropConnectRegularizer(keep_prob=0.5, inference="gaussian", samples=5000), net, "dropconnect")
    _attach(DropConnectRegularizer(keep_prob=0.5), mean_net, "dropconnect")
    assert "inference=gaussian, samples=5000" in str(net)
    x = torch.randn(6, 12)
    net.eval(), mean_net.eval()
    layer = net.hidden[0]
    torch.manual_seed(1)
    hidden = layer(x).detach()
    torch.manual_seed(1)
    torch.testing.assert_close(hidden, layer.linear.gaussian_average(x, layer.after_linear).detach())
    torch.testing.assert_close(net.head(hidden), hidden @ (0.5 * net.head.weight).T + net.head.bias)
    assert not torch.allclose(net(x), mean_net(x), atol=1e-3)  # relu of the mean is not the mean of relu
    assert (hidden >= torch.relu(mean_net.hidden[0].linear(x)) - 0.02).all()  # E relu(u) >= relu(E u) (Jensen)
    # Training is unchanged: the same masks (same generator state) give the same outputs as the default inference.
    net.train(), mean_net.train()
    torch.manual_seed(2)
    trained = net(x)
    torch.manual_seed(2)
    torch.testing.assert_close(trained, mean_net(x))


@pytest.mark.parametrize("override, match", [
    ({"mask": "per_sample"}, r"regularization\.dropconnect\.mask='per_sample' is not one of per_batch, per_example"),
    ({"inference": "sampling"}, r"regularization\.dropconnect\.inference='sampling'"),
    ({"samples": 0}, r"regularization\.dropconnect\.samples=0"),
])
def test_dropconnect_options_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        DropConnectRegularizer(**override)
