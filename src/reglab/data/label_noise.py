"""Label noise as defined by Nakkiran et al. 2019 (Deep Double Descent, Sec. 3): each training label is, with
probability p, replaced by a label drawn uniformly from the *other* classes. Fixed by the seed."""

from __future__ import annotations

import torch


def corrupt_labels(
    y: torch.Tensor, p: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (noisy labels, mask of the labels chosen for noise). Every chosen label changes."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"data.label_noise must be in [0, 1), got {p}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(y.shape, generator=g) < p
    # An offset in 1..C-1 added mod C is uniform over the C-1 incorrect labels.
    offset = torch.randint(1, num_classes, y.shape, generator=g)
    noisy = torch.where(chosen, (y + offset) % num_classes, y)
    return noisy, chosen
