"""Many members trained in one step: M solo nets, each built and seeded by the normal code path, fused so that one
forward/backward on the sum of the members' losses trains all of them, each with exactly its own gradient
(population/base.py says why, and the parameter layout the training step relies on).

The names below load torch and the models on first use: the sweep's launching process imports
`reglab.population.sweeper` (configs only) to group a grid, and paid ~5 s of torch and Lightning imports for it
before any job started."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from reglab.population.base import Population

__all__ = ["Population", "PopulationMLP", "PopulationResNet18", "fusable", "fuse", "member_losses"]
_LAZY = {"Population": "base", "member_losses": "base", "PopulationMLP": "mlp", "PopulationResNet18": "resnet"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"reglab.population.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'reglab.population' has no attribute {name!r}")


def fusable(nets: list[nn.Module]) -> str | None:
    """None if `nets` can be fused, else a one-line reason naming what stops it."""
    from reglab.models import MLP, ResNet18
    from reglab.population import mlp, resnet

    kinds = {type(n) for n in nets}
    if kinds == {ResNet18}:
        return resnet.fusable(nets)
    if kinds <= {MLP}:
        return mlp.fusable(nets)
    return f"members must be all MLPs or all ResNet18s, got {', '.join(sorted(k.__name__ for k in kinds))}"


def fuse(nets: list[nn.Module], input_shape: tuple[int, ...] | None = None) -> Population:
    """PopulationMLP or PopulationResNet18 of `nets`; ValueError(fusable's reason) if they cannot be fused.
    `input_shape` is the MLP's unflattened input shape, when inputs are not flat vectors."""
    from reglab.models import MLP
    from reglab.population.mlp import PopulationMLP
    from reglab.population.resnet import PopulationResNet18

    reason = fusable(nets)
    if reason:
        raise ValueError(reason)
    if type(nets[0]) is MLP:
        return PopulationMLP(nets, input_shape)
    return PopulationResNet18(nets)
