"""Preemption: SIGTERM, then SIGKILL after a grace period (SLURM's KillWait, 30 s by default; spot instances), as
schedulers stop jobs; and Ctrl-C (SIGINT), handled alike, so a user's interrupted run continues too (a second Ctrl-C
stops training at the next batch, the run resumable from its last checkpoint; a third is Python's KeyboardInterrupt).
Every process of a run or sweep keeps what it trained and leaves within the grace period:

- `install()` (every training process and the launching one, from reglab.cli) makes SIGTERM set a flag instead of
  ending the process; in a sweep's launching process it also forwards the signal to the worker processes, which
  `kill <pid>` of the launcher alone would not reach.
- While a model trains, reglab's `Checkpoint` (reglab/checkpoint.py) takes SIGTERM back from Lightning (whose own
  handler stops at the next batch, mid-epoch: not a point a run can continue from exactly) and, after the flag is
  set, finishes the current epoch when it ends within `stop_within_s`, writes `last.ckpt` at once (the epoch's
  history first) and raises `Preempted`; an epoch too long for the grace period stops at the next batch, keeping the
  `last.ckpt` of at most `last_every_s` earlier.
- Outside a fit the job stops at the next point where stopping loses nothing (before its lookup, its fit, its test
  pass); a job that had not started when the signal came does not start. The run is marked KILLED with tag
  `reglab.resumable` (reglab/runs/lookup.py continues it). The command exits with status 128 + the signal (143 for
  SIGTERM, 130 for Ctrl-C) after one line; the same command (or a SLURM requeue of it) continues every unfinished run,
  each epoch logged once.
- In a job of submitit (hydra/launcher=slurm), its time-limit warning (SIGUSR2, `submitit_signal`) is a stop request
  too; once the runs are kept, `hand_back` gives the signal to submitit's handler, which requeues the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


EXIT_PREEMPTED = 128 + signal.SIGTERM  # the exit status after SIGTERM; exit_status() for this process's
_requested_at: float | None = None  # time.monotonic() of the first SIGTERM or SIGINT in this process
_signal: int = signal.SIGTERM  # the one that came first
_interrupts = 0  # Ctrl-Cs so far
_previous: dict[int, object] = {}  # the handlers install() replaced, which reset() puts back
_launcher_pid: int | None = None  # the process that forwards SIGTERM to its workers
_fallback_set = False  # an alarm of SUBMITIT_FALLBACK_S is pending


class Preempted(BaseException):
    """The run stopped because the process was asked to (SIGTERM); its checkpoint and history are kept. A
    BaseException, as KeyboardInterrupt: a request to stop, not an error, that passes through libraries that wrap
    every Exception (Lightning's callbacks, MLflow's store)."""


def requested() -> bool:
    return _requested_at is not None


def name() -> str:
    """What asked this process to stop, for messages."""
    if _signal == signal.SIGINT:
        return "Ctrl-C"
    if _signal == submitit_signal():
        return f"{signal.Signals(_signal).name} (submitit: the job's time limit or preemption)"
    return signal.Signals(_signal).name


def submitit_signal() -> int | None:
    """In a job of submitit (hydra/launcher=slurm): the signal its scheduler sends before the time limit or a
    preemption (SUBMITIT_PREEMPT_SIGNAL, USR2 by default; SLURM's --signal, signal_delay_s ahead), on which submitit
    requeues the job. None elsewhere."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"), None)


def hand_back() -> None:
    """After a stop by submitit's signal has kept every run resumable (last.ckpt written, runs KILLED with
    reglab.resumable): submitit's own handler, which requeues the job (up to max_num_timeout times) and exits the
    process; the requeued job continues the runs. Before reglab took the signal, submitit's handler ran mid-step and
    exited at once: Lightning marked the run FAILED and every requeued attempt started over from epoch 0."""
    sig = submitit_signal()
    previous = _previous.get(sig) if sig is not None and requested() and _signal == sig else None
    if not callable(previous):
        return
    _cancel_fallback()  # the stop came in time
    try:
        previous(sig, None)  # exits the process (SystemExit) once the job is requeued
    except Exception as e:  # not requeued (max_num_timeout reached, scontrol failed): the job ends as stopped
        import sys

        print(f"submitit did not requeue this job ({type(e).__name__}: {e}); rerun the same command to continue "
              "its runs", file=sys.stderr, flush=True)


# Seconds after submitit's warning at which its handler runs anyway if the job has not reached a point where it
# stops (a long data set-up, a tracking server retrying): the job is requeued, its runs left as a kill -9 leaves
# them (resumed from last.ckpt when their history reaches it). Inside SLURM's signal_delay_s (120 s in
# conf/hydra/launcher/slurm.yaml); a fit stops well before it (callbacks.checkpoint.stop_within_s, 20 s).
SUBMITIT_FALLBACK_S = 60


def _submitit_fallback(signum, frame) -> None:
    previous = _previous.get(submitit_signal() or -1)
    if callable(previous):
        previous(submitit_signal(), frame)


def _cancel_fallback() -> None:
    global _fallback_set
    if _fallback_set:
        signal.alarm(0)
        _fallback_set = False


def exit_status() -> int:
    return 128 + _signal


def at_once() -> bool:
    """A second Ctrl-C: training stops at the next batch (reglab.checkpoint), not at the epoch's end."""
    return _interrupts >= 2


def seconds_since() -> float:
    return 0.0 if _requested_at is None else time.monotonic() - _requested_at


def _signal_workers(sig: int) -> None:
    # Only the sweep's job processes (joblib's loky workers): a DataLoader worker ends on SIGTERM, and its training
    # process with it.
    try:
        import psutil

        children = [c for c in psutil.Process().children() if "loky" in " ".join(c.cmdline())]
    except Exception:  # psutil missing or a child gone: a signal to the process group still reaches them
        return
    for child in children:
        try:
            child.send_signal(sig)
        except Exception:
            pass


def _flush_and_exit(status: int) -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def exit_fast() -> None:
    """In a sweep worker whose job was preempted: when the launcher lets it go, end the process without Python's
    finalization of torch, Lightning and MLflow (~20 s of a loaded core per worker, measured: most of the grace
    period). Its job has stored everything it keeps (checkpoint, MLflow writes are synchronous). Not in the launching
    process itself (Hydra's basic launcher runs the jobs there): it exits with the sweep's status (exit_now)."""
    import atexit

    if os.getpid() == _launcher_pid:
        return

    atexit.register(_flush_and_exit, 0)  # last registered, first run


def exit_now(status: int) -> None:
    """The launching process after its jobs: exit handlers (joblib's lets its workers go and waits for them), then
    exit without the slow finalization of the interpreter (seconds on a loaded machine)."""
    import atexit
    import sys

    if "joblib.externals.loky.process_executor" in sys.modules:  # what threading's shutdown would run first
        with contextlib.suppress(Exception):
            sys.modules["joblib.externals.loky.process_executor"]._python_exit()
    atexit._run_exitfuncs()
    _flush_and_exit(status)


def handler(signum, frame) -> None:
    # Only a flag: raising here would cut through whatever runs (an SQLite transaction of the MLflow store left
    # open made the next write fail with "database is locked", seen). Training, lookups and the test pass check it
    # at points where stopping loses nothing; a second Ctrl-C only brings the stop forward to the next batch (raised
    # from here, mid-write, it left epochs in the store past the history's tag: logged twice on resume, seen). A
    # third is the user's "now": Python's KeyboardInterrupt, the run left as a kill -9 leaves it.
    global _requested_at, _signal, _interrupts, _fallback_set
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 2:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
    if _requested_at is None:
        _requested_at, _signal = time.monotonic(), signum
        if signum == submitit_signal() and callable(_previous.get(signum)):
            signal.signal(signal.SIGALRM, _submitit_fallback)
            signal.alarm(SUBMITIT_FALLBACK_S)
            _fallback_set = True
        if os.getpid() == _launcher_pid:
            if signum == signal.SIGINT:  # os.write: a print here could re-enter a print the signal interrupted
                os.write(2, b"\nCtrl-C: every run finishes its epoch (or stops within callbacks.checkpoint."
                            b"stop_within_s), writes last.ckpt and stays resumable; Ctrl-C again stops at the next "
                            b"batch\n")
            _signal_workers(signal.SIGTERM)


def install(launcher: bool = False, sigint: bool = True) -> None:
    """SIGTERM (and, with `sigint`, SIGINT) set the flag in this process (idempotent; only from the main thread, as
    Python requires). In the launching process of a sweep it is also forwarded to the job processes. `sigint=False`:
    reglab.checkpoint taking SIGTERM back from Lightning in a fit, where a Python caller's Ctrl-C stays its own (the
    CLI installs both for its jobs)."""
    global _launcher_pid
    if launcher:
        _launcher_pid = os.getpid()
    signals = [signal.SIGTERM, signal.SIGINT] if sigint else [signal.SIGTERM]
    if sigint and submitit_signal() is not None:  # hand_back gives it to submitit's handler after the stop
        signals.append(submitit_signal())
    try:
        for sig in signals:
            previous = signal.signal(sig, handler)
            if previous is not handler:
                _previous.setdefault(sig, previous)
    except ValueError:  # not the main thread: the caller's own handling stays
        pass


def reset() -> None:
    """Forget a SIGTERM or Ctrl-C and put back the handlers install() replaced: for a process that goes on after a
    preempted run (tests that train in-process)."""
    global _requested_at, _signal, _interrupts
    _requested_at, _signal, _interrupts = None, signal.SIGTERM, 0
    _cancel_fallback()
    for sig, previous in _previous.items():
        with contextlib.suppress(ValueError, TypeError):  # not the main thread; a handler set from C (None)
            signal.signal(sig, previous)
    _previous.clear()


def adopt() -> None:
    """Another rank of this DDP run was asked to stop: this process stops with it, as if the signal had come here."""
    global _requested_at
    if _requested_at is None:
        _requested_at = time.monotonic()


def check(what: str) -> None:
    """Raise Preempted before starting `what` after SIGTERM or Ctrl-C."""
    if requested():
        raise Preempted(f"{what}: not started, the process was asked to stop ({name()}); rerun the same command to "
                        "run it")


def resumable(exc: BaseException) -> bool:
    """A fault the same command continues from: SIGTERM or Ctrl-C, or a folder that filled up or went read-only mid-run
    (the checkpoint written before it stays valid: reglab.checkpoint.AtomicCheckpointIO)."""
    from reglab.cli import STORAGE_ERRNOS

    return isinstance(exc, Preempted) or isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


@contextlib.contextmanager
def keeping(loggers):
    """A fit or test pass inside this block that SIGTERM, Ctrl-C or a full disk stops leaves its runs (reglab RunLoggers)
    KILLED with tag reglab.resumable, which the same command continues."""
    try:
        yield
    except (Preempted, OSError) as e:
        if resumable(e):
            for logger in loggers:
                if logger is not None:
                    logger.keep_resumable(str(e))
        raise
