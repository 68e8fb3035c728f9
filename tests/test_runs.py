"""reglab.runs without training: who a run is (identity), how the run logger batches a history and what its
`reglab.logged_epoch` tag claims, and where a runner study writes. Resume and skip end to end: test_sweep.py and
test_single_run_resume.py."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from conftest import compose
from reglab.runs import Run, identity, open_run
from reglab.runs.lookup import LOGGED_EPOCH_TAG


def test_study_key_ignores_swept_keys_only():
    base = compose(["+exp=double_descent_mnist1d", "model.width=4", "seed=0"])
    other_width = compose(["+exp=double_descent_mnist1d", "model.width=64", "seed=3"])
    other_noise = compose(["+exp=double_descent_mnist1d", "model.width=4", "data.label_noise=0.2"])
    axes = ["model.width", "seed"]
    assert identity(base, without=axes) == identity(other_width, without=axes)
    assert identity(base, without=axes) != identity(other_noise, without=axes)
    assert identity(base, without=axes) != identity(other_width, without=["model.width"])
    assert identity(base) != identity(other_width)  # each child is its own run


def test_how_a_run_is_observed_does_not_change_who_it_is(tmp_path):
    base = identity(compose([]))
    for observed in (["logger=none"], [f"paths.root={tmp_path}"], ["callbacks.progress=null"], ["study=x"],
                     ["launcher.jobs_per_gpu=4"], ["logger.experiment=other"]):
        assert identity(compose(observed)) == base, observed
    for computed in (["seed=1"], ["model.width=8"], ["callbacks.early_stopping=null"], ["stopping.after_stop=retrain"]):
        assert identity(compose(computed)) != base, computed


def test_run_logger_drops_epochs_the_run_holds_and_writes_one_batch_when_flushed(mlflow_uri, tmp_path):
    from reglab.runs.logger import RunLogger

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment(f"run_logger_{tmp_path.name}")
    run = client.create_run(exp).info.run_id
    for step in range(6):  # an interrupted attempt logged epochs 0..5; its checkpoint is older (epoch 2)
        client.log_metric(run, "train/loss", 1.0, step=step)
    resumed = Run("fp", "name", tmp_path, tracked=True, run_id=run, ckpt_path="last.ckpt", logged_epoch=5)
    logger = RunLogger(resumed, flush_every_s=3600, experiment_name="unused", tracking_uri=mlflow_uri)
    for step in range(3, 9):  # the resumed run recomputes 3..5, then goes on
        logger.log_metrics({"train/loss": 2.0}, step=step)
        assert len(client.get_metric_history(run, "train/loss")) == 6  # nothing written per epoch
    logger.flush()  # what the checkpoint callback does before it makes last.ckpt current
    history = client.get_metric_history(run, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0) for s in range(6)] + [(6, 2.0), (7, 2.0), (8, 2.0)]
    assert client.get_run(run).data.tags[LOGGED_EPOCH_TAG] == "8"  # what the next resume reads, in the same batch


def test_a_new_runs_header_does_not_claim_epoch_0(mlflow_uri, tmp_path):
    """The header's step-0 metrics (model/params, ...) wait for epoch 0's batch: written before it, their tag would
    say epoch 0 is in the store, and a kill between epoch 0's checkpoint and its metrics would resume past it."""
    from reglab.runs.logger import build_logger

    cfg = compose([f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=header"])
    logger = build_logger(cfg, open_run(cfg))
    logger.log_header(cfg, 7, 0.0)
    client = logger.experiment
    assert client.get_run(logger.run_id).data.params["model.params"] == "7"
    assert LOGGED_EPOCH_TAG not in client.get_run(logger.run_id).data.tags
    logger.log_metrics({"train/loss": 1.0}, step=0)  # epoch 0
    logger.flush()  # before its checkpoint
    after = client.get_run(logger.run_id).data
    assert after.tags[LOGGED_EPOCH_TAG] == "0"
    assert after.metrics == {"model/params": 7.0, "data/label_noise_realized": 0.0, "train/loss": 1.0}


def test_study_recorder_writes_under_paths_results(tmp_path):
    from reglab.runs.study import StudyRecorder

    cfg = compose(["+exp=polynomial", f"paths.root={tmp_path / 'root'}", f"paths.results={tmp_path / 'reports'}",
                   "logger=none"])
    recorder = StudyRecorder(cfg, "polynomial")
    assert recorder.dir == tmp_path / "reports" / "polynomial" and recorder.dir.is_dir()
    table = recorder.table(pd.DataFrame({"M": [0, 9], "E_rms": [0.7, 0.0]}), "erms")
    assert table == tmp_path / "reports" / "polynomial" / "erms.md"
    assert (table.with_suffix(".csv")).read_text().splitlines() == ["M,E_rms", "0,0.7", "9,0.0"]
    assert not (tmp_path / "root" / "results").exists()

