"""The data of a population: M members of a sweep (seeds, label-noise levels, widths) trained in one step by a
fused model, each member seeing exactly the batches of its solo run.

A member is its solo run's own InMemoryDataModule (built by reglab.train.build_data, set up). Its validation split
and training subset depend on its seed, its labels on its label noise, so those splits are stacked once:
x (M, N, *input_shape) in stored dtype, y (M, N). A training batch gathers all members' examples at once,

    x[m, idx[m]] for every m            idx (M, B): member m's indices for this batch

where row m of idx comes from member m's own TensorLoader (its seed, the epoch): the order is the solo run's by
construction, also after a resume. The test split does not move with the seed, so it is kept once and batched
unstacked, x (B, *input_shape), y (B,): the fused model broadcasts it to every member.

Augmentation stays per member: member m's CPU pipeline (Albumentations, seeded with its run seed) and its device
transform see only x[m], one call per batch of the same size as in the solo run, so they draw the same random
numbers the solo run draws. One process holds all members: DDP is not supported.
"""

from __future__ import annotations

import lightning as L
import torch

from reglab.data.base import InMemoryDataModule, augmenting, eval_loaders, target_device
from reglab.data.loader import TensorLoader
from reglab.errors import ConfigError


class PopulationLoader:
    """Batches x (M, B, ...), y (M, B) from x (M, N, ...), y (M, N): member m's slice of batch b is what its
    own `loaders[m]` (over its N examples) yields as batch b."""

    # Lightning calls `dataloader.sampler.set_epoch(epoch)` at the start of every epoch, also after a resume
    # (fabric's _set_sampler_epoch reads `sampler` and `batch_sampler`), as for TensorLoader.
    batch_sampler = None

    def __init__(self, x: torch.Tensor, y: torch.Tensor, loaders: list[TensorLoader]):
        self.x, self.y, self.loaders = x, y, loaders
        self.batch_size = loaders[0].batch_size

    @property
    def sampler(self) -> "PopulationLoader":
        return self

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])  # members have equal sizes (checked), so equal lengths

    def __iter__(self):
        # (M, N): each member's order for this epoch, drawn once per epoch by its own loader (same formula, seed).
        idx = torch.stack([loader._indices() for loader in self.loaders]).to(self.y.device)
        M, N = idx.shape
        # Row m*N + i of the flattened (M*N, ...) split is member m's example i: one index_select per batch ran
        # ~4x faster on a CPU than the two-tensor gather x[arange(M)[:, None], idx] (35 members, batch 100).
        idx = idx + N * torch.arange(M, device=idx.device)[:, None]
        x, y = self.x.flatten(0, 1), self.y.flatten()
        for b in range(len(self)):
            i = idx[:, b * self.batch_size : (b + 1) * self.batch_size]
            yield x.index_select(0, i.flatten()).unflatten(0, i.shape), y.index_select(0, i.flatten()).view(i.shape)


def _check_fusable(members: list[InMemoryDataModule]) -> None:
    """ConfigError (a ValueError) naming the first property the members do not share."""
    first = members[0]
    shared = {
        "dataset": [type(m).__qualname__ for m in members],
        "input_shape": [m.input_shape for m in members],
        "num_classes": [m.num_classes for m in members],
        "batch_size": [m.batch_size for m in members],
        "eval_batch_size": [m.eval_batch_size for m in members],
        # Equal training sizes give every member the same number of steps per epoch (and a last batch of one size).
        "train_size": [len(m.train_y) for m in members],
        "val_size": [len(m.val_y) for m in members],
        "test_every_epoch": [m.test_every_epoch for m in members],
        "on_device": [m.on_device for m in members],
        # One normalization for the stacked batch: the members must share the dataset's scale, mean and std.
        "scale": [m.scale for m in members],
        "mean": [tuple(m.mean.flatten().tolist()) for m in members],
        "std": [tuple(m.std.flatten().tolist()) for m in members],
    }
    for key, values in shared.items():
        if len(set(values)) > 1:
            raise ConfigError(f"population members differ in {key}: {values}; members trained in one step "
                              "must share it")
    for i, m in enumerate(members[1:], 1):
        if not (torch.equal(m.test_x.cpu(), first.test_x.cpu()) and torch.equal(m.test_y.cpu(), first.test_y.cpu())):
            raise ConfigError(f"population members differ in test split: member {i} is not scored on member 0's "
                              "test set (a different data_seed or dataset size?)")


class PopulationDataModule(L.LightningDataModule):
    def __init__(self, members: list[InMemoryDataModule]):
        super().__init__()
        if not members:
            raise ConfigError("a population needs at least one member")
        for m in members:
            m.setup()  # loads and splits once; a no-op for members already set up
        _check_fusable(members)
        first = members[0]
        self.members = list(members)
        self._drawing: tuple | None = None  # (trainer, epoch, rank) whose members' augmentation draws are set
        self.num_classes = first.num_classes
        self.batch_size, self.eval_batch_size = first.batch_size, first.eval_batch_size
        self.test_every_epoch, self.on_device = first.test_every_epoch, first.on_device
        self.scale = first.scale
        self.eval_stages: tuple[str, ...] = ("val",)
        self.train_x: torch.Tensor | None = None  # (M, N, *input_shape), stacked in setup
        self.normalized = False  # float splits without augmentation are normalized once, in setup

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.members[0].input_shape

    @property
    def label_noise_realized(self) -> list[float]:
        return [m.label_noise_realized for m in self.members]

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError(f"a population trains in one process: DDP (world_size={self.trainer.world_size}) is "
                              "not supported; use trainer=gpu or trainer=cpu")
        if self.train_x is None:
            ms = self.members
            self.train_x, self.train_y = torch.stack([m.train_x for m in ms]), torch.stack([m.train_y for m in ms])
            self.val_x, self.val_y = torch.stack([m.val_x for m in ms]), torch.stack([m.val_y for m in ms])
            self.test_x, self.test_y = ms[0].test_x, ms[0].test_y  # one copy: the same for all (checked)
            self.mean, self.std = ms[0].mean, ms[0].std
        device = target_device(self)
        if device is not None and self.train_x.device != device:
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
                setattr(self, k, getattr(self, k).to(device))
        if not self.normalized and self.train_x.is_floating_point() and \
                not any(m.augment is not None or m.device_augment is not None for m in self.members):
            # Once here instead of in every batch: the same elementwise arithmetic, so the same values (~2% of make
            # run's population epoch, 2-core Xeon VM, 2026-12-02). Stored integers (images) stay stored: as floats
            # they would take 4x the memory.
            self.train_x, self.val_x, self.test_x = (self.normalize(x) for x in (self.train_x, self.val_x, self.test_x))
            self.normalized = True
        # Members keep working as data modules (their loaders give the order), on views of the stacked tensors:
        # the population holds one copy of every split, on one device.
        for i, m in enumerate(self.members):
            m.train_x, m.train_y, m.val_x, m.val_y = self.train_x[i], self.train_y[i], self.val_x[i], self.val_y[i]
            m.test_x, m.test_y, m.mean, m.std = self.test_x, self.test_y, self.mean, self.std

    def train_dataloader(self) -> PopulationLoader:
        # Members have no trainer, so their loaders are those of a single-process solo run.
        return PopulationLoader(self.train_x, self.train_y, [m.train_dataloader() for m in self.members])

    def val_dataloader(self) -> PopulationLoader | TensorLoader | list:
        members = [TensorLoader(m.val_x, m.val_y, self.eval_batch_size) for m in self.members]
        return eval_loaders(self, PopulationLoader(self.val_x, self.val_y, members) if self.val_y.shape[1] else None)

    def test_dataloader(self) -> TensorLoader:
        return TensorLoader(self.test_x, self.test_y, self.eval_batch_size)  # unstacked: x (B, ...), y (B,)

    def _training(self) -> bool:
        return self.trainer is not None and self.trainer.training

    def seed_augmentation(self, epoch: int, rank: int = 0) -> None:
        for m in self.members:  # each member's draws: those of its solo run's epoch
            m.seed_augmentation(epoch, rank)

    def _augmenting(self) -> bool:
        return augmenting(self)

    def _stacked(self, x: torch.Tensor) -> bool:
        return x.dim() == len(self.input_shape) + 2

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if any(m.augment is not None for m in self.members) and self._augmenting():
            # Member m's pipeline on its own (B, ...) slice: the call its solo run makes for this batch.
            x = torch.stack([m.augment(x[i]) if m.augment is not None else x[i] for i, m in enumerate(self.members)])
        return x, y

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """x (M, B, ...) stacked or (B, ...) shared, stored dtype -> normalized float32; augment applies each
        member's device transform to its slice (stacked batches only). Splits normalized in setup pass through."""
        if self.normalized:
            return x
        x = x.float() / self.scale
        if augment and any(m.device_augment is not None for m in self.members):
            if not self._stacked(x):
                raise ValueError(f"device augmentation needs a stacked batch (M, B, *{self.input_shape}), got "
                                 f"shape {tuple(x.shape)}")
            # On [0, 1] floats, as InMemoryDataModule.normalize, so padding is black.
            x = torch.stack([m.device_augment(x[i]) if m.device_augment is not None else x[i]
                             for i, m in enumerate(self.members)])
        # mean/std are (1, C, 1, 1) or (1, F) or (1, 1): they broadcast over (M, B, ...) as over (B, ...).
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        return self.normalize(x, augment=self._augmenting()), y
