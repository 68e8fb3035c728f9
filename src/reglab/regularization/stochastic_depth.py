"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv 1603.09382), ResNet18 only.

In training each residual block l = 1..L keeps its residual branch with survival probability p_l, per sample
("row" mode: one Bernoulli draw per sample, as timm's DropPath), and rescales the kept branch by 1/p_l so that
evaluation is the identity on the branch (Huang et al. scale by p_l at test time instead; same expectation):

    train  x_{l+1} = x_l' + b_l * f_l(x_l) / p_l,  b_l ~ Bernoulli(p_l);   eval  x_{l+1} = x_l' + f_l(x_l)

(x_l' is the block's shortcut). Linear decay rule (Huang et al. eq. 4): p_l = 1 - (l / L) * (1 - p_L), so the first
block almost always survives and the last survives with p_L (keep_prob; Huang et al. use 0.5 for 110 layers).
The module is torchvision.ops.StochasticDepth(p = 1 - p_l, mode="row"), put into each PreActBlock's `drop_path`
slot (an nn.Identity until then).
"""

from __future__ import annotations

from torch import nn
from torchvision.ops import StochasticDepth

from reglab.errors import ConfigError
from reglab.regularization.base import Regularizer
from reglab.regularization.dropout import _check_keep


def survival_rates(keep_prob: float, blocks: int) -> list[float]:
    """p_l = 1 - (l / L)(1 - p_L) for l = 1..L (Huang et al. 2016, eq. 4)."""
    return [1.0 - (l / blocks) * (1.0 - keep_prob) for l in range(1, blocks + 1)]


class StochasticDepthRegularizer(Regularizer):
    """`stochastic_depth`: StochasticDepth(1 - p_l, "row") in the drop_path slot of ResNet18's 8 residual blocks."""

    def __init__(self, keep_prob: float = 0.8):
        self.keep_prob = _check_keep("keep_prob", keep_prob)

    def attach(self, net: nn.Module) -> None:
        blocks = [b for stage in getattr(net, "stages", ()) for b in stage if hasattr(b, "drop_path")]
        if not blocks:
            raise ConfigError(f"regularization.{self.name}: stochastic depth drops residual blocks; "
                              f"{type(net).__name__} has none (use model=resnet18)")
        for block, p in zip(blocks, survival_rates(self.keep_prob, len(blocks))):
            if not isinstance(block.drop_path, nn.Identity):
                raise ConfigError(f"regularization.{self.name}: a block's drop_path already holds {block.drop_path}")
            block.drop_path = StochasticDepth(1.0 - p, mode="row")
