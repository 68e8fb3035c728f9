"""The double-descent report: numbers (mean and standard error over seeds, interpolation threshold) from a synthetic
MLflow study, every file written locally and to the parent run, and the report script's errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import compose
from train_cli import train_cli

from reglab.runs import study as runs_study

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
EPOCHS = 6
# width -> (final train error, final test error); seed s adds (-1)^s * 0.02 to the test error.
FINAL = {2: (0.50, 0.40), 8: (0.005, 0.60), 32: (0.0, 0.30)}


def study_config(uri: str, study: str, *overrides: str):
    """The MNIST-1D double-descent preset renamed `study`, logging to `uri` (the report is the preset's)."""
    return compose(["+exp=double_descent_mnist1d", f"study={study}", f"logger.tracking_uri={uri}",
                    "logger.experiment=report_test", *overrides])


def make_study(uri: str, study: str) -> str:
    """A parent with one child per (width, seed) whose histories descend linearly to FINAL."""
    from reglab.runs import store

    cfg = study_config(uri, study)
    client, exp, _ = store.experiment(cfg)
    parent = runs_study.open_parent(cfg, {"model.width": ",".join(map(str, FINAL)), "seed": "0,1"})
    for width, (train_final, test_final) in FINAL.items():
        for seed in (0, 1):
            run = client.create_run(exp, tags=runs_study.child_tags(parent, study)).info.run_id
            client.log_param(run, "model.width", width)
            client.log_param(run, "seed", seed)
            client.log_param(run, "model.params", width * 100)
            test = test_final + (-1) ** seed * 0.02
            for step in range(EPOCHS):
                frac = (EPOCHS - 1 - step) / (EPOCHS - 1)  # 1 at the first epoch, 0 at the last
                client.log_metric(run, "train/err", train_final + frac * (0.9 - train_final), step=step)
                client.log_metric(run, "test/err", test + frac * (0.9 - test), step=step)
            client.log_metric(run, "test/err", test, step=EPOCHS)  # the final trainer.test, one step past
            client.set_terminated(run)
    unfinished = client.create_run(exp, tags=runs_study.child_tags(parent, study)).info.run_id
    client.log_param(unfinished, "model.width", 64)  # still running: not in the report
    client.log_metric(unfinished, "train/err", 0.1, step=0)
    client.log_metric(unfinished, "test/err", 0.1, step=0)
    return parent


@pytest.fixture(scope="module")
def report_dir(mlflow_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    parent = make_study(mlflow_uri, "synthetic_dd")
    # Left by an earlier report of another configuration of the study: not this parent's.
    (root / "results" / "synthetic_dd").mkdir(parents=True)
    (root / "results" / "synthetic_dd" / "table_of_another_setting.md").write_text("stale\n")
    # The report the parent names (tag reglab.report), not the config's: this config names none.
    cfg = compose(["study=synthetic_dd", f"paths.root={root}", f"logger.tracking_uri={mlflow_uri}",
                   "logger.experiment=report_test"])
    out = runs_study.write_report(cfg)
    assert out == root / "results" / "synthetic_dd"
    return out, parent


def test_modelwise_table_is_mean_and_standard_error_over_seeds(report_dir):
    out, _ = report_dir
    t = pd.read_csv(out / "modelwise.csv").set_index("width")
    assert list(t.index) == [2, 8, 32]  # the unfinished width-64 child is left out
    assert (t["n"] == 2).all() and (t["epochs"] == EPOCHS).all()
    for width, (train_final, test_final) in FINAL.items():
        assert t.loc[width, "test_err_mean"] == pytest.approx(test_final)
        # seeds at test_final +- 0.02: sample std (ddof=1) 0.02 * sqrt(2), over sqrt(n = 2)
        assert t.loc[width, "test_err_se"] == pytest.approx(0.02)
        assert t.loc[width, "train_err_mean"] == pytest.approx(train_final)
        assert t.loc[width, "params"] == width * 100
    # Width 8 is the first whose train error is <= 1%: the interpolation threshold, where the test error peaks.
    md = (out / "modelwise.md").read_text()
    assert "Interpolation threshold (first width with mean final train error <= 1%, by train/err" in md
    assert "train mode)): 8." in md  # these children have no train_eval/err: the report falls back and says so
    assert "Test-error peak (second descent): width 8." in md


def test_peak_is_after_the_classical_sweet_spot_not_an_underfitting_width():
    from reglab.studies.double_descent import peak_width

    t = pd.DataFrame({"width": [4, 16, 48, 64, 256], "test_err_mean": [0.62, 0.50, 0.56, 0.52, 0.46],
                      "train_err_mean": [0.62, 0.44, 0.08, 0.0, 0.0]})
    assert peak_width(t) == 48  # not width 4, whose error is higher only because it underfits


def test_epochwise_table_has_every_width_and_epoch_once(report_dir):
    out, _ = report_dir
    e = pd.read_csv(out / "epochwise.csv")
    assert len(e) == len(FINAL) * EPOCHS and not e.duplicated(["width", "epoch"]).any()
    assert sorted(e["epoch"].unique()) == list(range(1, EPOCHS + 1))  # epoch e = after e epochs; no final-test row
    first = e[(e.width == 32) & (e.epoch == 1)].iloc[0]
    assert first.test_err_mean == pytest.approx(0.9)
    md = (out / "epochwise.md").read_text()
    assert "| width | epoch 1 | epoch 2 | epoch 5 | epoch 6 |" in md


def test_a_file_an_earlier_report_left_is_neither_kept_nor_uploaded(report_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    out, parent = report_dir
    assert not (out / "table_of_another_setting.md").exists()
    assert "table_of_another_setting.md" not in {a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent)}


def test_report_writes_every_file_locally_and_to_the_parent_run(report_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    out, parent = report_dir
    files = {"modelwise.png", "epochwise_heatmap.png", "epochwise_curves.png", "modelwise.csv", "modelwise.md",
             "epochwise.csv", "epochwise.md", "config.yaml"}
    assert files <= {p.name for p in out.iterdir()}
    for png in ("modelwise.png", "epochwise_heatmap.png", "epochwise_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real figure, not an empty canvas
    assert files <= {a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent)}


def test_the_report_is_of_the_parent_whose_configuration_the_command_names_not_the_newest(tmp_path, mlflow_uri):
    """A sweep (parent A), then a smoke run of the same study with trainer.max_epochs=2 (parent B, newer), then A's
    command again: A's report, though B started last."""
    parent = make_study(mlflow_uri, "two_parents")
    runs_study.open_parent(study_config(mlflow_uri, "two_parents", "trainer.max_epochs=2"),
                           {"model.width": "2", "seed": "0"})
    out = runs_study.write_report(study_config(mlflow_uri, "two_parents", f"paths.root={tmp_path}"))
    # Again: every file again (config.yaml, copied from the parent's artifact with the time the previous one had,
    # was removed by every second report as a file it had not written).
    again = runs_study.write_report(study_config(mlflow_uri, "two_parents", f"paths.root={tmp_path}"))
    assert (again / "config.yaml").is_file() and again == out
    modelwise = pd.read_csv(out / "modelwise.csv")
    assert list(modelwise["width"]) == list(FINAL) and set(modelwise["n"]) == {2}
    from mlflow.tracking import MlflowClient

    assert "modelwise.csv" in {a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent)}


def test_a_report_refuses_to_pool_runs_that_differ_in_a_swept_key_it_does_not_separate(tmp_path, mlflow_uri):
    """optim.lr=0.01,0.05 added to a double-descent sweep: one parent, and a model-wise table per width would average
    the two learning rates as if they were seeds."""
    from mlflow.tracking import MlflowClient

    from reglab.errors import ReglabError
    from reglab.runs import store

    cfg = study_config(mlflow_uri, "pooled", f"paths.root={tmp_path}")
    client, exp, _ = store.experiment(cfg)
    parent = runs_study.open_parent(cfg, {"model.width": "2", "seed": "0", "optim.lr": "0.01,0.05"})
    for lr in (0.01, 0.05):
        run = client.create_run(exp, tags=runs_study.child_tags(parent, "pooled")).info.run_id
        for key, value in (("model.width", 2), ("seed", 0), ("optim.lr", lr)):
            client.log_param(run, key, value)
        for step in range(2):
            client.log_metric(run, "train/err", 0.5, step=step)
            client.log_metric(run, "test/err", 0.5 + lr, step=step)
        client.set_terminated(run)
    with pytest.raises(ReglabError, match=r"differ in optim.lr \(0.01, 0.05\), which its report does not separate"):
        runs_study.write_report(cfg)
    assert MlflowClient(mlflow_uri).list_artifacts(parent, "modelwise.csv") == []


def test_a_swept_config_group_is_not_pooled_either(tmp_path, mlflow_uri):
    """regularization=[],dropout added to a double-descent sweep: a group is logged as the params under it (none
    for []), so there was no `regularization` column to compare and the report averaged the two as seeds."""
    from reglab.errors import ReglabError
    from reglab.runs import store

    cfg = study_config(mlflow_uri, "pooled_group", f"paths.root={tmp_path}")
    client, exp, _ = store.experiment(cfg)
    parent = runs_study.open_parent(cfg, {"model.width": "2", "seed": "0", "regularization": "[],dropout"})
    for params in ({}, {"regularization.dropout.keep_prob": 0.5}):
        run = client.create_run(exp, tags=runs_study.child_tags(parent, "pooled_group")).info.run_id
        for key, value in {"model.width": 2, "seed": 0, **params}.items():
            client.log_param(run, key, value)
        for step in range(2):
            client.log_metric(run, "train/err", 0.5, step=step)
            client.log_metric(run, "test/err", 0.5, step=step)
        client.set_terminated(run)
    with pytest.raises(ReglabError, match=r"differ in regularization \(none, regularization.dropout.keep_prob=0.5\)"):
        runs_study.write_report(cfg)


def test_report_script_names_a_missing_study_in_one_line(tmp_root, mlflow_uri):
    out = train_cli("study=no_such_study", f"paths.root={tmp_root}", f"logger.tracking_uri={mlflow_uri}",
                    script=SCRIPT, cwd=tmp_root)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: study='no_such_study': no parent run in this MLflow store (run the sweep first)"


def test_report_script_help_is_its_usage(tmp_root):
    out = train_cli("--help", script=SCRIPT, cwd=tmp_root)  # an error ("study=NAME is required") before
    assert out.returncode == 0 and out.stdout.startswith("Write a study's report from MLflow:"), out.stderr[-2000:]


@pytest.mark.parametrize("mistake, words", [
    (["logger=mlfow"], ["logger=mlfow", "conf/logger/mlfow.yaml", "mlflow"]),
    (["paths.rot=x"], ["paths.rot", "misspelled"]),
])
def test_report_script_names_a_mistyped_option_or_key_in_one_line(tmp_root, mistake, words):
    out = train_cli("study=double_descent_mnist1d", f"paths.root={tmp_root}", *mistake, script=SCRIPT, cwd=tmp_root)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_a_report_target_from_the_store_must_be_on_the_allowlist(tmp_path, mlflow_uri):
    """A store may have been shared: the parent's reglab.report tag is checked like a config's _target_."""
    from mlflow.tracking import MlflowClient

    from reglab.errors import ConfigError

    parent = make_study(mlflow_uri, "shared_dd")
    MlflowClient(mlflow_uri).set_tag(parent, "reglab.report", "os.system")
    cfg = compose(["study=shared_dd", f"paths.root={tmp_path}", f"logger.tracking_uri={mlflow_uri}",
                   "logger.experiment=report_test"])
    with pytest.raises(ConfigError, match=r"^report\._target_='os\.system' is not allowed"):
        runs_study.write_report(cfg, parent)
    assert not (tmp_path / "results").exists()
