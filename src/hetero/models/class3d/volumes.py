"""Masks of the classification: the experimental-image mask and solvent flattening.

RELION masks every experimental image with a soft circle of the particle diameter before the
expectation step (background set to zero: ``--zero_mask``), and with ``--flatten_solvent``
multiplies each new reference by a soft sphere of the same diameter or by the user's
``--solvent_mask`` (masked classification: only the density inside the mask is classified).
Both soft edges are raised cosines ``width_mask_edge`` pixels wide outside the radius.

Example usage::

    masks = SolventMask(box_size=64, apix=3.0, diameter=180.0, edge_px=5.0)
    ref = masks(ref)                   # solvent-flattened map
    img_mask = masks.image_mask()      # (64, 64)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hetero.physics.fourier import fourier_crop_3d
from hetero.physics.masks import circular_mask, spherical_mask


class SolventMask:
    """Soft particle masks for images and references.

    :param box_size: training box ``D``. :param apix: its pixel size (Å).
    :param diameter: particle diameter (Å). :param edge_px: soft-edge width (pixels).
    :param mask_path: an ``.mrc`` mask (values in [0, 1], any box with the same physical
        extent as the particles) used instead of the sphere for the references.
    :param flatten: apply the reference mask at all (RELION ``--flatten_solvent``).
    :raises ValueError: a mask without ``flatten``, or one whose extent or values are wrong.
    """

    def __init__(
        self, box_size: int, apix: float, diameter: float, edge_px: float = 5.0,
        mask_path: str | None = None, flatten: bool = True,
    ) -> None:
        if diameter <= 0:
            raise ValueError(f"model.particle_diameter must be > 0 Å, got {diameter}")
        self.box_size, self.apix = int(box_size), float(apix)
        self.radius_px = float(diameter) / (2 * self.apix)
        self.edge_px = float(edge_px)
        self.flatten = bool(flatten)
        if mask_path and not self.flatten:
            raise ValueError("model.solvent_mask needs model.flatten_solvent=true (RELION applies the "
                             "mask when flattening the references)")
        if mask_path:
            self.mask = _read_mask(Path(str(mask_path)), self.box_size, self.apix)
        else:
            self.mask = spherical_mask(self.box_size, self.radius_px, self.edge_px)

    def image_mask(self) -> Tensor:
        """``(D, D)`` soft circle applied to the recentred images of the E-step."""
        return circular_mask(self.box_size, self.radius_px, self.edge_px)

    def __call__(self, volumes: Tensor) -> Tensor:
        """Solvent-flattened ``(..., D, D, D)`` maps (unchanged when flattening is off)."""
        if not self.flatten:
            return volumes
        return volumes * self.mask.to(volumes.device, volumes.dtype)


def _read_mask(path: Path, box: int, apix: float) -> Tensor:
    from hetero.data.io.mrc import read_volume

    if not path.is_file():
        raise FileNotFoundError(f"model.solvent_mask: no file at {path}")
    vol, vapix = read_volume(path)
    mask = torch.as_tensor(vol, dtype=torch.float32)
    extent, want = mask.shape[-1] * float(vapix), box * apix
    if mask.dim() != 3 or abs(extent - want) > 0.01 * want:
        raise ValueError(
            f"model.solvent_mask {path}: {tuple(mask.shape)} voxels of {float(vapix):.4g} Å span "
            f"{extent:.1f} Å, but the particle box spans {want:.1f} Å; give a mask made on the "
            "particles' box (e.g. with relion_mask_create on a map of the consensus refinement)"
        )
    if float(mask.min()) < -1e-3 or float(mask.max()) > 1 + 1e-3:
        raise ValueError(f"model.solvent_mask {path}: values must lie in [0, 1] (RELION's rule), "
                         f"got {float(mask.min()):.3g}..{float(mask.max()):.3g}")
    if mask.shape[-1] != box:
        mask = fourier_crop_3d(mask, box)
    return mask.clamp(0, 1)
