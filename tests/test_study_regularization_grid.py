"""+exp=regularization_grid end to end, made tiny (2 techniques x 2 training-set sizes x 2 seeds, 2 epochs) through
the real CLI into an MLflow store: the table is the runs' MLflow metrics (mean, SE with ddof=1), ranked, the recipe is
named, the paired differences from `none` are per seed, and the learning-curve figure appears because the study has a
data.train_size axis. The ranking's ties and the paired table on a small hand-made store. The presets themselves
(grid, learning curve, ResNet18) compose with their axes and say what they cost."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import CONF
from scipy import stats
from train_cli import run_study

EXPERIMENT = "regularization_grid_test"
TINY = ["+exp=regularization_grid", "hydra/launcher=basic", "regularization=[],l2_dropout_bn",
        "data.train_size=60,120", "seed=0,1", "trainer.max_epochs=2", "model.width=64"]
PRESETS = {"regularization_grid": "regularization", "learning_curve": "data.train_size",
           "regularization_grid_resnet": "regularization"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, mlflow_uri):
    return run_study(tmp_path_factory.mktemp("grid_study"), mlflow_uri, EXPERIMENT, "regularization_grid", *TINY)


@pytest.mark.slow
def test_grid_table_is_the_runs_mlflow_metrics_best_to_worst(study):
    out, client, parent, kids = study
    assert len(kids) == 8 and all(k.info.status == "FINISHED" for k in kids)
    table = pd.read_csv(out / "grid.csv")
    assert sorted(table["technique"].unique()) == [
        "l2_dropout_bn: l2 0.0005 + dropout keep 0.5 + batch norm", "none"]
    for _, row in table.iterrows():
        recipe = row.technique != "none"
        runs = [k for k in kids if int(k.data.params["data.train_size"]) == row.train_size
                and ("regularization.l2.strength" in k.data.params) == recipe]
        assert len(runs) == 2 and row.n == 2
        test = np.array([k.data.metrics["test/err"] for k in runs])
        train = np.array([k.data.metrics["train/err"] for k in runs])
        zero = np.array([k.data.metrics["params/zero_frac"] for k in runs])
        assert row.test_err_mean == pytest.approx(test.mean(), abs=1e-12)
        assert row.test_err_std == pytest.approx(test.std(ddof=1), abs=1e-12)
        assert row.test_err_se == pytest.approx(test.std(ddof=1) / math.sqrt(2), abs=1e-12)
        assert row.train_err_mean == pytest.approx(train.mean(), abs=1e-12)
        assert row.gap_mean == pytest.approx((test - train).mean(), abs=1e-12)
        assert row.zero_frac_mean == pytest.approx(zero.mean(), abs=1e-12)
        assert all((k.data.params["model.norm"] == "batch") == recipe for k in runs)  # the recipe's batch norm
    # Sorted: largest training set first, then by rank; ranks start at 1 and never contradict the means.
    assert list(table["train_size"]) == [120, 120, 60, 60]
    for size in (60, 120):
        part = table[table.train_size == size]
        assert part["rank"].min() == 1 and list(part["rank"]) == sorted(part["rank"])
    # paired.csv: the recipe minus none on the same seed, per training-set size.
    paired = pd.read_csv(out / "paired.csv")
    assert len(paired) == 2 and (paired["n"] == 2).all()
    for _, row in paired.iterrows():
        by = {(("regularization.l2.strength" in k.data.params), int(k.data.params["seed"])): k.data.metrics["test/err"]
              for k in kids if int(k.data.params["data.train_size"]) == row.train_size}
        d = np.array([by[True, s] - by[False, s] for s in (0, 1)])
        assert row.diff_mean == pytest.approx(d.mean(), abs=1e-12)
        assert row.diff_se == pytest.approx(d.std(ddof=1) / math.sqrt(2), abs=1e-12)
    files = {"grid.png", "grid.csv", "grid.md", "paired.csv", "paired.md", "runs.csv", "learning_curve.png",
             "config.yaml"}
    assert files <= {p.name for p in out.iterdir()}
    assert files <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    for png in ("grid.png", "learning_curve.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def small_grid(uri: str):
    """A grid parent with 3 seeds x {none, dropout, l2, max_norm} at one training-set size, written as a sweep writes
    it. Each seed shifts every technique alike by OFFSET[seed] (its data); on top: dropout 10 points better than none,
    l2 and max_norm within +-0.2 points of none."""
    from mlflow.tracking import MlflowClient

    from reglab.runs.study import child_tags

    client = MlflowClient(uri)
    exp = client.create_experiment("small_grid")
    parent = client.create_run(exp, run_name="small_grid", tags={"study": "small_grid", "reglab.role": "parent"})
    params = {"none": {}, "dropout": {"regularization.dropout._target_": "x", "regularization.dropout.keep_prob": "0.5"},
              "l2": {"regularization.l2._target_": "x", "regularization.l2.strength": "0.0005"},
              "max_norm": {"regularization.max_norm._target_": "x", "regularization.max_norm.max_norm": "3.0"}}
    for name, err in SMALL_GRID.items():
        for seed, e in enumerate(err):
            run = client.create_run(exp, tags=child_tags(parent.info.run_id, "small_grid")).info.run_id
            for k, v in {**params[name], "seed": seed, "data.train_size": 300, "model.norm": "none"}.items():
                client.log_param(run, k, v)
            client.log_metric(run, "test/err", e)
            client.log_metric(run, "train/err", 0.0)
            client.log_metric(run, "train_eval/err", 0.01 * seed)
            client.set_terminated(run)
    return client, parent


OFFSET = (0.0, 0.06, -0.05)  # what each seed's data does to every technique
SMALL_GRID = {"none": [0.30 + o for o in OFFSET],
              "dropout": [0.20 + o + d for o, d in zip(OFFSET, (0.0, 0.004, -0.003))],
              "l2": [0.30 + o + d for o, d in zip(OFFSET, (-0.002, 0.001, -0.004))],
              "max_norm": [0.30 + o + d for o, d in zip(OFFSET, (0.002, -0.001, 0.002))]}


def test_grid_report_pairs_by_seed_and_ranks_techniques_inside_the_noise_as_ties(mlflow_uri, tmp_path):
    from reglab.studies import regularization_grid as rg

    client, parent = small_grid(mlflow_uri)
    rg.report(client, parent, tmp_path)
    paired = pd.read_csv(tmp_path / "paired.csv").set_index("technique")
    assert sorted(paired.index) == ["dropout keep 0.5", "l2 0.0005", "max_norm c=3"] and (paired["n"] == 3).all()
    d = np.subtract(SMALL_GRID["dropout"], SMALL_GRID["none"])  # the seed offsets cancel: -0.1 +- 0.004
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    row = paired.loc["dropout keep 0.5"]
    assert (row.diff_mean, row.diff_ci_low, row.diff_ci_high) == pytest.approx((d.mean(), d.mean() - half,
                                                                                d.mean() + half))
    assert row.distinct and not paired.loc["l2 0.0005", "distinct"] and not paired.loc["max_norm c=3", "distinct"]
    grid = pd.read_csv(tmp_path / "grid.csv").set_index("technique")
    # Unpaired, the seeds' spread hides even dropout's 10 points: the two techniques' own intervals overlap.
    assert grid.loc["dropout keep 0.5", "test_err_ci_high"] > grid.loc["none", "test_err_ci_low"]
    assert grid.loc["dropout keep 0.5", "rank"] == 1
    assert {grid.loc[t, "rank"] for t in ("none", "l2 0.0005", "max_norm c=3")} == {2}  # ties: inside the noise
    assert grid.loc["dropout keep 0.5", "vs_none_distinct"] and math.isnan(grid.loc["none", "vs_none_mean"])
    assert grid.loc["none", "test_err_se"] == pytest.approx(np.std(SMALL_GRID["none"], ddof=1) / math.sqrt(3))
    assert list(grid["rank"]) == sorted(grid["rank"])
    assert grid.loc["none", "train_eval_err_mean"] == pytest.approx(0.01)  # logged: summarized beside train/err
    assert "| 300 | 1 | dropout keep 0.5 | 3 |" in (tmp_path / "grid.md").read_text()
    assert "| 300 | dropout keep 0.5 | 3 |" in (tmp_path / "paired.md").read_text()
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "learning_curve.png").exists()  # one training-set size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_sweep_their_axis_without_dash_m_and_say_what_they_cost(name):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    text = (CONF / "exp" / f"{name}.yaml").read_text()
    assert all(f"# {field}:" in text for field in ("Command", "Question", "Setting", "Runtime"))
    assert "PLACEHOLDER" not in text
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"+exp={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and PRESETS[name] in cfg.hydra.sweeper.params
    assert cfg.study == name and cfg.report._target_ == "reglab.studies.regularization_grid.report"
    assert cfg.callbacks.early_stopping is None and cfg.data.label_noise > 0


def test_techniques_are_named_from_their_params_and_recipes_from_conf():
    from reglab.studies.regularization_grid import recipes, technique

    known = recipes()
    assert known[(frozenset({"l2", "dropout"}), "batch")] == "l2_dropout_bn"
    assert technique({}, "none", known) == "none"
    assert technique({"regularization.max_norm.max_norm": "3.0"}, "none", known) == "max_norm c=3"
    params = {"regularization.weight_decay.strength": "0.01", "regularization.dropout.keep_prob": "0.8",
              "model.norm": "batch"}
    assert technique(params, "none", known) == "efficientnet_style: weight_decay 0.01 + dropout keep 0.8 + batch norm"
    # A ResNet18 already has batch norm: the recipe adds no "batch norm" to the label but is still recognized.
    assert technique({**params}, "batch", known) == "efficientnet_style: weight_decay 0.01 + dropout keep 0.8"


def test_the_grid_names_the_runs_it_left_out_and_the_commits_it_pools(empty_store, tmp_path):
    """A technique whose runs all failed vanished from grid.md and grid.png without a word; runs of two commits (a
    study rerun after a change of the code trains only what is new) were pooled without one."""
    from conftest import with_store

    from reglab.runs.study import child_tags
    from reglab.studies import regularization_grid as rg

    client, parent = small_grid(f"sqlite:///{with_store(tmp_path, empty_store)}/mlruns/mlflow.db")
    exp = parent.info.experiment_id
    for seed in range(3):
        run = client.create_run(exp, tags={**child_tags(parent.info.run_id, "small_grid"), "regularization": "l1",
                                           "failure_reason": "divergence: train/loss is nan"}).info.run_id
        client.log_param(run, "regularization.l1.strength", "10.0")
        client.set_terminated(run, "FAILED")
    client.set_tag(parent.info.run_id, "sweep.regularization", "[],dropout,l2,max_norm,l1")
    for r in client.search_runs([exp], "attributes.status = 'FINISHED'"):
        client.set_tag(r.info.run_id, "git_commit", "0123456789abcdef" if r.data.params["seed"] == "2" else "fedcba")
    out = tmp_path / "report"
    out.mkdir()
    rg.report(client, client.get_run(parent.info.run_id), out)
    md = (out / "grid.md").read_text()
    assert "Left out: 3 child run(s) that did not finish." in md
    assert md.count("- regularization=l1: FAILED, divergence: train/loss is nan") == 3
    assert "Code: the finished runs come from 2 commits (fedcba: 8, 0123456789ab: 4 runs)" in md
