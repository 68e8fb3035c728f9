"""Parameter-norm penalties and constraints (the lecture's "Penalização da Norma dos Parâmetros", eqs. 1-13).

Which parameters are penalized, one rule for every class here (as nanoGPT's weight-decay groups): weight matrices
and conv kernels, i.e. tensors with >= 2 dims. Biases and normalization gains/shifts (1-dim tensors) are left
alone unless `include_bias=true`: shrinking a bias or a BatchNorm gamma toward 0 does not make the function
smoother, it only limits what the layer can represent.

Strengths are per-sample-loss units: the Classifier's loss is the *mean* cross-entropy over the batch, so
L(theta) = 1/N sum_i loss_i + lambda * ||theta||, exactly the lecture's form.
"""

from __future__ import annotations

import torch
from torch import nn

from reglab.errors import ConfigError
from reglab.regularization.base import Regularizer


def is_matrix(p: torch.Tensor, net: nn.Module) -> bool:
    """A weight matrix or conv kernel (>= 2 dims), not a bias or norm gain/shift. A population's tensors carry the
    member as one more leading dim (`member_dims`, reglab/population/base.py), which does not count."""
    return p.dim() - getattr(net, "member_dims", 0) >= 2


def penalized_parameters(net: nn.Module, include_bias: bool = False) -> list[nn.Parameter]:
    """Trainable weight matrices and kernels; also biases and norm gamma/beta when include_bias."""
    return [p for p in net.parameters() if p.requires_grad and (include_bias or is_matrix(p, net))]


def soft_threshold(w: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Proximal operator of threshold*||w||_1: sign(w) * max(|w| - threshold, 0). Exact zeros for |w| <= t."""
    return torch.sign(w) * torch.clamp(w.abs() - threshold, min=0.0)


def weight_stats(net: nn.Module) -> dict[str, torch.Tensor]:
    """`params/zero_frac` (fraction of exactly-zero weights), `params/l1` = ||W||_1, `params/l2` = ||W||_2 over the
    penalized tensors (dims >= 2), as 0-dim tensors on the parameters' device (no sync here)."""
    return tensor_stats([p.detach() for p in penalized_parameters(net)])


def tensor_stats(params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight_stats of given tensors (a population member's matrices, from its state dict)."""
    if not params:
        return {}
    zeros = sum((p == 0).sum() for p in params)
    count = sum(p.numel() for p in params)
    l1 = sum(p.abs().sum(dtype=torch.float32) for p in params)
    l2 = torch.sqrt(sum(p.float().pow(2).sum() for p in params))
    return {"params/zero_frac": zeros.float() / count, "params/l1": l1, "params/l2": l2}


def _check_strength(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key}={value!r} must be a number >= 0")
    return float(value)


def _l1(params: list[torch.Tensor]) -> torch.Tensor:
    return sum(p.abs().sum() for p in params)


def _sq_l2(params: list[torch.Tensor]) -> torch.Tensor:
    return sum(p.pow(2).sum() for p in params)


def _lr_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    # Parameter id -> the learning rate of its group (so LR schedules reach the decoupled/proximal steps too).
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


class L1(Regularizer):
    """lambda * ||theta||_1 added to the loss; gradient g + lambda * sgn(w) (lecture eqs. 5-6; Tibshirani 1996,
    "Regression Shrinkage and Selection via the Lasso"). A subgradient step rarely lands on exactly 0: weights
    oscillate around it with amplitude ~ lr*lambda. For exact zeros use `l1_proximal`."""

    def __init__(self, strength: float = 1e-5, include_bias: bool = False):
        self.strength = _check_strength("strength", strength)
        self.include_bias = include_bias

    def penalty(self, net: nn.Module) -> torch.Tensor:
        return self.strength * _l1(penalized_parameters(net, self.include_bias))


class L1Proximal(Regularizer):
    """Proximal gradient for lambda * ||theta||_1 (ISTA; Parikh & Boyd 2014, "Proximal Algorithms", sec. 6.5.2):
    after each optimizer step, w <- soft_threshold(w, eta * lambda) with eta the group's learning rate. Weights
    with |w| <= eta*lambda become exactly 0 (the lecture's soft-thresholding slide). Exact proximal gradient for
    SGD without momentum; with momentum or Adam it is the usual heuristic (the sparsity pattern is still exact).
    Nothing is added to the loss, so there is no train/penalty metric; params/l1 and params/zero_frac show it."""

    def __init__(self, strength: float = 1e-4, include_bias: bool = False):
        self.strength = _check_strength("strength", strength)
        self.include_bias = include_bias

    @torch.no_grad()
    def after_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        lr = _lr_of(optimizer)
        for p in penalized_parameters(net, self.include_bias):
            p.copy_(soft_threshold(p, lr[id(p)] * self.strength))


class L2(Regularizer):
    """lambda * ||theta||_2^2 added to the loss; gradient g + 2*lambda*w (lecture eqs. 7-10; ridge regression,
    Hoerl & Kennard 1970; Krogh & Hertz 1992 for neural nets). With SGD this is weight decay with rate 2*lambda;
    with Adam the 2*lambda*w term is divided by Adam's per-weight scale, so it is *not* weight decay (see
    `weight_decay`)."""

    def __init__(self, strength: float = 5e-4, include_bias: bool = False):
        self.strength = _check_strength("strength", strength)
        self.include_bias = include_bias

    def penalty(self, net: nn.Module) -> torch.Tensor:
        return self.strength * _sq_l2(penalized_parameters(net, self.include_bias))


class WeightDecay(Regularizer):
    """Decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", AdamW):
    before each optimizer step w <- w - eta * lambda * w, outside the gradient, so adaptive optimizers do not rescale
    it. With plain SGD it equals `l2` with strength lambda/2; with Adam/RMSprop the two differ (docs/regularization.md).
    Same as torch.optim.AdamW(weight_decay=lambda) applied to the penalized tensors, for any optimizer."""

    def __init__(self, strength: float = 1e-2, include_bias: bool = False):
        self.strength = _check_strength("strength", strength)
        self.include_bias = include_bias

    @torch.no_grad()
    def before_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        lr = _lr_of(optimizer)
        for p in penalized_parameters(net, self.include_bias):
            p.mul_(1.0 - lr[id(p)] * self.strength)


class ElasticNet(Regularizer):
    """lambda1 * ||theta||_1 + lambda2 * ||theta||_2^2 added to the loss (Zou & Hastie 2005, "Regularization and
    Variable Selection via the Elastic Net"): L1's sparsity with L2's stability under correlated features."""

    def __init__(self, l1_strength: float = 1e-5, l2_strength: float = 5e-4, include_bias: bool = False):
        self.l1_strength = _check_strength("l1_strength", l1_strength)
        self.l2_strength = _check_strength("l2_strength", l2_strength)
        self.include_bias = include_bias

    def penalty(self, net: nn.Module) -> torch.Tensor:
        params = penalized_parameters(net, self.include_bias)
        return self.l1_strength * _l1(params) + self.l2_strength * _sq_l2(params)


def output_layer(net: nn.Module) -> nn.Module | None:
    """The layer that computes the outputs: `net.head` in reglab's models, else the last module that holds a weight
    matrix or kernel of its own."""
    head = getattr(net, "head", None)
    if isinstance(head, nn.Module):
        return head
    last = None
    for module in net.modules():
        if any(is_matrix(p, net) for p in module.parameters(recurse=False)):
            last = module
    return last


def hidden_unit_weights(net: nn.Module) -> list[nn.Parameter]:
    """Each hidden unit's incoming weights: the penalized tensors (rows of a Linear weight (out, in), output
    channels of a kernel (out, in, kh, kw)) except the output layer's."""
    out = output_layer(net)
    skip = {id(p) for p in out.parameters()} if out is not None else set()
    return [p for p in penalized_parameters(net) if id(p) not in skip]


class MaxNorm(Regularizer):
    """Max-norm constraint (Srivastava et al. 2014, "Dropout", sec. 5.1: "constrain the norm of the incoming weight
    vector at each hidden unit"): after each optimizer step, each hidden unit's incoming weight vector is projected
    onto the ball ||w||_2 <= c. A unit is a row of a hidden Linear weight (out, in) or an output channel of a conv
    kernel (out, in, kh, kw); the output layer (the head) is not constrained, nor are biases. `epoch_metrics`:
    `clipped_frac`, the fraction of hidden rows that were outside the ball and projected, averaged over the epoch's
    steps (logged as train/<name>/clipped_frac): 0 means the constraint never bound."""

    def __init__(self, max_norm: float = 0.6):  # the catalogue's c: conf/regularization/max_norm.yaml says why
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
            raise ConfigError(f"max_norm={max_norm!r} must be a number > 0")
        self.max_norm = float(max_norm)
        self._clipped: torch.Tensor | None = None  # rows projected, summed over the steps since epoch_metrics
        self._rows = 0  # rows seen in those steps

    @torch.no_grad()
    def after_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p in hidden_unit_weights(net):
            norms = p.flatten(1).norm(dim=1)  # (out,)
            over = norms > self.max_norm
            scale = torch.where(over, self.max_norm / norms, torch.ones_like(norms))
            p.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
            clipped = over.sum()
            self._clipped = clipped if self._clipped is None else self._clipped + clipped
            self._rows += len(norms)

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        if not self._rows:
            return {}
        frac = self._clipped.float() / self._rows
        self._clipped, self._rows = None, 0
        return {"clipped_frac": frac}
