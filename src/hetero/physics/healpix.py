"""HEALPix projection classes of viewing directions (via healpy).

The viewing direction of a RELION pose is the third row of ``A``; its polar angle is the tilt
and its azimuth the rot angle. Classes use the NESTED scheme, ``12 * nside^2`` of them
(nside 2 -> 48 classes, as in OPUS-DSD).

Example usage::

    classes = healpix_class(rotations, nside=2)    # (N,) int64 in [0, 48)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hetero.physics.rotations import direction_to_angles, viewing_direction


def n_healpix_classes(nside: int) -> int:
    """Number of HEALPix pixels, ``12 * nside^2``."""
    return 12 * nside * nside


def healpix_class_of_direction(direction: Tensor | np.ndarray, nside: int) -> np.ndarray:
    """NESTED HEALPix pixel of ``(N, 3)`` unit vectors (any length, normalised here)."""
    import healpy

    d = torch.as_tensor(np.asarray(direction), dtype=torch.float64)
    theta, phi = direction_to_angles(d)
    return healpy.ang2pix(nside, theta.numpy(), phi.numpy(), nest=True).astype(np.int64)


def healpix_class(rotations: Tensor | np.ndarray, nside: int) -> np.ndarray:
    """NESTED HEALPix class of the viewing direction of ``(N, 3, 3)`` RELION matrices."""
    r = torch.as_tensor(np.asarray(rotations), dtype=torch.float64)
    return healpix_class_of_direction(viewing_direction(r), nside)


def healpix_pixel_directions(nside: int) -> Tensor:
    """``(12 nside^2, 3)`` unit vectors of the NESTED pixel centres."""
    import healpy

    x, y, z = healpy.pix2vec(nside, np.arange(n_healpix_classes(nside)), nest=True)
    return torch.tensor(np.stack([x, y, z], -1))
