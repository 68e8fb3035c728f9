"""+exp=regularization_grid end to end, made tiny (2 techniques x 2 training-set sizes x 2 seeds, 2 epochs) through
the real CLI into an MLflow store: the table is the runs' MLflow metrics, sorted best to worst, the recipe is named,
and the learning-curve figure appears because the study has a data.train_size axis. The presets themselves
(grid, learning curve, ResNet18) compose with their axes and say what they cost."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import CONF
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
        assert len(runs) == 2 and row.seeds == 2
        test = np.array([k.data.metrics["test/err"] for k in runs])
        train = np.array([k.data.metrics["train/err"] for k in runs])
        zero = np.array([k.data.metrics["params/zero_frac"] for k in runs])
        assert row.test_err_mean == pytest.approx(test.mean(), abs=1e-12)
        assert row.test_err_std == pytest.approx(test.std(), abs=1e-12)
        assert row.train_err_mean == pytest.approx(train.mean(), abs=1e-12)
        assert row.gap_mean == pytest.approx((test - train).mean(), abs=1e-12)
        assert row.zero_frac_mean == pytest.approx(zero.mean(), abs=1e-12)
        assert all((k.data.params["model.norm"] == "batch") == recipe for k in runs)  # the recipe's batch norm
    # Sorted: largest training set first, then best (lowest mean test error) to worst.
    assert list(table["train_size"]) == [120, 120, 60, 60]
    for size in (60, 120):
        errs = table[table.train_size == size]["test_err_mean"].to_list()
        assert errs == sorted(errs)
    files = {"grid.png", "grid.csv", "grid.md", "runs.csv", "learning_curve.png", "config.yaml"}
    assert files <= {p.name for p in out.iterdir()}
    assert files <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    for png in ("grid.png", "learning_curve.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


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
    params = {"regularization.weight_decay.strength": "1e-05", "regularization.dropout.keep_prob": "0.8",
              "model.norm": "batch"}
    assert technique(params, "none", known) == "efficientnet_style: weight_decay 1e-05 + dropout keep 0.8 + batch norm"
    # A ResNet18 already has batch norm: the recipe adds no "batch norm" to the label but is still recognized.
    assert technique({**params}, "batch", known) == "efficientnet_style: weight_decay 1e-05 + dropout keep 0.8"
