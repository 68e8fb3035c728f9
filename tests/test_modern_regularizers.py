"""The modern recipes' regularizers against their papers' formulas: label smoothing's loss, mixup's convex pairs with
lam ~ Beta(alpha, alpha), CutMix's box area = 1 - lam', stochastic depth's survival rates (Huang et al.'s linear
rule) and identity evaluation, EMA = the hand recursion, SWA = the equal average of epoch-end weights, both
evaluated in place of the weights and kept across a resume; what a population refuses."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from reglab.classifier import Classifier
from reglab.errors import ConfigError
from reglab.models import MLP, ResNet18
from reglab.population import fuse
from reglab.population.sweeper import why_not
from reglab.regularization.averaging import EMA, SWA
from reglab.regularization.mixing import CutMixRegularizer, MixUpRegularizer
from reglab.regularization.smoothing import LabelSmoothing
from reglab.regularization.stochastic_depth import StochasticDepthRegularizer, survival_rates

CLASSES = 5
ADAM = {"name": "adam", "lr": 0.05}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small gain nothing from threads on a shared CPU
    yield
    torch.set_num_threads(before)


def mlp(seed=0, **kw) -> MLP:
    torch.manual_seed(seed)
    return MLP((6,), CLASSES, width=8, depth=1, **kw)


# --- label smoothing (Szegedy et al. 2016) -------------------------------------------------------------------------
def test_label_smoothing_loss_is_the_hand_formula_solo_and_per_population_member():
    eps = 0.2
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 6, generator=g), torch.randint(0, CLASSES, (7,), generator=g)
    module = Classifier(mlp(), ADAM, {"label_smoothing": LabelSmoothing(eps)})

    def hand(logits, y):  # (1 - eps) CE(y) + eps mean_k(-log p_k), mean over the batch
        logp = logits.log_softmax(-1)
        return ((1 - eps) * -logp.gather(-1, y[:, None])[:, 0] + eps * -logp.mean(-1)).mean()

    loss, logits = module._step("train", (x, y))
    assert loss.item() == pytest.approx(hand(logits, y).item(), rel=1e-6)
    val_loss, _ = module._step("val", (x, y))  # evaluation losses stay plain cross-entropy
    assert val_loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)

    nets = [mlp(seed) for seed in (1, 2)]
    population = Classifier(fuse(copy.deepcopy(nets), (6,)), ADAM, {"label_smoothing": LabelSmoothing(eps)})
    losses, _ = population._step("train", (x, y))  # (M,) one loss per member, y shared
    assert losses.tolist() == pytest.approx([hand(net(x), y).item() for net in nets], rel=1e-5)


# --- mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) --------------------------------------------------------
def test_mixup_is_a_convex_pair_with_beta_lambda_on_flat_and_image_batches():
    alpha = 0.4
    mixup = MixUpRegularizer(alpha)
    mixup.attach(mlp())
    y = torch.arange(4)  # distinct labels: q[i, y_i] = lam
    torch.manual_seed(0)
    lams = []
    for shape in [(4, 6)] * 300 + [(4, 2, 3, 3)] * 300:
        x = torch.randn(shape)
        mixed, q = mixup.mix(x, y)
        lam = q[0, 0].item()
        assert q.shape == (4, CLASSES) and torch.allclose(q.sum(1), torch.ones(4))
        assert torch.allclose(q[torch.arange(4), y], torch.full((4,), lam))  # one lam per batch
        assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)  # partner j = i - 1
        lams.append(lam)
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 0.01


def test_cutmix_box_area_is_one_minus_lambda_and_flat_data_is_refused():
    cutmix = CutMixRegularizer(1.0)
    cutmix.name = "cutmix"
    cutmix.attach(mlp())
    x = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 8, 8).contiguous()  # image i is constant i + 1
    y = torch.arange(4)
    torch.manual_seed(0)
    kept = []
    for _ in range(200):
        mixed, q = cutmix.mix(x, y)
        pasted = mixed[1, 0] == 1.0  # image 1's pixels that came from image 0, its partner
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):  # a rectangle: its bounding box is full
            assert pasted.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert torch.equal(mixed[:, 1], mixed[:, 0])  # one box for every channel
        assert q[1, 0].item() == pytest.approx(pasted.float().mean().item())  # 1 - lam' = box area / image area
        kept.append(q[1, 1].item())
    # lam ~ U(0, 1) for alpha = 1; clipping the box at the border only raises the kept area lam'.
    assert 0.5 < sum(kept) / len(kept) < 0.8
    with pytest.raises(ConfigError, match=r"^regularization\.cutmix: CutMix .* shape \(6,\)"):
        cutmix.mix(torch.randn(4, 6), y)


def test_mixed_targets_train_through_soft_cross_entropy_and_count_the_dominant_label():
    module = Classifier(mlp(), ADAM, {"mixup": MixUpRegularizer(1.0)})
    q = torch.tensor([[0.7, 0.3, 0, 0, 0], [0.4, 0.6, 0, 0, 0], [0, 0, 0.5, 0.5, 0]])
    x = torch.randn(3, 6)
    module.mixers[0].mix = lambda x, y: (x, q)
    loss, logits = module._step("train", (x, torch.zeros(3, dtype=torch.long)))
    assert loss.item() == pytest.approx(-(q * logits.log_softmax(-1)).sum(1).mean().item(), rel=1e-6)
    assert module._sums["train/correct"].item() == (logits.argmax(-1) == q.argmax(-1)).sum().item()
    assert module._sums["train/n"].item() == 3
    with pytest.raises(ConfigError, match=r"^regularization: mixup and cutmix both mix the training batch"):
        Classifier(mlp(), ADAM, {"mixup": MixUpRegularizer(), "cutmix": CutMixRegularizer()})


# --- stochastic depth (Huang et al. 2016) --------------------------------------------------------------------------
def test_stochastic_depth_follows_the_linear_rule_drops_rows_and_is_identity_in_eval():
    assert survival_rates(0.5, 4) == [0.875, 0.75, 0.625, 0.5]  # p_l = 1 - l/L (1 - p_L), Huang et al. eq. 4
    torch.manual_seed(0)
    net = ResNet18((1, 8, 8), CLASSES, width=2)
    plain = copy.deepcopy(net)
    reg = StochasticDepthRegularizer(keep_prob=0.6)
    reg.attach(net)
    blocks = [b for stage in net.stages for b in stage]
    assert [b.drop_path.p for b in blocks] == pytest.approx([1 - p for p in survival_rates(0.6, 8)])
    assert all(b.drop_path.mode == "row" for b in blocks)

    last = blocks[-1].drop_path.train()
    out = last(torch.ones(20000, 2, 3, 3))
    rows = out.flatten(1)
    assert torch.all(rows == rows[:, :1])  # a whole sample's branch is kept or dropped
    kept = rows[:, 0] != 0
    torch.testing.assert_close(rows[kept, 0], torch.full((int(kept.sum()),), 1 / 0.6))  # kept: scaled by 1/p_L
    assert kept.float().mean().item() == pytest.approx(0.6, abs=4 * (0.6 * 0.4 / 20000) ** 0.5)

    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(net.eval()(x), plain.eval()(x))  # evaluation: the network without stochastic depth
    net.train()
    assert not torch.equal(net(x), net(x))
    with pytest.raises(ConfigError, match=r"stochastic depth drops residual blocks; MLP has none"):
        StochasticDepthRegularizer().attach(mlp())


# --- EMA and SWA: evaluated in place of the weights, kept across a resume ---------------------------------------
def data(n=40, batch=10):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch), x, y


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


class Trajectory(L.Callback):
    """The raw weights after every optimizer step (the Classifier's own hook, which updates the average, runs
    after the callbacks')."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append([p.detach().clone() for p in module.net.parameters()])


def test_ema_after_k_steps_is_the_hand_recursion_and_is_what_test_evaluates():
    d = 0.8
    loader, x, y = data()
    module = Classifier(mlp(), ADAM, {"ema": EMA(decay=d)})
    seen = Trajectory()
    t = trainer(max_epochs=2, callbacks=[seen])
    t.fit(module, loader)
    ema = seen.steps[0]  # e_1 = theta_1, e_t = d e_{t-1} + (1 - d) theta_t
    for theta in seen.steps[1:]:
        ema = [d * e + (1 - d) * w for e, w in zip(ema, theta)]
    assert len(seen.steps) == 8 == int(module.averaged.n_averaged)
    for e, a in zip(ema, module.averaged.module.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema[0], seen.steps[-1][0])  # the average is not the last weights
    t.test(module, loader, verbose=False)
    assert t.callback_metrics["test/loss"].item() == pytest.approx(F.cross_entropy(module.averaged(x), y).item(), rel=1e-5)


def test_swa_is_the_equal_average_of_epoch_end_weights_from_its_start():
    loader, _, _ = data()
    module = Classifier(mlp(), ADAM, {"swa": SWA(start=0.5)})
    seen = Trajectory()
    trainer(max_epochs=4, callbacks=[seen]).fit(module, loader)  # 4 steps per epoch; averaged after epochs 2, 3
    ends = [seen.steps[i] for i in (11, 15)]
    assert int(module.averaged.n_averaged) == 2
    for k, a in enumerate(module.averaged.module.parameters()):
        torch.testing.assert_close(a, (ends[0][k] + ends[1][k]) / 2)


class StopAfter(L.Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


@pytest.mark.parametrize("name", ["ema", "swa"])
def test_a_resumed_run_keeps_the_average_of_an_uninterrupted_one(tmp_path, name):
    loader, _, _ = data()
    make = {"ema": lambda: EMA(decay=0.8), "swa": lambda: SWA(start=0.25)}[name]

    def module():  # with batch norm: SWA recomputes the average's statistics (update_bn)
        return Classifier(mlp(norm="batch"), ADAM, {name: make()})

    whole = module()
    trainer(max_epochs=4).fit(whole, loader, val_dataloaders=loader)
    first = module()
    t = trainer(max_epochs=4, callbacks=[StopAfter(epochs=2)])  # the same run, interrupted after epoch 2
    t.fit(first, loader, val_dataloaders=loader)
    t.save_checkpoint(tmp_path / "last.ckpt")
    resumed = module()
    trainer(max_epochs=4).fit(resumed, loader, val_dataloaders=loader, ckpt_path=tmp_path / "last.ckpt",
                              weights_only=True)
    assert int(resumed.averaged.n_averaged) == int(whole.averaged.n_averaged) > 1
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def test_populations_refuse_what_acts_on_the_step():
    names = ["mixup", "cutmix", "stochastic_depth", "ema", "swa"]
    cfg = compose([f"regularization=[label_smoothing,{','.join(names)}]", "model=resnet18",
                   "callbacks.early_stopping=null"])
    reason = why_not(cfg)  # one line naming each with its reason; each alone runs as a solo job
    assert "\n" not in reason and all(f"regularization.{n} " in reason for n in names)
    assert "label_smoothing" not in reason  # fused: each member's own smoothed loss (test_population_penalties.py)
    with pytest.raises(ConfigError, match=r"^regularization\.mixup: a population mixes no batch"):
        Classifier(fuse([mlp(1), mlp(2)], (6,)), ADAM, {"mixup": MixUpRegularizer()})
