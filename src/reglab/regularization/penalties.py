"""Parameter-norm penalties and constraints (the lecture's "Penalização da Norma dos Parâmetros", eqs. 1-13).

Which parameters are penalized, one rule for every class here (as nanoGPT's weight-decay groups): weight matrices
and conv kernels, i.e. tensors with >= 2 dims. Biases and normalization gains/shifts (1-dim tensors) are left
alone unless `include_bias=true`: shrinking a bias or a BatchNorm gamma toward 0 does not make the function
smoother, it only limits what the layer can represent.

Strengths are per-sample-loss units: the Classifier's loss is the *mean* cross-entropy over the batch, so
L(theta) = 1/N sum_i loss_i + lambda * ||theta||, exactly the lecture's form.

On a population (reglab/population/: every tensor (G, *solo_shape), row i member `net.member_index(p)[i]`) the same
classes act per member: a penalty is (M,), member m's own value, whose sum the Classifier adds to the loss (so member m
gets exactly its own gradient); the step hooks are elementwise, or per row where they reduce (max-norm); and a strength
may be one value per member (a sequence in the config, a float64 (M,) tensor here), reaching each row in the tensor's
dtype as the solo run's float does.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    penalized tensors (dims >= 2), on the parameters' device (no sync here): 0-dim for a solo net; (M,) for a
    population, member m's over its own rows of the fused tensors (what its solo run logs), in one pass per tensor
    (bit-identical to copying each member's weights out first, and half its time: 7 ms vs 14 ms per epoch at 35
    members on a 2-core AMD EPYC VM)."""
    params = penalized_parameters(net)
    if not params:
        return {}
    with torch.no_grad():
        zeros = sum(per_member(net, p, (p == 0).float()) for p in params)
        count = sum(per_member(net, p, p.new_full((len(p),), p[0].numel())) for p in params)  # row sizes
        l1 = sum(per_member(net, p, p.abs()) for p in params)
        l2 = torch.sqrt(sum(per_member(net, p, p.float().pow(2)) for p in params))
    return {"params/zero_frac": zeros / count, "params/l1": l1, "params/l2": l2}


def _check_strength(key: str, value, minimum: float = 0.0, strict: bool = False) -> float | torch.Tensor:
    """A number >= minimum (> with strict), or one per population member: a float64 (M,) tensor."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return torch.tensor([_check_strength(key, v, minimum, strict) for v in value], dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or \
            (strict and value == minimum):
        raise ConfigError(f"{key}={value!r} must be a number {'>' if strict else '>='} {minimum:g}")
    return float(value)


def _members(net: nn.Module) -> int | None:
    return getattr(net, "members", None)


def per_member(net: nn.Module, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Values over p's elements or rows, summed: () for a solo net; (M,), member m's sum, for a population."""
    members = _members(net)
    if members is None:
        return values.sum()
    rows = values.flatten(1).sum(1) if values.dim() > 1 else values  # (G,)
    return rows.new_zeros(members).index_add(0, net.member_index(p), rows)


def per_row(value: float | torch.Tensor, net: nn.Module, p: torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float as it is; a per-member (M,) tensor as each row of p takes it: (G, 1, ...) broadcasting against `like`
    (p, or a per-unit (G, out)), in p's dtype (the float32 a solo run's Python float becomes in the op)."""
    if not torch.is_tensor(value):
        return value
    members = _members(net)
    if members != len(value):
        raise ValueError(f"{len(value)} values, one per member, need a population of as many; this net has "
                         f"{'no members' if members is None else f'{members} members'}")
    # non_blocking: from pageable memory the copy is staged at once, with no wait for the device's queued work
    rows = value.to(p.device, non_blocking=True)[net.member_index(p)].to(p.dtype)
    return rows.view(-1, *[1] * (like.dim() - 1))


def _scaled(strength: float | torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """strength * a penalty: () solo, (M,) population; a per-member strength in the penalty's dtype."""
    if torch.is_tensor(strength):
        if value.dim() != 1 or len(value) != len(strength):
            raise ValueError(f"{len(strength)} strengths, one per member, need a population of as many")
        strength = strength.to(value.device, value.dtype, non_blocking=True)
    return strength * value


def _l1(net: nn.Module, params: list[torch.Tensor]) -> torch.Tensor:
    return sum(per_member(net, p, p.abs()) for p in params)


def _sq_l2(net: nn.Module, params: list[torch.Tensor]) -> torch.Tensor:
    return sum(per_member(net, p, p.pow(2)) for p in params)


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
        return _scaled(self.strength, _l1(net, penalized_parameters(net, self.include_bias)))


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
            p.copy_(soft_threshold(p, per_row(lr[id(p)] * self.strength, net, p, p)))


class L2(Regularizer):
    """lambda * ||theta||_2^2 added to the loss; gradient g + 2*lambda*w (lecture eqs. 7-10; ridge regression,
    Hoerl & Kennard 1970; Krogh & Hertz 1992 for neural nets). With SGD this is weight decay with rate 2*lambda;
    with Adam the 2*lambda*w term is divided by Adam's per-weight scale, so it is *not* weight decay (see
    `weight_decay`)."""

    def __init__(self, strength: float = 5e-4, include_bias: bool = False):
        self.strength = _check_strength("strength", strength)
        self.include_bias = include_bias

    def penalty(self, net: nn.Module) -> torch.Tensor:
        return _scaled(self.strength, _sq_l2(net, penalized_parameters(net, self.include_bias)))


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
            p.mul_(per_row(1.0 - lr[id(p)] * self.strength, net, p, p))


class CoupledWeightDecay(Regularizer):
    """The weight decay of torch.optim.SGD and Adam (`optim.weight_decay`) as a hook: before the step
    g <- g + lambda * w on the matrices (the Classifier's decay rule), the gradient of the L2 penalty
    lambda/2 ||W||^2. A population whose members differ in optim.weight_decay builds its optimizer without decay and
    gives each member its own through this (and AdamW's, decoupled, through `WeightDecay`); applied after the other
    regularizers' before_step, where the optimizer's own would come."""

    def __init__(self, strength: float = 0.0):
        self.strength = _check_strength("optim.weight_decay", strength)

    @torch.no_grad()
    def before_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p in penalized_parameters(net):
            if p.grad is None:
                continue
            decay = per_row(self.strength, net, p, p)
            if torch.is_tensor(decay):
                p.grad.addcmul_(p, decay)  # on a CPU bit for bit what the optimizers' add_(p, alpha=wd) gives
            else:
                p.grad.add_(p, alpha=decay)


class ElasticNet(Regularizer):
    """lambda1 * ||theta||_1 + lambda2 * ||theta||_2^2 added to the loss (Zou & Hastie 2005, "Regularization and
    Variable Selection via the Elastic Net"): L1's sparsity with L2's stability under correlated features."""

    def __init__(self, l1_strength: float = 1e-5, l2_strength: float = 5e-4, include_bias: bool = False):
        self.l1_strength = _check_strength("l1_strength", l1_strength)
        self.l2_strength = _check_strength("l2_strength", l2_strength)
        self.include_bias = include_bias

    def penalty(self, net: nn.Module) -> torch.Tensor:
        params = penalized_parameters(net, self.include_bias)
        return _scaled(self.l1_strength, _l1(net, params)) + _scaled(self.l2_strength, _sq_l2(net, params))


def output_layers(net: nn.Module) -> list[nn.Module]:
    """The layers that compute the outputs: the modules named `head` in reglab's models (one per width group in a
    PopulationMLP, whose groups keep the solo net's names), else the last module that holds a weight matrix or
    kernel of its own."""
    heads = [module for name, module in net.named_modules() if name.rpartition(".")[2] == "head"]
    if heads:
        return heads
    last = [module for module in net.modules() if any(is_matrix(p, net) for p in module.parameters(recurse=False))]
    return last[-1:]


def hidden_unit_weights(net: nn.Module) -> list[nn.Parameter]:
    """Each hidden unit's incoming weights: the penalized tensors (rows of a Linear weight (out, in), output
    channels of a kernel (out, in, kh, kw); in a population (G, out, ...)) except the output layers'."""
    skip = {id(p) for out in output_layers(net) for p in out.parameters()}
    return [p for p in penalized_parameters(net) if id(p) not in skip]


class MaxNorm(Regularizer):
    """Max-norm constraint (Srivastava et al. 2014, "Dropout", sec. 5.1: "constrain the norm of the incoming weight
    vector at each hidden unit"): after each optimizer step, each hidden unit's incoming weight vector is projected
    onto the ball ||w||_2 <= c. A unit is a row of a hidden Linear weight (out, in) or an output channel of a conv
    kernel (out, in, kh, kw); the output layer (the head) is not constrained, nor are biases. `epoch_metrics`:
    `clipped_frac`, the fraction of hidden rows that were outside the ball and projected, averaged over the epoch's
    steps (logged as train/<name>/clipped_frac): 0 means the constraint never bound. On a population each member's
    units are its own rows (the norm over the solo dims only) and clipped_frac is (M,), each member's own."""

    def __init__(self, max_norm: float = 0.6):  # the catalogue's c: conf/regularization/max_norm.yaml says why
        self.max_norm = _check_strength("max_norm", max_norm, strict=True)
        self._clipped: torch.Tensor | None = None  # rows projected, summed over the steps since epoch_metrics
        self._rows: torch.Tensor | None = None  # rows seen in those steps

    @torch.no_grad()
    def after_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p in hidden_unit_weights(net):
            norms = p.flatten(getattr(net, "member_dims", 0) + 1).norm(dim=-1)  # (out,), or (G, out) stacked
            c = per_row(self.max_norm, net, p, norms)
            over = norms > c
            scale = torch.where(over, c / norms, torch.ones_like(norms))
            p.mul_(scale.view(*norms.shape, *[1] * (p.dim() - norms.dim())))
            clipped = per_member(net, p, over.long())
            rows = per_member(net, p, torch.ones_like(over, dtype=torch.long))
            self._clipped = clipped if self._clipped is None else self._clipped + clipped
            self._rows = rows if self._rows is None else self._rows + rows

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        if self._rows is None:
            return {}
        frac = self._clipped.float() / self._rows
        self._clipped, self._rows = None, None
        return {"clipped_frac": frac}
