"""Projection of volumes at RELION poses: real-space (rotate + integrate) and Fourier-slice.

Both follow :mod:`hetero.physics.conventions`: the rotated volume is ``V'(r) = V(A.T r)`` and
the projection integrates ``V'`` along z; the Fourier slice is ``F[P](k) = F[V](A.T k)``.
Pixel sums are in units of the input voxel values (a projection of a volume of ones through a
box of side D has value D at the centre).

Example usage::

    A = euler_to_matrix(euler_deg)                              # (B, 3, 3)
    proj = project_real(volume, A)                              # (B, D, D)
    proj_f = project_fourier(volume, A)                         # same within interpolation error
    images = render(volume, A, shifts_px=-origin_px, ctf=ctf)   # the full forward model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hetero.physics.fourier import fft2_centered, fft3_centered, ifft2_centered, phase_ramp_2d


def centered_grid_3d(size: int, device=None, dtype=torch.float32) -> Tensor:
    """``(size, size, size, 3)`` coordinates ``(x, y, z)`` in pixels from the centre ``size // 2``,
    indexed ``[z, y, x]``."""
    a = torch.arange(size, device=device, dtype=dtype) - size // 2
    z, y, x = torch.meshgrid(a, a, a, indexing="ij")
    return torch.stack([x, y, z], -1)


def centered_grid_2d(size: int, device=None, dtype=torch.float32) -> Tensor:
    """``(size, size, 2)`` coordinates ``(x, y)`` in pixels from the centre, indexed ``[y, x]``."""
    a = torch.arange(size, device=device, dtype=dtype) - size // 2
    y, x = torch.meshgrid(a, a, indexing="ij")
    return torch.stack([x, y], -1)


def _to_grid_sample_coords(coords_px: Tensor, size: int) -> Tensor:
    """Pixel coordinates relative to index ``size // 2`` -> grid_sample's [-1, 1] (align_corners)."""
    return (coords_px + size // 2) * (2.0 / (size - 1)) - 1.0


def rotate_volume(
    volumes: Tensor,
    rotations: Tensor,
    out_size: int | None = None,
    scale: float = 1.0,
    mode: str = "bilinear",
) -> Tensor:
    """Rotate volumes into the image frame: ``V'(r) = V(A.T r * scale)``.

    :param volumes: ``(D, D, D)`` shared by all poses, or ``(B, D, D, D)`` one per pose.
    :param rotations: ``(B, 3, 3)`` RELION matrices ``A``.
    :param out_size: side of the output cube (default ``D``).
    :param scale: output-pixel size over input-voxel size (resampling factor), e.g. ``D / out``
        to resample a ``D``-cube onto an ``out``-cube covering the same physical extent.
    :param mode: ``"bilinear"`` (trilinear) or ``"nearest"`` as in ``F.grid_sample``.
    :return: ``(B, S, S, S)`` rotated volumes, ``S = out_size``.
    """
    n = rotations.shape[0]
    size = volumes.shape[-1]
    out = out_size or size
    grid = centered_grid_3d(out, device=rotations.device, dtype=rotations.dtype) * scale
    # Row-vector form: (A.T r)^T = r^T A.
    coords = torch.einsum("zyxi,bij->bzyxj", grid, rotations)
    coords = _to_grid_sample_coords(coords, size).to(volumes.dtype)
    vol = volumes.unsqueeze(-4) if volumes.dim() == 4 else volumes[None, None].expand(n, 1, -1, -1, -1)
    return F.grid_sample(vol, coords, mode=mode, padding_mode="zeros", align_corners=True)[:, 0]


def project_real(
    volumes: Tensor, rotations: Tensor, out_size: int | None = None, scale: float = 1.0
) -> Tensor:
    """Real-space projection: rotate by trilinear sampling, then sum along z.

    :param volumes: ``(D, D, D)`` or ``(B, D, D, D)``. :param rotations: ``(B, 3, 3)``.
    :return: ``(B, S, S)``; each sample is weighted by ``scale`` (the path length of one output
        voxel in input-voxel units), so the line integral is preserved when resampling.
    """
    return rotate_volume(volumes, rotations, out_size, scale).sum(-3) * scale


# --------------------------------------------------------------------------------------------
# Fourier-space slicing and insertion with explicit trilinear weights (exact adjoints).
# --------------------------------------------------------------------------------------------


def _trilinear_corners(coords: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Flat indices ``(..., 8)`` and weights ``(..., 8)`` of the trilinear neighbours of
    ``coords`` (``(..., 3)``, (x, y, z) in grid index units) in a ``size^3`` array ``[z, y, x]``.
    Out-of-bounds corners get weight 0 and index 0."""
    base = torch.floor(coords)
    frac = coords - base
    base = base.long()
    idx, wts = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                cx, cy, cz = base[..., 0] + dx, base[..., 1] + dy, base[..., 2] + dz
                w = (
                    (frac[..., 0] if dx else 1 - frac[..., 0])
                    * (frac[..., 1] if dy else 1 - frac[..., 1])
                    * (frac[..., 2] if dz else 1 - frac[..., 2])
                )
                inside = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size) & (cz >= 0) & (cz < size)
                idx.append(torch.where(inside, (cz * size + cy) * size + cx, torch.zeros_like(cx)))
                wts.append(torch.where(inside, w, torch.zeros_like(w)))
    return torch.stack(idx, -1), torch.stack(wts, -1)


def slice_coordinates(
    rotations: Tensor, box_size: int, padded_size: int, volume_size: int | None = None
) -> Tensor:
    """Grid-index coordinates ``(..., D, D, 3)`` in a centred padded spectrum of side
    ``padded_size`` of the central slice ``A.T (kx, ky, 0)`` for a ``box_size`` image.

    :param rotations: ``(..., 3, 3)``.
    :param volume_size: side of the (unpadded) volume whose spectrum is sliced, when it differs
        from the image box (same physical extent, other sampling); default ``box_size``.
    """
    pad = padded_size / (volume_size or box_size)
    k2 = centered_grid_2d(box_size, device=rotations.device, dtype=rotations.dtype)
    k3 = torch.cat([k2, torch.zeros_like(k2[..., :1])], -1)
    coords = torch.einsum("yxi,...ij->...yxj", k3, rotations) * pad
    return coords + padded_size // 2


def slice_spectrum(spectrum: Tensor, rotations: Tensor, box_size: int) -> Tensor:
    """Trilinear central slices of a centred 3-D spectrum.

    :param spectrum: ``(P, P, P)`` complex (or real) centred spectrum of a padded volume.
    :param rotations: ``(B, 3, 3)``. :param box_size: side D of the 2-D slices.
    :return: ``(B, D, D)`` slices (frequencies outside the cube are zero).
    """
    size = spectrum.shape[-1]
    coords = slice_coordinates(rotations.to(torch.float64 if spectrum.dtype == torch.complex128 else torch.float32), box_size, size)
    idx, w = _trilinear_corners(coords, size)
    flat = spectrum.reshape(-1)
    return (flat[idx] * w.to(flat.real.dtype if flat.is_complex() else flat.dtype)).sum(-1)


def insert_slices(
    slices: Tensor, rotations: Tensor, padded_size: int, weights: Tensor | None = None
) -> Tensor:
    """Adjoint of :func:`slice_spectrum`: scatter ``(B, D, D)`` slices into a ``(P, P, P)`` grid.

    ``<slice_spectrum(V, A), X> == <V, insert_slices(X, A)>`` exactly (real inner product).
    :param weights: optional ``(B, D, D)`` multipliers applied to the slices before insertion.
    """
    box = slices.shape[-1]
    rdtype = slices.real.dtype if slices.is_complex() else slices.dtype
    coords = slice_coordinates(rotations.to(rdtype), box, padded_size)
    idx, w = _trilinear_corners(coords, padded_size)
    values = slices if weights is None else slices * weights
    contrib = (values[..., None] * w.to(rdtype)).reshape(-1)
    out = torch.zeros(padded_size**3, dtype=slices.dtype, device=slices.device)
    out.index_add_(0, idx.reshape(-1), contrib)
    return out.reshape(padded_size, padded_size, padded_size)


def gridding_correction(size: int, padded_size: int, device=None, dtype=torch.float32) -> Tensor:
    """Real-space ``sinc^2`` per axis of trilinear interpolation on a grid of side ``padded_size``,
    evaluated on a centred ``size^3`` cube (divide by it to undo interpolation roll-off)."""
    a = (torch.arange(size, device=device, dtype=dtype) - size // 2) / padded_size
    s = torch.sinc(a) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def volume_spectrum(volume: Tensor, pad_factor: int = 2, correct_gridding: bool = True) -> Tensor:
    """Centred spectrum of ``(..., D, D, D)`` volumes zero-padded to ``pad_factor * D``,
    pre-divided by the trilinear gridding kernel so that slicing is accurate."""
    size = volume.shape[-1]
    padded = pad_factor * size
    vol = volume
    if correct_gridding:
        vol = vol / gridding_correction(size, padded, device=vol.device, dtype=vol.dtype)
    p = padded // 2 - size // 2
    big = vol.new_zeros(*vol.shape[:-3], padded, padded, padded)
    big[..., p : p + size, p : p + size, p : p + size] = vol
    return fft3_centered(big)


def volume_rfft(volumes: Tensor, pad_factor: int = 2, correct_gridding: bool = True) -> Tensor:
    """Half spectrum (``rfftn``, no centring shifts) of ``(..., T, T, T)`` volumes zero-padded
    to ``S = pad_factor * T`` with the volume centre (index ``T // 2``) moved to index 0.

    The fast path of :func:`slice_spectra`: avoiding the fftshift copies and using the real
    transform makes it several times cheaper than :func:`volume_spectrum` for batches.
    :return: ``(..., S, S, S // 2 + 1)`` complex, indexed ``[kz, ky, kx]`` (numpy FFT order).
    """
    size = volumes.shape[-1]
    padded = pad_factor * size
    vol = volumes
    if correct_gridding:
        vol = vol / gridding_correction(size, padded, device=vol.device, dtype=vol.dtype)
    wrap = (torch.arange(size, device=vol.device) - size // 2) % padded
    big = vol.new_zeros(*vol.shape[:-3], padded, padded, padded)
    big[..., wrap[:, None, None], wrap[None, :, None], wrap[None, None, :]] = vol
    return torch.fft.rfftn(big, dim=(-3, -2, -1))


def slice_spectra(half_spectra: Tensor, rotations: Tensor, box_size: int, volume_size: int) -> Tensor:
    """Central slices of a batch of half spectra, several poses each (differentiable).

    :param half_spectra: ``(V, S, S, S // 2 + 1)`` from :func:`volume_rfft` of volumes of side
        ``volume_size`` padded to ``S``.
    :param rotations: ``(V, P, 3, 3)``: ``P`` poses for each volume.
    :param box_size: side ``D`` of the slices (frequencies beyond the padded grid are zero).
    :return: ``(V, P, D, D)`` *centred* 2-D spectra ``F[V](A.T k)``, ``k`` in cycles per box
        (the volume and the image span the same physical extent). Trilinear interpolation on
        the periodic grid; negative ``kx`` come from Hermitian symmetry ``F(-q) = conj F(q)``.
    """
    n, size = half_spectra.shape[0], half_spectra.shape[-3]
    half = half_spectra.shape[-1]
    rdtype = half_spectra.real.dtype
    pad = size / volume_size
    k2 = centered_grid_2d(box_size, device=rotations.device, dtype=rdtype)
    k3 = torch.cat([k2, torch.zeros_like(k2[..., :1])], -1)
    q = torch.einsum("yxi,vpij->vpyxj", k3, rotations.to(rdtype)) * pad   # (V, P, D, D, 3) x,y,z
    inside = (q.abs() <= size / 2 - 1).all(-1)
    base = torch.floor(q)
    frac = q - base
    base = base.long()
    flat = half_spectra.reshape(-1)
    offset = torch.arange(n, device=q.device).reshape(n, 1, 1, 1, 1) * (size * size * half)
    corners = torch.tensor(
        [[dx, dy, dz] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)], device=q.device
    )                                                                       # (8, 3)
    c = base[..., None, :] + corners                                        # (V, P, D, D, 8, 3)
    f = frac[..., None, :]
    w = torch.where(corners.bool(), f, 1 - f).prod(-1)                      # (V, P, D, D, 8)
    neg = c[..., 0] < 0          # stored as the conjugate of the mirrored frequency
    c = torch.where(neg[..., None], -c, c)
    idx = ((c[..., 2] % size) * size + (c[..., 1] % size)) * half + c[..., 0].clamp(max=half - 1)
    # One gather for all eight corners (a single scatter-add in the backward pass).
    v = flat[idx + offset]
    v = torch.where(neg, v.conj(), v)
    out = (v * w).sum(-1)
    return out * inside


def project_fourier(volume: Tensor, rotations: Tensor, pad_factor: int = 2) -> Tensor:
    """Fourier-slice projection of one ``(D, D, D)`` volume at ``(B, 3, 3)`` poses -> ``(B, D, D)``."""
    spec = volume_spectrum(volume, pad_factor)
    return ifft2_centered(slice_spectrum(spec, rotations, volume.shape[-1])).real


def render(
    volumes: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None = None,
    ctf: Tensor | None = None,
) -> Tensor:
    """The image-formation model: project, apply the CTF, translate.

    :param volumes: ``(D, D, D)`` or ``(B, D, D, D)``. :param rotations: ``(B, 3, 3)``.
    :param shifts_px: ``(B, 2)`` translation ``t`` (pixels): ``out(r) = in(r - t)``; RELION's is
        ``t = -origin``. :param ctf: ``(B, D, D)`` centred CTF.
    :return: ``(B, D, D)`` images.
    """
    proj = project_real(volumes, rotations)
    if shifts_px is None and ctf is None:
        return proj
    f = fft2_centered(proj)
    if ctf is not None:
        f = f * ctf
    if shifts_px is not None:
        f = f * phase_ramp_2d(shifts_px, proj.shape[-1])
    return ifft2_centered(f).real
