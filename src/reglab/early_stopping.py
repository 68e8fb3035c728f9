"""What happens after early stopping: `stopping.after_stop=none|retrain|continue`.

Lightning's EarlyStopping is the mechanism (the lecture's algorithm: stop after `patience` evaluations without a
better validation loss; theta* and i* are the best checkpoint and its step). Goodfellow et al., Deep Learning,
sec. 7.8, give the two ways to then use the validation data too, which the lecture lists:
- `retrain` (Algorithm 7.2): re-initialize (same seed, so the same theta_0) and train on train + validation for
  i* optimizer steps, the best step count found with validation held out.
- `continue` (Algorithm 7.3): keep theta* and train on train + validation until the loss on the validation part
  falls below the training loss at theta* (eps = J(theta*, train)), for at most as many epochs as reaching theta*
  took (the criterion may never be met). The optimizer restarts (fresh Adam moments).
- `none`: report theta* as is (the run's own test/* metrics).
Logged: early_stopping/best_step (i*, optimizer steps), early_stopping/best_epoch, early_stopping/best_val_loss,
and for retrain/continue the strategy's early_stopping/test/{loss,acc,err} (plus early_stopping/steps trained).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from omegaconf import DictConfig

from reglab.checkpoint import on_any_rank
from reglab.errors import ConfigError

STRATEGIES = ("none", "retrain", "continue")


class EarlyStopping(callbacks.EarlyStopping):
    """Lightning's EarlyStopping (conf/callbacks/early_stopping.yaml), whose decision survives a resume. The
    Trainer's should_stop is not in a checkpoint: a run that stopped early and was killed before its test resumed
    from the last.ckpt written when it stopped and trained on (one epoch more at least, more where val/loss improved:
    another theta*, another stop epoch). The decision is in the checkpoint (Lightning's stopping_reason, restored
    before on_fit_start); a resumed fit that holds it trains nothing and goes on to the test."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping_reason is not EarlyStoppingReason.NOT_STOPPED:
            trainer.should_stop = True


def strategy(cfg: DictConfig) -> str:
    """cfg.stopping.after_stop, checked against the callbacks it needs (without early stopping: none)."""
    value = (cfg.get("stopping") or {}).get("after_stop") or "none"
    if value not in STRATEGIES:
        raise ConfigError(f"stopping.after_stop={value!r} is not one of {', '.join(STRATEGIES)}")
    callbacks = cfg.get("callbacks") or {}
    node, checkpoint = callbacks.get("early_stopping"), callbacks.get("checkpoint")
    if value == "none" or node is None:
        return "none"
    if checkpoint is None:
        raise ConfigError(f"stopping.after_stop={value} reads theta* and i* from the best checkpoint: keep "
                          "callbacks.checkpoint on")
    if checkpoint.get("monitor") != node.get("monitor"):
        raise ConfigError(f"stopping.after_stop={value}: callbacks.checkpoint.monitor={checkpoint.get('monitor')!r} "
                          f"must equal callbacks.early_stopping.monitor={node.get('monitor')!r}")
    return value


def _best_checkpoint(trainer: L.Trainer, after: str) -> dict[str, Any]:
    es, ckpt = trainer.early_stopping_callback, trainer.checkpoint_callback
    need = f"stopping.after_stop={after}"
    if ckpt is None or not ckpt.best_model_path:
        raise ConfigError(f"{need} reads theta* and i* from the best checkpoint: keep callbacks.checkpoint on")
    if ckpt.monitor != es.monitor:
        raise ConfigError(f"{need}: callbacks.checkpoint.monitor={ckpt.monitor!r} must equal "
                          f"callbacks.early_stopping.monitor={es.monitor!r}")
    return torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)


def merge_validation(dm) -> None:
    """Train on train + validation from now on (validation labels are clean; label noise stays on train)."""
    dm.train_x = torch.cat([dm.train_x, dm.val_x])
    dm.train_y = torch.cat([dm.train_y, dm.val_y])
    dm.clean_train_y = torch.cat([dm.clean_train_y.to(dm.val_y.device), dm.val_y])
    dm.val_x, dm.val_y = dm.val_x[:0], dm.val_y[:0]


@torch.no_grad()
def mean_loss(module: L.LightningModule, dm, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of `module` on (x, y) in stored units, evaluation mode, no augmentation."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    total = torch.zeros((), device=device)
    for i in range(0, len(y), dm.eval_batch_size):
        xb = dm.normalize(x[i : i + dm.eval_batch_size].to(device))
        total += F.cross_entropy(module(xb), y[i : i + dm.eval_batch_size].to(device), reduction="sum")
    module.train(was_training)
    return total.item() / max(len(y), 1)


class StopBelow(L.Callback):
    """Stops training once the mean loss on (x, y) is <= target, checked at each epoch end."""

    def __init__(self, dm, x: torch.Tensor, y: torch.Tensor, target: float):
        self.dm, self.x, self.y, self.target = dm, x, y, target
        self.last = math.inf

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = mean_loss(pl_module, self.dm, self.x, self.y)
        # DDP: one rank's float rounding must not stop it alone (Lightning does not share should_stop)
        if on_any_rank(trainer, self.last <= self.target):
            trainer.should_stop = True


def _phase_trainer(cfg: DictConfig, max_epochs: int, max_steps: int, callbacks: list) -> L.Trainer:
    return instantiate(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False,
                       enable_progress_bar=False, max_epochs=max_epochs, max_steps=max_steps,
                       limit_val_batches=0, default_root_dir=None)


def after_stop(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, dm,
               make_module: Callable[[], L.LightningModule]) -> dict[str, float]:
    """Runs the chosen strategy after fit + test; returns the early_stopping/* metrics."""
    es = trainer.early_stopping_callback
    after = strategy(cfg)
    if es is None:
        return {}
    out: dict[str, float] = {}
    if es.best_score is not None and torch.isfinite(es.best_score):
        out["early_stopping/best_val_loss"] = float(es.best_score)
    ckpt = None
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
        ckpt = _best_checkpoint(trainer, after)
        out["early_stopping/best_step"] = float(ckpt["global_step"])
        out["early_stopping/best_epoch"] = float(ckpt["epoch"])
    if after != "none":
        if ckpt is None:
            _best_checkpoint(trainer, after)  # raises the explanation
        if len(dm.val_y) == 0:
            raise ConfigError(f"stopping.after_stop={after} needs a validation split "
                              "(data.val_fraction > 0)")
        best_step, best_epochs = int(ckpt["global_step"]), int(ckpt["epoch"]) + 1
        if after == "retrain":
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same theta_0 as the first run
            model = make_module()
            merge_validation(dm)
            batches = math.ceil(len(dm.train_y) / dm.batch_size)
            phase = _phase_trainer(cfg, max_epochs=math.ceil(best_step / batches), max_steps=best_step,
                                   callbacks=[])
        else:
            model = module
            model.load_state_dict(ckpt["state_dict"])
            target = mean_loss(model, dm, dm.train_x, dm.train_y)  # eps = J(theta*, train)
            val_x, val_y = dm.val_x, dm.val_y
            merge_validation(dm)
            stop = StopBelow(dm, val_x, val_y, target)
            phase = _phase_trainer(cfg, max_epochs=best_epochs, max_steps=-1, callbacks=[stop])
            out["early_stopping/continue_target_loss"] = target
        phase.fit(model, datamodule=dm)
        out["early_stopping/steps"] = float(phase.global_step)
        phase.test(model, datamodule=dm, verbose=False)
        for k, v in phase.callback_metrics.items():
            if k.startswith("test/"):
                out[f"early_stopping/{k}"] = float(v)
    return out
