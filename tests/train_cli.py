"""Run scripts/train.py as a user would: its own process, in a folder of the test's own, with no tracking URI from the
user's shell and no proxy for loopback servers.

A new interpreter spends 7-11 s on 2 cores importing Lightning, MLflow's SQL store and the rest before the CLI does
anything: a tiny training run took 16.9 s that way and 1.1-2.9 s forked (2-core Intel Xeon VM, 2026-12-03). So by
default the process is forked from a server (multiprocessing's forkserver) that has imported them once: the child runs
the script as `__main__` with the same argv, working folder, environment and output files, exits with the script's
status after the exit handlers a real interpreter runs, and can be signalled and killed like any process. What only a
new interpreter does (site hooks on PYTHONPATH, settings libraries read when they load: PYTHON*, OMP_*, MKL_*, ...,
which modules get imported at all, a resource limit or namespace set before exec) runs fresh: `fresh=True`, and
automatically with prefix, preexec_fn or such variables other than the server's. Other tests run whole trainings,
sweeps and reports in new interpreters (test_security's guarded run, the CIFAR preset end to end, test_bad_input's
early rows)."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
# Small enough that a run (5 s of imports included) takes seconds on 2 cores, big enough to learn something.
TINY = ["data=digits", "data.train_size=256", "data.batch_size=64", "model.width=32", "model.depth=1"]


def train_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra})
    return env


# What a CLI run imports beyond `reglab.train` (a study's report and plots, the population sweeper, MLflow's SQL store
# and its migrations, scikit-learn's bundled datasets, GitPython for the run's source tags): with them a forked tiny
# run starts at once. The forkserver ignores a name it cannot import; the child then imports it itself, only slower.
PRELOAD = ["reglab.train", "reglab.cli", "reglab.population.train", "reglab.population.sweeper",
           "reglab.studies.double_descent", "reglab.studies.regularization_grid", "reglab.studies.early_stopping",
           "hydra_plugins.reglab_population.population_sweeper", "hydra._internal.core_plugins.basic_launcher",
           "hydra._internal.core_plugins.basic_sweeper", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.db.utils", "alembic.command", "sklearn.datasets", "git"]
_server: dict[str, Any] = {}  # the forkserver's context and the start-up settings it was started with
_server_lock = threading.Lock()


def _startup_settings(env: dict[str, str]) -> dict[str, str]:
    """Variables read when the interpreter or a library starts (OpenMP sizes its thread pool when torch loads)."""
    return {k: v for k, v in env.items()
            if k.startswith(("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GLIBC_", "MALLOC_", "LD_"))}


def _forkable(env: dict[str, str]) -> bool:
    with _server_lock:  # test_bad_input calls from threads
        if not _server:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _server.update(ctx=ctx, startup=_startup_settings(dict(os.environ)))
    return _startup_settings(env) == _server["startup"]


def _child(script: str, args: Sequence[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The forked process: `python script *args` from here on, up to the exit status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        if fd == 2 and err == out:
            os.dup2(1, 2)
            break
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # as the interpreter reports sys.exit(code)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # What a real exit does and a multiprocessing child skips, in the interpreter's order: join the threads and
        # run threading's exit hooks (executors shut down: loky's workers), then atexit's (MLflow ends its runs).
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Forked:
    """A forked CLI process with the part of Popen's interface the tests use."""

    def __init__(self, args: Sequence[str], cwd: Path, env: dict[str, str], out: Path, err: Path,
                 script: Path = SCRIPT):
        self.args = [sys.executable, str(script), *args]
        self.proc = _server["ctx"].Process(target=_child, args=(str(script), list(args), str(cwd), env, str(out),
                                                                  str(err)))
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.proc.exitcode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.proc.exitcode


def launch(*args: str, cwd: Path, out: Path, err: Path, fresh: bool = False, prefix: Sequence[str] = (),
           preexec_fn: Callable[[], Any] | None = None, script: Path = SCRIPT,
           **extra_env: str) -> Forked | subprocess.Popen:
    """The CLI (or another of scripts/) in the background, its output in the files `out` and `err` (which may be the
    same)."""
    env = train_env(**extra_env)
    if not (fresh or prefix or preexec_fn) and _forkable(env):
        return Forked(args, cwd, env, out, err, script)
    with open(out, "w") as o, open(err, "w") if err != out else open(os.devnull) as e:
        return subprocess.Popen([*prefix, sys.executable, str(script), *args], cwd=cwd, env=env, stdout=o,
                                stderr=e if err != out else subprocess.STDOUT, preexec_fn=preexec_fn)


def start(*args: str, cwd: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=train_env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_epoch(root: Path, db: Path | None = None) -> int:
    """The highest `reglab.logged_epoch` tag in the store under `root` (-1: none yet): the epoch a run's history is
    complete through, as resuming reads it (reglab/runs/lookup.py). Read with sqlite3, cheap enough to poll every few
    milliseconds without taking a core from the run being watched. (Not the metrics themselves: MLflow commits a
    batch's metrics before its tags, and a kill between the two leaves a history that may not be resumed.)"""
    db = db or root / "mlruns" / "mlflow.db"
    if not db.exists():
        return -1
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute("select max(cast(value as integer)) from tags where key = ?",
                              ("reglab.logged_epoch",)).fetchone()
    except sqlite3.OperationalError:  # store still being created
        return -1
    return -1 if row[0] is None else row[0]


def kill_once_logged(*args: str, root: Path, epoch: int, timeout: float = 180) -> int:
    """The CLI (paths.root=root) in the background, killed with SIGKILL (no cleanup at all) once the store holds
    every epoch through `epoch` and a run has a last.ckpt to resume from (an epoch's metrics reach the store before
    its checkpoint is written); returns logged_epoch(root) then. Its output is in <root>/killed.log (a file: a pipe
    nobody reads could fill and stop it)."""
    def due() -> bool:
        return logged_epoch(root) >= epoch and any(root.glob("outputs/checkpoints/*/last.ckpt"))

    log = root / "killed.log"
    proc = launch(*args, f"paths.root={root}", cwd=root, out=log, err=log)
    deadline = time.time() + timeout
    while not due() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return logged_epoch(root)


def signal_once_checkpointed(*args: str, root: Path, log: Path, pick: str, sig: int, settle: float = 0.0,
                             wait: float = 240, **extra_env: str) -> int:
    """The CLI in the background, in a session of its own (output in `log`); once a run under `root` has a
    last.ckpt (and `settle` seconds more), `sig` goes to the one process below it whose command line contains
    `pick` (a DDP rank, a submitit job). Returns the CLI's exit status; its whole group is killed if it outlives
    `wait` seconds after the signal."""
    import psutil

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=root, env=train_env(**extra_env),
                                stdout=out, stderr=out, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not list(root.glob("outputs/checkpoints/*/last.ckpt")) and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(settle)
            assert proc.poll() is None, f"it ended before the signal:\n{log.read_text()[-3000:]}"
            [target] = [p for p in psutil.Process(proc.pid).children(recursive=True) if pick in " ".join(p.cmdline())]
            target.send_signal(sig)
            return proc.wait(timeout=wait)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def train_cli(*args: str, cwd: Path, timeout: float = 120, fresh: bool = False, prefix: Sequence[str] = (),
              preexec_fn: Callable[[], Any] | None = None, script: Path = SCRIPT,
              **extra_env: str) -> subprocess.CompletedProcess:
    """`fresh`: a new interpreter even where a fork would do; `prefix`: a command that runs the CLI (e.g. in a mount
    namespace of its own); `preexec_fn`: runs in the child before the CLI starts (e.g. a resource limit). Both imply
    `fresh`. `script`: another of scripts/ (report.py, bench_gpu.py), run the same way."""
    folder = Path(tempfile.mkdtemp(prefix="train_cli-"))
    try:
        proc = launch(*args, cwd=cwd, out=folder / "stdout", err=folder / "stderr", fresh=fresh, prefix=prefix,
                      preexec_fn=preexec_fn, script=script, **extra_env)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise subprocess.TimeoutExpired(proc.args, timeout, (folder / "stdout").read_text(),
                                            (folder / "stderr").read_text()) from None
        return subprocess.CompletedProcess(proc.args, code, (folder / "stdout").read_text(),
                                           (folder / "stderr").read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_study(root: Path, tracking_uri: str, experiment: str, study: str, *args: str, timeout: float = 300):
    """A study sweep through the CLI into `tracking_uri`: (its results folder, MlflowClient, parent run, children)."""
    from mlflow.tracking import MlflowClient

    r = train_cli(*args, f"paths.root={root}", f"hydra.sweep.dir={root}/sweep", f"logger.tracking_uri={tracking_uri}",
                  f"logger.experiment={experiment}", cwd=root, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs([exp], f"tags.`reglab.role` = 'parent' and tags.study = '{study}'")
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return root / "results" / study, client, parent, kids
