"""The double-descent study: the report's numbers over seeds (n, mean, standard error with ddof=1) and one seed, and
the paper's preset (`+exp=double_descent`: ResNet18 x CIFAR-10) end to end through the real CLI on CPU: populations,
child runs, parent run, report."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
from conftest import compose, with_store
from scipy import stats
from omegaconf import OmegaConf
from train_cli import run_study

from reglab.studies import double_descent as dd


def history(finals: dict[int, list[tuple[float, float]]], epochs: int = 3) -> pd.DataFrame:
    """Per-epoch rows as `collect` returns them. finals: width -> (final test error, final train error) of each of
    its seeds; both fall linearly from 0.9 to those, and the test loss is twice the test error."""
    rows = []
    for width, seeds in finals.items():
        for seed, (test, train) in enumerate(seeds):
            for e in range(1, epochs + 1):
                frac = (epochs - e) / (epochs - 1)  # 1 at the first epoch, 0 at the last
                err = test + frac * (0.9 - test)
                rows.append({"run": f"w{width}s{seed}", "width": width, "seed": seed, "params": 100 * width,
                             "epoch": e, "test_err": err, "train_err": train + frac * (0.9 - train),
                             "test_loss": 2 * err})
    return pd.DataFrame(rows)


def test_modelwise_table_is_n_mean_and_standard_error_with_ddof_1():
    h = history({1: [(0.3, 0.8), (0.4, 0.8), (0.8, 0.8)], 2: [(0.5, 0.6), (0.7, 0.4)], 4: [(0.6, 0.5)]})
    t = dd.modelwise_table(h).set_index("width")
    assert list(t.index) == [1, 2, 4] and list(t["n"]) == [3, 2, 1] and (t["epochs"] == 3).all()
    # width 1: mean 0.5, sample std sqrt((0.04 + 0.01 + 0.09) / 2) = sqrt(0.07), SE = sqrt(0.07 / 3) = 0.1528
    # (ddof=0 would give sqrt(0.14 / 3) / sqrt(3) = 0.1247)
    assert t.loc[1, "test_err_mean"] == pytest.approx(0.5)
    assert t.loc[1, "test_err_se"] == pytest.approx(math.sqrt(0.07 / 3))
    assert t.loc[1, "train_err_se"] == pytest.approx(0)  # equal values: SE 0, not NaN
    assert t.loc[2, "train_err_mean"] == pytest.approx(0.5) and t.loc[2, "train_err_se"] == pytest.approx(0.1)
    assert t.loc[2, "test_err_se"] == pytest.approx(0.1)  # two seeds at m +- d: SE = d
    assert t.loc[2, "test_loss_mean"] == pytest.approx(1.2) and t.loc[2, "test_loss_se"] == pytest.approx(0.2)
    assert t.loc[4, "test_err_mean"] == pytest.approx(0.6) and t.loc[4, "params"] == 400
    assert t.loc[4, ["test_err_se", "train_err_se", "test_loss_se"]].isna().all()  # one seed: no SE
    # 95% interval: mean +- t_{0.975, n-1} SE (width 1: n = 3, 2 degrees of freedom)
    half = stats.t.ppf(0.975, 2) * math.sqrt(0.07 / 3)
    assert (t.loc[1, "test_err_ci_low"], t.loc[1, "test_err_ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    assert t.loc[1, "test_err_std"] == pytest.approx(math.sqrt(0.07))
    assert math.isnan(t.loc[4, "test_err_ci_low"])


def test_epochwise_table_is_the_mean_over_seeds_of_each_width_and_epoch():
    h = history({1: [(0.3, 0.8), (0.4, 0.8), (0.8, 0.8)], 2: [(0.5, 0.6), (0.7, 0.4)]})
    e = dd.epochwise_table(h).set_index(["width", "epoch"])
    assert len(e) == 6 and list(e["n"]) == [3, 3, 3, 2, 2, 2]
    assert e.loc[(1, 1), "test_err_mean"] == pytest.approx(0.9)  # every seed starts at 0.9
    assert e.loc[(1, 1), "test_err_se"] == pytest.approx(0)
    assert e.loc[(1, 2), "test_err_mean"] == pytest.approx(np.mean([0.6, 0.65, 0.85]))
    assert e.loc[(2, 3), "test_err_se"] == pytest.approx(0.1)


def test_threshold_uses_the_eval_mode_train_error_only_when_every_width_has_it():
    t = pd.DataFrame({"width": [2, 8, 32], "train_err_mean": [0.3, 0.0, 0.0], "train_eval_err_mean": [0.3, 0.05, 0.0]})
    assert dd.threshold_metric(t) == "train_eval_err" and dd.interpolation_threshold(t) == 32
    assert dd.interpolation_threshold(t, "train_err") == 8
    t.loc[1, "train_eval_err_mean"] = np.nan  # one width without it: train/err for all, not a mix
    assert dd.threshold_metric(t) == "train_err" and dd.interpolation_threshold(t) == 8


def test_threshold_and_peak_are_found_on_the_means_not_on_one_seed():
    # Width 8: seed 0 fits the noisy labels (train error 0) and peaks (test 0.7), seed 1 does neither; on the means
    # (train 0.05, test 0.5) the threshold and the peak are width 16. Seed 0 alone, or the highest run, says 8.
    h = history({2: [(0.5, 0.5)] * 2, 8: [(0.7, 0.0), (0.3, 0.1)], 16: [(0.6, 0.0)] * 2, 32: [(0.4, 0.0)] * 2})
    t = dd.modelwise_table(h)
    assert dd.interpolation_threshold(t) == 16
    assert dd.peak_width(t) == 16 and dd.peak_width(t, "test_loss") == 16


def test_a_curve_that_only_falls_has_no_peak_and_no_second_descent():
    # The sweet spot is the threshold width (32) and nothing past it is higher: "the peak" was width 32 itself,
    # "peak minus first minimum" negative and "distinct" (its interval below 0), reported as a second descent.
    h = history({2: [(0.60, 0.5), (0.62, 0.5)], 8: [(0.50, 0.3), (0.53, 0.3)], 32: [(0.40, 0.0), (0.41, 0.0)],
                 64: [(0.35, 0.0), (0.37, 0.0)]})
    t = dd.modelwise_table(h)
    assert dd.sweet_spot(t) == 32 and dd.peak_width(t) is None and dd.second_descent(h, t) is None
    assert dd.peak_text(t, "test_err").startswith("none (the mean falls or stays level past")


def test_second_descent_is_the_peak_minus_the_first_minimum_paired_by_seed():
    # Seed offsets shared across widths (a seed's data is the same at every width): the per-seed differences at the
    # peak (width 8) minus the first minimum (width 2) are 0.10, 0.12, 0.14: mean 0.12, SE = std(ddof=1) / sqrt(3)
    h = history({1: [(0.55, 0.5), (0.65, 0.5), (0.75, 0.5)], 2: [(0.40, 0.4), (0.50, 0.4), (0.60, 0.4)],
                 8: [(0.50, 0.0), (0.62, 0.0), (0.74, 0.0)], 32: [(0.30, 0.0), (0.35, 0.0), (0.40, 0.0)]})
    d = dd.second_descent(h, dd.modelwise_table(h))
    assert (d["peak_width"], d["first_min_width"], d["n"]) == (8, 2, 3)
    assert d["peak_minus_first_min"] == pytest.approx(0.12)
    se = np.std([0.10, 0.12, 0.14], ddof=1) / math.sqrt(3)
    assert d["peak_minus_first_min_se"] == pytest.approx(se)
    half = stats.t.ppf(0.975, 2) * se  # Student's t with n - 1 = 2 degrees of freedom
    assert (d["peak_minus_first_min_ci_low"], d["peak_minus_first_min_ci_high"]) == pytest.approx(
        (0.12 - half, 0.12 + half))
    assert d["distinct"]  # 0.12 +- 0.05: the interval excludes 0
    # Unpaired, the widths' seed spread (0.1 per seed step) would swamp it: SE of the difference of means ~0.08.
    assert d["peak_minus_first_min_se"] < 0.02


def single_seed_study(uri: str, eval_mode: bool = False):
    """A parent with one FINISHED child per width (seed 0; per-epoch points and the final test one step past) and
    one FAILED child, written to the MLflow store as a sweep writes them. With `eval_mode`, the children also have
    the eval-mode train error (once, step = last epoch) and the weight norm (per epoch), as the Classifier logs them:
    width 8 fits its noisy labels in train mode's batch average (train/err 0) but not in eval mode (5%)."""
    from mlflow.tracking import MlflowClient

    from reglab.runs.study import child_tags

    client = MlflowClient(uri)
    name = "one_seed_eval" if eval_mode else "one_seed"
    exp = client.create_experiment(f"double_descent_{name}")
    parent = client.create_run(exp, run_name=name, tags={"study": name, "reglab.role": "parent",
                                                         "sweep.model.width": "2,8,32"}).info.run_id
    for width, test, train, train_eval in ((2, 0.5, 0.45, 0.4), (8, 0.6, 0.0, 0.05), (32, 0.3, 0.0, 0.0)):
        run = client.create_run(exp, tags=child_tags(parent, name)).info.run_id
        client.log_param(run, "model.width", width)
        client.log_param(run, "seed", 0)
        for step in range(3):
            client.log_metric(run, "train/err", train + (2 - step) * 0.1, step=step)
            client.log_metric(run, "test/err", test + (2 - step) * 0.1, step=step)
            client.log_metric(run, "test/loss", 2 * test + (2 - step) * 0.1, step=step)
            if eval_mode:
                client.log_metric(run, "params/l2", width * (1 + step), step=step)
        if eval_mode:
            client.log_metric(run, "train_eval/err", train_eval, step=2)
        client.log_metric(run, "test/err", test, step=3)  # the final trainer.test
        client.set_terminated(run)
    failed = client.create_run(exp, tags={**child_tags(parent, "one_seed"), "failure_reason": "divergence: nan"})
    client.log_param(failed.info.run_id, "model.width", 64)
    client.set_terminated(failed.info.run_id, "FAILED")
    return client, client.get_run(parent)


def test_report_of_a_single_seed_study_has_no_band_and_blank_standard_errors(mlflow_uri, tmp_path):
    client, parent = single_seed_study(mlflow_uri)
    dd.report(client, parent, tmp_path)
    t = pd.read_csv(tmp_path / "modelwise.csv").set_index("width")
    assert list(t.index) == [2, 8, 32] and (t["n"] == 1).all() and (t["epochs"] == 3).all()
    assert list(t["test_err_mean"]) == pytest.approx([0.5, 0.6, 0.3])
    assert list(t["test_loss_mean"]) == pytest.approx([1.0, 1.2, 0.6])
    assert t[["test_err_se", "train_err_se", "test_loss_se"]].isna().all().all()
    md = (tmp_path / "modelwise.md").read_text()
    assert "Mean over n=1 seed per width" in md
    # No train_eval/err in these children: the threshold falls back to train/err, and says so.
    assert ("Interpolation threshold (first width with mean final train error <= 1%, by train/err (mean over the "
            "last epoch's batches, train mode)): 8.") in md
    assert "Test-error peak (second descent): width 8. Test-loss peak: width 8." in md
    assert "Left out: 1 child run(s) that did not finish." in md and "model.width=64: FAILED, divergence: nan" in md
    assert "train_eval_err_mean" not in t and "params_l2_mean" not in t  # not logged: no empty columns
    assert (pd.read_csv(tmp_path / "epochwise.csv")["n"] == 1).all()
    for png in ("modelwise.png", "epochwise_heatmap.png", "epochwise_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "weight_norm.png").exists()


def test_a_report_while_a_child_can_still_finish_writes_no_curve_point_a_later_report_would_contradict(empty_store,
                                                                                                       tmp_path):
    """The parent's modelwise/* history keeps every point: a report with a child still RUNNING wrote width 8's mean of
    the seeds so far, and the report after it a second point at width 8. And a threshold that a later report does not
    find is NaN there, not the earlier report's width."""
    uri = f"sqlite:///{with_store(tmp_path, empty_store)}/mlruns/mlflow.db"
    client, parent = single_seed_study(uri, eval_mode=True)
    (running,) = [r for r in client.search_runs([parent.info.experiment_id], "attributes.status = 'FINISHED'")
                  if r.data.params["model.width"] == "32"]
    dd.report(client, parent, tmp_path)
    assert client.get_run(parent.info.run_id).data.metrics["summary/threshold_width"] == 32
    client.update_run(running.info.run_id, "RUNNING")  # as a report.py mid-sweep sees a child still training
    dd.report(client, parent, tmp_path / "again")
    curve = client.get_metric_history(parent.info.run_id, "modelwise/test_err")
    assert sorted(m.step for m in curve) == [2, 8, 32]  # the first report's points, none added beside them
    assert math.isnan(client.get_run(parent.info.run_id).data.metrics["summary/threshold_width"])


def test_threshold_is_read_from_the_eval_mode_train_error_when_the_children_have_it(mlflow_uri, tmp_path):
    client, parent = single_seed_study(mlflow_uri, eval_mode=True)
    dd.report(client, parent, tmp_path)
    t = pd.read_csv(tmp_path / "modelwise.csv").set_index("width")
    assert list(t["train_eval_err_mean"]) == pytest.approx([0.4, 0.05, 0.0])  # logged once, at the last epoch
    assert list(t["train_err_mean"]) == pytest.approx([0.45, 0.0, 0.0])
    assert list(t["params_l2_mean"]) == pytest.approx([6, 24, 96])  # the last epoch's norm: width * 3
    md = (tmp_path / "modelwise.md").read_text()
    # train/err alone would say width 8; in eval mode width 8 still misses 5% of its labels.
    assert "by train_eval/err (eval mode, full training set, after the last epoch)): 32." in md
    assert "| params_l2_mean |" in md
    e = pd.read_csv(tmp_path / "epochwise.csv")
    assert list(e[e.width == 8]["params_l2_mean"]) == pytest.approx([8, 16, 24]) and "train_eval_err_mean" not in e
    assert (tmp_path / "weight_norm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["summary/threshold_width"] == 32


# --- +exp=double_descent through the CLI, on CPU -------------------------------------------------------------------
# torchvision checks CIFAR-10's files against their published md5 sums, which fake files cannot match. The training
# processes are the CLI's, so the check is switched off there by a sitecustomize module on PYTHONPATH (as
# test_data.py does in-process with monkeypatch); the reading itself stays torchvision's.
SITECUSTOMIZE = """\
import torchvision.datasets.cifar as cifar

cifar.check_integrity = lambda *args, **kwargs: True
cifar.CIFAR10._check_integrity = lambda self: True
"""
# The preset's params the children must carry (the sweep overrides only width, seed, epochs and the device).
PRESET = ("model._target_", "model.norm", "data.dataset", "data.label_noise", "data.val_fraction", "data.batch_size",
          "data.test_every_epoch", "optim.name", "optim.lr", "optim.weight_decay", "study", "population.mode")

# Steps of each per-epoch history: epochs 1 and 2; test/* also has the final trainer.test one step past them.
STEPS = {"train/err": [0, 1], "test/err": [0, 1, 2], "test/loss": [0, 1, 2]}


@pytest.mark.slow
def test_the_resnet18_cifar10_preset_runs_end_to_end_on_cpu(tmp_path, empty_store, monkeypatch):
    from test_data import _write_fake_cifar10

    root = with_store(tmp_path / "root", empty_store)
    _write_fake_cifar10(root / "data", n_train=10, n_test=10)  # 32x32x3 images: CIFAR's format fixes the size
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))

    out, client, parent, kids = run_study(
        root, f"sqlite:///{root}/mlruns/mlflow.db", "double_descent", "double_descent",
        "+exp=double_descent", "trainer=cpu", "model.width=1,2", "seed=0,1", "trainer.max_epochs=2",
        "data.download=false", "population.mode=auto")

    # Four members of two widths, trained as two populations (one job each; equal-width ResNet18s are fused).
    assert sorted(p.name for p in (root / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    assert "population.members=['seed=0','seed=1']" in (root / "sweep" / "0" / ".hydra" / "overrides.yaml").read_text()
    by = {(int(r.data.params["model.width"]), int(r.data.params["seed"])): r for r in kids}
    assert sorted(by) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    preset = compose(["+exp=double_descent"])
    for r in kids:
        assert r.info.status == "FINISHED" and r.data.params["trainer.max_epochs"] == "2"
        assert {k: r.data.params[k] for k in PRESET} == {k: str(OmegaConf.select(preset, k)) for k in PRESET}
        assert "RandomCrop" in r.data.params["augmentation.transforms"]
        history = {k: sorted(m.step for m in client.get_metric_history(r.info.run_id, k)) for k in STEPS}
        assert history == STEPS
    for width in (1, 2):  # fused members are trained apart: each seed its own init, data order and label noise
        assert by[width, 0].data.metrics["train/loss"] != by[width, 1].data.metrics["train/loss"]

    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == "double_descent"
    assert parent.data.tags["sweep.model.width"] == "1,2" and parent.data.tags["sweep.seed"] == "0,1"

    # The report: per width n=2, the mean and SE (ddof=1) of the children's last per-epoch test error.
    t = pd.read_csv(out / "modelwise.csv").set_index("width")
    assert list(t.index) == [1, 2] and (t["n"] == 2).all() and (t["epochs"] == 2).all()
    for width in (1, 2):
        last = [next(m.value for m in client.get_metric_history(by[width, s].info.run_id, "test/err") if m.step == 1)
                for s in (0, 1)]  # after epoch 2
        assert t.loc[width, "test_err_mean"] == pytest.approx(np.mean(last))
        assert t.loc[width, "test_err_se"] == pytest.approx(np.std(last, ddof=1) / math.sqrt(2))
    assert t["test_loss_mean"].notna().all()
    files = {"modelwise.png", "modelwise.csv", "modelwise.md", "epochwise_heatmap.png", "epochwise_curves.png",
             "epochwise.csv", "epochwise.md", "config.yaml"}
    assert files <= {p.name for p in out.iterdir()}
    assert files <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "Mean over n=2 seeds per width" in (out / "modelwise.md").read_text()
    # The headline on the parent run itself: the model-wise curve (step = width) and the summary the UI shows.
    curve = client.get_metric_history(parent.info.run_id, "modelwise/test_err")
    assert sorted((m.step, m.value) for m in curve) == [(w, pytest.approx(t.loc[w, "test_err_mean"])) for w in (1, 2)]
    metrics = client.get_run(parent.info.run_id).data.metrics
    # A peak only where the wider width's mean is higher than the sweet spot's (width 1 here: nothing interpolates).
    rises = t.loc[2, "test_err_mean"] > t.loc[1, "test_err_mean"]
    peak = metrics["summary/peak_width"]  # NaN without a peak: no older value stays the parent's latest
    assert peak == 2.0 if rises else math.isnan(peak)
