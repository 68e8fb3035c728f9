"""PopulationMLP: M reglab MLPs (each built and seeded alone, widths may differ) trained in one step.

Members of equal width form a group whose layers are stacked: activations (G, B, width), one baddbmm per layer,
h = b + x @ W^T with W (G, width, fan_in). Per-member pieces, exact as alone:
- BatchNorm1d: (G, B, W) -> (B, G*W), one BatchNorm over G*W channels, statistics over each member's batch;
- LayerNorm: per sample over its own W units, then each member's gain and shift;
- dropout slots (elementwise) act on the stacked activation, each element drawing its own mask;
- DropConnect: a Bernoulli(p) mask over the stacked (G, out, in) weight, one per member per step.
Not fusable: group norm (MLP `norm=group`), slots that differ between members, and anything not a reglab MLP.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from reglab.models.mlp import MLP, HiddenLayer
from reglab.population.base import (
    ELEMENTWISE, LINEARS, MemberDraws, MemberStreams, Population, StackedBatchNorm, StackedLinear, common_reason,
    describe, norm_settings, slot_reason, stack_members,
)

FUSABLE_NORMS = ("none", "batch", "layer")


def _norm_kind(net: MLP) -> str:
    if not net.depth:
        return "none"
    norm = net.hidden[0].norm
    kinds = {nn.Identity: "none", nn.BatchNorm1d: "batch", nn.LayerNorm: "layer", nn.GroupNorm: "group"}
    return kinds.get(type(norm), type(norm).__name__)


def _signature(net: MLP) -> dict[str, object]:
    first = net.hidden[0] if net.depth else None
    sig: dict[str, object] = {
        "model.depth": net.depth,
        "input features": (first.linear if first else net.head).in_features,
        "num_classes": net.head.out_features,
        "model.activation": repr(first.act) if first else None,
        "model.norm": _norm_kind(net),
    }
    if sig["model.norm"] == "group":
        sig["model.norm_groups"] = net.norm_groups
    if sig["model.norm"] != "none":
        sig["model.norm_position"] = "pre" if first.norm_first else "post"
        sig["norm settings"] = norm_settings(first.norm)
    sig["input_dropout"] = describe(net.input_dropout)
    for i, layer in enumerate(net.hidden):
        sig[f"hidden[{i}].linear"] = describe(layer.linear)
        sig[f"hidden[{i}].dropout"] = describe(layer.dropout)
    sig["head"] = describe(net.head)
    return sig


def fusable(nets: list[nn.Module]) -> str | None:
    """None if these MLPs can be trained as one PopulationMLP, else why not (one line)."""
    reason = common_reason(nets, MLP, _signature, _norm_kind, FUSABLE_NORMS)
    if reason:
        return reason
    first = nets[0]
    if first.depth and norm_settings(first.hidden[0].norm).startswith("nonstandard"):
        return f"hidden norm {norm_settings(first.hidden[0].norm)} cannot be fused"
    slots = {"input_dropout": first.input_dropout}
    slots.update({f"hidden[{i}].dropout": layer.dropout for i, layer in enumerate(first.hidden)})
    linears = {f"hidden[{i}].linear": layer.linear for i, layer in enumerate(first.hidden)}
    return slot_reason(slots, ELEMENTWISE) or slot_reason({**linears, "head": first.head}, LINEARS)


class StackedBatchNorm1d(StackedBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, B, W = x.shape
        # (G, B, W) -> (B, G*W): channel (g, j) is member g's unit j, its statistics over member g's batch.
        return super().forward(x.transpose(0, 1).reshape(B, G * W)).view(B, G, W).transpose(0, 1)


class StackedLayerNorm(nn.Module):
    """G LayerNorms (Ba et al. 2016) on (G, B, W): normalize each sample's W units, then member g's gain, shift."""

    def __init__(self, norms: list[nn.LayerNorm]):
        super().__init__()
        self.eps = norms[0].eps
        self.weight = nn.Parameter(stack_members([n.weight for n in norms]))  # (G, W)
        self.bias = nn.Parameter(stack_members([n.bias for n in norms]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias.unsqueeze(1), x, self.weight.unsqueeze(1))

    def extra_repr(self) -> str:
        G, W = self.weight.shape
        return f"members={G}, normalized_shape={W}, eps={self.eps:g}"


def _stack_norm(norms: list[nn.Module]) -> nn.Module:
    if isinstance(norms[0], nn.BatchNorm1d):
        return StackedBatchNorm1d(norms)
    if isinstance(norms[0], nn.LayerNorm):
        return StackedLayerNorm(norms)
    return copy.deepcopy(norms[0])  # nn.Identity


class StackedHiddenLayer(HiddenLayer):
    """G HiddenLayers of one width, (G, B, in) -> (G, B, width): HiddenLayer.forward runs unchanged on the
    stacked linear and norm."""

    def __init__(self, layers: list[HiddenLayer], streams: MemberStreams, members: list[int]):
        nn.Module.__init__(self)  # not HiddenLayer.__init__: it would build solo layers only to replace them
        first = layers[0]
        self.linear = StackedLinear([layer.linear for layer in layers], streams, members)
        self.norm = _stack_norm([layer.norm for layer in layers])
        self.act = copy.deepcopy(first.act)
        self.norm_first = first.norm_first
        self.dropout = MemberDraws(copy.deepcopy(first.dropout), streams, members)


class WidthGroup(nn.Module):
    """The members of one width; attribute names are MLP's, so state_dict keys are the solo net's."""

    def __init__(self, nets: list[MLP], streams: MemberStreams, members: list[int]):
        super().__init__()
        self.width = nets[0].width
        self.hidden = nn.ModuleList(StackedHiddenLayer([n.hidden[i] for n in nets], streams, members)
                                    for i in range(nets[0].depth))
        self.head = StackedLinear([n.head for n in nets], streams, members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


class PopulationMLP(Population):
    """forward: (M, B, *input_shape) member batches, or one (B, *input_shape) batch for all -> (M, B, classes).
    `input_shape` defaults to (in_features,); pass the data's shape for unflattened inputs."""

    def __init__(self, nets: list[MLP], input_shape: tuple[int, ...] | None = None):
        reason = fusable(nets)
        if reason:
            raise ValueError(reason)
        super().__init__(nets)
        first = nets[0]
        in_features = (first.hidden[0].linear if first.depth else first.head).in_features
        self.input_shape = tuple(input_shape) if input_shape is not None else (in_features,)
        if math.prod(self.input_shape) != in_features:
            raise ValueError(f"input_shape={self.input_shape} has {math.prod(self.input_shape)} features, "
                             f"the MLPs take {in_features}")
        self.input_dropout = MemberDraws(copy.deepcopy(first.input_dropout), self.streams, list(range(len(nets))))
        by_width: dict[int, list[int]] = {}  # width -> member indices, groups in order of first appearance
        for m, net in enumerate(nets):
            by_width.setdefault(net.width if net.depth else 0, []).append(m)
        self.groups = nn.ModuleList(WidthGroup([nets[m] for m in idx], self.streams, idx) for idx in by_width.values())
        self._where = {m: (g, i) for g, idx in enumerate(by_width.values()) for i, m in enumerate(idx)}
        self._group_members = list(by_width.values())
        self._index_cache: dict[torch.device, tuple[list, torch.Tensor | None]] = {}

    def _locate(self, m: int) -> tuple[nn.Module, int]:
        g, i = self._where[m]
        return self.groups[g], i

    def _indices(self, device: torch.device) -> tuple[list, torch.Tensor | None]:
        """Each group's rows of a stacked batch (a slice where its members are consecutive: no copy), and the
        permutation from group order back to member order (None when they agree)."""
        if device not in self._index_cache:
            takes = [slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1))
                     else torch.tensor(idx, device=device) for idx in self._group_members]
            order = [m for idx in self._group_members for m in idx]
            inverse = None if order == sorted(order) else torch.argsort(torch.tensor(order, device=device))
            self._index_cache[device] = (takes, inverse)
        return self._index_cache[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = len(self.input_shape)
        shared = x.dim() == rank + 1
        if not shared and (x.dim() != rank + 2 or x.shape[0] != self.members):
            raise ValueError(f"PopulationMLP takes ({self.members}, B, *{self.input_shape}) member batches or one "
                             f"(B, *{self.input_shape}) batch, got shape {tuple(x.shape)} (for unflattened inputs, "
                             "give PopulationMLP or fuse the data's input_shape)")
        if shared and self.training and not isinstance(self.input_dropout.module, nn.Identity):
            x, shared = x.expand(self.members, *x.shape), False  # each member draws its own input mask
        x = self.input_dropout(x.flatten(x.dim() - rank))
        if len(self.groups) == 1:
            return self.groups[0](x)
        takes, inverse = self._indices(x.device)
        out = torch.cat([group(x if shared else x[take]) for group, take in zip(self.groups, takes)])
        return out if inverse is None else out.index_select(0, inverse)

    def extra_repr(self) -> str:
        if not self._nets[0].depth:
            return f"members={self.members}, input_shape={self.input_shape}, no hidden layers"
        sizes = ", ".join(f"{g.width}x{len(idx)}" for g, idx in zip(self.groups, self._group_members))
        return f"members={self.members}, input_shape={self.input_shape}, width x members: {sizes}"
