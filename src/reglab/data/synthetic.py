"""Random images of a given shape (CIFAR-10-shaped by default) for benchmarks and GPU checks that must run without
downloads: uint8 pixels, labels uniform over the classes. Nothing can be learned from them; they time the path."""

from __future__ import annotations

import torch

from reglab.data.base import Arrays, InMemoryDataModule


class SyntheticDataModule(InMemoryDataModule):
    name = "synthetic"

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, train_samples: int = 50_000,
                 test_samples: int = 10_000, data_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.shape, self.classes = tuple(shape), num_classes
        self.train_samples, self.test_samples, self.data_seed = train_samples, test_samples, data_seed

    def load(self) -> Arrays:
        g = torch.Generator().manual_seed(self.data_seed)
        n = self.train_samples + self.test_samples
        x = torch.randint(0, 256, (n, *self.shape), generator=g, dtype=torch.uint8)
        y = torch.randint(0, self.classes, (n,), generator=g)
        c = self.shape[0]
        tr, te = slice(0, self.train_samples), slice(self.train_samples, n)
        return Arrays(x[tr], y[tr], x[te], y[te], self.classes, 255.0, (0.5,) * c, (0.29,) * c)
