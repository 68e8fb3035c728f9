"""+exp=early_stopping end to end, made tiny: 4 arms x 2 seeds through the real CLI into an MLflow store; the report's
numbers are the runs' MLflow metrics, i* is the argmin of the val/loss history, and the arms differ only in stopping.
The same sweep's store is where reglab.results is tested on a real study (tests/test_results.py has its math)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from train_cli import run_study

from reglab import results
from reglab.errors import ReglabError

EPOCHS, PATIENCE = 6, 1
EXPERIMENT = "early_stopping_test"
# Overfits within a few epochs: 100 noisy examples, a high learning rate.
TINY = ["+exp=early_stopping", "hydra/launcher=basic", "seed=0,1", f"trainer.max_epochs={EPOCHS}",
        f"patience={PATIENCE}", "data.train_size=100", "model.width=128", "optim.lr=0.01"]
ARM_METRIC = {"final": "test/err", "best": "test/err", "retrain": "early_stopping/test/err",
              "continue": "early_stopping/test/err"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, mlflow_uri):
    return run_study(tmp_path_factory.mktemp("es_study"), mlflow_uri, EXPERIMENT, "early_stopping", *TINY)


def _arm(run) -> str:
    """The arm from the child's logged config, read here independently of the report's own reading."""
    params = run.data.params
    if "callbacks.early_stopping.monitor" not in params:  # stopping=final removes the callback
        return "final"
    after = params["stopping.after_stop"]
    return {"none": "best"}.get(after, after)


def _val_loss(client, run) -> np.ndarray:
    h = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
    assert [s for s, _ in h] == list(range(len(h)))  # one point per epoch, no gap
    return np.array([v for _, v in h])


@pytest.mark.slow  # the module's sweep: ~30-50 s on 2 loaded cores
def test_every_arm_and_seed_is_one_finished_child_and_the_report_is_written(study):
    out, client, parent, kids = study
    assert sorted((_arm(k), int(k.data.params["seed"])) for k in kids) == sorted(
        (a, s) for a in ARM_METRIC for s in (0, 1))
    assert all(k.info.status == "FINISHED" for k in kids) and parent.info.status == "FINISHED"
    files = {"learning_curves.png", "test_error.png", "test_error.csv", "test_error.md", "paired.csv", "paired.md",
             "stopping_points.csv", "stopping_points.md", "runs.csv", "config.yaml"}
    assert files <= {p.name for p in out.iterdir()}
    assert files <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    for png in ("learning_curves.png", "test_error.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn figure, not an empty canvas


def test_test_error_table_is_mean_and_standard_error_of_the_runs_mlflow_metrics(study):
    out, _, _, kids = study
    table = pd.read_csv(out / "test_error.csv").set_index("arm")
    assert list(table.index) == list(ARM_METRIC)  # final, best, retrain, continue
    for arm, metric in ARM_METRIC.items():
        values = np.array([k.data.metrics[metric] for k in kids if _arm(k) == arm])
        assert len(values) == 2 and table.loc[arm, "n"] == 2
        assert table.loc[arm, "test_err_mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert table.loc[arm, "test_err_std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert table.loc[arm, "test_err_se"] == pytest.approx(values.std(ddof=1) / math.sqrt(2), abs=1e-12)
    # paired.csv: each early-stopping arm minus `final`, seed by seed
    paired = pd.read_csv(out / "paired.csv").set_index("arm")
    assert list(paired.index) == ["best", "retrain", "continue"] and (paired["n"] == 2).all()
    by = {(_arm(k), int(k.data.params["seed"])): k.data.metrics[ARM_METRIC[_arm(k)]] for k in kids}
    for arm in paired.index:
        d = np.array([by[arm, s] - by["final", s] for s in (0, 1)])
        assert paired.loc[arm, "diff_mean"] == pytest.approx(d.mean(), abs=1e-12)
        half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / math.sqrt(2)  # 1 degree of freedom: t = 12.7
        assert paired.loc[arm, "diff_ci_high"] == pytest.approx(d.mean() + half, abs=1e-12)
        assert paired.loc[arm, "distinct"] == bool(d.mean() - half > 0 or d.mean() + half < 0)
    # retrain/continue: a real second phase ran, trained steps and was tested on its own.
    for k in kids:
        if _arm(k) in ("retrain", "continue"):
            assert k.data.metrics["early_stopping/steps"] > 0 and "early_stopping/test/err" in k.data.metrics


def test_i_star_is_the_argmin_of_the_val_loss_history_and_stopping_follows_patience(study):
    out, client, _, kids = study
    points = pd.read_csv(out / "stopping_points.csv").set_index("seed")
    runs = pd.read_csv(out / "runs.csv")
    for k in kids:
        arm, seed = _arm(k), int(k.data.params["seed"])
        val = _val_loss(client, k)
        i_star = int(np.argmin(val)) + 1  # epochs are 1-based: the state after i* epochs
        row = runs[runs.run_id == k.info.run_id].iloc[0]
        assert row.i_star == i_star and row.epochs == len(val)
        if arm == "final":
            assert len(val) == EPOCHS  # trained past the optimum, all epochs
            assert points.loc[seed, "argmin_all_epochs"] == i_star
            continue
        # Lightning's EarlyStopping stops `patience` epochs after the best one, or at max_epochs.
        assert len(val) == min(i_star + PATIENCE, EPOCHS)
        assert k.data.metrics["early_stopping/best_epoch"] + 1 == i_star  # theta* is the argmin checkpoint
        assert k.data.metrics["early_stopping/best_val_loss"] == pytest.approx(val.min(), rel=1e-6)
        if arm == "best":
            assert points.loc[seed, "i_star"] == i_star and points.loc[seed, "stopped_at"] == len(val)


def test_arms_share_the_first_phase_so_they_differ_only_in_stopping(study):
    _, client, _, kids = study
    by = {(_arm(k), int(k.data.params["seed"])): k for k in kids}
    stopped_early = 0
    for seed in (0, 1):
        full = _val_loss(client, by[("final", seed)])
        for arm in ("best", "retrain", "continue"):
            es = _val_loss(client, by[(arm, seed)])
            np.testing.assert_allclose(es, full[: len(es)], rtol=1e-6)  # the same training until it stops
            # theta* is the same checkpoint in every early-stopping arm: the same test error before after_stop.
            assert by[(arm, seed)].data.metrics["test/err"] == pytest.approx(by[("best", seed)].data.metrics["test/err"])
        stopped_early += len(_val_loss(client, by[("best", seed)])) < EPOCHS
    assert stopped_early >= 1, "the tiny task should overfit and stop early for at least one seed"


def test_results_reads_the_study_store_one_row_per_child_with_its_params_and_metrics(study, mlflow_uri):
    out, client, parent, kids = study
    df = results.runs(client, parent)
    assert sorted(df["run_id"]) == sorted(k.info.run_id for k in kids) and (df["status"] == "FINISHED").all()
    for k in kids:
        row = df[df.run_id == k.info.run_id].iloc[0]
        assert row["seed"] == int(k.data.params["seed"]) and isinstance(row["seed"], (int, np.integer))  # parsed
        assert row["optim.lr"] == pytest.approx(float(k.data.params["optim.lr"]))
        assert row["test/err"] == k.data.metrics["test/err"]
        if _arm(k) == "final":  # no callback: the param is absent from the run, NaN in the frame
            assert pd.isna(row["callbacks.early_stopping.monitor"])
    # load(): the same frame from the store's address and the study's name (its newest parent)
    loaded = results.load("early_stopping", experiment=EXPERIMENT, tracking_uri=mlflow_uri)
    assert sorted(loaded["run_id"]) == sorted(df["run_id"])
    assert sorted(results.load(parent=parent.info.run_id, tracking_uri=mlflow_uri)["run_id"]) == sorted(df["run_id"])
    # summarize on the real frame: per seed over the 4 arms, against the report's own reading of the same runs
    s = results.summarize(df, "seed", "test/err").set_index("seed")
    for seed in (0, 1):
        v = [k.data.metrics["test/err"] for k in kids if int(k.data.params["seed"]) == seed]
        assert s.loc[seed, "n"] == 4 and s.loc[seed, "test/err_se"] == pytest.approx(np.std(v, ddof=1) / 2)
        half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
        assert s.loc[seed, "test/err_ci_low"] == pytest.approx(np.mean(v) - half)
    # paired on the real frame: theta* (the best checkpoint's test/err) minus the final weights', seed by seed, as
    # the report computed it
    df["arm"] = df["run_id"].map({k.info.run_id: _arm(k) for k in kids})
    d = results.paired(df, "arm", "final", "test/err").set_index("arm")
    report = pd.read_csv(out / "paired.csv").set_index("arm")
    assert d.loc["best", "diff_mean"] == pytest.approx(report.loc["best", "diff_mean"], abs=1e-12)
    with pytest.raises(ReglabError, match="no column 'test/error'"):
        results.summarize(df, "arm", "test/error")


def test_results_reads_the_study_store_histories_one_row_per_run_and_epoch(study):
    _, client, parent, kids = study
    h = results.runs(client, parent, history=["val/loss", "train/loss"])
    for k in kids:
        mine = h[h.run_id == k.info.run_id].sort_values("step")
        val = _val_loss(client, k)
        assert list(mine["step"]) == list(range(len(val))) and list(mine["epoch"]) == list(range(1, len(val) + 1))
        np.testing.assert_allclose(mine["val/loss"], val)
        assert (mine["seed"] == int(k.data.params["seed"])).all()  # params repeated on every row
