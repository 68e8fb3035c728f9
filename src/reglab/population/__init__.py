"""Many members trained in one step: M solo nets, each built and seeded by the normal code path, fused so that one
forward/backward on the sum of the members' losses trains all of them, each with exactly its own gradient
(population/base.py says why, and the parameter layout the training step relies on)."""

from __future__ import annotations

from torch import nn

from reglab.models import MLP, ResNet18
from reglab.population import mlp, resnet
from reglab.population.base import Population, member_losses
from reglab.population.mlp import PopulationMLP
from reglab.population.resnet import PopulationResNet18

__all__ = ["Population", "PopulationMLP", "PopulationResNet18", "fusable", "fuse", "member_losses"]


def fusable(nets: list[nn.Module]) -> str | None:
    """None if `nets` can be fused, else a one-line reason naming what stops it."""
    kinds = {type(n) for n in nets}
    if kinds == {ResNet18}:
        return resnet.fusable(nets)
    if kinds <= {MLP}:
        return mlp.fusable(nets)
    return f"members must be all MLPs or all ResNet18s, got {', '.join(sorted(k.__name__ for k in kinds))}"


def fuse(nets: list[nn.Module], input_shape: tuple[int, ...] | None = None) -> Population:
    """PopulationMLP or PopulationResNet18 of `nets`; ValueError(fusable's reason) if they cannot be fused.
    `input_shape` is the MLP's unflattened input shape, when inputs are not flat vectors."""
    reason = fusable(nets)
    if reason:
        raise ValueError(reason)
    if type(nets[0]) is MLP:
        return PopulationMLP(nets, input_shape)
    return PopulationResNet18(nets)
