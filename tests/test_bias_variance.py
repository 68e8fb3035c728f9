"""Bias-variance decomposition (lecture eqs. 14-16): the estimator, the fused MLP fits, the +exp=bias_variance preset."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from reglab.models.polynomial import predict, ridge_lstsq
from reglab.studies.bias_variance import decompose, fit_mlps, init_mlps, target, training_sets
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
