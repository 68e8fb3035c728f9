"""Batch-level mixing of training examples and their labels, on the batch's own device (CPU or GPU), in the
training step only: torchvision.transforms.v2.MixUp and CutMix, which take an index-label batch and return soft
targets (B, K). The Classifier's loss takes them as class probabilities, F.cross_entropy(logits, q).

- MixUp (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization", arXiv 1710.09412):
  x~ = lam x_i + (1 - lam) x_j,  q = lam e_{y_i} + (1 - lam) e_{y_j},  lam ~ Beta(alpha, alpha), one lam per batch.
- CutMix (Yun et al. 2019, "CutMix", arXiv 1905.04899): a box B of x_j pasted into x_i, box side sqrt(1 - lam)
  times the image's, centred uniformly and clipped at the border; q = lam' e_{y_i} + (1 - lam') e_{y_j} with
  lam' = 1 - |B| / (H W), the area actually kept.

Pairs: torchvision pairs sample i with j = i - 1 (the batch rolled by one), which is a random pairing because the
training loader shuffles. Mixing happens after normalization, which is affine and so commutes with mixup's convex
combination. Flat features (MNIST-1D's (B, 40)) go through MixUp as a (B, 1, 1, F) view: the op is elementwise,
only its shape check wants 4 dims. CutMix needs images (B, C, H, W) and says so in one line otherwise.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from reglab.errors import ConfigError
from reglab.regularization.base import Regularizer


class _BatchMix(Regularizer):
    """`mix(x, y) -> (x~, q)`: the Classifier calls it on each training batch (x (B, ...), y (B,) labels)."""

    op: type = v2.MixUp

    def __init__(self, alpha: float = 1.0):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha={alpha!r} must be a number > 0 (lam ~ Beta(alpha, alpha))")  # build() names key
        self.alpha = float(alpha)
        self._op = None

    def attach(self, net: nn.Module) -> None:
        if getattr(net, "members", None) is not None:  # reglab/population: each member would need its own lam, pairs
            raise ConfigError(f"regularization.{self.name}: a population mixes no batch (its members train solo)")
        head = getattr(net, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"regularization.{self.name}: {type(net).__name__} has no Linear `head` to read the "
                              "number of classes from")
        self._op = self.op(alpha=self.alpha, num_classes=head.out_features)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._op(x, y)


class MixUpRegularizer(_BatchMix):
    """`mixup`: torchvision's MixUp on images, and on flat features through a (B, 1, 1, F) view."""

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 4:
            return self._op(x, y)
        mixed, q = self._op(x.reshape(len(x), 1, 1, -1), y)
        return mixed.reshape(x.shape), q


class CutMixRegularizer(_BatchMix):
    """`cutmix`: torchvision's CutMix; images only."""

    op = v2.CutMix

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4:
            raise ConfigError(f"regularization.{self.name}: CutMix pastes boxes between images (C, H, W); this data's "
                              f"samples have shape {tuple(x.shape[1:])} (use mixup)")
        return self._op(x, y)
