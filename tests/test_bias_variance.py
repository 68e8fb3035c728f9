"""Bias-variance decomposition (lecture eqs. 14-16): the estimator, the fused MLP fits, the +exp=bias_variance preset."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from reglab.models.polynomial import predict, ridge_lstsq
from reglab.studies.bias_variance import (decompose, fit_mlps, fits_figure, init_mlps, target, training_sets,
                                          u_curve)
from reglab.cli import runner

SIGMA = 0.3


def test_identity_is_exact_and_the_gap_is_test_noise_sampling_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, generator=gen, dtype=torch.float64)
    f = target(x)
    pred = f + 0.2 + 0.3 * torch.randn(50, 400, generator=gen, dtype=torch.float64)  # bias 0.2, variance 0.09
    y = f + SIGMA * torch.randn(50, 400, generator=gen, dtype=torch.float64)
    d = decompose(pred, f, y, SIGMA)
    assert abs(d["identity_residual"]) < 1e-12
    assert d["bias2"] == pytest.approx(0.04, abs=0.01) and d["variance"] == pytest.approx(0.09, rel=0.05)
    assert d["gap_over_se"] < 4
    # a wrong sigma^2 is caught: the gap is then far outside the sampling error
    assert decompose(pred, f, y, 0.25)["gap_over_se"] > 10


def test_bias2_and_variance_are_the_unbiased_estimates_over_the_l_sets():
    """Known truth: f_l(x) = f(x) + b(x) + s(x) z_l, so bias^2 = mean b^2 and variance = mean s^2 exactly.

    With the variance large, the plug-in bias^2 (fbar - f)^2 is inflated by variance/L (here 0.09, nine times the
    true 0.01) and the 1/L variance is low by the same amount; the unbiased pair is not, and sums to the plug-in sum.
    """
    gen = torch.Generator().manual_seed(0)
    L, n = 100, 10000
    x = torch.rand(n, generator=gen, dtype=torch.float64)
    f, b, s = target(x), 0.1 * math.sqrt(2) * torch.cos(2 * math.pi * x), 2 + 2 * x
    pred = f + b + s * torch.randn(L, n, generator=gen, dtype=torch.float64)
    y = f + SIGMA * torch.randn(L, n, generator=gen, dtype=torch.float64)
    d = decompose(pred, f, y, SIGMA)
    true_bias2, true_var = b.pow(2).mean().item(), s.pow(2).mean().item()  # ~0.01, ~9.33
    # sampling SE here: bias2 ~0.002, variance ~0.2% (the plug-in values are off by var/L = 0.093 and 1%)
    assert d["bias2"] == pytest.approx(true_bias2, abs=0.01)
    assert d["variance"] == pytest.approx(true_var, rel=0.006)
    fbar = pred.mean(0)
    plugin_bias2, plugin_var = (fbar - f).pow(2).mean().item(), (pred - fbar).pow(2).mean().item()
    assert d["bias2_plugin"] == pytest.approx(plugin_bias2, rel=1e-12)
    assert d["variance_plugin"] == pytest.approx(plugin_var, rel=1e-12)
    assert plugin_bias2 - true_bias2 == pytest.approx(true_var / L, rel=0.2)  # the artifact the plug-in carries
    assert d["variance"] == pytest.approx(L / (L - 1) * plugin_var, rel=1e-12)
    assert d["bias2"] == pytest.approx(plugin_bias2 - d["variance"] / L, rel=1e-12)
    # the sum, hence the check against the MSE (gap, SE, tolerance), is the plug-in one
    assert d["bias2"] + d["variance"] == pytest.approx(plugin_bias2 + plugin_var, rel=1e-14)
    assert d["sum"] == pytest.approx(plugin_bias2 + plugin_var + SIGMA**2, rel=1e-14)
    assert abs(d["identity_residual"]) < 1e-12 and d["gap_over_se"] < 4
    with pytest.raises(ValueError, match="L >= 2"):
        decompose(pred[:1], f, y[:1], SIGMA)


def test_polynomial_bias2_is_unbiased_where_the_true_bias_is_zero():
    """Least squares of order M on t = pure noise (f = 0, in the model class) is unbiased: true bias^2 = 0.

    Averaged over R independent repetitions of the L-set experiment, the reported bias^2 is ~0 while the plug-in
    bias^2 is variance/L (the old figure's 'bias rising again' at high variance).
    """
    M, N, L, R, n = 3, 8, 10, 400, 200
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(R, L, N, generator=gen, dtype=torch.float64)
    t = SIGMA * torch.randn(R, L, N, generator=gen, dtype=torch.float64)
    xt = torch.rand(n, generator=gen, dtype=torch.float64)
    pred = predict(ridge_lstsq(x, t, M), xt.expand(R, L, -1))  # (R, L, n)
    f = torch.zeros(n, dtype=torch.float64)
    y = SIGMA * torch.randn(R, L, n, generator=gen, dtype=torch.float64)
    ds = [decompose(pred[r], f, y[r], SIGMA) for r in range(R)]
    var = np.mean([d["variance"] for d in ds])
    bias2 = np.array([d["bias2"] for d in ds])
    plugin = pred.mean(1).pow(2).mean(-1).numpy()  # (fbar - f)^2 averaged over x, f = 0
    # per repetition the estimate has sd ~ sqrt(2/(M+1)) var/L; over R = 400 the mean's SE is ~0.035 var/L
    assert abs(bias2.mean()) < 0.15 * var / L
    assert plugin.mean() == pytest.approx(var / L, rel=0.15)
    assert (bias2 < 0).any()  # kept unclipped: an unbiased estimate of 0 is negative about half the time


def test_figures_show_negative_bias2_on_a_log_axis_and_label_ln_lambda_as_sum_form():
    d = pd.DataFrame({"value": [1, 2, 3], "bias2": [0.1, 0.01, -0.002], "variance": [0.1, 1.0, 50.0],
                      "sum": [0.29, 1.1, 50.1], "mse": [0.3, 1.1, 50.0]})
    fig = u_curve(d, "M", SIGMA, 10, False, "t")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    floor = [ln for ln in ax.get_lines() if "≤ 0" in ln.get_label()]
    assert len(floor) == 1 and list(floor[0].get_xdata()) == [3]  # the point <= 0 is marked, not silently dropped
    plt.close(fig)
    pm = OmegaConf.create({"sweep_order": 3, "n_train": 10})
    x, t = training_sets(3, 10, SIGMA, seed=0)
    fits = {float(ln): ridge_lstsq(x, t, 3, ln) for ln in (-10.0, -5.0, 0.0)}
    fig = fits_figure(fits, torch.rand(5, dtype=torch.float64), pm, 3)
    labels = [tx.get_text() for ax in fig.axes for tx in ax.texts]
    assert sorted(labels) == ["ln λ = -10 (sum form)", "ln λ = -5 (sum form)", "ln λ = 0 (sum form)"]
    plt.close(fig)


def test_polynomial_decomposition_matches_known_answer_for_m0():
    """M = 0 fits the mean of t: bias^2 -> Var_x sin(2 pi x) = 1/2, variance -> (1/2 + sigma^2)/N."""
    n, L = 25, 400
    x, t = training_sets(L, n, SIGMA, seed=1)
    gen = torch.Generator().manual_seed(2)
    xt = torch.rand(2000, generator=gen, dtype=torch.float64)
    y = target(xt) + SIGMA * torch.randn(L, 2000, generator=gen, dtype=torch.float64)
    d = decompose(predict(ridge_lstsq(x, t, 0), xt.expand(L, -1)), target(xt), y, SIGMA)
    assert d["bias2"] == pytest.approx(0.5, abs=0.03)
    assert d["variance"] == pytest.approx((0.5 + SIGMA**2) / n, rel=0.15)
    assert d["gap_over_se"] < 4


def test_fitted_mlps_are_the_solo_mlps_each_trained_alone_on_its_own_set():
    x, t = training_sets(3, 20, SIGMA, seed=0)
    m = OmegaConf.create({"depth": 1, "activation": "relu", "steps": 100, "lr": 1e-2})
    rng = torch.get_rng_state()
    nets = init_mlps(3, 16, m, seed=3)  # the theta_0 fit_mlps starts from
    assert torch.equal(torch.get_rng_state(), rng)  # per-member seeds; the global RNG is left as it was
    assert not torch.equal(nets[0].head.weight, nets[1].head.weight)  # each member its own initialization
    fused = fit_mlps(x, t, 16, m, seed=3)
    for k, net in enumerate(nets):
        opt = torch.optim.Adam(net.parameters(), lr=m.lr)
        for _ in range(m.steps):
            loss = (net(x[k].float().unsqueeze(-1)).squeeze(-1) - t[k].float()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for key, value in net.state_dict().items():
            torch.testing.assert_close(fused.member_state_dict(k)[key], value, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert (fused(x.float().unsqueeze(-1)).squeeze(-1) - t).pow(2).mean() < 0.5 * t.var()  # it learned


REDUCED = ["bias_variance.n_datasets=40", "bias_variance.n_test=300", "bias_variance.mlp.widths=[2,32]",
           "bias_variance.mlp.steps=300", "bias_variance.polynomial.ln_lambda_sweep.num=4"]


def test_preset_runs_end_to_end_and_the_sum_matches_the_mse(tmp_root):
    cfg = compose(["+exp=bias_variance", f"paths.root={tmp_root}", "logger=none", *REDUCED])
    metrics = runner(cfg)(cfg)  # what scripts/train.py calls: the preset's runner._target_
    out = tmp_root / "results" / "bias_variance"
    for name in ("decomposition.csv", "decomposition.md", "bias_variance_polynomial_order.png",
                 "bias_variance_polynomial_lnlambda.png", "bias_variance_mlp_width.png", "fits_by_lnlambda.png"):
        assert (out / name).stat().st_size > 0
    assert not (tmp_root / "mlruns").exists()  # logger=none: no MLflow store
    d = pd.read_csv(out / "decomposition_full.csv")
    assert len(d) == 10 + 4 + 2 and d["within"].all() and metrics["test/max_gap_over_se"] <= 4
    assert d["identity_residual"].abs().max() < 1e-12
    order = d[d.sweep == "poly_order"].set_index("value")
    assert order.loc[0, "bias2"] > 10 * order.loc[3, "bias2"]  # the U: bias falls with M ...
    assert order.loc[9, "variance"] > 10 * order.loc[3, "variance"]  # ... variance rises
    mlp = d[d.sweep == "mlp_width"].set_index("value")
    assert mlp.loc[32, "bias2"] < mlp.loc[2, "bias2"] and math.isfinite(mlp.loc[32, "mse"])
