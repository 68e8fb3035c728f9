"""`+exp=polynomial`: Bishop PRML §1.1 (Figs 1.2, 1.4-1.8, Tables 1.1-1.2), measured, plus the lecture's L1 x L2 table.

Data: t = sin(2 pi x) + N(0, noise_std^2); x on a grid in [0, 1] ("spaced uniformly", Bishop) or uniform random.
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
from reglab.models.polynomial import (design_matrix, e_rms, fit_gd, lasso_cd, lasso_kkt_violation, predict,
                                      ridge_lstsq)
from reglab.runs.study import StudyRecorder

log = logging.getLogger(__name__)
STUDY = "polynomial"
TRUE_CURVE = dict(color="tab:green", lw=1.5)
FIT = dict(color="tab:red", lw=1.5)
POINTS = dict(ls="none", marker="o", ms=6, mfc="none", mec="tab:blue", mew=1.3)


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


def fmt_ln(ln_lambda: float) -> str:
    return "−∞" if ln_lambda == -math.inf else f"{ln_lambda:g}"


def curve_panel(ax, x, t, w=None, label="", fit_color=FIT):
    grid = torch.linspace(0, 1, 400, dtype=torch.float64)
    ax.plot(grid, target(grid), **TRUE_CURVE)
    if w is not None:
        ax.plot(grid, predict(w, grid), **fit_color)
    ax.plot(x, t, **POINTS)
    ax.set(xlim=(-0.05, 1.05), ylim=(-1.5, 1.5), xticks=[0, 1], yticks=[-1, 0, 1], xlabel="$x$", ylabel="$t$")
    ax.text(0.95, 0.93, label, transform=ax.transAxes, ha="right", va="top", fontsize=11)


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
    if not p.noise_std > 0:
        raise ConfigError(f"{STUDY}.noise_std={p.noise_std!r} is invalid: expected a number > 0")
    return StudyRecorder(cfg, STUDY).run(lambda rec: _run(cfg, p, rec), p.threads)


def _run(cfg: DictConfig, p: DictConfig, rec: StudyRecorder) -> dict[str, float]:
    seed, top = cfg.seed, p.max_order
    x, t = sample(p.n_train, p.noise_std, p.design, seed * 100)
    xt, tt = sample(p.n_test, p.noise_std, "random" if p.design == "random" else "grid", seed * 100 + 1)

    def closed(order, ln_lambda, xs=x, ts=t, tag=""):
        w = ridge_lstsq(xs, ts, order, ln_lambda)
        m = {"train/E_rms": e_rms(w, xs, ts).item(), "test/E_rms": e_rms(w, xt, tt).item(),
             "w/max_abs": w.abs().max().item()}
        rec.child(f"lstsq-M{order}-lnl{fmt_ln(ln_lambda)}-N{len(xs)}{tag}",
                  {"solver": "lstsq", "order": order, "ln_lambda": ln_lambda, "n_train": len(xs)}, m)
        return w, m

    # Fig 1.2: the data
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    curve_panel(ax, x, t, label=f"N = {p.n_train}")
    ax.set_title("Training data and sin(2πx)  (cf. Bishop Fig. 1.2)", fontsize=10)
    rec.figure(fig, "fig1_2_data")

    # Fig 1.4 + Table 1.1: fits of several orders
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True, sharey=True)
    by_order = {}
    for ax, order in zip(axes.flat, p.orders):
        by_order[order], _ = closed(order, -math.inf)
        curve_panel(ax, x, t, by_order[order], f"M = {order}")
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
        curve_panel(ax, xn, tn, w, f"N = {n}")
    fig.suptitle(f"M = {top} with more data  (cf. Bishop Fig. 1.6)")
    rec.figure(fig, "fig1_6_more_data")

    # Fig 1.7 + Table 1.2: regularization
    lnls = [-math.inf, *p.ln_lambdas]
    by_lambda = {ln: closed(top, ln)[0] for ln in lnls}
    fig, axes = plt.subplots(1, len(p.ln_lambdas), figsize=(4 * len(p.ln_lambdas), 3.2), sharey=True,
                             squeeze=False)
    for ax, ln in zip(axes[0], p.ln_lambdas):
        curve_panel(ax, x, t, by_lambda[ln], f"ln λ = {fmt_ln(ln)}")
    fig.suptitle(f"M = {top}, regularized (Bishop eq. 1.4)  (cf. Bishop Fig. 1.7)")
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
    ax.set(xlabel="ln λ", ylabel="$E_{RMS}$", ylim=(0, max(1.0, min(by_l["test E_RMS"].max() * 1.05, 3))))
    ax.legend(frameon=False)
    ax.set_title(f"E_RMS vs ln λ, M = {top}  (cf. Bishop Fig. 1.8)", fontsize=10)
    rec.figure(fig, "fig1_8_erms_vs_lnlambda")

    gd = gradient_descent(p, x, t, xt, tt, rec)
    lasso = lasso_vs_ridge(p, x, t, xt, tt, rec)

    w9 = by_order.get(top, by_lambda[-math.inf])
    return {
        f"train/E_rms/M{top}": e_rms(w9, x, t).item(),
        f"test/E_rms/M{top}": e_rms(w9, xt, tt).item(),
        "test/E_rms/best_order": float(by_m["test E_RMS"].min()),
        "test/E_rms/best_lnlambda": float(by_l["test E_RMS"].min()),
        **gd, **lasso,
    }


def gradient_descent(p, x, t, xt, tt, rec: StudyRecorder) -> dict[str, float]:
    """Repeat some fits with PolynomialRegression + Lightning Trainer; compare with the closed form."""
    rows, curves = [], {}
    for fit in p.gd.fits:
        order, ln = int(fit.order), float(fit.get("ln_lambda", -math.inf))
        module, settings = fit_gd(x, t, order, ln, p.gd.steps, p.gd.max_condition, p.gd.log_every)
        w_gd, w_cf = module.w.detach(), ridge_lstsq(x, t, order, ln)
        lam = math.exp(ln) if ln > -math.inf else 0.0
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
                  {"solver": "gd", "order": order, "ln_lambda": ln, "n_train": len(x), "steps": p.gd.steps},
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
    order = int(p.lasso.order)
    phi = design_matrix(x, order).numpy()
    columns, summary, w_prev = {}, {}, None
    metrics = {}
    for ln in sorted(p.lasso.ln_lambdas, reverse=True):  # large lambda first: warm starts along the path
        lam = math.exp(ln)
        w, sweeps, converged = lasso_cd(phi, t.numpy(), lam, p.lasso.max_sweeps, p.lasso.tol, w_prev)
        w_prev = w
        if not converged:
            log.warning("lasso ln λ=%g: coordinate descent stopped after %d sweeps", ln, sweeps)
        w_l, w_r = torch.from_numpy(w), ridge_lstsq(x, t, order, ln)
        kkt = lasso_kkt_violation(phi, t.numpy(), w, lam)
        for name, wv, solver in ((f"lasso ln λ = {ln:g}", w_l, "lasso_cd"), (f"ridge ln λ = {ln:g}", w_r, "lstsq")):
            columns[name] = wv
            summary[name] = [int((wv == 0).sum()), e_rms(wv, x, t).item(), e_rms(wv, xt, tt).item()]
            m = {"train/E_rms": summary[name][1], "test/E_rms": summary[name][2],
                 "w/zeros": float(summary[name][0])}
            if solver == "lasso_cd":
                m.update({"lasso/sweeps": float(sweeps), "lasso/kkt_violation": kkt})
            rec.child(f"{solver}-M{order}-lnl{ln:g}",
                      {"solver": solver, "order": order, "ln_lambda": ln, "n_train": len(x)}, m)
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
