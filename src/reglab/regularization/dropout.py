"""The dropout family, parameterized as in the lecture by keep_prob = p, the probability of KEEPING a unit.

torch.nn.Dropout(p=drop) takes the probability of DROPPING: InvertedDropout(keep_prob=0.8) == nn.Dropout(p=0.2).

Modules (print(model) shows each rate):
- ClassicDropout: train h = m * a, m ~ Bernoulli(p); eval h = p * a (Srivastava et al. 2014, the lecture's version).
- InvertedDropout: train h = m * a / p; eval h = a (the lecture's "Inverted Dropout"; what nn.Dropout computes).
- GaussianDropout: h = a * e, e ~ N(1, (1 - p) / p) in training; eval h = a (Srivastava et al. 2014, sec. 10).
- SpatialDropout: one Bernoulli(p) per (sample, channel) of an (N, C, H, W) map, h = m * a / p; eval h = a
  (Tompson et al. 2015, "Efficient Object Localization Using Convolutional Networks").
- DropConnectLinear: a Linear whose weights are masked, W~ = R * W, r_ij ~ Bernoulli(p) (Wan et al. 2013,
  "Regularization of Neural Networks using DropConnect"); the bias is not masked. `mask`: `per_batch` draws one
  (out, in) mask per training step, shared by the batch's samples (AWD-LSTM's WeightDrop); `per_example` one per
  sample, as Wan et al., which materializes a (B, out, in) masked weight: B times the layer's weight memory, twice
  (mask and product). `inference`: `mean` evaluates the mean network y = (p W) x + b; `gaussian` is Wan et al.'s
  moment matching (their sec. 3, Algorithm 2): given input v, each unit's pre-activation u = (R * W) v + b has mean
  p W v + b and variance p (1 - p) (W * W)(v * v) (units independent: their masks are), so u ~ N(mean, variance) is
  sampled `samples` times, the layer's activation applied to each sample, and the results averaged. The activation
  belongs to the layer around the Linear (reglab.models.mlp.HiddenLayer calls `gaussian_average`); on the head, whose
  output is the logits (no activation), the average of u is its mean exactly, so the head evaluates the mean network.

Regularizers (the `conf/regularization/*.yaml` entries) put these modules into the slots the models declare:
MLP: `input_dropout`, `hidden[i].dropout`, `hidden[i].linear`, `head`; ResNet18: `stage_dropout[i]`,
`head_dropout`, `head`. A technique that cannot apply to the model raises ConfigError at start.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from reglab.errors import ConfigError
from reglab.regularization.base import Regularizer


def _check_keep(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{key}={value!r} must be a probability of keeping a unit, in (0, 1]")
    return float(value)


# --- modules -------------------------------------------------------------------------------------------------
class _KeepProb(nn.Module):
    def __init__(self, keep_prob: float):
        super().__init__()
        self.keep_prob = _check_keep("keep_prob", keep_prob)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:g}"


class ClassicDropout(_KeepProb):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * self.keep_prob
        if self.keep_prob == 1.0:
            return x
        return x * torch.bernoulli(torch.full_like(x, self.keep_prob))


class InvertedDropout(_KeepProb):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.dropout computes m * x / keep with m ~ Bernoulli(keep), in one fused kernel.
        return F.dropout(x, 1.0 - self.keep_prob, self.training)


class GaussianDropout(_KeepProb):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep_prob == 1.0:
            return x
        # Same mean (1) and variance ((1 - p) / p) as the inverted Bernoulli mask m / p.
        sigma = ((1.0 - self.keep_prob) / self.keep_prob) ** 0.5
        return x * (1.0 + sigma * torch.randn_like(x))


class SpatialDropout(_KeepProb):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"SpatialDropout needs (N, C, ...) feature maps, got shape {tuple(x.shape)}")
        if not self.training or self.keep_prob == 1.0:
            return x
        mask = torch.bernoulli(torch.full((x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2), self.keep_prob,
                                          device=x.device, dtype=x.dtype))
        return x * mask / self.keep_prob


MASKS = ("per_batch", "per_example")
INFERENCES = ("mean", "gaussian")
SAMPLE_CHUNK = 1 << 22  # elements of u drawn at once by gaussian inference (16 MiB of float32)


def _check_choice(key: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    return value


def _check_samples(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be an integer >= 1")
    return value


class DropConnectLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, keep_prob: float = 0.5, bias: bool = True,
                 device=None, dtype=None, *, mask: str = "per_batch", inference: str = "mean", samples: int = 100):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.keep_prob = _check_keep("keep_prob", keep_prob)
        self.mask = _check_choice("regularization.dropconnect.mask", mask, MASKS)
        self.inference = _check_choice("regularization.dropconnect.inference", inference, INFERENCES)
        self.samples = _check_samples("regularization.dropconnect.samples", samples)

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_prob: float, **options) -> "DropConnectLinear":
        """Same Parameter objects as `linear` (its initialization and any optimizer reference are kept)."""
        new = cls(linear.in_features, linear.out_features, keep_prob, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype, **options)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight * self.keep_prob, self.bias)  # also gaussian's exact mean of u
        if self.keep_prob == 1.0:
            return F.linear(x, self.weight, self.bias)
        if self.mask == "per_batch":
            mask = torch.bernoulli(torch.full_like(self.weight, self.keep_prob))  # r_ij, (out, in)
            return F.linear(x, self.weight * mask, self.bias)
        # per_example: R_n for each of the N = B (or prod of leading dims) samples, (N, out, in).
        flat = x.reshape(-1, self.in_features)
        masks = torch.bernoulli(torch.full((len(flat), *self.weight.shape), self.keep_prob, device=x.device,
                                           dtype=self.weight.dtype))
        y = torch.bmm(masks * self.weight, flat.unsqueeze(2)).squeeze(2)  # y_n = (R_n * W) x_n
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of u = (R * W) x + b over masks R (Wan et al. 2013, sec. 3):
        E[u] = p W x + b, Var[u] = p (1 - p) (W * W)(x * x)."""
        p = self.keep_prob
        mean = F.linear(x, self.weight * p, self.bias)
        var = F.linear(x * x, self.weight * self.weight) * (p * (1.0 - p))
        return mean, var

    def gaussian_average(self, x: torch.Tensor, activation) -> torch.Tensor:
        """Wan et al.'s inference: (1/Z) sum_z activation(u_z), u_z ~ N(E[u], Var[u]) per unit, Z = samples.
        `activation` maps (K, out) to (K, out) (what follows the Linear in its layer); the samples are drawn in
        chunks of at most SAMPLE_CHUNK elements."""
        mean, var = self.moments(x)
        std = var.sqrt()
        per_sample = mean.numel()
        chunk = max(1, SAMPLE_CHUNK // max(per_sample, 1))
        total = torch.zeros_like(mean)
        for start in range(0, self.samples, chunk):
            z = min(chunk, self.samples - start)
            u = torch.addcmul(mean, std, torch.randn((z, *mean.shape), device=mean.device, dtype=mean.dtype))
            total += activation(u.reshape(-1, self.out_features)).view(z, *mean.shape).sum(0)
        return total / self.samples

    def extra_repr(self) -> str:
        options = "".join(f", {k}={getattr(self, k)}" for k, default in
                          (("mask", "per_batch"), ("inference", "mean")) if getattr(self, k) != default)
        if self.inference == "gaussian":
            options += f", samples={self.samples}"
        return f"{super().extra_repr()}, keep_prob={self.keep_prob:g}{options}"


# --- regularizers: where the modules go ---------------------------------------------------------------------
def _is_mlp(net: nn.Module) -> bool:
    return hasattr(net, "hidden") and hasattr(net, "input_dropout")


def _is_resnet(net: nn.Module) -> bool:
    return hasattr(net, "stage_dropout") and hasattr(net, "head_dropout")


def _plain(value):
    # Hydra passes lists as ListConfig; keep plain values so repr() and comparisons stay simple.
    return value if value is None or isinstance(value, (str, int)) else list(value)


def _indices(key: str, value, count: int, what: str) -> list[int]:
    """`all` or a list of indices in [0, count)."""
    if value == "all":
        return list(range(count))
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        chosen = [int(i) for i in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be `all` or a list of {what} indices") from None
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise ConfigError(f"{key}={value!r}: {what} {bad} do not exist; this model has {count} (0..{count - 1})")
    return chosen


class _SlotDropout(Regularizer):
    """Fills dropout slots with `module(keep_prob)`. MLP: input (input_keep_prob) and hidden layers (layers);
    ResNet18: pooled features before the head (head) and stage outputs (stages)."""

    module: type[nn.Module] = InvertedDropout

    def __init__(self, keep_prob: float = 0.5, input_keep_prob: float = 1.0, layers="all", head: bool = True,
                 stages: Iterable[int] | str | None = ()):
        self.keep_prob = _check_keep("keep_prob", keep_prob)
        self.input_keep_prob = _check_keep("input_keep_prob", input_keep_prob)
        self.head = bool(head)
        self.stages, self.layers = _plain(stages), _plain(layers)

    def _key(self, field: str) -> str:
        return f"regularization.{self.name}.{field}"

    def _fill(self, parent: nn.Module, attr: str, slot: str, keep_prob: float, index: int | None = None) -> None:
        holder = getattr(parent, attr)
        current = holder[index] if index is not None else holder
        if not isinstance(current, nn.Identity):
            raise ConfigError(f"regularization.{self.name}: {slot} already holds {current}; two dropout "
                              "regularizers cannot fill the same slot")
        new = self.module(keep_prob)
        if index is not None:
            holder[index] = new
        else:
            setattr(parent, attr, new)

    def attach(self, net: nn.Module) -> None:
        if _is_mlp(net):
            if self.stages:
                raise ConfigError(f"{self._key('stages')}={self.stages!r}: the MLP has no stages "
                                  "(use layers and input_keep_prob)")
            if self.input_keep_prob < 1.0:
                self._fill(net, "input_dropout", "input_dropout", self.input_keep_prob)
            for i in _indices(self._key("layers"), self.layers, len(net.hidden), "hidden layer"):
                self._fill(net.hidden[i], "dropout", f"hidden[{i}].dropout", self.keep_prob)
        elif _is_resnet(net):
            if self.input_keep_prob < 1.0:
                raise ConfigError(f"{self._key('input_keep_prob')}={self.input_keep_prob}: ResNet18 has no input "
                                  "dropout slot (use head or stages)")
            for i in _indices(self._key("stages"), self.stages, len(net.stage_dropout), "stage"):
                self._fill(net, "stage_dropout", f"stage_dropout[{i}]", self.keep_prob, index=i)
            if self.head:
                self._fill(net, "head_dropout", "head_dropout", self.keep_prob)
        else:
            raise ConfigError(f"regularization.{self.name}: {type(net).__name__} declares no dropout slots")


class DropoutRegularizer(_SlotDropout):
    """`dropout`: InvertedDropout(keep_prob) in the model's dropout slots."""

    module = InvertedDropout


class ClassicDropoutRegularizer(_SlotDropout):
    """`dropout_classic`: ClassicDropout(keep_prob), eval output scaled by p."""

    module = ClassicDropout


class GaussianDropoutRegularizer(_SlotDropout):
    """`gaussian_dropout`: GaussianDropout(keep_prob), multiplicative N(1, (1 - p) / p) noise."""

    module = GaussianDropout


class SpatialDropoutRegularizer(_SlotDropout):
    """`spatial_dropout`: SpatialDropout(keep_prob) after the chosen ResNet stages (whole channels dropped)."""

    module = SpatialDropout

    def __init__(self, keep_prob: float = 0.9, stages: Iterable[int] | str = "all"):
        super().__init__(keep_prob=keep_prob, head=False, stages=stages)

    def attach(self, net: nn.Module) -> None:
        if not _is_resnet(net):
            raise ConfigError(f"regularization.{self.name}: spatial dropout drops whole channels of (N, C, H, W) "
                              f"feature maps; {type(net).__name__} has none (use dropout, or model=resnet18)")
        super().attach(net)


class DropConnectRegularizer(Regularizer):
    """`dropconnect`: swaps Linear layers for DropConnectLinear(keep_prob, mask, inference, samples), same weights.
    MLP: the hidden layers in `layers` and the head if `head`; ResNet18: the head only (its convolutions are not
    Linear layers)."""

    def __init__(self, keep_prob: float = 0.5, layers="all", head: bool = True, mask: str = "per_batch",
                 inference: str = "mean", samples: int = 100):
        self.keep_prob = _check_keep("keep_prob", keep_prob)
        self.layers, self.head = _plain(layers), bool(head)
        self.mask = _check_choice("regularization.dropconnect.mask", mask, MASKS)
        self.inference = _check_choice("regularization.dropconnect.inference", inference, INFERENCES)
        self.samples = _check_samples("regularization.dropconnect.samples", samples)

    def _swap(self, parent: nn.Module, attr: str, slot: str) -> None:
        layer = getattr(parent, attr)
        if isinstance(layer, DropConnectLinear):
            raise ConfigError(f"regularization.{self.name}: {slot} is already a DropConnectLinear")
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"regularization.{self.name}: {slot} is {type(layer).__name__}, not Linear")
        setattr(parent, attr, DropConnectLinear.from_linear(layer, self.keep_prob, mask=self.mask,
                                                            inference=self.inference, samples=self.samples))

    def attach(self, net: nn.Module) -> None:
        if _is_mlp(net):
            for i in _indices(f"regularization.{self.name}.layers", self.layers, len(net.hidden), "hidden layer"):
                self._swap(net.hidden[i], "linear", f"hidden[{i}].linear")
        elif not _is_resnet(net):
            raise ConfigError(f"regularization.{self.name}: {type(net).__name__} declares no Linear slots")
        if self.head:
            self._swap(net, "head", "head")
        elif _is_resnet(net):
            raise ConfigError(f"regularization.{self.name}.head=false leaves nothing to DropConnect: ResNet18's only "
                              "Linear layer is its head")
