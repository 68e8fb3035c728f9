"""Normalization: the lecture's batch-norm example, gamma/beta initialization, every `model.norm` on both models,
and `model.norm_position` pre (f(BN(Wx + b))) versus post (BN(f(Wx + b)))."""

import pytest
import torch
from torch import nn

from reglab.models import MLP, ResNet18
from reglab.regularization.normalization import NORMS, make_norm

# The lecture's mini-batch (4 samples x 3 features) and its printed "Após Normalização" table.
BATCH = torch.tensor([[2.1, 0.8, -1.2], [1.8, 1.1, -0.9], [2.3, 0.9, -1.1], [1.9, 1.0, -1.0]])
SLIDE = torch.tensor([[0.45, -1.22, -1.22], [-0.89, 1.22, 1.22], [1.34, -0.41, -0.41], [-0.45, 0.41, 0.41]])
# The same table recomputed with the slide's own formula (mu_B, biased sigma_B^2, eps = 1e-5). The printed table
# is off by up to 0.26: its column 1 is (x - 2.0) / 0.2236 where mu_B = 2.025 and sigma_B = 0.1920, and columns
# 2-3 use sigma = 0.1225 where sigma_B = 0.1118 (docs/regularization.md, "errata").
RECOMPUTED = torch.tensor([[0.3906, -1.3411, -1.3411], [-1.1717, 1.3411, 1.3411],
                           [1.4321, -0.4470, -0.4470], [-0.6509, 0.4470, 0.4470]])


def test_lecture_batch_norm_example():
    """The slide's mini-batch through the batch norm of an MLP's hidden layer (model.norm=batch), whose linear map is
    set to the identity so the norm sees the slide's numbers."""
    net = MLP((3,), 2, width=3, depth=1, norm="batch", norm_position="pre")
    layer = net.hidden[0]
    with torch.no_grad():
        layer.linear.weight.copy_(torch.eye(3))
        layer.linear.bias.zero_()
    bn = layer.norm
    assert isinstance(bn, nn.BatchNorm1d) and bn.eps == 1e-5
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))  # gamma=1, beta=0
    seen = []
    bn.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    net.train()(BATCH)
    (out,) = seen
    torch.testing.assert_close(out, RECOMPUTED, atol=0.01, rtol=0)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-6, rtol=0)  # each column: mean 0
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)  # variance 1
    # The slide's table agrees in sign and in the order of the values within each column.
    assert torch.equal(torch.sign(out), torch.sign(SLIDE))
    assert torch.equal(out.argsort(0), SLIDE.argsort(0))
    # mu_B and (biased) sigma_B as the slide's "cálculos por feature" define them.
    torch.testing.assert_close(bn.running_mean, 0.1 * BATCH.mean(0))  # momentum 0.1 from 0
    mu_b, sigma_b = BATCH.mean(0), BATCH.var(0, unbiased=False).sqrt()
    torch.testing.assert_close(mu_b, torch.tensor([2.025, 0.95, -1.05]))
    torch.testing.assert_close(sigma_b, torch.tensor([0.1920, 0.1118, 0.1118]), atol=1e-4, rtol=0)


def test_the_slide_table_uses_a_wrong_mean_and_wrong_sigmas():
    """Errata: the printed table is (x1 - 2.0) / 0.2236 (sigma = sqrt(0.05); the slide says mu1 = 2.0, sigma1 = 0.22)
    and (x - mu) / 0.1225 for columns 2-3 (sigma = sqrt(0.015); the slide says 0.12), to its two decimals; so it
    has neither mean 0 (column 1) nor standard deviation 1 (any column), while the formula's output has both."""
    x1 = BATCH[:, 0]
    assert torch.equal(((x1 - 2.0) / 0.05 ** 0.5).round(decimals=2), SLIDE[:, 0])
    rest = BATCH[:, 1:]
    assert torch.equal(((rest - rest.mean(0)) / 0.015 ** 0.5).round(decimals=2), SLIDE[:, 1:])
    # Neither the mean nor sigma of column 1 is the formula's: mu_B = 2.025, sigma_B = 0.1920 (not 0.2236).
    assert x1.mean().item() == pytest.approx(2.025) and x1.std(unbiased=False).item() == pytest.approx(0.1920, abs=1e-4)
    torch.testing.assert_close(SLIDE.mean(0), torch.tensor([0.1125, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(SLIDE.std(0, unbiased=False), torch.tensor([0.858, 0.910, 0.910]), atol=2e-3, rtol=0)
    torch.testing.assert_close(RECOMPUTED.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", [k for k in NORMS if k != "none"])
def test_norms_start_as_identity_affine(kind):
    spatial = kind == "instance"
    norm = make_norm(kind, 8, spatial=spatial)
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))


def test_layer_norm_normalizes_each_sample_over_features():
    torch.manual_seed(0)
    out = make_norm("layer", 16, spatial=False)(torch.randn(5, 16) * 3 + 2).detach()
    torch.testing.assert_close(out.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_instance_and_group_norm_on_feature_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5) * 4 - 1
    inst = make_norm("instance", 8, spatial=True)(x).detach()
    torch.testing.assert_close(inst.mean((2, 3)), torch.zeros(2, 8), atol=1e-5, rtol=0)  # per sample and channel
    group = make_norm("group", 64, spatial=True)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 32
    with pytest.raises(ValueError, match="instance"):
        make_norm("instance", 8, spatial=False)


def _norm_inputs(net, x):
    seen = []
    # ResNet18's final_norm (before pooling) is norm -> ReLU whatever norm_position says: only block/layer norms.
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
             for n, m in net.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
             and not n.startswith("final_norm")]
    net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("make, x", [  # inputs from a generator of their own, not the collection-time global state
    (lambda pos: MLP((10,), 3, width=16, depth=2, norm="batch", norm_position=pos),
     torch.randn(32, 10, generator=torch.Generator().manual_seed(0))),
    (lambda pos: ResNet18((1, 8, 8), 3, width=2, norm="batch", norm_position=pos),
     torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))),
])
def test_norm_position_pre_normalizes_before_the_activation(make, x):
    torch.manual_seed(0)
    pre = _norm_inputs(make("pre"), x)
    post = _norm_inputs(make("post"), x)
    assert any((i < 0).any() for i in pre)  # pre: BN sees W x + b, which has negative values
    assert all((i >= 0).all() for i in post)  # post: BN sees ReLU(W x + b) >= 0


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_on_both_models(norm):
    torch.manual_seed(0)
    nets = [ResNet18((1, 8, 8), 3, width=2, norm=norm)]
    if norm != "instance":  # an MLP has no spatial positions to normalize over
        nets.append(MLP((1, 8, 8), 3, width=8, norm=norm))
    for net in nets:
        out = net(torch.randn(4, 1, 8, 8))
        assert out.shape == (4, 3) and torch.isfinite(out).all()
        has_norm = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
                       for m in net.modules())
        assert has_norm == (norm != "none")


def test_config_defaults_and_errors(tmp_root):
    from conftest import compose
    from reglab.errors import ConfigError
    from reglab.train import build_model

    assert compose(["model=resnet18"]).model.norm == "batch"  # BatchNorm is the ResNet default
    with pytest.raises(ConfigError, match="instance"):
        build_model(compose(["model.norm=instance"]), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="norm_position"):
        build_model(compose(["model.norm_position=middle"]), (1, 8, 8), 10)


def _group_norms(net):
    return [m for m in net.modules() if isinstance(m, nn.GroupNorm)]


def test_group_count_is_model_norm_groups_and_degenerate_widths_warn_once(caplog):
    """gcd(C, model.norm_groups) groups per layer; one warning per model naming the widths where that is 1 group
    (layer norm) or 1 channel per group (instance norm), none where it is real group norm."""
    with caplog.at_level("WARNING", logger="reglab.regularization.normalization"):
        wide = MLP((10,), 3, width=64, depth=2, norm="group")
        assert [(g.num_groups, g.num_channels) for g in _group_norms(wide)] == [(32, 64)] * 2  # 2 units per group
        eight = MLP((10,), 3, width=64, depth=2, norm="group", norm_groups=8)
        assert {g.num_groups for g in _group_norms(eight)} == {8}
        assert caplog.records == []
        odd = MLP((10,), 3, width=47, depth=2, norm="group")
        assert {g.num_groups for g in _group_norms(odd)} == {1}  # gcd(47, 32) = 1: layer norm
        resnet = ResNet18((1, 8, 8), 3, width=4, norm="group")
        assert all(g.num_groups == g.num_channels for g in _group_norms(resnet))  # 4..32 channels, 1 per group
    mlp_warning, resnet_warning = (r.getMessage() for r in caplog.records)  # one per model, not one per layer
    assert mlp_warning.startswith("MLP(width=47)") and "C = 47 it is 1 group = layer norm" in mlp_warning
    assert "C = 4, 8, 16, 32 it is 1 channel per group = instance norm" in resnet_warning
    # norm_groups=2: every ResNet18(width=4) layer (4..32 channels) has 2 groups, real group norm, no warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="reglab.regularization.normalization"):
        assert {g.num_groups for g in _group_norms(ResNet18((1, 8, 8), 3, width=4, norm="group", norm_groups=2))} \
            == {2}
    assert caplog.records == []


def test_norm_groups_from_the_config(tmp_root):
    from conftest import compose
    from reglab.errors import ConfigError
    from reglab.train import build_model

    assert compose([]).model.norm_groups == 32 and compose(["model=resnet18"]).model.norm_groups == 32
    net = build_model(compose(["model.norm=group", "model.norm_groups=16", "model.width=48"]), (1, 8, 8), 10)
    assert {g.num_groups for g in _group_norms(net)} == {16}  # gcd(48, 16)
    with pytest.raises(ConfigError, match=r"model\.norm_groups=0"):
        build_model(compose(["model.norm=group", "model.norm_groups=0"]), (1, 8, 8), 10)
