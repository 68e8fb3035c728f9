"""reglab.runs: who a run is (identity), how the run logger batches a history and what its `reglab.logged_epoch` tag
claims, where a runner study writes, and what a researcher finds in the MLflow UI (run names, tags, dataset inputs,
system metrics) for a one-epoch solo run and population. Resume and skip end to end: test_sweep.py and
test_single_run_resume.py; the UI itself: test_e2e_ui.py."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from conftest import compose
from reglab.runs import Run, identity, open_run
from reglab.runs.lookup import LOGGED_EPOCH_TAG

TINY = ["data=digits", "data.train_size=128", "data.batch_size=64", "model.width=8", "model.depth=1",
        "trainer.max_epochs=1", "callbacks.early_stopping=null"]


def digits(*overrides: str):
    """A set-up digits datamodule as train.run builds it."""
    from reglab.train import build_data

    dm = build_data(compose([*TINY, *overrides]))
    dm.setup()
    return dm


def dataset_inputs(run) -> dict[str, tuple[str, str]]:
    """{context: (name, digest)} of a run's MLflow dataset inputs."""
    return {t.value: (d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs for t in d.tags
            if t.key == "mlflow.data.context"}


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
    logger.log_header(cfg, 7, digits())
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



def test_a_splits_digest_is_its_examples_and_labels():
    from reglab.runs.datasets import splits

    base, other_seed, noisy = splits(digits()), splits(digits("seed=1")), splits(digits("data.label_noise=0.2"))
    assert splits(digits())["train"].digest == base["train"].digest  # the same run again: the same dataset
    assert other_seed["train"].digest != base["train"].digest and other_seed["val"].digest != base["val"].digest
    assert noisy["train"].digest != base["train"].digest  # same examples, other labels
    assert noisy["val"].digest == base["val"].digest and other_seed["test"].digest == base["test"].digest
    assert base["train"].name == "digits" and base["train"].profile["num_rows"] == 128
    assert noisy["train"].profile["label_noise"] == 0.2


def test_a_solo_run_has_its_name_role_datasets_and_system_metrics(tmp_path, mlflow_uri, monkeypatch):
    import threading

    from reglab.runs.datasets import splits
    from reglab.train import run

    # A run far shorter than one sampling interval still gets its sample (RunLogger.finalize): a 1-epoch run ended
    # before MLflow's first write at 0.05 s on the CI machine.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    run(compose([*TINY, f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=solo_ui",
                 "logger.system_metrics=true"]))
    client = MlflowClient(mlflow_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("solo_ui").experiment_id])
    assert r.info.run_name == "mlp-w8-s0" and r.data.tags["role"] == "solo"
    assert dataset_inputs(r) == {c: ("digits", d.digest) for c, d in splits(digits()).items()}  # the run's own splits
    assert r.data.tags["reglab.system_metrics_run"] == r.info.run_id
    assert "system/cpu_utilization_percentage" in r.data.metrics
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]  # stopped with the run


def test_population_members_are_named_and_tagged_by_their_swept_values(tmp_path, mlflow_uri, monkeypatch):
    from reglab.population.train import train_population
    from reglab.runs import study

    base = [*TINY, f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=population_ui",
            "study=ui", "population.mode=on"]
    parent = study.open_parent(compose(base), {"model.width": "8,16", "seed": "0,1"})
    monkeypatch.setenv(study.ENV_PARENT, parent)
    members = [compose([*base, "model.width=8", "seed=0"]), compose([*base, "model.width=16", "seed=1"])]
    train_population(members)
    client = MlflowClient(mlflow_uri)
    children = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("population_ui").experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert set(children) == {"width=8 seed=0", "width=16 seed=1"}
    r = children["width=16 seed=1"]
    assert (r.data.tags["model.width"], r.data.tags["seed"]) == ("16", "1")
    assert r.data.tags["role"] == r.data.tags["reglab.role"] == "child" and r.data.tags["study"] == "ui"
    assert client.get_run(parent).data.tags["role"] == "parent"
    inputs = {name: dataset_inputs(c) for name, c in children.items()}
    assert all(set(i) == {"train", "val", "test"} and i["train"][0] == "digits" for i in inputs.values())
    assert inputs["width=8 seed=0"]["train"] != inputs["width=16 seed=1"]["train"]  # seeds 0 and 1: other splits


def test_a_parent_holds_the_union_of_its_sweeps_and_the_latest_command(tmp_path, mlflow_uri):
    """Its sweep.<key> tags named the first sweep's values alone, though the report covers every sweep's children,
    and a plain value of a preset's axis (model.width=4) was not what the tag said; reglab.command reruns it."""
    from omegaconf import OmegaConf

    from reglab.runs import study

    cfg = compose([*TINY, f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=unions",
                   "study=unions"])
    hydra = OmegaConf.create({"sweeper": {"params": {"model.width": "2,8,32", "seed": "0,1"}},
                              "overrides": {"task": ["+exp=unions", "model.width=4", "seed=0,1,2"]}})
    axes = study.sweep_axes(hydra)
    assert axes == {"model.width": "4", "seed": "0,1,2"}
    # An Optuna search space stays what the sweeper searches, whatever plain value the command line gives it.
    optuna = OmegaConf.create({"sweeper": {"params": {"regularization.dropout.keep_prob": "interval(0.2, 1.0)"}},
                               "overrides": {"task": ["regularization.dropout.keep_prob=0.5"]}})
    assert study.sweep_axes(optuna) == {"regularization.dropout.keep_prob": "interval(0.2, 1.0)"}
    parent = study.open_parent(cfg, {"model.width": "8,16", "seed": "0,1"}, "python scripts/train.py seed=0,1")
    assert study.open_parent(cfg, axes, study.command(hydra)) == parent
    tags = MlflowClient(mlflow_uri).get_run(parent).data.tags
    assert (tags["sweep.model.width"], tags["sweep.seed"]) == ("8,16,4", "0,1,2")
    assert tags["reglab.command"] == "python scripts/train.py +exp=unions model.width=4 seed=0,1,2"


def test_a_population_job_looks_each_member_up_once(tmp_path, mlflow_uri, monkeypatch):
    """One store query per member and job (a query took ~40 ms per member of a 35-member job): the look-up that finds
    done members also gives the attempts the population's resume decision chooses from."""
    from reglab.population import train as population

    queries: list[str] = []
    search_runs = MlflowClient.search_runs

    def counting(self, experiment_ids, filter_string="", *args, **kwargs):
        queries.append(filter_string)
        return search_runs(self, experiment_ids, filter_string, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", counting)
    cfg = compose([*TINY, f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}", "logger.experiment=lookups",
                   "trainer.max_epochs=1", "population.mode=on", "population.members=['seed=0','seed=1']"])
    for _ in range(2):  # trained, then both done
        queries.clear()
        population.run(cfg)
        by_member = [q for q in queries if "tags.fingerprint" in q]
        assert len(by_member) == 2 and len(set(by_member)) == 2, queries


def test_a_swept_group_is_named_by_its_hydra_choice_or_its_entries():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from conftest import CONF
    from reglab.runs.study import child_name, swept_values

    keys = ("data.label_noise", "regularization", "seed")
    assert swept_values(compose(["regularization=[l2,dropout]", "seed=3"]), keys) == {
        "data.label_noise": "0.0", "regularization": "l2+dropout", "seed": "3"}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        job = hydra_compose("train", ["regularization=l2_dropout_bn", "data.label_noise=0.1"], return_hydra_config=True)
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)  # what Hydra does in a job's process
    try:
        assert child_name(swept_values(job, keys)) == "label_noise=0.1 regularization=l2_dropout_bn seed=0"
    finally:
        HydraConfig.instance().cfg = before


def test_an_experiment_another_process_created_first_is_used_not_an_error(tmp_path, monkeypatch):
    """Parallel jobs on a new store all look the experiment up, find none and create it: the losers of that race
    get MLflow's RESOURCE_ALREADY_EXISTS and must go on with the winner's experiment."""
    from reglab.runs.store import experiment

    cfg = compose(["logger=mlflow", f"paths.root={tmp_path}", "logger.experiment=raced"])
    client, winner, _ = experiment(cfg)  # the other process's create
    real = MlflowClient.get_experiment_by_name
    calls = []

    def lookup_before_the_other_create(self, name):
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lookup_before_the_other_create)
    assert experiment(cfg)[1] == winner
    assert len(calls) == 2 and len(client.search_experiments(filter_string="name = 'raced'")) == 1


def test_the_commit_of_an_image_without_a_repository_comes_from_its_build(monkeypatch):
    from reglab.runs import store

    store.git_commit.cache_clear()
    monkeypatch.setenv("REGLAB_GIT_COMMIT", "0123abc")  # the Dockerfile's GIT_COMMIT build argument
    try:
        assert store.git_commit() == "0123abc"
    finally:
        store.git_commit.cache_clear()


def test_the_ui_hint_names_the_store_the_run_is_in(tmp_path):
    """`make ui` serves the checkout's mlruns/ alone: a run in another store was told to open it with `make ui`."""
    from pathlib import Path

    from reglab.runs import store

    checkout = Path(store.__file__).resolve().parents[3]
    assert store.ui_hint(f"sqlite:///{checkout}/mlruns/mlflow.db") == "open it with `make ui`"
    other = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert f"mlflow ui --backend-store-uri {other} --host 127.0.0.1" in store.ui_hint(other)
    assert store.ui_hint("http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
