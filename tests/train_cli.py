"""Run scripts/train.py as a user would: a subprocess, in a folder of the test's own, with no tracking URI from the
user's shell and no proxy for loopback servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def train_cli(*args: str, cwd: Path, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=train_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


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
