"""Posterior-weighted backprojection of one batch into many class accumulators at once.

The data model is :class:`hetero.physics.reconstruction.BackprojectionAccumulator`'s, read off
its geometry so that this code follows it whatever that grid is: each ``(D, D)`` image is
zero-padded in real space to ``S = acc.ctf_size``, Fourier transformed, moved by its origin,
multiplied by its CTF evaluated on ``S`` (the caller evaluates it there) and inserted with
trilinear weights (those of :func:`hetero.physics.projection.insert_slices`, the adjoint of its
slicing: out-of-grid corners dropped) at ``A.T k * P / S`` into the ``P^3`` grid,
``P = acc.padded_size``; ``CTF^2`` goes into the weights. For ``K = 1`` and unit weights the sums equal
``acc.add`` exactly (tested). What differs is the bookkeeping: the spectra, CTF and
interpolation corners of a batch are computed once and scattered into every class of every
replicate with its own posterior weight, in one ``index_add_`` per chunk, and only samples
within the current size (plus the interpolation reach) are inserted, as RELION does.

Example usage::

    data = insertion_data(template_acc, images, rotations, -origin_px, ctf_on_ctf_size, r_max=19)
    scatter(data, numerator, weight, rows, classes, weights)     # (C, P, P, P) grids
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hetero.physics.fourier import fft2_centered, phase_ramp_2d
from hetero.physics.projection import centered_grid_2d
from hetero.physics.reconstruction import BackprojectionAccumulator


@dataclass
class InsertionData:
    """One batch, ready to scatter: ``idx, w (B, M, 8)`` corners in the ``P^3`` grid,
    ``data (B, M)`` complex ``CTF * X`` and ``ctf2 (B, M)`` at the ``M`` inserted samples."""

    idx: Tensor
    w: Tensor
    data: Tensor
    ctf2: Tensor


#: The eight trilinear corner offsets (x, y, z).
_CORNERS = [[dx, dy, dz] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def trilinear_corners(coords: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Flat indices and weights ``(..., 8)`` of the trilinear neighbours of ``coords``
    ``(..., 3)`` ((x, y, z) grid indices) in a ``size^3`` array ``[z, y, x]``; corners outside
    the grid get index 0 and weight 0 (as in :func:`hetero.physics.projection.insert_slices`)."""
    base = torch.floor(coords)
    frac = coords - base
    offsets = torch.tensor(_CORNERS, device=coords.device)
    c = base.long()[..., None, :] + offsets                                   # (..., 8, 3)
    w = torch.where(offsets.bool(), frac[..., None, :], 1 - frac[..., None, :]).prod(-1)
    inside = ((c >= 0) & (c < size)).all(-1)
    idx = (c[..., 2] * size + c[..., 1]) * size + c[..., 0]
    return torch.where(inside, idx, 0), torch.where(inside, w, 0)


def _sample_indices(size: int, scale: float, radius: float, device) -> tuple[Tensor, Tensor]:
    """Flat indices and ``(kx, ky)`` of the ``size^2`` centred samples whose position in the
    padded grid, ``|k| * scale``, is within ``radius``."""
    k = centered_grid_2d(size, device=device, dtype=torch.float64)
    keep = torch.nonzero(((k**2).sum(-1).sqrt() * scale <= radius).flatten()).squeeze(1)
    return keep, k.reshape(-1, 2)[keep]


def insertion_data(
    acc: BackprojectionAccumulator,
    images: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None,
    ctf: Tensor | None,
    r_max: float | None = None,
) -> InsertionData:
    """Spectra, CTF and corners of a batch in ``acc``'s data model (see the module docstring).

    :param images: ``(B, D, D)``. :param rotations: ``(B, 3, 3)``.
    :param shifts_px: ``(B, 2)`` forward translation ``-origin`` (pixels of ``D``) or ``None``.
    :param ctf: ``(B, S, S)`` on ``acc.ctf_size`` or ``None`` (CTF = 1).
    :param r_max: radius in shells of ``D`` beyond which the maps are not reconstructed (samples
        that cannot reach a voxel within it are skipped); ``None``: all samples.
    """
    dtype = acc.weight.dtype
    d, s, p = acc.box_size, acc.ctf_size, acc.padded_size
    if images.shape[-2:] != (d, d):
        raise ValueError(f"images must be (B, {d}, {d}), got {tuple(images.shape)}")
    if ctf is not None and ctf.shape[-2:] != (s, s):
        raise ValueError(f"ctf must be evaluated on acc.ctf_size = {s}, got {tuple(ctf.shape)}")
    padded = images.to(dtype)
    if s != d:
        o = s // 2 - d // 2
        padded = F.pad(padded, (o, s - d - o, o, s - d - o))
    f = fft2_centered(padded)
    if shifts_px is not None:
        f = f * phase_ramp_2d(-shifts_px.to(dtype), s)
    scale = p / s
    # Samples beyond the reconstructed radius reach voxels inside it by at most sqrt(3) voxels.
    radius = (float(r_max) + 0.5) * p / d + 2.0 if r_max is not None else float("inf")
    keep, k2 = _sample_indices(s, scale, radius, images.device)
    f = f.reshape(f.shape[0], -1)[:, keep]
    w = torch.ones_like(f.real) if ctf is None else ctf.to(dtype).reshape(ctf.shape[0], -1)[:, keep]
    k3 = torch.cat([k2, torch.zeros_like(k2[:, :1])], -1).to(dtype)
    coords = torch.einsum("mi,bij->bmj", k3, rotations.to(dtype)) * scale + p // 2
    idx, wts = trilinear_corners(coords, p)
    return InsertionData(idx, wts, f * w, w * w)


def scatter(
    data: InsertionData,
    numerator: Tensor,
    weight: Tensor,
    rows: Tensor,
    classes: Tensor,
    weights: Tensor,
    chunk_elements: int = 1 << 23,
) -> None:
    """``numerator[c] += g * CTF X`` and ``weight[c] += g * CTF^2`` for each triple
    ``(rows[j], classes[j], weights[j] = g)``.

    :param numerator: ``(C, P, P, P)`` complex; ``weight``: ``(C, P, P, P)`` real (same grid
        as the accumulator the data were prepared for).
    """
    if rows.numel() == 0:
        return
    grid = numerator[0].numel()
    num_flat, wgt_flat = numerator.view(-1), weight.view(-1)
    m = data.idx.shape[1]
    step = max(1, chunk_elements // (m * 8))
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], classes[start : start + step]
        g = weights[start : start + step].to(data.w.dtype)
        idx = (data.idx[r] + c[:, None, None] * grid).reshape(-1)
        w = data.w[r] * g[:, None, None]                                     # (n, M, 8)
        num_flat.index_add_(0, idx, (data.data[r][..., None] * w).reshape(-1).to(num_flat.dtype))
        wgt_flat.index_add_(0, idx, (data.ctf2[r][..., None] * w).reshape(-1).to(wgt_flat.dtype))
