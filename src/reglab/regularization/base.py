"""The regularizer protocol the Classifier composes.

A regularizer is a small object with no-op hooks by default; each technique overrides the ones it needs:
- `attach(net)`: once, before training: insert modules (dropout), swap layers (DropConnect), check it applies;
- `penalty(net)`: a scalar added to the loss each training step (L1, L2, elastic net), or None;
- `before_step(net, optimizer)`: after backward, before the optimizer step (decoupled weight decay);
- `after_step(net, optimizer)`: after the optimizer step (proximal L1, max-norm projection);
- `epoch_metrics()`: what it measured since the last call, {key: 0-dim tensor}, logged once per training epoch as
  `train/<name>/<key>` (max-norm's `clipped_frac`); accumulate on the device, the caller synchronizes once.
Its `name` is its config file's name, the key under `regularization`, and the suffix of `train/penalty/<name>`.
"""

from __future__ import annotations

import torch
from torch import nn


class Regularizer:
    name: str = ""

    def attach(self, net: nn.Module) -> None:
        pass

    def penalty(self, net: nn.Module) -> torch.Tensor | None:
        return None

    def before_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "name")
        return f"{type(self).__name__}({args})"
