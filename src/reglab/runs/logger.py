"""The one way a run writes to MLflow: `RunLogger`, a Lightning MLFlowLogger that

- starts a new run or continues `Run.run_id` (reglab/runs/lookup.py), dropping points at epochs the history
  already holds, so a resumed run logs every epoch once;
- writes the epochs' metrics in batches, each one synchronous request with the tag `reglab.logged_epoch` (what
  resuming reads): `flush()`, called by reglab's Checkpoint right before it makes last.ckpt current, so the stored
  history is never behind the checkpoint, and otherwise at most every FLUSH_EVERY_S seconds (the UI follows a run);
  a SQLite commit costs as much as an epoch of a small MLP, so not once per epoch;
- records the run's header (flattened config as params, config.yaml, git commit and package versions, its data
  splits as MLflow dataset inputs: reglab/runs/datasets.py) and the metrics of what follows the fit (the training
  split in evaluation mode, the test, early stopping's after-stop phase);
- keeps the run RUNNING until the code that trains it calls `end()`: Lightning finalizes its loggers at the end of
  every fit and test pass, and a run ended there and killed in the test pass would be FINISHED without its test
  metrics, a study child a rerun skips as done;
- with `logger.system_metrics=true`, runs MLflow's system-metrics monitor (`system/*`: CPU, memory, disk, network
  and, with nvidia-ml-py, GPU utilisation and memory) on the run until it ends.

The Classifier hands over each epoch's metrics in one `log_metrics(metrics, step=epoch)` call at the end of the
epoch (reglab/classifier.py). A history ahead of the checkpoint is fine (a resume recomputes those epochs and drops
their points); one behind it is not, and lookup.py starts such a run over.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from reglab.errors import ConfigError, ReglabError
from reglab.runs import store
from reglab.runs.lookup import LOGGED_EPOCH_TAG, RESUMABLE_TAG, Run

log = logging.getLogger(__name__)


class TrackingUnavailable(ReglabError):
    """The tracking server did not answer after MLflow's own retries."""


def unreachable(exc: BaseException) -> bool:
    """MLflow's error for a request that found no server (connection refused or reset, after its retries)."""
    text = str(exc)
    return type(exc).__name__ == "MlflowException" and "API request to" in text and any(
        s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError", "Connection aborted"))

EPOCH_METRICS = ("train/", "val/", "params/")  # what the Classifier logs at the end of an epoch
MAX_BATCH = 1000  # MLflow takes at most 1,000 metrics per request
FLUSH_EVERY_S = 60.0  # with checkpoints on, last.ckpt writes (every 30 s by default) flush first anyway
MAX_PARAMS, MAX_PARAM = 100, 6000  # ... 100 params per request, 6,000 characters per value
SYSTEM_METRICS_RUN_TAG = "reglab.system_metrics_run"  # the run that holds its process's system/* metrics
_watching: RunLogger | None = None  # the logger whose run this process's system-metrics monitor writes to


class RunLogger(MLFlowLogger):
    def __init__(self, run: Run, flush_every_s: float = FLUSH_EVERY_S, **kwargs: Any):
        super().__init__(run_id=run.run_id, **kwargs)
        self.logged_epoch, self.flush_every_s = run.logged_epoch, flush_every_s
        self._flushed_at = time.monotonic()
        self.tracking_uri = kwargs["tracking_uri"]
        self._pending: list[tuple[dict[str, float], int]] = []
        self._failed = False
        self._unreachable = False  # the tracking server stopped answering (flush)
        self._monitor = None
        self.ending = False  # `end()` has been called: Lightning's finalize("success") ends the run only then
        self.member = False  # a population member: the population's checkpoint files are not this run's (log_model)
        self.resuming = run.run_id is not None  # an interrupted run continued: reopened at first use (experiment)

    @property
    def experiment(self):
        # Lightning's first access calls mlflow.set_tracking_uri, which also sets $MLFLOW_TRACKING_URI for the rest
        # of the process; logger.tracking_uri reads that variable, so a later run in the same process (a sweep
        # worker's next job, a test) would log into this run's store. Put it back.
        if self._initialized:
            return self._mlflow_client
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            client = super().experiment
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before
        if self.resuming and rank_zero_only.rank == 0:  # other ranks' client is Lightning's stand-in
            self.resuming = False
            # Running again: the store says so while it trains, and a finished run keeps no stale reglab.resumable
            # (the tag reglab.stopped_by stays: what interrupted it last).
            if client.get_run(self.run_id).data.tags.get(RESUMABLE_TAG):
                client.delete_tag(self.run_id, RESUMABLE_TAG)
            client.update_run(self.run_id, status="RUNNING")
        return client

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
            try:
                self.experiment.log_batch(self.run_id, metrics=batch[i:i + MAX_BATCH], tags=tags, synchronous=True)
            except Exception as e:
                if not unreachable(e):
                    raise
                # MLflow's client has retried with back-off (~4 min by default: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
                # MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2). Stop here: last.ckpt is not made current without its
                # history (reglab.checkpoint), so the run, still RUNNING in the store, is continued by the rerun.
                self._unreachable = True
                raise TrackingUnavailable(
                    f"logger.tracking_uri={self.tracking_uri}: the tracking server did not answer after MLflow's "
                    "retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); the run and its "
                    "last checkpoint are kept: rerun the same command when the server is back") from None

    @rank_zero_only
    def log_after_fit(self, metrics: dict[str, float], step: int) -> None:
        """Metrics of the weights fit ended with (train_eval/*), at `step`, the last epoch trained: a resumed run's
        history may already reach that epoch without them (killed between the fit's end and their write), so they
        are written unless the store has them at that step."""
        if step <= self.logged_epoch:
            key = next(iter(metrics))
            if any(m.step == step for m in self.experiment.get_metric_history(self.run_id, key)):
                return
        self._pending.append((metrics, step))

    def last_epoch(self) -> dict[str, float]:
        """The store's latest train/*, val/* and params/* values: what the fit's last epoch computed, for a fit
        resumed after it (only its test was left), which computes nothing. Empty on DDP ranks other than 0, whose
        experiment is Lightning's stand-in (they return no metrics to anyone)."""
        if rank_zero_only.rank > 0:
            return {}
        latest = self.experiment.get_run(self.run_id).data.metrics
        return {k: v for k, v in latest.items() if k.startswith(EPOCH_METRICS)}

    @rank_zero_only
    def fail(self, reason: str) -> None:
        """Tag the run with `failure_reason` (a study treats it as done: a rerun would fail the same way); it ends
        FAILED whatever status Lightning finalizes it with."""
        self.experiment.set_tag(self.run_id, "failure_reason", reason)
        self._failed = True

    @rank_zero_only
    def keep_resumable(self, reason: str) -> None:
        """The run stopped on a fault it can continue from (SIGTERM, a full disk): KILLED with tag
        reglab.resumable, which the same command continues (reglab/runs/lookup.py). After Lightning's own
        finalize("failed"). Best effort: the store itself may be what failed."""
        try:
            self.flush()
            self.experiment.set_tag(self.run_id, RESUMABLE_TAG, "true")
            self.experiment.set_tag(self.run_id, "reglab.stopped_by", reason[:500])
            self.experiment.set_terminated(self.run_id, status="KILLED")
        except Exception as e:  # a RUNNING run with its history is resumable too
            log.warning("could not mark run %s resumable (%s); the same command still continues it", self.run_id, e)

    @rank_zero_only
    def watch_system(self, resume: bool = False) -> None:
        """MLflow's SystemMetricsMonitor on this run: a thread sampling every 10 s (or
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), stopped by `finalize`. One per process: psutil's CPU percentage is
        the time since its previous call by anyone, so a second monitor would split it; the other members of a
        population get the tag reglab.system_metrics_run naming the run that holds it. `resume`: continue the run's
        system/* steps."""
        global _watching
        if _watching is not None:
            self.experiment.set_tag(self.run_id, SYSTEM_METRICS_RUN_TAG, _watching.run_id)
            return
        try:
            import psutil  # noqa: F401  (mlflow's CPU monitor)
        except ImportError:
            raise ConfigError("logger.system_metrics=true needs psutil (pip install psutil); or set "
                              "logger.system_metrics=false") from None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.tracking_uri)
        self._monitor.start()
        self.experiment.set_tag(self.run_id, SYSTEM_METRICS_RUN_TAG, self.run_id)
        _watching = self

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # Lightning hands every logger the checkpoints the trainer writes: in a population that is the whole
        # population's, not a member's; its own files come through member_checkpoints.
        if not self.member:
            super().after_save_checkpoint(checkpoint_callback)

    def member_checkpoints(self, files) -> None:
        """A population member's own checkpoint files (population/train.py: a ModelCheckpoint naming them), uploaded
        at the run's end as a solo run's are (log_model)."""
        super().after_save_checkpoint(files)

    @rank_zero_only
    def end(self, status: str = "success") -> None:
        """End the run: everything it logs is in (or it failed). Uploads its checkpoints (log_model) as Lightning's
        MLFlowLogger does."""
        self.ending = True
        self.finalize(status)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        global _watching
        if self._unreachable:  # another 4 minutes of retries would only end the same way; the run stays RUNNING
            return
        self.flush()
        if status == "success" and not self.ending:  # Lightning's end of a fit or test pass: more follows
            return
        if self._monitor is not None:  # before the run ends, so the monitor's last samples still reach it
            if getattr(self._monitor, "_logging_step", 1) == 0:
                # A run shorter than one sampling interval: MLflow's loop stops before its first write; one sample
                # at the end, so system/* is never missing from a run that asked for it (seen in CI).
                try:
                    self._monitor.collect_metrics()
                    self._monitor.publish_metrics(self._monitor.aggregate_metrics())
                except Exception as e:
                    log.warning("no system metrics for run %s (%s)", self.run_id, e)
            self._monitor.finish()
            self._monitor, _watching = None, None
        super().finalize("failed" if self._failed else status)

    @rank_zero_only
    def log_header(self, cfg: DictConfig, model_params: int, data) -> None:
        """The config (flattened) and two measured values (the model's parameters, the label noise that `data`, the
        run's set-up datamodule, drew) as MLflow params, config.yaml, the data's splits as dataset inputs, and the two
        values as step-0 metrics. Those go in epoch 0's batch: written alone, their batch's reglab.logged_epoch tag
        would claim epoch 0 before it was trained, and a kill after its checkpoint would resume without ever logging
        it."""
        from reglab.runs import datasets

        label_noise_realized = data.label_noise_realized
        measured = {"model.params": model_params, "data.label_noise_realized": label_noise_realized}
        self.log_hyperparams({**store.flatten(OmegaConf.to_container(cfg, resolve=True)), **measured})
        self.experiment.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        for attempt in range(5):
            try:
                self.experiment.log_inputs(self.run_id, datasets=datasets.inputs(data))
                break
            except Exception as e:
                # Parallel jobs logging the same (name, digest) race to create the experiment's one copy of it;
                # the loser's transaction is rolled back whole, and a retry finds the dataset there (seen with
                # two sweep workers: "UNIQUE constraint failed: datasets...").
                if "UNIQUE constraint failed" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
        self._pending.append(({"model/params": float(model_params), "data/label_noise_realized": label_noise_realized},
                              0))

    @rank_zero_only
    def log_after_end(self, metrics: dict[str, float]) -> None:
        """Metrics of what follows the test (early stopping's after-stop phase, step 0), written at once: step 0 is
        in every history, so the pending queue would drop them."""
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
    logger = RunLogger(
        run,
        experiment_name=cfg.logger.experiment,
        run_name=run.name,
        tracking_uri=uri,
        artifact_location=artifacts,
        # role: solo, or child for a study's child (run.tags); the search box finds `tags.role = 'solo'`.
        tags={"fingerprint": run.identity, "role": "solo", **store.code_tags(), **(cfg.logger.get("tags") or {}),
              **run.tags},
        log_model=bool(cfg.logger.get("log_model", False)),
    )
    if cfg.logger.get("system_metrics"):
        logger.watch_system(resume=run.run_id is not None)
    return logger
