"""Normalization layers, chosen by name, and where they sit relative to the activation.

The lecture (Batch Normalization section) and Ioffe & Szegedy 2015: for a mini-batch B = {x_1..x_m},
    mu_B = 1/m sum x_k,  sigma_B^2 = 1/m sum (x_k - mu_B)^2,  x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps),
    y = gamma * x_hat + beta,  gamma initialised to 1 and beta to 0.
Alternatives the lecture lists: Layer Norm (Ba et al. 2016, over the features of one sample), Group Norm
(Wu & He 2018, over groups of channels) and Instance Norm (Ulyanov et al. 2016, per sample and channel).

`norm_position`: "pre" puts the norm before the activation, y = f(BN(Wx + b)) (Ioffe & Szegedy's placement);
"post" after it, y = BN(f(Wx + b)).

Group norm's group count is `model.norm_groups` (default 32, Wu & He 2018's choice). GroupNorm needs the count to
divide the channels, so a layer of C channels gets gcd(C, norm_groups) groups: norm_groups itself whenever it
divides C. At small widths that silently becomes another norm: 1 group is layer norm (MLP width 47: gcd(47, 32) = 1),
C groups instance norm (ResNet18 k = 4: channels 4, 8, 16, 32, each its own group; in an MLP a one-unit group has
variance 0 and outputs its shift beta whatever the input). The models log one warning naming those widths.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

from torch import nn

log = logging.getLogger(__name__)

NORMS = ("batch", "layer", "group", "instance", "none")
POSITIONS = ("pre", "post")
GROUPS = 32  # Wu & He 2018, "Group Normalization": G = 32 groups (their default, sec. 4)


def check_groups(groups: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"model.norm_groups={groups!r} must be an integer >= 1 (Wu & He 2018 use 32)")
    return groups


def group_count(channels: int, groups: int = GROUPS) -> int:
    """The groups a GroupNorm over `channels` gets: `groups` when it divides channels, else the largest count that
    does and divides `groups` too, gcd(channels, groups) (width-k ResNets have channels k, 2k, ... with k >= 1)."""
    return math.gcd(channels, groups)


def degenerate_groups(channels: Iterable[int], groups: int, spatial: bool) -> str | None:
    """Which of these layer widths' group norm is really layer norm (1 group) or instance norm (1 channel per
    group), as one line, or None if none is."""
    widths = sorted(set(channels))
    layer = [c for c in widths if group_count(c, groups) == 1]
    instance = [c for c in widths if c > 1 and group_count(c, groups) == c]
    unit = "channels" if spatial else "units"
    became = []
    if layer:
        became.append(f"at C = {', '.join(map(str, layer))} it is 1 group = layer norm")
    if instance:
        became.append(f"at C = {', '.join(map(str, instance))} it is 1 channel per group = instance norm" if spatial
                      else f"at C = {', '.join(map(str, instance))} it is 1 unit per group: each unit is normalized "
                      "alone and outputs its shift beta whatever the input")
    if not became:
        return None
    return (f"model.norm=group with model.norm_groups={groups} gives gcd(C, {groups}) groups to a layer of C {unit}; "
            f"{'; '.join(became)}")


def warn_degenerate_groups(model: str, channels: Iterable[int], groups: int, spatial: bool) -> None:
    """One warning per model (its constructor calls this once) when group norm degenerated at some widths."""
    what = degenerate_groups(channels, groups, spatial)
    if what:
        log.warning("%s: %s", model, what)


def make_norm(kind: str, channels: int, spatial: bool, groups: int = GROUPS) -> nn.Module:
    """A norm layer over `channels` features; `spatial` = inputs are (N, C, H, W), else (N, C). `groups`: group
    norm's target group count (model.norm_groups), reduced to gcd(channels, groups)."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if kind == "layer":
        # On feature maps, LayerNorm over (C, H, W) is GroupNorm with one group; it needs no fixed H, W.
        return nn.GroupNorm(1, channels) if spatial else nn.LayerNorm(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
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
