"""Posterior-weighted backprojection of one batch into many class accumulators at once.

The data model is :class:`hetero.physics.reconstruction.BackprojectionAccumulator`'s (RELION's
``backproject2Dto3D``), read off its geometry so that this code follows it: the ``D x D``
spectrum of each image (not padded), moved by its origin, is multiplied by its CTF on the image
grid (``acc.ctf_size``) and inserted with trilinear weights (the shared
:func:`hetero.physics.projection._trilinear_corners`, out-of-grid corners dropped) at
``pad_factor * A.T k`` into the ``P^3`` grid, ``P = acc.padded_size``; only the half plane the
accumulator inserts (``|k| < D / 2``, ``kx > 0`` or ``kx = 0, ky >= 0``, ``k = 0`` at half
weight) goes in, its Hermitian mirror being added in ``reconstruct``; ``CTF^2`` goes into the
weights. For ``K = 1`` and unit weights the sums equal ``acc.add`` exactly (tested). What
differs is the bookkeeping: the spectra, CTF and interpolation corners of a batch are computed
once and scattered into every class of every replicate with its own posterior weight, in one
``index_add_`` per chunk, and only samples within the current size (plus the interpolation
reach) are inserted, as RELION does.

Example usage::

    data = insertion_data(template_acc, images, rotations, -origin_px, ctf_on_ctf_size, r_max=19)
    scatter(data, numerator, weight, rows, classes, weights)     # (C, P, P, P) grids
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hetero.physics.fourier import fft2_centered, phase_ramp_2d
from hetero.physics.projection import _trilinear_corners, centered_grid_2d
from hetero.physics.reconstruction import BackprojectionAccumulator, _half_plane


@dataclass
class InsertionData:
    """One batch, ready to scatter: ``idx, w (B, M, 8)`` corners in the ``P^3`` grid,
    ``data (B, M)`` complex ``CTF * X`` and ``ctf2 (B, M)`` at the ``M`` inserted samples
    (both including the half-plane multiplicity)."""

    idx: Tensor
    w: Tensor
    data: Tensor
    ctf2: Tensor


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
    :param ctf: ``(B, D, D)`` centred, on ``acc.ctf_size`` (the image grid), or ``None`` (CTF = 1).
    :param r_max: radius in shells of ``D`` beyond which the maps are not reconstructed (samples
        that cannot reach a voxel within it are skipped); ``None``: all samples.
    :raises ValueError: images or CTF of the wrong size.
    """
    dtype = acc.weight.dtype
    d, s, p = acc.box_size, acc.ctf_size, acc.padded_size
    if images.shape[-2:] != (d, d):
        raise ValueError(f"images must be (B, {d}, {d}), got {tuple(images.shape)}")
    if ctf is not None and ctf.shape[-2:] != (s, s):
        raise ValueError(f"ctf must be evaluated on acc.ctf_size = {s}, got {tuple(ctf.shape)}")
    points, mult = _half_plane(d, device=images.device)
    k = centered_grid_2d(d, device=images.device, dtype=dtype).reshape(-1, 2)[points]   # (M, 2) (kx, ky)
    scale = p / d
    if r_max is not None:
        # Samples beyond the reconstructed radius reach voxels inside it by at most sqrt(3) voxels.
        inside = (k**2).sum(-1).sqrt() * scale <= (float(r_max) + 0.5) * scale + 2.0
        points, mult, k = points[inside], mult[inside], k[inside]
    f = fft2_centered(images.to(dtype))
    if shifts_px is not None:
        f = f * phase_ramp_2d(-shifts_px.to(dtype), d)
    f = f.reshape(f.shape[0], -1)[:, points]
    mult = mult.to(dtype)
    c = None if ctf is None else ctf.to(dtype).reshape(ctf.shape[0], -1)[:, points]
    values = f * mult if c is None else f * (c * mult)
    w2 = mult.expand(f.shape[0], -1) if c is None else c * c * mult
    k3 = torch.cat([k, torch.zeros_like(k[:, :1])], -1)
    coords = torch.einsum("mi,bij->bmj", k3, rotations.to(dtype)) * scale + p // 2
    idx, wts = _trilinear_corners(coords, p)
    return InsertionData(idx, wts, values, w2)


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
