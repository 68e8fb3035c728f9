"""The in-memory DataModule all datasets share: seeded validation split, training subset, label noise, and
batches sliced from tensors (`TensorLoader`).

Subclasses implement `load()` -> `Arrays`. Tensors keep their stored dtype (uint8 images stay uint8, 4x less
memory and transfer); `on_after_batch_transfer` turns a batch into normalized float32 on its device, after
training-split augmentation. With `on_device=auto` the tensors move to the GPU once, in `setup`, when the
trainer runs on CUDA: then no batch crosses PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch

from reglab.data.label_noise import corrupt_labels
from reglab.data.loader import TensorLoader
from reglab.errors import ConfigError


@dataclass
class Arrays:
    x_train: torch.Tensor  # (N, C, H, W) or (N, F); any dtype, scaled by `scale` to [0, 1]-ish floats
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    scale: float = 1.0  # x.float() / scale, then (x - mean) / std per channel
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


BatchTransform = Callable[[torch.Tensor], torch.Tensor]


def augmenting(dm) -> bool:
    """Whether the batch at hand is a training batch of data module `dm`. The first of an epoch sets that epoch's
    and rank's draws (`dm.seed_augmentation`), keyed by the Trainer too: a second fit of the same data module (the
    retrain after early stopping) starts its epoch 0 afresh."""
    t = dm.trainer
    if t is None or not t.training:
        return False
    key = (id(t), t.current_epoch, t.global_rank)
    if key != dm._drawing:
        dm._drawing = key
        dm.seed_augmentation(t.current_epoch, t.global_rank)
    return True


def target_device(dm) -> torch.device | None:
    """The CUDA device the data moves to once (`on_device=auto` and a trainer on a GPU), else None."""
    trainer = dm.trainer
    if dm.on_device == "never" or trainer is None:
        return None
    device = trainer.strategy.root_device
    return device if device.type == "cuda" else None


def eval_loaders(dm, val_loader):
    """The validation loop's loaders: the validation split's (None: no split) and, with `dm.test_every_epoch`, the
    test split's; `dm.eval_stages` names each loader's metrics for the Classifier."""
    loaders = [val_loader] if val_loader is not None else []
    dm.eval_stages = ("val",) * len(loaders) + (("test",) if dm.test_every_epoch else ())
    if dm.test_every_epoch:
        loaders.append(dm.test_dataloader())
    return loaders[0] if len(loaders) == 1 else loaders


class InMemoryDataModule(L.LightningDataModule):
    name = "base"

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        train_size: int | None = None,
        label_noise: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
        on_device: str = "auto",
        augment: BatchTransform | None = None,
        device_augment: BatchTransform | None = None,
        test_every_epoch: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= label_noise < 1.0:
            raise ConfigError(f"data.label_noise must be in [0, 1), got {label_noise}")
        if train_size is not None and train_size < 1:
            raise ConfigError(f"data.train_size must be >= 1 or null, got {train_size}")
        if on_device not in ("auto", "never"):
            raise ConfigError(f"data.on_device must be auto or never, got {on_device!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 1000)
        self.val_fraction, self.train_size, self.label_noise = val_fraction, train_size, label_noise
        self.num_workers, self.seed, self.on_device = num_workers, seed, on_device
        # augment: CPU batch transform in stored dtype (Albumentations); device_augment: on-device batched
        # transform of [0, 1] floats (the GPU fast path). Both touch the training split only.
        self.augment, self.device_augment = augment, device_augment
        self._drawing: tuple | None = None  # (trainer, epoch, rank) whose augmentation draws are set
        # Epoch-wise studies (double descent) need the test error after every epoch: the test split then joins the
        # validation loop as a second loader, and `eval_stages` names each loader's metrics for the Classifier.
        self.test_every_epoch = test_every_epoch
        self.eval_stages: tuple[str, ...] = ("val",)
        self.label_noise_realized = 0.0
        self._ready = False

    def load(self) -> Arrays:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        # Called once by train.run (to learn input shape and classes) and again by the Trainer, which is when the
        # device is known; loading and splitting happen once.
        if not self._ready:
            self._load_and_split()
        device = target_device(self)
        if device is not None and self.train_x.device != device:
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
                setattr(self, k, getattr(self, k).to(device))

    def _load_and_split(self) -> None:
        a = self.load()
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(a.y_train), generator=g)
        n_val = round(self.val_fraction * len(perm))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        # The noisy labels are drawn for the whole training part, then cut: a seed's smaller training sets are
        # prefixes of its larger ones with the same wrong labels (drawn for the subset, each label's replacement
        # depended on the subset's size: the sample-wise study compared other corruptions across sizes).
        noisy_y, chosen = corrupt_labels(a.y_train[train_idx], self.label_noise, a.num_classes, self.seed)
        if self.train_size is not None:
            if self.train_size > len(train_idx):
                raise ConfigError(
                    f"data.train_size={self.train_size} exceeds the {len(train_idx)} training examples of "
                    f"{self.name} left after the validation split"
                )
            train_idx, noisy_y, chosen = (t[: self.train_size] for t in (train_idx, noisy_y, chosen))
        self.num_classes = a.num_classes
        # Positions in the loaded training set: with the labels below, who this run's splits are (the digest of its
        # MLflow dataset inputs, reglab/runs/datasets.py).
        self.train_idx, self.val_idx = train_idx, val_idx
        self.train_x, self.val_x, self.test_x = a.x_train[train_idx], a.x_train[val_idx], a.x_test
        self.val_y, self.test_y = a.y_train[val_idx], a.y_test
        self.clean_train_y = a.y_train[train_idx]
        self.train_y = noisy_y
        self.label_noise_realized = chosen.float().mean().item() if len(chosen) else 0.0
        c = len(a.mean)
        view = (1, c, 1, 1) if a.x_train.dim() == 4 else (1, -1) if c > 1 else (1, 1)
        self.scale = a.scale
        self.mean = torch.tensor(a.mean).view(view)
        self.std = torch.tensor(a.std).view(view)
        self._ready = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> TensorLoader:
        rank, world = self._rank_world()
        return TensorLoader(self.train_x, self.train_y, self.batch_size, True, self.seed, False, rank, world)

    def _eval_loader(self, x: torch.Tensor, y: torch.Tensor) -> TensorLoader:
        rank, world = self._rank_world()
        return TensorLoader(x, y, self.eval_batch_size, rank=rank, world_size=world, trim=False)

    def val_dataloader(self) -> TensorLoader | list:
        return eval_loaders(self, self._eval_loader(self.val_x, self.val_y) if len(self.val_y) else None)

    def test_dataloader(self) -> TensorLoader:
        return self._eval_loader(self.test_x, self.test_y)

    def _training(self) -> bool:
        return self.trainer is not None and self.trainer.training

    def seed_augmentation(self, epoch: int, rank: int = 0) -> None:
        """Draw this epoch's augmentations on this rank from loader.epoch_seed(seed, epoch, rank)."""
        for aug in (self.augment, self.device_augment):
            start = getattr(aug, "start_epoch", None)  # a custom BatchTransform may have none: its own draws
            if start is not None:
                start(epoch, rank)

    def _augmenting(self) -> bool:
        return augmenting(self)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is not None and self._augmenting():
            x, y = batch
            batch = (self.augment(x), y)
        return batch

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = x.float() / self.scale
        if augment and self.device_augment is not None:
            x = self.device_augment(x)  # on [0, 1] floats, so padding is black as in Albumentations
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        return self.normalize(x, augment=self._augmenting()), y
