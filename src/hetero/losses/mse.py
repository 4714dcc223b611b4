"""Per-pixel mean squared error between images (the homogeneous model's objective)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ImageMSELoss(nn.Module):
    """``weight * mean((predicted - target)^2)`` over batch and pixels, in float32.

    :param weight: multiplier of the term in the total loss.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, predicted: Tensor, target: Tensor) -> Tensor:
        """``predicted``, ``target``: ``(B, D, D)``. Returns the weighted scalar."""
        diff = predicted.float() - target.float()
        return self.weight * torch.mean(diff * diff)
