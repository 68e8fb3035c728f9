"""torchvision image datasets (MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100), read into memory as uint8 tensors.

Files live under `root` (default `data/` in the repo). With `download=true` torchvision fetches them when missing;
when they are missing and cannot be fetched (no internet), the error is one line that says where to put them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reglab.data.base import Arrays, InMemoryDataModule
from reglab.errors import DataError

# name: (torchvision class, classes, per-channel mean, std of [0, 1] pixels over the training set)
DATASETS = {
    "mnist": ("MNIST", 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", 10, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _as_nchw(data) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(data))
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()  # (N,H,W)|(N,H,W,C)->NCHW


class VisionDataModule(InMemoryDataModule):
    def __init__(self, dataset: str, root: str = "data", download: bool = True, **kwargs):
        super().__init__(**kwargs)
        if dataset not in DATASETS:
            raise DataError(f"data.dataset={dataset!r} is not one of {', '.join(DATASETS)}")
        self.name, self.root, self.download = dataset, Path(root), download

    def _open(self, train: bool):
        import torchvision.datasets as tvd

        cls = getattr(tvd, DATASETS[self.name][0])
        try:
            return cls(str(self.root), train=train, download=False)
        except (RuntimeError, FileNotFoundError):
            pass  # not on disk (or failed its integrity check): download if allowed
        except Exception as e:  # unpickling or parsing a damaged file
            raise DataError(
                f"{self.name}: the files under {self.root} are corrupted ({type(e).__name__}: {e}); delete "
                f"{self.root / cls.__name__} or the cifar-* folder and run again to re-download"
            ) from None
        if not self.download:
            raise DataError(
                f"{self.name}: dataset files missing or corrupted under {self.root}/ and data.download=false; "
                f"copy the torchvision {cls.__name__} files there or set data.download=true"
            )
        try:
            return cls(str(self.root), train=train, download=True)
        except Exception as e:
            raise DataError(
                f"{self.name}: dataset files missing or corrupted under {self.root}/ and the download failed "
                f"({type(e).__name__}); on a machine with internet run `python -c \"import torchvision; "
                f"torchvision.datasets.{cls.__name__}('{self.root}', download=True)\"` and copy {self.root}/ here"
            ) from None

    def load(self) -> Arrays:
        _, classes, mean, std = DATASETS[self.name]
        train, test = self._open(True), self._open(False)
        return Arrays(
            _as_nchw(train.data), torch.as_tensor(np.asarray(train.targets), dtype=torch.long),
            _as_nchw(test.data), torch.as_tensor(np.asarray(test.targets), dtype=torch.long),
            classes, 255.0, mean, std,
        )
