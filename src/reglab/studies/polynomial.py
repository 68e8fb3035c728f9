"""`+exp=polynomial`: Bishop PRML §1.1 (Figs 1.2, 1.4-1.8, Tables 1.1-1.2), measured, plus the lecture's L1 x L2 table.

Data: t = sin(2 pi x) + N(0, noise_std^2); x on a grid in [0, 1] ("spaced uniformly", Bishop) or uniform random
(`polynomial.data=sine`), or Bishop's own 10 training points recovered from his Table 1.2 (`polynomial.data=bishop`).
lambda is stated in `polynomial.penalty` form: "mean" (lecture eq. 7, the form Bishop's tables use) or "sum" (Bishop
eq. 1.4 as printed); the solvers take the sum form (`models.polynomial.sum_form_ln_lambda`).
Every fit in the figures and tables is the closed form (`ridge_lstsq`: SVD least squares on the augmented system,
never the normal equations). A few fits are repeated by gradient descent (a LightningModule trained by a
Lightning Trainer) and compared with it; the lasso side is coordinate descent with soft-thresholding.
"""

from __future__ import annotations

import logging
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from reglab.errors import ConfigError
from reglab.models.polynomial import (PENALTIES, design_matrix, e_rms, fit_gd, lasso_cd, lasso_kkt_violation,
                                      predict, ridge_lstsq, sum_form_ln_lambda)
from reglab.runs.study import StudyRecorder

log = logging.getLogger(__name__)
STUDY = "polynomial"
TRUE_CURVE = dict(color="tab:green", lw=1.5)
FIT = dict(color="tab:red", lw=1.5)
POINTS = dict(ls="none", marker="o", ms=6, mfc="none", mec="tab:blue", mew=1.3)
DATA_SETS = ("sine", "bishop")

# Bishop, Pattern Recognition and Machine Learning (Springer 2006), §1.1, Table 1.2: w* of the M = 9 polynomial
# fitted to the N = 10 points of Fig. 1.2, at ln lambda = -inf (no penalty; also Table 1.1's M = 9 column), -18, 0.
BISHOP_TABLE_1_2 = {
    -math.inf: [0.35, 232.37, -5321.83, 48568.31, -231639.30, 640042.26, -1061800.52, 1042400.18, -557682.99,
                125201.43],
    -18.0: [0.35, 4.74, -0.77, -31.97, -3.89, 55.28, 41.32, -45.95, -91.53, 72.68],
    0.0: [0.13, -0.05, -0.06, -0.05, -0.03, -0.02, -0.01, -0.00, 0.00, 0.01],
}
# Table 1.1, the unregularized fits of lower order (M = 9 is Table 1.2's first column).
BISHOP_TABLE_1_1 = {0: [0.19], 1: [0.82, -1.27], 3: [0.31, 7.99, -25.43, 17.37], 9: BISHOP_TABLE_1_2[-math.inf]}
ROUNDING = 0.005  # the tables print 2 decimals


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x)


def sample(n: int, noise_std: float, design: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (x, t) in float64; `seed` picks the noise (and the x's when design=random)."""
    gen = torch.Generator().manual_seed(seed)
    if design == "grid":
        x = torch.linspace(0, 1, n, dtype=torch.float64)
    elif design == "random":
        x = torch.rand(n, generator=gen, dtype=torch.float64)
    else:
        raise ConfigError(f"{STUDY}.design={design!r} is not one of grid, random")
    return x, target(x) + noise_std * torch.randn(n, generator=gen, dtype=torch.float64)


def bishop_data(w_interpolant=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bishop's training set: x_n = n/9 (n = 0..9, Fig. 1.2) and t = X w, w = Table 1.2's ln lambda = -inf column
    (the M = 9 polynomial through his 10 points; `w_interpolant` (..., 10) replaces it, e.g. perturbed)."""
    x = torch.arange(10, dtype=torch.float64) / 9
    w = torch.tensor(BISHOP_TABLE_1_2[-math.inf], dtype=torch.float64) if w_interpolant is None else w_interpolant
    return x, predict(w, x)


def fmt_ln(ln_lambda: float) -> str:
    return "−∞" if ln_lambda == -math.inf else f"{ln_lambda:g}"


def curve_panel(ax, x, t, w=None, label="", fit_color=FIT, legend=False):
    grid = torch.linspace(0, 1, 400, dtype=torch.float64)
    ax.plot(grid, target(grid), **TRUE_CURVE, label="truth sin(2πx)")
    if w is not None:
        ax.plot(grid, predict(w, grid), **fit_color, label="fit y(x, w*)")
    ax.plot(x, t, **POINTS, label="training data")
    ax.set(xlim=(-0.05, 1.05), ylim=(-1.5, 1.5), xticks=[0, 1], yticks=[-1, 0, 1], xlabel="$x$", ylabel="$t$")
    ax.text(0.95, 0.93, label, transform=ax.transAxes, ha="right", va="top", fontsize=11)
    if legend:
        ax.legend(frameon=False, fontsize=7, loc="lower left")


def coefficient_table(columns: dict[str, torch.Tensor], size: int) -> pd.DataFrame:
    rows = {"": [f"w{j}*" for j in range(size)]}
    for name, w in columns.items():
        rows[name] = [float(w[j]) if j < len(w) else math.nan for j in range(size)]
    return pd.DataFrame(rows)


def run(cfg: DictConfig) -> dict[str, float]:
    p = cfg.polynomial
    for key in ("n_train", "n_test", "max_order"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ConfigError(f"{STUDY}.{key}={p[key]!r} is invalid: expected an integer >= 1")
    if p.design not in ("grid", "random"):
        raise ConfigError(f"{STUDY}.design={p.design!r} is not one of grid, random")
    if p.data not in DATA_SETS:
        raise ConfigError(f"{STUDY}.data={p.data!r} is not one of {', '.join(DATA_SETS)}")
    if p.data == "bishop" and p.n_train != 10:
        raise ConfigError(f"{STUDY}.n_train={p.n_train!r} is invalid with {STUDY}.data=bishop: "
                          "his data set has 10 points")
    if p.penalty not in PENALTIES:
        raise ConfigError(f"{STUDY}.penalty={p.penalty!r} is not one of {', '.join(PENALTIES)}")
    if not p.noise_std > 0:
        raise ConfigError(f"{STUDY}.noise_std={p.noise_std!r} is invalid: expected a number > 0")
    return StudyRecorder(cfg, STUDY).run(lambda rec: _run(cfg, p, rec), p.threads)


def _run(cfg: DictConfig, p: DictConfig, rec: StudyRecorder) -> dict[str, float]:
    seed, top = cfg.seed, p.max_order
    x, t = bishop_data() if p.data == "bishop" else sample(p.n_train, p.noise_std, p.design, seed * 100)
    xt, tt = sample(p.n_test, p.noise_std, "random" if p.design == "random" else "grid", seed * 100 + 1)

    fits: dict[tuple, tuple] = {}  # one child run per fit: Table 1.2 and Fig. 1.8 share ln lambda = 0 and -18

    def closed(order, ln_lambda, xs=x, ts=t, tag=""):
        name = f"lstsq-M{order}-lnl{fmt_ln(ln_lambda)}-N{len(xs)}{tag}"
        key = (name, id(xs))  # Fig. 1.6 fits samples of its own, one of them of the base sample's size
        if key not in fits:
            w = ridge_lstsq(xs, ts, order, sum_form_ln_lambda(ln_lambda, len(xs), p.penalty))
            m = {"train/E_rms": e_rms(w, xs, ts).item(), "test/E_rms": e_rms(w, xt, tt).item(),
                 "w/max_abs": w.abs().max().item()}
            rec.child(name, {"solver": "lstsq", "order": order, "ln_lambda": ln_lambda, "n_train": len(xs),
                             "data": p.data, "penalty": p.penalty}, m)
            fits[key] = w, m
        return fits[key]

    # Fig 1.2: the data
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    curve_panel(ax, x, t, label=f"N = {p.n_train}", legend=True)
    ax.set_title("Training data and sin(2πx)  (cf. Bishop Fig. 1.2)", fontsize=10)
    rec.figure(fig, "fig1_2_data")

    # Fig 1.4 + Table 1.1: fits of several orders
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True, sharey=True)
    by_order = {}
    for i, (ax, order) in enumerate(zip(axes.flat, p.orders)):
        by_order[order], _ = closed(order, -math.inf)
        curve_panel(ax, x, t, by_order[order], f"M = {order}", legend=i == 0)
    fig.suptitle(f"Least-squares polynomials of order M, N = {p.n_train}  (cf. Bishop Fig. 1.4)")
    rec.figure(fig, "fig1_4_fits")
    rec.table(coefficient_table({f"M = {m}": w for m, w in by_order.items()}, max(p.orders) + 1),
              "table1_1_coefficients_by_order", ".2f")

    # Fig 1.5: E_RMS vs M
    rows = []
    for order in range(top + 1):
        _, m = closed(order, -math.inf)
        rows.append({"M": order, "train E_RMS": m["train/E_rms"], "test E_RMS": m["test/E_rms"]})
    by_m = pd.DataFrame(rows)
    rec.table(by_m, "erms_by_order", ".4g")
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(by_m["M"], by_m["train E_RMS"], "o-", color="tab:blue", mfc="none", label="Training")
    ax.plot(by_m["M"], by_m["test E_RMS"], "o-", color="tab:red", mfc="none", label="Test")
    ax.set(xlabel="$M$", ylabel="$E_{RMS}$", ylim=(0, max(1.0, min(by_m["test E_RMS"].max() * 1.05, 3))),
           xticks=range(0, top + 1, 3))
    ax.legend(frameon=False)
    ax.set_title("E_RMS vs order M  (cf. Bishop Fig. 1.5)", fontsize=10)
    rec.figure(fig, "fig1_5_erms_vs_order")

    # Fig 1.6: more data
    fig, axes = plt.subplots(1, len(p.large_n), figsize=(4 * len(p.large_n), 3.2), sharey=True, squeeze=False)
    for i, (ax, n) in enumerate(zip(axes[0], p.large_n)):
        xn, tn = sample(n, p.noise_std, p.design, seed * 100 + 10 + i)
        w, _ = closed(top, -math.inf, xn, tn)
        curve_panel(ax, xn, tn, w, f"N = {n}", legend=i == 0)
    fig.suptitle(f"M = {top} with more data  (cf. Bishop Fig. 1.6)")
    rec.figure(fig, "fig1_6_more_data")

    # Fig 1.7 + Table 1.2: regularization
    lnls = [-math.inf, *p.ln_lambdas]
    by_lambda = {ln: closed(top, ln)[0] for ln in lnls}
    fig, axes = plt.subplots(1, len(p.ln_lambdas), figsize=(4 * len(p.ln_lambdas), 3.2), sharey=True,
                             squeeze=False)
    for i, (ax, ln) in enumerate(zip(axes[0], p.ln_lambdas)):
        curve_panel(ax, x, t, by_lambda[ln], f"ln λ = {fmt_ln(ln)}", legend=i == 0)
    fig.suptitle(f"M = {top}, regularized, λ in {p.penalty} form  (cf. Bishop Fig. 1.7)")
    rec.figure(fig, "fig1_7_regularized")
    rec.table(coefficient_table({f"ln λ = {fmt_ln(ln)}": w for ln, w in by_lambda.items()}, top + 1),
              "table1_2_coefficients_by_lnlambda", ".2f")

    # Fig 1.8: E_RMS vs ln lambda
    sweep = np.linspace(p.ln_lambda_sweep.start, p.ln_lambda_sweep.stop, p.ln_lambda_sweep.num)
    rows = []
    for ln in sweep:
        _, m = closed(top, float(ln))
        rows.append({"ln λ": float(ln), "train E_RMS": m["train/E_rms"], "test E_RMS": m["test/E_rms"]})
    by_l = pd.DataFrame(rows)
    rec.table(by_l, "erms_by_lnlambda", ".4g")
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(by_l["ln λ"], by_l["train E_RMS"], "-", color="tab:blue", label="Training")
    ax.plot(by_l["ln λ"], by_l["test E_RMS"], "-", color="tab:red", label="Test")
    ax.set(xlabel=f"ln λ ({p.penalty} form)", ylabel="$E_{RMS}$",
           ylim=(0, max(1.0, min(by_l["test E_RMS"].max() * 1.05, 3))))
    ax.legend(frameon=False)
    ax.set_title(f"E_RMS vs ln λ, M = {top}  (cf. Bishop Fig. 1.8)", fontsize=10)
    rec.figure(fig, "fig1_8_erms_vs_lnlambda")

    gd = gradient_descent(p, x, t, xt, tt, rec)
    lasso = lasso_vs_ridge(p, x, t, xt, tt, rec)
    bishop = bishop_tables(p, by_order, rec) if p.data == "bishop" else {}

    w9 = by_order.get(top, by_lambda[-math.inf])
    return {
        f"train/E_rms/M{top}": e_rms(w9, x, t).item(),
        f"test/E_rms/M{top}": e_rms(w9, xt, tt).item(),
        "test/E_rms/best_order": float(by_m["test E_RMS"].min()),
        "test/E_rms/best_lnlambda": float(by_l["test E_RMS"].min()),
        **gd, **lasso, **bishop,
    }


def gradient_descent(p, x, t, xt, tt, rec: StudyRecorder) -> dict[str, float]:
    """Repeat some fits with PolynomialRegression + Lightning Trainer; compare with the closed form."""
    if not p.gd.fits:
        return {}
    rows, curves = [], {}
    for fit in p.gd.fits:
        order, ln = int(fit.order), float(fit.get("ln_lambda", -math.inf))
        ln_sum = sum_form_ln_lambda(ln, len(x), p.penalty)
        module, settings = fit_gd(x, t, order, ln_sum, p.gd.steps, p.gd.max_condition, p.gd.log_every)
        w_gd, w_cf = module.w.detach(), ridge_lstsq(x, t, order, ln_sum)
        lam = math.exp(ln_sum) if ln > -math.inf else 0.0
        objective_cf = (0.5 * (predict(w_cf, x) - t).pow(2).sum() + 0.5 * lam * w_cf.pow(2).sum()).item()
        start = module.history[0][1]  # E~ at w = 0
        rel = ((w_gd - w_cf).abs().max() / w_cf.abs().max()).item()
        row = {"M": order, "ln λ": ln, "κ(H)": settings["condition"], "steps": p.gd.steps,
               "lr": settings["lr"], "momentum": settings["momentum"],
               "train E_RMS (GD)": e_rms(w_gd, x, t).item(), "train E_RMS (closed)": e_rms(w_cf, x, t).item(),
               "test E_RMS (GD)": e_rms(w_gd, xt, tt).item(), "test E_RMS (closed)": e_rms(w_cf, xt, tt).item(),
               "max|w_GD − w*| / max|w*|": rel, "agree": bool(rel < p.gd.agree_rtol)}
        rows.append(row)
        name = f"M = {order}, ln λ = {fmt_ln(ln)}"
        curves[name] = [(s, (e - objective_cf) / (start - objective_cf)) for s, e, _ in module.history]
        rec.child(f"gd-M{order}-lnl{fmt_ln(ln)}",
                  {"solver": "gd", "order": order, "ln_lambda": ln, "n_train": len(x), "steps": p.gd.steps,
                   "data": p.data, "penalty": p.penalty},
                  {"train/E_rms": row["train E_RMS (GD)"], "test/E_rms": row["test E_RMS (GD)"],
                   "gd/rel_coef_error": rel, "gd/condition": settings["condition"]},
                  {"train/objective": [(s, e) for s, e, _ in module.history],
                   "train/E_rms_curve": [(s, r) for s, _, r in module.history]})
    df = pd.DataFrame(rows)
    rec.table(df, "gd_vs_closed_form", ".3g")

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, points in curves.items():
        s, gap = zip(*points)
        ax.semilogy(s, np.maximum(gap, 1e-16), label=name)
    ax.set(xlabel="gradient-descent step", ylabel="(Ẽ(w_k) − Ẽ(w*)) / (Ẽ(0) − Ẽ(w*))", ylim=(1e-16, None))
    ax.legend(frameon=False, fontsize=8, loc="center right")
    ax.set_title("Heavy-ball GD (Lightning) vs the closed form w*", fontsize=10)
    rec.figure(fig, "gd_vs_closed_form")
    agree = df[df["agree"]]
    return {"gd/fits_agreeing": float(len(agree)),
            "gd/max_rel_coef_error_agreeing": float(agree["max|w_GD − w*| / max|w*|"].max()) if len(agree) else
            math.nan}


def lasso_vs_ridge(p, x, t, xt, tt, rec: StudyRecorder) -> dict[str, float]:
    """The lecture's L1 x L2 table, measured on the M = lasso.order polynomial: which coefficients are exactly 0."""
    if not p.lasso.ln_lambdas:
        return {}
    order = int(p.lasso.order)
    phi = design_matrix(x, order).numpy()
    columns, summary, w_prev = {}, {}, None
    metrics = {}
    for ln in sorted(p.lasso.ln_lambdas, reverse=True):  # large lambda first: warm starts along the path
        ln_sum = sum_form_ln_lambda(ln, len(x), p.penalty)
        lam = math.exp(ln_sum)
        w, sweeps, converged = lasso_cd(phi, t.numpy(), lam, p.lasso.max_sweeps, p.lasso.tol, w_prev)
        w_prev = w
        if not converged:
            log.warning("lasso ln λ=%g: coordinate descent stopped after %d sweeps", ln, sweeps)
        w_l, w_r = torch.from_numpy(w), ridge_lstsq(x, t, order, ln_sum)
        kkt = lasso_kkt_violation(phi, t.numpy(), w, lam)
        for name, wv, solver in ((f"lasso ln λ = {ln:g}", w_l, "lasso_cd"), (f"ridge ln λ = {ln:g}", w_r, "lstsq")):
            columns[name] = wv
            summary[name] = [int((wv == 0).sum()), e_rms(wv, x, t).item(), e_rms(wv, xt, tt).item()]
            m = {"train/E_rms": summary[name][1], "test/E_rms": summary[name][2],
                 "w/zeros": float(summary[name][0])}
            if solver == "lasso_cd":
                m.update({"lasso/sweeps": float(sweeps), "lasso/kkt_violation": kkt})
            rec.child(f"{solver}-M{order}-lnl{ln:g}",
                      {"solver": solver, "order": order, "ln_lambda": ln, "n_train": len(x), "data": p.data,
                       "penalty": p.penalty}, m)
        metrics[f"lasso/zeros/lnl{ln:g}"] = float(summary[f"lasso ln λ = {ln:g}"][0])
        metrics[f"lasso/kkt_violation/lnl{ln:g}"] = kkt
    names = sorted(columns, key=lambda n: (float(n.rsplit("= ", 1)[1]), n))
    df = coefficient_table({n: columns[n] for n in names}, order + 1)
    extra = pd.DataFrame({"": ["exactly 0", "train E_RMS", "test E_RMS"],
                          **{n: summary[n] for n in names}})
    rec.table(pd.concat([df, extra], ignore_index=True), "lasso_vs_ridge", ".3g")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    j = np.arange(order + 1)
    for ax, kind in zip(axes, ("lasso", "ridge")):
        cols = [n for n in names if n.startswith(kind)]
        width = 0.8 / len(cols)
        for i, n in enumerate(cols):
            ax.bar(j + (i - (len(cols) - 1) / 2) * width, columns[n].numpy(), width, label=n.split(" ", 1)[1])
        ax.axhline(0, color="k", lw=0.6)
        zeros = sum(int((columns[n] == 0).sum()) for n in cols)
        ax.set(xlabel="coefficient index j", xticks=j,
               title=f"{'L1 (lasso)' if kind == 'lasso' else 'L2 (ridge)'}, M = {order}: "
                     f"{zeros}/{len(cols) * (order + 1)} exactly 0")
        ax.legend(frameon=False, fontsize=8)
    axes[0].set_ylabel("$w_j^*$")
    rec.figure(fig, "lasso_vs_ridge")
    return metrics


def bishop_tables(p, by_order: dict[int, torch.Tensor], rec: StudyRecorder) -> dict[str, float]:
    """Bishop's Tables 1.1 and 1.2 beside the fits to his recovered data (`bishop_data`), and how much the
    2-decimal rounding of the ln lambda = -inf column (the targets' source) can move the reproduced columns."""
    from scipy.optimize import minimize_scalar

    x, t = bishop_data()
    other = next(f for f in PENALTIES if f != p.penalty)
    book = {ln: torch.tensor(w, dtype=torch.float64) for ln, w in BISHOP_TABLE_1_2.items()}

    def fit(ln, penalty=p.penalty):
        return ridge_lstsq(x, t, 9, sum_form_ln_lambda(ln, len(x), penalty) if ln > -math.inf else ln)

    # Which ln lambda (this penalty form) would give the -18 column: a 1-D least-squares fit of all 10 coefficients.
    best = minimize_scalar(lambda ln: float((fit(ln) - book[-18.0]).pow(2).sum()), bounds=(-22.0, -14.0),
                           method="bounded", options={"xatol": 1e-6})
    fitted = f"reproduced ln λ = {best.x:.3f} ({p.penalty}, fitted)".replace("-", "−")
    columns = {
        "Bishop ln λ = −∞": book[-math.inf], "reproduced ln λ = −∞": fit(-math.inf),
        "Bishop ln λ = −18": book[-18.0], f"reproduced ln λ = −18 ({p.penalty})": fit(-18.0),
        fitted: fit(best.x),
        "Bishop ln λ = 0": book[0.0], f"reproduced ln λ = 0 ({p.penalty})": fit(0.0),
        f"reproduced ln λ = 0 ({other})": fit(0.0, other),
    }
    table = coefficient_table(columns, 10)
    ref = {name: book[-math.inf if "−∞" in name else -18.0 if "−18" in name or "fitted" in name else 0.0]
           for name in columns}
    dev = {name: (w - ref[name]).abs().max().item() for name, w in columns.items()}
    table = pd.concat([table, pd.DataFrame({"": ["max |reproduced − Bishop|"],
                                            **{n: [f"{dev[n]:.2g}" if n.startswith("reproduced") else ""]
                                               for n in columns}})], ignore_index=True)
    rec.table(table, "table1_2_bishop_vs_reproduced", ".2f")

    t11 = {}
    for order in sorted(set(by_order) & set(BISHOP_TABLE_1_1)):
        t11[f"Bishop M = {order}"] = torch.tensor(BISHOP_TABLE_1_1[order], dtype=torch.float64)
        t11[f"reproduced M = {order}"] = by_order[order]
    if t11:
        rec.table(coefficient_table(t11, 10), "table1_1_bishop_vs_reproduced", ".2f")

    # Sensitivity: each -inf coefficient anywhere in its rounding interval, independently and uniformly.
    gen = torch.Generator().manual_seed(int(p.bishop_draws_seed))
    delta = (torch.rand(p.bishop_draws, 10, generator=gen, dtype=torch.float64) * 2 - 1) * ROUNDING
    xs, ts = bishop_data(book[-math.inf] + delta)
    xs = xs.expand(p.bishop_draws, -1)
    w18 = ridge_lstsq(xs, ts, 9, sum_form_ln_lambda(-18.0, 10, p.penalty))
    w0 = ridge_lstsq(xs, ts, 9, sum_form_ln_lambda(0.0, 10, p.penalty))
    rounds = ((w0 - book[0.0]).abs() <= ROUNDING + 1e-9).all(-1).double().mean().item()
    spread = pd.DataFrame({
        "j": range(10), "t_j (x = j/9)": t.numpy(),
        "t_j range (max − min)": (ts.amax(0) - ts.amin(0)).numpy(), "t_j std": ts.std(0).numpy(),
        "w_j (ln λ = −18) range": (w18.amax(0) - w18.amin(0)).numpy(),
        "|w_j (ln λ = −18) − Bishop| min over draws": (w18 - book[-18.0]).abs().amin(0).numpy(),
        "w_j (ln λ = 0) range": (w0.amax(0) - w0.amin(0)).numpy(),
    })
    rec.table(spread, "table1_2_rounding_sensitivity", ".3g")
    log.info("Bishop: ln λ = 0 column within rounding in %.0f%% of %d perturbed draws", 100 * rounds,
             p.bishop_draws)
    return {
        "bishop/lnl0/max_abs_dev": dev[f"reproduced ln λ = 0 ({p.penalty})"],
        "bishop/lnl0/max_abs_dev_other_penalty": dev[f"reproduced ln λ = 0 ({other})"],
        "bishop/lnl-18/max_abs_dev": dev[f"reproduced ln λ = −18 ({p.penalty})"],
        "bishop/lnl-18/fitted_ln_lambda": float(best.x),
        "bishop/lnl-18/fitted_max_abs_dev": dev[fitted],
        "bishop/lninf/max_abs_dev": dev["reproduced ln λ = −∞"],
        "bishop/table1_1/max_abs_dev": max(((t11[f"reproduced M = {m}"] - t11[f"Bishop M = {m}"]).abs().max().item()
                                            for m in by_order if m in BISHOP_TABLE_1_1), default=math.nan),
        "bishop/rounding/t_range_max": (ts.amax(0) - ts.amin(0)).max().item(),
        "bishop/rounding/w_lnl-18_range_max": (w18.amax(0) - w18.amin(0)).max().item(),
        "bishop/rounding/lnl0_within_rounding_fraction": rounds,
    }
