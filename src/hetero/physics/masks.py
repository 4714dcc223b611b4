"""Real-space masks: hard and soft spheres/circles, and soft masks derived from a map.

All masks are float tensors in ``[0, 1]`` centred on index ``D // 2``. Soft edges are raised
cosines of the given width (pixels), as RELION's ``relion_mask_create`` builds them.

Example usage::

    m2 = circular_mask(64, radius_px=28, soft_edge_px=4)      # (64, 64)
    m3 = spherical_mask(64, radius_px=28)                     # (64, 64, 64)
    m = soft_mask_from_volume(vol, threshold=0.02, extend_px=2, soft_edge_px=4)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hetero.physics.fourier import radius_grid


def _raised_cosine(r: Tensor, radius: float, soft_edge: float) -> Tensor:
    if soft_edge <= 0:
        return (r <= radius).to(r.dtype)
    t = ((r - radius) / soft_edge).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def circular_mask(
    box_size: int, radius_px: float | None = None, soft_edge_px: float = 0.0, device=None
) -> Tensor:
    """``(D, D)`` disc of ``radius_px`` (default ``D/2``) with an optional cosine edge outside it."""
    r = radius_grid((box_size, box_size), device=device)
    return _raised_cosine(r, box_size / 2 if radius_px is None else radius_px, soft_edge_px)


def spherical_mask(
    box_size: int, radius_px: float | None = None, soft_edge_px: float = 0.0, device=None
) -> Tensor:
    """``(D, D, D)`` ball of ``radius_px`` (default ``D/2``) with an optional cosine edge."""
    r = radius_grid((box_size,) * 3, device=device)
    return _raised_cosine(r, box_size / 2 if radius_px is None else radius_px, soft_edge_px)


def dilate(binary: Tensor, radius_px: int) -> Tensor:
    """Binary dilation of a ``(D, D, D)`` mask by a ball of ``radius_px`` (max-pooling)."""
    if radius_px <= 0:
        return binary
    k = 2 * radius_px + 1
    ball = (radius_grid((k, k, k), device=binary.device) <= radius_px).to(binary.dtype)
    out = F.conv3d(binary[None, None].to(torch.float32), ball[None, None].float(), padding=radius_px)
    return (out[0, 0] > 0.5).to(binary.dtype)


def soft_mask_from_volume(
    volume: Tensor, threshold: float, extend_px: int = 3, soft_edge_px: int = 5
) -> Tensor:
    """RELION-style mask: threshold, extend by ``extend_px``, then a cosine edge of
    ``soft_edge_px`` computed from the distance to the extended binary region."""
    binary = (volume > threshold).to(torch.float32)
    binary = dilate(binary, extend_px)
    if soft_edge_px <= 0:
        return binary
    # Euclidean distance to the binary region, rounded up to whole voxels: the shell reached by
    # a dilation with a ball of radius `step` but not `step - 1`. (Repeated one-voxel dilations
    # would measure city-block distance and make the edge ~sqrt(3) times narrower along the
    # cube diagonals than along the axes.)
    mask = binary.clone()
    previous = binary
    for step in range(1, soft_edge_px + 1):
        grown = dilate(binary, step)
        shell = (grown - previous).clamp(min=0)
        mask = mask + shell * 0.5 * (1 + math.cos(math.pi * step / (soft_edge_px + 1)))
        previous = grown
    return mask.clamp(0, 1)


def soft_mask_outside_map(volume: Tensor, radius: float | None = None, width: float = 3.0) -> Tensor:
    """RELION's ``softMaskOutsideMap``: voxels beyond ``radius + width`` (default radius
    ``D / 2``) are replaced by the background average, with a raised-cosine blend over
    ``width`` voxels; the average is taken over the same blend weights. ``relion_reconstruct``
    applies it to every reconstruction (it removes the aliasing of gridding from the corners).

    :param volume: ``(D, D, D)``. :return: a new ``(D, D, D)`` tensor.
    """
    d = volume.shape[-1]
    radius = d / 2 if radius is None else float(radius)
    r = radius_grid(tuple(volume.shape), device=volume.device, dtype=volume.dtype)
    outside = 1.0 - _raised_cosine(r, radius, width)
    background = (volume * outside).sum() / outside.sum().clamp(min=1e-12)
    return volume * (1 - outside) + background * outside
