"""Shared fixtures: compose configs exactly as scripts/train.py does, and throwaway MLflow stores."""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

import pytest

import reglab  # noqa: F401  (no-network environment first)
from reglab.config import override_key

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train"):
    """The config `python scripts/train.py *overrides` would run (without Hydra's own runtime nodes). A composition
    takes Hydra ~0.2 s here, and tests ask for many that differ only in values (paths.root, seed, a strength; 128 in
    test_population_penalties.py alone): those `key=value` overrides are applied to a cached composition of the others,
    as the population sweeper composes its jobs (reglab.population.sweeper.with_values); the rest is Hydra's."""
    from reglab.population.sweeper import with_values

    overrides = list(overrides)
    values = [o for o in overrides if _plain_value(o)]
    others = [o for o in overrides if o not in values]
    cfg = None
    if not any(_overlap(o, v) for o in others for v in values if not _group(o)):  # else their order could matter
        from hydra.errors import OverrideParseException

        try:
            cfg = with_values(_composed(config_name, tuple(others)), values)
        except OverrideParseException:  # Hydra's own composition reports it (any other error is with_values' bug)
            pass
    return cfg if cfg is not None else copy.deepcopy(_composed(config_name, tuple(overrides)))


def _plain_value(override: str) -> bool:
    """Sets a plain value (seed=3, model.width=8), not a config group (model=resnet18, hydra/launcher=x), a new or
    deleted key (+k=v, ~k), a list or dict, or null (which may replace a whole node: callbacks.early_stopping=null)."""
    key, eq, value = override.partition("=")
    if not eq or key.startswith(("+", "~")) or value.startswith(("[", "{")):
        return False
    return value != "null" and not _group(override)


def _group(override: str) -> bool:
    """Chooses a config group's option (model=resnet18, hydra/launcher=basic, +exp=x): Hydra applies these first."""
    key = override_key(override)
    return "/" in key or "@" in key or ("." not in key and (CONF / key).is_dir())


def _overlap(a: str, b: str) -> bool:
    a, b = override_key(a), override_key(b)
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


@functools.lru_cache(maxsize=None)
def _composed(config_name: str, overrides: tuple[str, ...]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """Runs write their mlruns/ and outputs/ here; MLFLOW_TRACKING_URI from the user's shell is ignored."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def weights(ckpt: Path) -> dict:
    """A checkpoint's state_dict, on the CPU."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def solo_and_population(root: Path, base: list[str], members: list[list[str]]):
    """Each member (overrides added to `base`) trained alone by reglab.train.run, then all of them as one population:
    (solo metrics, population metrics, solo weights, population weights), per member."""
    from reglab.population.train import train_population
    from reglab.runs.lookup import find_run
    from reglab.train import run

    solo_cfgs = [compose([*base, f"paths.root={root / 'solo'}", *m]) for m in members]
    pop_cfgs = [compose([*base, f"paths.root={root / 'pop'}", *m]) for m in members]
    solo = [run(c) for c in solo_cfgs]
    pop = train_population(pop_cfgs)
    solo_w = [weights(find_run(c).ckpt_dir / "last.ckpt") for c in solo_cfgs]
    pop_w = [weights(find_run(c).ckpt_dir / "last.ckpt") for c in pop_cfgs]
    return solo, pop, solo_w, pop_w


def assert_members_match(solo, pop, solo_w, pop_w, rtol=1e-5):
    """Every final metric of each member (train, val, test, params/*, train/penalty/*, train_eval/*) and every tensor
    of its last.ckpt within rtol of its solo run's."""
    import torch

    for s, p, sw, pw in zip(solo, pop, solo_w, pop_w):
        assert p.keys() == s.keys()
        for key in s:
            assert p[key] == pytest.approx(s[key], rel=rtol, abs=1e-6), key
        assert sw.keys() == pw.keys()
        for k in sw:
            torch.testing.assert_close(pw[k].float(), sw[k].float(), rtol=rtol, atol=1e-6, msg=k)


def quick(tmp_root: Path, *overrides: str) -> list[str]:
    """Overrides for a fast CPU run writing under tmp_root (no MLflow unless asked: logger=mlflow)."""
    return [f"paths.root={tmp_root}", "logger=none", "trainer.max_epochs=2", *overrides]


@pytest.fixture(scope="session", autouse=True)
def quiet_libraries():
    """What scripts/train.py does in each job's process (reglab sets nothing at import), for tests that call
    reglab.train.run in this one."""
    from reglab import cli

    cli.quiet_libraries()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A new SQLite store with its tables. MLflow builds them in 68 migrations, 3-6 s of SQLite commits here, so
    the session builds them once and `with_store` copies the file where a test only needs a store to exist. Tests of
    creating a store (test_concurrency, test_faults, test_security) start from nothing."""
    from reglab.runs import store

    root = tmp_path_factory.mktemp("empty_store")
    store.resolve(None, root)
    return root / "mlruns" / "mlflow.db"


def with_store(root: Path, empty_store: Path) -> Path:
    """`root` with the store a first run would create there (paths.root=root), as a copy of `empty_store`."""
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, root / "mlruns" / "mlflow.db")
    return root


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory, empty_store):
    """One SQLite store for the session, shared by tests that log to experiments of their own."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copyfile(empty_store, path)
    return f"sqlite:///{path}"


os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
