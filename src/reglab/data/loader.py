"""Batches sliced from tensors held in memory (or on the GPU): no per-sample Python, no worker processes.

For datasets that fit in memory (digits, MNIST-1D, MNIST, CIFAR) this is what makes small models fast: a
DataLoader over a TensorDataset collates every sample in Python. Under DDP each rank takes every
world_size-th index of the same seeded permutation, so ranks see disjoint shards of equal length (the last
n % world_size of a training epoch's permutation are left out: every step syncs gradients). An evaluation split
(`trim=False`) is split whole, the first n % world_size ranks one example more, every rank the same number of
batches (a rank one example short ends with an empty one): its metrics are sums over ranks (Classifier._log_epoch),
so every example counts once, and every rank takes part in each batch's collectives (DDP syncs buffers in forward).
"""

from __future__ import annotations

import math

import numpy as np
import torch


STEP, AUGMENTATION = 0, 1  # epoch_seed's streams: the training step's draws (dropout, ...) and the augmentations


def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = STEP) -> int:
    """The seed of one epoch's draws of one `stream` on one process: a function of (run seed, epoch, DDP rank) alone,
    so a resumed run draws what the uninterrupted run would, and ranks draw independently of each other (with the
    run seed alone, rank r's i-th image of a step got the same crop and flip as every other rank's). The streams get
    different seeds: two generators of one kind seeded alike would draw the same numbers (a flip and a mask)."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


class TensorLoader:
    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        trim: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.trim = rank, world_size, trim
        self.epoch = 0

    # Lightning calls `dataloader.sampler.set_epoch(epoch)` at the start of each epoch (fabric's
    # _set_sampler_epoch); exposing it keeps the shuffle order a function of the epoch, also after a resume.
    batch_sampler = None  # read by Lightning's shuffle check alongside `sampler`

    @property
    def sampler(self) -> "TensorLoader":
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            # A fresh, reproducible permutation per epoch: seed and epoch fix it, so a resumed run sees the same
            # order the uninterrupted run would have.
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            idx = (idx[: n - n % self.world_size] if self.trim else idx)[self.rank :: self.world_size]
        return idx.to(self.y.device)

    def __len__(self) -> int:
        n, world = len(self.y), self.world_size
        if world > 1:
            n = n // world if self.trim else math.ceil(n / world)  # the largest shard: every rank's batch count
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        for b in range(len(self)):
            i = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x[i], self.y[i]
