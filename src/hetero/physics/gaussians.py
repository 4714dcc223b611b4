"""Sums of isotropic 3-D Gaussians (pseudo-atoms): exact projections and voxel maps.

The density of ``N`` Gaussians with centres ``c_j`` (Å, ``(x, y, z)`` from the box centre, the
voxel at index ``D // 2``), standard deviations ``sigma_j`` (Å) and peak heights ``a_j``::

    rho(r) = sum_j a_j exp(-|r - c_j|^2 / (2 sigma_j^2))            (DynaMight eq. 2)

(DynaMight writes the exponent as ``|x|^2 / s_j``: ``s_j = 2 sigma_j^2``.) Its projection at a
RELION pose ``A`` (:mod:`hetero.physics.conventions`) is the exact line integral, in units of
voxel values times pixels like :func:`hetero.physics.projection.project_real`::

    P(p) = sum_j a_j sigma_j sqrt(2 pi) / apix * exp(-|p - (A c_j)_xy|^2 / (2 sigma_j^2))

sampled at pixel centres ``p``, then ``image = translate(CTF * P, t)`` with ``t = -origin``.

How it is computed (batched over images and Gaussians, no Python loop over either):

1. Each Gaussian is split as ``sigma_j^2 = s_j^2 + sigma_r^2``: a narrow part ``s_j`` (at least
   ``splat_sigma_px``) is *splatted* exactly, ``exp(-d^2 / (2 s_j^2))`` at the true distance
   ``d`` of every pixel of a ``W x W`` stencil (``W = 2 ceil(truncate * max_j s_j)``) around the
   centre (no rounded radius grid); ``sigma_r = sqrt(min_j sigma_j^2 - splat_sigma_px^2)`` is
   shared by all Gaussians and applied as the exact Gaussian filter
   ``exp(-2 pi^2 sigma_r^2 |k|^2)`` in Fourier space, where the CTF is applied too. Since a
   convolution of Gaussians is a Gaussian, the result is the exact sampled projection up to
   the stencil truncation (``exp(-truncate^2 / 2)``: 3e-4 at the default 4) and the aliasing of
   the splatted part (below 0.2 % of the peak for ``splat_sigma_px = 0.75``).
2. The splat is a custom autograd function that keeps only the ``(B, N, W)`` per-axis profiles
   and stencil origins for the backward pass and processes Gaussians in chunks, so memory is
   ``O(B N W)``, never ``O(B N D^2)``; the ``W x W`` stencil values exist only per chunk.
3. Shifts move the projected centres (exact, free); the CTF multiplies the half spectrum
   (``rfft2``).

Gradients with respect to centres, widths and amplitudes are exact (tested against finite
differences). Everything runs in float32 (float64 if the positions are float64), also inside
``torch.autocast`` regions.

Example usage::

    images = project_gaussians(pos_A, sigma_A, amp, rotations, box_size=64,
                               pixel_size_angstrom=3.0, shifts_px=-origin_px, ctf=ctf)  # (B, 64, 64)
    vol = rasterize_gaussians(pos_A, sigma_A, amp, grid_size=64, voxel_size_angstrom=3.0)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Default narrowest splatted width (pixels); wider parts go to the Fourier-space filter.
SPLAT_SIGMA_PX = 0.75
#: Default stencil half-width in units of the splatted sigma.
TRUNCATE = 4.0
#: Stencil elements (batch x Gaussians x W^ndim) processed at a time inside the splat (CPU);
#: on CUDA ``CUDA_CHUNK_ELEMENTS`` (bounds the transient memory to ~12 bytes per element).
CHUNK_ELEMENTS = 1 << 23
CUDA_CHUNK_ELEMENTS = 1 << 26


def _chunk(device: torch.device, per_gaussian: int) -> int:
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, budget // max(1, per_gaussian))


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------------------------
# Splatting: the autograd function
# ----------------------------------------------------------------------------------------------


def _flat_index(indices: list[Tensor], size: int) -> Tensor:
    """Per-axis ``(B, n, W)`` grid indices (axis 0 slowest) -> flat ``(B, n * W^ndim)`` int64."""
    ndim = len(indices)
    flat = None
    for axis, idx in enumerate(indices):
        shape = [1] * ndim
        shape[axis] = idx.shape[-1]
        term = idx.reshape(*idx.shape[:2], *shape) * size ** (ndim - 1 - axis)
        flat = term if flat is None else flat + term
    return flat.flatten(1)


def _outer(profiles: list[Tensor]) -> Tensor:
    """``(B, n, W)`` per axis -> ``(B, n, W, ..., W)`` outer product (axis 0 slowest)."""
    ndim = len(profiles)
    out = None
    for axis, p in enumerate(profiles):
        shape = [1] * ndim
        shape[axis] = p.shape[-1]
        term = p.reshape(*p.shape[:2], *shape)
        out = term if out is None else out * term
    return out


class _Splat(torch.autograd.Function):
    """``out[b, i] += w[b, j] * prod_a profile_a[b, j, i_a]`` over each Gaussian's stencil.

    ``indices`` are the per-axis ``(B, N, W)`` grid indices of the stencils (clamped into the
    grid; the profiles are zero where the stencil leaves it)."""

    @staticmethod
    def forward(ctx, weights: Tensor, size: int, n_axes: int, *tensors: Tensor) -> Tensor:
        indices, profiles = list(tensors[:n_axes]), list(tensors[n_axes:])
        b, n, width = profiles[0].shape
        ndim = len(profiles)
        out = weights.new_zeros(b, size**ndim)
        step = _chunk(weights.device, b * width**ndim)
        for s in range(0, n, step):
            e = min(n, s + step)
            first = profiles[0][:, s:e] * weights[:, s:e, None]
            vals = _outer([first] + [p[:, s:e] for p in profiles[1:]])
            out.scatter_add_(1, _flat_index([i[:, s:e] for i in indices], size), vals.flatten(1))
        ctx.save_for_backward(weights, *indices, *profiles)
        ctx.size, ctx.n_axes = size, n_axes
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weights, *rest = ctx.saved_tensors
        n_axes, size = ctx.n_axes, ctx.size
        indices, profiles = rest[:n_axes], rest[n_axes:]
        b, n, width = profiles[0].shape
        need_w = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[3 + n_axes :]
        grad_w = torch.zeros_like(weights) if need_w else None
        grad_p = [torch.zeros_like(p) if need else None for p, need in zip(profiles, need_p)]
        step = _chunk(weights.device, b * width**n_axes)
        grad_out = grad_out.contiguous()
        dims = tuple(range(2, 2 + n_axes))
        for s in range(0, n, step):
            e = min(n, s + step)
            flat = _flat_index([i[:, s:e] for i in indices], size)
            g = torch.gather(grad_out, 1, flat).reshape(b, e - s, *(width,) * n_axes)
            chunk = [p[:, s:e] for p in profiles]
            w = weights[:, s:e]
            for a in range(n_axes):
                if not (need_p[a] or (need_w and a == 0)):
                    continue
                others = _outer([chunk[i] if i != a else torch.ones_like(chunk[i][..., :1]) for i in range(n_axes)])
                ga = (g * others).sum(tuple(d for d in dims if d != 2 + a))  # (B, n, W)
                if need_w and a == 0:
                    grad_w[:, s:e] = (ga * chunk[0]).sum(-1)
                if need_p[a]:
                    grad_p[a][:, s:e] = ga * w[..., None]
        return (grad_w, None, None, *([None] * n_axes), *grad_p)


def splat_gaussians(
    coords_px: Tensor,
    sigma_px: Tensor | float,
    weights: Tensor,
    size: int,
    truncate: float = TRUNCATE,
) -> Tensor:
    """Sample *normalised* isotropic Gaussians on a ``size^d`` grid, within a truncated stencil.

    ``out[i] = sum_j w_j exp(-|i - c_j|^2 / (2 s_j^2)) / (2 pi s_j^2)^(d/2)`` for the grid points
    ``i`` (index minus ``size // 2``) of the stencil of ``W = 2 ceil(truncate max_j s_j)`` points
    per axis around each centre (distances are exact; points outside the grid are dropped).

    :param coords_px: ``(B, N, d)`` centres ``(x, y[, z])`` in grid units from the centre ``size // 2``.
    :param sigma_px: scalar, ``(N,)`` or ``(B, N)`` standard deviations ``s_j`` (grid units).
    :param weights: ``(B, N)`` integrals ``w_j``. :param size: grid side.
    :return: ``(B, size, size)`` (``d = 2``, indexed ``[y, x]``) or ``(B, size, size, size)``
        (``d = 3``, ``[z, y, x]``).
    """
    b, n, ndim = coords_px.shape
    sigma = torch.as_tensor(sigma_px, dtype=coords_px.dtype, device=coords_px.device)
    sigma = sigma.expand(b, n) if sigma.dim() > 0 else sigma.expand(b, n)
    half = max(1, math.ceil(truncate * float(sigma.detach().max())))
    width = 2 * half
    pos = coords_px + size // 2  # grid-index units
    base = torch.floor(pos.detach()).long() - (half - 1)  # (B, N, d): stencil start per axis
    offsets = torch.arange(width, device=pos.device)
    norm = (1.0 / (math.sqrt(2 * math.pi) * sigma))[..., None]  # per-axis normalisation
    indices, profiles = [], []
    for axis in reversed(range(ndim)):  # array order: z (slowest), y, x
        idx = base[..., axis, None] + offsets  # (B, N, W)
        d = idx.to(pos.dtype) - pos[..., axis, None]
        prof = torch.exp(-0.5 * (d / sigma[..., None]) ** 2) * norm
        inside = (idx >= 0) & (idx < size)
        profiles.append(prof * inside)
        indices.append(idx.clamp(0, size - 1))
    out = _Splat.apply(weights, size, ndim, *indices, *profiles)
    return out.reshape(b, *(size,) * ndim)


# ----------------------------------------------------------------------------------------------
# Fourier-space helpers
# ----------------------------------------------------------------------------------------------


def rfft_radius2(size: int, ndim: int, device=None, dtype=torch.float32) -> Tensor:
    """``|k|^2`` (cycles/pixel squared) on the ``rfftn`` grid of a ``size^ndim`` array
    (``(size, size // 2 + 1)`` or ``(size, size, size // 2 + 1)``, numpy FFT order)."""
    full = torch.fft.fftfreq(size, device=device, dtype=dtype)
    half = torch.fft.rfftfreq(size, device=device, dtype=dtype)
    axes = [full] * (ndim - 1) + [half]
    grids = torch.meshgrid(*axes, indexing="ij")
    return sum(g * g for g in grids)


def centered_to_rfft(spectrum: Tensor) -> Tensor:
    """A centred ``(..., D, D)`` 2-D spectrum (e.g. :func:`hetero.physics.ctf.compute_ctf`) in
    ``rfft2`` layout ``(..., D, D // 2 + 1)``."""
    size = spectrum.shape[-1]
    return torch.fft.ifftshift(spectrum, dim=(-2, -1))[..., : size // 2 + 1]


def _residual_sigma(sigma_px: Tensor, splat_sigma_px: float) -> float:
    """Shared width ``sigma_r`` moved to the Fourier filter (0 when a Gaussian is narrower
    than ``splat_sigma_px``); a constant for autograd (the sum of variances is what counts)."""
    smallest = float(sigma_px.detach().min())
    return math.sqrt(max(smallest**2 - splat_sigma_px**2, 0.0))


def _split_widths(sigma_px: Tensor, splat_sigma_px: float | None) -> tuple[Tensor, float]:
    if splat_sigma_px is None:
        return sigma_px, 0.0
    r = _residual_sigma(sigma_px, splat_sigma_px)
    return torch.sqrt((sigma_px * sigma_px - r * r).clamp(min=1e-12)), r


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def project_gaussians(
    positions_angstrom: Tensor,
    sigma_angstrom: Tensor | float,
    amplitudes: Tensor,
    rotations: Tensor,
    box_size: int,
    pixel_size_angstrom: float,
    shifts_px: Tensor | None = None,
    ctf: Tensor | None = None,
    splat_sigma_px: float | None = SPLAT_SIGMA_PX,
    truncate: float = TRUNCATE,
    return_spectrum: bool = False,
) -> Tensor:
    """Images of Gaussian pseudo-atoms at RELION poses (see the module docstring).

    :param positions_angstrom: ``(N, 3)`` shared or ``(B, N, 3)`` per-image centres ``(x, y, z)``
        in Å from the box centre.
    :param sigma_angstrom: scalar, ``(N,)`` standard deviations (Å).
    :param amplitudes: ``(N,)`` or ``(B, N)`` peak heights (voxel-value units).
    :param rotations: ``(B, 3, 3)`` RELION matrices ``A``.
    :param box_size: image side ``D``. :param pixel_size_angstrom: Å per pixel.
    :param shifts_px: ``(B, 2)`` forward translation ``t = -origin`` (pixels), or ``None``.
    :param ctf: ``(B, D, D)`` *centred* CTF (:func:`hetero.physics.ctf.compute_ctf`) or ``None``.
    :param splat_sigma_px: narrowest splatted width (pixels); ``None`` splats every Gaussian at
        its full width (no Fourier filter; exact but with wider stencils).
    :param truncate: stencil half-width in splatted sigmas.
    :param return_spectrum: return the ``rfft2`` half spectrum ``(B, D, D // 2 + 1)`` (numpy
        order, unnormalised) instead of the image (saves the inverse FFT in a Fourier loss).
    :return: ``(B, D, D)`` images ``[y, x]`` (or their half spectra), float32/float64.
    """
    with torch.autocast(rotations.device.type, enabled=False):
        pos = _float(positions_angstrom)
        dtype = pos.dtype
        rot = rotations.to(dtype)
        b = rot.shape[0]
        if pos.dim() == 2:
            pos = pos.expand(b, -1, -1)
        n = pos.shape[1]
        apix = float(pixel_size_angstrom)
        sigma = torch.as_tensor(sigma_angstrom, dtype=dtype, device=pos.device) / apix
        sigma = sigma.expand(n) if sigma.dim() == 0 else sigma
        amp = _float(amplitudes).to(dtype).expand(b, n)
        xy = torch.einsum("bij,bnj->bni", rot[:, :2, :], pos) / apix
        if shifts_px is not None:
            xy = xy + shifts_px.to(dtype)[:, None, :]
        # Line integral a sigma sqrt(2 pi) times the 2-D peak 2 pi sigma^2 of a normalised Gaussian.
        weights = amp * (2 * math.pi) ** 1.5 * sigma**3
        splat_sigma, residual = _split_widths(sigma, splat_sigma_px)
        image = splat_gaussians(xy, splat_sigma, weights, box_size, truncate)
        if residual == 0.0 and ctf is None and not return_spectrum:
            return image
        spec = torch.fft.rfft2(torch.fft.ifftshift(image, dim=(-2, -1)))
        if residual > 0.0:
            k2 = rfft_radius2(box_size, 2, device=pos.device, dtype=dtype)
            spec = spec * torch.exp(-2 * math.pi**2 * residual**2 * k2)
        if ctf is not None:
            spec = spec * centered_to_rfft(ctf.to(dtype))
        if return_spectrum:
            return spec
        return torch.fft.fftshift(torch.fft.irfft2(spec, s=(box_size, box_size)), dim=(-2, -1))


def rasterize_gaussians(
    positions_angstrom: Tensor,
    sigma_angstrom: Tensor | float,
    amplitudes: Tensor,
    grid_size: int,
    voxel_size_angstrom: float,
    splat_sigma_px: float | None = SPLAT_SIGMA_PX,
    truncate: float = TRUNCATE,
) -> Tensor:
    """Voxel maps ``rho`` of Gaussian pseudo-atoms sampled at voxel centres (``[z, y, x]``).

    Same arithmetic as :func:`project_gaussians` in 3-D (narrow part splatted exactly, shared
    remainder as a Fourier-space Gaussian filter); differentiable.

    :param positions_angstrom: ``(N, 3)`` or ``(K, N, 3)`` centres (Å from the grid centre
        ``grid_size // 2``). :param sigma_angstrom: scalar or ``(N,)`` (Å).
    :param amplitudes: ``(N,)`` or ``(K, N)`` peak heights.
    :return: ``(grid_size,) * 3`` or ``(K, grid_size, grid_size, grid_size)``.
    """
    with torch.autocast(positions_angstrom.device.type, enabled=False):
        pos = _float(positions_angstrom)
        single = pos.dim() == 2
        if single:
            pos = pos[None]
        k, n = pos.shape[:2]
        dtype = pos.dtype
        v = float(voxel_size_angstrom)
        sigma = torch.as_tensor(sigma_angstrom, dtype=dtype, device=pos.device) / v
        sigma = sigma.expand(n) if sigma.dim() == 0 else sigma
        amp = _float(amplitudes).to(dtype).expand(k, n)
        weights = amp * (2 * math.pi) ** 1.5 * sigma**3
        splat_sigma, residual = _split_widths(sigma, splat_sigma_px)
        vol = splat_gaussians(pos / v, splat_sigma, weights, grid_size, truncate)
        if residual > 0.0:
            dims = (-3, -2, -1)
            spec = torch.fft.rfftn(torch.fft.ifftshift(vol, dim=dims), dim=dims)
            k2 = rfft_radius2(grid_size, 3, device=pos.device, dtype=dtype)
            spec = spec * torch.exp(-2 * math.pi**2 * residual**2 * k2)
            vol = torch.fft.fftshift(torch.fft.irfftn(spec, s=(grid_size,) * 3, dim=dims), dim=dims)
        return vol[0] if single else vol


__all__ = [
    "SPLAT_SIGMA_PX",
    "TRUNCATE",
    "centered_to_rfft",
    "project_gaussians",
    "rasterize_gaussians",
    "rfft_radius2",
    "splat_gaussians",
]
