"""run(cfg) -> metrics: the whole wiring of one training run, in the order it happens.

data -> model -> regularizers -> Classifier -> logger -> callbacks -> Trainer -> fit -> test. scripts/train.py is a
thin @hydra.main wrapper around it; tests call it with composed configs.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reglab import early_stopping, performance, sweep, tracking
from reglab.classifier import Classifier
from reglab.config import validate
from reglab.data import augmentation, device_augment
from reglab.errors import ConfigError, DivergenceError

# Lightning's start-up chatter (accelerator lines, a cloud-logger advert) and a deprecation inside Lightning itself
# bury the lines a researcher needs; warnings from our own code and real Lightning warnings stay.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def build_data(cfg: DictConfig):
    dm = instantiate(cfg.data, seed=cfg.seed)
    # Training-split augmentation from cfg.augmentation (None when its transform list is empty).
    dm.augment = augmentation.for_datamodule(cfg.get("augmentation"), dm, seed=cfg.seed)
    # The same pipeline batched on the device (augmentation.device: auto = when training on CUDA), if it has one.
    dm.device_augment = device_augment.for_datamodule(cfg, dm)
    if dm.device_augment is not None:
        dm.augment = None
    return dm


def build_model(cfg: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    try:
        return instantiate(cfg.model, input_shape=tuple(input_shape), num_classes=num_classes)
    except Exception as e:  # Hydra wraps constructor errors; surface the model's own message
        cause = e.__cause__ or e
        raise ConfigError(str(cause).splitlines()[0]) from None


def build_regularizers(cfg: DictConfig) -> dict[str, Any]:
    regs = {}
    for name, node in (cfg.get("regularization") or {}).items():
        try:
            regs[name] = instantiate(node)
        except Exception as e:
            cause = e.__cause__ or e
            raise ConfigError(f"regularization.{name}: {str(cause).splitlines()[0]}") from None
    return regs


def run_name(cfg: DictConfig) -> str:
    if cfg.get("run_name"):
        return cfg.run_name
    model = cfg.model._target_.rsplit(".", 1)[-1].lower()
    return f"{model}-w{cfg.model.get('width', 'x')}-s{cfg.seed}"


def build_logger(cfg: DictConfig, name: str, fp: str, child: "sweep.Child | None" = None):
    if cfg.logger.backend == "none":
        return None
    if cfg.logger.backend != "mlflow":
        raise ConfigError(f"logger.backend={cfg.logger.backend!r} is not one of mlflow, none")
    from lightning.pytorch.loggers import MLFlowLogger

    uri, artifacts = tracking.resolve_tracking(cfg.logger.get("tracking_uri"), cfg.paths.root)
    tags = {"fingerprint": fp, **tracking.run_tags(), **(cfg.logger.get("tags") or {})}
    # synchronous=false: metrics go to the store from MLflow's background thread (a SQLite commit is ~25 ms of
    # waiting per epoch, as long as a whole epoch of a small model); ending the run flushes the queue.
    sync = bool(cfg.logger.get("synchronous", False))
    if not sync:
        # MLflow's queue thread otherwise blocks on `queue.get(timeout=1)`: ending a run (after fit, again after
        # test) waits up to 1 s for it to notice. With buffering it sleeps on the stop event instead (ends at once)
        # and merges the points queued in that second into one SQLite write. Read by MLflow at each wake-up.
        if not os.environ.get("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"):  # unset or empty (MLflow hangs on "")
            os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = "1"
    if child is not None:  # a study's child run, new or continued, or an interrupted single run (reglab/sweep.py)
        return sweep.child_logger(cfg, child, experiment_name=cfg.logger.experiment, run_name=name, tracking_uri=uri,
                                  artifact_location=artifacts, tags=tags,
                                  log_model=bool(cfg.logger.get("log_model", False)), synchronous=sync)
    return MLFlowLogger(
        experiment_name=cfg.logger.experiment,
        run_name=name,
        tracking_uri=uri,
        artifact_location=artifacts,
        tags=tags,
        log_model=bool(cfg.logger.get("log_model", False)),
        run_id=cfg.logger.get("run_id"),
        synchronous=sync,
    )


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if name == "progress" and not sys.stdout.isatty():
            continue  # no bar in logs and CI
        kwargs = {"dirpath": str(ckpt_dir)} if name == "checkpoint" else {}
        if name == "early_stopping":
            node = early_stopping.mechanism(node)  # `after_stop` is ours, read after fit
        callbacks.append(instantiate(node, **kwargs))
    return callbacks


def run(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fp = tracking.fingerprint(cfg)
    name = run_name(cfg)
    ckpt_dir = Path(cfg.paths.checkpoints) / f"{name}-{fp[:12]}"
    # A study job (cfg.study) is a child run of the study's parent: done before -> skipped; interrupted -> resumed.
    # A single run killed before it ended (still RUNNING in MLflow) is continued from its last checkpoint too.
    child = sweep.find_child(cfg, fp, ckpt_dir) if cfg.get("study") else \
        sweep.find_interrupted(cfg, fp, ckpt_dir) if cfg.logger.get("backend") == "mlflow" else None
    if child is not None and child.done_metrics is not None:
        return child.done_metrics

    dm = build_data(cfg)
    dm.setup()
    early_stopping.strategy(cfg)  # a bad after_stop fails before training

    def build_module() -> Classifier:
        net = build_model(cfg, dm.input_shape, dm.num_classes)
        return Classifier(net, optim=OmegaConf.to_container(cfg.optim, resolve=True),
                          regularizers=build_regularizers(cfg))

    module = build_module()
    if child is not None and child.ckpt_path:
        module.check_checkpoint(child.ckpt_path)  # another model's checkpoint: one line, before MLflow is touched

    logger = build_logger(cfg, name, fp, child)
    callbacks = build_callbacks(cfg, ckpt_dir)
    has_progress = any(type(c).__name__ == "RichProgressBar" for c in callbacks)
    performance.apply(cfg.trainer, module.net)  # channels_last, torch.compile, TF32 (trainer.performance)
    # Without a checkpoint callback (callbacks.checkpoint=null) Lightning would add its own, writing every epoch.
    saves = {"enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks)} \
        if cfg.trainer.get("enable_checkpointing") is None else {}
    trainer: L.Trainer = instantiate(performance.trainer_config(cfg.trainer), logger=logger or False,
                                     callbacks=callbacks, enable_progress_bar=has_progress,
                                     default_root_dir=str(ckpt_dir), **saves)
    if logger is not None:
        params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
        params.update({"model.params": module.num_params, "data.label_noise_realized": dm.label_noise_realized})
        logger.log_hyperparams(params)
        logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        logger.log_metrics({"data/label_noise_realized": dm.label_noise_realized}, step=0)
        preview = augmentation.preview_for(cfg.get("augmentation"), dm)
        if preview is not None:
            logger.experiment.log_figure(logger.run_id, preview, "augmentation_preview.png")

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=child.ckpt_path if child else None, weights_only=True)
    except DivergenceError as e:
        if logger is not None:
            logger.experiment.set_tag(logger.run_id, "failure_reason", f"divergence: {e}")
            logger.finalize("failed")
        raise
    # With early stopping the model to report is the best checkpoint (the lecture's theta*); otherwise the final
    # weights, which is what epoch-wise studies such as double descent measure.
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}
    use_best = trainer.early_stopping_callback is not None and trainer.checkpoint_callback is not None \
        and bool(trainer.checkpoint_callback.best_model_path)
    trainer.test(module, datamodule=dm, ckpt_path="best" if use_best else None, verbose=False, weights_only=True)
    metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}}
    metrics["model/params"] = float(module.num_params)
    metrics.update(early_stopping.after_stop(cfg, trainer, module, dm, logger, build_module))
    if logger is not None and not cfg.get("study"):  # a study prints where its report is instead
        print(f"MLflow: run {logger.run_id} ({name}) in experiment '{cfg.logger.experiment}' at "
              f"{logger._tracking_uri}; open it with `make ui`")
    return metrics


def study_runners() -> list[str]:
    """Modules of reglab.studies that define a top-level run(cfg) (others hold only a study's report)."""
    import reglab.studies

    folder = Path(reglab.studies.__path__[0])
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_")
                  and "\ndef run(" in (folder / f"{m.name}.py").read_text())


def main(cfg: DictConfig) -> dict[str, float]:
    """Entry for scripts/train.py: `runner: train` (default) trains one Classifier; a study preset may name a
    module of reglab.studies whose run(cfg) does work that is not one Classifier fit (closed forms, many small
    fits), e.g. `runner: polynomial`."""
    runner = cfg.get("runner", "train")
    if runner == "train":
        return run(cfg)
    if runner not in study_runners():
        raise ConfigError(f"runner={runner!r} is not train or one of {', '.join(study_runners())}")
    return importlib.import_module(f"reglab.studies.{runner}").run(cfg)
