"""One pixel size for particles from optics groups with different pixel sizes.

hetero's models render one template at one pixel size. Particles whose optics group has
another pixel size (``rlnImagePixelSize``; same ``rlnImageSize``) would be modelled at the
wrong scale, so the loader resamples them. The reference is the most common pixel size
``apix_ref``; the training box ``D`` then has pixels of ``apix_train = apix_ref * D0 / D``.
A particle with pixel size ``apix_i`` covers ``D0 * apix_i`` Å, so it is Fourier-cropped (or
zero-padded) to ``m_i = round(D * apix_i / apix_ref)`` pixels, which keeps its physical
extent and gives pixels of ``D0 * apix_i / m_i`` (about ``apix_train``), and then cut (or
zero-padded) in real space around the centre pixel to ``D x D``. Its origin in training
pixels is ``origin_px * apix_i / apix_train``.

The rounding of ``m_i`` leaves a scale error; it is logged, and refused when it exceeds
:data:`MAX_EDGE_ERROR_PX` at the edge of the box (radius ``D / 2``).

Example usage::

    plan = resample_plan(table.pixel_size_angstrom, original_box=256, box_size=128)
    images = resample_images(raw, plan.sizes[rows], 128)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hetero.physics.fourier import fourier_crop_2d

#: Largest scale error accepted at radius ``D / 2`` (training pixels).
MAX_EDGE_ERROR_PX = 0.25


def reference_pixel_size(pixel_sizes: np.ndarray) -> float:
    """The most common pixel size (values equal to 6 decimals count as one)."""
    values, counts = np.unique(np.round(np.asarray(pixel_sizes, np.float64), 6), return_counts=True)
    return float(values[np.argmax(counts)])


@dataclass
class ResamplePlan:
    """Per-particle Fourier sizes ``sizes (N,)``, the training pixel size and the worst scale
    error at the box edge (training pixels)."""

    sizes: np.ndarray
    apix_train: float
    apix_ref: float
    edge_error_px: float

    @property
    def needed(self) -> bool:
        return bool(np.unique(self.sizes).size > 1)


def resample_plan(pixel_sizes: np.ndarray, original_box: int, box_size: int) -> ResamplePlan:
    """Fourier size of each particle so that all end at one pixel size (module docstring)."""
    apix = np.asarray(pixel_sizes, dtype=np.float64)
    ref = reference_pixel_size(apix)
    apix_train = ref * original_box / box_size
    same = np.abs(apix - ref) <= 1e-6 * ref
    exact = box_size * apix / ref
    sizes = np.where(same, box_size, np.rint(exact)).astype(np.int64)
    achieved = original_box * apix / sizes
    rel = np.where(same, 0.0, np.abs(achieved - apix_train) / apix_train)
    edge = float(rel.max() * box_size / 2) if len(rel) else 0.0
    return ResamplePlan(sizes=sizes, apix_train=apix_train, apix_ref=ref, edge_error_px=edge)


def _center_window(images: Tensor, size: int) -> Tensor:
    """Cut (or zero-pad) ``(B, m, m)`` images to ``(B, size, size)`` keeping index ``m // 2``
    at index ``size // 2``."""
    m = images.shape[-1]
    if m == size:
        return images
    if m > size:
        o = m // 2 - size // 2
        return images[..., o : o + size, o : o + size]
    o = size // 2 - m // 2
    return torch.nn.functional.pad(images, (o, size - m - o, o, size - m - o))


def resample_images(images: Tensor, sizes: np.ndarray, box_size: int) -> Tensor:
    """``(B, D0, D0)`` raw images -> ``(B, D, D)``: Fourier resample image ``b`` to
    ``sizes[b]`` pixels, then cut/pad it to ``D`` (float32, pixel values keep their scale)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    out = images.new_empty((images.shape[0], box_size, box_size), dtype=torch.float32)
    for m in np.unique(sizes).tolist():
        rows = torch.from_numpy(np.flatnonzero(sizes == m))
        part = fourier_crop_2d(images[rows], int(m)).to(torch.float32)
        out[rows] = _center_window(part, box_size)
    return out
