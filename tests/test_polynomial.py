"""Polynomial curve fitting (Bishop §1.1): closed form, Lightning gradient descent, lasso, and the +exp=polynomial preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose

from reglab.models.polynomial import design_matrix, e_rms, fit_gd, lasso_cd, lasso_kkt_violation, ridge_lstsq
from reglab.studies.polynomial import sample
from reglab.cli import runner

NEG_INF = -math.inf


@pytest.fixture(scope="module")
def data():
    """Bishop's setting: N = 10 points on a grid in [0, 1], t = sin(2 pi x) + N(0, 0.3^2); 100 test points."""
    return sample(10, 0.3, "grid", 0), sample(100, 0.3, "grid", 1)


def test_closed_form_is_bishops_ridge_solution(data):
    (x, t), _ = data
    # well conditioned (M = 3): the normal equations (X^T X + lambda I) w = X^T t are accurate enough to compare
    phi = design_matrix(x, 3)
    for ln in (NEG_INF, -5.0, 0.0):
        lam = 0.0 if ln == NEG_INF else math.exp(ln)
        w_normal = torch.linalg.solve(phi.T @ phi + lam * torch.eye(4, dtype=phi.dtype), phi.T @ t)
        torch.testing.assert_close(ridge_lstsq(x, t, 3, ln), w_normal, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("order, ln_lambda", [(0, NEG_INF), (1, NEG_INF), (3, NEG_INF), (9, 0.0)])
def test_gradient_descent_agrees_with_closed_form(data, order, ln_lambda):
    (x, t), (xt, tt) = data
    module, settings = fit_gd(x, t, order, ln_lambda, steps=1500, log_every=100)
    assert module.trainer.global_step == 1500  # trained by the Lightning Trainer, one GD step per batch
    w_gd, w_star = module.w.detach(), ridge_lstsq(x, t, order, ln_lambda)
    assert (w_gd - w_star).abs().max() <= 1e-6 * w_star.abs().max()
    assert e_rms(w_gd, xt, tt).item() == pytest.approx(e_rms(w_star, xt, tt).item(), rel=1e-6)
    assert module.history[-1][1] < module.history[0][1]  # the objective fell from w = 0


def test_gradient_descent_cannot_reach_the_m9_interpolant(data):
    """kappa(H) ~ 1e14: in a few thousand steps GD stays far from w* (documented, used as a lesson)."""
    (x, t), _ = data
    module, settings = fit_gd(x, t, 9, NEG_INF, steps=500)
    assert settings["condition"] > 1e10
    assert e_rms(module.w.detach(), x, t).item() > 1e-3 > e_rms(ridge_lstsq(x, t, 9), x, t).item()


def test_m9_n10_interpolates_the_training_points_and_predicts_badly(data):
    (x, t), (xt, tt) = data
    w9, w3 = ridge_lstsq(x, t, 9), ridge_lstsq(x, t, 3)
    assert e_rms(w9, x, t).item() < 1e-6
    assert e_rms(w9, xt, tt).item() > e_rms(w3, xt, tt).item() + 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coefficients_shrink_by_orders_of_magnitude_with_lambda(seed):
    """Bishop's Table 1.2: max|w*| falls >= 100x from ln lambda = -inf to -18 and again to 0."""
    x, t = sample(10, 0.3, "grid", seed * 100)
    big = [ridge_lstsq(x, t, 9, ln).abs().max().item() for ln in (NEG_INF, -18.0, 0.0)]
    assert big[0] > 1e4 and big[2] < 2
    assert big[0] / big[1] > 100 and big[1] / big[2] > 100


def test_lasso_is_optimal_sparse_and_matches_sklearn(data):
    from sklearn.linear_model import Lasso

    (x, t), _ = data
    phi, tn = design_matrix(x, 9).numpy(), t.numpy()
    lam = math.exp(-1)
    w, sweeps, converged = lasso_cd(phi, tn, lam)
    assert converged and lasso_kkt_violation(phi, tn, w, lam) < 1e-8
    assert (w == 0).sum() >= 5  # exactly zero, not merely small
    assert (ridge_lstsq(x, t, 9, -1.0) == 0).sum() == 0  # ridge shrinks but keeps every coefficient
    # sklearn minimises 1/(2N)||t - Xw||^2 + alpha ||w||_1: the same problem with alpha = lambda / N
    ref = Lasso(alpha=lam / len(tn), fit_intercept=False, tol=1e-14, max_iter=200_000).fit(phi, tn).coef_
    np.testing.assert_allclose(w, ref, atol=1e-6)


REDUCED = ["polynomial.ln_lambda_sweep.num=5", "polynomial.gd.steps=300", "polynomial.lasso.ln_lambdas=[0]",
           "polynomial.gd.fits=[{order: 1}, {order: 9}]", "polynomial.large_n=[15]"]
OUTPUTS = ["fig1_2_data.png", "fig1_4_fits.png", "fig1_5_erms_vs_order.png", "fig1_6_more_data.png",
           "fig1_7_regularized.png", "fig1_8_erms_vs_lnlambda.png", "gd_vs_closed_form.png", "lasso_vs_ridge.png",
           "table1_1_coefficients_by_order.md", "table1_2_coefficients_by_lnlambda.csv", "erms_by_order.csv",
           "erms_by_lnlambda.csv", "gd_vs_closed_form.md", "lasso_vs_ridge.md"]


def test_preset_runs_end_to_end_into_mlflow(tmp_root, mlflow_uri):
    from mlflow.tracking import MlflowClient

    cfg = compose(["+exp=polynomial", f"paths.root={tmp_root}", f"logger.tracking_uri={mlflow_uri}",
                   "logger.experiment=test_polynomial", *REDUCED])
    metrics = runner(cfg)(cfg)  # what scripts/train.py calls: the preset's runner._target_
    out = tmp_root / "results" / "polynomial"
    assert all((out / name).stat().st_size > 0 for name in OUTPUTS)
    assert metrics["train/E_rms/M9"] < 1e-6 < metrics["test/E_rms/M9"]
    assert metrics["gd/fits_agreeing"] == 1  # M = 1 converges; M = 9 unregularized does not
    assert metrics["lasso/zeros/lnl0"] >= 5

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test_polynomial")
    parents = client.search_runs([exp.experiment_id], "tags.`reglab.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    # 4 orders + 10 (Fig 1.5) + 1 (Fig 1.6) + 3 (Table 1.2) + 5 (Fig 1.8) lstsq, 2 GD, lasso + ridge
    assert len(children) >= 20 and {c.data.params["solver"] for c in children} == {"lstsq", "gd", "lasso_cd"}
    names = [c.info.run_name for c in children]
    assert len(set(names)) == len(names)  # one run per fit (Table 1.2's and Fig. 1.8's common ln lambdas were two)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"fig1_4_fits.png", "table1_2_coefficients_by_lnlambda.md"} <= artifacts

    runner(cfg)(cfg)  # a rerun reuses the parent and adds no duplicate children
    assert len(client.search_runs([exp.experiment_id], "tags.`reglab.role` = 'parent'")) == 1
    again = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(again) == len(children)


# --- Bishop's own data (recovered from his Table 1.2) ---------------------------------------------------------
def _bishop_fit(ln_lambda, penalty, x=None, t=None):
    from reglab.models.polynomial import sum_form_ln_lambda
    from reglab.studies.polynomial import bishop_data

    if x is None:
        x, t = bishop_data()
    return ridge_lstsq(x, t, 9, sum_form_ln_lambda(ln_lambda, 10, penalty))


def test_bishop_table_1_2_ln_lambda_0_needs_the_mean_form():
    """His ln lambda = 0 column is ridge on his data with lambda in the lecture's eq. (7) form (MSE + lambda ||w||^2,
    lambda_sum = N lambda), to 2 decimals; eq. (1.4) as printed (lambda_sum = lambda) misses it by 0.33."""
    from reglab.studies.polynomial import BISHOP_TABLE_1_1, BISHOP_TABLE_1_2, ROUNDING, bishop_data

    book = torch.tensor(BISHOP_TABLE_1_2[0.0], dtype=torch.float64)
    assert (_bishop_fit(0.0, "mean") - book).abs().max() <= ROUNDING + 1e-9
    assert (_bishop_fit(0.0, "sum") - book).abs().max() > 0.3
    x, t = bishop_data()  # the recovered targets are his: Table 1.1 (M = 0, 1, 3) comes out to 2 decimals
    for order, w in BISHOP_TABLE_1_1.items():
        assert (ridge_lstsq(x, t, order) - torch.tensor(w, dtype=torch.float64)).abs().max() <= ROUNDING + 1e-6


def test_bishop_ln_lambda_minus_18_column_is_not_a_rounding_effect():
    """Rounding the -inf column moves the reproduced ln lambda = -18 column by < 0.02; Bishop's differs by ~17
    (w8) at ln lambda = -18 but matches at ln lambda = -18.38 (mean form), documented in docs/studies.md."""
    from reglab.studies.polynomial import BISHOP_TABLE_1_2, ROUNDING, bishop_data

    book = torch.tensor(BISHOP_TABLE_1_2[-18.0], dtype=torch.float64)
    w_inf = torch.tensor(BISHOP_TABLE_1_2[NEG_INF], dtype=torch.float64)
    delta = (torch.rand(200, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1) * ROUNDING
    x, t = bishop_data(w_inf + delta)
    w18 = _bishop_fit(-18.0, "mean", x.expand(200, -1), t)
    assert (w18.amax(0) - w18.amin(0)).max() < 0.02
    assert (w18 - book).abs().amax(-1).min() > 10
    assert (_bishop_fit(-18.384, "mean") - book).abs().max() < 0.01


def test_bishop_data_preset_writes_table_1_2(tmp_root):
    from reglab.errors import ConfigError

    small = ["polynomial.gd.fits=[]", "polynomial.lasso.ln_lambdas=[]", "polynomial.ln_lambda_sweep.num=3",
             "polynomial.large_n=[15]", "polynomial.bishop_draws=50"]
    cfg = compose(["+exp=polynomial", f"paths.root={tmp_root}", "logger=none", "polynomial.data=bishop", *small])
    metrics = runner(cfg)(cfg)
    out = tmp_root / "results" / "polynomial"
    table = (out / "table1_2_bishop_vs_reproduced.md").read_text()
    assert "| w8* | -557682.99 | -557682.99 | -91.53 |" in table
    assert metrics["bishop/lnl0/max_abs_dev"] <= 0.005 < 0.3 < metrics["bishop/lnl0/max_abs_dev_other_penalty"]
    assert metrics["bishop/table1_1/max_abs_dev"] <= 0.005
    assert (out / "table1_2_rounding_sensitivity.md").stat().st_size > 0
    # The sine data's report into the same folder: the Bishop tables are not its own, so they go.
    sine = compose(["+exp=polynomial", f"paths.root={tmp_root}", "logger=none", *small])
    runner(sine)(sine)
    assert not (out / "table1_2_bishop_vs_reproduced.md").exists() and (out / "erms_by_order.md").exists()
    bad = compose(["+exp=polynomial", f"paths.root={tmp_root}", "logger=none", "polynomial.data=bishops"])
    with pytest.raises(ConfigError, match=r"^polynomial\.data='bishops' is not one of sine, bishop$"):
        runner(bad)(bad)
