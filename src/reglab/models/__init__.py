"""Plain nn.Modules. Every model takes `input_shape` (C, H, W) or (F,) and `num_classes` from the data,
and exposes `num_params`; regularizers reach into them only through the slots they declare."""

from reglab.models.mlp import MLP
from reglab.models.resnet import ResNet18

__all__ = ["MLP", "ResNet18"]
