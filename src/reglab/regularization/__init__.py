"""Every regularization technique of the lecture, one place each: penalties.py (L1, proximal L1, L2, weight decay,
elastic net, max-norm), dropout.py (classic, inverted, DropConnect, spatial, Gaussian), normalization.py
(batch/layer/group/instance norm and their placement); the modern recipes' smoothing.py (label smoothing), mixing.py
(mixup, cutmix), stochastic_depth.py (ResNet18's residual blocks), averaging.py (EMA, SWA). base.py holds the hook
protocol."""

from reglab.regularization.base import Regularizer

__all__ = ["Regularizer"]
