import pytest
import torch

from reglab.models import MLP, ResNet18


def test_mlp_shapes_and_param_count():
    net = MLP((1, 8, 8), 10, width=32, depth=2)
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    # 64*32+32 + 32*32+32 + 32*10+10
    assert net.num_params == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_mlp_depth(depth):
    net = MLP((40,), 10, width=16, depth=depth)
    assert len(net.hidden) == depth
    assert net(torch.randn(3, 40)).shape == (3, 10)



@pytest.mark.parametrize("norm,position", [("none", "pre"), ("batch", "pre"), ("batch", "post"), ("layer", "post")])
def test_mlp_evaluation_without_autograd_equals_with_it(norm, position):
    """HiddenLayer.activate computes ReLU in place when no graph is recorded: the outputs must be those of the
    out-of-place ReLU that training (autograd on) uses, and the input must be left alone."""
    torch.manual_seed(0)
    net = MLP((40,), 10, width=16, depth=3, norm=norm, norm_position=position).eval()
    x = torch.randn(8, 40)
    kept = x.clone()
    with_grad = net(x)
    with torch.no_grad():
        without = net(x)
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(x, kept)
    assert with_grad.requires_grad and not without.requires_grad

@pytest.mark.parametrize("width", [1, 4, 64])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_resnet18_forward_backward(width, shape):
    torch.manual_seed(0)
    net = ResNet18(shape, 10, width=width)
    x = torch.randn(2, *shape)
    out = net(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.stem.weight.grad.abs().sum() > 0


def test_resnet18_width64_is_standard_resnet18():
    # Standard ResNet18 for CIFAR (3x3 stem, no max-pool, 10 classes): 11,173,962 parameters with post-activation
    # BatchNorm (torchvision layout). The pre-activation variant moves the norms (no stem/shortcut BN, one final BN),
    # which changes the count by 1,792: same convolutions and head, 0.016% apart.
    import torchvision

    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    conv_and_head = lambda m: sum(p.numel() for n, p in m.named_parameters()  # noqa: E731
                                  if p.dim() >= 2 or n.endswith(("fc.bias", "head.bias")))
    net = ResNet18((3, 32, 32), 10, width=64)
    assert conv_and_head(net) == conv_and_head(ref)
    assert abs(net.num_params - 11_173_962) / 11_173_962 < 0.001
    assert [s[0].conv1.out_channels for s in net.stages] == [64, 128, 256, 512]


def test_resnet_stage_widths_scale_with_k():
    net = ResNet18((3, 32, 32), 10, width=3)
    assert [s[1].conv2.out_channels for s in net.stages] == [3, 6, 12, 24]


@pytest.mark.parametrize("bad", [0, -1])
def test_width_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="model.width"):
        MLP((4,), 2, width=bad)
    with pytest.raises(ValueError, match="model.width"):
        ResNet18((3, 8, 8), 2, width=bad)
