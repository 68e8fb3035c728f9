"""MLflow: where runs go, what each run records, and the fingerprint that identifies a run's config.

Default store: `sqlite:///<root>/mlruns/mlflow.db` with artifacts in `<root>/mlruns/artifacts/` (MLflow >= 3.13
refuses the plain-file `./mlruns` store). `<root>` is the directory the command runs from; `MLFLOW_TRACKING_URI`
or `logger.tracking_uri=...` (including `http://host:port` of an `mlflow server`) override it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reglab.errors import ConfigError

# Keys that change how a run is observed, not what it computes: left out of the fingerprint, so a rerun with
# another logger, progress bar or output folder is recognised as the same run.
NON_SEMANTIC_KEYS = ("logger", "paths", "callbacks.progress", "hydra", "report", "study", "launcher", "pack")
VERSIONED_PACKAGES = ("torch", "lightning", "mlflow", "hydra-core", "albumentations", "numpy", "reglab")


def _unwritable(key: str, path: Path, e: Exception) -> ConfigError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return ConfigError(f"{key}: cannot write the MLflow store at {path} ({reason}); free disk space or make the "
                       f"folder writable, or choose another with {key}=...")


def ensure_sqlite_store(db: Path, artifacts: str, key: str = "paths.root") -> None:
    """Create a new SQLite store's tables once, atomically. MLflow migrates an empty store on first use: parallel
    sweep processes doing so at once collide ("table alembic_version already exists", "duplicate column name"), and
    a migration cut short by a full disk leaves a store no later run can open. So the first process builds the
    store in a temporary file under an exclusive lock and renames it into place; later ones find it complete."""
    if db.exists():
        return
    import fcntl

    import sqlalchemy.exc
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f"{db.name}.{os.getpid()}.tmp")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(f"{db.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if db.exists():
                return
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
            SqlAlchemyStore(f"sqlite:///{tmp}", artifacts).engine.dispose()
            os.replace(tmp, db)
    except (OSError, sqlalchemy.exc.OperationalError) as e:
        raise _unwritable(key, db.parent, getattr(e, "orig", None) or e) from None
    finally:
        tmp.unlink(missing_ok=True)


def store_paths(root: str | Path) -> tuple[str, str]:
    root = Path(root).resolve()
    db, artifacts = root / "mlruns" / "mlflow.db", root / "mlruns" / "artifacts"
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable("paths.root", artifacts, e) from None
    ensure_sqlite_store(db, artifacts.as_uri())
    return f"sqlite:///{db}", artifacts.as_uri()


def resolve_tracking(tracking_uri: str | None, root: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments; None lets a remote server choose)."""
    if tracking_uri:
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            artifacts = (db.parent / "artifacts").resolve().as_uri()
            ensure_sqlite_store(db, artifacts, key="logger.tracking_uri")
            return tracking_uri, artifacts
        return tracking_uri, None
    return store_paths(root)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        return {prefix[:-1]: json.dumps(d)}
    return {prefix[:-1]: d}


def semantic_config(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_SEMANTIC_KEYS:
        node, *rest = key.split(".")
        if rest and isinstance(c.get(node), dict):
            c[node].pop(rest[0], None)
        elif not rest:
            c.pop(node, None)
    return c


def fingerprint(cfg: DictConfig) -> str:
    """sha256 of the resolved config minus NON_SEMANTIC_KEYS: same fingerprint <=> same computation."""
    blob = json.dumps(semantic_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    # Once per process (two git subprocesses, ~15 ms): a sweep worker runs many jobs of the same checkout.
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags() -> dict[str, str]:
    tags = {"git_commit": git_commit()}
    for pkg in VERSIONED_PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


# --- studies: one parent run per study, one child run per configuration -----------------------------------------
def client_and_experiment(tracking_uri: str | None, root: str | Path, experiment: str):
    """(MlflowClient, experiment id), creating the experiment with its artifact folder when new."""
    from mlflow.tracking import MlflowClient

    uri, artifacts = resolve_tracking(tracking_uri, root)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts)
    return client, exp_id


def study_parent(client, experiment_id: str, study: str, study_key: str, params: dict | None = None) -> str:
    """Run id of the parent run of `study` whose sweep-independent config hashes to `study_key`; created (and
    tagged study=<name>, reglab.role=parent) when none exists, so a rerun of the same study reuses its parent."""
    found = client.search_runs(
        [experiment_id],
        f"tags.study = '{study}' and tags.`reglab.study_key` = '{study_key}' and tags.`reglab.role` = 'parent'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=study,
                            tags={"study": study, "reglab.study_key": study_key, "reglab.role": "parent",
                                  **run_tags()})
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def child_tags(parent_run_id: str, study: str) -> dict[str, str]:
    return {"mlflow.parentRunId": parent_run_id, "study": study, "reglab.role": "child"}
