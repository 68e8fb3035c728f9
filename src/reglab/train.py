"""run(cfg) -> metrics: one training run, in the order it happens.

look up (done / resume / new: reglab/runs/) -> data -> model, regularizers, Classifier -> logger -> callbacks ->
Trainer -> fit -> the training split in evaluation mode (`train_eval/{loss,err}` at the last epoch) -> test -> what
follows early stopping. scripts/train.py calls the config's `runner` (this `run` unless a study preset names
another); tests call `run` with composed configs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import nn

from reglab import early_stopping, launcher, performance, preemption
from reglab.checkpoint import stop_requested
from reglab.classifier import Classifier
from reglab.config import validate
from reglab.data import augmentation, device_augment
from reglab.errors import ConfigError, DivergenceError, ReglabError
from reglab.runs import Run, open_run, store
from reglab.runs.logger import RunLogger, build_logger


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """instantiate(node, **kwargs) where a wrong argument or value (ValueError, ConfigError, a TypeError about
    arguments) is the user's: one line naming `key`. Any other exception is a bug and keeps its traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ReglabError):  # names its key already
            raise cause from None
        if isinstance(cause, ValueError) or (isinstance(cause, TypeError) and "argument" in str(cause)):
            raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from None
        if cause is None or isinstance(cause, ImportError):  # a _target_ that names nothing: Hydra's line says so
            raise
        # A bug in the constructor: its own exception and traceback. Hydra's wrapper is a HydraException, which
        # reglab.cli would print as a one-line user error.
        raise cause from None


def build_data(cfg: DictConfig):
    dm = build(cfg.data, "data", seed=cfg.seed)
    # Training-split augmentation from cfg.augmentation (None when its transform list is empty).
    dm.augment = augmentation.for_datamodule(cfg.get("augmentation"), dm, seed=cfg.seed)
    # The same pipeline batched on the device (augmentation.device: auto = when training on CUDA), if it has one.
    dm.device_augment = device_augment.for_datamodule(cfg, dm)
    if dm.device_augment is not None:
        dm.augment = None
    return dm


def build_model(cfg: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    return build(cfg.model, "model", input_shape=tuple(input_shape), num_classes=num_classes)


def build_regularizers(cfg: DictConfig) -> dict[str, Any]:
    return {name: build(node, f"regularization.{name}") for name, node in (cfg.get("regularization") or {}).items()}


def _ranks(cfg: DictConfig) -> int | None:
    """DDP processes the trainer settings start (launcher.uses_ddp: also the default strategy on several devices),
    each taking every world-th training example; None where the count is the machine's (devices -1 or auto)."""
    t = cfg.trainer
    if launcher.uses_ddp(cfg) is None:
        return 1
    count = launcher.device_count(t.get("devices", "auto"))
    return None if count is None else count * int(t.get("num_nodes") or 1)


def check_accelerator(cfg: DictConfig) -> None:
    """trainer=gpu where torch sees no GPU: one line before anything is written (Lightning's own message came after
    the run's lookup, wrapped in Hydra's instantiation error)."""
    accelerator = str(cfg.trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: torch sees no CUDA GPU here "
                          "(torch.cuda.is_available() is false); use trainer=cpu")


def check_splits(cfg: DictConfig, dm, net: nn.Module) -> None:
    """What the data's splits cannot give this model and these callbacks, in one line before training (each was a
    traceback during it, after the run was logged)."""
    n_val, n = len(getattr(dm, "val_y", ())), len(getattr(dm, "train_y", ()))
    monitor = ((cfg.get("callbacks") or {}).get("early_stopping") or {}).get("monitor")
    if monitor and str(monitor).startswith("val/") and not n_val and hasattr(dm, "val_y"):
        raise ConfigError(f"callbacks.early_stopping monitors {monitor}, but data.val_fraction="
                          f"{getattr(dm, 'val_fraction', '?')} leaves no validation examples; raise data.val_fraction "
                          "or set callbacks.early_stopping=null")
    batch = getattr(dm, "batch_size", 0)
    if not (n and batch and any(isinstance(m, nn.BatchNorm1d) for m in net.modules())):
        return
    world = _ranks(cfg)
    if world is None:  # the machine's device count: not known here
        return
    # The sizes the model trains on, per DDP rank: the training split, and train + validation where
    # stopping.after_stop=retrain|continue trains again on both (early_stopping.merge_validation).
    per_rank = f", {{}} on each of {world} ranks" if world > 1 else ""
    sizes = {n // world: f"the training split has {n}" + per_rank.format(n // world)}
    if early_stopping.strategy(cfg) != "none":
        both = n + n_val
        sizes[both // world] = f"stopping.after_stop trains again on train + validation, {both}" + \
            per_rank.format(both // world)
    for size, what in sizes.items():
        if size % batch == 1:
            # BatchNorm1d cannot normalize one example; torch would stop that epoch's last step with a traceback.
            raise ConfigError(f"data.batch_size={batch} leaves a last training batch of one example ({what}), which "
                              "batch norm cannot normalize; choose another data.batch_size or data.train_size")


def build_module(cfg: DictConfig, dm) -> Classifier:
    net = build_model(cfg, dm.input_shape, dm.num_classes)
    check_splits(cfg, dm, net)
    return Classifier(net, optim=OmegaConf.to_container(cfg.optim, resolve=True), regularizers=build_regularizers(cfg),
                      seed=cfg.seed)


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[L.Callback]:
    """Every `callbacks.<name>` node with a `_target_` (null removes one). A checkpoint callback writes into the
    run's own folder; progress bars only on a terminal (none in logs and CI)."""
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        where = {"dirpath": str(ckpt_dir)} if issubclass(get_class(node._target_), ModelCheckpoint) else {}
        callback = instantiate(node, **where)
        if not isinstance(callback, ProgressBar) or sys.stdout.isatty():
            callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, run: Run, logger: RunLogger | None) -> L.Trainer:
    callbacks = build_callbacks(cfg, run.ckpt_dir)
    # Without a checkpoint callback (callbacks.checkpoint=null) Lightning would add its own, writing every epoch.
    saves = {"enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks)} \
        if cfg.trainer.get("enable_checkpointing") is None else {}
    return instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks, default_root_dir=str(run.ckpt_dir),
                       enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks), **saves)


@torch.no_grad()
def evaluate_training_set(net: torch.nn.Module, dm) -> dict[str, torch.Tensor]:
    """`train_eval/loss` and `train_eval/err`: the net in evaluation mode (dropout off, running statistics) on the
    whole training split with the labels it was trained on (noisy where label noise is on), no augmentation, one
    pass in eval batches. A population's data module stacks its members' splits, x (M, N, ...), y (M, N), and the
    fused net returns (M, B, classes): then each value is (M,), one per member."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    x_all, y_all = dm.train_x, dm.train_y
    stacked = y_all.dim() == 2
    loss = correct = torch.zeros(y_all.shape[0] if stacked else (), device=device)
    n = y_all.shape[-1]
    for i in range(0, n, dm.eval_batch_size):
        j = min(i + dm.eval_batch_size, n)
        x = dm.normalize((x_all[:, i:j] if stacked else x_all[i:j]).to(device))
        y = y_all[..., i:j].to(device)
        logits = net(x)
        # (M, B, C) -> classes on dim 1 for cross_entropy: (M, C, B) against (M, B)
        loss = loss + F.cross_entropy(logits.transpose(1, 2) if stacked else logits, y, reduction="none").sum(-1)
        correct = correct + (logits.argmax(-1) == y).sum(-1)
    net.train(was_training)
    return {"train_eval/loss": loss / n, "train_eval/err": 1.0 - correct.float() / n}


def run(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    check_accelerator(cfg)
    run = open_run(cfg)
    if run.done:
        return run.metrics
    preemption.check(run.name)
    early_stopping.strategy(cfg)  # a bad stopping.after_stop fails before training

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_data(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    if run.ckpt_path:
        module.check_checkpoint(run.ckpt_path)  # another model's checkpoint: one line, before MLflow is touched
    performance.apply(cfg.get("performance"), cfg.trainer, module.net)
    logger = build_logger(cfg, run)
    trainer = build_trainer(cfg, run, logger)
    if logger is not None and run.run_id is None:
        logger.log_header(cfg, module.num_params, dm)
        preview = augmentation.preview_for(cfg.get("augmentation"), dm)
        if preview is not None:
            logger.experiment.log_figure(logger.run_id, preview, "augmentation_preview.png")

    try:
        with preemption.keeping([logger]):
            preemption.check(run.name)
            trainer.fit(module, datamodule=dm, ckpt_path=run.ckpt_path, weights_only=True)
    except DivergenceError as e:
        if logger is not None:
            logger.fail(f"divergence: {e}")
            logger.finalize("failed")
        raise
    # The weights fit ended with, in evaluation mode, on the labels they were trained on: train/err is measured in
    # training mode (dropout on, batch statistics) while the weights still move, and interpolation is about this one.
    train_eval = {k: float(v) for k, v in evaluate_training_set(module.evaluated, dm).items()}
    if logger is not None:
        logger.log_after_fit(train_eval, step=trainer.current_epoch - 1)  # the last epoch trained
    # With early stopping the model to report is the best checkpoint (the lecture's theta*); otherwise the final
    # weights, which is what epoch-wise studies such as double descent measure.
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}
    if logger is not None and "train/loss" not in fit_metrics:  # resumed after its last epoch: only the test was left
        fit_metrics = {**logger.last_epoch(), **fit_metrics}
    use_best = trainer.early_stopping_callback is not None and trainer.checkpoint_callback is not None \
        and bool(trainer.checkpoint_callback.best_model_path)
    with preemption.keeping([logger]):
        stop_requested(trainer)  # DDP: every rank stops here if any was asked to (the test pass is collective)
        preemption.check(f"{run.name}'s test pass")  # last.ckpt holds the trained weights: the rerun only tests
        trainer.test(module, datamodule=dm, ckpt_path="best" if use_best else None, verbose=False, weights_only=True)
    metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}}
    metrics["model/params"] = float(module.num_params)
    metrics.update(train_eval)
    after = early_stopping.after_stop(cfg, trainer, module, dm, lambda: build_module(cfg, dm))
    if logger is not None:
        if after:
            logger.log_after_end(after)
        logger.end()  # FINISHED only now, with everything it logs (Lightning's end of fit and test left it RUNNING)
    metrics.update(after)
    if logger is not None and not cfg.get("study"):  # a study prints where its report is instead
        print(f"MLflow: run {logger.run_id} ({run.name}) in experiment '{cfg.logger.experiment}' at "
              f"{logger.tracking_uri}; {store.ui_hint(logger.tracking_uri)}")
    return metrics
