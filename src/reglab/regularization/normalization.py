"""Normalization layers, chosen by name, and where they sit relative to the activation.

The lecture (Batch Normalization section) and Ioffe & Szegedy 2015: for a mini-batch B = {x_1..x_m},
    mu_B = 1/m sum x_k,  sigma_B^2 = 1/m sum (x_k - mu_B)^2,  x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps),
    y = gamma * x_hat + beta,  gamma initialised to 1 and beta to 0.
Alternatives the lecture lists: Layer Norm (Ba et al. 2016, over the features of one sample), Group Norm
(Wu & He 2018, over groups of channels) and Instance Norm (Ulyanov et al. 2016, per sample and channel).

`norm_position`: "pre" puts the norm before the activation, y = f(BN(Wx + b)) (Ioffe & Szegedy's placement);
"post" after it, y = BN(f(Wx + b)).
"""

from __future__ import annotations

import math

from torch import nn

NORMS = ("batch", "layer", "group", "instance", "none")
POSITIONS = ("pre", "post")


def group_count(channels: int, target: int = 32) -> int:
    # GroupNorm needs groups | channels; width-k ResNets have channels k, 2k, ... with k as small as 1.
    return math.gcd(channels, target)


def make_norm(kind: str, channels: int, spatial: bool) -> nn.Module:
    """A norm layer over `channels` features; `spatial` = inputs are (N, C, H, W), else (N, C)."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if kind == "layer":
        # On feature maps, LayerNorm over (C, H, W) is GroupNorm with one group; it needs no fixed H, W.
        return nn.GroupNorm(1, channels) if spatial else nn.LayerNorm(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "instance":
        if not spatial:
            raise ValueError(
                "model.norm=instance normalizes each channel of one sample over its spatial positions; "
                "an MLP has none (use batch, layer or group)"
            )
        return nn.GroupNorm(channels, channels)  # one group per channel == affine InstanceNorm2d
    raise ValueError(f"model.norm={kind!r} is not one of {', '.join(NORMS)}")


def check_position(position: str) -> None:
    if position not in POSITIONS:
        raise ValueError(f"model.norm_position={position!r} is not one of {', '.join(POSITIONS)}")
