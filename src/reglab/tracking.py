"""MLflow: where runs go, what each run records, and the fingerprint that identifies a run's config.

Default store: `sqlite:///<root>/mlruns/mlflow.db` with artifacts in `<root>/mlruns/artifacts/` (MLflow >= 3.13
refuses the plain-file `./mlruns` store). `<root>` is the directory the command runs from; `MLFLOW_TRACKING_URI`
or `logger.tracking_uri=...` (including `http://host:port` of an `mlflow server`) override it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that change how a run is observed, not what it computes: left out of the fingerprint, so a rerun with
# another logger, progress bar or output folder is recognised as the same run.
NON_SEMANTIC_KEYS = ("logger", "paths", "callbacks.progress", "hydra", "report")
VERSIONED_PACKAGES = ("torch", "lightning", "mlflow", "hydra-core", "albumentations", "numpy", "reglab")


def store_paths(root: str | Path) -> tuple[str, str]:
    root = Path(root).resolve()
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", (root / "mlruns" / "artifacts").as_uri()


def resolve_tracking(tracking_uri: str | None, root: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments; None lets a remote server choose)."""
    if tracking_uri:
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            return tracking_uri, (db.parent / "artifacts").resolve().as_uri()
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


def git_commit() -> str:
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
