"""Where runs go: the MLflow store, and what every run records about the code that made it.

Default store: `sqlite:///<paths.root>/mlruns/mlflow.db` with artifacts in `<paths.root>/mlruns/artifacts/` (MLflow
>= 3.13 refuses the plain-file `./mlruns` store). `MLFLOW_TRACKING_URI` or `logger.tracking_uri=...` (including
`http://host:port` of an `mlflow server`) override it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from reglab.errors import ConfigError

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


def resolve(tracking_uri: str | None, root: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments; None lets a remote server choose). A SQLite store is
    created on first use."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        artifacts = (db.parent / "artifacts").resolve().as_uri()
        ensure_sqlite_store(db, artifacts, key="logger.tracking_uri")
        return tracking_uri, artifacts
    if tracking_uri:
        return tracking_uri, None
    root = Path(root).resolve()
    db, artifacts = root / "mlruns" / "mlflow.db", root / "mlruns" / "artifacts"
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable("paths.root", artifacts, e) from None
    ensure_sqlite_store(db, artifacts.as_uri())
    return f"sqlite:///{db}", artifacts.as_uri()


def ui_hint(tracking_uri: str) -> str:
    """How to open the store at `tracking_uri` in the MLflow UI: `make ui` serves the checkout's own store only."""
    checkout = Path(__file__).resolve().parents[3]
    if tracking_uri == f"sqlite:///{checkout / 'mlruns' / 'mlflow.db'}":
        return "open it with `make ui`"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return (f"open it with `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {tracking_uri} "
            "--host 127.0.0.1 --workers 1`")


def experiment(cfg: DictConfig):
    """(MlflowClient, experiment id, tracking URI) of `cfg.logger.experiment`, created with its artifact folder
    when new."""
    from mlflow.tracking import MlflowClient

    if cfg.logger.get("backend") != "mlflow":
        raise ConfigError(f"logger.backend={cfg.logger.get('backend')!r}: this needs logger=mlflow")
    uri, artifacts = resolve(cfg.logger.get("tracking_uri"), cfg.paths.root)
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.logger.experiment)
    if exp is not None:
        return client, exp.experiment_id, uri
    try:
        return client, client.create_experiment(cfg.logger.experiment, artifact_location=artifacts), uri
    except MlflowException as e:
        # Parallel jobs on a new store look the experiment up, find none, and all create it: one wins, the others
        # get RESOURCE_ALREADY_EXISTS (seen in tests/test_concurrency.py) and use the winner's.
        exp = client.get_experiment_by_name(cfg.logger.experiment)
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
            raise
        return client, exp.experiment_id, uri


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config as MLflow params; lists of dicts/lists stay one JSON value."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        return {prefix[:-1]: json.dumps(d)}
    return {prefix[:-1]: d}


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    # Once per process (two git subprocesses, ~15 ms): a sweep worker runs many jobs of the same checkout. Where the
    # code has no repository (the Docker image: .git stays out of its context), the commit it was built from.
    if os.environ.get("REGLAB_GIT_COMMIT"):
        return os.environ["REGLAB_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_tags() -> dict[str, str]:
    """git commit and package versions: what every run and parent is tagged with."""
    tags = {"git_commit": git_commit()}
    for pkg in VERSIONED_PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags
