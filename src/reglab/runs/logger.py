"""The one way a run writes to MLflow: `RunLogger`, a Lightning MLFlowLogger that

- starts a new run or continues `Run.run_id` (reglab/runs/lookup.py), dropping points at epochs the history
  already holds, so a resumed run logs every epoch once;
- writes the epochs' metrics in batches, each one synchronous request with the tag `reglab.logged_epoch` (what
  resuming reads): `flush()`, called by reglab's Checkpoint right before it makes last.ckpt current, so the stored
  history is never behind the checkpoint, and otherwise at most every FLUSH_EVERY_S seconds (the UI follows a run);
  a SQLite commit costs as much as an epoch of a small MLP, so not once per epoch;
- records the run's header (flattened config as params, config.yaml, git commit and package versions) and, after
  the run ended, the metrics of what follows it (early stopping's after-stop phase).

The Classifier hands over each epoch's metrics in one `log_metrics(metrics, step=epoch)` call at the end of the
epoch (reglab/classifier.py). A history ahead of the checkpoint is fine (a resume recomputes those epochs and drops
their points); one behind it is not, and lookup.py starts such a run over.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from reglab.errors import ConfigError
from reglab.runs import store
from reglab.runs.lookup import LOGGED_EPOCH_TAG, Run

MAX_BATCH = 1000  # MLflow takes at most 1,000 metrics per request
FLUSH_EVERY_S = 60.0  # with checkpoints on, last.ckpt writes (every 30 s by default) flush first anyway
MAX_PARAMS, MAX_PARAM = 100, 6000  # ... 100 params per request, 6,000 characters per value


class RunLogger(MLFlowLogger):
    def __init__(self, run: Run, flush_every_s: float = FLUSH_EVERY_S, **kwargs: Any):
        super().__init__(run_id=run.run_id, **kwargs)
        self.logged_epoch, self.flush_every_s = run.logged_epoch, flush_every_s
        self._flushed_at = time.monotonic()
        self.tracking_uri = kwargs["tracking_uri"]
        self._pending: list[tuple[dict[str, float], int]] = []
        self._failed = False

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = 0 if step is None else int(step)
        if step <= self.logged_epoch:
            return
        self._pending.append((metrics, step))
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        from mlflow.entities import Metric, RunTag

        pending, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        if not pending:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for m, step in pending for k, v in m.items()]
        last = max(step for _, step in pending)
        for i in range(0, len(batch), MAX_BATCH):
            tags = [RunTag(LOGGED_EPOCH_TAG, str(last))] if i + MAX_BATCH >= len(batch) else []
            # Synchronous: resuming trusts the tag only once the points are in the store.
            self.experiment.log_batch(self.run_id, metrics=batch[i:i + MAX_BATCH], tags=tags, synchronous=True)

    @rank_zero_only
    def fail(self, reason: str) -> None:
        """Tag the run with `failure_reason` (a study treats it as done: a rerun would fail the same way); it ends
        FAILED whatever status Lightning finalizes it with."""
        self.experiment.set_tag(self.run_id, "failure_reason", reason)
        self._failed = True

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()
        super().finalize("failed" if self._failed else status)

    @rank_zero_only
    def log_header(self, cfg: DictConfig, model_params: int, label_noise_realized: float) -> None:
        """The config (flattened) and two measured values as MLflow params, config.yaml, and the same two values as
        step-0 metrics. Those go in epoch 0's batch: written alone, their batch's reglab.logged_epoch tag would claim
        epoch 0 before it was trained, and a kill after its checkpoint would resume without ever logging it."""
        measured = {"model.params": model_params, "data.label_noise_realized": label_noise_realized}
        self.log_hyperparams({**store.flatten(OmegaConf.to_container(cfg, resolve=True)), **measured})
        self.experiment.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        self._pending.append(({"model/params": float(model_params), "data/label_noise_realized": label_noise_realized},
                              0))

    @rank_zero_only
    def log_after_end(self, metrics: dict[str, float]) -> None:
        """Metrics of work done after the run ended (step 0), written at once: the run's queue is closed."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.experiment.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                                  synchronous=True)


def build_logger(cfg: DictConfig, run: Run) -> RunLogger | None:
    backend = cfg.logger.backend
    if backend == "none":
        return None
    if backend != "mlflow":
        raise ConfigError(f"logger.backend={backend!r} is not one of mlflow, none")
    uri, artifacts = store.resolve(cfg.logger.get("tracking_uri"), cfg.paths.root)
    return RunLogger(
        run,
        experiment_name=cfg.logger.experiment,
        run_name=run.name,
        tracking_uri=uri,
        artifact_location=artifacts,
        tags={"fingerprint": run.identity, **store.code_tags(), **(cfg.logger.get("tags") or {}), **run.tags},
        log_model=bool(cfg.logger.get("log_model", False)),
    )
