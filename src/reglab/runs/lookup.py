"""Done, resume or new: what a run's configuration already has in the store, decided in one place.

`open_run(cfg)` looks the configuration up by its identity (reglab/runs/identity.py) among
- the children of its study's parent run, when `cfg.study` is set (reglab/runs/study.py opens the parent), or
- the unfinished single runs (no parent) of its experiment otherwise,
and returns a `Run`:
- `done`: a study child that FINISHED before, or failed deterministically (tag `failure_reason`): nothing to do.
  A FINISHED single run is never looked at: the same command again is a new run.
- `resume`: an unfinished run (killed, crashed, machine restarted) whose history reaches the epoch of `last.ckpt`
  in its checkpoint folder: the same MLflow run continues from that checkpoint, and the logger drops the points the
  history already holds (reglab/runs/logger.py), so every epoch is logged once.
- `new`: nothing usable. An unfinished run whose history stops before its checkpoint (killed between the two
  writes) or that has no checkpoint would leave a gap or repeat epochs: it is discarded (a study child deleted, so
  the parent holds each configuration once; a single run marked KILLED with tag `reglab.superseded_by_rerun`, never
  deleted) together with its checkpoint folder, and the configuration starts over.

A run stopped by a fault it may continue from (SIGTERM from a scheduler, a full disk: reglab/preemption.py) ends
KILLED with tag `reglab.resumable`; single runs are looked up among RUNNING and resumable runs. `resume=restart`
starts the configuration afresh whatever it has; a checkpoint that cannot be read (truncated, zero bytes) stops
with one line naming it, never silently restarts.

How far a history reaches is the tag `reglab.logged_epoch`, which the logger writes in the same request as the
epoch's metrics; the store commits the metrics first and the tag after them, so the tag never claims an epoch the
store lacks (a kill between the two only makes a resumable run start over).
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig

from reglab.errors import ConfigError
from reglab.runs import store
from reglab.runs.identity import identity

log = logging.getLogger(__name__)
LOGGED_EPOCH_TAG = "reglab.logged_epoch"  # last epoch whose metrics are all in the store
RESUMABLE_TAG = "reglab.resumable"  # on a KILLED run that the same command continues (preemption, full disk)


@dataclass
class Run:
    identity: str
    name: str
    ckpt_dir: Path
    tracked: bool = False  # logger=mlflow
    run_id: str | None = None  # the MLflow run to continue or that is done; None: a new one
    ckpt_path: str | None = None  # resume from this checkpoint
    logged_epoch: int = -1  # the run's history holds every epoch <= this
    metrics: dict[str, float] | None = None  # final metrics of a done run
    tags: dict[str, str] = field(default_factory=dict)  # parent/child tags of a study child
    in_study: bool = False
    stale: list[str] = field(default_factory=list)  # run ids of attempts that will not continue
    # The unfinished attempts the store holds, newest first, as (run id, reglab.logged_epoch): what `resume_point`
    # chooses from.
    attempts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.metrics is not None


def run_name(cfg: DictConfig) -> str:
    """`run_name`, else <model>-w<width>-s<seed>: a single run's MLflow name and every run's checkpoint folder (a
    study child's MLflow name is its swept values: study.child_name)."""
    if cfg.get("run_name"):
        return cfg.run_name
    model = cfg.model._target_.rsplit(".", 1)[-1].lower()
    return f"{model}-w{cfg.model.get('width', 'x')}-s{cfg.seed}"


def checkpoint_epoch(path: Path) -> int:
    """The last epoch the checkpoint at `path` has trained, which the run's history must reach to continue from it.
    Lightning's "epoch" is that epoch in a checkpoint written at an epoch's end, but one more (the epochs done) in
    one written when training ends (reglab.checkpoint.Checkpoint.on_train_end), whose fit loop has no epoch under
    way (as many started as completed; at an epoch's end or its validation's, that epoch is started, not completed)."""
    # A population's members all ask about one shared checkpoint (hundreds of MB for wide ResNets): read it once
    # per version of the file.
    return _epoch(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _epoch(path: str, mtime_ns: int) -> int:
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        epoch = int(ckpt["epoch"])
        progress = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress", {}).get("total")
        ended = progress is not None and progress["started"] == progress["completed"] == epoch > 0
        return epoch - 1 if ended else epoch
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: the checkpoint this run would resume from cannot be read ({reason[:120]}); "
                          "rerun with resume=restart to train this configuration afresh (its unfinished MLflow run "
                          "is discarded), or put back a good copy of the file") from None


def find_run(cfg: DictConfig, last: Path | None = None, reached: int | None = None) -> Run:
    """The lookup alone, nothing changed: `Run.stale` lists the attempts `discard` will remove. `last` is the
    checkpoint a resume would load (default: last.ckpt in the run's own folder; a population's is shared);
    `reached`, the epoch the history must reach to continue from it (default: the checkpoint's; a population member
    that stopped early logs nothing after its stop epoch)."""
    return resume_point(cfg, look_up(cfg), last, reached)


def look_up(cfg: DictConfig) -> Run:
    """What the store holds of this configuration: a done run (`Run.done`), or its unfinished attempts
    (`Run.attempts`), which `resume_point` chooses from once the checkpoint to resume is known (a population knows
    its checkpoint only after it has looked up every member)."""
    ident, name = identity(cfg), run_name(cfg)
    run = Run(ident, name, Path(cfg.paths.checkpoints) / f"{name}-{ident[:12]}")
    if cfg.logger.get("backend") != "mlflow":
        if cfg.get("study"):
            store.experiment(cfg)  # raises: a study's children and report live in MLflow
        return run
    from reglab.runs import study

    run.tracked, run.in_study = True, bool(cfg.get("study"))
    client, exp_id, uri = store.experiment(cfg)
    if run.in_study:
        parent = study.parent_id(cfg)
        swept = study.swept_values(cfg, study.swept_keys(uri, parent))
        run.tags = {**swept, **study.child_tags(parent, cfg.study)}
        if swept and not cfg.get("run_name"):
            run.name = study.child_name(swept)
        found = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.fingerprint = "
                                   f"'{ident}'", order_by=["attributes.start_time DESC"])
        done = [r for r in found if r.info.status == "FINISHED" or "failure_reason" in r.data.tags]
        if done:
            run.run_id, run.metrics = done[0].info.run_id, dict(done[0].data.metrics)
            return run
    else:
        found = [r for r in client.search_runs([exp_id], f"tags.fingerprint = '{ident}' and attributes.status != "
                                               "'FINISHED'", order_by=["attributes.start_time DESC"])
                 if "mlflow.parentRunId" not in r.data.tags and (
                     r.info.status == "RUNNING" or r.data.tags.get(RESUMABLE_TAG) == "true")]
    run.attempts = [(r.info.run_id, int(r.data.tags.get(LOGGED_EPOCH_TAG, -1))) for r in found]
    return run


def resume_point(cfg: DictConfig, run: Run, last: Path | None = None, reached: int | None = None) -> Run:
    """`run` (from look_up) with what continues decided: the newest attempt, from `last`, if its history reaches
    `reached` (default: the checkpoint's epoch); every other attempt is stale. `last` and `reached` as find_run's."""
    if run.done:
        return run
    run = replace(run, run_id=None, ckpt_path=None, logged_epoch=-1)
    attempts = list(run.attempts)
    last = last or run.ckpt_dir / "last.ckpt"
    if attempts and cfg.get("resume", "auto") != "restart":
        run_id, logged = attempts[0]
        if last.exists() and logged >= (checkpoint_epoch(last) if reached is None else reached):
            run.run_id, run.ckpt_path, run.logged_epoch = run_id, str(last), logged
            attempts = attempts[1:]  # only one attempt per configuration continues
    run.stale = [run_id for run_id, _ in attempts]
    return run


def discard(cfg: DictConfig, run: Run, restart: bool = False) -> None:
    """Remove `run.stale` (and, with `restart`, the attempt `run` would have continued) from the store: a study
    child is deleted, so the parent holds each configuration once; a single run is marked KILLED with tag
    reglab.superseded_by_rerun, never deleted. Without a resume, the run's checkpoint folder goes too. Not on a DDP
    rank other than 0: Lightning starts those by running the command again inside rank 0's fit, when rank 0's run
    exists (RUNNING, no checkpoint yet): they would supersede it and delete its folder."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank > 0:
        run.stale = []
        return
    if restart and run.ckpt_path is not None:
        run.stale.append(run.run_id)
        run.run_id, run.ckpt_path, run.logged_epoch = None, None, -1
    if run.stale:
        client, _, _ = store.experiment(cfg)
        for run_id in run.stale:
            if run.in_study:
                client.delete_run(run_id)
            else:
                client.set_tag(run_id, "reglab.superseded_by_rerun", "true")
                client.set_terminated(run_id, status="KILLED")
        run.stale = []
    if run.ckpt_path is None and not run.done and run.ckpt_dir.exists():  # an attempt the store does not continue
        shutil.rmtree(run.ckpt_dir)


def open_run(cfg: DictConfig) -> Run:
    run = find_run(cfg)
    if run.done:
        log.info("%s already done (run %s), skipped", run.name, run.run_id)
    elif run.ckpt_path:
        log.info("resuming run %s (%s) from %s", run.run_id, run.name, run.ckpt_path)
    discard(cfg, run)
    return run
