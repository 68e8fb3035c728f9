"""The LightningModule of a packed sweep: K MLPs (reglab/packed.py) in one training step, the Classifier's metrics
for each, logged into each model's own MLflow run.

Per model and epoch it records what `Classifier` records for that model trained alone: `{stage}/loss` (mean
cross-entropy), `{stage}/acc`, `{stage}/err` with step = epoch, `params/*` (weight statistics) after the training
epoch, the final test at step = max_epochs. Sums are (K,) tensors kept on the device; one reduction per epoch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from reglab.classifier import Classifier
from reglab.errors import DivergenceError
from reglab.packed import Pack, packed_loss


class PackedClassifier(Classifier):
    """Classifier over a Pack: the training, validation and test steps, hooks and optimizer are Classifier's; only
    the loss (one per model) and the per-model logging differ."""

    def __init__(self, pack: Pack, optim: Mapping[str, Any], loggers: list | None = None):
        # NaN check at epoch end (not per step) so the error can name the widths that diverged.
        super().__init__(pack, optim, check_finite="epoch")
        self.child_loggers = list(loggers or [None] * len(pack.nets))
        self.final: list[dict[str, float]] = [{} for _ in pack.nets]

    def _step(self, stage: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.net(x)  # (B, K, C)
        losses = packed_loss(logits, y)  # (K,)
        n = torch.full_like(losses, float(len(y)))
        correct = (logits.argmax(-1) == y[:, None]).sum(0).float()
        self._accumulate(stage, {"loss_sum": losses.detach() * n, "correct": correct, "n": n})
        return losses.sum(), logits  # d(sum)/d(theta_k) = dL_k/d(theta_k): each model keeps its own gradient

    def _log_epoch(self, stage: str) -> None:
        if f"{stage}/n" not in self._sums:
            return
        n, loss_sum, correct = (self._sums.pop(f"{stage}/{k}").float().cpu() for k in ("n", "loss_sum", "correct"))
        loss, acc = (loss_sum / n).tolist(), (correct / n).tolist()
        stats = self._weight_stats() if stage == "train" else [{}] * len(loss)
        if stage == "train" and not all(math.isfinite(v) for v in loss):
            bad = [self.net.nets[k].width for k, v in enumerate(loss) if not math.isfinite(v)]
            raise DivergenceError(f"train/loss is not finite for model.width in {bad} in epoch {self.current_epoch}")
        for k, logger in enumerate(self.child_loggers):
            metrics = {f"{stage}/loss": loss[k], f"{stage}/acc": acc[k], f"{stage}/err": 1 - acc[k], **stats[k]}
            self.final[k].update(metrics)
            if logger is not None:
                logger.log_metrics(metrics, step=self.current_epoch)

    def _weight_stats(self) -> list[dict[str, float]]:
        from reglab.regularization.penalties import weight_stats

        return [{k: float(v) for k, v in weight_stats(net).items()} for net in self.net.unpack()]

    def on_train_start(self) -> None:
        for net, logger in zip(self.net.nets, self.child_loggers):
            if logger is not None:
                logger.log_metrics({"model/params": float(net.num_params)}, step=0)

    def on_fit_end(self) -> None:
        self.net.unpack()
