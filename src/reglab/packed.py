"""Packed training: K small MLPs (a width sweep at one seed) trained as one network, in one step.

A double-descent sweep trains many small models; a width-8 MLP step is a few microseconds of arithmetic and a
few hundred of framework and kernel-launch overhead, paid once per model. `PackedMLP` lays the K models side by
side in one block-diagonal network, so a step costs one set of kernels for all of them:

    layer 0:  h = x @ [W0_1; ...; W0_K]^T          (sum w, in)  an exact concatenation: the models share x
    layer i:  h = act(h) @ (W_i * M)^T             (sum w, sum w), M = block-diagonal 0/1 mask
    head:     logits = h @ (W_h * M_h)^T           (K * C, sum w) -> (B, K, C)

Off-block weights are multiplied by 0 in the forward pass, so their gradient is 0, and stay 0 under SGD, Adam and
weight decay (all elementwise). The loss is the sum of the K models' mean cross-entropies: d(sum)/d(theta_k) =
dL_k/d(theta_k), so each block gets exactly its own model's gradient, and the optimizer (elementwise) updates it
exactly as it would alone. What differs is only float summation order inside the matmul kernels (the product with
zero blocks adds exact zeros, but kernels block the sums differently by shape): weights agree with separately
trained models to ~1e-6 relative after a few epochs (tests/test_fast_paths.py).

Each model is built (and initialized) by its own code path from its own seed, then copied in; `unpack` copies the
weights back into the K original modules, so metrics, weight statistics and checkpoints use the usual classes.
Supported: `reglab.models.MLP` with norm none (any depth, activation); the same data, batches and optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reglab.models.mlp import MLP, make_activation


def packable(net: nn.Module) -> bool:
    """MLP without normalization and with empty dropout slots (no regularizer attached)."""
    if type(net) is not MLP:
        return False
    slots = [net.input_dropout, *(layer.dropout for layer in net.hidden), *(layer.norm for layer in net.hidden)]
    return all(isinstance(m, nn.Identity) for m in slots)


class PackedMLP(nn.Module):
    def __init__(self, nets: list[MLP]):
        super().__init__()
        if not nets or not all(packable(n) for n in nets):
            raise ValueError("PackedMLP packs reglab MLPs without norm or dropout")
        depths = {n.depth for n in nets}
        acts = {type(n.hidden[0].act) if n.depth else None for n in nets}
        heads = {(n.head.out_features, n.hidden[0].linear.in_features if n.depth else n.head.in_features)
                 for n in nets}
        if len(depths) != 1 or len(acts) != 1 or len(heads) != 1:
            raise ValueError("packed MLPs must share depth, activation, input size and classes")
        self.nets = nets  # not registered: the packed tensors are the parameters; these receive `unpack`
        self.depth = depths.pop()
        self.classes, in_features = heads.pop()
        self.widths = [n.width if n.depth else in_features for n in nets]
        self.k = len(nets)
        offsets = torch.tensor([0, *self.widths]).cumsum(0).tolist()
        self.blocks = [(offsets[i], offsets[i + 1]) for i in range(self.k)]
        total = offsets[-1]
        self.act = make_activation(_activation_name(nets[0])) if self.depth else nn.Identity()
        with torch.no_grad():
            self.weights = nn.ParameterList()
            self.biases = nn.ParameterList()
            if self.depth:
                self.weights.append(torch.cat([n.hidden[0].linear.weight for n in nets]))
                self.biases.append(torch.cat([n.hidden[0].linear.bias for n in nets]))
            for i in range(1, self.depth):
                w = torch.zeros(total, total)
                for (a, b), n in zip(self.blocks, nets):
                    w[a:b, a:b] = n.hidden[i].linear.weight
                self.weights.append(w)
                self.biases.append(torch.cat([n.hidden[i].linear.bias for n in nets]))
            if self.depth:
                head = torch.zeros(self.k * self.classes, total)
                for j, ((a, b), n) in enumerate(zip(self.blocks, nets)):
                    head[j * self.classes:(j + 1) * self.classes, a:b] = n.head.weight
            else:  # no hidden layer: the heads read the shared input, a concatenation
                head = torch.cat([n.head.weight for n in nets])
            self.weights.append(head)
            self.biases.append(torch.cat([n.head.bias for n in nets]))
        block = torch.zeros(total, total)
        for a, b in self.blocks:
            block[a:b, a:b] = 1
        head_mask = torch.zeros(self.k * self.classes, total)
        for j, (a, b) in enumerate(self.blocks):
            head_mask[j * self.classes:(j + 1) * self.classes, a:b] = 1
        self.register_buffer("block_mask", block, persistent=False)
        self.register_buffer("head_mask", head_mask if self.depth else torch.ones_like(head), persistent=False)

    @property
    def num_params(self) -> list[int]:
        return [n.num_params for n in self.nets]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, K, C) logits of the K models."""
        h = x.flatten(1)
        for i in range(self.depth):
            w = self.weights[i] if i == 0 else self.weights[i] * self.block_mask
            h = self.act(F.linear(h, w, self.biases[i]))
        logits = F.linear(h, self.weights[-1] * self.head_mask, self.biases[-1])
        return logits.view(len(x), self.k, self.classes)

    @torch.no_grad()
    def unpack(self) -> list[MLP]:
        """Copy the packed weights into the K models (in place) and return them."""
        for j, ((a, b), n) in enumerate(zip(self.blocks, self.nets)):
            if self.depth:
                n.hidden[0].linear.weight.copy_(self.weights[0][a:b])
                n.hidden[0].linear.bias.copy_(self.biases[0][a:b])
                for i in range(1, self.depth):
                    n.hidden[i].linear.weight.copy_(self.weights[i][a:b, a:b])
                    n.hidden[i].linear.bias.copy_(self.biases[i][a:b])
                n.head.weight.copy_(self.weights[-1][j * self.classes:(j + 1) * self.classes, a:b])
            else:
                n.head.weight.copy_(self.weights[-1][j * self.classes:(j + 1) * self.classes])
            n.head.bias.copy_(self.biases[-1][j * self.classes:(j + 1) * self.classes])
        return self.nets


def _activation_name(net: MLP) -> str:
    from reglab.models.mlp import ACTIVATIONS

    cls = type(net.hidden[0].act)
    return next(name for name, c in ACTIVATIONS.items() if c is cls)


def packed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K, C), (B,) -> (K,) mean cross-entropy of each model; their sum keeps each model's gradient its own."""
    return F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, logits.shape[1]),
                           reduction="none").mean(0)


# --- which models share a step --------------------------------------------------------------------------------
# Cost of one training step of a group, in multiply-adds per example: the block-diagonal matmuls do
# (sum w)^2 per hidden layer (zeros included), plus a fixed cost per group for its kernels and Python, which is
# what packing saves. OVERHEAD_MACS ~ 0.3 ms of one CPU core at batch 100; on a GPU the fixed cost dominates any
# of these widths, so everything goes in one group.
OVERHEAD_MACS = {"cpu": 30_000, "cuda": 10**12}


def group_cost(widths: list[int], depth: int, in_features: int, classes: int, overhead: int) -> float:
    total = sum(widths)
    return overhead + (depth - 1) * total**2 + in_features * total + classes * len(widths) * total


def plan_groups(widths: list[int], depth: int, in_features: int, classes: int, device: str = "cpu") -> list[list[int]]:
    """Indices into `widths`, grouped: ascending widths join the current group while that costs less than a
    group of their own (greedy on group_cost)."""
    overhead = OVERHEAD_MACS.get(device, OVERHEAD_MACS["cpu"])
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            cur = [widths[j] for j in groups[-1]]
            merged = group_cost(cur + [widths[i]], depth, in_features, classes, overhead)
            apart = group_cost(cur, depth, in_features, classes, overhead) + \
                group_cost([widths[i]], depth, in_features, classes, overhead)
            if merged <= apart:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


class Pack(nn.Module):
    """Several PackedMLP groups trained in one step; forward gives (B, K, C) in the order of `nets`."""

    def __init__(self, nets: list[MLP], device: str = "cpu"):
        super().__init__()
        first = nets[0]
        in_features = first.hidden[0].linear.in_features if first.depth else first.head.in_features
        widths = [n.width for n in nets]
        self.plan = plan_groups(widths, first.depth, in_features, first.head.out_features, device)
        self.groups = nn.ModuleList(PackedMLP([nets[i] for i in g]) for g in self.plan)
        order = [i for g in self.plan for i in g]
        self.register_buffer("inverse", torch.argsort(torch.tensor(order)), persistent=False)
        self.nets = nets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([g(x) for g in self.groups], dim=1)[:, self.inverse]

    def unpack(self) -> list[MLP]:
        for g in self.groups:
            g.unpack()
        return self.nets
