"""Population data: each member of a fused population gets exactly its solo run's batches (split, order per epoch,
noisy labels, augmentation draws), checked against an independently built twin of that member; the test split is
shared and unstacked; members that cannot share one step are refused, naming what differs."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import compose

from reglab.population.data import PopulationDataModule
from reglab.train import build_data


def member(seed: int, *overrides: str, noise: float = 0.2):
    """A member's data module by the solo run's own path (Hydra config -> build_data), set up."""
    cfg = compose(["data=digits", f"seed={seed}", f"data.label_noise={noise}", "data.batch_size=64", *overrides])
    dm = build_data(cfg)
    dm.setup()
    return dm


def training(dm, on: bool = True):
    """What the batch hooks read of a Trainer: whether it is training (set after setup, which reads more)."""
    dm.trainer = SimpleNamespace(training=on, world_size=1, current_epoch=0, global_rank=0)
    return dm


# (seed, label noise) per member: two seeds (different split, subset, order, noise) and a label-noise sweep at one
# seed (same examples and order, different labels).
MEMBERS = [(0, 0.2), (1, 0.2), (0, 0.0)]


def test_every_training_batch_is_the_members_solo_batch_for_two_epochs():
    pop = PopulationDataModule([member(s, noise=p) for s, p in MEMBERS])
    pop.setup()
    assert pop.normalized  # float data, no augmentation: normalized once, bit-identical to per batch (below)
    twins = [member(s, noise=p) for s, p in MEMBERS]
    loader, solos = pop.train_dataloader(), [t.train_dataloader() for t in twins]
    assert len(loader) == len(solos[0]) == 21  # 1,294 training examples in batches of 64: 20 full + 14
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # the call Lightning makes at each epoch start
        for s in solos:
            s.set_epoch(epoch)
        batches, solo_batches = list(loader), [list(s) for s in solos]
        for b, (x, y) in enumerate(batches):
            assert x.shape == (3, y.shape[1], 1, 8, 8) and x.dtype == torch.float32 and y.shape[0] == 3
            x = pop.normalize(x)  # what the model sees (float data: normalized once in setup, so passed through)
            for m in range(3):
                sx, sy = solo_batches[m][b]
                assert torch.equal(x[m], twins[m].normalize(sx)) and torch.equal(y[m], sy), (epoch, b, m)
        assert batches[-1][1].shape == (3, 14)  # the short last batch, as in the solo runs
        orders.append(torch.cat([y for _, y in batches], dim=1))
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    # Not all member 0's data: the seeds draw other splits and orders, the noise level other labels.
    first = orders[0]
    assert (first[0] != first[1]).float().mean() > 0.5
    ys = [pop.members[m].train_y for m in range(3)]
    noisy = (ys[0] != ys[2]).float().mean().item()  # same seed, noise 0.2 vs 0.0: same examples, ~20% relabelled
    assert torch.equal(pop.train_x[0], pop.train_x[2]) and noisy == pytest.approx(pop.label_noise_realized[0])
    assert 0.15 < noisy < 0.25 and pop.label_noise_realized[2] == 0.0


def test_validation_is_stacked_per_member_and_test_is_shared_unstacked():
    overrides = ("+data.test_every_epoch=true", "+data.eval_batch_size=100")
    pop = PopulationDataModule([member(s, *overrides, noise=p) for s, p in MEMBERS])
    pop.setup()
    twins = [member(s, *overrides, noise=p) for s, p in MEMBERS]
    val, test = pop.val_dataloader()
    assert pop.eval_stages == ("val", "test")
    solo_val = [t.val_dataloader()[0] for t in twins]
    batches = list(val)
    assert len(batches) == 2  # 144 validation examples in batches of 100
    # Batches as the model sees them (after the batch hook): the solo run's, normalized, bit for bit (float data is
    # normalized once in the population's setup, per batch in the solo run).
    for b, (x, y) in enumerate(batches):
        x = pop.on_after_batch_transfer((x, y), 0)[0]
        for m, solo in enumerate(solo_val):
            sx, sy = list(solo)[b]
            assert torch.equal(x[m], twins[m].normalize(sx)) and torch.equal(y[m], sy)
    assert not torch.equal(batches[0][1][0], batches[0][1][1])  # seeds 0 and 1 hold out different examples
    # The test split: one copy, batches (B, 1, 8, 8) as the solo run's, for the fused model to broadcast.
    assert all(m.test_x is pop.test_x for m in pop.members)
    for (x, y), (sx, sy) in zip(test, twins[0].test_dataloader(), strict=True):
        assert x.shape == (len(y), 1, 8, 8) and torch.equal(pop.normalize(x), twins[0].normalize(sx))
        assert torch.equal(y, sy)


def test_cpu_augmentation_draws_are_each_members_own():
    # Each member's Albumentations pipeline is seeded with its run seed and called once per batch on its slice,
    # as in its solo run: the draws are exactly the solo run's (exact equality, not only the same distribution).
    seeds = (0, 1)
    pop = PopulationDataModule([member(s, "augmentation=digits_safe") for s in seeds])
    pop.setup()
    training(pop)
    twins = [training(member(s, "augmentation=digits_safe")) for s in seeds]
    assert all(m.augment is not None and m.device_augment is None for m in pop.members)
    batches = list(pop.train_dataloader())[:3]
    same = torch.stack([batches[0][0][0]] * 2)  # one input for both members: only their draws differ
    for x, y in [*batches, (same, batches[0][1])]:
        ax, ay = pop.on_before_batch_transfer((x, y), 0)
        assert ax.shape == x.shape and torch.equal(ay, y) and not torch.equal(ax, x)
        for m, twin in enumerate(twins):
            assert torch.equal(ax[m], twin.on_before_batch_transfer((x[m], y[m]), 0)[0])
    assert not torch.equal(ax[0], ax[1])  # same input, different seeds: different draws
    training(pop, on=False)
    assert pop.on_before_batch_transfer((x, y), 0)[0] is x  # evaluation batches are not augmented


# cifar_standard's flip can turn one digit into another (reglab warns): harmless for a test of the draws.
@pytest.mark.filterwarnings("ignore:augmentation. HorizontalFlip on the digit dataset")
def test_device_augmentation_draws_are_each_members_own():
    over = ("augmentation=cifar_standard", "+augmentation.device=true")  # batched pad-crop-flip, on CPU here
    pop = PopulationDataModule([member(s, *over) for s in (0, 1)])
    pop.setup()
    training(pop)
    twins = [training(member(s, *over)) for s in (0, 1)]
    assert all(m.device_augment is not None and m.augment is None for m in pop.members)
    for x, y in list(pop.train_dataloader())[:3]:
        x = pop.on_before_batch_transfer((x, y), 0)[0]
        out, _ = pop.on_after_batch_transfer((x, y), 0)
        assert out.shape == x.shape and not torch.equal(out, pop.normalize(x))  # augmented
        for m, twin in enumerate(twins):
            assert torch.equal(out[m], twin.on_after_batch_transfer((x[m], y[m]), 0)[0])
    with pytest.raises(ValueError, match="stacked batch"):
        pop.normalize(x[0], augment=True)


@pytest.mark.parametrize("override, key", [("data.batch_size=32", "batch_size"), ("data.train_size=200", "train_size"),
                                           ("+data.test_every_epoch=true", "test_every_epoch"),
                                           ("data=mnist1d", "dataset")])
def test_members_that_cannot_share_a_step_are_refused(override, key):
    with pytest.raises(ValueError, match=f"differ in {key}:"):
        PopulationDataModule([member(0), member(1, override)])


def test_distributed_training_is_refused():
    pop = PopulationDataModule([member(0), member(1)])
    pop.trainer = SimpleNamespace(training=True, world_size=2, current_epoch=0, global_rank=0)
    with pytest.raises(ValueError, match="DDP"):
        pop.setup()


class Recorder(L.LightningModule):
    """A fused linear model over M members that records the batches Lightning hands it."""

    def __init__(self, members: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(members, 64, 10))
        self.train_batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.eval_shapes: set[tuple[int, tuple[int, ...]]] = set()

    def forward(self, x):  # x (M, B, 1, 8, 8) or shared (B, 1, 8, 8) -> logits (M, B, 10)
        x = x.flatten(-3)
        return torch.einsum("mbf,mfc->mbc", x, self.w) if x.dim() == 3 else torch.einsum("bf,mfc->mbc", x, self.w)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_batches.append((self.current_epoch, x.clone(), y.clone()))
        logits = self(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.eval_shapes.add((dataloader_idx, tuple(x.shape)))
        assert self(x).shape == (2, len(y) if y.dim() == 1 else y.shape[1], 10)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_sets_each_epoch_and_feeds_solo_batches():
    over = ("data.train_size=256", "+data.test_every_epoch=true")
    pop = PopulationDataModule([member(s, *over) for s in (0, 1)])
    model = Recorder(members=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=pop)
    twins = [member(s, *over) for s in (0, 1)]
    assert len(model.train_batches) == 2 * 4  # 256 examples in batches of 64, two epochs
    for step, (epoch, x, y) in enumerate(model.train_batches):
        for m, twin in enumerate(twins):
            solo = twin.train_dataloader()
            solo.set_epoch(epoch)
            sx, sy = list(solo)[step % 4]
            assert torch.equal(y[m], sy) and torch.equal(x[m], twin.normalize(sx))
    # Validation stacked per member (144 examples); the test split shared and unstacked (359).
    assert model.eval_shapes == {(0, (2, 144, 1, 8, 8)), (1, (359, 1, 8, 8))}
