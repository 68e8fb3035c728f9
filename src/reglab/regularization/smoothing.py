"""Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7, arXiv 1512.00567).

The one-hot target e_y becomes q = (1 - eps) e_y + eps/K (K classes), so the training loss is

    -sum_k q_k log p_k = (1 - eps) * CE(y) + eps * mean_k(-log p_k)

which keeps the logits from growing without bound to fit a one-hot target. The Classifier computes it with
torch.nn.functional.cross_entropy(logits, target, label_smoothing=eps): one fused kernel, no one-hot tensor, and it
also smooths soft targets (mixup, cutmix). Only the training loss is smoothed; val/test losses stay plain
cross-entropy, comparable across techniques.
"""

from __future__ import annotations

from reglab.regularization.base import Regularizer


class LabelSmoothing(Regularizer):
    """`label_smoothing`: the Classifier reads `label_smoothing` (eps) for its training loss."""

    def __init__(self, smoothing: float = 0.1):
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing={smoothing!r} must be a number in [0, 1)")  # build() names the key
        self.label_smoothing = float(smoothing)
