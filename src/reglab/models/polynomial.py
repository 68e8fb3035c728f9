"""Polynomial curve fitting, Bishop PRML §1.1: y(x, w) = sum_{j=0}^{M} w_j x^j, and three ways to find w.

Error function the solvers take (Bishop eq. 1.4 as printed, the "sum" form):
    E~(w) = 1/2 sum_n (y(x_n, w) - t_n)^2 + lambda/2 ||w||^2        (w_0 included, as in Bishop's Table 1.2)
whose minimiser is the lecture's eq. (13), w* = (X^T X + lambda I)^{-1} X^T t, X_nj = x_n^j. The lecture's
eq. (11) (||t - Xw||^2 + lambda ||w||^2) has the same minimiser for the same lambda. Its eq. (7), the "mean" form
MSE + lambda ||w||^2 (same minimiser as 1/(2N) sum_n (y - t)^2 + lambda/2 ||w||^2), is the sum form with N lambda:
Bishop's Table 1.2 was computed in that form (its ln lambda = 0 is lambda_sum = N; docs/studies.md, measured).
`sum_form_ln_lambda` converts; the studies state lambda in the mean form by default (`polynomial.penalty`).

Solvers:
- `min_norm_lstsq` / `ridge_lstsq`: the closed form computed without forming X^T X. The M = 9, N = 10 design has
  cond(X) ~ 1.5e7, so cond(X^T X) ~ 2e14 and the normal equations keep barely two digits in float64. Instead solve the
  augmented least-squares problem [X; sqrt(lambda) I] w ~ [t; 0] (same minimiser) with LAPACK gelsd (SVD), in
  float64. With lambda = 0 and more features than points gelsd returns the minimum-norm interpolant (linear double descent).
- `PolynomialRegression`: a LightningModule trained by full-batch gradient descent with heavy-ball momentum.
- `lasso_cd`: L1 instead of L2, E(w) = 1/2 ||t - Xw||^2 + lambda ||w||_1, by cyclic coordinate descent whose
  coordinate step is the lecture's soft-thresholding rule.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import torch
from torch import nn

from reglab.regularization.penalties import soft_threshold


def design_matrix(x: torch.Tensor, order: int) -> torch.Tensor:
    """(..., N) -> (..., N, M+1) with columns x^0 .. x^M."""
    return x.unsqueeze(-1) ** torch.arange(order + 1, dtype=x.dtype, device=x.device)


def predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w (..., M+1), x (..., N) -> y (..., N)."""
    return (design_matrix(x, w.shape[-1] - 1) @ w.unsqueeze(-1)).squeeze(-1)


def e_rms(w: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Bishop eq. (1.3): E_RMS = sqrt(2 E(w) / N) = sqrt(mean (y - t)^2), with the unregularized E."""
    return (predict(w, x) - t).pow(2).mean(-1).sqrt()


PENALTIES = ("mean", "sum")


def sum_form_ln_lambda(ln_lambda: float, n: int, penalty: str) -> float:
    """ln of the sum-form lambda (what the solvers take) for ln_lambda given in `penalty` form on n points.

    mean: 1/(2N) sum (y - t)^2 + lambda/2 ||w||^2, i.e. half the lecture's eq. (7): the sum form with N lambda
    (likewise 1/(2N) ||t - Xw||^2 + lambda ||w||_1 for the lasso, sklearn's alpha). sum: Bishop eq. (1.4).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty={penalty!r} is not one of {', '.join(PENALTIES)}")
    return ln_lambda + math.log(n) if penalty == "mean" else ln_lambda


def min_norm_lstsq(phi: torch.Tensor, t: torch.Tensor, ln_lambda: float = -math.inf) -> torch.Tensor:
    """argmin_w 1/2 ||t - Phi w||^2 + lambda/2 ||w||^2 for Phi (..., N, P), t (..., N) -> w (..., P).

    ln_lambda = -inf is plain least squares; gelsd (SVD, singular values below eps * max(N, P) * s_max dropped)
    then returns the minimum-norm solution, Phi^+ t, also when P > N and Phi w = t has many solutions. float64, CPU.
    """
    phi, t = phi.double().cpu(), t.double().cpu()
    if ln_lambda > -math.inf:
        p = phi.shape[-1]
        eye = math.exp(ln_lambda / 2) * torch.eye(p, dtype=phi.dtype).expand(*phi.shape[:-2], -1, -1)
        phi = torch.cat([phi, eye], dim=-2)
        t = torch.cat([t, t.new_zeros(*t.shape[:-1], p)], dim=-1)
    return torch.linalg.lstsq(phi, t.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def ridge_lstsq(x: torch.Tensor, t: torch.Tensor, order: int, ln_lambda: float = -math.inf) -> torch.Tensor:
    """argmin_w E~(w) (sum form) for x, t of shape (..., N) (a batch of data sets is solved at once) -> (..., M+1).

    ln_lambda = -inf is plain least squares (lambda = 0).
    """
    return min_norm_lstsq(design_matrix(x.double().cpu(), order), t, ln_lambda)


# --- gradient descent ------------------------------------------------------------------------------------------
def gd_settings(x: torch.Tensor, order: int, ln_lambda: float, max_condition: float) -> dict[str, float | torch.Tensor]:
    """Feature scales and heavy-ball step for E~ on these inputs.

    Features are rescaled, phi_j = x^j / s_j with s_j = RMS_n(x_n^j), and the parameters are v_j = s_j w_j, so the
    model and E~ (penalty lambda/2 sum_j (v_j/s_j)^2 = lambda/2 ||w||^2) are unchanged: only the Hessian
    H = Phi_s^T Phi_s + lambda diag(1/s^2) is better conditioned (a diagonal preconditioner). For a quadratic with
    eigenvalues in [mu, L] Polyak's heavy ball converges fastest with lr = 4/(sqrt L + sqrt mu)^2 and
    momentum ((sqrt L - sqrt mu)/(sqrt L + sqrt mu))^2. When kappa = L/mu exceeds max_condition (M = 9 with lambda = 0
    has kappa ~ 1e14) mu is raised to L/max_condition: the momentum stays < 1 and the run is early-stopped GD,
    not the closed-form minimiser (the studies report how far it got).
    """
    phi = design_matrix(x.double().cpu(), order)
    scale = phi.pow(2).mean(0).sqrt()
    lam = math.exp(ln_lambda) if ln_lambda > -math.inf else 0.0
    phi_s = phi / scale
    hessian = phi_s.T @ phi_s + torch.diag(lam / scale**2)
    eig = torch.linalg.eigvalsh(hessian)
    big, small = eig[-1].item(), max(eig[0].item(), 0.0)
    kappa = big / small if small > 0 else math.inf
    small = max(small, big / max_condition)
    lr = 4.0 / (math.sqrt(big) + math.sqrt(small)) ** 2
    momentum = ((math.sqrt(big) - math.sqrt(small)) / (math.sqrt(big) + math.sqrt(small))) ** 2
    return {"scale": scale, "lr": lr, "momentum": momentum, "condition": kappa}


class FullBatch:
    """The whole training set as one batch, `steps` times: one epoch = `steps` gradient-descent steps."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, steps: int):
        self.batch, self.steps = (x.double(), t.double()), steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


class PolynomialRegression(L.LightningModule):
    """y(x, w) = sum_j w_j x^j trained on E~(w) (Bishop eq. 1.4) by full-batch heavy-ball gradient descent.

    Parameters are v = s * w (rescaled features, see `gd_settings`); `w` maps them back. `history` holds
    (step, E~(w), E_RMS train) every `log_every` steps. Train with Trainer(precision="64-true").
    """

    def __init__(self, order: int, ln_lambda: float, scale: torch.Tensor, lr: float, momentum: float,
                 log_every: int = 100):
        super().__init__()
        self.order, self.ln_lambda = order, ln_lambda
        self.lam = math.exp(ln_lambda) if ln_lambda > -math.inf else 0.0
        self.lr, self.momentum, self.log_every = lr, momentum, log_every
        self.register_buffer("scale", scale.double().clone())
        self.v = nn.Parameter(torch.zeros(order + 1, dtype=torch.float64))
        self.history: list[tuple[int, float, float]] = []

    @property
    def w(self) -> torch.Tensor:
        return self.v / self.scale

    def objective(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = (design_matrix(x, self.order) / self.scale) @ self.v - t
        sse = 0.5 * residual.pow(2).sum()
        return sse + 0.5 * self.lam * self.w.pow(2).sum(), (2 * sse / x.numel()).sqrt()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, t = batch
        loss, erms = self.objective(x, t)
        if batch_idx % self.log_every == 0:
            self.history.append((batch_idx, loss.item(), erms.item()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def fit_gd(x: torch.Tensor, t: torch.Tensor, order: int, ln_lambda: float, steps: int,
           max_condition: float = 1e6, log_every: int = 100) -> tuple[PolynomialRegression, dict]:
    """Train a PolynomialRegression with a Lightning Trainer (CPU, float64); returns it and its gd_settings."""
    settings = gd_settings(x, order, ln_lambda, max_condition)
    module = PolynomialRegression(order, ln_lambda, settings["scale"], settings["lr"], settings["momentum"],
                                  log_every)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision="64-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():  # one in-memory batch: DataLoader workers would only add overhead
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=FullBatch(x, t, steps))
    with torch.no_grad():
        loss, erms = module.objective(x.double(), t.double())
    module.history.append((steps, loss.item(), erms.item()))
    return module, settings


# --- L1: coordinate descent with soft-thresholding ---------------------------------------------------------------
def lasso_cd(phi: np.ndarray, t: np.ndarray, lam: float, max_sweeps: int = 20000, tol: float = 1e-12,
             w0: np.ndarray | None = None) -> tuple[np.ndarray, int, bool]:
    """argmin_w 1/2 ||t - Phi w||^2 + lam ||w||_1 by cyclic coordinate descent -> (w, sweeps, converged).

    Minimising over w_j alone gives the lecture's soft-thresholding rule with w_j^OLS = rho_j / Q_j, the least-
    squares coefficient of the partial residual r^(j) = t - sum_{k != j} Phi_k w_k:
        w_j = S(rho_j, lam) / Q_j = S(rho_j / Q_j, lam / Q_j),   rho_j = Phi_j^T r^(j),  Q_j = sum_n Phi_nj^2.
    Stops when no coordinate moves more than tol * max(1, max|w|) in a sweep. float64; the loop is scalar, so the
    arrays are numpy and only the threshold goes through reglab.regularization.penalties.soft_threshold.
    """
    w = np.zeros(phi.shape[1]) if w0 is None else np.array(w0, dtype=np.float64)
    q = (phi**2).sum(0)
    residual = t - phi @ w
    for sweep in range(1, max_sweeps + 1):
        biggest = 0.0
        for j in range(phi.shape[1]):
            rho = phi[:, j] @ residual + q[j] * w[j]
            new = soft_threshold(torch.tensor(rho), lam).item() / q[j]
            if new != w[j]:
                residual -= (new - w[j]) * phi[:, j]
                biggest = max(biggest, abs(new - w[j]))
                w[j] = new
        if biggest <= tol * max(1.0, np.abs(w).max()):
            return w, sweep, True
    return w, max_sweeps, False


def lasso_kkt_violation(phi: np.ndarray, t: np.ndarray, w: np.ndarray, lam: float) -> float:
    """Largest violation of the lasso optimality conditions, g = Phi^T (t - Phi w):
    g_j = lam sign(w_j) where w_j != 0, |g_j| <= lam where w_j = 0. Zero exactly at the minimiser."""
    g = phi.T @ (t - phi @ w)
    return float(np.where(w != 0, np.abs(g - lam * np.sign(w)), np.maximum(np.abs(g) - lam, 0.0)).max())
