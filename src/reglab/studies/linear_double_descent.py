"""`+exp=linear_double_descent`: double descent in seconds, on the lecture's own regression example.

Data as in Bishop §1.1 (`studies.polynomial.sample`): N points x ~ U[0, 1], t = sin(2 pi x) + N(0, noise_std^2), a
test set of the same kind. Model: y(x) = sum_{k<p} w_k phi_k(x), linear in w, with the number of features p swept
from 1 past N. For p < N, least squares; for p >= N the data can be interpolated in infinitely many ways and the
minimum-norm interpolant w = Phi^+ t is taken, which is what `models.polynomial.min_norm_lstsq` (SVD, gelsd) returns
with lambda = 0 (the same solver as every polynomial fit; ridge with lambda > 0 is the same call).

Why the peak is at p = N (Belkin et al. 2019, PNAS 116:15849; Hastie et al. 2022, Ann. Statist. 50:949): w = sum_i
(u_i^T t / s_i) v_i over the nonzero singular values s_i of the N x p matrix Phi. The smallest one is smallest when
Phi is square (p = N), so the noise in t is amplified most there; adding features past N makes Phi wider and its
smallest singular value grows again (second descent). A small ridge penalty bounds 1/s_i by 1/(2 sqrt(lambda)) and
removes the peak.

Features (`linear_double_descent.features`):
- legendre (default): phi_k(x) = sqrt(2k+1) P_k(2x - 1) / (k+1)^decay, the polynomial model of §1.1 in an
  orthonormal basis (monomials x^k are so collinear that gelsd drops their small singular values as rank
  deficiency). With decay = 1 the minimum-norm interpolant minimises sum_k (k+1)^2 c_k^2, a smoothness norm, so the
  second descent approaches a smooth interpolant; decay = 0 gives the min-L2 interpolant, which turns spiky.
- relu: phi_k(x) = max(0, s_k (x - c_k)) / sqrt(p), kinks c_k ~ U[0, 1], signs s_k = +-1 (random ReLU features).
- fourier: phi_k(x) = sqrt(2/p) cos(omega_k x + b_k), omega_k ~ N(0, fourier_scale^2), b_k ~ U[0, 2 pi] (random
  Fourier features, Rahimi & Recht 2007).
Random features are drawn once per seed for the largest p; the sweep uses their first p (nested models).
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
from reglab.models.polynomial import PENALTIES, min_norm_lstsq, sum_form_ln_lambda
from reglab.results import paired, summarize
from reglab.runs.study import StudyRecorder
from reglab.studies.polynomial import sample

log = logging.getLogger(__name__)
STUDY = "linear_double_descent"
FEATURES = ("legendre", "relu", "fourier")
LOG = "log10 test/E_rms"


def legendre_features(x: torch.Tensor, p: int, decay: float = 1.0) -> torch.Tensor:
    """(N,) in [0, 1] -> (N, p): sqrt(2k+1) P_k(2x - 1) / (k+1)^decay, by the three-term recurrence
    (k+1) P_{k+1}(u) = (2k+1) u P_k(u) - k P_{k-1}(u), stable on [-1, 1]."""
    u = 2 * x.double() - 1
    cols = [torch.ones_like(u), u][:p]
    for k in range(1, p - 1):
        cols.append(((2 * k + 1) * u * cols[k] - k * cols[k - 1]) / (k + 1))
    k = torch.arange(p, dtype=torch.float64)
    return torch.stack(cols, -1) * (2 * k + 1).sqrt() / (k + 1) ** decay


class RandomFeatures:
    """Random ReLU or Fourier features of a scalar x, drawn once for `p_max`; `(x, p)` -> (N, p) uses the first p."""

    def __init__(self, kind: str, p_max: int, gen: torch.Generator, fourier_scale: float = 30.0):
        self.kind = kind
        if kind == "relu":
            self.a = torch.where(torch.rand(p_max, generator=gen) < 0.5, -1.0, 1.0).double()
            self.b = torch.rand(p_max, generator=gen, dtype=torch.float64)  # kink positions c_k
        else:
            self.a = fourier_scale * torch.randn(p_max, generator=gen, dtype=torch.float64)
            self.b = 2 * math.pi * torch.rand(p_max, generator=gen, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, p: int) -> torch.Tensor:
        x = x.double().unsqueeze(-1)
        if self.kind == "relu":
            return torch.relu(self.a[:p] * (x - self.b[:p])) / math.sqrt(p)
        return math.sqrt(2 / p) * torch.cos(self.a[:p] * x + self.b[:p])


def sweep(q: DictConfig, seed: int, ln_lambdas: dict[str, float]) -> pd.DataFrame:
    """One data set (and feature draw) per `seed`: for each p and each solver {name: ln lambda (penalty form)},
    train/test E_RMS and ||w||. Rows (solver, p, train/E_rms, test/E_rms, w/norm)."""
    gen = torch.Generator().manual_seed(seed + 2_000_003)  # not the data's stream: kinks must not sit on the x_n
    x, t = sample(q.n_train, q.noise_std, "random", seed)
    xt, tt = sample(q.n_test, q.noise_std, "random", seed + 1_000_003)
    if q.features == "legendre":
        def phi(xs, p):
            return legendre_features(xs, p, q.decay)
    else:
        phi = RandomFeatures(q.features, max(q.p), gen, q.fourier_scale)
    rows = []
    for p in q.p:
        f, ft = phi(x, p), phi(xt, p)
        for solver, ln in ln_lambdas.items():
            w = min_norm_lstsq(f, t, sum_form_ln_lambda(ln, len(x), q.penalty))
            rows.append({"solver": solver, "p": p,
                         "train/E_rms": (f @ w - t).pow(2).mean().sqrt().item(),
                         "test/E_rms": (ft @ w - tt).pow(2).mean().sqrt().item(), "w/norm": w.norm().item()})
    return pd.DataFrame(rows)


def validate(q: DictConfig) -> None:
    for key in ("n_train", "n_test", "seeds"):
        if not isinstance(q[key], int) or q[key] < (2 if key == "seeds" else 1):
            least = 2 if key == "seeds" else 1
            raise ConfigError(f"{STUDY}.{key}={q[key]!r} is invalid: expected an integer >= {least}")
    if q.features not in FEATURES:
        raise ConfigError(f"{STUDY}.features={q.features!r} is not one of {', '.join(FEATURES)}")
    if q.penalty not in PENALTIES:
        raise ConfigError(f"{STUDY}.penalty={q.penalty!r} is not one of {', '.join(PENALTIES)}")
    if not q.p or any(not isinstance(p, int) or p < 1 for p in q.p) or list(q.p) != sorted(set(q.p)):
        raise ConfigError(f"{STUDY}.p={list(q.p)!r} is invalid: expected increasing integers >= 1")
    if not q.noise_std > 0:
        raise ConfigError(f"{STUDY}.noise_std={q.noise_std!r} is invalid: expected a number > 0")


def run(cfg: DictConfig) -> dict[str, float]:
    q = cfg.get(STUDY)
    if q is None:
        raise ConfigError(f"{STUDY}: missing config node; run the preset with +exp={STUDY}")
    validate(q)
    return StudyRecorder(cfg, STUDY).run(lambda rec: _run(cfg, q, rec), q.threads)


def _run(cfg: DictConfig, q: DictConfig, rec: StudyRecorder) -> dict[str, float]:
    ln_lambdas = {"min_norm": -math.inf}
    if q.ridge_ln_lambda is not None:
        ln_lambdas["ridge"] = float(q.ridge_ln_lambda)
    parts = []
    for i in range(q.seeds):
        df = sweep(q, cfg.seed * 1000 + i, ln_lambdas).assign(seed=i)
        parts.append(df)
        for solver, part in df.groupby("solver"):  # one child per (solver, seed), the p sweep as its steps
            rec.child(f"{solver}-seed{i}",
                      {"solver": solver, "ln_lambda": ln_lambdas[solver], "seed": i, "features": q.features,
                       "n_train": q.n_train, "penalty": q.penalty},
                      {}, {k: list(zip(part["p"], part[k])) for k in ("train/E_rms", "test/E_rms", "w/norm")})
    runs = pd.concat(parts, ignore_index=True)
    # Near p = N the error spans ~10 decades across seeds (one seed dominates a plain mean): the figure and the
    # claims use log10 E_RMS (mean +- SE of the log = geometric mean x/÷ a factor), the table gives both.
    runs[LOG] = np.log10(runs["test/E_rms"])
    table = summarize(runs, by=["solver", "p"], metrics=[LOG, "test/E_rms", "train/E_rms", "w/norm"])
    rec.table(table[["solver", "p", "n", f"{LOG}_mean", f"{LOG}_se", "test/E_rms_mean", "test/E_rms_se",
                     "train/E_rms_mean", "w/norm_mean"]], "test_error_vs_p", ".4g")
    runs.to_csv(rec.dir / "runs.csv", index=False)

    n = q.n_train
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    colors = {"min_norm": "tab:red", "ridge": "tab:blue"}
    for solver, part in table.groupby("solver", sort=False):
        label = ("min-norm least squares (λ = 0)" if solver == "min_norm"
                 else f"ridge, ln λ = {ln_lambdas[solver]:g} ({q.penalty} form)")
        mean, se = part[f"{LOG}_mean"].to_numpy(), part[f"{LOG}_se"].to_numpy()
        ax.plot(part["p"], 10**mean, "o-", ms=3, color=colors[solver], label=f"test, {label}")
        ax.fill_between(part["p"], 10 ** (mean - se), 10 ** (mean + se), color=colors[solver], alpha=0.2, lw=0)
        if solver == "min_norm":
            ax.plot(part["p"], part["train/E_rms_mean"].clip(lower=1e-6), "--", color="tab:gray", lw=1,
                    label="train, min-norm")
    ax.axvline(n, color="k", ls=":", lw=1, label=f"p = N = {n} (interpolation threshold)")
    ax.set(xscale="log", yscale="log", xlabel="number of features p", ylabel="$E_{RMS}$",
           ylim=(1e-2, None), title=f"Linear double descent: {q.features} features, N = {n}; test: "
                                    f"10^(mean ± SE of log10 E_RMS) over {q.seeds} seeds")
    ax.title.set_fontsize(9)
    ax.legend(frameon=False, fontsize=7, loc="upper right")
    rec.figure(fig, "test_error_vs_p")

    mn = table[table["solver"] == "min_norm"].set_index("p")[f"{LOG}_mean"]
    metrics = {"summary/peak_p": float(mn.idxmax()), "summary/log10_test_E_rms_at_N": float(mn.get(n, math.nan)),
               "summary/log10_test_E_rms_at_max_p": float(mn.iloc[-1])}
    # the peak against the nearest swept p to N/2 and to 4N: paired by seed (same data set), on log10 E_RMS. The peak
    # is the argmax of these seeds' means, so the intervals are optimistic (selection is not corrected for).
    peak = int(mn.idxmax())
    for name, target_p in (("half_N", n / 2), ("4N", 4 * n)):
        base = int(min(q.p, key=lambda v: abs(v - target_p)))
        if base == peak:
            continue
        d = paired(runs[(runs["solver"] == "min_norm") & runs["p"].isin([base, peak])], "p", base, LOG).iloc[0]
        metrics.update({f"summary/log10_peak_minus_{name}": float(d["diff_mean"]),
                        f"summary/log10_peak_minus_{name}_se": float(d["diff_se"]),
                        f"summary/log10_peak_minus_{name}_ci_low": float(d["diff_ci_low"])})
    if "ridge" in ln_lambdas:
        rd = table[table["solver"] == "ridge"].set_index("p")[f"{LOG}_mean"]
        metrics["summary/ridge_log10_test_E_rms_at_N"] = float(rd.get(n, math.nan))
        metrics["summary/ridge_log10_test_E_rms_max"] = float(rd.max())
    log.info("%s: peak at p = %g, log10 test E_RMS at p = N: %.3g", STUDY, metrics["summary/peak_p"],
             metrics["summary/log10_test_E_rms_at_N"])
    return metrics
