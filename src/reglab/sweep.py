"""Studies as Hydra multiruns: one MLflow parent run per study, one child run per configuration, resumable.

A config with `study: <name>` (set by a conf/exp/ preset) is a study job. `StudyCallback.on_multirun_start` finds or
creates the parent run in the launching process, before any job starts (so parallel jobs never race to create
it), and hands its id to the jobs in $REGLAB_STUDY_PARENT. Each job (`find_child`) then looks for its child among
the parent's children by `fingerprint` (the hash of its resolved config):

- a FINISHED child (or one that failed deterministically, tag `failure_reason`) is skipped;
- an unfinished one (killed, crashed, machine restarted) continues: same MLflow run, weights and optimizer from
  `last.ckpt` in its checkpoint folder; metric points at epochs the run already holds are dropped
  (`ResumingMLFlowLogger`), so the history has each epoch exactly once;
- an unfinished one whose history lacks the checkpoint's epoch, or that has no checkpoint, is deleted and the
  configuration starts over (resuming it would leave a gap or repeat epochs).

The parent is keyed by the study name and the config minus the swept keys (`study_key`), so rerunning the same
command, or adding values to an axis, reuses it. `on_multirun_end` writes the study's report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from reglab import tracking
from reglab.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PARENT = "REGLAB_STUDY_PARENT"
LAST_EPOCH_KEY = "train/loss"  # logged last in an epoch (after validation and test), so it marks a whole epoch


def sweep_axes(hydra_cfg: DictConfig) -> dict[str, str]:
    """{key: values} of every swept key: the preset's hydra.sweeper.params and comma/range overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = {str(k): str(v) for k, v in (hydra_cfg.sweeper.get("params") or {}).items()}
    for o in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        if o.is_sweep_override():
            axes[o.key_or_group] = o.input_line.split("=", 1)[1]
    return axes


def _drop(container: dict, dotted: str) -> None:
    *path, last = dotted.lstrip("+~").split(".")
    for part in path:
        container = container.get(part) if isinstance(container, dict) else None
        if container is None:
            return
    if isinstance(container, dict):
        container.pop(last, None)


def study_key(cfg: DictConfig, axes: list[str]) -> str:
    """sha256 of the study name and the semantic config minus the swept keys: what all children share."""
    c = tracking.semantic_config(_without_hydra(cfg))
    for key in axes:
        _drop(c, key)
    return hashlib.sha256(json.dumps([cfg.study, c], sort_keys=True, default=str).encode()).hexdigest()


def _client(cfg: DictConfig):
    if cfg.logger.get("backend") != "mlflow":
        raise ConfigError(f"study={cfg.study} needs logger=mlflow (children and reports live in MLflow)")
    return tracking.client_and_experiment(cfg.logger.get("tracking_uri"), cfg.paths.root, cfg.logger.experiment)


def open_parent(cfg: DictConfig, axes: dict[str, str]) -> str:
    """Find or create the study's parent run; record the grid (tags, mutable as a sweep grows) and the config."""
    client, exp_id = _client(cfg)
    parent = tracking.study_parent(client, exp_id, cfg.study, study_key(cfg, list(axes)))
    for key, values in axes.items():
        client.set_tag(parent, f"sweep.{key}", values)
    if cfg.get("report"):
        client.set_tag(parent, "reglab.report", cfg.report)
    client.log_text(parent, OmegaConf.to_yaml(_without_hydra(cfg), resolve=True), "config.yaml")
    client.update_run(parent, status="RUNNING")
    return parent


def _without_hydra(cfg: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


# --- a job's child run -----------------------------------------------------------------------------------------
@dataclass
class Child:
    parent_id: str | None  # None: a single run (no study) being continued
    study: str | None
    run_id: str | None = None  # None: a new run
    ckpt_path: str | None = None  # resume from here
    logged_through: dict[str, int] = field(default_factory=dict)  # key -> last step already in the history
    done_metrics: dict[str, float] | None = None  # set when the child finished before: nothing to do

    @property
    def tags(self) -> dict[str, str]:
        return tracking.child_tags(self.parent_id, self.study) if self.parent_id else {}


def _parent_id(cfg: DictConfig) -> str:
    parent = os.environ.get(ENV_PARENT)
    if parent:
        return parent
    # Not launched through StudyCallback (a direct run(cfg) call): key the parent by the preset's axes.
    from hydra.core.hydra_config import HydraConfig

    axes = sweep_axes(HydraConfig.get()) if HydraConfig.initialized() else {}
    return open_parent(cfg, axes)


def checkpoint_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def _logged_through(client, run) -> dict[str, int]:
    return {k: max(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}


def find_child(cfg: DictConfig, fp: str, ckpt_dir: Path) -> Child:
    client, exp_id = _client(cfg)
    parent = _parent_id(cfg)
    runs = client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.fingerprint = '{fp}'",
        order_by=["attributes.start_time DESC"],
    )
    child = Child(parent, cfg.study)
    done = [r for r in runs if r.info.status == "FINISHED" or "failure_reason" in r.data.tags]
    if done:
        log.info("study %s: %s already done (run %s), skipped", cfg.study, ckpt_dir.name, done[0].info.run_id)
        child.run_id, child.done_metrics = done[0].info.run_id, dict(done[0].data.metrics)
        return child
    for stale in runs[1:]:  # only one attempt per configuration continues
        client.delete_run(stale.info.run_id)
    last = ckpt_dir / "last.ckpt"
    if runs:
        run = runs[0]
        logged = _logged_through(client, run)
        if last.exists() and logged.get(LAST_EPOCH_KEY, -1) >= checkpoint_epoch(last):
            log.info("study %s: resuming %s from %s", cfg.study, run.info.run_id, last)
            child.run_id, child.ckpt_path, child.logged_through = run.info.run_id, str(last), logged
            return child
        client.delete_run(run.info.run_id)
    if ckpt_dir.exists():  # checkpoints of an attempt MLflow does not hold: start clean
        shutil.rmtree(ckpt_dir)
    return child


def find_interrupted(cfg: DictConfig, fp: str, ckpt_dir: Path) -> Child | None:
    """A single run (no study) killed before it ended is still RUNNING in MLflow: rerunning the same command
    continues it from `last.ckpt`, as a study's child would be. When its history stops before the checkpoint (killed
    between the two writes), continuing would leave a gap: it is marked KILLED with tag `reglab.superseded_by_rerun`
    and the command starts over. A FINISHED run is never touched: the same command again is a new run."""
    client, exp_id = tracking.client_and_experiment(cfg.logger.get("tracking_uri"), cfg.paths.root,
                                                    cfg.logger.experiment)
    runs = [r for r in client.search_runs([exp_id], f"tags.fingerprint = '{fp}' and attributes.status = 'RUNNING'",
                                          order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        return None
    run, last = runs[0], ckpt_dir / "last.ckpt"
    logged = _logged_through(client, run)
    if last.exists() and logged.get(LAST_EPOCH_KEY, -1) >= checkpoint_epoch(last):
        log.info("resuming interrupted run %s from %s", run.info.run_id, last)
        return Child(None, None, run.info.run_id, str(last), logged)
    for stale in runs:
        client.set_tag(stale.info.run_id, "reglab.superseded_by_rerun", "true")
        client.set_terminated(stale.info.run_id, status="KILLED")
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    return None


def child_logger(cfg: DictConfig, child: Child, **mlflow_kwargs):
    """The MLFlowLogger of a study's child: continues `child.run_id` when set, drops points the run already holds,
    and writes the epochs' metrics in one batch per checkpoint interval (one SQLite write per epoch costs more
    than training a small MLP for that epoch)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class ChildMLFlowLogger(MLFlowLogger):
        def __init__(self, logged_through: dict[str, int], flush_every: int, **kwargs):
            super().__init__(**kwargs)
            self._logged_through, self._flush_every = dict(logged_through), max(1, flush_every)
            self._pending: list[tuple[dict[str, float], int | None]] = []

        @rank_zero_only
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if step is not None:
                metrics = {k: v for k, v in metrics.items() if step > self._logged_through.get(k, -1)}
            if metrics:
                self._pending.append((metrics, step))
            # train/loss closes an epoch (see LAST_EPOCH_KEY); flushing right after a checkpoint epoch keeps the
            # history at least as far as the checkpoint, which is what resuming needs.
            if LAST_EPOCH_KEY in metrics and step is not None and (step + 1) % self._flush_every == 0:
                self.flush()

        @rank_zero_only
        def flush(self) -> None:
            pending, self._pending = self._pending, []
            from mlflow.entities import Metric

            batch = [Metric(k, float(v), self._timestamp_ms(), step or 0) for m, step in pending for k, v in m.items()]
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1,000 metrics per request
                self.experiment.log_batch(run_id=self.run_id, metrics=batch[i:i + 1000])

        @staticmethod
        def _timestamp_ms() -> int:
            import time

            return int(time.time() * 1000)

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            self.flush()
            super().finalize(status)

    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    tags = {**mlflow_kwargs.pop("tags", {}), **child.tags}
    return ChildMLFlowLogger(logged_through=child.logged_through, flush_every=int(checkpoint.get("every_n_epochs") or 1),
                             run_id=child.run_id, tags=tags, **mlflow_kwargs)


# --- report --------------------------------------------------------------------------------------------------
def latest_parent(client, exp_id: str, study: str):
    runs = client.search_runs([exp_id], f"tags.study = '{study}' and tags.`reglab.role` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"study={study!r}: no parent run in this MLflow store (run the sweep first)")
    return runs[0]


def write_report(cfg: DictConfig, parent_id: str | None = None) -> Path:
    """Run reglab.studies.<report>.report for the study's parent run; files go to <paths.results>/<study>/ and
    to the parent run's artifacts."""
    import importlib

    client, exp_id = _client(cfg)
    parent = client.get_run(parent_id) if parent_id else latest_parent(client, exp_id, cfg.study)
    kind = parent.data.tags.get("reglab.report") or cfg.get("report")
    if not kind:
        raise ConfigError(f"study={cfg.study!r} names no report (set report: <module of reglab.studies>)")
    out = Path(cfg.paths.results) / cfg.study
    out.mkdir(parents=True, exist_ok=True)
    importlib.import_module(f"reglab.studies.{kind}").report(client, parent, out)
    client.log_artifacts(parent.info.run_id, str(out))
    return out


class StudyCallback(Callback):
    """Hydra callback (conf/train.yaml): sets up the parent before a study's jobs, reports after them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from reglab.launcher import refuse_ddp_in_multirun

        refuse_ddp_in_multirun(config)
        if config.get("study"):
            os.environ[ENV_PARENT] = open_parent(config, sweep_axes(config.hydra))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("study"):  # one configuration of a study, e.g. a rerun of a single width
            os.environ[ENV_PARENT] = open_parent(config, sweep_axes(config.hydra))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(ENV_PARENT, None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.pop(ENV_PARENT, None)
        if not parent:
            return
        client, _ = _client(config)
        try:
            out = write_report(config, parent)
            print(f"report: {out}", file=sys.stderr)
        finally:
            client.update_run(parent, status="FINISHED")
