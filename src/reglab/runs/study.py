"""A study in MLflow: one parent run, one child run per configuration, the report at the end.

A config with `study: <name>` (set by a conf/exp/ preset) is a study. Its parent is keyed by the study name and
`identity(cfg, without=<swept keys>)` (tag `reglab.study_key`), so rerunning the same command, or adding values to
an axis, reuses it. Two kinds of study share this API:
- sweeps (Hydra multiruns of reglab.train.run): `StudyCallback.on_multirun_start` opens the parent in the launching
  process before any job starts (so parallel jobs never race to create it) and hands its id to the jobs in
  $REGLAB_STUDY_PARENT; each job is a child found by `reglab.runs.lookup.open_run`; `on_multirun_end` writes the
  report (`report: {_target_: reglab.studies.<module>.report}`) and finishes the parent;
- runners that compute their study in one process (closed forms, many tiny fits: `runner:` a study module's
  `run`): `StudyRecorder` opens the same parent and records each result as a child run.
Reports and tables go to `<paths.results>/<study>/` and to the parent's artifacts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from reglab.errors import ConfigError
from reglab.runs import store
from reglab.runs.identity import identity, without_hydra

log = logging.getLogger(__name__)
ENV_PARENT = "REGLAB_STUDY_PARENT"


def child_tags(parent_run_id: str, study: str) -> dict[str, str]:
    return {"mlflow.parentRunId": parent_run_id, "study": study, "reglab.role": "child", "role": "child"}


@functools.lru_cache(maxsize=64)
def swept_keys(tracking_uri: str, parent_run_id: str) -> tuple[str, ...]:
    """The study's swept keys, sorted: its parent's `sweep.<key>` tags (open_parent). Read once per process and
    parent: a population looks up each of its members twice."""
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri).get_run(parent_run_id).data.tags
    return tuple(sorted(k.removeprefix("sweep.") for k in tags if k.startswith("sweep.")))


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple, dict, ListConfig, DictConfig)):  # a group's entries: regularization=[l2,dropout]
        return "+".join(map(str, value)) or "none"
    return str(value)


def swept_values(cfg: DictConfig, keys: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{key: value as text} of a child's swept keys: its run name and its tags (`tags.seed = '3'` in the search box).
    A swept config group (regularization=l2_dropout_bn, stopping=retrain) is named by Hydra's choice when Hydra runs
    the job, else by its entries."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, ListConfig)) and choices.get(key) is not None:  # none for a list of options
            value = choices[key]
        out[key] = _text(value)
    return out


def child_name(values: dict[str, str]) -> str:
    """`label_noise=0.1 width=48 seed=3`: the swept values, each key without its group (model.width -> width)."""
    return " ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in values.items())


def sweep_axes(hydra_cfg: DictConfig) -> dict[str, str]:
    """{key: values} of every swept key: the preset's hydra.sweeper.params and comma/range overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = {str(k): str(v) for k, v in (hydra_cfg.sweeper.get("params") or {}).items()}
    for o in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        # A plain value of a preset's grid axis (model.width=4) replaces the axis, as the basic sweeper takes it; an
        # Optuna search space (interval, choice, ...) is searched whatever value the command line gives.
        if o.is_sweep_override() or o.key_or_group in axes and not any(c in axes[o.key_or_group] for c in "()"):
            axes[o.key_or_group] = o.input_line.split("=", 1)[1]
    return axes


def command(hydra_cfg: DictConfig) -> str:
    """The command line that ran this sweep (the parent's tag reglab.command: what reruns the study)."""
    import shlex

    return " ".join(["python", "scripts/train.py", *map(shlex.quote, hydra_cfg.overrides.task)])


def _union(held: str | None, values: str) -> str:
    """A parent's sweep.<key> after another sweep of it: the values of both when both are plain lists (the report
    covers every child the parent holds), else the latest."""
    if not held or any(c in held + values for c in "()[]{}"):
        return values
    seen = held.split(",")
    return ",".join(seen + [v for v in values.split(",") if v not in seen])


def open_parent(cfg: DictConfig, axes: dict[str, str] | None = None, command: str | None = None) -> str:
    """Run id of the study's parent, created when new (tags study=<name>, reglab.role=parent, the grid as
    sweep.<key> (the union over the sweeps into it), the report's target, the latest sweep's command line as
    reglab.command); its config.yaml is the study's config."""
    axes = axes or {}
    client, exp_id, _ = store.experiment(cfg)
    key = identity(cfg, without=list(axes))  # the study name is matched by its own tag
    found = client.search_runs([exp_id], f"tags.study = '{cfg.study}' and tags.`reglab.study_key` = '{key}' and "
                                         "tags.`reglab.role` = 'parent'", max_results=1)
    held: dict[str, str] = {}
    if found:
        parent = found[0].info.run_id
        held = found[0].data.tags
    else:
        parent = client.create_run(exp_id, run_name=cfg.study, tags={
            "study": cfg.study, "reglab.study_key": key, "reglab.role": "parent", "role": "parent",
            **store.code_tags()}).info.run_id
    for k, values in axes.items():
        client.set_tag(parent, f"sweep.{k}", _union(held.get(f"sweep.{k}"), values))
    if command:
        client.set_tag(parent, "reglab.command", command[:5000])
    if cfg.get("report"):
        client.set_tag(parent, "reglab.report", cfg.report._target_)
    client.log_text(parent, OmegaConf.to_yaml(without_hydra(cfg), resolve=True), "config.yaml")
    client.update_run(parent, status="RUNNING")
    return parent


def drop_empty_parent(cfg: DictConfig) -> None:
    """The parent this multirun opened, deleted if no child run is in it: a sweep refused before its jobs ran leaves
    nothing behind (a parent with children, from an earlier sweep of the same study, stays)."""
    parent = os.environ.pop(ENV_PARENT, None)
    if not parent:
        return
    client, exp_id, _ = store.experiment(cfg)
    if not client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1):
        client.delete_run(parent)


def parent_id(cfg: DictConfig) -> str:
    """The parent opened by StudyCallback for this sweep, or (a direct reglab.train.run call) one keyed by the
    preset's axes."""
    parent = os.environ.get(ENV_PARENT)
    if parent:
        return parent
    from hydra.core.hydra_config import HydraConfig

    return open_parent(cfg, sweep_axes(HydraConfig.get()) if HydraConfig.initialized() else {})


def latest_parent(client, exp_id: str | list[str], study: str, cfg: DictConfig | None = None):
    """The study's parent run: the newest one of `cfg`'s configuration (its reglab.study_key, computed without that
    parent's swept keys, as open_parent keyed it) where there is one, else the newest (with a line saying so). A
    rerun of an older sweep keeps its parent's start time, so the newest alone may be another configuration's
    (a smoke run with trainer.max_epochs=2)."""
    runs = client.search_runs([exp_id] if isinstance(exp_id, str) else exp_id,
                              f"tags.study = '{study}' and tags.`reglab.role` = 'parent'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise ConfigError(f"study={study!r}: no parent run in this MLflow store (run the sweep first)")
    if cfg is None or len(runs) == 1:
        return runs[0]
    for run in runs:
        swept = [k.removeprefix("sweep.") for k in run.data.tags if k.startswith("sweep.")]
        if run.data.tags.get("reglab.study_key") == identity(cfg, without=swept):
            return run
    log.warning("study=%s: none of its %d parent runs has this command's configuration; reporting the newest (%s); "
                "pass the overrides its sweep ran with to choose another", study, len(runs), runs[0].info.run_id)
    return runs[0]


def write_report(cfg: DictConfig, parent_run_id: str | None = None) -> Path:
    """The study's report (the parent's `reglab.report` target, else cfg.report) for its parent run; files go to
    <paths.results>/<study>/ (which then holds this report alone) and to the parent run's artifacts."""
    from hydra.utils import get_method

    from reglab.config import check_target

    client, exp_id, _ = store.experiment(cfg)
    parent = client.get_run(parent_run_id) if parent_run_id else latest_parent(client, exp_id, cfg.study, cfg)
    target = parent.data.tags.get("reglab.report") or (cfg.report._target_ if cfg.get("report") else None)
    if not target:
        raise ConfigError(f"study={cfg.study!r} names no report (report: {{_target_: reglab.studies.<module>."
                          "report}})")
    check_target("report._target_", target)  # the tag comes from a store that may have been shared
    out = Path(cfg.paths.results) / cfg.study
    out.mkdir(parents=True, exist_ok=True)
    before = snapshot(out)
    get_method(target)(client, parent, out)
    drop_unwritten(before)
    client.log_artifacts(parent.info.run_id, str(out))
    return out


def snapshot(folder: Path) -> dict[Path, int]:
    """The files under a results folder, with their modification times (ns)."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def drop_unwritten(before: dict[Path, int]) -> None:
    """Remove the files of `before` not written since: what an earlier report of another configuration of the study
    left (e.g. polynomial.data=bishop's tables) is not this parent's, so the folder and the parent's artifacts hold
    this report alone."""
    for p, mtime in before.items():
        if p.is_file() and p.stat().st_mtime_ns == mtime:
            p.unlink()


class StudyCallback(Callback):
    """Hydra callback (conf/train.yaml): opens a study's parent before its jobs, reports after them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from reglab.cli import stop
        from reglab.launcher import refuse_ddp_in_multirun

        try:
            refuse_ddp_in_multirun(config)
        except ConfigError as e:
            stop(e)
        if config.get("study"):
            os.environ[ENV_PARENT] = open_parent(config, sweep_axes(config.hydra), command(config.hydra))
        from reglab import progress

        progress.start(config)  # the sweep's live view, or a line per finished member (from its jobs' events)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("study") and config.logger.get("backend") == "mlflow":  # one configuration of a study
            os.environ[ENV_PARENT] = open_parent(config, sweep_axes(config.hydra), command(config.hydra))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(ENV_PARENT, None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from reglab import preemption, progress

        progress.stop()  # the live view ends before the report writes
        parent = os.environ.pop(ENV_PARENT, None)
        if not parent or preemption.requested():  # preempted: the parent stays RUNNING, the rerun reports
            progress.finish(sweep_dir=config.hydra.sweep.dir)
            return
        client, _, _ = store.experiment(config)
        try:
            out = write_report(config, parent)
            progress.finish(client.get_run(parent), out)  # counts, the study's headline, where the report is
        except Exception as e:
            # Hydra turns an exception raised in this callback into a warning, and the sweep would exit 0 without
            # its report: one line (a bug keeps its traceback) and a non-zero status instead. The runs are kept.
            from reglab import cli

            conf = next((Path(c.path.removeprefix("file://")) for c in config.hydra.runtime.config_sources
                         if c.provider == "main"), Path("conf"))
            line = cli.one_line(e, conf)
            if line is None:
                log.exception("the %s report failed", config.study)
            cli.fail(f"the {config.study} report: {line or type(e).__name__ + ' (a bug: its traceback is above)'}; "
                     f"the runs are kept, `python scripts/report.py study={config.study}` writes it again")
        finally:
            client.set_terminated(parent, "FINISHED")  # with its end time (update_run leaves none: no duration)


class StudyRecorder:
    """A runner study's parent and children (same keys and tags as a sweep's), and its results folder
    `<paths.results>/<study>/`. With logger=none only the folder is written."""

    def __init__(self, cfg: DictConfig, study: str):
        if study not in cfg:
            raise ConfigError(f"{study}: missing config node; run the preset with +exp={study}")
        self.study = study
        self.dir = Path(cfg.paths.results) / study
        self.dir.mkdir(parents=True, exist_ok=True)
        self._before = snapshot(self.dir)
        self.client = self.parent = None
        self._children: set[str] = set()
        backend = cfg.logger.get("backend", "none")
        if backend not in ("mlflow", "none"):
            raise ConfigError(f"logger.backend={backend!r} is not one of mlflow, none")
        if backend == "mlflow":
            cfg = OmegaConf.merge(cfg, {"study": study})
            self.client, self.experiment_id, _ = store.experiment(cfg)
            self.parent = open_parent(cfg)
            found = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent}'",
                                            max_results=5000)
            self._children = {r.data.tags.get("fingerprint") for r in found}

    def child(self, name: str, params: dict[str, Any], metrics: dict[str, float],
              curves: dict[str, list[tuple[int, float]]] | None = None) -> None:
        """One child run: params, final metrics, and optional per-step curves {name: [(step, value)]}. A child
        with the same params under this parent exists already (same study config and seed = same numbers):
        skipped."""
        if self.client is None:
            return
        key = identity(OmegaConf.create({k: str(v) for k, v in params.items()}))
        if key in self._children:
            return
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**child_tags(self.parent, self.study), "fingerprint": key})
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
        for k, points in (curves or {}).items():
            ms += [Metric(k, float(v), now, int(s)) for s, v in points if math.isfinite(v)]
        ps = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, max(len(ms), 1), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run.info.run_id, metrics=ms[i:i + 1000], params=ps if i == 0 else [])
        self.client.set_terminated(run.info.run_id)
        self._children.add(key)

    def table(self, df, name: str, floatfmt: str = ".4g") -> Path:
        from reglab.studies.output import write_table

        return write_table(df, self.dir / name, floatfmt)

    def figure(self, fig, name: str) -> Path:
        from reglab.studies.output import write_figure

        return write_figure(fig, self.dir / name)

    def finish(self, metrics: dict[str, float], failed: bool = False) -> None:
        drop_unwritten(self._before)
        if self.client is None:
            return
        for k, v in metrics.items():
            if math.isfinite(v):
                self.client.log_metric(self.parent, k, float(v))
        self.client.log_artifacts(self.parent, str(self.dir))
        self.client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")

    def run(self, body: Callable[["StudyRecorder"], dict[str, float]], threads: int) -> dict[str, float]:
        """body(self) -> metrics with torch on `threads` intra-op threads (tiny tensors: more threads only add
        synchronisation; on a shared 2-core machine they made small steps 10-40x slower, measured), restored
        afterwards; the parent run is finished (FAILED if body raises) and the wall time recorded."""
        import torch

        start, before = time.time(), torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            metrics = body(self)
        except BaseException:
            self.finish({}, failed=True)
            raise
        finally:
            torch.set_num_threads(before)
        metrics["study/seconds"] = time.time() - start
        self.finish(metrics)
        log.info("%s: results in %s (%.1f s)", self.study, self.dir, metrics["study/seconds"])
        return metrics
