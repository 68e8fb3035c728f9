"""scikit-learn's handwritten digits (`load_digits`): 1,797 8x8 grey images, pixel values 0..16, 10 classes.
Ships inside scikit-learn, so it is the offline default. There is no official test split: a fixed 20% (split
seed 0, independent of the run seed) is held out, so every run and seed is scored on the same test set."""

from __future__ import annotations

import torch

from reglab.data.base import Arrays, InMemoryDataModule

TEST_FRACTION = 0.2


class DigitsDataModule(InMemoryDataModule):
    name = "digits"

    def load(self) -> Arrays:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        n_test = round(TEST_FRACTION * len(y))
        te, tr = perm[:n_test], perm[n_test:]
        # Mean/std of the scaled pixels over the fixed training part (0.305, 0.378 after /16).
        xs = x[tr] / 16.0
        return Arrays(x[tr], y[tr], x[te], y[te], 10, 16.0, (xs.mean().item(),), (xs.std().item(),))
