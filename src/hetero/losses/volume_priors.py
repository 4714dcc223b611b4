"""Smoothness (total variation) and sparsity (L1, LASSO) priors on decoded volumes (eq. 9).

Normalisation (``normalization``):

* ``"paper"`` (default): eq. 9 writes ``lambda/N * sum_x`` for an ``N^3`` volume, i.e. the sum
  over voxels divided by the side ``N`` (per image, like the summed reconstruction error).
* ``"mean"``: the mean over voxels, as the reference code computes it (which, after the
  reference's division by the pixel count, makes both priors ~N^2 times weaker than in the
  paper).

Both terms are averaged over the batch and computed in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Normalization = Literal["paper", "mean"]


def _reduce(per_voxel: Tensor, side: int, normalization: Normalization) -> Tensor:
    flat = per_voxel.reshape(per_voxel.shape[0], -1)
    if normalization == "paper":
        return (flat.sum(-1) / side).mean()
    if normalization == "mean":
        return flat.mean()
    raise ValueError(f"normalization must be 'paper' or 'mean', got {normalization!r}")


def total_variation(volumes: Tensor, eps: float = 1e-8, normalization: Normalization = "paper") -> Tensor:
    """Isotropic TV ``||grad V||_2`` with forward differences on the ``(N-1)^3`` interior.

    ``sqrt(|grad|^2 + eps) - sqrt(eps)`` keeps the gradient finite at flat regions and makes the
    TV of a constant volume exactly 0. ``(B, N, N, N) -> scalar``.
    """
    v = volumes.float()
    dz = v[:, 1:, :-1, :-1] - v[:, :-1, :-1, :-1]
    dy = v[:, :-1, 1:, :-1] - v[:, :-1, :-1, :-1]
    dx = v[:, :-1, :-1, 1:] - v[:, :-1, :-1, :-1]
    mag = torch.sqrt(dz * dz + dy * dy + dx * dx + eps) - eps**0.5
    return _reduce(mag, v.shape[-1], normalization)


def l1_norm(volumes: Tensor, normalization: Normalization = "paper") -> Tensor:
    """``||V||_1`` (LASSO). ``(B, N, N, N) -> scalar``."""
    v = volumes.float()
    return _reduce(v.abs(), v.shape[-1], normalization)


class TotalVariation(nn.Module):
    """TV prior; paper ``lambda_tv = 1``.

    :param weight: multiplier in the total loss. :param eps: smoothing inside the square root.
    :param normalization: ``"paper"`` (sum / N) or ``"mean"`` (reference code).
    """

    def __init__(self, weight: float = 1.0, eps: float = 1e-8, normalization: Normalization = "paper") -> None:
        super().__init__()
        self.weight, self.eps, self.normalization = float(weight), float(eps), normalization

    def forward(self, volumes: Tensor) -> Tensor:
        return total_variation(volumes, self.eps, self.normalization)


class L1Norm(nn.Module):
    """LASSO prior; paper ``lambda_l1 = 0.3``.

    :param weight: multiplier in the total loss.
    :param normalization: ``"paper"`` (sum / N) or ``"mean"`` (reference code).
    """

    def __init__(self, weight: float = 0.3, normalization: Normalization = "paper") -> None:
        super().__init__()
        self.weight, self.normalization = float(weight), normalization

    def forward(self, volumes: Tensor) -> Tensor:
        return l1_norm(volumes, self.normalization)
