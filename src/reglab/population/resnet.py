"""PopulationResNet18: M equal-width pre-activation ResNet18s (each built and seeded alone) in one network.

Member batches (M, B, C, H, W) become one (B, M*C, H, W) batch whose channel block m is member m's, and every
convolution is grouped, groups = M: block m of the output reads only block m of the input, through member m's
kernel. The (G, out, in, k, k) weights are used as their (G*out, in, k, k) view. BatchNorm2d normalizes each
channel alone, hence each member alone, in training and evaluation. SpatialDropout drops whole (sample, channel)
maps: per member already. Pooling gives (B, M*8k) -> (M, B, 8k) -> each member's head by one baddbmm.
Fusable norms: batch, none.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from reglab.models.resnet import PreActBlock, ResNet18
from reglab.population.base import (
    ELEMENTWISE, LINEARS, MemberDraws, Population, StackedBatchNorm, StackedLinear, common_reason,
    describe, norm_settings, slot_reason, stack_members,
)
from reglab.regularization.dropout import SpatialDropout
from reglab.regularization.normalization import group_count

FUSABLE_NORMS = ("batch", "none")


def _norm_kind(net: ResNet18) -> str:
    norm = net.final_norm
    if isinstance(norm, nn.GroupNorm):
        # The models' rule, gcd(C, model.norm_groups) groups: where that is 1 or C, group norm is the same model as
        # layer or instance norm and is called group here (it cannot be fused either way).
        if norm.num_groups == group_count(norm.num_channels, net.norm_groups):
            return "group"
        return "layer" if norm.num_groups == 1 else "instance"
    kinds = {nn.Identity: "none", nn.BatchNorm2d: "batch"}
    return kinds.get(type(norm), type(norm).__name__)


def _signature(net: ResNet18) -> dict[str, object]:
    sig: dict[str, object] = {
        "model.width": net.width,
        "input channels": net.stem.in_channels,
        "num_classes": net.head.out_features,
        "model.norm": _norm_kind(net),
    }
    if sig["model.norm"] == "group":
        sig["model.norm_groups"] = net.norm_groups
    if sig["model.norm"] != "none":
        sig["model.norm_position"] = "pre" if net.stages[0][0].norm_first else "post"
        sig["norm settings"] = norm_settings(net.final_norm)
    for i, drop in enumerate(net.stage_dropout):
        sig[f"stage_dropout[{i}]"] = describe(drop)
    sig["head_dropout"] = describe(net.head_dropout)
    sig["head"] = describe(net.head)
    return sig


def fusable(nets: list[nn.Module]) -> str | None:
    """None if these ResNet18s can be trained as one PopulationResNet18, else why not (one line)."""
    reason = common_reason(nets, ResNet18, _signature, _norm_kind, FUSABLE_NORMS)
    if reason:
        return reason
    first = nets[0]
    if norm_settings(first.final_norm).startswith("nonstandard"):
        return f"norm {norm_settings(first.final_norm)} cannot be fused"
    slots = {f"stage_dropout[{i}]": drop for i, drop in enumerate(first.stage_dropout)}
    # A residual block's drop_path slot (stochastic depth) would drop one sample's branch for every member at once.
    paths = {f"stages[{s}][{b}].drop_path": block.drop_path for s, stage in enumerate(first.stages)
             for b, block in enumerate(stage) if hasattr(block, "drop_path")}
    return (slot_reason(paths, (nn.Identity,))
            or slot_reason(slots, ELEMENTWISE + (SpatialDropout,))
            or slot_reason({"head_dropout": first.head_dropout}, ELEMENTWISE)
            or slot_reason({"head": first.head}, LINEARS))


class StackedConv2d(nn.Module):
    """G bias-free Conv2d of one shape as one grouped convolution; weight (G, out, in, kh, kw)."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        self.stride, self.padding = first.stride, first.padding
        self.weight = nn.Parameter(stack_members([c.weight for c in convs]))

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """x: (B, G*in, H, W), block g member g's; or, `shared`, (B, in, H, W) read by every member: then the
        G*out filters are one plain convolution over the same input, which is not copied G times."""
        G, out, fan_in, kh, kw = self.weight.shape
        w = self.weight.view(G * out, fan_in, kh, kw)
        return F.conv2d(x, w, None, self.stride, self.padding, 1, 1 if shared else G)

    @torch.no_grad()
    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        G, out, fan_in, kh, kw = self.weight.shape
        w = self.weight.view(G * out, fan_in, kh, kw).contiguous(memory_format=memory_format)
        self.weight.data = w.view(G, out, fan_in, kh, kw)  # same Parameter: optimizer references stay valid

    def extra_repr(self) -> str:
        G, out, fan_in, kh, kw = self.weight.shape
        return f"members={G}, {fan_in}, {out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"


def _stack_norm(norms: list[nn.Module]) -> nn.Module:
    if isinstance(norms[0], nn.BatchNorm2d):
        return StackedBatchNorm(norms)
    return copy.deepcopy(norms[0])  # nn.Identity


class StackedPreActBlock(PreActBlock):
    """G PreActBlocks on (B, G*C, H, W): PreActBlock.forward runs unchanged on the grouped convs and norms."""

    def __init__(self, blocks: list[PreActBlock]):
        nn.Module.__init__(self)  # not PreActBlock.__init__: it would build solo layers only to replace them
        first = blocks[0]
        self.norm1 = _stack_norm([b.norm1 for b in blocks])
        self.conv1 = StackedConv2d([b.conv1 for b in blocks])
        self.norm2 = _stack_norm([b.norm2 for b in blocks])
        self.conv2 = StackedConv2d([b.conv2 for b in blocks])
        self.act = copy.deepcopy(first.act)
        self.norm_first = first.norm_first
        self.shortcut = None if first.shortcut is None else StackedConv2d([b.shortcut for b in blocks])
        if hasattr(first, "drop_path"):
            self.drop_path = copy.deepcopy(first.drop_path)  # nn.Identity (fusable() refuses anything else)


class PopulationResNet18(Population):
    """forward: (M, B, C, H, W) member batches, or one (B, C, H, W) batch for all -> (M, B, classes).
    Attribute names are ResNet18's, so state_dict keys are the solo net's."""

    def __init__(self, nets: list[ResNet18]):
        reason = fusable(nets)
        if reason:
            raise ValueError(reason)
        super().__init__(nets)
        first = nets[0]
        self.width = first.width
        self.memory_format = torch.contiguous_format
        self.stem = StackedConv2d([n.stem for n in nets])
        self.stages = nn.ModuleList(
            nn.Sequential(*(StackedPreActBlock([n.stages[s][b] for n in nets]) for b in range(len(stage))))
            for s, stage in enumerate(first.stages)
        )
        members = list(range(len(nets)))
        # (B, M*C, H, W) feature maps: member m's channels m*C..(m+1)*C, each drawn from its own stream
        self.stage_dropout = nn.ModuleList(MemberDraws(copy.deepcopy(d), self.streams, members, grouped=True)
                                           for d in first.stage_dropout)
        self.final_norm = _stack_norm([n.final_norm for n in nets])
        self.act = copy.deepcopy(first.act)
        self.pool = copy.deepcopy(first.pool)
        self.head_dropout = MemberDraws(copy.deepcopy(first.head_dropout), self.streams, members, grouped=True)
        self.head = StackedLinear([n.head for n in nets], self.streams, members)

    def _locate(self, m: int) -> tuple[nn.Module, int]:
        return self, m

    def to(self, *args, memory_format: torch.memory_format | None = None, **kwargs):
        # nn.Module.to(memory_format=) converts every 4- and 5-dim tensor, and a 5-dim tensor has no channels_last
        # layout (it raises). The kernels see each (G, out, in, k, k) weight as its (G*out, in, k, k) view: that
        # view gets the format, and `_grouped` lays member batches out the same way.
        if args or kwargs:
            super().to(*args, **kwargs)
        if memory_format is not None and memory_format != torch.preserve_format:
            for module in self.modules():
                if isinstance(module, StackedConv2d):
                    module.set_memory_format(memory_format)
            self.memory_format = memory_format
        return self

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C, H, W) -> (B, M*C, H, W), channel m*C + c = member m's channel c; one copy."""
        M, B, C, H, W = x.shape
        if self.memory_format == torch.channels_last:
            return x.permute(1, 3, 4, 0, 2).reshape(B, H, W, M * C).permute(0, 3, 1, 2)
        return x.transpose(0, 1).reshape(B, M * C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = self.stem(x, shared=True)
        elif x.dim() == 5 and x.shape[0] == self.members:
            x = self.stem(self._grouped(x))
        else:
            raise ValueError(f"PopulationResNet18 takes ({self.members}, B, C, H, W) member batches or one "
                             f"(B, C, H, W) batch, got shape {tuple(x.shape)}")
        for stage, drop in zip(self.stages, self.stage_dropout):
            x = drop(stage(x))
        x = self.head_dropout(self.pool(self.act(self.final_norm(x))).flatten(1))  # (B, M*8k)
        return self.head(x.view(len(x), self.members, -1).transpose(0, 1))

    def extra_repr(self) -> str:
        return f"members={self.members}, width={self.width}"
