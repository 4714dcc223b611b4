"""Neighbouring poses around a consensus pose, for the multi-pose reconstruction loss.

A small tilt ``Delta`` about an axis ``u`` lying in the image plane, applied in the image frame
(``A' = Delta @ A``), moves the viewing direction ``A.T e_z`` by the tilt angle towards the
in-plane direction perpendicular to ``u`` and keeps the in-plane angle (to first order) - the
same kind of neighbour as an adjacent HEALPix pixel with the in-plane angle held fixed.

Modes:

* ``"ring"`` (default): ``n`` tilts of ``spread_deg`` at evenly spaced azimuths, centred on the
  exact consensus direction. With ``spread_deg = 3.66`` this is the ring of the 8 HEALPix
  nside-16 neighbours (pixel size ``sqrt(4 pi / 3072)`` rad); the reference code takes the
  actual ``healpy.get_all_neighbours`` pixel centres, which are centred on the pixel containing
  the consensus direction rather than on the direction itself.
* ``"random"``: ``n`` rotations about uniformly random 3-D axes by ``spread_deg`` (tilt and
  in-plane perturbations), redrawn every call.

The consensus pose itself is prepended when ``include_consensus`` (default); the reference code
scores the 8 neighbours only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

#: Angular size of a HEALPix nside-16 pixel, the reference's neighbour spacing (degrees).
HEALPIX_NSIDE16_DEG = math.degrees(math.sqrt(4 * math.pi / (12 * 16 * 16)))


def axis_angle_matrix(axes: Tensor, angles_rad: Tensor) -> Tensor:
    """Rodrigues: rotations by ``angles_rad (...,)`` about unit ``axes (..., 3)`` -> ``(..., 3, 3)``.

    Active rotation ``R v = v cos a + (u x v) sin a + u (u . v)(1 - cos a)``.
    """
    u = axes / axes.norm(dim=-1, keepdim=True)
    x, y, z = u.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*u.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=u.dtype, device=u.device).expand_as(k)
    s, c = torch.sin(angles_rad)[..., None, None], torch.cos(angles_rad)[..., None, None]
    return eye + s * k + (1 - c) * (k @ k)


def perturbations(
    n: int,
    spread_deg: float,
    mode: Literal["ring", "random"] = "ring",
    batch: int = 1,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Small rotations ``(batch, n, 3, 3)`` in the image frame (``A' = Delta @ A``)."""
    angle = torch.full((batch, n), math.radians(spread_deg), device=device, dtype=dtype)
    if mode == "ring":
        phi = torch.arange(n, device=device, dtype=dtype) * (2 * math.pi / max(n, 1))
        axes = torch.stack([torch.cos(phi), torch.sin(phi), torch.zeros_like(phi)], -1)
        axes = axes.expand(batch, n, 3)
    elif mode == "random":
        axes = torch.randn(batch, n, 3, device=device, dtype=dtype)
    else:
        raise ValueError(f"neighbour mode must be 'ring' or 'random', got {mode!r}")
    return axis_angle_matrix(axes, angle)


def neighbour_rotations(
    rotations: Tensor,
    n_neighbours: int = 8,
    spread_deg: float = HEALPIX_NSIDE16_DEG,
    mode: Literal["ring", "random"] = "ring",
    include_consensus: bool = True,
) -> Tensor:
    """Consensus pose plus neighbours: ``(B, 3, 3) -> (B, P, 3, 3)``.

    ``P = n_neighbours + include_consensus``; the consensus (if included) is pose 0.
    """
    b = rotations.shape[0]
    parts = [rotations[:, None]] if include_consensus else []
    if n_neighbours > 0:
        delta = perturbations(n_neighbours, spread_deg, mode, b, rotations.device, rotations.dtype)
        parts.append(delta @ rotations[:, None])
    if not parts:
        raise ValueError("no poses: n_neighbours=0 and include_consensus=False")
    return torch.cat(parts, 1)
