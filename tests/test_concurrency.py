"""Parallel runs into one new SQLite store lose nothing; a sweep logs to a real `mlflow server` over HTTP.

Measured on 2 cores (docs/reliability.md): before reglab.runs.store.ensure_sqlite_store, 3 of 4 processes starting on
a new store crashed in MLflow's table migration ("table alembic_version already exists"); once the store exists,
MLflow's 20 s SQLite busy timeout absorbed 4 writers without a single "database is locked".
"""

from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import compose
from mlflow_server import mlflow_server
from reglab.runs import store
from train_cli import TINY, start, train_cli

EPOCHS = 2


def logged_param_keys(overrides: list[str]) -> set[str]:
    """The params train.run logs for this config: the flattened resolved config plus two measured values (Lightning's
    MLFlowLogger drops empty lists and dicts such as `augmentation.transforms: []`; config.yaml keeps them)."""
    cfg = OmegaConf.to_container(compose(overrides), resolve=True)
    kept = {k for k, v in store.flatten(cfg).items() if v not in ([], {})}
    return kept | {"model.params", "data.label_noise_realized"}


def assert_complete(client: MlflowClient, run, expected_params: set[str], epochs: int) -> None:
    assert run.info.status == "FINISHED"
    assert set(run.data.params) == expected_params
    for key in ("train/loss", "val/loss", "val/acc"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(epochs)), key
    assert 0.0 <= run.data.metrics["test/acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.cluster  # many writers: make test-cluster (in .ci/run), outside make test's 5 minutes
def test_four_processes_log_to_one_new_sqlite_store(tmp_path):
    common = [*TINY, f"trainer.max_epochs={EPOCHS}", "callbacks.early_stopping=null", "logger.log_model=false",
              f"paths.root={tmp_path}", "logger.experiment=parallel"]
    procs = [start(*common, f"seed={seed}", cwd=tmp_path) for seed in range(4)]
    results = [(p, *p.communicate(timeout=240)) for p in procs]
    for p, _, err in results:
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err and "already exists" not in err

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(int(r.data.params["seed"]) for r in runs) == [0, 1, 2, 3]
    for run in runs:
        assert_complete(client, run, logged_param_keys([*common, f"seed={run.data.params['seed']}"]), EPOCHS)


@pytest.mark.slow
@pytest.mark.cluster  # a remote server: make test-cluster (in .ci/run), outside make test's 5 minutes
def test_sweep_logs_to_a_remote_tracking_server(tmp_path, empty_store):
    local = tmp_path / "client"
    local.mkdir()
    shutil.copyfile(empty_store, tmp_path / "server.db")  # the server's own store, its tables already built
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path) as url:
        common = [*TINY, "trainer.max_epochs=2", f"logger.tracking_uri={url}", "logger.experiment=remote",
                  f"paths.root={local}"]
        r = train_cli("--multirun", *common, "seed=0,1", cwd=local)
        assert r.returncode == 0, r.stderr[-3000:]

        client = MlflowClient(url)  # everything below is read back through the server's REST API
        runs = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
        assert sorted(run.data.params["seed"] for run in runs) == ["0", "1"]
        for run in runs:
            assert_complete(client, run, logged_param_keys([*common, f"seed={run.data.params['seed']}"]), 2)
            config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
            assert OmegaConf.load(config).seed == int(run.data.params["seed"])
            folders = [a.path for a in client.list_artifacts(run.info.run_id) if a.is_dir]
            ckpts = [a.path for f in folders for a in client.list_artifacts(run.info.run_id, f)
                     if a.path.endswith(".ckpt")]
            assert ckpts, "the checkpoints were uploaded through the server"
    assert not (local / "mlruns").exists(), "a remote run must not create a local store"
