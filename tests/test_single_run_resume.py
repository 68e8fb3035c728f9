"""kill -9 of a single run (no study): rerunning the same command continues the same MLflow run from last.ckpt
with every epoch once, or, when the kill fell between the checkpoint and the history write, marks the old run
superseded and starts over. Either way nothing is duplicated and the rerun ends FINISHED."""

import mlflow
import pytest
import torch

from conftest import with_store
from reglab.runs.lookup import checkpoint_epoch
from train_cli import TINY, kill_once_logged, train_cli

EPOCHS = 12  # the kill comes after epoch 2 (polled every 20 ms; an epoch takes ~0.1 s)
ARGS = [*TINY, "data.train_size=1000", "model.width=256", f"trainer.max_epochs={EPOCHS}",
        "callbacks.early_stopping=null", "callbacks.checkpoint.last_every_s=null", "logger.experiment=single",
        "logger.log_model=false"]


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("single")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def _steps(client, run, key="train/loss"):
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_killed_single_run_is_continued_by_the_same_command(tmp_path, empty_store):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    logged = kill_once_logged(*ARGS, root=with_store(tmp_path, empty_store), epoch=2)
    client, (killed,) = _runs(uri)
    assert killed.info.status == "RUNNING" and 2 <= logged < EPOCHS - 1, \
        f"the kill missed the run: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    assert _steps(client, killed)[:logged + 1] == list(range(logged + 1))  # the history the tag vouches for
    [last] = tmp_path.glob("outputs/checkpoints/*/last.ckpt")
    resumable = logged >= checkpoint_epoch(last)  # the rule of reglab.runs.lookup
    print(f"killed at logged epoch {logged}, checkpoint epoch {checkpoint_epoch(last)}, resumable={resumable}")

    rerun = train_cli(*ARGS, cwd=tmp_path, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    client, runs = _runs(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1
    if resumable:
        assert len(runs) == 1 and finished[0].info.run_id == killed.info.run_id  # the same run continued
    else:
        old = client.get_run(killed.info.run_id)
        assert old.info.status == "KILLED" and old.data.tags["reglab.superseded_by_rerun"] == "true"
    assert _steps(client, finished[0]) == list(range(EPOCHS))  # every epoch exactly once
    state = torch.load(next(tmp_path.glob("outputs/checkpoints/*/last.ckpt")), weights_only=True)
    assert state["epoch"] == EPOCHS - 1
