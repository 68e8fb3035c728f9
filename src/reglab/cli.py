"""How scripts/ report a mistake the user can fix: one line `error: <key or file>: <what is wrong>; <the fix>` on
stderr, exit status 2, nothing written.

Hydra reports a composition error (an unknown group option, a misspelled key, a `+exp` that does not exist, an
override it cannot parse) over several lines with its config search path; `main` runs the @hydra.main function with
HYDRA_FULL_ERROR=1 so Hydra raises instead, and rewrites the exception as one line. Exceptions that are not user
errors are bugs and keep their traceback. `HYDRA_FULL_ERROR=1` set by the user also keeps Hydra's own report.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

from hydra.experimental.callback import Callback

from reglab.errors import ReglabError

EXIT_USER_ERROR = 2
# A folder the run writes to is full or read-only: the user's to fix, not a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
ERROR_FILE = "error.txt"
# Jobs of the multirun that just ended that failed with a user error: "job N (overrides): message".
FAILED_JOBS: list[str] = []


def quiet_libraries() -> None:
    """Process-wide settings of a training process, made by the CLI (never at import): Lightning's start-up
    chatter (accelerator lines, a cloud-logger advert) and a deprecation inside Lightning itself bury the lines a
    researcher needs. Idempotent."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


_EXIT_QUICKLY: list[bool] = []


def exit_quickly() -> None:
    """Skip the interpreter's last garbage collections at this process's exit: after torch, Lightning and MLflow are
    imported (~580k tracked objects) they took 1.7 s of every CLI process's exit here, the launcher's and each sweep
    worker's (0.25 s with gc.freeze first; measured 2026-12-04). Nothing is lost: a run's files are written and
    closed before it returns, and only unreachable reference cycles go uncollected (the process ends; the memory is
    the system's again). Registered once per process, so it runs before the exit handlers registered earlier."""
    if not _EXIT_QUICKLY:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _EXIT_QUICKLY.append(True)


def runner(cfg: Any) -> Callable[[Any], Any]:
    """The function `runner._target_` names (reglab.train.run, or a study module's run); allowlisted by
    reglab.config.validate before it is imported."""
    from hydra.utils import get_method

    from reglab.errors import ConfigError

    if cfg.get("population") and cfg.population.get("members"):  # a population job (reglab/population/sweeper.py)
        from reglab.population.train import run

        return run
    target = cfg.runner._target_
    try:
        return get_method(target)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"runner._target_={target!r}: {_first_lines(str(e))}") from None


def _options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _missing_config(exc: Exception, conf_dir: Path) -> str:
    missing = str(getattr(exc, "missing_cfg_file", "") or "")
    where = re.match(r"In '([^']+)'", str(exc))
    source = f" (named in conf/{where.group(1)}.yaml)" if where and where.group(1) != "train" else ""
    group, _, name = missing.rpartition("/")
    if not group:
        return f"conf/{missing}.yaml does not exist{source}"
    options = _options(conf_dir, group)
    choice = f"choose one of: {', '.join(options)}" if options else f"conf/{group}/ has no options yet"
    return f"{group}={name}: there is no conf/{group}/{name}.yaml{source}; {choice}"


def _unknown_key(exc: Exception, conf_dir: Path) -> str | None:
    key = re.match(r"Could not override '([^']+)'", str(exc))
    if key is None:
        return None
    options = _options(conf_dir, key.group(1)) if "." not in key.group(1) else []
    if options:  # a group train.yaml's defaults do not load (stopping: +exp=early_stopping's arms)
        return (f"{key.group(1)}: a config group the defaults do not include; add one of its options with "
                f"+{key.group(1)}=NAME ({', '.join(options)})")
    full_key = re.search(r"full_key: (\S+)", str(exc.__cause__ or "")) if exc.__cause__ else None
    missing = full_key.group(1) if full_key else key.group(1)
    return (f"{key.group(1)}: the config has no key '{missing}' (misspelled?); "
            f"`python scripts/train.py --cfg job` lists every key, +{key.group(1)}=VALUE adds a new one")


def _first_lines(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "provider=", "Set the environment variable HYDRA_FULL_ERROR")):
            continue
        if line:
            lines.append(line.rstrip("."))
    return "; ".join(lines)


def one_line(exc: BaseException, conf_dir: Path) -> str | None:
    """The user-facing line for `exc`, or None when it is not a user error (a bug: keep the traceback)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if isinstance(exc, ReglabError):
        return _first_lines(str(exc))
    if isinstance(exc, MissingConfigException):
        return _missing_config(exc, conf_dir)
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {_first_lines(str(exc))}"
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a value"
        return f"{key} is required (??? in the config); set it on the command line: {key}=VALUE"
    if isinstance(exc, HydraException):
        unknown = _unknown_key(exc, conf_dir)
        if unknown:
            return unknown
        cause = f"; {_first_lines(str(exc.__cause__))}" if isinstance(exc.__cause__, OmegaConfBaseException) else ""
        return _first_lines(str(exc)) + cause
    if isinstance(exc, OmegaConfBaseException):
        return _first_lines(str(exc))
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return (f"cannot write {exc.filename or 'the output'} ({exc.strerror}); free disk space or make the folder "
                f"writable, or write elsewhere with paths.root=...")
    return None


def _multirun_job() -> tuple[str, Path] | None:
    """(`job N (overrides)`, the job's output folder) inside a multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return f"job {hc.job.num} ({' '.join(hc.overrides.task)})", Path(hc.runtime.output_dir)


def metrics_line(metrics: dict[str, float]) -> None:
    """A single run's last line: its val/ and test/ metrics. A multirun job prints nothing: the launching process
    prints one line per member with its swept values (reglab/progress.py)."""
    if _multirun_job() is None:
        print(" ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))))


def script_error(exc: Exception, conf_dir: Path) -> int:
    """In a script other than train.py (report, check_determinism): a user's mistake (unknown option or key, bad
    value, unreachable server) as one line on stderr and the exit status to return; a bug is raised again."""
    line = one_line(exc, conf_dir)
    if line is None:
        raise exc
    print(f"error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR


def fail(line: str) -> NoReturn:
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def stop(error: ReglabError) -> NoReturn:
    """A user error inside a Hydra callback that must stop the sweep (DDP inside a multirun, no GPU slot left): Hydra
    turns an exception raised in a callback into a warning and goes on (hydra/_internal/callbacks.py), so exit with
    the one line instead; SystemExit is not an Exception."""
    fail(_first_lines(str(error)))


def run_job(task: Callable[[Any], Any], cfg: Any, conf_dir: Path) -> Any:
    """Inside a Hydra job. A user error ends a single run with one line. In a multirun it is printed with the
    job's number, written to <job folder>/error.txt and the job returns None: Hydra skips the study's report
    (on_multirun_end) when a job raises, so the job must not; `SweepFailures` collects the files and `main` exits
    non-zero after the rest of the sweep ran."""
    from reglab import preemption, progress

    preemption.install()  # SIGTERM: checkpoint and stop (reglab/preemption.py); a sweep worker keeps it
    progress.job_started(cfg)  # the launching process shows the sweep from these events (reglab/progress.py)
    try:
        with progress.job_output():  # on a terminal a sweep job's prints go to its folder: the live view is there
            preemption.check("this job")
            metrics = task(cfg)
        progress.job_ended(metrics)
        return metrics
    except preemption.Preempted as e:  # not a failure: the launching process says so once at the end
        progress.job_ended(None, str(e), stopped=True)
        job = _multirun_job()
        if job is None and _ddp_rank() > 0:
            # Rank 0 stopped at the same point (reglab.checkpoint) and reports it. Exit 0: Lightning's launcher
            # SIGKILLs rank 0 once another rank exits non-zero, maybe before rank 0 has marked its run resumable.
            sys.exit(0)
        print(f"preempted: {job[0] + ': ' if job else ''}{e}", file=sys.stderr, flush=True)
        preemption.hand_back()  # submitit's time-limit signal: it requeues the job, which continues the runs
        if job is None:
            sys.exit(preemption.exit_status())
        preemption.exit_fast()
        return None
    except Exception as e:
        line = one_line(e, conf_dir)
        progress.job_ended(None, line or f"{type(e).__name__} (a bug: its traceback follows)")
        if line is None:
            raise
        if _multirun_job() is None:
            fail(line)
        job_failed(line)
        return None


def _ddp_rank() -> int:
    """This process's DDP rank (0 outside DDP), as Lightning set it (as reglab.runs.lookup reads it)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def job_failed(line: str) -> None:
    """A sweep job's user-facing failure: printed with the job's number and written to <job folder>/error.txt,
    which `SweepFailures` collects, so the sweep exits non-zero once every job ran. Also for a job that ends
    normally with part of its work failed (a population whose member diverged)."""
    job = _multirun_job()
    label = job[0] if job else "job"
    print(f"error: {label}: {line}", file=sys.stderr, flush=True)
    if job is not None:
        job[1].mkdir(parents=True, exist_ok=True)
        (job[1] / ERROR_FILE).write_text(f"{label}: {line}\n")


class SweepFailures(Callback):
    """Hydra callback (conf/train.yaml): after a multirun, the jobs that failed with a user error, from their
    error.txt (written in the job's own process, so any launcher works), for `main` to report."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        started = getattr(self, "started", 0.0) - 1  # mtime resolution
        for path in sorted(Path(config.hydra.sweep.dir).glob(f"*/{ERROR_FILE}")):
            if path.stat().st_mtime >= started:  # not a file left by an earlier sweep into the same folder
                FAILED_JOBS.append(path.read_text().strip())


def _preempted() -> NoReturn:
    from reglab import preemption

    print(f"preempted ({preemption.name()}): every running job wrote its checkpoint and its MLflow run is KILLED with "
          "tag reglab.resumable; rerun the same command to continue", file=sys.stderr, flush=True)
    preemption.exit_now(preemption.exit_status())


def main(hydra_main: Callable[[], Any], conf_dir: Path) -> None:
    """Run a @hydra.main function (which reads sys.argv) with Hydra's errors turned into one line."""
    from reglab import preemption

    exit_quickly()
    keep_hydra_report = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors instead of printing them
    preemption.install(launcher=True)
    try:
        hydra_main()
    except Exception as e:
        if preemption.requested():  # e.g. a worker that had no job yet ended by the signal: nothing of it is lost
            _preempted()
        line = one_line(e, conf_dir)
        if line is None or keep_hydra_report:
            raise
        fail(line)
    if preemption.requested():
        _preempted()
    if FAILED_JOBS:
        fail(f"{len(FAILED_JOBS)} sweep job(s) failed, the others ran (each error is above; a study's report leaves "
             f"failed runs out). First: {FAILED_JOBS[0]}")
