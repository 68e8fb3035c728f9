"""Fused populations against their members trained alone: the same weights after K steps of SGD and Adam, the same
logits, per-member dropout masks, and fusable()'s reasons for what cannot be fused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reglab.models import MLP, ResNet18
from reglab.population import PopulationMLP, PopulationResNet18, fusable, fuse, member_losses
from reglab.regularization.dropout import (
    DropConnectLinear, DropConnectRegularizer, DropoutRegularizer, GaussianDropoutRegularizer, InvertedDropout,
    SpatialDropoutRegularizer,
)

IN, CLASSES = 12, 5
IMAGE = (1, 8, 8)


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small gain nothing from OpenMP threads, and on a shared CPU the threads' spin-waits made a
    # 4-step ResNet test take 10-20 s instead of 0.2 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlps(widths, seeds=None, **kw) -> list[MLP]:
    nets = []
    for w, seed in zip(widths, seeds if seeds is not None else range(len(widths))):
        torch.manual_seed(seed)
        nets.append(MLP((IN,), CLASSES, width=w, depth=2, **kw))
    return nets


def resnets(members, width=2, seeds=None, **kw) -> list[ResNet18]:
    nets = []
    for seed in seeds if seeds is not None else range(members):
        torch.manual_seed(seed)
        nets.append(ResNet18(IMAGE, CLASSES, width=width, **kw))
    return nets


def batches(steps, members, batch, shape, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(members, batch, *shape, generator=g), torch.randint(0, CLASSES, (members, batch), generator=g))
            for _ in range(steps)]


# Float32 gradients of these nets carry ~1e-6 absolute rounding (|g| ~ 1 at the stem; alone or fused, each is as
# far from a float64 reference), which the steps scale by lr: learning rates keep that below the 1e-6 tolerance.
OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    # Adam divides by each element's gradient scale, so an element with |g| ~ 1e-5 carries the kernels' ~1e-7
    # rounding into its step at ~1e-2 relative: at lr=1e-3 that is < 1e-6 after a few steps.
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


def train_alone(nets, data, make_opt):
    for m, net in enumerate(nets):
        net.train()
        opt = make_opt(net.parameters())
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(net(x[m]), y[m]).backward()
            opt.step()


def train_fused(pop, data, make_opt):
    pop.train()
    opt = make_opt(pop.parameters())
    for x, y in data:
        opt.zero_grad()
        logits = pop(x)
        loss = sum(F.cross_entropy(logits[m], y[m]) for m in range(pop.members))
        loss.backward()
        opt.step()


def assert_same_weights(pop, nets):
    for m, net in enumerate(nets):
        ours, theirs = pop.member_state_dict(m), net.state_dict()
        assert list(ours) == list(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=f"member {m} {key}")


CASES = {
    # Members 0, 2 (width 8) and 1, 3, 4 (width 16) are not consecutive: groups are gathered and the output
    # permuted back to member order.
    "mlp_two_widths": (lambda: mlps([8, 16, 8, 16, 16]), (IN,)),
    "mlp_batchnorm": (lambda: mlps([8, 8, 16], norm="batch"), (IN,)),
    "mlp_batchnorm_post": (lambda: mlps([8, 16, 16], norm="batch", norm_position="post", activation="tanh"), (IN,)),
    "mlp_layernorm": (lambda: mlps([8, 16, 8], norm="layer", activation="gelu"), (IN,)),
    "resnet_batchnorm": (lambda: resnets(3), IMAGE),
}


# Not (mlp_batchnorm, adam): a Linear bias right before BatchNorm has gradient exactly 0 in exact arithmetic
# (BN subtracts the batch mean), so what autograd returns is rounding noise (~1e-9) whose sign differs between
# any two summation orders, and Adam scales noise to steps of size lr. mlp_batchnorm_post covers BN with Adam.
EXACT = [(case, opt) for case in CASES for opt in OPTIMIZERS if (case, opt) != ("mlp_batchnorm", "adam")]


@pytest.mark.parametrize(("case", "opt"), EXACT)
def test_fused_training_ends_with_the_weights_each_member_gets_alone(case, opt):
    build, shape = CASES[case]
    nets = build()
    pop = fuse(nets)
    nets = copy.deepcopy(nets)  # trained alone, apart from the population (which copied the weights at fuse)
    data = batches(4, len(nets), 16, shape)
    train_alone(nets, data, OPTIMIZERS[opt])
    train_fused(pop, data, OPTIMIZERS[opt])
    assert_same_weights(pop, nets)  # parameters and BatchNorm buffers (running stats, num_batches_tracked)
    moved = fuse(build()).member_state_dict(0)
    assert any(not torch.equal(moved[k], v) for k, v in pop.member_state_dict(0).items())  # training did something
    # Evaluation mode uses each member's running statistics.
    pop.eval()
    x = data[0][0]
    logits = pop(x)
    for m, net in enumerate(nets):
        torch.testing.assert_close(logits[m], net.eval()(x[m]), rtol=1e-5, atol=1e-5)


def test_member_losses_is_the_sum_of_member_mean_losses():
    logits, y = torch.randn(4, 7, CLASSES), torch.randint(0, CLASSES, (4, 7))
    expected = torch.stack([F.cross_entropy(logits[m], y[m]) for m in range(4)])
    torch.testing.assert_close(member_losses(logits, y), expected)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_member_state_dict_loads_strictly_into_a_solo_net_and_back(kind):
    nets = mlps([8, 16, 16], norm="batch") if kind == "mlp" else resnets(3)
    shape = (IN,) if kind == "mlp" else IMAGE
    pop = fuse(nets)
    train_fused(pop, batches(3, 3, 16, shape), OPTIMIZERS["sgd_momentum"])  # running stats move off their init
    pop.eval()
    x = torch.randn(3, 10, *shape)
    logits = pop(x)
    for m in range(3):
        solo = (mlps([nets[m].width], seeds=[99], norm="batch") if kind == "mlp" else resnets(1, seeds=[99]))[0]
        solo.load_state_dict(pop.member_state_dict(m), strict=True)
        torch.testing.assert_close(solo.eval()(x[m]), logits[m], rtol=1e-5, atol=1e-6)
    # member_nets: the original solo modules, now holding the trained weights.
    for m, net in enumerate(pop.member_nets()):
        assert net is nets[m]
        torch.testing.assert_close(net.eval()(x[m]), logits[m], rtol=1e-5, atol=1e-6)
    # load_member_state_dict: member 1 becomes a fresh net (parameters and BN buffers); the others are untouched.
    fresh = (mlps([16], seeds=[7], norm="batch") if kind == "mlp" else resnets(1, seeds=[7]))[0]
    fresh.train()(torch.randn(16, *shape))  # running stats differ from the defaults
    pop.load_member_state_dict(1, fresh.state_dict())
    after = pop(x)
    torch.testing.assert_close(after[1], fresh.eval()(x[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[[0, 2]], logits[[0, 2]])
    with pytest.raises(IndexError):
        pop.member_state_dict(3)
    with pytest.raises(KeyError, match="missing keys"):
        pop.load_member_state_dict(0, {k: v for k, v in fresh.state_dict().items() if "head" not in k})


def test_parameter_layout_is_member_first():
    """Every parameter and buffer is (G, *solo_shape); so `p.dim() - member_dims >= 2` picks out, per member, what
    `p.dim() >= 2` picks out of the solo net (the weight-decay / penalty rule)."""
    for nets in (mlps([8, 16, 8], norm="batch"), resnets(3)):
        pop = fuse(nets)
        solo_keys = sorted(k for k, v in nets[0].state_dict().items() if v.dim() >= 2)
        group = pop.groups[0] if isinstance(pop, PopulationMLP) else pop  # the one holding member 0
        fused = dict(group.named_parameters()) | dict(group.named_buffers())
        assert sorted(k for k, v in fused.items() if v.dim() - pop.member_dims >= 2) == solo_keys
        solo = nets[0].state_dict()
        for key, value in fused.items():
            assert value.shape[1:] == solo[key].shape
    pop = fuse(mlps([8, 16, 8]))
    for group, size in zip(pop.groups, (2, 1)):
        for name, t in [*group.named_parameters(), *group.named_buffers()]:
            assert t.shape[0] == size, name


def test_shared_batch_gives_the_logits_of_the_stacked_repeat():
    for nets, shape in ((mlps([8, 8, 16, 16, 16], norm="batch"), (IN,)), (resnets(3), IMAGE)):
        pop = fuse(nets).eval()
        x = torch.randn(6, *shape)
        torch.testing.assert_close(pop(x), pop(x.expand(pop.members, *x.shape)), rtol=1e-5, atol=1e-6)
    pop = PopulationMLP(mlps([8, 16]), input_shape=(3, 4))
    x = torch.randn(6, 3, 4)
    torch.testing.assert_close(pop(x), pop(x.expand(2, *x.shape)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="member batches"):
        pop(torch.randn(3, 6, 3, 4))  # 3 member batches for 2 members


def _capture(module):
    seen = {}
    module.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].detach(), out=out.detach()))
    return seen


def _tol(p, n):  # 5 standard errors of a Bernoulli(p) mean over n draws
    return 5 * (p * (1 - p) / n) ** 0.5


def test_inverted_dropout_masks_are_per_member():
    # Identical members (one seed) on one shared batch: any difference between them is their dropout masks.
    nets = mlps([32] * 4, seeds=[0] * 4, activation="tanh")
    for net in nets:
        DropoutRegularizer(keep_prob=0.5).attach(net)
    pop = fuse(nets)
    seen = _capture(pop.groups[0].hidden[1].dropout)
    x = torch.randn(200, IN)
    pop.train()(x)
    kept = seen["out"] != 0  # (4, 200, 32); tanh inputs are never exactly 0
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[2], kept[3])
    assert abs(kept.float().mean().item() - 0.5) < _tol(0.5, kept.numel())
    for m in range(4):
        assert abs(kept[m].float().mean().item() - 0.5) < _tol(0.5, kept[m].numel())
    torch.testing.assert_close(seen["out"][kept], seen["inp"][kept] / 0.5)  # inverted: kept units scaled by 1/p
    pop.eval()
    assert torch.equal(pop(x), pop(x))
    for m, net in enumerate(nets):
        torch.testing.assert_close(pop(x)[m], net.eval()(x), rtol=1e-5, atol=1e-6)


def test_dropconnect_masks_each_members_weights():
    nets = mlps([24, 24, 24])
    for net in nets:
        DropConnectRegularizer(keep_prob=0.5).attach(net)
    assert isinstance(nets[0].hidden[1].linear, DropConnectLinear)
    pop = fuse(nets)
    layer = pop.groups[0].hidden[1].linear  # (3, 24, 24)
    assert layer.keep_prob == 0.5
    # An identity batch reads the masked weights out: y[g, i, :] = b_g + (R_g * W_g)[:, i].
    eye = torch.eye(24).expand(3, 24, 24)
    masked = (layer.train()(eye) - layer.bias.detach()[:, None, :]).transpose(1, 2)  # (3, out, in)
    kept = masked != 0
    assert not torch.equal(kept[0], kept[1])
    assert abs(kept.float().mean().item() - 0.5) < _tol(0.5, kept.numel())
    torch.testing.assert_close(masked[kept], layer.weight.detach()[kept])  # unscaled, as DropConnectLinear
    x = torch.randn(50, IN)
    pop.eval()
    for m, net in enumerate(nets):
        torch.testing.assert_close(pop(x)[m], net.eval()(x), rtol=1e-5, atol=1e-6)  # mean network p * W


def test_spatial_dropout_drops_whole_maps_per_member():
    nets = resnets(3, seeds=[0, 0, 0])
    for net in nets:
        SpatialDropoutRegularizer(keep_prob=0.5, stages=[0]).attach(net)
    pop = fuse(nets)
    x = torch.randn(3, 5, *IMAGE)
    pop.eval()
    for m, net in enumerate(nets):
        torch.testing.assert_close(pop(x)[m], net.eval()(x[m]), rtol=1e-5, atol=1e-6)
    seen = _capture(pop.stage_dropout[0])
    pop.train()(torch.randn(64, *IMAGE))
    out = seen["out"]  # (64, 3 * 2, 8, 8): member m's channels are 2m, 2m + 1
    kept = out.flatten(2).ne(0).any(2)  # (64, 6): one draw per (sample, channel)
    assert torch.equal(out.flatten(2).ne(0).sum(2)[kept].clamp(max=1), kept[kept].long())  # all or nothing
    assert not torch.equal(kept[:, 0:2], kept[:, 2:4])
    assert abs(kept.float().mean().item() - 0.5) < _tol(0.5, kept.numel())


def test_channels_last_gives_the_same_logits_and_trains():
    nets = resnets(2)
    pop = fuse(nets)
    data = batches(2, 2, 8, IMAGE)
    reference = copy.deepcopy(pop)
    pop.to(memory_format=torch.channels_last)
    assert pop.stem.weight.view(-1, *pop.stem.weight.shape[2:]).is_contiguous(memory_format=torch.channels_last)
    train_fused(pop, data, OPTIMIZERS["sgd_momentum"])
    train_fused(reference, data, OPTIMIZERS["sgd_momentum"])
    for m in range(2):
        for key, value in reference.member_state_dict(m).items():
            torch.testing.assert_close(pop.member_state_dict(m)[key], value, rtol=1e-5, atol=1e-6)
    pop.member_nets()  # loads strictly into the solo nets


@pytest.mark.parametrize(
    ("nets", "reason"),
    [
        (lambda: mlps([8, 8], norm="group"), "model.norm=group cannot be fused"),
        (lambda: resnets(2, norm="layer"), "model.norm=layer cannot be fused"),
        # Group norm by the models' rule, gcd(C, norm_groups): at width 4 every layer is instance norm, still "group".
        (lambda: resnets(2, width=4, norm="group"), "model.norm=group cannot be fused"),
        (lambda: resnets(1, norm="group") + resnets(1, norm="group", norm_groups=1), "model.norm_groups"),
        (lambda: resnets(1) + resnets(1, width=4), "model.width"),
        (lambda: mlps([8]) + mlps([8], activation="tanh"), "model.activation"),
        (lambda: mlps([8, 8]) + resnets(1), "all MLPs or all ResNet18s"),
        (lambda: [], "no members"),
    ],
)
def test_unfusable_members_give_a_reason(nets, reason):
    nets = nets()
    assert reason in fusable(nets)
    with pytest.raises(ValueError, match=reason):
        fuse(nets)


def test_members_whose_slots_differ_cannot_be_fused():
    a, b = mlps([8, 8])
    assert fusable([a, b]) is None
    DropoutRegularizer(keep_prob=0.5).attach(a)
    reason = fusable([a, b])
    assert "hidden[0].dropout" in reason and "InvertedDropout(keep_prob=0.5)" in reason
    DropoutRegularizer(keep_prob=0.8).attach(b)
    assert "keep_prob=0.8" in fusable([a, b])
    c, d = mlps([8, 8])
    DropConnectRegularizer(keep_prob=0.5, layers=[]).attach(c)
    assert "head" in fusable([c, d])
    for options, shown in (({"mask": "per_example"}, "mask=per_example"), ({"inference": "gaussian"}, "gaussian")):
        pair = mlps([8, 8])
        for net in pair:  # alike, but not what StackedLinear computes: one mask per member and step, mean network
            DropConnectRegularizer(keep_prob=0.5, **options).attach(net)
        assert shown in fusable(pair) and "one DropConnect mask per member and step" in fusable(pair)
    e = mlps([8])[0]
    e.hidden[0].dropout = torch.nn.AlphaDropout(0.5)  # not one of the dropout modules the population knows
    assert "cannot be fused" in fusable([e, copy.deepcopy(e)])
    with pytest.raises(ValueError, match="hidden\\[0\\].dropout"):
        PopulationMLP([a, b])
    r1, r2 = resnets(2)
    r1.head_dropout = InvertedDropout(0.5)
    with pytest.raises(ValueError, match="head_dropout"):
        PopulationResNet18([r1, r2])
    if hasattr(r2.stages[0][0], "drop_path"):  # stochastic depth drops a sample's branch: per sample, not member
        from torchvision.ops import StochasticDepth

        r3, r4 = resnets(2)
        for net in (r3, r4):
            net.stages[1][0].drop_path = StochasticDepth(0.2, "row")
        assert "stages[1][0].drop_path" in fusable([r3, r4])


def test_repr_names_members_and_widths():
    text = repr(fuse(mlps([8, 16, 8])))
    assert "members=3" in text and "8x2, 16x1" in text
    assert "members=2, width=2" in repr(fuse(resnets(2)))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("regularizer", [DropoutRegularizer, GaussianDropoutRegularizer])
def test_stage_dropout_draws_each_members_solo_mask_in_either_layout(regularizer, layout):
    """Elementwise masks are drawn in memory order: under channels_last (every GPU run) a member's slice was copied
    to the default layout, and the same seed drew another mask than its solo run's."""
    from reglab.data.loader import epoch_seed

    seeds, nets = [0, 1], []
    for s in seeds:
        torch.manual_seed(s)
        net = ResNet18((1, 8, 8), 10, width=2, norm="none")
        regularizer(keep_prob=0.5, stages=[0, 1], head=False).attach(net)
        nets.append(net.train().to(memory_format=layout))
    pop = fuse([copy.deepcopy(n) for n in nets]).train().to(memory_format=layout)
    pop.streams.seeds = seeds
    pop.streams.start(0, 0)
    x = torch.randn(2, 4, 1, 8, 8)
    with torch.no_grad():
        out = pop(x)
        for m, net in enumerate(nets):
            torch.manual_seed(epoch_seed(seeds[m], 0, 0))  # what Classifier.on_train_epoch_start does for the solo run
            torch.testing.assert_close(out[m], net(x[m].contiguous(memory_format=layout)), rtol=1e-5, atol=1e-6)
