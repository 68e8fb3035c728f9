"""`+exp=bias_variance`: the lecture's decomposition, eqs. (14)-(16), measured.

L independent training sets D_1..D_L are drawn from t = f(x) + eps, f(x) = sin(2 pi x), eps ~ N(0, sigma^2); one
model is fitted per set. On n fixed test inputs x_i ~ U[0, 1] (E_x of eq. 16 as an average over them), with fresh
test noise y_li = f(x_i) + eps_li for each set (and each configuration: the rows' checks are independent):
    fbar(x_i) = 1/L sum_l f_l(x_i)
    v(x_i)    = 1/(L-1) sum_l (f_l(x_i) - fbar(x_i))^2               (unbiased sample variance over the L fits)
    variance  = 1/n sum_i v(x_i)
    bias^2    = 1/n sum_i [(fbar(x_i) - f(x_i))^2 - v(x_i)/L]         (unbiased: may be < 0 when the bias is tiny)
    MSE       = 1/(nL) sum_{i,l} (y_li - f_l(x_i))^2                  (measured, like a test loss)
Why not the plug-in estimates (1/n sum_i (fbar - f)^2 and the 1/L variance): fbar is a mean of L fits, so
E (fbar - f)^2 = (E f_l - f)^2 + Var f_l / L: the plug-in bias^2 is inflated by variance/L, which dominates it
where the variance is large (M = 9, L = 100: variance ~45, plug-in bias^2 0.47 against an unbiased 0.013), and the
1/L variance is low by the same variance/L. The unbiased pair removes both; its sum is the plug-in sum exactly
(bias^2 + variance = plug-in bias^2 - v/L + v = plug-in bias^2 + (L-1)/L v = plug-in bias^2 + plug-in variance),
so the check below is unchanged. The plug-in values are kept as `bias2_plugin` / `variance_plugin`.
Expanding (y - f_l)^2 = (f - f_l)^2 + 2 eps (f - f_l) + eps^2 and 1/L sum_l (f - f_l)^2 = (fbar - f)^2 + plug-in
variance = bias^2 + variance (per x_i) gives, exactly for these empirical averages,
    MSE - (bias^2 + variance + sigma^2) = mean_{i,l} s_li,   s = (eps^2 - sigma^2) + 2 eps (f - f_l).
Because the test noise is drawn independently of the fits, each s_li has mean 0 given the fits and the s_li are
independent: the gap is pure sampling error of the test noise, with standard error SE = std(s) / sqrt(nL). The
check is |gap| <= k SE (k = tolerance_se, default 4: a false alarm rate of ~6e-5 per row under normality).
What the gap does *not* contain: the sampling error of bias^2 and variance as estimates of their population values
(unbiased, but noisy where the variance is large or heavy-tailed, as at M = 9).

(a) polynomial of order M (closed form, `ridge_lstsq` batched over the L sets) across M and across ln lambda;
(b) one-hidden-layer MLPs across width: L `reglab.models.MLP`s per width, each initialized from its own seed, fused
into one `reglab.population.PopulationMLP` and trained at once (full-batch Adam on the sum of the per-set mean
squared errors: exactly L independent trainings).
"""

from __future__ import annotations

import logging
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from reglab.errors import ConfigError
from reglab.models import MLP
from reglab.models.polynomial import predict, ridge_lstsq
from reglab.population import PopulationMLP
from reglab.runs.study import StudyRecorder

log = logging.getLogger(__name__)
STUDY = "bias_variance"


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x)


def training_sets(n_sets: int, n: int, noise_std: float, seed: int, dtype=torch.float64):
    """L training sets (L, N): x ~ U[0, 1], t = f(x) + noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_sets, n, generator=gen, dtype=dtype)
    return x, target(x) + noise_std * torch.randn(n_sets, n, generator=gen, dtype=dtype)


def decompose(pred: torch.Tensor, f: torch.Tensor, y: torch.Tensor, sigma: float) -> dict[str, float]:
    """pred, y: (L, n) predictions of the L fits and noisy test targets; f: (n,) the true function.

    bias2 and variance are the unbiased estimates (module docstring); bias2_plugin / variance_plugin the plug-in ones.
    """
    pred, f, y = pred.double(), f.double(), y.double()
    L = pred.shape[0]
    if L < 2:
        raise ValueError(f"decompose: need predictions of L >= 2 fits, got L = {L}")
    fbar = pred.mean(0)
    bias2_plugin = (fbar - f).pow(2).mean().item()
    variance_plugin = (pred - fbar).pow(2).mean().item()
    # Unbiased over the L sets: E[plug-in bias^2] = bias^2 + Var/L and E[plug-in variance] = (L-1)/L Var, so
    #   variance = L/(L-1) plug-in variance,  bias^2 = plug-in bias^2 - variance/L;  bias^2 + variance = plug-in sum.
    # bias^2 can come out slightly negative where the true bias^2 is below its sampling noise: kept as is (not
    # clipped, which would bias it up again and break the sum); u_curve marks such points on a log axis.
    variance = L / (L - 1) * variance_plugin
    bias2 = bias2_plugin - variance / L
    mse = (y - pred).pow(2).mean().item()
    eps = y - f
    s = eps.pow(2) - sigma**2 + 2 * eps * (f - pred)
    total = bias2 + variance + sigma**2
    se = (s.std() / math.sqrt(s.numel())).item()
    return {"bias2": bias2, "variance": variance, "bias2_plugin": bias2_plugin, "variance_plugin": variance_plugin,
            "noise": sigma**2, "sum": total, "mse": mse,
            "gap": mse - total, "se": se, "gap_over_se": abs(mse - total) / se,
            "noise_measured": eps.pow(2).mean().item(),
            # the identity with the measured noise terms in place of sigma^2: zero up to rounding
            "identity_residual": mse - (bias2 + variance + eps.pow(2).mean().item()
                                        + (2 * eps * (f - pred)).mean().item())}


def init_mlps(n: int, width: int, m: DictConfig, seed: int) -> list[MLP]:
    """n solo MLPs 1 -> 1, each initialized (nn.Linear's default init) from its own seed, drawn from `seed`."""
    member_seeds = torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    nets = []
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global RNG: restore it afterwards
        for s in member_seeds:
            torch.manual_seed(s)
            nets.append(MLP((1,), 1, width=width, depth=m.depth, activation=m.activation))
    return nets


def fit_mlps(x: torch.Tensor, t: torch.Tensor, width: int, m: DictConfig, seed: int) -> PopulationMLP:
    """x, t (L, N): one MLP per set (`init_mlps`), all trained at once by full-batch Adam."""
    net = PopulationMLP(init_mlps(x.shape[0], width, m, seed))
    opt = torch.optim.Adam(net.parameters(), lr=m.lr)
    xs, ts = x.float().unsqueeze(-1), t.float().unsqueeze(-1)  # (L, N, 1): member l reads its own set
    for _ in range(m.steps):
        # sum over sets of each set's mean squared error: the gradient w.r.t. member l's weights is that of its
        # own loss, so this is L independent full-batch trainings
        loss = (net(xs) - ts).pow(2).mean(dim=(1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not torch.isfinite(loss):
        raise ConfigError(f"{STUDY}.mlp: training diverged at width={width}; lower {STUDY}.mlp.lr")
    return net


def run(cfg: DictConfig) -> dict[str, float]:
    b = cfg.get(STUDY)
    if b is None:
        raise ConfigError(f"{STUDY}: missing config node; run the preset with +exp={STUDY}")
    for key in ("n_datasets", "n_test"):
        if not isinstance(b[key], int) or b[key] < 2:
            raise ConfigError(f"{STUDY}.{key}={b[key]!r} is invalid: expected an integer >= 2")
    return StudyRecorder(cfg, STUDY).run(lambda rec: _run(cfg, b, rec), b.threads)


def _run(cfg: DictConfig, b: DictConfig, rec: StudyRecorder) -> dict[str, float]:
    seed, sigma, L = cfg.seed, float(b.noise_std), b.n_datasets
    gen = torch.Generator().manual_seed(seed * 100 + 1)
    x_test = torch.rand(b.n_test, generator=gen, dtype=torch.float64)
    f_test = target(x_test)

    rows, fits = [], {}

    def record(sweep: str, label: str, value: float, pred: torch.Tensor, params: dict):
        y_test = f_test + sigma * torch.randn(L, b.n_test, generator=gen, dtype=torch.float64)  # fresh noise
        d = decompose(pred, f_test, y_test, sigma)
        d["within"] = bool(d["gap_over_se"] <= b.tolerance_se)
        rows.append({"sweep": sweep, "parameter": label, "value": value, **d})
        rec.child(f"{sweep}-{label}{value:g}", {"sweep": sweep, label: value, **params},
                  {k: float(v) for k, v in d.items()})
        return d

    # (a) polynomial, closed form, all L sets in one batched solve per configuration
    pm = b.polynomial
    x, t = training_sets(L, pm.n_train, sigma, seed * 100)
    for order in pm.orders:
        w = ridge_lstsq(x, t, order, pm.ln_lambda)
        record("poly_order", "M", order, predict(w, x_test.expand(L, -1)),
               {"ln_lambda": pm.ln_lambda, "n_train": pm.n_train})
    lnls = np.linspace(pm.ln_lambda_sweep.start, pm.ln_lambda_sweep.stop, pm.ln_lambda_sweep.num)
    for ln in lnls:
        w = ridge_lstsq(x, t, pm.sweep_order, float(ln))
        pred = predict(w, x_test.expand(L, -1))
        record("poly_lnlambda", "ln_lambda", float(ln), pred, {"M": pm.sweep_order, "n_train": pm.n_train})
        fits[float(ln)] = w

    # (b) MLP across width
    mm = b.mlp
    xm, tm = training_sets(L, mm.n_train, sigma, seed * 100 + 2)
    for width in mm.widths:
        t0 = time.time()
        net = fit_mlps(xm, tm, int(width), mm, seed * 100 + 3)
        with torch.no_grad():
            pred = net(x_test.float().unsqueeze(-1)).squeeze(-1)  # one shared (n, 1) batch -> (L, n)
            train_mse = (net(xm.float().unsqueeze(-1)).squeeze(-1) - tm.float()).pow(2).mean().item()
        d = record("mlp_width", "width", int(width), pred,
                   {"depth": mm.depth, "activation": mm.activation, "steps": mm.steps, "lr": mm.lr,
                    "n_train": mm.n_train})
        rows[-1]["train_mse"] = train_mse
        log.info("mlp width %d: bias2 %.4f variance %.4f mse %.4f (%.1f s)", width, d["bias2"], d["variance"],
                 d["mse"], time.time() - t0)

    df = pd.DataFrame(rows)
    table = df[["sweep", "parameter", "value", "bias2", "variance", "noise", "sum", "mse", "gap", "se",
                "gap_over_se", "within"]].rename(columns={
                    "bias2": "bias²", "noise": "σ²", "sum": "bias²+var+σ²", "mse": "measured MSE",
                    "gap": "MSE − sum", "se": "SE", "gap_over_se": "|gap|/SE"})
    rec.table(table, "decomposition", ".4g")
    df.to_csv(rec.dir / "decomposition_full.csv", index=False)

    for sweep, xlabel, name, logx in (("poly_order", "polynomial order $M$", "polynomial_order", False),
                                      ("poly_lnlambda", f"ln λ, sum form (M = {pm.sweep_order})",
                                       "polynomial_lnlambda",
                                       False),
                                      ("mlp_width", f"hidden width ({mm.depth} hidden layer{'s' * (mm.depth > 1)},"
                                                    f" {mm.activation})", "mlp_width", True)):
        rec.figure(u_curve(df[df.sweep == sweep], xlabel, sigma, L, logx, {
            "poly_order": f"Polynomial, N = {pm.n_train}, "
                          + ("λ = 0" if pm.ln_lambda == -math.inf else f"ln λ = {pm.ln_lambda:g}"),
            "poly_lnlambda": f"Polynomial M = {pm.sweep_order}, N = {pm.n_train}",
            "mlp_width": f"MLP, N = {mm.n_train}, {mm.steps} Adam steps"}[sweep]), f"bias_variance_{name}")
    rec.figure(fits_figure(fits, x_test, pm, L), "fits_by_lnlambda")

    within = df["within"].all()
    if not within:
        log.warning("bias_variance: %d rows outside %g SE", int((~df["within"]).sum()), b.tolerance_se)
    best = df.loc[df.groupby("sweep")["mse"].idxmin()]
    out = {"test/max_gap_over_se": float(df["gap_over_se"].max()),
           "test/max_identity_residual": float(df["identity_residual"].abs().max()),
           "test/rows_within_tolerance": float(df["within"].mean())}
    for _, r in best.iterrows():
        out[f"test/best_mse/{r.sweep}"] = float(r.mse)
        out[f"best_value/{r.sweep}"] = float(r.value)
    return out


def u_curve(d: pd.DataFrame, xlabel: str, sigma: float, L: int, logx: bool, title: str):
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    v = d["value"].to_numpy()
    bias2 = d["bias2"].to_numpy()  # the unbiased estimates (see decompose): bias² may be slightly < 0
    ax.plot(v, bias2, "-", color="tab:blue", label="(bias)² (unbiased est.)")
    ax.plot(v, d["variance"], "-", color="tab:red", label="variance (unbiased est.)")
    ax.plot(v, d["bias2"] + d["variance"], "-", color="tab:pink", label="(bias)² + variance")
    ax.plot(v, d["sum"], "-", color="k", lw=1, label="(bias)² + variance + σ²")
    ax.plot(v, d["mse"], "o", color="k", mfc="none", ms=5, label="measured test MSE")
    ax.axhline(sigma**2, color="gray", ls="--", lw=1, label="σ²")
    top = float(np.nanmax(d["mse"].to_numpy()))
    logy = top > 20 * sigma**2
    ax.set(xlabel=xlabel, ylabel="error", yscale="log" if logy else "linear")
    if not logy:
        ax.set_ylim(bottom=min(0.0, float(np.nanmin(bias2))))
    elif (bias2 <= 0).any():
        # a log axis cannot show an estimate <= 0: mark those points at the axis floor instead of dropping them
        floor = ax.get_ylim()[0]
        ax.plot(v[bias2 <= 0], np.full(int((bias2 <= 0).sum()), floor), "v", color="tab:blue", ms=6, clip_on=False,
                label="(bias)² estimate ≤ 0 (at axis floor)")
        ax.set_ylim(bottom=floor)
    if logx:
        ax.set_xscale("log", base=2)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"{title}; L = {len(d) and L} sets", fontsize=10)
    return fig


def fits_figure(fits: dict[float, torch.Tensor], x_test: torch.Tensor, pm: DictConfig, L: int):
    """Bishop Fig. 3.5 layout: 20 of the L fits (left) and their mean vs f (right) at three ln lambda."""
    lnls = sorted(fits)
    chosen = [lnls[-1], lnls[len(lnls) // 2], lnls[0]]
    grid = torch.linspace(0, 1, 300, dtype=torch.float64)
    fig, axes = plt.subplots(3, 2, figsize=(7.5, 7.5), sharex=True, sharey=True)
    for row, ln in zip(axes, chosen):
        pred = predict(fits[ln], grid.expand(L, -1))
        for k in range(min(20, L)):
            row[0].plot(grid, pred[k], color="tab:red", lw=0.7, alpha=0.8)
        row[1].plot(grid, target(grid), color="tab:green", lw=1.5, label="f(x) = sin(2πx)")
        row[1].plot(grid, pred.mean(0), color="tab:red", lw=1.5, label=f"mean of {L} fits")
        row[0].text(0.97, 0.93, f"ln λ = {ln:g} (sum form)", transform=row[0].transAxes, ha="right", va="top")
        for ax in row:
            ax.set(ylim=(-1.5, 1.5), xlim=(0, 1), xticks=[0, 1], yticks=[-1, 0, 1])
        row[0].set_ylabel("$t$")
    axes[0, 1].legend(frameon=False, fontsize=8, loc="lower left")
    for ax in axes[-1]:
        ax.set_xlabel("$x$")
    fig.suptitle(f"M = {pm.sweep_order} polynomials, N = {pm.n_train}: 20 of the fits (left), their mean (right)"
                 "  (cf. Bishop Fig. 3.5)", fontsize=10)
    return fig
