"""Linear double descent (+exp=linear_double_descent): the minimum-norm solver, the peak at p = N, the preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from reglab.cli import runner
from reglab.models.polynomial import min_norm_lstsq
from reglab.studies.linear_double_descent import legendre_features, sweep


def test_min_norm_lstsq_returns_the_smallest_interpolant():
    gen = torch.Generator().manual_seed(0)
    x, t = torch.rand(10, generator=gen, dtype=torch.float64), torch.randn(10, generator=gen, dtype=torch.float64)
    phi = legendre_features(x, 30)  # p = 30 > N = 10: many interpolants
    w = min_norm_lstsq(phi, t)
    torch.testing.assert_close(phi @ w, t, rtol=0, atol=1e-9)
    torch.testing.assert_close(w, torch.linalg.pinv(phi) @ t, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(w.numpy(), np.linalg.lstsq(phi.numpy(), t.numpy(), rcond=None)[0], rtol=1e-7, atol=1e-9)
    null = torch.linalg.svd(phi).Vh[10:]  # (20, 30): Phi z = 0 for z in their span
    z = null.T @ torch.randn(20, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(phi @ (w + z), t, rtol=0, atol=1e-9)  # another interpolant, and a longer one
    assert (w + z).norm() > w.norm() and abs(float(w @ z)) < 1e-9


def test_test_error_peaks_at_p_equal_n_and_ridge_removes_the_peak():
    q = OmegaConf.create({"n_train": 20, "n_test": 200, "noise_std": 0.3, "features": "legendre", "decay": 1.0,
                          "fourier_scale": 30.0, "p": [10, 20, 80], "penalty": "mean"})
    runs = [sweep(q, seed, {"min_norm": -math.inf, "ridge": -8.0}) for seed in range(5)]
    mean = sum(r.set_index(["solver", "p"])["test/E_rms"] for r in runs) / len(runs)
    assert mean["min_norm", 20] > 10 * max(mean["min_norm", 10], mean["min_norm", 80])
    assert mean["ridge", 20] < 1 < mean["min_norm", 20]
    train = runs[0].set_index(["solver", "p"])["train/E_rms"]
    assert train["min_norm", 20] < 1e-4 < train["min_norm", 10]  # p = N interpolates, p = N/2 cannot


def test_preset_runs_into_mlflow(tmp_root, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from reglab.errors import ConfigError

    cfg = compose(["+exp=linear_double_descent", f"paths.root={tmp_root}", f"logger.tracking_uri={mlflow_uri}",
                   "logger.experiment=test_linear_double_descent", "linear_double_descent.seeds=2",
                   "linear_double_descent.p=[5,10,20,40]", "linear_double_descent.n_train=10"])
    metrics = runner(cfg)(cfg)
    out = tmp_root / "results" / "linear_double_descent"
    assert all((out / f).stat().st_size > 0 for f in ("test_error_vs_p.png", "test_error_vs_p.md", "runs.csv"))
    assert metrics["summary/peak_p"] == 10
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test_linear_double_descent")
    parent, = client.search_runs([exp.experiment_id], "tags.`reglab.role` = 'parent'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["min_norm-seed0", "min_norm-seed1", "ridge-seed0",
                                                         "ridge-seed1"]
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "test/E_rms")]
    assert sorted(steps) == [5, 10, 20, 40]
    bad = compose(["+exp=linear_double_descent", "logger=none", "linear_double_descent.features=rff"])
    with pytest.raises(ConfigError, match=r"^linear_double_descent\.features='rff' is not one of"):
        runner(bad)(bad)
