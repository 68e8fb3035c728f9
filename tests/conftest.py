"""Shared fixtures: compose configs exactly as scripts/train.py does, and a throwaway MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import reglab  # noqa: F401  (no-network environment first)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train"):
    """The config `python scripts/train.py *overrides` would run (without Hydra's own runtime nodes)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """Runs write their mlruns/ and outputs/ here; MLFLOW_TRACKING_URI from the user's shell is ignored."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def quick(tmp_root: Path, *overrides: str) -> list[str]:
    """Overrides for a fast CPU run writing under tmp_root (no MLflow unless asked: logger=mlflow)."""
    return [f"paths.root={tmp_root}", "logger=none", "trainer.max_epochs=2", *overrides]


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the session: creating a store runs MLflow's migrations (seconds), so share it."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{path}"


os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
