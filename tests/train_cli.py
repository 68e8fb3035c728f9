"""Run scripts/train.py as a user would: a subprocess, in a folder of the test's own, with no tracking URI from the
user's shell and no proxy for loopback servers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
# Small enough that a run (5 s of imports included) takes seconds on 2 cores, big enough to learn something.
TINY = ["data=digits", "data.train_size=256", "data.batch_size=64", "model.width=32", "model.depth=1"]


def train_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra})
    return env


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

    with open(root / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, f"paths.root={root}"], cwd=root,
                                env=train_env(), stdout=log, stderr=log)
        deadline = time.time() + timeout
        while not due() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return logged_epoch(root)


def train_cli(*args: str, cwd: Path, timeout: float = 120, prefix: Sequence[str] = (),
              preexec_fn: Callable[[], Any] | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """`prefix`: a command that runs the CLI (e.g. in a mount namespace of its own); `preexec_fn`: runs in the child
    before the CLI starts (e.g. a resource limit)."""
    return subprocess.run([*prefix, sys.executable, str(SCRIPT), *args], cwd=cwd, env=train_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


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
