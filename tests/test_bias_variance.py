"""Bias-variance decomposition (lecture eqs. 14-16): the estimator, the batched MLP, and the +exp=bias_variance preset."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import compose

from reglab.models.batched_mlp import BatchedMLP
from reglab.models.polynomial import predict, ridge_lstsq
from reglab.studies.bias_variance import decompose, target, training_sets
from reglab.train import main

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


def test_batched_mlp_member_is_the_reglab_mlp():
    net = BatchedMLP(3, 1, 1, width=7, depth=2, activation="tanh", generator=torch.Generator().manual_seed(0))
    x = torch.rand(3, 11, 1)
    out = net(x)
    for k in range(3):
        torch.testing.assert_close(net.member(k)(x[k]), out[k])


def test_batched_training_equals_training_each_member_alone():
    x, t = training_sets(3, 20, SIGMA, seed=0, dtype=torch.float32)
    xs, ts = x.unsqueeze(-1), t.unsqueeze(-1)
    together = BatchedMLP(3, 1, 1, width=16, generator=torch.Generator().manual_seed(0))
    alone = BatchedMLP(1, 1, 1, width=16)
    with torch.no_grad():
        for a, b in zip(alone.parameters(), together.parameters()):
            a.copy_(b[1:2])
    for net, xi, ti in ((together, xs, ts), (alone, xs[1:2], ts[1:2])):
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(100):
            loss = (net(xi) - ti).pow(2).mean(dim=(1, 2)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(alone.parameters(), together.parameters()):
        torch.testing.assert_close(a[0], b[1], rtol=1e-4, atol=1e-5)
    assert (together(xs) - ts).pow(2).mean() < 0.5 * ts.var()  # it learned


REDUCED = ["bias_variance.n_datasets=40", "bias_variance.n_test=300", "bias_variance.mlp.widths=[2,32]",
           "bias_variance.mlp.steps=300", "bias_variance.polynomial.ln_lambda_sweep.num=4"]


def test_preset_runs_end_to_end_and_the_sum_matches_the_mse(tmp_root):
    metrics = main(compose(["+exp=bias_variance", f"paths.root={tmp_root}", "logger=none", *REDUCED]))
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
