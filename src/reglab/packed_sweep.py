"""Packed sweeps: a study's MLP widths trained together (reglab/packed.py), each still its own MLflow child run.

With `pack: true` (conf/train.yaml; a study preset may set it), `PackCallback.on_multirun_start` runs after the
study's parent run is open (`StudyCallback`) and before Hydra launches any job: it expands the sweep grid, groups
the configurations that differ only in `model.width` (same seed, data, optimizer, epochs), and trains each group
as one network in one process. Every model gets the child run it would get alone: same fingerprint, parameters,
config.yaml, per-epoch metrics (`{train,val,test}/{loss,acc,err}`, `params/*`) and final test metrics, under the
study's parent. Hydra then launches the jobs as usual; each finds its child FINISHED (`sweep.find_child`) and
returns at once. Whatever cannot be packed (other models, regularizers, augmentation, early stopping, group
sweeps), and a pack that diverges or is interrupted, is trained by its own job as before: packing never changes
what the study records, only how fast (and the last float bits, see reglab/packed.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PACK_AXIS = "model.width"


# --- the grid -----------------------------------------------------------------------------------------------------
def expand_grid(config: DictConfig, axes: dict[str, str]) -> list[DictConfig] | None:
    """One config per job of the sweep (without the hydra node), or None when an axis is a config group or a
    value Hydra would not parse as a plain value (those sweeps are left to the jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    values: list[tuple[str, list[Any]]] = []
    for key, spec in axes.items():
        o = parser.parse_override(f"{key}={spec}")
        if o.is_sweep_override():
            vals = list(o.sweep_iterator())
        else:
            vals = [o.value()]
        node = OmegaConf.select(config, key.lstrip("+"), default=None)
        if isinstance(node, DictConfig) or any(isinstance(v, (dict, list)) for v in vals):
            return None  # a group choice (model=mlp,resnet18) or a structured value
        values.append((key.lstrip("+"), vals))
    base = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    jobs = []
    for combo in itertools.product(*(v for _, v in values)):
        cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
        for (key, _), value in zip(values, combo):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        jobs.append(cfg)
    return jobs


def why_not_packable(cfg: DictConfig) -> str | None:
    if cfg.model.get("_target_") != "reglab.models.MLP" or (cfg.model.get("norm") or "none") != "none":
        return "only MLPs without normalization pack"
    if cfg.get("regularization"):
        return "regularizers change the training step"
    if (cfg.get("augmentation") or {}).get("transforms"):
        return "augmentation"
    if (cfg.get("callbacks") or {}).get("early_stopping"):
        return "early stopping ends each model at its own epoch"
    t = cfg.trainer
    if t.get("gradient_clip_val") or (t.get("accumulate_grad_batches") or 1) != 1:
        return "gradient clipping / accumulation couple the models"
    if str(t.get("strategy") or "").startswith("ddp") or t.get("devices", 1) not in (1, "1", "auto"):
        return "one device only"
    if cfg.logger.get("backend") != "mlflow":
        return "children need logger=mlflow"
    return None


def pack_key(cfg: DictConfig) -> str:
    """Configurations with equal keys differ only in the packed axis."""
    from reglab import tracking

    c = tracking.semantic_config(cfg)
    c.get("model", {}).pop("width", None)
    return json.dumps(c, sort_keys=True, default=str)


# --- training -----------------------------------------------------------------------------------------------------
def _device(trainer_cfg) -> str:
    acc = str(trainer_cfg.get("accelerator", "cpu"))
    return "cuda" if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()) else "cpu"


def train_pack(cfgs: list[DictConfig], children: list | None = None, root_dir: str | None = None) -> list[dict]:
    """Train the configurations (equal but for model.width) as one Pack; log each into its own MLflow run (a
    study child when `children` is given, a plain run when logger=mlflow, nothing with logger=none). Returns each
    model's final metrics and, under key "net", the trained MLP (weights as if trained alone)."""
    import lightning as L
    from hydra.utils import instantiate

    from reglab import performance, tracking, train
    from reglab.packed import Pack, packable
    from reglab.packed_module import PackedClassifier

    nets, dm = [], None
    for cfg in cfgs:
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train.run: seed, data, then the model
        dm = train.build_data(cfg)
        dm.setup()
        net = train.build_model(cfg, dm.input_shape, dm.num_classes)
        if not packable(net):
            raise ValueError(f"model.width={cfg.model.width}: not a packable MLP")
        nets.append(net)
    pack = Pack(nets, _device(cfgs[0].trainer))
    loggers = []
    for i, cfg in enumerate(cfgs):
        fp = tracking.fingerprint(cfg)
        logger = train.build_logger(cfg, train.run_name(cfg), fp, children[i] if children else None)
        if logger is not None:
            params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
            params.update({"model.params": nets[i].num_params, "data.label_noise_realized": dm.label_noise_realized})
            logger.log_hyperparams(params)
            logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            logger.log_metrics({"data/label_noise_realized": dm.label_noise_realized}, step=0)
        loggers.append(logger)
    module = PackedClassifier(pack, OmegaConf.to_container(cfgs[0].optim, resolve=True), loggers)
    trainer_cfg = performance.trainer_config(cfgs[0].trainer)
    trainer = instantiate(trainer_cfg, logger=False, callbacks=[], enable_checkpointing=False,
                          enable_progress_bar=False, default_root_dir=root_dir or str(Path(cfgs[0].paths.root)))
    try:
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
    except BaseException:
        for logger in loggers:
            if logger is not None:
                logger.finalize("failed")  # unfinished, no failure_reason: the jobs retrain these alone
        raise
    results = []
    for i, logger in enumerate(loggers):
        if logger is not None:
            logger.finalize("success")
        results.append({**module.final[i], "model/params": float(nets[i].num_params), "net": nets[i]})
    return results


def run_packed(config: DictConfig, axes: dict[str, str]) -> int:
    """Train every packable group of the sweep; returns how many configurations were trained here."""
    from reglab import sweep, tracking, train

    jobs = expand_grid(config, axes)
    if jobs is None or PACK_AXIS not in axes:
        log.info("pack: the sweep is not over %s alone; the jobs train one model each", PACK_AXIS)
        return 0
    groups: dict[str, list[DictConfig]] = {}
    for cfg in jobs:
        reason = why_not_packable(cfg)
        if reason is None:
            groups.setdefault(pack_key(cfg), []).append(cfg)
        else:
            log.info("pack: %s (%s); the jobs train them one by one", train.run_name(cfg), reason)
    trained = 0
    for cfgs in groups.values():
        todo = []
        for cfg in cfgs:
            fp = tracking.fingerprint(cfg)
            ckpt_dir = Path(cfg.paths.checkpoints) / f"{train.run_name(cfg)}-{fp[:12]}"
            child = sweep.find_child(cfg, fp, ckpt_dir)
            if child.done_metrics is None:
                if child.run_id is not None:  # a resumable single-model attempt: its job continues it
                    continue
                todo.append((cfg, child))
        if len(todo) < 2:
            continue
        print(f"pack: training {len(todo)} models together: model.width="
              f"{','.join(str(c.model.width) for c, _ in todo)}", file=sys.stderr)
        try:
            train_pack([c for c, _ in todo], [ch for _, ch in todo])
            trained += len(todo)
        except Exception as e:  # a diverged pack: every model goes back to its own job
            print(f"pack: {type(e).__name__}: {e}; these models are trained by their own jobs", file=sys.stderr)
    return trained


class PackCallback(Callback):
    """Hydra callback (conf/train.yaml): with `pack: true`, train the sweep's packable models together before the
    jobs start. Must come after reglab.sweep.StudyCallback (the parent run)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from reglab import sweep

        if not config.get("pack") or not config.get("study") or not os.environ.get(sweep.ENV_PARENT):
            return
        run_packed(config, sweep.sweep_axes(config.hydra))
