"""Width-parameterized pre-activation ResNet18 of Nakkiran et al. 2019, "Deep Double Descent" (arXiv 1912.02292).

Stage widths [k, 2k, 4k, 8k], two pre-activation basic blocks per stage (He et al. 2016, "Identity Mappings"),
a 3x3 stride-1 stem and no max-pool (the CIFAR variant), global average pooling and a linear head. k = 64 is the
standard ResNet18. Shapes for a 32x32 input: stem (N, k, 32, 32) -> stages (N, k, 32, 32), (N, 2k, 16, 16),
(N, 4k, 8, 8), (N, 8k, 4, 4) -> pool (N, 8k) -> head (N, classes). Adaptive pooling lets 8x8 or 1-channel
inputs through unchanged code.

Dropout slots: `stage_dropout[i]` after stage i (spatial dropout goes here) and `head_dropout` before the head.
"""

from __future__ import annotations

import torch
from torch import nn

from reglab.regularization.normalization import GROUPS, check_groups, check_position, make_norm, warn_degenerate_groups


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, norm_position: str,
                 norm_groups: int = GROUPS):
        super().__init__()
        self.norm1 = make_norm(norm, in_ch, spatial=True, groups=norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm2 = make_norm(norm, out_ch, spatial=True, groups=norm_groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.act = nn.ReLU()
        self.norm_first = norm_position == "pre"
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth's slot (regularization/stochastic_depth.py)

    def _pre(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.act(norm(x)) if self.norm_first else norm(self.act(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._pre(self.norm1, x)
        # The projection shortcut takes the pre-activated input, as in He et al.'s pre-act design.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self._pre(self.norm2, out))
        return self.drop_path(out) + skip


class ResNet18(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 64,
        norm: str = "batch",
        norm_position: str = "pre",
        norm_groups: int = GROUPS,
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"model.width must be >= 1, got {width}")
        if len(input_shape) != 3:
            raise ValueError(f"ResNet18 needs image inputs (C, H, W), got shape {tuple(input_shape)}")
        check_position(norm_position)
        self.width, self.norm_groups = width, check_groups(norm_groups)
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        stages, in_ch = [], width
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    PreActBlock(in_ch, out_ch, stride, norm, norm_position, norm_groups),
                    PreActBlock(out_ch, out_ch, 1, norm, norm_position, norm_groups),
                )
            )
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.stage_dropout = nn.ModuleList(nn.Identity() for _ in stages)
        # Pre-activation nets end with norm + ReLU before pooling: the last block's output is not activated.
        self.final_norm = make_norm(norm, in_ch, spatial=True, groups=norm_groups)
        if norm == "group":
            warn_degenerate_groups(f"ResNet18(width={width})", widths, norm_groups, spatial=True)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_dropout: nn.Module = nn.Identity()
        self.head = nn.Linear(in_ch, num_classes)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage, drop in zip(self.stages, self.stage_dropout):
            x = drop(stage(x))
        x = self.pool(self.act(self.final_norm(x))).flatten(1)
        return self.head(self.head_dropout(x))
