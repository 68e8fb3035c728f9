"""Averages of the weights along the training trajectory, evaluated in place of the raw weights (validation, test,
the final metrics): torch.optim.swa_utils.AveragedModel, held by the Classifier as its submodule `averaged`, so
its weights, buffers and n_averaged are in the module's state_dict and every checkpoint (last.ckpt, the best one)
carries them; resuming continues the same average (tested against an uninterrupted run).

- EMA (the exponential form of Polyak & Juditsky 1992's uniform average of the iterates, which SWA is; as in
  timm's ModelEma and Lightning's EMAWeightAveraging): after every optimizer step t, e_t = d e_{t-1} + (1 - d)
  theta_t, e_1 = theta_1 (torch's get_ema_multi_avg_fn, one fused lerp per dtype). Buffers (batch-norm running
  statistics) are averaged the same way (use_buffers=True). 1 / (1 - d) steps is the average's memory: theta_1
  still weighs d^(t-1) after t steps, so pick d with 1 / (1 - d) well under the run's total steps.
- SWA (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization", arXiv
  1803.05407, Alg. 1 with cycle length c = 1 epoch): from epoch floor(start * max_epochs) on, after each epoch's
  last step, w_swa <- (n w_swa + theta) / (n + 1) (AveragedModel's default equal average). Batch-norm statistics of
  the averaged weights are recomputed with torch.optim.swa_utils.update_bn over the training split (no
  augmentation) before each evaluation that follows a new average. Izmailov et al. use a constant or cyclic learning
  rate in the averaging phase: keep optim.scheduler=none (SWALR is not applied).

Why not Lightning's WeightAveraging / StochasticWeightAveraging callbacks: WeightAveraging copies the whole
LightningModule and swaps the average into the live weights around each validation, and its checkpoint puts the
average under `state_dict` and the raw weights under `current_model_state`, so last.ckpt's state_dict no longer
holds the weights being trained (reglab's resume check and early stopping's `continue` read it as such). Held as a
submodule, both sets of weights keep their own keys and nothing is swapped.
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from reglab.regularization.base import Regularizer


class WeightAveraging(Regularizer):
    """What the Classifier asks of an average: `average(net)` (after every regularizer has attached its modules),
    `due(epoch, max_epochs, last_batch)` after each training batch, and whether batch norm needs `recompute_bn`."""

    recompute_bn = False

    def average(self, net: nn.Module) -> AveragedModel:
        model = self.averaged_model(net)
        for p in model.parameters():  # the average is never trained: no gradients (DDP would look for them)
            p.requires_grad_(False)
        return model

    def averaged_model(self, net: nn.Module) -> AveragedModel:
        raise NotImplementedError

    def due(self, epoch: int, max_epochs: int, last_batch: bool) -> bool:
        raise NotImplementedError


class EMA(WeightAveraging):
    """`ema`: e_t = d e_{t-1} + (1 - d) theta_t after every step; buffers too."""

    def __init__(self, decay: float = 0.95):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r} must be a number in [0, 1)")  # build() names the key
        self.decay = float(decay)

    def averaged_model(self, net: nn.Module) -> AveragedModel:
        return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    def due(self, epoch: int, max_epochs: int, last_batch: bool) -> bool:
        return True


class SWA(WeightAveraging):
    """`swa`: the equal average of the weights at the end of each epoch from floor(start * max_epochs) on."""

    recompute_bn = True

    def __init__(self, start: float = 0.75):
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
            raise ValueError(f"start={start!r} must be a fraction of trainer.max_epochs in [0, 1)")
        self.start = float(start)

    def averaged_model(self, net: nn.Module) -> AveragedModel:
        return AveragedModel(net, use_buffers=False)

    def first_epoch(self, max_epochs: int) -> int:
        return math.floor(self.start * max_epochs)

    def due(self, epoch: int, max_epochs: int, last_batch: bool) -> bool:
        return last_batch and epoch >= self.first_epoch(max_epochs)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

